"""Elastic weight consolidation (Kirkpatrick et al. 2017) for training on a sequence of tasks (seed Layer 5).

After a task, ``estimate_fisher`` measures how much each parameter matters to it: the diagonal of the empirical
Fisher information, the mean over ``train.ewc_samples`` training clips of the squared gradient of the training
loss of **one** clip (the loss the task was trained with: the weighted sum of the model's losses in its final
stage). ``consolidate`` then keeps the parameters as anchors theta* beside the Fisher F, and while the next task
trains, ``EWC.penalty`` = 1/2 * sum_i F_i (theta_i - theta*_i)^2 joins the loss as ``ewc``, weighted by
lambda = ``train.loss.ewc``.

**Normalised.** The raw Fisher's scale is the loss's squared gradient scale (~5e-7 on average for the tiny HCLSM,
different for every model, loss and dataset), so a raw lambda means nothing outside the setup it was tuned on.
With ``train.ewc_normalize`` (the default) each task's Fisher is divided by its mean over all trainable
entries before it is consolidated: a parameter of average importance has F = 1, and lambda is the penalty per
unit of squared drift of such a parameter, comparable across models and datasets. Its raw mean is kept
(``EWC.scale``) and reported.

**Online over many tasks** (Schwarz et al. 2018): after each task the consolidated Fisher is
``train.ewc_decay`` * (the earlier tasks' Fisher) + (this task's), and the anchors move to the newest parameters.
A decay of 1 sums the tasks; below 1 older tasks fade, so the penalty's total weight stays bounded.

The Fisher and the anchors are tensors named ``fisher.<parameter>`` / ``anchor.<parameter>``: saved with every
checkpoint of a run that trains under them (``extra.safetensors``), so a resumed run restores its penalty.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from hclsm.config.train import TrainConfig
from hclsm.data.memory import ClipWindows
from hclsm.errors import HclsmError
from hclsm.train.step import weighted_loss

FISHER, ANCHOR = "fisher.", "anchor."


class EWC:
    """The consolidated Fisher F and anchors theta* of the tasks trained so far (per parameter name)."""

    def __init__(self, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], tasks: int = 1,
                 scale: float = 1.0):
        if set(fisher) != set(anchor):
            raise ValueError("EWC: the Fisher and the anchors must name the same parameters")
        self.fisher, self.anchor, self.tasks = dict(fisher), dict(anchor), int(tasks)
        self.scale = float(scale)  # the newest task's raw Fisher mean (1 when it was not normalised)

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """1/2 * sum F (theta - theta*)^2 over the model's parameters that have a Fisher (fp32 scalar)."""
        terms = []
        for name, p in model.named_parameters():
            f = self.fisher.get(name)
            if f is None:
                continue
            if f.device != p.device:  # moved once, on first use
                self.fisher[name], self.anchor[name] = f.to(p.device), self.anchor[name].to(p.device)
                f = self.fisher[name]
            terms.append((f * (p.float() - self.anchor[name]).pow(2)).sum())
        if not terms:
            raise HclsmError("EWC: none of the model's parameters has a Fisher estimate; it was estimated on another "
                             "model, train this one on its earlier tasks first")
        return 0.5 * torch.stack(terms).sum()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything as named tensors (for safetensors): ``fisher.*``, ``anchor.*`` and ``ewc_tasks``."""
        out = {FISHER + k: v for k, v in self.fisher.items()} | {ANCHOR + k: v for k, v in self.anchor.items()}
        return out | {"ewc_tasks": torch.tensor(self.tasks), "ewc_scale": torch.tensor(self.scale, dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> EWC | None:
        """The inverse of ``tensors``; None when they hold no EWC state."""
        if "ewc_tasks" not in tensors:
            return None
        fisher = {k[len(FISHER):]: v for k, v in tensors.items() if k.startswith(FISHER)}
        anchor = {k[len(ANCHOR):]: v for k, v in tensors.items() if k.startswith(ANCHOR)}
        scale = float(tensors["ewc_scale"]) if "ewc_scale" in tensors else 1.0
        return cls(fisher, anchor, int(tensors["ewc_tasks"]), scale)

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically to a safetensors file."""
        from hclsm.train.checkpoint import save_tensors

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            save_tensors({k: v.detach().cpu().contiguous() for k, v in self.tensors().items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> EWC:
        ewc = cls.from_tensors(load_file(path))
        if ewc is None:
            raise HclsmError(f"{path} holds no EWC state; delete it and resume again to re-estimate the Fisher")
        return ewc

    def stats(self) -> dict[str, float]:
        """Summary of the consolidated Fisher over all parameters: mean, max, the share of non-zero entries, its
        spectrum (quantiles, and the share of the total held by the top 1 % of entries), and the newest task's raw
        mean (``fisher_scale``: what normalisation divided by)."""
        return fisher_stats(self.fisher) | {"fisher_scale": self.scale, "tasks": self.tasks}


def fisher_stats(fisher: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Mean, max, non-zero share, the 50 / 90 / 99 % quantiles and the top 1 %'s share of the sum, over every entry."""
    flat = torch.cat([f.detach().flatten().float().cpu() for f in fisher.values()])
    if flat.numel() == 0:
        raise ValueError("fisher_stats: no entries")
    ordered = flat.sort().values
    n = len(ordered)
    top = ordered[n - max(1, n // 100):]
    total = float(ordered.sum())

    def q(x: float) -> float:
        return float(ordered[min(n - 1, int(x * n))])

    return {"fisher_mean": float(flat.mean()), "fisher_max": float(ordered[-1]),
            "fisher_nonzero": float((flat > 0).float().mean()), "fisher_p50": q(0.5), "fisher_p90": q(0.9),
            "fisher_p99": q(0.99), "fisher_top1_share": float(top.sum()) / total if total > 0 else 0.0}


def fisher_agreement(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Spearman rank correlation of two Fisher estimates over every entry: estimates from two disjoint halves of
    the samples agree (near 1) when the sample count is enough to rank the parameters' importance."""
    x = torch.cat([a[n].flatten().float().cpu() for n in sorted(a)])
    y = torch.cat([b[n].flatten().float().cpu() for n in sorted(a)])

    def ranks(v: torch.Tensor) -> torch.Tensor:  # float64: sums of rank products over ~1e5-1e6 entries
        r = torch.empty(len(v), dtype=torch.float64)
        r[v.argsort()] = torch.arange(len(v), dtype=torch.float64)
        return r

    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-12))


def estimate_fisher(model: nn.Module, clips: ClipWindows, cfg: TrainConfig, stage: int, samples: int | None = None,
                    seed: int | None = None, halves: bool = False
                    ) -> dict[str, torch.Tensor] | tuple[dict[str, torch.Tensor], ...]:
    """Diagonal empirical Fisher of ``model`` on ``clips``: the mean over ``samples`` clips (default
    ``cfg.ewc_samples``, drawn without replacement with ``seed``, default ``cfg.seed``) of the squared gradient of
    the clip's training loss in ``stage`` (as ``train_step`` weighs it, in fp32, at the end of the schedules).

    The model runs in train mode (the loss it was trained on) inside a forked RNG seeded with ``seed``: the
    estimate depends only on the weights, the clips and the seed, and the caller's random streams are untouched.
    Returns fp32 tensors on the parameters' device, keyed by parameter name; with ``halves`` also the estimates
    of the first and the second half of the samples (``(whole, first, second)``, for ``fisher_agreement``)."""
    samples = cfg.ewc_samples if samples is None else samples
    seed = cfg.seed if seed is None else seed
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    first: dict[str, torch.Tensor] = {}
    device = next(iter(params.values())).device
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed))[:samples]
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for j, i in enumerate(order.tolist()):
            if halves and j == len(order) // 2:
                first = {n: f.clone() for n, f in fisher.items()}
            batch = {k: v.to(device) for k, v in clips.get(torch.tensor([i])).items()}
            out = model(batch, progress=1.0, stage=stage)
            loss = weighted_loss(out if isinstance(out, Mapping) else out.losses, cfg.loss, stage)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.float().pow(2)
    model.train(was_training)
    whole = {n: f / max(len(order), 1) for n, f in fisher.items()}
    if not halves:
        return whole
    m = len(order) // 2
    if m == 0:
        raise ValueError("estimate_fisher: halves need at least two samples")
    return (whole, {n: f / m for n, f in first.items()},
            {n: (fisher[n] - first[n]) / (len(order) - m) for n in fisher})


def consolidate(previous: EWC | None, model: nn.Module, fisher: Mapping[str, torch.Tensor], normalize: bool = True,
                decay: float = 1.0) -> EWC:
    """The EWC state after one more task: its ``fisher`` (divided by its mean over every entry when
    ``normalize``) added to ``decay`` times the earlier tasks' (when there are any), the anchors set to the
    model's parameters now."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"consolidate: decay must be in [0, 1], got {decay}")
    anchor = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in fisher}
    scale = fisher_stats(fisher)["fisher_mean"] if fisher else 0.0
    if normalize and not scale > 0:
        raise HclsmError("EWC: the task's Fisher is zero everywhere (no parameter moved its loss), so it cannot be "
                         "normalised; train the task longer or set train.ewc_normalize=false")
    div = scale if normalize else 1.0
    total = {n: f.detach().float() / div for n, f in fisher.items()}
    if previous is not None:
        for n, f in previous.fisher.items():
            if n in total:
                total[n] += decay * f.to(total[n].device)
    return EWC(total, anchor, 1 + (previous.tasks if previous is not None else 0), scale if normalize else 1.0)
