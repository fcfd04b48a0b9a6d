"""Object-decomposition metrics against simulator masks: FG-ARI, mIoU, alive-count accuracy, births/deaths.

The predicted segmentation is the argmax of the decoder's alpha masks (resized to the ground-truth mask
size); the background slot is label 0. The true object count of a frame is the number of distinct
non-zero ids in its mask (objects actually visible). ``pusht_metrics`` scores PushT's two objects: agent and
block IoU against their best-matching slots, and the frames with exactly two alive object slots.

Datasets without ground-truth masks (any LeRobot dataset not written by ``hclsm data pusht``) get what can be
measured without them: the alive slots per frame, births and deaths (``MASK_METRICS`` are skipped, and
``make_eval_fn`` says so once).
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm import tqdm

from hclsm import keys
from hclsm.metrics import fg_ari, hungarian_match, miou_hungarian
from hclsm.models.objects import ObjectOutput, agent_cue
from hclsm.utils.interrupt import interrupt_point


def decomposer(model: torch.nn.Module) -> torch.nn.Module:
    """The object front end of a model (the model itself when it is one)."""
    return getattr(model, "objects", model)


def true_counts(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) number of distinct non-zero ids per frame of ``mask`` (B, T, H, W)."""
    m = mask.flatten(2).long()
    n = int(m.max()) + 1 if m.numel() else 1
    present = torch.zeros(*m.shape[:2], n, dtype=torch.bool, device=m.device)
    present.scatter_(2, m, True)
    return present[..., 1:].sum(-1)


MASK_METRICS = ("fg_ari", "fg_ari_frame", "miou", "count_frame_acc", "count_clip_ok", "count_abs_err")


def maskless_metrics(out: ObjectOutput) -> dict[str, np.ndarray]:
    """Per-clip arrays that need no ground truth: alive_slots (mean per frame), births, deaths."""
    return {"alive_slots": out.count.float().mean(1).cpu().numpy(),
            "births": out.births.sum((1, 2)).float().cpu().numpy(),
            "deaths": out.deaths.sum((1, 2)).float().cpu().numpy()}


def clip_metrics(out: ObjectOutput, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-clip arrays: fg_ari (video-level), fg_ari_frame, miou, count_frame_acc, count_clip_ok, count_abs_err,
    births, deaths."""
    seg = out.segmentation(mask.shape[-1]).cpu()
    mask = mask.cpu()
    count, truth = out.count.cpu(), true_counts(mask)
    return {
        "fg_ari": fg_ari(mask, seg, return_per_sample=True),
        "fg_ari_frame": fg_ari(mask, seg, per_frame=True, return_per_sample=True),
        "miou": miou_hungarian(mask, seg, return_per_sample=True),
        "count_frame_acc": (count == truth).float().mean(1).numpy(),
        "count_clip_ok": (count == truth).all(1).float().numpy(),
        "count_abs_err": (count - truth).abs().float().mean(1).numpy(),
        "births": out.births.sum((1, 2)).float().cpu().numpy(),
        "deaths": out.deaths.sum((1, 2)).float().cpu().numpy(),
    }


@torch.no_grad()
def evaluate_objects(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean of ``clip_metrics`` over all clips of ``batches`` (each with video and mask); batches without a
    mask (a dataset without ground truth) give ``maskless_metrics`` instead."""
    net = decomposer(model)
    was_training = net.training
    net.eval()
    rows: dict[str, list[np.ndarray]] = {}
    clips = 0
    try:
        for batch in batches:
            interrupt_point()
            cue = agent_cue(batch, net.cfg)
            out = net(batch[keys.VIDEO].to(device), cue=None if cue is None else cue.to(device))
            mask = batch.get(keys.MASK)
            metrics = clip_metrics(out, mask) if mask is not None else maskless_metrics(out)
            for name, v in metrics.items():
                rows.setdefault(name, []).append(v)
            clips += len(batch[keys.VIDEO])
    finally:
        net.train(was_training)
    res = {}
    for name, parts in rows.items():
        v = np.concatenate(parts)
        res[name] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    res["clips"] = float(clips)
    return res


def make_eval_fn(cfg, batch_size: int = 32) -> Callable:
    """``eval_fn(model, val_clips) -> metrics`` for the training loop (val_clips: ``MemoryClips``)."""

    warned = []

    def eval_fn(model: torch.nn.Module, val_clips) -> dict[str, float]:
        device = next(model.parameters()).device
        metrics = evaluate_objects(model, val_clips.batches(batch_size), device)
        if "fg_ari" not in metrics and not warned:
            warned.append(True)
            name = getattr(getattr(val_clips, "source", None), "name", "the dataset")
            tqdm.write(f"note: {name} has no ground-truth object masks, so the object metrics that need them "
                       f"({', '.join(MASK_METRICS)}) are skipped; alive_slots, births and deaths are reported",
                       file=sys.stderr)
        return metrics

    return eval_fn


@torch.no_grad()
def pusht_metrics(model: torch.nn.Module, clips) -> dict[str, float]:
    """On PushT clips with simulator masks (``MemoryClips`` or anything with ``batches(n)``): IoU of the agent (id 1) and block (id 2) masks with their best-matching slot (one-to-one, per clip), how
    peaked the alpha maps are (1 - mean normalised entropy over alive slots; 0 = uniform), and the fraction of frames
    with exactly two alive object slots (``count2_frames``: PushT's objects are the agent and the block; the goal T
    is scenery)."""
    net = decomposer(model).eval()
    ious: dict[int, list[float]] = {1: [], 2: []}
    peak, counts = [], []
    for batch in clips.batches(16):
        out = net(batch[keys.VIDEO], cue=agent_cue(batch, net.cfg))
        counts.append(out.count.flatten())
        mask = batch[keys.MASK].long()
        seg = out.segmentation(mask.shape[-1])
        for b in range(mask.shape[0]):
            t_ids, s_ids = mask[b].reshape(-1), seg[b].reshape(-1)
            slots = torch.unique(s_ids).tolist()
            table = np.array([[float(((t_ids == o) & (s_ids == s)).sum()) / max(float(((t_ids == o) | (s_ids == s)).sum()), 1.0)
                               for s in slots] for o in (1, 2)])
            rows, cols = hungarian_match(table, maximize=True)
            best = dict(zip(rows.tolist(), table[rows, cols].tolist()))
            for r, o in enumerate((1, 2)):
                ious[o].append(best.get(r, 0.0))
        a = out.alphas.float().clamp_min(1e-8)  # (B, T, K, R, R)
        ent = -(a * a.log()).sum(2) / np.log(max(int(out.alive.sum(-1).max()), 2))
        peak.append(float(1 - ent.mean()))
    return {"agent_iou": float(np.mean(ious[1])), "block_iou": float(np.mean(ious[2])),
            "agent_block_miou": float((np.mean(ious[1]) + np.mean(ious[2])) / 2), "alpha_peakedness": float(np.mean(peak)),
            "count2_frames": float((torch.cat(counts) == 2).float().mean()),
            "alive_mean": float(torch.cat(counts).float().mean())}
