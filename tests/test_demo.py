"""``hclsm demo``: data -> HCLSM stages 1 and 2 -> held-out evaluation -> report, at smoke size (seconds).

The full-size demo is never run here; these runs use 3 short PushT episodes, a
small model and a few training steps, and check the report's structure, not its quality.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from faults import console_script
from hclsm import demo, keys
from hclsm.demo import evaluate as demo_eval
from hclsm.config import load_config

from helpers import SMALL, assert_user_error, run
from test_causal import CAUSAL

TINY_RUN = ["--steps", "3", "3", "--quiet", "--from-scratch", "--set", "data.pusht.episodes=3", "--set", "data.pusht.max_steps=20",
            "--set", "train.steps=3", "--set", "train.warmup_steps=0", "--set", "train.batch_size=2",
            *[f"--{o}" for o in SMALL]]
PICTURES = {"pusht_frames_and_masks.png", "slots_clip1.png", "slots_clip2.png", "segmentation.png",
            "alpha_heatmaps.png", "alive_count.png", "rollout.png", "slots_pca.png", "event_timeline.png"}
OBJECT_METRICS = ("agent_iou", "block_iou", "agent_block_miou", "alpha_peakedness", "fg_ari", "miou", "sbd",
                  "diversity", "alive_slots", "true_objects", "count_frame_acc")
# dynamics metrics that are defined whatever the model does (the latent errors are None when no slot is alive)
DYNAMICS_METRICS = ("jepa", "obj", "frame_mse", "frame_mse_copy_last", "events_per_clip", "events_per_16_frames",
                    "true_events_per_16_frames", "event_precision", "event_recall", "event_f1", "event_prob")


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- the whole demo, at smoke size ----------------------------------------------------------------

def test_demo_trains_evaluates_and_writes_the_report(capsys, tmp_path):
    code, stdout, err = run(capsys, "demo", "--out", tmp_path, "--name", "d", *TINY_RUN)
    assert code == 0, err
    run_dir = tmp_path / "d"
    report = run_dir / "report.md"
    assert f"report: {report}" in stdout and "HCLSM stage 1 (from scratch): 3 steps" in stdout and "HCLSM stage 2: 3 steps" in stdout
    assert "not built yet" not in stdout + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary directories left

    text = report.read_text()
    for phrase in ("Stages run: **data**", "HCLSM stage 1, the objects", "HCLSM stage 2, the\ndynamics",
                   "Not in this demo: the causal graph", "3 episodes",
                   "agent IoU", "block IoU", "alpha peakedness", "FG-ARI", "SBD reconstruction", "slot diversity",
                   "< 0.01", "< 0.15", "alive object slots per frame", "visible objects per frame", "untrained",
                   "3 steps", "`train/stage1/`", "`train/stage2/`", "## Dynamics on held-out episodes",
                   "stage-2 prediction loss (JEPA", "0.008–0.01: ", "events per 16-frame clip", "2–3: ",
                   "copy-last frame MSE", "copy-last latent MSE", "event F1 (±1 step)", "contact onsets",
                   "the first 6 frames are\ncontext, the next 10 are predicted",
                   "## Planning in the real PushT simulator", "Skipped: no held-out episode has more than 25 frames"):
        assert phrase in text, phrase
    assert "stage 2 (hierarchical dynamics" not in text  # the old "not yet" sentence is gone
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert set(images) == PICTURES
    for rel in images:
        assert (run_dir / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel

    m = json.loads((run_dir / "metrics.json").read_text())
    for which in ("trained", "untrained"):
        for key in OBJECT_METRICS:
            assert key in m[which] and (m[which][key] is None or math.isfinite(m[which][key])), (which, key)
        for key in DYNAMICS_METRICS:
            assert math.isfinite(m[which][key]), (which, key)
        for key in ("frame_mse", "frame_mse_copy_last", "latent_mse", "latent_mse_copy_last"):
            assert len(m[which][f"{key}_per_step"]) == 10, (which, key)  # 16-frame clips: context 6, horizon 10
    t = m["trained"]
    assert 0 <= t["agent_iou"] <= 1 and t["true_objects"] > 0 and t["jepa"] >= 0 and t["frame_mse_copy_last"] >= 0
    assert 0 <= t["event_f1"] <= 1 and t["events_per_16_frames"] == t["events_per_clip"]  # 16-frame clips: no scaling
    assert m["dynamics"] == {"clips": 1, "of_clips": 1, "clip_length": 16, "context": 6, "horizon": 10}
    assert "skipped" in m["planning"] and m["seconds"]["planning"] >= 0  # 20-frame episodes: no 25-step goal
    assert m["indicators"]["jepa"] == [0.008, 0.01] and m["indicators"]["events_per_16_frames"] == [2, 3]
    assert m["train"]["steps"] == m["train"]["stage2"]["steps"] == 3 and m["train"]["planned_steps"] == [3, 3]
    assert (m["train"]["clip_length"], m["train"]["stage2"]["clip_length"]) == (4, 8)
    assert {"sbd", "diversity"} <= set(m["train"]["final_losses"])
    assert {"sbd", "jepa", "obj", "event"} <= set(m["train"]["stage2"]["final_losses"])
    shown = m["figures"]
    assert len(shown["count"]) == shown["count_frames"] == len(shown["true_count"]) == 20
    assert all(0 <= s < 20 for s in shown["events_fired"] + shown["contact_onsets"])
    held_out = m["val_episodes"]
    assert held_out and all(c["episode"] in held_out for c in [*shown["clips"], shown["rollout"]])
    assert shown["count_episode"] in held_out and shown["rollout"]["frames_drawn"] and shown["rollout"]["pca_drawn"]

    # the two training runs live inside the demo, with their checkpoints, and name their final location
    for stage in (1, 2):
        stage_dir = run_dir / "train" / f"stage{stage}"
        summary = json.loads((stage_dir / "summary.json").read_text())
        assert summary["run_dir"] == str(stage_dir)
        assert Path(summary["checkpoint"]).is_dir() and Path(summary["checkpoint"]).parent == stage_dir / "checkpoints"
        assert (stage_dir / "log.jsonl").is_file()
        stage_cfg = load_config(yaml_path=stage_dir / "config.yaml")
        assert (stage_cfg.train.stage, stage_cfg.data.clip.length) == ((1, 4) if stage == 1 else (2, 8))
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    assert (cfg.train.stage, cfg.train.max_minutes) == (1, 0.0)
    assert (cfg.data.pusht.episodes, cfg.data.pusht.max_steps, cfg.data.clip.length) == (3, 20, 8)
    assert (run_dir / "data/pusht/meta/info.json").is_file()


def test_a_failing_demo_leaves_the_earlier_run_and_nothing_else(capsys, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    (root / "d").mkdir(parents=True)
    (root / "d" / "report.md").write_text("an earlier run")

    def broken_train(*args, **kwargs):
        raise RuntimeError("training blew up")

    monkeypatch.setattr(demo, "train_two_stages", broken_train)
    with pytest.raises(RuntimeError, match="blew up"):
        demo.run_demo(load_config("tiny", overrides=["data.pusht.episodes=2", "data.pusht.max_steps=10", *SMALL]),
                      name="d", out_root=root, progress=False, steps=(1, 1), from_scratch=True)
    assert (root / "d" / "report.md").read_text() == "an earlier run"
    assert sorted(p.name for p in root.iterdir()) == ["d"]


# ---- bad input: one line, exit 2, nothing written -------------------------------------------------

def test_demo_bad_config_writes_nothing(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--out", tmp_path / "runs", "--name", "d", "--quiet",
                       "--set", "data.pusht.episodes=0")
    assert_user_error(code, err, "data.pusht.episodes")
    assert list(tmp_path.iterdir()) == []


def test_demo_name_dot_does_not_replace_runs_root(capsys, tmp_path):
    root = tmp_path / "runs"
    (root / "keep").mkdir(parents=True)
    (root / "keep" / "report.md").write_text("an earlier run")
    code, _, err = run(capsys, "demo", "--out", root, "--name", ".", "--quiet",
                       "--set", "data.pusht.episodes=1", "--set", "data.pusht.max_steps=3")
    assert (root / "keep" / "report.md").is_file()
    assert_user_error(code, err, "--name")


@pytest.mark.parametrize("argv, needle", [
    (["--name", "a/b"], "--name"),
    (["--steps", "0", "5"], "--steps"),
    (["--steps", "5", "-2"], "--steps"),
    (["--set", "data.pusht.episodes=1"], "data.pusht.episodes"),
    (["--set", "train.val_fraction=0"], "train.val_fraction"),
    (["--set", "data.clip.length=1"], "data.clip.length"),
    (["--set", "model.name=flat_ssm"], "model.name"),
], ids=["name-path", "steps-0", "steps-negative", "one-episode", "no-held-out", "one-frame-clips", "not-hclsm"])
def test_demo_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, argv, needle):
    code, stdout, err = run(capsys, "demo", "--out", tmp_path / "runs", "--quiet", *argv)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "runs").exists() or leftovers(tmp_path / "runs") == []
    assert list(tmp_path.rglob("report.md")) == []


def test_console_script_demo_bad_name(tmp_path):
    r = subprocess.run([console_script(), "demo", "--name", "..", "--out", "runs", "--quiet"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --name '..'"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_demo_help_lists_steps(capsys):
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    for word in ("--steps", "--name", "--out", "--quiet", "--set"):
        assert word in out


def test_demo_steps_default_config_and_flag():
    cfg = load_config("tiny", overrides=["train.stage=2"])
    assert demo.demo_steps() == demo.DEFAULT_STEPS and demo.demo_steps((7, 2)) == (7, 2)
    d = demo.demo_config(cfg)
    assert (d.train.stage, d.train.max_minutes, d.data.clip.length) == (1, 0.0, 8)
    assert cfg.train.stage == 2  # the caller's config is not changed
    assert [demo_eval.rollout_split(n) for n in (16, 8, 3, 2)] == [(6, 10), (4, 4), (1, 2), (1, 1)]


class _FakeSource:
    """Two 16-frame episodes of random frames with a square object (id 1) and a bar (id 2), random actions,
    and contact during frames 2-4 and 10-12 (onsets at frames 2 and 10)."""

    name = "fake"
    episode_lengths = [16, 16]

    def load_clip(self, episode: int, frames) -> dict:
        g = torch.Generator().manual_seed(episode)
        frames = torch.as_tensor(frames)
        n = len(frames)
        mask = torch.zeros(n, 32, 32, dtype=torch.int64)
        mask[:, 4:12, 4:12], mask[:, 20:24, :] = 1, 2
        contact = ((frames >= 2) & (frames <= 4)) | ((frames >= 10) & (frames <= 12))
        return {"video": torch.rand(n, 3, 32, 32, generator=g), "mask": mask, "action": torch.rand(n, 2, generator=g),
                "contact": contact}


def test_heldout_metrics_run_the_network_once_per_batch_and_match_the_metric_functions(monkeypatch):
    from hclsm.eval.objects import pusht_metrics
    from hclsm.eval.objects import evaluate_objects
    from hclsm.models import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[*SMALL, "data.clip.length=4"])
    clips = demo_eval.heldout_clips(_FakeSource(), cfg, [0, 1])
    assert len(clips) == 8  # non-overlapping 4-frame windows
    model = build_model(cfg.model)
    expected = evaluate_objects(model, clips.batches(demo_eval.EVAL_BATCH)) | pusht_metrics(model, clips)
    calls = []
    forward = type(model.objects).forward
    monkeypatch.setattr(type(model.objects), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    got = demo_eval.heldout_metrics(model, clips)
    assert len(calls) == math.ceil(len(clips) / demo_eval.EVAL_BATCH)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, nan_ok=True), k
    assert got["true_objects"] == 2.0 and got["alive_slots"] >= 0 and got["sbd"] > 0


def test_dynamics_metrics_are_the_models_own_losses_and_scale_events_to_16_frames():
    from hclsm.models import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=SMALL)
    source = _FakeSource()
    assert demo_eval.dynamics_clips(source, cfg, [0, 1]).clip.length == 16
    clips = demo_eval.heldout_clips(source, cfg, [0, 1], length=8)  # windows at frames 0 and 8 of each episode
    batches = demo_eval.spread_batches(clips, 3)
    assert [b[keys.FRAMES][:, 0].tolist() for b in batches] == [[0, 0, 8]]  # windows 0, 2, 3: both episodes
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        torch.manual_seed(1)
        expected = model(batches[0], progress=1.0, stage=2).losses
    torch.manual_seed(1)
    m = demo_eval.dynamics_metrics(model, batches)
    assert m["jepa"] == pytest.approx(float(expected["jepa"])) and m["obj"] == pytest.approx(float(expected["obj"]))
    assert m["true_events_per_clip"] == pytest.approx(1.0)  # one contact onset in every 8-frame window
    assert m["true_events_per_16_frames"] == pytest.approx(2.0)
    assert m["events_per_16_frames"] == pytest.approx(2 * m["events_per_clip"])
    assert 0 <= m["event_f1"] <= 1 and 0 < m["event_prob"] < 1
    for key in ("frame_mse", "frame_mse_copy_last", "latent_mse", "latent_mse_copy_last"):
        assert len(m[f"{key}_per_step"]) == 4, key  # 8-frame clips: context 4, horizon 4
    assert math.isfinite(m["frame_mse"]) and m["frame_mse_copy_last"] > 0  # random frames: copying is wrong


def test_demo_with_the_causal_graph_draws_it_in_the_report(capsys, tmp_path):
    code, _, err = run(capsys, "demo", "--out", tmp_path, "--name", "g", *TINY_RUN,
                       *[f"--{o}" for o in CAUSAL])
    assert code == 0, err
    text = (tmp_path / "g" / "report.md").read_text()
    assert "The causal graph was on" in text and "Not in this demo: the causal graph" not in text
    assert set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)) == PICTURES | {"causal_graph.png"}
    assert (tmp_path / "g" / "causal_graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    graph = json.loads((tmp_path / "g" / "metrics.json").read_text())["figures"]["graph"]
    assert all(i != j for i, j in graph["edges"]) and graph["alive_slots"] >= 0


def test_the_report_says_plainly_whether_the_objects_were_found():
    from hclsm.config import PUSHT_RECIPE, load_config
    from hclsm.demo.report import _objects_verdict

    plain, cued = load_config("tiny"), load_config("tiny", overrides=list(PUSHT_RECIPE))
    assert "**The objects were not found**" in _objects_verdict(plain, {"agent_iou": 0.0, "block_iou": 0.03})
    assert "found the block only" in _objects_verdict(plain, {"agent_iou": 0.1, "block_iou": 0.7})
    both = _objects_verdict(plain, {"agent_iou": 0.6, "block_iou": 0.65})
    assert "found both objects" in both and "proprioceptive" not in both
    assert "given to the model, not discovered" in _objects_verdict(cued, {"agent_iou": 0.6, "block_iou": 0.65})


def readme_python_quick_start(run_dir: Path) -> None:
    """The README's Python quick start, run as written on ``run_dir`` (for ``runs/demo``): it loads the demo's
    model, encodes a held-out clip and decodes a 10-step rollout under the clip's actions."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = readme.split("## Python quick start", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'hclsm.Run("runs/demo")' in code
    scope: dict = {}
    exec(compile(code.replace('"runs/demo"', repr(str(run_dir))), "README.md", "exec"), scope)
    model, objects, roll = scope["model"], scope["objects"], scope["roll"]
    assert objects.slots.shape[:2] == (1, 16) and objects.alive.shape == objects.slots.shape[:3]
    assert objects.object_alive[0, 0].any()  # the shipped layers find objects on the first frame
    r = model.cfg.decoder.resolution
    assert roll.frames.shape == (1, 10, 3, r, r) and torch.isfinite(roll.frames).all()
    assert scope["action"].shape == (1, 16, 2) and scope["cue"].shape == (1, 16, 2)


