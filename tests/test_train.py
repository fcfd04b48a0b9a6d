"""The training loop, optimizer, schedule, checkpoints, logs and in-memory clips.

A small fake model (a conv, a layer norm, a linear head and a learned query) stands in for the real
models: it reconstructs the frames and returns unweighted ``sbd`` / ``diversity`` losses (plus ``jepa``
in stage 2), and counts its ``update_target`` calls. The dataset is a tiny generated physics dataset
(4 episodes x 8 frames at 32 px, the shared ``data`` fixture of conftest.py).
"""
from __future__ import annotations

import json
import math
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from hclsm import cli, keys
from hclsm.config import ClipConfig, load_config
from hclsm.config.train import LossWeights, TrainConfig
from hclsm.data.clips import ClipDataset
from hclsm.data.memory import MemoryClips, open_dataset
from hclsm.errors import ConfigError, DataError, HclsmError
from hclsm.train import (
    CheckpointError,
    build_optimizer,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    lr_at,
    param_groups,
    read_log,
    save_checkpoint,
    train,
    train_step,
    weighted_loss,
)
from hclsm.train.loop import progress_at, to_device
from hclsm.train.step import micro_batches


class FakeModel(nn.Module):
    """Per-pixel autoencoder with the model interface: ``model(batch, progress=, stage=).losses``."""

    def __init__(self, nan_calls: tuple[int, ...] = ()):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)
        self.query = nn.Parameter(torch.zeros(8, 8))  # a matrix, but a learned query: no decay
        self.register_buffer("target", torch.zeros(3, 8))  # EMA of head.weight
        self.nan_calls, self.calls, self.ema_calls, self.seen = set(nan_calls), 0, 0, []

    def forward(self, batch: dict, progress: float, stage: int) -> types.SimpleNamespace:
        self.calls += 1
        self.seen.append((progress, stage))
        x = batch[keys.VIDEO].flatten(0, 1)  # (B*T, 3, H, W)
        h = self.norm(F.relu(self.conv(x)).permute(0, 2, 3, 1)) @ self.query.T.add(torch.eye(8))  # (BT, H, W, 8)
        rec = self.head(h).permute(0, 3, 1, 2)  # (BT, 3, H, W)
        sbd = F.mse_loss(rec, x)
        if self.calls in self.nan_calls:
            sbd = sbd * float("nan")
        losses = {"sbd": sbd, "diversity": h.mean(dim=(1, 2)).var(dim=0).mean()}
        if stage == 2:
            losses["jepa"] = (h[..., :4] - h[..., 4:].detach()).pow(2).mean()
        return types.SimpleNamespace(losses=losses)

    def update_target(self, tau: float) -> None:
        self.ema_calls += 1
        self.target.mul_(tau).add_(self.head.weight.detach(), alpha=1 - tau)


def make_cfg(tmp_path: Path, *extra: str, **train: object):
    base = {"steps": 30, "batch_size": 4, "lr": 1e-2, "warmup_steps": 3, "log_every": 5, "eval_every": 0,
            "ckpt_every": 0, "device": "cpu", "stage": 2, "out_dir": str(tmp_path / "runs")}
    base.update(train)
    overrides = [f"train.{k}={v}" for k, v in base.items()]
    return load_config("tiny", overrides=[*overrides, "data.clip.length=4", "model.perception.image_size=16", *extra])


def first_batch(data: Path, cfg) -> dict:
    clips = MemoryClips(open_dataset(data), cfg.data.clip, image_size=cfg.model.perception.image_size, progress=False)
    return clips.sample(cfg.train.batch_size, torch.Generator().manual_seed(1))


# ---- config: loss weights, warmup, max_minutes ------------------------------------------------------

def test_loss_weights_per_stage_and_unknown_name():
    w = LossWeights()
    assert (w.weight("sbd", 1), w.weight("sbd", 2), w.weight("existence", 2), w.weight("jepa", 2)) == (5.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="unknown loss 'bogus'.*sbd, diversity, existence"):
        w.weight("bogus", 2)


def test_train_config_validates_warmup_and_max_minutes():
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: must be <= train\.steps \(10\), got 100"):
        TrainConfig(steps=10)
    with pytest.raises(ConfigError, match=r"train\.max_minutes: must be >= 0"):
        TrainConfig(max_minutes=-1.0)
    assert TrainConfig(steps=10, warmup_steps=10).warmup_steps == 10


