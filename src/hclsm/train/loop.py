"""The one training loop, for every model.

``train(cfg, data_root)`` loads the dataset into memory (a train / val split of its episodes), builds
the model (or takes one), and runs AdamW with warmup + cosine over ``cfg.train.steps`` optimizer steps
(or until ``cfg.train.max_minutes`` of wall-clock, whichever comes first), switching from stage 1 to
stage 2 as ``TrainConfig.stage_at`` says. Each step: forward (optionally under bf16 autocast), the
weighted sum of the model's unweighted losses (``LossWeights.weight``), backward, global-norm
clipping, AdamW, then the model's EMA target update. A step whose loss or gradient norm is not finite
is skipped (no update), reported on stderr and in the log, and counted; nothing is clamped.

A run directory holds ``config.yaml``, ``log.jsonl``, ``tb/`` (TensorBoard), ``checkpoints/`` and,
at the end, ``summary.json``.

The model's interface: ``model(batch, progress=p, stage=s).losses`` is a dict of scalar tensors named
from ``hclsm.config.train.LOSS_NAMES``; an optional ``model.update_target(tau)`` is called after every
optimizer step.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hclsm.config import Config, config_to_dict, save_config
from hclsm.config.train import LossWeights, TrainConfig
from hclsm.data.clips import clip_windows, split_episodes
from hclsm.data.memory import MemoryClips, open_dataset
from hclsm.errors import ConfigError, HclsmError
from hclsm.train.checkpoint import save_checkpoint
from hclsm.train.logging import RunLogger
from hclsm.train.optim import build_optimizer, lr_at, set_lr
from hclsm.utils.atomic import atomic_write_text

EvalFn = Callable[[nn.Module, MemoryClips], Mapping[str, float]]
MAX_CONSECUTIVE_SKIPS = 25  # this many non-finite steps in a row end the run as diverged


class TrainingDiverged(HclsmError):
    """Too many steps in a row had a non-finite loss or gradient; the run stopped."""


@dataclass
class TrainResult:
    """What ``train`` returns. ``losses`` are the unweighted losses (and ``loss``, their weighted sum)
    averaged over the last logging interval; ``metrics`` the last evaluation's."""

    run_dir: Path
    steps: int  # optimizer steps run (skipped ones included)
    seconds: float
    losses: dict[str, float]
    metrics: dict[str, float]
    model: nn.Module
    skipped: int = 0  # steps skipped for a non-finite loss or gradient
    stopped: str = "steps"  # why the loop ended: "steps" or "time"
    checkpoint: Path | None = None


@dataclass
class StepResult:
    """One optimizer step: the weighted total, the unweighted losses (floats), the gradient norm."""

    loss: float
    losses: dict[str, float]
    grad_norm: float = math.nan
    skipped: str | None = None  # why the update was not applied ("loss" or "grad"), or None


@dataclass
class _Interval:
    """Running sums between two log lines."""

    sums: dict[str, float] = field(default_factory=dict)
    steps: int = 0  # applied (not skipped) steps
    attempts: int = 0
    grad_norm: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def add(self, r: StepResult) -> None:
        self.attempts += 1
        if r.skipped:
            return
        self.steps += 1
        self.grad_norm += r.grad_norm
        for k, v in {"loss": r.loss, **r.losses}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def means(self) -> dict[str, float]:
        return {k: v / self.steps for k, v in self.sums.items()} if self.steps else {}


# ---- pieces -----------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit device that is not there -> ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"train.device: {name} is not available on this machine; use train.device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps is not available on this machine; use train.device=auto or cpu")
    return device


