"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule.

Weight decay pulls weights towards zero; that is a prior on the *matrices* of linear maps and
convolutions. On a bias, a norm's gain, an embedding table, a learned slot query or a position
embedding it only shrinks a quantity that has a meaning of its own, so those get no decay (nanoGPT's
``configure_optimizers`` keeps decay on ``dim() >= 2`` tensors; we also exempt embeddings and the
learned queries / position tables by name, whatever their shape).
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from hclsm.config.train import TrainConfig

# modules whose every parameter is a gain, a shift or a lookup table
_NO_DECAY_MODULES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.Embedding, nn.EmbeddingBag,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
# a name part that is a learned query or a position table: pos_embed, posemb, position_embedding, slot_queries,
# query, temporal_pos (but not post_norm or compose)
_NO_DECAY_NAME = re.compile(r"(^|[._])(pos|position|positional|query|queries)(emb|[._]|$)", re.IGNORECASE)


def no_decay(name: str, param: torch.Tensor, module: nn.Module) -> bool:
    """Whether parameter ``name`` (owned directly by ``module``) is exempt from weight decay."""
    vector_like = sum(d > 1 for d in param.shape) <= 1  # biases, gains, (1, 1, D) slot means, scalars
    return (vector_like or isinstance(module, _NO_DECAY_MODULES) or name.endswith("bias")
            or _NO_DECAY_NAME.search(name) is not None)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: ``decay`` (matrices) and ``no_decay`` (the rest).

    Both groups are always present (possibly empty), so the optimizer's structure, and with it a
    checkpoint's, depends only on the model. A parameter shared between modules is counted once.
    """
    decay: list[nn.Parameter] = []
    keep: list[nn.Parameter] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{module_name}.{pname}" if module_name else pname
            (keep if no_decay(full, p, module) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``param_groups(model, cfg.weight_decay)`` at the peak rate ``cfg.lr``.

    Build it after moving the model to its device; on CUDA the fused kernel is used.
    """
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=on_cuda or None)


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup rises linearly from 0 and reaches ``cfg.lr`` at step ``warmup_steps - 1`` (warmup is capped
    at ``cfg.steps``). The cosine then falls to ``cfg.lr * cfg.min_lr_ratio`` at the last step,
    ``cfg.steps - 1``. ``progress`` in [0, 1] (the loop passes ``max(step / steps, elapsed /
    budget)`` when ``cfg.max_minutes`` is set) moves the cosine on by time as well: its position is
    the larger of the step-based one and the one ``progress`` implies, so a time-limited run still
    ends at the minimum rate.
    """
    warmup = min(cfg.warmup_steps, cfg.steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, cfg.steps - 1 - warmup)  # cosine position by steps
    if progress is not None:
        p0 = warmup / cfg.steps  # the progress at which warmup ends (by steps)
        t = max(t, (progress - p0) / (1.0 - p0) if p0 < 1.0 else 1.0)
    t = min(max(t, 0.0), 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