def test_stage_switch_by_steps_and_by_progress():
    t = TrainConfig(steps=10, warmup_steps=0, stage=1, stage1_fraction=0.4)
    assert [t.stage_at(s) for s in range(10)] == [1] * 4 + [2] * 6
    assert t.stage_at(1, progress=0.5) == 2  # a time budget past 40 % ends stage 1 early
    assert TrainConfig(steps=10, warmup_steps=0, stage=2).stage_at(0) == 2


# ---- optimizer and schedule ---------------------------------------------------------------------------

def test_lr_warmup_then_cosine_to_the_floor():
    t = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear from 0 to the peak
    assert all(b > a for a, b in zip(lrs[:9], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[9:], lrs[10:]))  # then only down
    assert lrs[-1] == pytest.approx(1e-4)  # the cosine ends at lr * min_lr_ratio on the last step
    mid = 10 + (100 - 1 - 10) // 2
    assert lrs[mid] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * (mid - 10) / 89)))


def test_lr_follows_time_progress_when_budgeted():
    t = TrainConfig(steps=1000, warmup_steps=0, lr=1e-3, min_lr_ratio=0.0, max_minutes=1.0)
    assert lr_at(5, t, progress=1.0) == pytest.approx(0.0, abs=1e-12)  # out of time: the floor
    assert lr_at(5, t, progress=0.5) == pytest.approx(0.5e-3)  # half the time: half way down the cosine
    assert lr_at(900, t, progress=0.1) == pytest.approx(lr_at(900, t))  # steps ahead of time: steps win
    assert progress_at(10, 1000, 30.0, 60.0) == 0.5
    assert progress_at(500, 1000, 3.0, 60.0) == 0.5
    assert progress_at(500, 1000, 3.0, 0.0) == 0.5 and progress_at(0, 10, 99.0, 60.0) == 1.0


def test_param_groups_exempt_biases_norms_queries_and_vectors():
    model = FakeModel()
    model.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
    model.post_proj = nn.Linear(8, 8)  # "post" is not "pos": decayed
    model.emb = nn.Embedding(5, 8)
    decay, keep = param_groups(model, 0.05)
    assert (decay["weight_decay"], keep["weight_decay"]) == (0.05, 0.0)
    ids = {id(p) for p in decay["params"]}
    assert ids == {id(model.conv.weight), id(model.head.weight), id(model.post_proj.weight)}
    assert {id(p) for p in keep["params"]} == {id(p) for n, p in model.named_parameters()} - ids
    opt = build_optimizer(model, TrainConfig(steps=10, warmup_steps=0, lr=3e-4))
    assert isinstance(opt, torch.optim.AdamW) and [g["lr"] for g in opt.param_groups] == [3e-4, 3e-4]


# ---- in-memory clips --------------------------------------------------------------------------------

def test_memory_clips_match_clip_dataset_exactly(data):
    source = open_dataset(data)
    clip = ClipConfig(length=3, frame_skip=2)
    mem, ref = MemoryClips(source, clip, [1, 3], progress=False), ClipDataset(source, clip, [1, 3])
    assert len(mem) == len(ref) == 2 * 4  # a window spans 5 of 8 frames
    for i in range(len(mem)):
        a, b = mem[i], ref[i]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert mem._frames[keys.VIDEO].dtype == torch.uint8 and mem._frames[keys.MASK].dtype == torch.uint8
    batches = list(mem.batches(3))
    assert [len(b[keys.EPISODE]) for b in batches] == [3, 3, 2]
    assert torch.equal(torch.cat([b[keys.FRAMES] for b in batches]), torch.stack([ref[i][keys.FRAMES] for i in range(8)]))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(mem.sample(5, g1)[keys.VIDEO], mem.sample(5, g2)[keys.VIDEO])


