"""Interventions and counterfactual rollouts: what each intervention does to a step's inputs, an intervened
object without children leaves every other object's rollout unchanged, and the twins' evaluation (API and
``hclsm eval --counterfactual``)."""
from __future__ import annotations

import json

import pytest
import torch

from hclsm.config import load_config
from hclsm.config.data import PhysicsDataConfig
from hclsm.data.physics import generate_physics_dataset
from hclsm.eval import counterfactual as cf
from hclsm.models import build_model
from hclsm.models.interventions import Intervention, to_model_velocity, to_model_xy
from hclsm.train import train

from helpers import SMALL, assert_user_error, run
from test_causal import CAUSAL, fix_graph
from test_eval_dynamics import small_cfg


def test_each_intervention_changes_only_its_slot():
    g = torch.Generator().manual_seed(0)
    slots, pos, prev = torch.randn(2, 4, 8, generator=g), torch.rand(2, 4, 2, generator=g), torch.rand(2, 4, 2, generator=g)
    gate, slot = torch.ones(2, 4), torch.tensor([1, 3])
    rows = torch.arange(2)
    s, p, a, q = Intervention("displace", slot, torch.full((2, 2), 0.5)).apply(slots, pos, gate, prev)
    assert torch.equal(p[rows, slot], torch.full((2, 2), 0.5)) and torch.equal(s, slots) and torch.equal(a, gate)
    torch.testing.assert_close(p - q, pos - prev)  # the velocity (position - previous) is kept
    other = torch.ones(2, 4, dtype=torch.bool)
    other[rows, slot] = False
    assert torch.equal(p[other], pos[other]) and torch.equal(q[other], prev[other])
    s, p, a, q = Intervention("push", slot, torch.tensor([[0.1, 0.0], [0.0, -0.2]])).apply(slots, pos, gate, prev)
    torch.testing.assert_close((p - q)[rows, slot], (pos - prev)[rows, slot] + torch.tensor([[0.1, 0.0], [0.0, -0.2]]))
    _, _, _, q0 = Intervention("push", slot, torch.full((2, 2), 0.3)).apply(slots, pos, gate, None)
    torch.testing.assert_close((pos - q0)[rows, slot], torch.full((2, 2), 0.3))  # first step: the push is the velocity
    _, _, a, _ = Intervention("remove", slot).apply(slots, pos, gate, prev)
    assert a.sum() == 6 and a[0, 1] == 0 and a[1, 3] == 0 and gate.sum() == 8  # the inputs are not modified
    s, _, _, _ = Intervention("set", slot, torch.zeros(2, 8)).apply(slots, pos, gate, prev)
    assert s[0, 1].abs().sum() == 0 and torch.equal(s[0, 0], slots[0, 0])
    with pytest.raises(ValueError, match="kind must be one of"):
        Intervention("teleport", slot)
    with pytest.raises(ValueError, match="needs a value"):
        Intervention("displace", slot)
    assert to_model_xy(torch.tensor([0.0, 64.0]), 64).tolist() == [-1.0, 1.0]
    assert to_model_velocity(torch.tensor([3.2]), 64).tolist() == [pytest.approx(0.1)]