def test_the_demo_starts_from_the_shipped_pusht_object_layers(capsys, tmp_path):
    """By default stage 1 continues the object layers shipped in the package (the PushT recipe's bench run) and the
    report says so; a model they do not fit is refused in one line naming --from-scratch, before anything is
    written."""
    from hclsm.assets import pretrained_decomposer
    from hclsm.config import PUSHT_RECIPE

    cfg = demo.demo_config(load_config("tiny", overrides=list(PUSHT_RECIPE)))
    start = demo._shipped_start(cfg).objects.state_dict()
    shipped = pretrained_decomposer(demo.SHIPPED).state_dict()
    assert start.keys() == shipped.keys() and all(torch.equal(start[k], v) for k, v in shipped.items())
    code, stdout, err = run(capsys, "demo", "--out", tmp_path, "--name", "s", "--steps", "2", "2", "--quiet",
                            "--set", "data.pusht.episodes=3", "--set", "data.pusht.max_steps=20",
                            "--set", "train.batch_size=2", "--set", "train.warmup_steps=0")
    assert code == 0, err
    assert f"HCLSM stage 1 (continuing the shipped {demo.SHIPPED}): 2 steps" in stdout
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["start"] == {"from": demo.SHIPPED, "steps": demo.SHIPPED_STEPS, "command": demo.SHIPPED_COMMAND}
    assert metrics["train"]["steps"] == 2 and metrics["train"]["stage2"]["steps"] == 2
    assert "continuing the shipped PushT object model" in (tmp_path / "s" / "report.md").read_text()
    code, stdout, err = run(capsys, "eval", tmp_path / "s", "--context", "2", "--horizon", "2", "--quiet")
    assert code == 0, err  # a demo run evaluates like any run: its model in train/stage2, its data in data/pusht
    assert "step 2:" in stdout and (tmp_path / "s" / "eval" / "metrics.json").is_file()
    readme_python_quick_start(tmp_path / "s")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "runs", "--quiet", "--steps", "1", "1",
                       *[f"--{o}" for o in SMALL])
    assert_user_error(code, err, "--from-scratch", "model.perception.")
    assert not (tmp_path / "runs").exists()