def test_memory_clips_resize_frames_masks_and_positions(data):
    source = open_dataset(data)
    full = MemoryClips(source, ClipConfig(length=2), [0], progress=False)[0]
    half = MemoryClips(source, ClipConfig(length=2), [0], image_size=16, progress=False)[0]
    assert half[keys.VIDEO].shape == (2, 3, 16, 16) and half[keys.MASK].shape == (2, 16, 16)
    area = F.avg_pool2d(full[keys.VIDEO], 2)  # area interpolation by 2 = 2x2 means (up to 8-bit storage)
    assert (half[keys.VIDEO] - area).abs().max() <= 0.5 / 255 + 1e-6
    assert torch.allclose(half[keys.POSITIONS], full[keys.POSITIONS] / 2)
    assert set(half[keys.MASK].unique().tolist()) <= set(full[keys.MASK].unique().tolist())


def test_open_dataset_errors_name_the_path_and_the_fix(tmp_path, data):
    with pytest.raises(DataError, match=r"nope does not exist.*hclsm data physics --out DIR.*hclsm data pusht"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty is not a dataset.*meta/info.json"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DataError, match="needs 11 frames but the longest chosen episode has 8"):
        MemoryClips(open_dataset(data), ClipConfig(length=11), progress=False)


# ---- the loop -------------------------------------------------------------------------------------

def test_train_reduces_the_loss_and_writes_the_run(tmp_path, data):
    cfg = make_cfg(tmp_path, steps=30, stage=1, stage1_fraction=0.5, eval_every=10, ckpt_every=10, keep_last=2)
    calls = []

    def eval_fn(model, clips):
        assert not model.training  # evaluation runs in eval mode ...
        calls.append(len(clips))
        return {"n_windows": float(len(clips)), "video_mean": float(np.mean([b[keys.VIDEO].mean() for b in clips.batches(4)]))}

    model = FakeModel()
    result = train(cfg, data, eval_fn=eval_fn, progress=False, model=model)
    run = result.run_dir
    assert run.parent == tmp_path / "runs" and re.fullmatch(r"hclsm-tiny-\d{8}-\d{6}", run.name)
    assert model.training  # ... and training resumes in train mode
    assert result.steps == 30 and result.skipped == 0 and result.stopped == "steps"
    log = read_log(run / "log.jsonl")
    train_lines = [r for r in log if "loss" in r]
    assert [r["step"] for r in train_lines] == [5, 10, 15, 20, 25, 30]
    assert train_lines[-1]["losses"]["sbd"] < 0.5 * train_lines[0]["losses"]["sbd"]  # it learns
    assert {"stage", "lr", "grad_norm", "steps_per_s", "elapsed"} <= train_lines[0].keys()
    assert [r["stage"] for r in train_lines] == [1, 1, 1, 2, 2, 2]  # 15 stage-1 steps, then stage 2
    assert "jepa" not in train_lines[0]["losses"] and "jepa" in train_lines[-1]["losses"]
    assert [s for _, s in model.seen] == [1] * 15 + [2] * 15
    assert [round(p, 6) for p, _ in model.seen[:3]] == [0.0, round(1 / 30, 6), round(2 / 30, 6)]
    assert model.ema_calls == 30  # the EMA target follows every optimizer step
    assert len(calls) == 3 and [r["step"] for r in log if "val" in r] == [10, 20, 30]  # every 10 steps
    assert result.metrics["n_windows"] == calls[0] > 0
    assert [p.name for p in list_checkpoints(run)] == ["step_0000020", "step_0000030"]  # keep_last=2
    assert result.checkpoint == latest_checkpoint(run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["skipped_steps"] == 0 and summary["val"]["n_windows"] == calls[0]
    assert summary["final_losses"]["sbd"] == pytest.approx(result.losses["sbd"])
    assert load_config(yaml_path=run / "config.yaml") == cfg
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())


def test_checkpoint_round_trip_is_exact_and_resumes_identically(tmp_path, data):
    cfg = make_cfg(tmp_path, steps=6)
    torch.manual_seed(0)
    model = FakeModel()
    result = train(cfg, data, run_dir=tmp_path / "run", progress=False, model=model)
    opt = build_optimizer(model, cfg.train)
    batch = first_batch(data, cfg)
    for step in range(3):  # give the optimizer state (moments, step counts)
        train_step(model, opt, batch, cfg=cfg.train, stage=2, progress=step / 6)
    path = save_checkpoint(result.run_dir, 99, model, opt, {"note": "x"}, stage=2)

    twin = FakeModel()
    twin_opt = build_optimizer(twin, cfg.train)
    state = load_checkpoint(path, twin, twin_opt)
    assert (state["step"], state["stage"], state["extra"]) == (99, 2, {"note": "x"})
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), k
    sa, sb = opt.state_dict(), twin_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid in sa["state"]:
        for name, v in sa["state"][pid].items():
            assert torch.equal(v, sb["state"][pid][name]), (pid, name)
    a = train_step(model, opt, batch, cfg=cfg.train, stage=2, progress=0.5)
    b = train_step(twin, twin_opt, batch, cfg=cfg.train, stage=2, progress=0.5)
    c = train_step(model, opt, batch, cfg=cfg.train, stage=2, progress=0.5)
    d = train_step(twin, twin_opt, batch, cfg=cfg.train, stage=2, progress=0.5)
    assert (a.loss, c.loss) == (b.loss, d.loss)  # the update after resuming is the same update

    # no pickle anywhere: safetensors (8-byte header length + JSON header) and JSON only
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]
    for f in ("model.safetensors", "optimizer.safetensors"):
        raw = (path / f).read_bytes()
        assert raw[8:9] == b"{" and not raw.startswith((b"\x80", b"PK"))
        with safe_open(path / f, "pt") as st:
            assert len(st.keys()) > 0
    json.loads((path / "state.json").read_text())