def test_an_intervention_on_an_object_without_children_leaves_the_other_rollouts_unchanged():
    torch.manual_seed(0)
    model = build_model(load_config("tiny", overrides=[*SMALL, *CAUSAL]).model).eval()
    adjacency = torch.zeros(5, 5)
    # objects 1 -> 2 -> 3 [receiver, sender]; 3 has no children (slot 0 is the background: carried unchanged)
    adjacency[2, 1] = adjacency[3, 2] = 1.0
    fix_graph(model.dynamics.graph, adjacency)
    g = torch.Generator().manual_seed(1)
    slots, pos, gate = torch.randn(2, 4, 5, 16, generator=g), torch.rand(2, 4, 5, 2, generator=g) * 2 - 1, torch.ones(2, 4, 5)
    with torch.no_grad():
        plain = model.predict_ahead(slots, pos, gate, 5)
        for kind, value in (("displace", torch.zeros(2, 2)), ("push", torch.full((2, 2), 0.2)), ("remove", None),
                            ("set", torch.zeros(2, 16))):
            for target, affected in ((3, {3}), (1, {1, 2, 3})):
                new = model.predict_ahead(slots, pos, gate, 5, intervention=Intervention(
                    kind, torch.tensor([target, target]), value))
                for k in range(5):
                    # absolute tolerance only: two hops along the graph the effect is ~1e-5, inside allclose's
                    # default relative tolerance; an unaffected slot's rollout is computed identically (difference 0)
                    same = torch.allclose(new[0][:, :, k], plain[0][:, :, k], rtol=0, atol=1e-7) and torch.allclose(
                        new[1][:, :, k], plain[1][:, :, k], rtol=0, atol=1e-7)
                    assert same == (k not in affected) or (kind == "remove" and k == target), (kind, target, k)


def test_twins_are_rolled_out_with_their_intervention_and_scored(data, monkeypatch):
    monkeypatch.setattr(cf, "MATCH_RADIUS", 10.0)  # an untrained model: take the nearest slot, however far
    torch.manual_seed(0)
    # every slot alive (no existence gates), so an untrained model has slots to intervene on
    model = build_model(load_config("tiny", overrides=[*SMALL, "model.slots.dynamic=false"]).model)
    cases, unmatched = cf.counterfactual_cases(model, data, range(4), 2, 2)
    assert unmatched == 0 and len(cases) == len(cf.twin_episodes(data, range(4), 2, 2)) >= 1
    for c in cases:
        assert c.context.shape[0] == 2 and c.factual.shape == c.twin.shape == c.plain.frames[0].shape
        assert all(v >= 0 for v in c.errors.values())
        if c.kind == "remove":
            assert c.intervened.alive.sum() == c.plain.alive.sum() - 1
        else:
            assert not torch.equal(c.intervened.positions, c.plain.positions)
    s = cf.summarise(cases, unmatched)
    assert s["twins"] == len(cases) and s["ratio_cf_vs_factual"] == pytest.approx(
        s["counterfactual_mse"] / s["factual_mse"])
    with pytest.raises(cf.DataError, match="no counterfactual twin"):
        cf.summarise([], 3)


def test_cli_eval_counterfactual_writes_pictures_and_names_a_dataset_without_twins(capsys, data, tmp_path,
                                                                                   monkeypatch):
    monkeypatch.setattr(cf, "MATCH_RADIUS", 10.0)
    trained_run = tmp_path / "run"  # one stage-2 step, every slot alive, every episode evaluated
    train(small_cfg("train.steps=1", "train.warmup_steps=0", "train.batch_size=2", "train.stage=2", "train.device=cpu",
                    "train.eval_every=0", "train.ckpt_every=0", "train.val_fraction=0", "data.clip.length=3",
                    "model.slots.dynamic=false"), data, run_dir=trained_run, progress=False)
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "eval", trained_run, "--data", data, "--context", "2", "--horizon", "2",
                            "--clips", "1", "--out", out, "--quiet", "--counterfactual")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["counterfactual"]["twins"] >= 1 and "counterfactual twins" in stdout
    assert any(p.startswith("cf1_") for p in m["pictures"])
    plain = tmp_path / "plain"
    generate_physics_dataset(plain, PhysicsDataConfig(episodes=4, frames=8, image_size=32, max_objects=4,
                                                      counterfactual=False), progress=False)
    assert_user_error(*run(capsys, "eval", trained_run, "--data", plain, "--context", "2", "--horizon", "2",
                           "--out", tmp_path / "e2", "--counterfactual", "--quiet")[::2], "counterfactual twins",
                      "hclsm data physics")
    assert not (tmp_path / "e2").exists()
