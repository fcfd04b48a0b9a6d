"""The one training loop, for every model.

``train(cfg, data_root)`` loads the dataset into memory, or streams it when it would not fit (a train / val split
of its episodes, ``hclsm.train.data.run_clips``), builds the model (or takes one), and runs AdamW with
warmup + cosine over ``cfg.train.steps`` optimizer steps (or until ``cfg.train.max_minutes`` of wall-clock, whichever comes first), switching from stage 1 to
stage 2 as ``TrainConfig.stage_at`` says. Each step (``hclsm.train.step.train_step``): forward (optionally under bf16 autocast), the
weighted sum of the model's unweighted losses (``LossWeights.weight``), backward, global-norm
clipping, AdamW, then the model's EMA target update. A step whose loss or gradient norm is not finite
is skipped (no update), reported on stderr and in the log, and counted; nothing is clamped.

A run directory holds ``config.yaml``, ``log.jsonl``, ``tb/`` (TensorBoard), ``checkpoints/`` and,
at the end, ``summary.json``; with ``train.wandb`` also ``wandb/`` and ``wandb_id`` (``hclsm.train.logging``).
``train(..., resume=True)`` continues a run from its newest checkpoint:
weights, optimizer, step, the batch sampler's stream and the global RNGs are restored, so on the CPU
the resumed run ends with the same weights, bit for bit, as one never interrupted.

Under ``torchrun`` the loop runs data-parallel (``hclsm.train.distributed``): each rank takes its share
of the same global batch, DDP averages the gradients (or FSDP shards the model), losses are averaged
across ranks, and rank 0 alone writes the run directory.

Training on a later task of a sequence (``hclsm.train.continual``) passes ``ewc`` (``hclsm.train.ewc``): its
penalty joins every step's loss, and it is saved with every checkpoint and restored on resume; and with
rehearsal ``replay`` (``hclsm.train.rehearsal``), whose clips fill ``train.rehearsal_fraction`` of every batch.

The model's interface: ``model(batch, progress=p, stage=s).losses`` is a dict of scalar tensors named
from ``hclsm.config.train.LOSS_NAMES``; an optional ``model.update_target(tau)`` is called after every
optimizer step, and an optional ``model.prepare(train_clips)`` once before training (data-set statistics the
model keeps in its buffers, e.g. HCLSM's static background).
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
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
from hclsm.data.memory import ClipWindows
from hclsm.data.streaming import StreamingClips
from hclsm.errors import ConfigError, HclsmError
from hclsm.train import distributed
from hclsm.train.data import run_clips
from hclsm.train.checkpoint import (latest_checkpoint, load_checkpoint, read_checkpoint_tensors, read_optimizer_state,
                                   save_checkpoint)
from hclsm.train.ewc import EWC
from hclsm.train.rehearsal import ReplayBuffer, replayed_count
from hclsm.train.step import StepResult, out_of_memory, train_step
from hclsm.train.logging import RunLogger, require_wandb
from hclsm.train.optim import build_optimizer, lr_at, set_lr
from hclsm.train.rundir import (check_run_dir, default_run_dir, first_new_dir, repair_for_resume,
                               restart_run_dir, resume_checkpoint, write_run_file)
from hclsm.utils.jsonsafe import finite_or_none
from hclsm.utils.allocator import keep_freed_memory
from hclsm.utils.atomic import OutputError, atomic_write_text, output_error, probe_writable
from hclsm.utils.interrupt import interrupt_point

EvalFn = Callable[[nn.Module, ClipWindows], Mapping[str, float]]
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


def progress_at(step: int, steps: int, elapsed: float, budget_s: float) -> float:
    """Training progress in [0, 1]: ``max(step / steps, elapsed / budget)`` (the budget when set)."""
    p = step / steps
    if budget_s > 0:
        p = max(p, elapsed / budget_s)
    return min(p, 1.0)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def evaluate(model: nn.Module, eval_fn: EvalFn, clips: ClipWindows) -> dict[str, float]:
    """``eval_fn(model, clips)`` in eval mode without gradients; the model is put back in train mode."""
    model.eval()
    try:
        with torch.no_grad():
            return {k: float(v) for k, v in eval_fn(model, clips).items()}
    finally:
        model.train()


@contextlib.contextmanager
def _memory_is_the_users(what: str, fix: str):
    """An allocation that fails in the block (sizes from the config) is ``HclsmError`` naming ``what`` and ``fix``."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        asked = re.search(r"allocate (\d+) bytes", str(e))
        size = f" (an allocation of {int(asked.group(1)) / 2**30:.3g} GiB failed)" if asked else ""
        raise HclsmError(f"{what} does not fit in this machine's memory{size}; {fix}") from None