def test_checkpoint_restores_rng_and_prunes(tmp_path):
    model = FakeModel()
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, None, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000004", "step_0000005"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left
    torch.manual_seed(3)
    np.random.seed(3)
    save_checkpoint(tmp_path, 6, model, None)
    expect = torch.rand(3), np.random.rand()
    load_checkpoint(tmp_path, FakeModel(), restore_rng=True)  # a run dir: its newest checkpoint
    assert torch.equal(torch.rand(3), expect[0]) and np.random.rand() == expect[1]


def test_strict_load_names_missing_and_unexpected_keys(tmp_path):
    path = save_checkpoint(tmp_path, 1, FakeModel(), None)
    other = FakeModel()
    other.extra_head = nn.Linear(2, 2)
    del other.query
    other.query = None
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, other)
    msg = str(e.value)
    assert isinstance(e.value, HclsmError) and "\n" not in msg
    assert "missing keys: extra_head.bias, extra_head.weight" in msg and "unexpected keys: query" in msg
    assert "another config" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", FakeModel())


def test_existing_run_dir_is_refused_before_anything_runs(tmp_path, data):
    run = tmp_path / "run"
    run.mkdir()
    (run / "old.txt").write_text("x")
    model = FakeModel()
    with pytest.raises(HclsmError, match=r"run directory .*run already exists and is not empty; choose another --name"):
        train(make_cfg(tmp_path), data, run_dir=run, progress=False, model=model)
    assert model.calls == 0 and sorted(p.name for p in run.iterdir()) == ["old.txt"]


def test_nan_loss_step_is_skipped_and_counted(tmp_path, data, capsys):
    model = FakeModel(nan_calls=(3, 7))
    result = train(make_cfg(tmp_path, steps=10), data, run_dir=tmp_path / "run", progress=False, model=model)
    assert result.steps == 10 and result.skipped == 2 and model.ema_calls == 8  # no update, no EMA on NaN
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert capsys.readouterr().err.count("non-finite loss; update skipped") == 2
    events = [r for r in read_log(result.run_dir / "log.jsonl") if r.get("event") == "skipped_step"]
    assert [r["step"] for r in events] == [3, 7] and events[0]["losses"]["sbd"] is None
    assert json.loads((result.run_dir / "summary.json").read_text())["skipped_steps"] == 2


def test_max_minutes_stops_on_time(tmp_path, data):
    cfg = make_cfg(tmp_path, steps=100_000, warmup_steps=0, max_minutes=0.01, log_every=1000)  # 0.6 s
    model = FakeModel()
    result = train(cfg, data, run_dir=tmp_path / "run", progress=False, model=model)
    assert result.stopped == "time" and 0 < result.steps < 100_000
    assert model.seen[-1][0] > 0.5  # progress follows the clock, not steps / 100000
    assert json.loads((result.run_dir / "summary.json").read_text())["stopped"] == "time"


