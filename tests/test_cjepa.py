"""C-JEPA: the masked slot predictor, its masks, the CTT losses and graphs, training, slot files and the
counterfactual questions."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from hclsm.config.cjepa import CJEPAConfig, CTTConfig
from hclsm.data.slots import SlotSequences, load_slot_file, save_slot_file
from hclsm.errors import ConfigError, DataError
from hclsm.models.cjepa import (
    CJEPAOutput, MaskedSlotPredictor, attention_graph, ctt_losses, learned_graph, prediction_losses,
)
from hclsm.train.cjepa import gather, slot_windows, train_cjepa

S, D = 5, 6
SMALL = CJEPAConfig(d_model=16, depth=2, heads=2, mlp=32, history=3, future=2, masked=2, d_edge=8, epochs=1,
                    batch_size=8, warmup_steps=2)
FULL = replace(SMALL, action_dim=2, proprio_dim=3, graph_gate=True, position_dims=2,
               ctt=CTTConfig(inv_weight=0.2, suf_weight=0.1, graph="learned"))


def window(b: int = 4, cfg: CJEPAConfig = SMALL, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.window, S, D, generator=g)
    alive = torch.ones(b, cfg.window, S, dtype=torch.bool)
    return x, alive


def predictor(cfg: CJEPAConfig = SMALL) -> MaskedSlotPredictor:
    """A predictor whose output layer is random, as after training (it starts at zero: the constant-velocity
    base), so that every input can reach the output."""
    model = MaskedSlotPredictor(D, cfg)
    torch.nn.init.normal_(model.out.weight, std=0.1)
    return model


def nodes(b: int, cfg: CJEPAConfig) -> dict:
    return {"action": torch.randn(b, cfg.window, cfg.action_dim) if cfg.action_dim else None,
            "proprio": torch.randn(b, cfg.window, cfg.proprio_dim) if cfg.proprio_dim else None}


# ---- masks ----------------------------------------------------------------------------------------------
def test_masks_differ_across_steps_and_samples_and_hide_alive_slots():
    model = MaskedSlotPredictor(D, SMALL)
    alive0 = torch.ones(64, S, dtype=torch.bool)
    alive0[:, 4] = False  # a dead slot is never hidden while enough slots are alive
    first, second = model.draw_mask(alive0), model.draw_mask(alive0)
    assert (first.sum(-1) == 2).all() and not first[:, 4].any()
    assert len({tuple(m.tolist()) for m in first}) > 1  # samples differ
    assert not torch.equal(first, second)  # steps differ (the public C-JEPA re-seeds: same slots every step)
    few = torch.zeros(3, S, dtype=torch.bool)
    few[:, 0] = True
    assert model.draw_mask(few).sum(-1).tolist() == [1, 1, 1]  # at most the alive slots
    assert not model.draw_mask(alive0, count=0).any()


@pytest.mark.parametrize("cfg", [SMALL, FULL, replace(SMALL, visible=2)],
                         ids=["plain", "learned-graph+nodes", "visible2"])
def test_hidden_slot_values_do_not_reach_the_predictor(cfg):
    """Changing a hidden slot's states on its hidden frames (``visible``..) leaves every output unchanged (queries
    carry only its first-frame state; the learned graph reads the visible history)."""
    torch.manual_seed(0)
    model = predictor(cfg).eval()
    x, alive = window(2, cfg)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[0, 1], mask[1, 3] = True, True
    kw = nodes(2, cfg)
    out = model(x, alive, mask, **kw)
    v = cfg.visible
    y = x.clone()
    y[0, v:cfg.history, 1] += 5.0
    y[1, v:cfg.history, 3] = torch.randn(cfg.history - v, D)
    out2 = model(y, alive, mask, **kw)
    assert torch.equal(out.pred, out2.pred)
    y[0, v:cfg.history, 2] += 5.0  # a visible slot does change the prediction
    assert not torch.allclose(model(y, alive, mask, **kw).pred, out.pred)
    for frame in range(v):  # the first frames of a hidden slot are visible (frame 0 is its identity anchor)
        y = x.clone()
        y[0, frame, 1] += 5.0
        assert not torch.allclose(model(y, alive, mask, **kw).pred, out.pred)


def test_prediction_reads_only_the_history():
    """Strictly causal: frames after the history (the targets) never reach the prediction."""
    torch.manual_seed(0)
    model = predictor(FULL).eval()
    x, alive = window(2, FULL)
    kw = nodes(2, FULL)
    out = model(x, alive, **kw)
    y = x.clone()
    y[:, FULL.history:] = torch.randn_like(y[:, FULL.history:])
    kw2 = dict(kw, proprio=torch.cat([kw["proprio"][:, :FULL.history], torch.randn(2, FULL.future, 3)], 1))
    assert torch.equal(model(y, alive, **kw2).pred, out.pred)


def test_untrained_predictor_is_constant_velocity_with_no_velocity_across_a_birth():
    cfg = replace(SMALL, masked=0)
    model = MaskedSlotPredictor(D, cfg).eval()
    x, alive = window(1, cfg)
    alive[0, :cfg.history - 1, 2] = False  # slot 2 is born on the last history frame: its jump is no motion
    pred = model.denormalise(model(x, alive).pred)
    th = cfg.history
    for k in range(cfg.future):
        cv = x[0, th - 1, 0] + (k + 1) * (x[0, th - 1, 0] - x[0, th - 2, 0])
        assert torch.allclose(pred[0, th + k, 0], cv, atol=1e-5)
        assert torch.allclose(pred[0, th + k, 2], x[0, th - 1, 2], atol=1e-5)


def test_dead_slots_are_not_read_by_other_slots():
    torch.manual_seed(0)
    model = predictor(replace(SMALL, masked=0)).eval()
    x, alive = window(1)
    alive[0, :, 4] = False  # dead throughout
    alive[0, 1, 3] = False  # dead on one history frame
    out = model(x, alive).pred
    y = x.clone()
    y[0, :, 4] = torch.randn(SMALL.window, D)
    y[0, 1, 3] += 5.0
    changed = (model(y, alive).pred - out).abs().amax((0, 1, 3))  # per slot
    assert (changed[:3] == 0).all()  # no token reads a dead one (its own dead token reads itself)
    assert (model(y, alive).pred - out)[0, 2:, 3].abs().max() == 0 and changed[3] > 0


# ---- losses ---------------------------------------------------------------------------------------------
class Perfect(MaskedSlotPredictor):
    """Predicts the true window whatever is hidden."""

    truth: torch.Tensor

    def forward(self, x, alive, mask=None, action=None, proprio=None):
        b = x.shape[0]
        mask = torch.zeros(b, S, dtype=torch.bool) if mask is None else mask
        return CJEPAOutput(self.normalise(self.truth), mask, torch.zeros(b, 5, S, 5, S), None, None)


def test_ctt_losses_vanish_for_a_complete_graph_and_perfect_predictions():
    x, alive = window(4)
    model = Perfect(D, SMALL)
    model.truth = x
    out = model(x, alive, model.draw_mask(alive[:, 0]))
    complete = ~torch.eye(S, dtype=torch.bool).expand(4, S, S)
    losses = ctt_losses(model, out, complete, x, alive)
    assert losses["ctt_inv"] == 0 and losses["ctt_suf"] == 0
    assert prediction_losses(model, out, x, alive)["future"] == 0


def test_ctt_losses_act_when_the_graph_says_no_interaction():
    torch.manual_seed(0)
    model = predictor()
    x, alive = window(8)
    out = model(x, alive, model.draw_mask(alive[:, 0]))
    empty = torch.zeros(8, S, S, dtype=torch.bool)
    losses = ctt_losses(model, out, empty, x, alive)
    assert losses["ctt_inv"] > 0 and losses["ctt_suf"] > 0
    losses["ctt_inv"].backward()
    assert model.inp.weight.grad.abs().sum() > 0  # the intervened pass trains the model


def test_masked_loss_scores_only_hidden_alive_slots_after_frame_zero():
    model = Perfect(D, SMALL)
    x, alive = window(2)
    wrong = x.clone()
    wrong[:, 0] += 1.0  # frame 0 is visible: never scored
    wrong[:, 1:SMALL.history, 4] += 1.0  # slot 4 is not hidden
    model.truth = wrong
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[:, 2] = True
    losses = prediction_losses(model, model(x, alive, mask), x, alive)
    assert losses["masked"] == 0
    alive2 = alive.clone()
    alive2[:, :, 2] = False
    wrong[:, 1:SMALL.history, 2] += 1.0
    assert prediction_losses(model, model(x, alive2, mask), x, alive2)["masked"] == 0  # dead: not scored
    assert prediction_losses(model, model(x, alive, mask), x, alive)["masked"] > 0


def test_attention_graph_is_normalised_over_the_other_alive_slots():
    b, t, th = 1, 6, 3
    alive0 = torch.ones(b, S, dtype=torch.bool)
    alive0[0, 4] = False
    even = torch.full((b, t, S, t, S), 1.0 / (t * S))  # rows sum to 1 over all T*S keys
    g = attention_graph(even, alive0, th, threshold=1.0)
    assert g[0, :4, :4].sum() == 12 and not g[0, 4].any() and not g[0, :, 4].any() and not g.diagonal(0, 1, 2).any()
    focused = torch.zeros(b, t, S, t, S)
    focused[..., 0] = 0.5 / t  # every query: half its attention on slot 0, the rest on itself
    for i in range(S):
        focused[:, :, i, :, i] += 0.5 / t
    g = attention_graph(focused, alive0, th, threshold=1.0)
    assert g[0, 1:4, 0].all() and g[0].sum() == 3  # slot 0 is the parent of 1, 2, 3; nothing else
    # the public fork's graph (mean over key times at the first future query) has rows summing to 1/T: even
    # attention gives 1/(T*S) per pair, far below its 0.15 threshold; ours found every pair above an even split
    assert even[0, th].mean(1).max() < 0.15


# ---- nothing dead, training -------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [SMALL, FULL, replace(SMALL, ctt=CTTConfig(inv_weight=1.0, suf_weight=1.0))],
                         ids=["plain", "learned-graph+nodes+ctt", "attention-ctt"])
def test_every_parameter_gets_a_gradient_in_a_training_step(cfg):
    """The output layer starts at zero (the constant-velocity base), so the first step trains only it; from the
    second step on every parameter learns."""
    torch.manual_seed(0)
    model = MaskedSlotPredictor(D, cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, alive = window(6, cfg)
    kw = nodes(6, cfg)
    for _ in range(2):
        opt.zero_grad()
        out = model(x, alive, model.draw_mask(alive[:, 0]), **kw)
        losses = prediction_losses(model, out, x, alive, kw["proprio"])
        graph = (learned_graph(out) if cfg.graph_gate
                 else attention_graph(out.attention, alive[:, 0], cfg.history, 1.0))
        losses |= ctt_losses(model, out, graph, x, alive, **kw)
        sum(v for k, v in losses.items()).backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


def test_train_cjepa_learns_and_is_reproducible():
    """Every slot of a sequence drifts with the sequence's velocity, so a hidden slot's motion can be read off
    the others. The untrained predictor is constant velocity: exact for visible slots, a hidden one stands
    still. Trained, its future loss (hidden slots included) falls well below that."""
    g = torch.Generator().manual_seed(0)
    start, vel = torch.randn(32, 1, S, D, generator=g), 0.3 * torch.randn(32, 1, 1, D, generator=g)
    slots = start + vel * torch.arange(12.0)[None, :, None, None]
    seqs = SlotSequences(slots, torch.ones(32, 12, S, dtype=torch.bool))
    cfg = replace(SMALL, epochs=6, lr=1e-2, ctt=CTTConfig(inv_weight=0.1, suf_weight=0.1, start_epoch=3))
    a, b = train_cjepa(seqs, cfg, progress=False), train_cjepa(seqs, cfg, progress=False)
    assert a.losses == b.losses

    def future_loss(model: MaskedSlotPredictor) -> float:
        win = torch.from_numpy(slot_windows([12] * 32, cfg.window))
        x, live = gather(slots, win, cfg.window), gather(seqs.alive, win, cfg.window)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return sum(float(prediction_losses(model, model.eval()(x, live, model.draw_mask(live[:, 0], generator=gen)),
                                               x, live)["future"]) for _ in range(4))

    untrained = MaskedSlotPredictor(D, cfg)
    untrained.set_normaliser(slots, seqs.alive)
    assert future_loss(a.model) < 0.75 * future_loss(untrained)
    assert "ctt_inv" in a.history[-1] and "ctt_inv" not in a.history[0]  # start epoch respected
    assert 0.0 < a.graph_density <= 1.0
    pred = a.model.rollout(slots[:2, :3], seqs.alive[:2, :3], steps=5)  # past the future window: autoregressive
    assert pred.shape == (2, 5, S, D)


def test_slot_windows_cover_every_start():
    assert slot_windows([5, 3], 3).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]


def test_train_cjepa_names_short_sequences_and_missing_nodes():
    seqs = SlotSequences(torch.randn(2, 4, S, D), torch.ones(2, 4, S, dtype=torch.bool))
    with pytest.raises(DataError, match="cjepa.history"):
        train_cjepa(seqs, SMALL, progress=False)
    with pytest.raises(DataError, match="cjepa.action_dim"):
        train_cjepa(SlotSequences(torch.randn(2, 6, S, D), torch.ones(2, 6, S, dtype=torch.bool)),
                    replace(SMALL, action_dim=2), progress=False)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="cjepa.ctt.graph"):
        CJEPAConfig(ctt=CTTConfig(graph="learned"))
    with pytest.raises(ConfigError, match="cjepa.history"):
        CJEPAConfig(history=1, masked=1)
    with pytest.raises(ConfigError, match="cjepa.ctt.graph"):
        CTTConfig(graph="batch-mean")


def test_learned_graph_sparsity_default_survives_other_overrides():
    """C-JEPA's learned graph has its own l1 weight (0.001), kept when other causal keys are set."""
    from hclsm.config.loader import config_from_dict

    cfg = config_from_dict(CJEPAConfig, {"graph_gate": True, "causal": {"rho_max": 5.0}}, "cjepa")
    assert cfg.causal.sparsity_lambda == 1e-3 and cfg.causal.rho_max == 5.0
    assert config_from_dict(CJEPAConfig, {"causal": {"sparsity_lambda": 0.01}}).causal.sparsity_lambda == 0.01