def default_run_dir(cfg: Config) -> Path:
    """``out_dir / run_name``, or ``out_dir / MODEL-PRESET-YYYYmmdd-HHMMSS`` when no name is set."""
    name = cfg.train.run_name or f"{cfg.model.name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def check_run_dir(run_dir: Path) -> None:
    """A run never writes into an existing non-empty directory (it would mix two runs' logs)."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise HclsmError(f"run directory {run_dir} already exists and is not empty; choose another --name "
                         f"(train.run_name) or --out (train.out_dir), or remove it")


def weighted_loss(losses: Mapping[str, torch.Tensor], weights: LossWeights, stage: int) -> torch.Tensor:
    """``sum(weight(name, stage) * loss)`` over the losses with a non-zero weight (in fp32)."""
    terms = [weights.weight(name, stage) * value.float() for name, value in losses.items()
             if weights.weight(name, stage) != 0.0]
    if not terms:
        names = ", ".join(losses) or "none"
        raise ConfigError(f"train.loss: every loss the model returned in stage {stage} ({names}) has weight 0; "
                          f"nothing would be trained, give one of them a positive weight")
    return torch.stack(terms).sum()


def progress_at(step: int, steps: int, elapsed: float, budget_s: float) -> float:
    """Training progress in [0, 1]: ``max(step / steps, elapsed / budget)`` (the budget when set)."""
    p = step / steps
    if budget_s > 0:
        p = max(p, elapsed / budget_s)
    return min(p, 1.0)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor], *,
               cfg: TrainConfig, stage: int, progress: float) -> StepResult:
    """One optimizer step on ``batch`` (already on the model's device); the update is skipped when the
    weighted loss or the gradient norm is not finite."""
    device_type = next(model.parameters()).device.type
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        out = model(batch, progress=progress, stage=stage)
    losses = out if isinstance(out, Mapping) else out.losses
    total = weighted_loss(losses, cfg.loss, stage)
    values = torch.stack([total.detach(), *(v.detach().float() for v in losses.values())]).tolist()  # one sync
    names = list(losses)
    floats = dict(zip(names, values[1:]))
    if not math.isfinite(values[0]):
        return StepResult(values[0], floats, skipped="loss")
    total.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure only
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(values[0], floats, grad_norm, skipped="grad")
    optimizer.step()
    update_target = getattr(model, "update_target", None)
    if callable(update_target):
        with torch.no_grad():
            update_target(cfg.ema_tau)
    return StepResult(values[0], floats, grad_norm)


def evaluate(model: nn.Module, eval_fn: EvalFn, clips: MemoryClips) -> dict[str, float]:
    """``eval_fn(model, clips)`` in eval mode without gradients; the model is put back in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model, clips).items()}
    finally:
        model.train()


def _warn(message: str) -> None:
    tqdm.write(f"WARNING: {message}", file=sys.stderr)


def _finite(d: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in d.items()}


# ---- the loop ---------------------------------------------------------------------------------------