def test_bf16_autocast_step_on_cpu(tmp_path, data):
    cfg = make_cfg(tmp_path, "train.precision=bf16")
    model = FakeModel()
    opt = build_optimizer(model, cfg.train)
    r = train_step(model, opt, to_device(first_batch(data, cfg), torch.device("cpu")), cfg=cfg.train, stage=2,
                   progress=0.0)
    assert r.skipped is None and math.isfinite(r.loss) and model.ema_calls == 1


def test_accumulated_micro_batches_average_their_gradients(tmp_path, data):
    """train.accumulate=2: two forwards and backwards on the batch's halves; the gradient is their mean
    (what two data-parallel ranks holding those halves would all-reduce) and so are the reported losses;
    a non-finite loss in either half skips the whole step."""
    cfg = make_cfg(tmp_path, "train.accumulate=2", "train.grad_clip=0")
    batch = to_device(first_batch(data, cfg), torch.device("cpu"))
    model = FakeModel()
    halves, expected, losses = micro_batches(batch, 2), None, []
    for half in halves:
        total = weighted_loss(model(half, progress=0.0, stage=2).losses, cfg.train.loss, 2)
        grads = torch.autograd.grad(total, list(model.parameters()))
        expected = grads if expected is None else [a + b for a, b in zip(expected, grads)]
        losses.append(float(total.detach()))
    model.calls = 0
    r = train_step(model, build_optimizer(model, cfg.train), batch, cfg=cfg.train, stage=2, progress=0.0)
    assert model.calls == 2 and r.skipped is None and model.ema_calls == 1
    assert math.isclose(r.loss, sum(losses) / 2, rel_tol=1e-6)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g / 2, rtol=1e-5, atol=1e-8)
    whole = torch.autograd.grad(weighted_loss(model(batch, progress=0.0, stage=2).losses, cfg.train.loss, 2),
                                model.head.weight)[0]
    assert not torch.allclose(whole, model.head.weight.grad, atol=1e-6)  # the batch-level term: not one mean

    flaky = FakeModel(nan_calls=(2,))
    r = train_step(flaky, build_optimizer(flaky, cfg.train), batch, cfg=cfg.train, stage=2, progress=0.0)
    assert r.skipped == "loss" and flaky.ema_calls == 0
    with pytest.raises(ConfigError, match="train.batch_size: must be a multiple of train.accumulate \\(3\\)"):
        make_cfg(tmp_path, "train.accumulate=3")


# ---- CLI ------------------------------------------------------------------------------------------

def test_cli_train_bad_data_is_one_line_and_leaves_no_run(tmp_path, capsys):
    for data in (tmp_path / "missing", tmp_path):
        code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--name", "r", "--quiet",
                         "--steps", "5", "--set", "train.warmup_steps=1"])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
        assert "hclsm data physics --out" in err
        assert not (tmp_path / "runs" / "r").exists()


def test_cli_train_runs_with_the_built_model_and_eval(tmp_path, data, capsys, monkeypatch):
    built = []
    fake_models = types.ModuleType("hclsm.models")
    fake_models.build_model = lambda cfg: built.append(cfg.name) or FakeModel()
    fake_eval = types.ModuleType("hclsm.eval.objects")
    fake_eval.make_eval_fn = lambda cfg: (lambda model, clips: {"windows": float(len(clips))})
    monkeypatch.setitem(sys.modules, "hclsm.models", fake_models)
    monkeypatch.setitem(sys.modules, "hclsm.eval.objects", fake_eval)
    code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--name", "r", "--quiet",
                     "--steps", "4", "--stage", "2", "--model", "hclsm", "--set", "train.warmup_steps=1",
                     "--train.batch_size=2", "--data.clip.length=4", "--model.perception.image_size=16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert built == ["hclsm"]
    assert f"run: {tmp_path / 'runs' / 'r'}" in out and "4 steps" in out and "val: windows" in out
    assert (tmp_path / "runs" / "r" / "summary.json").is_file()


def test_default_threads_follow_omp_num_threads_and_the_load(monkeypatch):
    from hclsm.train import distributed

    monkeypatch.setattr(distributed, "available_cpus", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert distributed.default_threads() == 3  # the user's setting wins
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert distributed.default_threads() == 4 and distributed.default_threads(local_world=2) == 2
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (2.8, 0.0, 0.0))  # ~3 cores busy elsewhere
    assert distributed.default_threads() == 1
    monkeypatch.setattr(distributed.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert distributed.default_threads() == 1  # never fewer than one