def _warn(message: str) -> None:
    tqdm.write(f"WARNING: {message}", file=sys.stderr)


# ---- the loop ---------------------------------------------------------------------------------------

def train(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike | None = None,
          eval_fn: EvalFn | None = None, progress: bool = True, model: nn.Module | None = None,
          resume: bool = False, ewc: EWC | None = None, replay: ReplayBuffer | None = None) -> TrainResult:
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
        resume: continue the run in ``run_dir`` from its newest checkpoint (``cfg`` must be the run's
            own config, e.g. ``load_config(yaml_path=run_dir / "config.yaml")``); a run that stopped before
            its first checkpoint starts again from step 0 in its directory.
        ewc: the EWC state of earlier tasks (``hclsm.train.ewc``): its penalty, weighted by ``train.loss.ewc``,
            joins the loss; a resumed run takes the one its checkpoint was saved with.
        replay: clips of earlier tasks (``hclsm.train.rehearsal``): ``train.rehearsal_fraction`` of every batch
            is drawn from it (with the sampler's own, checkpointed stream).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) training is data-parallel; see ``hclsm.train.distributed``.

    Raises ``HclsmError`` (before anything is written) for a bad dataset, an existing run directory (or,
    with ``resume``, one that holds no run) or an unavailable device, ``OutputError`` when the run directory
    cannot be written (read-only, no space left), and ``TrainingDiverged`` after ``MAX_CONSECUTIVE_SKIPS``
    non-finite steps in a row.
    """
    t = cfg.train
    if t.wandb:  # asked for and not installed: said before anything is read or written
        require_wandb()
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    resume_from = None
    if resume:
        resume_from = resume_checkpoint(run_dir)  # None: killed before its first checkpoint, so from step 0
    else:
        check_run_dir(run_dir)
    if distributed.env_world().main:  # a run directory that cannot be written fails now, not after loading
        existing = next(d for d in (run_dir, *run_dir.parents) if d.exists())
        if not existing.is_dir():
            raise HclsmError(f"cannot create run directory {run_dir}: {existing} is a file, not a directory; choose "
                             f"another --out (train.out_dir)")
        probe_writable(existing, None if resume else "--out (train.out_dir)")
    world, device = distributed.setup(resolve_device(t.device), t.batch_size, t.accumulate)
    try:
        return _train(cfg, data_root, run_dir, eval_fn, progress and world.main, model, resume_from, world, device,
                      ewc, restart=resume and resume_from is None, replay=replay)
    except OSError as e:  # writing the run failed (read-only, no space left): the user's to fix, one line
        err = _run_dir_error(e, run_dir, resumed=resume)
        if err is None:
            raise
        raise err from None
    finally:
        distributed.teardown(world)


def _run_dir_error(e: OSError, run_dir: Path, resumed: bool) -> OutputError | None:
    """``OutputError`` for a filesystem fault in the run directory (or the --out root above it), else None."""
    if e.filename is not None:
        f = Path(e.filename)
        if not (f.is_relative_to(run_dir) or run_dir.is_relative_to(f)):
            return None
    err = output_error(e, run_dir, None if resumed else "--out (train.out_dir)")
    if err is not None and latest_checkpoint(run_dir) is not None:
        err = OutputError(f"{err}; then continue the run with `hclsm train --resume {run_dir}`")
    return err


class _NoLogger:
    """What ranks other than 0 log to."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _train(cfg: Config, data_root: str | os.PathLike, run_dir: Path, eval_fn: EvalFn | None, progress: bool,
           model: nn.Module | None, resume_from: Path | None, world: distributed.Dist, device: torch.device,
           ewc: EWC | None = None, restart: bool = False, replay: ReplayBuffer | None = None) -> TrainResult:
    t = cfg.train
    seed_everything(t.seed)
    torch.set_num_threads(t.threads or distributed.default_threads(world.local_world))  # 0: load-aware choice
    keep_freed_memory()  # no page faults on every step's activations (hclsm.utils.allocator)

    # data: every chosen episode in memory, at the model's frame size, or streamed when it would not fit (data.streaming)
    with _memory_is_the_users("the dataset, loaded into memory at model.perception.image_size="
                              f"{cfg.model.perception.image_size}", "lower the image size or train on fewer episodes"):
        train_clips, val_clips, val_eps = run_clips(cfg, data_root, progress)
    if replay is not None:  # a task whose clips cannot be mixed with the replayed ones is refused before training
        replay.check_batch(train_clips.get([0]), train_clips.source.name)
    if val_clips is None and eval_fn is not None:
        _warn(f"no held-out clips in {train_clips.source.name} (val episodes {val_eps}); evaluation is off")

    if model is None:
        from hclsm.models import build_model

        with _memory_is_the_users("the model", "lower its widths (model.perception.d_model, model.slots.d_slot, "
                                  "model.decoder.hidden, ...) or use a smaller preset"):
            model = build_model(cfg.model)
    model.to(device).train()
    prepare = getattr(model, "prepare", None)
    if callable(prepare) and resume_from is None:  # data-set statistics a model keeps (a resumed run has them)
        prepare(train_clips)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    generator = torch.Generator().manual_seed(t.seed)  # the batch sampler's own stream (checkpointed)
    step, skipped, in_a_row, stopped, elapsed_before = 0, 0, 0, "steps", 0.0
    if resume_from is not None:  # weights, global RNGs, the loop's own counters (the optimizer below)
        state = load_checkpoint(resume_from, model, None, restore_rng=True)
        extra = state["extra"]
        step, skipped = int(state["step"]), int(extra.get("skipped", 0))
        elapsed_before = float(extra.get("elapsed", 0.0))
        generator.set_state(torch.tensor(extra["sampler_rng"], dtype=torch.uint8))
        ewc = EWC.from_tensors(read_checkpoint_tensors(resume_from)) or ewc
    if ewc is not None and t.parallel == "fsdp" and world.active:
        raise ConfigError("train.parallel: EWC (training on a later task) needs whole parameters on every rank; use "
                          "train.parallel=ddp")
    if world.rank:  # the other ranks' noise (slot init, gates) must not repeat rank 0's
        torch.manual_seed(t.seed + 1_000_003 * world.rank + step)
    model = distributed.wrap(model, world, device, t.parallel)
    shards = distributed.sharded(model)  # FSDP: checkpoints and evaluation need every rank
    optimizer = build_optimizer(distributed.unwrap(model), t)  # after wrapping: FSDP replaces the parameters
    if resume_from is not None:
        distributed.load_optimizer(distributed.unwrap(model), optimizer, read_optimizer_state(resume_from, optimizer))

    created = first_new_dir(run_dir)
    logger: RunLogger | _NoLogger = _NoLogger()
    try:
        if world.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if resume_from is not None:
                repair_for_resume(run_dir, step)
            else:
                if restart:
                    restart_run_dir(run_dir)
                save_config(cfg, run_dir / "config.yaml")
                write_run_file(run_dir, str(Path(data_root).resolve()))
            logger = RunLogger(run_dir, wandb=t.wandb_project if t.wandb else None, config=config_to_dict(cfg))
    except BaseException:  # e.g. a read-only directory or W&B would not start: leave no half-made run
        if created is not None and world.main:  # (nor an --out root made for it)
            shutil.rmtree(created, ignore_errors=True)
        raise
    if resume_from is not None:
        logger.log({"step": step, "event": "resumed", "checkpoint": str(resume_from)}, scalars=False)
    budget = 60.0 * t.max_minutes
    # a wall-clock budget that ends training before train.steps does is what the bar counts down (in
    # seconds); otherwise it counts steps
    timed = budget > 0
    bar = tqdm(total=round(budget) if timed else t.steps, desc=f"train {run_dir.name}", unit="s" if timed else "step",
               disable=not progress, dynamic_ncols=True, initial=round(elapsed_before) if timed else step)
    start = time.perf_counter() - elapsed_before
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
        if eval_fn is None or val_clips is None or last_eval == step or not (world.main or shards):
            return
        with distributed.gathered(model):  # FSDP: the whole weights, as evaluation calls submodules directly
            metrics = evaluate(distributed.unwrap(model), eval_fn, val_clips)
        last_eval = step
        if not world.main:  # a shard holder that took part in the forward passes
            return
        logger.log({"step": step, "val": metrics})
        bar.write(f"step {step}: " + ", ".join(f"val/{k} {v:.4g}" for k, v in metrics.items()))

    def run_ckpt() -> None:
        nonlocal checkpoint, last_ckpt
        if last_ckpt == step or not (world.main or shards):
            return
        full = distributed.full_state(model, optimizer) if shards else (None, None)  # collective under FSDP
        last_ckpt = step
        if not world.main:
            return
        extra = {"config": config_to_dict(cfg), "sampler_rng": generator.get_state().tolist(), "skipped": skipped,
                 "elapsed": time.perf_counter() - start, "progress": p, "losses": finite_or_none(last_losses),
                 "data_root": str(Path(data_root).resolve())}
        checkpoint = save_checkpoint(run_dir, step, distributed.unwrap(model), optimizer, extra, stage=stage,
                                     keep_last=t.keep_last, model_state=full[0], optimizer_state=full[1],
                                     extra_tensors=ewc.tensors() if ewc is not None else None)

    try:
        while step < t.steps:
            interrupt_point()  # a Ctrl-C that Python dropped (e.g. in a finalizer) stops the run here
            elapsed = time.perf_counter() - start
            if budget > 0 and world.active:  # every rank must stop, and schedule, at the same step
                elapsed = world.from_main(elapsed)
            if budget > 0 and elapsed >= budget:
                stopped = "time"
                break
            p = progress_at(step, t.steps, elapsed, budget)
            stage = t.stage_at(step, p if budget > 0 else None)
            set_lr(optimizer, lr_at(step, t, p if budget > 0 else None))
            # every rank draws the same global batch and keeps its share: N ranks see what one process would
            try:
                if replay is None:
                    indices = torch.randint(len(train_clips), (t.batch_size,), generator=generator)
                    batch = to_device(train_clips.get(indices[world.share(t.batch_size)]), device)
                else:  # this task's clips, then replayed ones: the same global batch on every rank
                    old = replayed_count(t.batch_size, t.rehearsal_fraction)
                    indices = torch.randint(len(train_clips), (t.batch_size - old,), generator=generator)
                    mixed = replay.mix(train_clips.get(indices), old, generator)
                    batch = to_device({k: v[world.share(t.batch_size)] for k, v in mixed.items()}, device)
                model_p = t.progress_start + (1 - t.progress_start) * p  # the model's schedules (noise, existence)
                result = train_step(model, optimizer, batch, cfg=t, stage=stage, progress=model_p, world=world, ewc=ewc)
            except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
                if not out_of_memory(e):
                    raise
                raise HclsmError(f"out of memory at step {step + 1} on {device} (train.batch_size={t.batch_size}, "
                                 f"data.clip.length={cfg.data.clip.length}, model.perception.image_size="
                                 f"{cfg.model.perception.image_size}); lower "
                                 f"them or use a smaller preset") from None
            step += 1
            interval.add(result)
            if result.skipped:
                skipped, in_a_row = skipped + 1, in_a_row + 1
                what = "loss" if result.skipped == "loss" else f"gradient norm ({result.grad_norm})"
                detail = ", ".join(f"{k}={v:.4g}" for k, v in result.losses.items())
                if world.main:
                    _warn(f"step {step}: non-finite {what}; update skipped ({skipped} skipped so far); "
                          f"losses: {detail}")
                logger.log({"step": step, "event": "skipped_step", "reason": f"non-finite {result.skipped}",
                            "losses": finite_or_none(result.losses), "skipped": skipped}, scalars=False)
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
        run_ckpt()  # before the final evaluation: whatever happens there, the trained weights are kept
        if stopped != "diverged":
            run_eval()
    except BaseException:
        if created is not None and step == 0 and world.main:  # failed before training: leave no half-made run
            logger.close()
            shutil.rmtree(created, ignore_errors=True)
        raise
    finally:
        bar.close()
        logger.close()

    seconds = time.perf_counter() - start
    model = distributed.unwrap(model)
    summary = {
        "run_dir": str(run_dir), "model": cfg.model.name, "preset": cfg.preset, "device": str(device),
        "parameters": n_params, "steps": step, "planned_steps": t.steps, "stopped": stopped,
        "seconds": round(seconds, 3), "steps_per_s": round(step / max(seconds, 1e-9), 3),
        "skipped_steps": skipped, "final_losses": finite_or_none(last_losses), "val": finite_or_none(metrics),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "train_episodes": len(train_clips.episodes), "val_episodes": len(val_eps) if val_clips is not None else 0,
        "train_clips": len(train_clips), "streamed": isinstance(train_clips, StreamingClips), "processes": world.world,
        "resumed_from": str(resume_from) if resume_from is not None else None,
        "ewc_tasks": ewc.tasks if ewc is not None else 0,
        "replayed_clips": len(replay) if replay is not None else 0,
    }
    if world.main:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    if stopped == "diverged":
        raise TrainingDiverged(f"training diverged: {MAX_CONSECUTIVE_SKIPS} steps in a row had a non-finite loss or "
                               f"gradient (last at step {step}); lower train.lr or use train.precision=fp32; "
                               f"logs in {run_dir}")
    return TrainResult(run_dir=run_dir, steps=step, seconds=seconds, losses=last_losses, metrics=metrics, model=model,
                       skipped=skipped, stopped=stopped, checkpoint=checkpoint)