def train(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike | None = None,
          eval_fn: EvalFn | None = None, progress: bool = True, model: nn.Module | None = None) -> TrainResult:
    """Train ``model`` (default ``hclsm.models.build_model(cfg.model)``) on the dataset at ``data_root``.

    Args:
        cfg: the full config; ``cfg.train`` drives the loop, ``cfg.data.clip`` the clips and
            ``cfg.model.perception.image_size`` their frame size.
        data_root: a physics or LeRobot v3 dataset directory (see ``hclsm.data.memory.open_dataset``).
        run_dir: where to write the run (default ``default_run_dir(cfg)``); must not exist or be empty.
        eval_fn: ``eval_fn(model, val_clips) -> {name: value}``, called every ``eval_every`` steps and at
            the end on the held-out episodes (logged as ``val/NAME``).
        progress: show tqdm bars.
        model: a model to train instead of building one.

    Raises ``HclsmError`` (before anything is written) for a bad dataset, an existing run directory or
    an unavailable device, and ``TrainingDiverged`` after ``MAX_CONSECUTIVE_SKIPS`` non-finite steps
    in a row.
    """
    t = cfg.train
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    check_run_dir(run_dir)
    device = resolve_device(t.device)
    seed_everything(t.seed)
    torch.set_num_threads(os.cpu_count() or 1)

    # data: every chosen episode in memory, at the model's frame size
    source = open_dataset(data_root)
    n_episodes = len(source.episode_lengths)
    if t.val_fraction > 0:
        train_eps, val_eps = split_episodes(n_episodes, t.val_fraction, t.seed)
    else:
        train_eps, val_eps = list(range(n_episodes)), []
    clip, size = cfg.data.clip, cfg.model.perception.image_size
    train_clips = MemoryClips(source, clip, train_eps, size, progress=progress)
    if val_eps and len(clip_windows(source.episode_lengths, clip.length, clip.frame_skip, clip.stride, val_eps)):
        val_clips: MemoryClips | None = MemoryClips(source, clip, val_eps, size, progress=progress)
    else:
        val_clips = None
        if eval_fn is not None:
            _warn(f"no held-out clips in {source.name} (val episodes {val_eps}); evaluation is off")

    if model is None:
        from hclsm.models import build_model

        model = build_model(cfg.model)
    model.to(device).train()
    optimizer = build_optimizer(model, t)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    logger = RunLogger(run_dir)
    generator = torch.Generator().manual_seed(t.seed)  # the batch sampler's own stream (checkpointed)
    budget = 60.0 * t.max_minutes
    # a wall-clock budget that ends training before train.steps does is what the bar counts down (in
    # seconds); otherwise it counts steps
    timed = budget > 0
    bar = tqdm(total=round(budget) if timed else t.steps, desc=f"train {run_dir.name}", unit="s" if timed else "step",
               disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    step, skipped, in_a_row, stopped = 0, 0, 0, "steps"
    interval, last_losses, metrics = _Interval(), {}, {}
    last_eval = last_ckpt = -1
    checkpoint: Path | None = None
    p, stage = 0.0, t.stage_at(0)

    def log_interval() -> None:
        nonlocal interval, last_losses
        now = time.perf_counter()
        record: dict[str, Any] = {"step": step, "stage": stage, "lr": optimizer.param_groups[0]["lr"],
                                  "progress": round(p, 6)}
        if interval.steps:
            last_losses = interval.means()
            record |= {"loss": last_losses["loss"], "losses": {k: v for k, v in last_losses.items() if k != "loss"},
                       "grad_norm": interval.grad_norm / interval.steps}
        record |= {"steps_per_s": interval.attempts / max(now - interval.start, 1e-9), "elapsed": now - start,
                   "skipped": skipped}
        logger.log(record)
        interval = _Interval()

    def run_eval() -> None:
        nonlocal metrics, last_eval
        if eval_fn is None or val_clips is None or last_eval == step:
            return
        metrics = evaluate(model, eval_fn, val_clips)
        last_eval = step
        logger.log({"step": step, "val": metrics})
        bar.write(f"step {step}: " + ", ".join(f"val/{k} {v:.4g}" for k, v in metrics.items()))

    def run_ckpt() -> None:
        nonlocal checkpoint, last_ckpt
        if last_ckpt == step:
            return
        extra = {"config": config_to_dict(cfg), "sampler_rng": generator.get_state().tolist(), "skipped": skipped,
                 "elapsed": time.perf_counter() - start, "progress": p, "losses": _finite(last_losses)}
        checkpoint = save_checkpoint(run_dir, step, model, optimizer, extra, stage=stage, keep_last=t.keep_last)
        last_ckpt = step

    try:
        while step < t.steps:
            elapsed = time.perf_counter() - start
            if budget > 0 and elapsed >= budget:
                stopped = "time"
                break
            p = progress_at(step, t.steps, elapsed, budget)
            stage = t.stage_at(step, p if budget > 0 else None)
            set_lr(optimizer, lr_at(step, t, p if budget > 0 else None))
            batch = to_device(train_clips.sample(t.batch_size, generator), device)
            result = train_step(model, optimizer, batch, cfg=t, stage=stage, progress=p)
            step += 1
            interval.add(result)
            if result.skipped:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                what = "loss" if result.skipped == "loss" else f"gradient norm ({result.grad_norm})"
                detail = ", ".join(f"{k}={v:.4g}" for k, v in result.losses.items())
                _warn(f"step {step}: non-finite {what}; update skipped ({skipped} skipped so far); losses: {detail}")
                logger.log({"step": step, "event": "skipped_step", "reason": f"non-finite {result.skipped}",
                            "losses": _finite(result.losses), "skipped": skipped}, scalars=False)
                if in_a_row >= MAX_CONSECUTIVE_SKIPS:
                    stopped = "diverged"
                    break
            else:
                in_a_row = 0
                bar.set_postfix(loss=f"{result.loss:.4f}", stage=stage, **({"step": step} if timed else {}),
                                refresh=False)
            if timed:
                bar.update(min(round(time.perf_counter() - start), bar.total) - bar.n)
            else:
                bar.update(1)
            if step % t.log_every == 0:
                log_interval()
            if t.eval_every and step % t.eval_every == 0:
                run_eval()
            if t.ckpt_every and step % t.ckpt_every == 0:
                run_ckpt()
        if interval.attempts:
            log_interval()
        if stopped != "diverged":
            run_eval()
        run_ckpt()
    except BaseException:
        if created and step == 0:  # failed before training started: leave no half-made run behind
            logger.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
        logger.close()

    seconds = time.perf_counter() - start
    summary = {
        "run_dir": str(run_dir), "model": cfg.model.name, "preset": cfg.preset, "device": str(device),
        "parameters": n_params, "steps": step, "planned_steps": t.steps, "stopped": stopped,
        "seconds": round(seconds, 3), "steps_per_s": round(step / max(seconds, 1e-9), 3),
        "skipped_steps": skipped, "final_losses": _finite(last_losses), "val": _finite(metrics),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "train_episodes": len(train_eps), "val_episodes": len(val_eps) if val_clips is not None else 0,
        "train_clips": len(train_clips),
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if stopped == "diverged":
        raise TrainingDiverged(f"training diverged: {MAX_CONSECUTIVE_SKIPS} steps in a row had a non-finite loss or "
                               f"gradient (last at step {step}); lower train.lr or use train.precision=fp32; "
                               f"logs in {run_dir}")
    return TrainResult(run_dir=run_dir, steps=step, seconds=seconds, losses=last_losses, metrics=metrics, model=model,
                       skipped=skipped, stopped=stopped, checkpoint=checkpoint)
