"""Elastic weight consolidation (Kirkpatrick et al. 2017) for training on a sequence of tasks (seed Layer 5).

After a task, ``estimate_fisher`` measures how much each parameter matters to it: the diagonal of the empirical
Fisher information, the mean over ``train.ewc_samples`` training clips of the squared gradient of the training
loss of **one** clip (the loss the task was trained with: the weighted sum of the model's losses in its final
stage). ``consolidate`` then keeps the parameters as anchors theta* beside the Fisher F, and while the next task
trains, ``EWC.penalty`` = 1/2 * sum_i F_i (theta_i - theta*_i)^2 joins the loss as ``ewc``, weighted by
lambda = ``train.loss.ewc``. Over several tasks the Fisher of each finished task is added to the sum of the
earlier ones and the anchors move to the newest parameters (online EWC, Schwarz et al. 2018, without decay).

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

    def __init__(self, fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor], tasks: int = 1):
        if set(fisher) != set(anchor):
            raise ValueError("EWC: the Fisher and the anchors must name the same parameters")
        self.fisher, self.anchor, self.tasks = dict(fisher), dict(anchor), int(tasks)

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
        return out | {"ewc_tasks": torch.tensor(self.tasks)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> EWC | None:
        """The inverse of ``tensors``; None when they hold no EWC state."""
        if "ewc_tasks" not in tensors:
            return None
        fisher = {k[len(FISHER):]: v for k, v in tensors.items() if k.startswith(FISHER)}
        anchor = {k[len(ANCHOR):]: v for k, v in tensors.items() if k.startswith(ANCHOR)}
        return cls(fisher, anchor, int(tensors["ewc_tasks"]))

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
        """Summary of the Fisher: its mean, max and the share of non-zero entries over all parameters."""
        flat = torch.cat([f.flatten() for f in self.fisher.values()])
        return {"fisher_mean": float(flat.mean()), "fisher_max": float(flat.max()),
                "fisher_nonzero": float((flat > 0).float().mean()), "tasks": self.tasks}


def estimate_fisher(model: nn.Module, clips: ClipWindows, cfg: TrainConfig, stage: int, samples: int | None = None,
                    seed: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of ``model`` on ``clips``: the mean over ``samples`` clips (default
    ``cfg.ewc_samples``, drawn without replacement with ``seed``, default ``cfg.seed``) of the squared gradient of
    the clip's training loss in ``stage`` (as ``train_step`` weighs it, in fp32, at the end of the schedules).

    The model runs in train mode (the loss it was trained on) inside a forked RNG seeded with ``seed``: the
    estimate depends only on the weights, the clips and the seed, and the caller's random streams are untouched.
    Returns fp32 tensors on the parameters' device, keyed by parameter name."""
    samples = cfg.ewc_samples if samples is None else samples
    seed = cfg.seed if seed is None else seed
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    device = next(iter(params.values())).device
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(seed))[:samples]
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in order.tolist():
            batch = {k: v.to(device) for k, v in clips.get(torch.tensor([i])).items()}
            out = model(batch, progress=1.0, stage=stage)
            loss = weighted_loss(out if isinstance(out, Mapping) else out.losses, cfg.loss, stage)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.float().pow(2)
    model.train(was_training)
    return {n: f / max(len(order), 1) for n, f in fisher.items()}


def consolidate(previous: EWC | None, model: nn.Module, fisher: Mapping[str, torch.Tensor]) -> EWC:
    """The EWC state after one more task: its ``fisher`` added to the earlier tasks' (when there are any), the
    anchors set to the model's parameters now."""
    anchor = {n: p.detach().float().clone() for n, p in model.named_parameters() if n in fisher}
    total = {n: f.detach().clone() for n, f in fisher.items()}
    if previous is not None:
        for n, f in previous.fisher.items():
            if n in total:
                total[n] += f.to(total[n].device)
    return EWC(total, anchor, 1 + (previous.tasks if previous is not None else 0))