# ---- slot files -------------------------------------------------------------------------------------------
def test_slot_file_roundtrip_and_errors(tmp_path):
    seqs = SlotSequences(torch.randn(3, 5, S, D), torch.rand(3, 5, S) > 0.5, action=torch.randn(3, 5, 2))
    save_slot_file(tmp_path / "s.npz", seqs)
    back = load_slot_file(tmp_path / "s.npz")
    assert torch.equal(back.slots, seqs.slots) and torch.equal(back.alive, seqs.alive)
    assert torch.equal(back.action, seqs.action) and back.proprio is None
    with pytest.raises(DataError, match="does not exist"):
        load_slot_file(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_slot_file(tmp_path / "junk.npz")
    np.savez(tmp_path / "flat.npz", slots=np.zeros((3, 5, 6), np.float32))
    with pytest.raises(DataError, match=r"\(N, T, S, D\)"):
        load_slot_file(tmp_path / "flat.npz")
    np.savez(tmp_path / "nan.npz", slots=np.full((1, 2, 3, 4), np.nan, np.float32))
    with pytest.raises(DataError, match="NaN"):
        load_slot_file(tmp_path / "nan.npz")
    np.savez(tmp_path / "alive.npz", slots=np.zeros((1, 2, 3, 4), np.float32), alive=np.ones((1, 2, 4), bool))
    with pytest.raises(DataError, match="'alive'"):
        load_slot_file(tmp_path / "alive.npz")


# ---- counterfactual questions -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    from hclsm.assets import pretrained_decomposer
    from hclsm.config.data import PhysicsDataConfig
    from hclsm.data.physics import PhysicsSource, generate_physics_dataset
    from hclsm.eval.cjepa import encode_episodes

    root = tmp_path_factory.mktemp("cf") / "data"
    generate_physics_dataset(root, PhysicsDataConfig(episodes=24, seed=3), progress=False)
    source = PhysicsSource(root, counterfactual=True)
    seqs, centres = encode_episodes(pretrained_decomposer(), source, list(range(24)), counterfactual=True)
    return source, seqs, centres


def test_questions_are_balanced_so_the_factual_shortcut_scores_half(twins):
    from hclsm.eval.cjepa import build_questions, factual_answers

    source, seqs, centres = twins
    assert seqs.slots.shape[:3] == (24, 32, 7) and seqs.slots.shape[-1] == 66  # slot vector + (x, y)
    qs = build_questions(seqs, centres, source, list(range(24)), history=4, horizon=6)
    where = [q for q in qs.questions if q.kind == "where"]
    collide = [q for q in qs.questions if q.kind == "collide"]
    assert where and sum(q.changed for q in where) * 2 == len(where)
    assert sum(q.changed for q in collide) * 2 == len(collide)
    assert sum(bool(q.truth) for q in collide) * 2 == len(collide)
    f = factual_answers(qs.questions)
    assert f["where_accuracy"] == 0.5
    assert qs.history.slots.shape[1] == 4 and qs.future.slots.shape[1] == 6


def test_answers_from_the_true_positions_are_right(twins):
    """Read positions equal to the simulator's answer every "where" question right."""
    from hclsm.eval.cjepa import answer, build_questions

    source, seqs, centres = twins
    qs = build_questions(seqs, centres, source, list(range(24)), history=4, horizon=6)
    read = np.zeros((len(qs.kinds), 6, 7, 2), np.float32)
    for q in qs.questions:
        if q.kind == "where":
            read[q.twin, q.step - 1, q.slots[0]] = q.truth
    m = answer([q for q in qs.questions if q.kind == "where"], read)
    assert m["where_accuracy"] == 1.0 and m["where_error_px"] == 0.0
    far = read + 100.0
    assert answer([q for q in qs.questions if q.kind == "where"], far)["where_accuracy"] == 0.0


def test_graph_scores_against_the_simulators_graph(twins):
    """The question set carries the simulator's graph in slot terms; the truth scores F1 1, the complete
    graph scores precision = the true density, and the empty graph recall 0."""
    from hclsm.eval.cjepa import build_questions, graph_scores

    source, seqs, centres = twins
    qs = build_questions(seqs, centres, source, list(range(24)), history=4, horizon=6)
    pairs = [q for q in qs.questions if q.kind == "collide"]
    assert pairs
    for q in pairs:  # (k, j) shown by slots (sk, sj)
        (k, j), (sk, sj) = q.objects, q.slots
        graph = source.load_episode(qs.episodes[q.twin], counterfactual=True)["graph"]  # [k, j]: k acts on j
        assert qs.known[q.twin, sj, sk] and qs.known[q.twin, sk, sj]
        assert qs.parents[q.twin, sj, sk] == bool(graph[k, j]) and qs.parents[q.twin, sk, sj] == bool(graph[j, k])
        assert qs.contacts[q.twin, sj, sk] == qs.contacts[q.twin, sk, sj] == q.truth  # touch in the horizon
    truth = graph_scores(qs.parents, qs)
    assert truth["graph_f1"] == truth["graph_precision"] == truth["graph_recall"] == 1.0
    assert 0.0 < truth["graph_true_density"] < 1.0
    full = graph_scores(torch.ones_like(qs.parents), qs)
    assert full["graph_recall"] == full["graph_density_matched"] == full["graph_contact_recall"] == 1.0
    assert full["graph_precision"] == pytest.approx(truth["graph_true_density"])
    empty = graph_scores(torch.zeros_like(qs.parents), qs)
    assert empty["graph_recall"] == empty["graph_contact_recall"] == 0.0 and np.isnan(empty["graph_precision"])


# ---- command line ---------------------------------------------------------------------------------------------
def test_cli_slots_then_train(capsys, tmp_path):
    from helpers import assert_user_error, run

    code, _, err = run(capsys, "data", "physics", "--out", tmp_path / "phys", "--episodes", "3", "--quiet")
    assert code == 0, err
    code, out, err = run(capsys, "cjepa", "slots", "--data", tmp_path / "phys", "--out", tmp_path / "s.npz", "--quiet")
    assert code == 0, err
    assert load_slot_file(tmp_path / "s.npz").slots.shape == (3, 32, 7, 66)
    code, out, err = run(capsys, "cjepa", "train", "--slots", tmp_path / "s.npz", "--out", tmp_path / "run", "--quiet",
                         "--set", "cjepa.epochs=1", "--cjepa.d_model=16", "--set", "cjepa.heads=2",
                         "--set", "cjepa.position_dims=2")
    assert code == 0, err
    assert "graph density" in out
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"model.safetensors", "config.yaml", "losses.json"}
    code, _, err = run(capsys, "cjepa", "train", "--slots", tmp_path / "s.npz", "--out", tmp_path / "run", "--quiet")
    assert_user_error(code, err, "already exists", "--overwrite")
    code, _, err = run(capsys, "cjepa", "train", "--slots", tmp_path / "nope.npz", "--out", tmp_path / "r2")
    assert_user_error(code, err, "nope.npz", "does not exist")
    code, _, err = run(capsys, "cjepa", "train", "--slots", tmp_path / "s.npz", "--out", tmp_path / "r2",
                       "--set", "cjepa.masekd=2")
    assert_user_error(code, err, "cjepa.masekd", "masked")
    assert not (tmp_path / "r2").exists()
