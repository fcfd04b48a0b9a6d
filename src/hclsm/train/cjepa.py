"""Training the C-JEPA predictor on slot sequences (from a frozen object model or a user's slot file).

Every window of ``history + future`` consecutive frames of every sequence is a sample; an epoch visits
each once in a shuffled order. Per step: a fresh hidden-slot set per sample (``draw_mask``), the masked
and future losses, the learned graph's sparsity / acyclicity terms (``graph_gate``), and from
``ctt.start_epoch`` on the CTT losses on the selected graph. AdamW (no decay on norms, biases, the mask
token and the time table) with linear warmup and a cosine decay, gradient clipping. The run is
reproducible from ``cfg.seed`` on a given device.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from hclsm.config.cjepa import CJEPAConfig
from hclsm.config.train import TrainConfig
from hclsm.data.slots import SlotSequences
from hclsm.errors import DataError
from hclsm.models.cjepa import (
    MaskedSlotPredictor, attention_graph, ctt_losses, learned_graph, prediction_losses,
)
from hclsm.train.loop import TrainingDiverged
from hclsm.train.optim import lr_at, param_groups, set_lr
from hclsm.utils.interrupt import interrupt_point


@dataclass
class CJEPAResult:
    model: MaskedSlotPredictor
    steps: int
    seconds: float
    losses: dict[str, float]  # each loss term averaged over the last epoch
    # density of the CTT graph (edges / ordered pairs of alive slots) over the last epoch; the attention
    # graph's is measured for every run, also with the CTT losses off
    graph_density: float
    history: list[dict[str, float]] = field(default_factory=list)  # the per-epoch means


def slot_windows(frames: np.ndarray | list[int], length: int) -> np.ndarray:
    """(M, 2) int64 ``[sequence, start]`` of every window of ``length`` frames in sequences of ``frames``."""
    rows = [(i, s) for i, f in enumerate(frames) for s in range(int(f) - length + 1)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


def gather(a: torch.Tensor | None, win: torch.Tensor, length: int) -> torch.Tensor | None:
    """Windows ``win`` (B, 2) of a (N, T, ...) tensor -> (B, length, ...)."""
    if a is None:
        return None
    t = win[:, 1:] + torch.arange(length, device=a.device)  # (B, L)
    return a[win[:, :1], t]


def edge_counts(graph: torch.Tensor, alive0: torch.Tensor) -> tuple[float, float]:
    """(edges, ordered pairs of distinct alive slots) of (B, S, S) graphs."""
    n = alive0.sum(-1).float()
    return float(graph.sum()), float((n * (n - 1)).sum())


def train_cjepa(seqs: SlotSequences, cfg: CJEPAConfig, device: str | torch.device = "cpu",
                progress: bool = True) -> CJEPAResult:
    """Train a ``MaskedSlotPredictor`` on every window of ``seqs``; see the module docstring."""
    device = torch.device(device)
    windows = slot_windows([seqs.frames] * len(seqs), cfg.window)
    if len(windows) == 0:
        raise DataError(f"the slot sequences have {seqs.frames} frames, fewer than a window of cjepa.history + "
                        f"cjepa.future = {cfg.window}; lower them or give longer sequences")
    for name, dim in (("action", cfg.action_dim), ("proprio", cfg.proprio_dim)):
        a = getattr(seqs, name)
        if dim and (a is None or a.shape[-1] != dim):
            got = "none" if a is None else a.shape[-1]
            raise DataError(f"cjepa.{name}_dim is {dim} but the slot sequences' {name} width is {got}; "
                            f"set cjepa.{name}_dim to match or 0")
    torch.manual_seed(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)  # hidden slots and CTT picks
    order_gen = torch.Generator().manual_seed(cfg.seed)
    model = MaskedSlotPredictor(seqs.slots.shape[-1], cfg).to(device)
    model.set_normaliser(seqs.slots.to(device), seqs.alive.to(device))
    slots, alive = seqs.slots.to(device), seqs.alive.to(device).bool()
    action = seqs.action.to(device) if cfg.action_dim else None
    proprio = seqs.proprio.to(device) if cfg.proprio_dim else None
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    per_epoch = math.ceil(len(windows) / cfg.batch_size)
    total = cfg.epochs * per_epoch
    sched = TrainConfig(lr=cfg.lr, steps=total, warmup_steps=min(cfg.warmup_steps, total))
    win_all = torch.from_numpy(windows).to(device)
    th, step, history = cfg.history, 0, []
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="train cjepa", unit="step", disable=not progress, leave=False)
    model.train()
    for epoch in range(cfg.epochs):
        sums: dict[str, float] = defaultdict(float)
        edges = pairs = 0.0
        for idx in torch.randperm(len(windows), generator=order_gen).split(cfg.batch_size):
            interrupt_point()
            win = win_all[idx.to(device)]
            x, live = gather(slots, win, cfg.window), gather(alive, win, cfg.window)
            nodes = {"action": gather(action, win, cfg.window), "proprio": gather(proprio, win, cfg.window)}
            mask = model.draw_mask(live[:, 0], generator=gen)
            out = model(x, live, mask, **nodes)
            losses = prediction_losses(model, out, x, live, nodes["proprio"])
            if model.graph is not None:
                losses |= model.graph.losses(out.graph, live[:, :th])
            graph = learned_graph(out) if cfg.ctt.graph == "learned" else attention_graph(
                out.attention, live[:, 0], th, cfg.ctt.attention_threshold)
            e, p = edge_counts(graph, live[:, 0])
            edges, pairs = edges + e, pairs + p
            ctt_on = cfg.ctt.enabled and epoch >= cfg.ctt.start_epoch
            if ctt_on:
                losses |= ctt_losses(model, out, graph, x, live, gen, **nodes)
            loss = sum(v for k, v in losses.items() if k not in ("acyclicity", "ctt_inv", "ctt_suf"))
            if ctt_on:
                loss = loss + cfg.ctt.inv_weight * losses["ctt_inv"] + cfg.ctt.suf_weight * losses["ctt_suf"]
            if not torch.isfinite(loss):
                shown = {k: float(v) for k, v in losses.items()}
                raise TrainingDiverged(f"cjepa: non-finite loss at step {step} ({shown})")
            set_lr(opt, lr_at(step, sched))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if model.graph is not None:
                model.graph.after_step(float(losses["acyclicity"]))
            for k, v in losses.items():
                sums[k] += float(v.detach())
            sums["loss"] += float(loss.detach())
            step += 1
            bar.update(1)
        history.append({k: v / per_epoch for k, v in sums.items()} | {"graph_density": edges / max(pairs, 1.0)})
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
    bar.close()
    model.eval()
    last = dict(history[-1])
    density = last.pop("graph_density")
    return CJEPAResult(model, step, time.perf_counter() - t0, last, density, history)
