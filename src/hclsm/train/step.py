"""One optimizer step, the unit the training loop repeats (and tests and callers can run alone).

``train_step`` runs the model's forward (optionally under bf16 autocast), takes the weighted sum of its
unweighted losses (``weighted_loss``), and applies backward, global-norm clipping, the optimizer, the
model's EMA target update (``update_target``) and its ``after_step`` hook (given the step's losses). With an
``ewc`` state (training on a later task of a sequence, ``hclsm.train.ewc``) its penalty joins the losses as
``ewc``.
When the loss or the gradient norm is not finite the update is skipped and the result says why;
nothing is clamped. Under data-parallel training (``world``) the losses are the mean over ranks, so
every rank makes the same decision.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from hclsm.config.train import LossWeights, TrainConfig
from hclsm.errors import ConfigError
from hclsm.train import distributed
from hclsm.utils.profiling import OPTIMIZER, scope

if TYPE_CHECKING:
    from hclsm.train.ewc import EWC


@dataclass
class StepResult:
    """One optimizer step: the weighted total, the unweighted losses (floats), the gradient norm."""

    loss: float
    losses: dict[str, float]
    grad_norm: float = math.nan
    skipped: str | None = None  # why the update was not applied ("loss" or "grad"), or None


def weighted_loss(losses: Mapping[str, torch.Tensor], weights: LossWeights, stage: int) -> torch.Tensor:
    """``sum(weight(name, stage) * loss)`` over the losses with a non-zero weight (in fp32)."""
    terms = [weights.weight(name, stage) * value.float() for name, value in losses.items()
             if weights.weight(name, stage) != 0.0]
    if not terms:
        names = ", ".join(losses) or "none"
        raise ConfigError(f"train.loss: every loss the model returned in stage {stage} ({names}) has weight 0; "
                          f"nothing would be trained, give one of them a positive weight")
    return torch.stack(terms).sum()


def micro_batches(batch: Mapping[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into ``n`` equal contiguous pieces along its first (sample) dimension."""
    size = len(next(iter(batch.values())))
    if size % n:
        raise ConfigError(f"train.accumulate: a batch of {size} samples does not split into {n} equal "
                          f"micro-batches; make train.batch_size a multiple of {n} x the number of processes")
    per = size // n
    return [{k: v[i * per:(i + 1) * per] for k, v in batch.items()} for i in range(n)]


@contextlib.contextmanager
def _grad_sync(model: nn.Module, on: bool) -> Iterator[None]:
    """Inside, a data-parallel model synchronises gradients across ranks only when ``on`` (the last
    micro-batch of a step); a single-process model is unaffected."""
    if on:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor], *,
               cfg: TrainConfig, stage: int, progress: float, world: distributed.Dist | None = None,
               ewc: EWC | None = None) -> StepResult:
    """One optimizer step on ``batch`` (already on the model's device); the update is skipped when the
    weighted loss or the gradient norm is not finite. With ``world`` (data-parallel, ``model`` in DDP)
    the reported losses are the mean over ranks, and every rank skips or applies the same step.

    With ``cfg.accumulate = n > 1`` the batch runs as ``n`` contiguous micro-batches, one forward and
    backward each (so only one micro-batch's activations are alive at a time) with their losses scaled by
    ``1/n``: the summed gradient is the mean over micro-batches, exactly as data-parallel ranks average
    theirs (under DDP the gradients are synchronised once, after the last micro-batch)."""
    world = world or distributed.Dist()
    device_type = next(model.parameters()).device.type
    optimizer.zero_grad(set_to_none=True)
    pieces = micro_batches(batch, cfg.accumulate)
    stacked, names = [], []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        with _grad_sync(model, last):
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                out = model(piece, progress=progress, stage=stage)
            losses = out if isinstance(out, Mapping) else out.losses
            if ewc is not None:  # 1/2 sum F (theta - theta*)^2, weighted by train.loss.ewc (lambda)
                losses = {**losses, "ewc": ewc.penalty(distributed.unwrap(model))}
            total = weighted_loss(losses, cfg.loss, stage)
            # a non-finite loss is still backpropagated (DDP expects the backward of every forward); its
            # gradient is discarded below with the skipped step
            (total / len(pieces) if len(pieces) > 1 else total).backward()
        names = list(losses)
        stacked.append(torch.stack([total.detach(), *(v.detach().float() for v in losses.values())]))
    mean = stacked[0] if len(stacked) == 1 else torch.stack(stacked).mean(0)
    values = world.mean(mean).tolist()  # one sync (and one collective when distributed)
    floats = dict(zip(names, values[1:]))
    if not math.isfinite(values[0]):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(values[0], floats, skipped="loss")
    with scope(OPTIMIZER):
        return _update(model, optimizer, cfg, values[0], floats)


def _update(model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, loss: float,
            floats: dict[str, float]) -> StepResult:
    """Clip, step, EMA-update and ``after_step`` once the gradients are in (skipped when the norm is not finite)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf  # inf: measure only
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if not math.isfinite(grad_norm):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, floats, grad_norm, skipped="grad")
    optimizer.step()
    update_target = getattr(distributed.unwrap(model), "update_target", None)
    if callable(update_target):
        with torch.no_grad():
            update_target(cfg.ema_tau)
    after_step = getattr(distributed.unwrap(model), "after_step", None)
    if callable(after_step):  # e.g. the causal graph's Lagrangian update, from the rank-averaged losses
        after_step(floats)
    return StepResult(loss, floats, grad_norm)


def out_of_memory(e: BaseException) -> bool:
    """An allocation failure (GPU or CPU), as opposed to any other error."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return "can't allocate memory" in text or "DefaultCPUAllocator" in text or "out of memory" in text
