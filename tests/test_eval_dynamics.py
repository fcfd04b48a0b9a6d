"""Evaluation of the dynamics: the pictures, event F1 against hand-made gates, rollout metrics on a tiny
random HCLSM (the copy-last baseline is exactly 0 on a static video), and ``hclsm eval`` on a tiny trained
run (pictures, metrics.json, one-line errors)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hclsm import keys
from hclsm.config import load_config
from hclsm.config.data import ClipConfig
from hclsm.data.memory import MemoryClips, open_dataset
from hclsm.eval.dynamics import event_metrics, rollout_metrics, score_events, true_events
from hclsm.models import build_model
from hclsm.train import train
from hclsm.viz.dynamics import FIRED_RGB, event_timeline, rollout_figure, slot_pca_figure

from helpers import SMALL, assert_user_error, run

DYNAMICS = [*SMALL, "model.dynamics.l1.d_model=16", "model.dynamics.l2.d_model=16", "model.gnn.d_edge=8"]


def small_cfg(*extra: str):
    return load_config("tiny", overrides=[*DYNAMICS, *extra])


# ---- pictures ---------------------------------------------------------------------------------------

def test_pictures_are_uint8_rgb_of_the_expected_size():
    g = torch.Generator().manual_seed(0)
    truth, pred, context = torch.rand(5, 3, 16, 16, generator=g), torch.rand(5, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16)
    plain, with_context = rollout_figure(truth, pred), rollout_figure(truth, pred, context)
    for img in (plain, with_context):
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    # 3 rows of 16 px tiles scaled to >= 40 px, a header; context adds 3 columns of (tile + gap) * scale
    assert plain.shape[0] == with_context.shape[0] > 3 * 40
    assert with_context.shape[1] - plain.shape[1] == 3 * (16 + 2) * 3
    with pytest.raises(ValueError, match="same shape"):
        rollout_figure(truth, pred[:4])

    prob = torch.linspace(0, 1, 12)
    chart = event_timeline(prob, (prob > 0.7).float(), 0.7, torch.arange(12) % 5 == 0)
    assert chart.shape == (200, 480, 3) and chart.dtype == np.uint8
    assert (chart.reshape(-1, 3) == FIRED_RGB).all(1).any()  # the fired steps are marked
    with pytest.raises(ValueError, match="truth_events"):
        event_timeline(prob, prob > 0.7, 0.7, torch.zeros(11, dtype=torch.bool))

    slots, alive = torch.randn(8, 5, 16, generator=g), torch.ones(8, 5, dtype=torch.bool)
    alive[:3, 2] = False
    fig = slot_pca_figure(slots, alive, slots[-4:] + 0.1)
    assert fig.shape == (400, 480, 3) and fig.dtype == np.uint8
    with pytest.raises(ValueError, match="predicted"):
        slot_pca_figure(slots, alive, slots)  # a prediction as long as the clip continues from nowhere


# ---- events -----------------------------------------------------------------------------------------

def test_event_scores_of_hand_made_gates_with_one_step_tolerance():
    true = torch.zeros(2, 10, dtype=torch.bool)
    true[0, [2, 7]] = True
    true[1, 5] = True
    fired = torch.zeros(2, 10, dtype=torch.bool)
    fired[0, 3] = True  # one step late: a hit
    fired[0, 9] = True  # two steps late: a false alarm (and 7 is missed)
    fired[1, 5] = True  # exact
    m = score_events(fired, 0.25 + 0.5 * fired.float(), true)
    assert m["clips"] == 2 and m["events_per_clip"] == 1.5 and m["true_events_per_clip"] == 1.5
    assert m["event_precision"] == pytest.approx(2 / 3) and m["event_recall"] == pytest.approx(2 / 3)
    assert m["event_f1"] == pytest.approx(2 / 3) and m["event_prob"] == pytest.approx(0.25 + 0.5 * 3 / 20)
    assert score_events(fired, fired.float(), torch.zeros_like(true))["event_f1"] == 0.0  # false alarms only
    assert "event_f1" not in score_events(fired, fired.float(), None)  # no truth: no F1
    # PushT has contact states instead: their onsets are the events
    contact = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]], dtype=torch.bool)
    assert true_events({keys.CONTACT: contact})[0].nonzero()[:, 0].tolist() == [1, 4]
    assert torch.equal(true_events({keys.EVENTS: true, keys.CONTACT: contact[:, :2]}), true)


# ---- rollouts ---------------------------------------------------------------------------------------

def test_rollout_and_event_metrics_of_a_tiny_model_and_copy_last_is_zero_on_a_static_video(data):
    torch.manual_seed(0)
    model = build_model(small_cfg().model)
    clips = MemoryClips(open_dataset(data), ClipConfig(length=5, stride=8), image_size=32, progress=False)
    m = rollout_metrics(model, clips.batches(4), context=2, horizon=3)
    assert model.training  # evaluation puts the mode back
    assert m["clips"] == len(clips) == 4 and (m["context"], m["horizon"]) == (2, 3)
    for name in ("frame_mse", "frame_mse_copy_last", "latent_mse", "latent_mse_copy_last"):
        assert np.isfinite(m[name]) and m[name] >= 0, name
        assert len(m[f"{name}_per_step"]) == 3 and np.isfinite(m[f"{name}_per_step"]).all(), name
    e = event_metrics(model, clips.batches(4))
    assert e["clips"] == 4 and 0 <= e["event_f1"] <= 1 and 0 <= e["events_per_clip"] <= 5
    static = {keys.VIDEO: clips[0][keys.VIDEO][:1].expand(5, -1, -1, -1)[None]}
    s = rollout_metrics(model, [static], context=2, horizon=3)
    assert s["frame_mse_copy_last"] == 0.0 and s["frame_mse_copy_last_per_step"] == [0.0] * 3
    assert s["frame_mse"] > 0


# ---- hclsm eval -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data) -> Path:
    """A tiny HCLSM run trained for one stage-2 step (its checkpoint written at the end)."""
    run_dir = tmp_path_factory.mktemp("eval-run") / "run"
    cfg = small_cfg("train.steps=1", "train.warmup_steps=0", "train.batch_size=2", "train.stage=2", "train.device=cpu",
                    "train.eval_every=0", "train.ckpt_every=0", "train.val_fraction=0.25", "data.clip.length=3")
    train(cfg, data, run_dir=run_dir, progress=False)
    return run_dir


def test_cli_eval_writes_pictures_and_metrics(capsys, trained_run, data, tmp_path):
    out = tmp_path / "eval"
    code, stdout, err = run(capsys, "eval", trained_run, "--data", data, "--context", "3", "--horizon", "4",
                            "--clips", "2", "--out", out, "--quiet")
    assert code == 0, err
    assert "copy-last" in stdout and "frame MSE" in stdout and "latent MSE" in stdout and str(out) in stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["held_out"] and len(m["episodes"]) == 1 and m["step"] == 1 and m["stage"] == 2
    assert m["rollout"]["clips"] == 1 and len(m["rollout"]["frame_mse_per_step"]) == 4  # one 7-frame window of 8
    assert {"events_per_clip", "event_f1"} <= set(m["events"])
    assert m["pictures"] == ["clip1_events.png", "clip1_rollout.png", "clip1_slots_pca.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*m["pictures"], "metrics.json"])
    # again into the same directory: the earlier eval is replaced
    assert run(capsys, "eval", trained_run, "--data", data, "--context", "2", "--horizon", "2", "--clips", "0",
               "--out", out, "--quiet")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]


def test_cli_eval_errors_are_one_line(capsys, trained_run, data, tmp_path):
    code, stdout, err = run(capsys, "eval", tmp_path / "nope", "--data", data)
    assert_user_error(code, err, "nope", "does not exist", "hclsm train")
    assert stdout == ""
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    assert_user_error(*run(capsys, "eval", tmp_path / "empty_run", "--data", data)[::2], "no checkpoint")
    assert_user_error(*run(capsys, "eval", trained_run, "--data", tmp_path / "nodata")[::2], "nodata",
                      "hclsm data physics")
    # the default context 6 + horizon 10 needs 16 frames; the episodes have 8
    assert_user_error(*run(capsys, "eval", trained_run, "--data", data)[::2], "16 frames", "has 8",
                      "lower --context or --horizon")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    assert_user_error(*run(capsys, "eval", trained_run, "--data", data, "--context", "2", "--horizon", "2",
                           "--out", tmp_path / "other")[::2], "choose another --out")
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    assert not (trained_run / "eval").exists()
