"""``hclsm demo``: data -> HCLSM stage 1 -> held-out evaluation -> report, at smoke size (a few seconds).

The full-size demo (6 training minutes) is never run here; these runs use 3 short PushT episodes, a
small model and a few training steps, and check the report's structure, not its quality.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hclsm import demo
from hclsm.config import load_config

from helpers import SMALL, assert_user_error, run

TINY_RUN = ["--minutes", "1", "--quiet", "--set", "data.pusht.episodes=3", "--set", "data.pusht.max_steps=20",
            "--set", "train.steps=3", "--set", "train.warmup_steps=0", "--set", "train.batch_size=2",
            *[f"--{o}" for o in SMALL]]
PICTURES = {"pusht_frames_and_masks.png", "slots_clip1.png", "slots_clip2.png", "segmentation.png",
            "alpha_heatmaps.png", "alive_count.png"}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _console_script() -> Path:
    for candidate in (Path(sys.executable).parent / "hclsm", Path(__file__).resolve().parents[1] / ".venv/bin/hclsm"):
        if candidate.is_file():
            return candidate
    found = shutil.which("hclsm")
    if found is None:
        pytest.skip("the hclsm console script is not installed")
    return Path(found)


# ---- the whole demo, at smoke size ----------------------------------------------------------------

def test_demo_trains_evaluates_and_writes_the_report(capsys, tmp_path):
    code, stdout, err = run(capsys, "demo", "--out", tmp_path, "--name", "d", *TINY_RUN)
    assert code == 0, err
    run_dir = tmp_path / "d"
    report = run_dir / "report.md"
    assert f"report: {report}" in stdout and "HCLSM stage 1: 3 steps" in stdout
    assert "not built yet" not in stdout + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary directories left

    text = report.read_text()
    for phrase in ("Stages run: **data**", "HCLSM stage 1", "Not yet in this version", "3 episodes",
                   "agent IoU", "block IoU", "alpha peakedness", "FG-ARI", "SBD reconstruction", "slot diversity",
                   "< 0.01", "< 0.15", "alive object slots per frame", "visible objects per frame", "untrained",
                   "3 steps"):
        assert phrase in text, phrase
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert set(images) == PICTURES
    for rel in images:
        assert (run_dir / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel

    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("agent_iou", "block_iou", "agent_block_miou", "alpha_peakedness", "fg_ari", "miou", "sbd",
                "diversity", "alive_slots", "true_objects", "count_frame_acc"):
        for which in ("trained", "untrained"):
            assert key in m[which] and (m[which][key] is None or math.isfinite(m[which][key])), (which, key)
    assert 0 <= m["trained"]["agent_iou"] <= 1 and m["trained"]["true_objects"] > 0
    assert m["train"]["steps"] == 3 and m["train"]["minutes_budget"] == 1.0
    assert {"sbd", "diversity"} <= set(m["train"]["final_losses"])
    assert len(m["figures"]["count"]) == m["figures"]["count_frames"] == len(m["figures"]["true_count"])
    held_out = m["val_episodes"]
    assert held_out and all(c["episode"] in held_out for c in m["figures"]["clips"])

    # the training run lives inside the demo, with its checkpoint, and names its final location
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["run_dir"] == str(run_dir / "train")
    assert Path(summary["checkpoint"]).is_dir() and Path(summary["checkpoint"]).parent == run_dir / "train/checkpoints"
    assert (run_dir / "train" / "log.jsonl").is_file()
    cfg = load_config(yaml_path=run_dir / "config.yaml")
    assert (cfg.train.stage, cfg.train.stage1_fraction, cfg.train.max_minutes) == (1, 1.0, 1.0)
    assert (cfg.data.pusht.episodes, cfg.data.pusht.max_steps) == (3, 20)
    assert (run_dir / "data/pusht/meta/info.json").is_file()


def test_a_failing_demo_leaves_the_earlier_run_and_nothing_else(capsys, tmp_path, monkeypatch):
    root = tmp_path / "runs"
    (root / "d").mkdir(parents=True)
    (root / "d" / "report.md").write_text("an earlier run")

    def broken_train(*args, **kwargs):
        raise RuntimeError("training blew up")

    monkeypatch.setattr(demo, "train", broken_train)
    with pytest.raises(RuntimeError, match="blew up"):
        demo.run_demo(load_config("tiny", overrides=["data.pusht.episodes=2", "data.pusht.max_steps=10", *SMALL]),
                      name="d", out_root=root, progress=False, minutes=0.01)
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
    (["--minutes", "0"], "--minutes"),
    (["--minutes", "-2"], "--minutes"),
    (["--minutes", "nan"], "--minutes"),
    (["--set", "data.pusht.episodes=1"], "data.pusht.episodes"),
    (["--set", "train.val_fraction=0"], "train.val_fraction"),
], ids=["name-path", "minutes-0", "minutes-negative", "minutes-nan", "one-episode", "no-held-out"])
def test_demo_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path, argv, needle):
    code, stdout, err = run(capsys, "demo", "--out", tmp_path / "runs", "--quiet", *argv)
    assert_user_error(code, err, needle)
    assert not (tmp_path / "runs").exists() or leftovers(tmp_path / "runs") == []
    assert list(tmp_path.rglob("report.md")) == []


def test_console_script_demo_bad_name(tmp_path):
    r = subprocess.run([_console_script(), "demo", "--name", "..", "--out", "runs", "--quiet"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --name '..'"), r.stderr
    assert list(tmp_path.iterdir()) == []


def test_demo_help_lists_minutes(capsys):
    code, out, _ = run(capsys, "demo", "--help")
    assert code == 0
    for word in ("--minutes", "--name", "--out", "--quiet", "--set"):
        assert word in out


def test_demo_minutes_default_config_and_flag():
    cfg = load_config("tiny")
    assert demo.demo_minutes(cfg) == demo.DEFAULT_MINUTES
    assert demo.demo_minutes(load_config("tiny", overrides=["train.max_minutes=2.5"])) == 2.5
    assert demo.demo_minutes(cfg, 0.5) == 0.5
    d = demo.demo_config(cfg, 0.5)
    assert (d.train.stage, d.train.stage1_fraction, d.train.max_minutes) == (1, 1.0, 0.5)
    assert cfg.train.max_minutes == 0.0  # the caller's config is not changed


class _FakeSource:
    """Two 16-frame episodes of random frames with a square object (id 1) and a bar (id 2)."""

    name = "fake"
    episode_lengths = [16, 16]

    def load_clip(self, episode: int, frames) -> dict:
        g = torch.Generator().manual_seed(episode)
        n = len(frames)
        mask = torch.zeros(n, 32, 32, dtype=torch.int64)
        mask[:, 4:12, 4:12], mask[:, 20:24, :] = 1, 2
        return {"video": torch.rand(n, 3, 32, 32, generator=g), "mask": mask}


def test_heldout_metrics_run_the_network_once_per_batch_and_match_the_metric_functions(monkeypatch):
    from hclsm.bench.objects import pusht_metrics
    from hclsm.eval.objects import evaluate_objects
    from hclsm.models import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[*SMALL, "data.clip.length=4"])
    clips = demo.heldout_clips(_FakeSource(), cfg, [0, 1])
    assert len(clips) == 8  # non-overlapping 4-frame windows
    model = build_model(cfg.model)
    expected = evaluate_objects(model, clips.batches(demo.EVAL_BATCH)) | pusht_metrics(model, clips)
    calls = []
    forward = type(model.objects).forward
    monkeypatch.setattr(type(model.objects), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    got = demo.heldout_metrics(model, clips)
    assert len(calls) == math.ceil(len(clips) / demo.EVAL_BATCH)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, nan_ok=True), k
    assert got["true_objects"] == 2.0 and got["alive_slots"] >= 0 and got["sbd"] > 0
