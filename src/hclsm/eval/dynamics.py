"""Evaluation of HCLSM's dynamics on held-out clips: rollouts against the copy-last baseline, the event
detector against the simulator's contact events, and pictures.

* ``rollout_metrics``: each clip's first ``context`` frames are rolled out ``horizon`` steps
  (``HCLSM.rollout``). **Frame error**: MSE of the decoded prediction against the decoder's targets of the
  true future frames (the frames resized to ``model.decoder.resolution`` by area interpolation; for a
  feature-target model, the EMA encoder's features), per step and averaged over the horizon, beside the
  **copy-last baseline** (the last context frame's target repeated). **Latent error**: MSE of the
  predicted slots against the slots the object layers infer from the true clip, matched per frame by
  Sinkhorn on slot and position (as ``hclsm.models.hclsm.align_targets``; the background slot matches the
  background), over the slots alive in both; beside it the last context slots repeated (copy-last slots).
* ``event_metrics``: the event gate of the dynamics run over the whole clip (``clip_events``) against the
  true events (``keys.EVENTS``; for PushT, the onsets of agent-block contact): precision / recall / F1 with a
  ±1 step tolerance (``hclsm.metrics.events.event_prf``) and events per clip (``score_events``).
* ``write_eval``: both on the non-overlapping held-out clips of a dataset, the pictures of a few of them,
  and ``metrics.json``, written as one directory that appears complete or not at all.
* ``load_run``: a run's config and its model with the newest checkpoint loaded strictly (any run ``hclsm.runs.Run``
  reads, a demo's included).
"""
from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from hclsm import keys
from hclsm.config import Config
from hclsm.config.data import ClipConfig
from hclsm.data.clips import split_episodes
from hclsm.data.memory import MemoryClips, open_dataset
from hclsm.errors import DataError, HclsmError
from hclsm.metrics.events import event_prf
from hclsm.models.dynamics import DynamicsOutput
from hclsm.models.hclsm import HCLSM, POSITION_MATCH_WEIGHT, Rollout
from hclsm.models.objects import ObjectOutput, agent_cue
from hclsm.nn.events import EventOutput
from hclsm.nn.matching import permute, sinkhorn_match
from hclsm.runs import Run
from hclsm.utils.atomic import atomic_output_dir
from hclsm.utils.jsonsafe import finite_or_none
from hclsm.viz import save_png
from hclsm.viz.dynamics import counterfactual_figure, event_timeline, rollout_figure, slot_pca_figure
from hclsm.utils.interrupt import interrupt_point

EVAL_BATCH = 8
TOLERANCE = 1  # steps an event prediction may be off the true event


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[torch.device]:
    """``model`` in eval mode without gradients for the block (its mode restored after); yields its device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _nanmean(v: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """Mean over the finite entries (NaN where there are none), without numpy's empty-slice warning."""
    ok = np.isfinite(v)
    n = ok.sum(axis)
    total = np.where(ok, v, 0.0).sum(axis)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)


# ---- rollouts ---------------------------------------------------------------------------------------

def _match(ref_slots: torch.Tensor, ref_pos: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, bg: int
           ) -> torch.Tensor:
    """Permutation (B*H, K) putting ``slots`` (B, H, K, d) in the order of ``ref_slots`` frame by frame (the
    cost of ``align_targets``); the first ``bg`` (background) slots stay in place."""
    def features(s: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.normalize(s[:, :, bg:].float(), dim=-1), POSITION_MATCH_WEIGHT * p[:, :, bg:].float()],
                         dim=-1).flatten(0, 1)

    perm = sinkhorn_match(features(ref_slots, ref_pos), features(slots, pos)) + bg
    fixed = torch.arange(bg, device=perm.device).expand(perm.shape[0], bg)
    return torch.cat([fixed, perm], dim=1)


def latent_error(slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, truth: ObjectOutput
                 ) -> torch.Tensor:
    """(B, H) slot MSE of ``slots`` / ``positions`` (B, H, K, ·) against ``truth``'s last H frames, matched per
    frame, over the slots alive in ``alive`` (B, K) and alive in the truth; NaN for a frame with none."""
    b, h, k, d = slots.shape
    t_slots, t_pos, t_alive = truth.slots[:, -h:], truth.positions[:, -h:], truth.alive[:, -h:]
    perm = _match(slots, positions, t_slots, t_pos, int(truth.has_background))
    matched = permute(t_slots.flatten(0, 1), perm).reshape(b, h, k, d)
    matched_alive = permute(t_alive.flatten(0, 1), perm).reshape(b, h, k)
    w = (alive[:, None] & matched_alive).float()
    err = ((slots.float() - matched.float()).pow(2).mean(-1) * w).sum(-1)
    n = w.sum(-1)
    return torch.where(n > 0, err / n.clamp_min(1.0), torch.full_like(err, float("nan")))


def rollout_errors(model: nn.Module, batch: Mapping[str, torch.Tensor], context: int, horizon: int
                   ) -> tuple[dict[str, torch.Tensor], Rollout, ObjectOutput]:
    """One batch: per-clip, per-step (B, H) errors ``frame_mse``, ``frame_mse_copy_last``, ``latent_mse``,
    ``latent_mse_copy_last``; the rollout; and the object decomposition of the whole clip (the truth).

    The batch's clips need ``context + horizon`` frames (more are cut); its actions, when the model takes
    actions and the batch has them, drive the rollout (zeros otherwise, as in training).
    """
    video = batch[keys.VIDEO]
    n = context + horizon
    if video.shape[1] < n:
        raise ValueError(f"clips of {video.shape[1]} frames are too short for context {context} + horizon {horizon}")
    video = video[:, :n]
    action = batch.get(keys.ACTION) if model.cfg.d_action > 0 else None
    cue = agent_cue(batch, model.cfg)
    cue = None if cue is None else cue[:, :n]
    roll = model.rollout(video[:, :context], horizon, None if action is None else action[:, :n - 1],
                         cue=None if cue is None else cue[:, :context])
    truth = model.objects(video, cue=cue)
    target = truth.target[:, context:].float()  # (B, H, C, R, R)
    last = truth.target[:, context - 1:context].float()
    copy_slots = roll.context.slots[:, -1:].expand_as(roll.slots)
    copy_pos = roll.context.positions[:, -1:].expand_as(roll.positions)
    errors = {
        "frame_mse": (roll.frames.float() - target).pow(2).flatten(2).mean(-1),
        "frame_mse_copy_last": (last - target).pow(2).flatten(2).mean(-1),
        "latent_mse": latent_error(roll.slots, roll.positions, roll.alive, truth),
        "latent_mse_copy_last": latent_error(copy_slots, copy_pos, roll.alive, truth),
    }
    return errors, roll, truth


def rollout_metrics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], context: int, horizon: int
                    ) -> dict[str, Any]:
    """Rollout errors over every clip of ``batches`` (see the module docstring).

    Returns ``clips``, ``context``, ``horizon`` and, for each of ``frame_mse``, ``frame_mse_copy_last``,
    ``latent_mse`` and ``latent_mse_copy_last``, the mean over clips of the per-clip horizon mean (a float)
    and ``NAME_per_step``, the mean over clips at each step t+1 .. t+H (a list). NaN where no slot was alive.
    """
    parts: dict[str, list[np.ndarray]] = {}
    with _evaluating(model) as device:
        for batch in batches:
            interrupt_point()
            errors, _, _ = rollout_errors(model, _to(batch, device), context, horizon)
            for name, v in errors.items():
                parts.setdefault(name, []).append(v.cpu().numpy())
    if not parts:
        raise ValueError("rollout_metrics got no batches")
    res: dict[str, Any] = {"clips": sum(len(p) for p in parts["frame_mse"]), "context": context, "horizon": horizon}
    for name, chunks in parts.items():
        v = np.concatenate(chunks).astype(np.float64)  # (N, H)
        res[name] = float(_nanmean(_nanmean(v, axis=1)))
        res[f"{name}_per_step"] = [float(x) for x in _nanmean(v, axis=0)]
    return res


# ---- events -----------------------------------------------------------------------------------------

def true_events(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """(B, T) bool true events of a batch: ``keys.EVENTS`` (physics collisions), else the onsets of agent-block
    contact (``keys.CONTACT``, PushT: contact at t and not at t - 1); None when the dataset has neither."""
    if keys.EVENTS in batch:
        return batch[keys.EVENTS].bool()
    if keys.CONTACT in batch:
        c = batch[keys.CONTACT].bool()
        return torch.cat([torch.zeros_like(c[:, :1]), c[:, 1:] & ~c[:, :-1]], dim=1)
    return None


def clip_events(model: nn.Module, batch: Mapping[str, torch.Tensor], truth: ObjectOutput | None = None
                ) -> EventOutput:
    """The event detector of ``clip_dynamics``."""
    return clip_dynamics(model, batch, truth).events


def clip_dynamics(model: nn.Module, batch: Mapping[str, torch.Tensor], truth: ObjectOutput | None = None
                  ) -> DynamicsOutput:
    """The dynamics run over whole clips, as in the stage-2 forward pass (zero actions for an action-conditioned
    model on a dataset without them), on ``truth``, the clips' object decomposition (computed when not given)."""
    video = batch[keys.VIDEO]
    truth = model.objects(video, cue=agent_cue(batch, model.cfg)) if truth is None else truth
    action = None
    if model.cfg.d_action > 0:
        action = batch.get(keys.ACTION)
        action = video.new_zeros(*video.shape[:2], model.cfg.d_action) if action is None else action[:, :video.shape[1]]
    return model.dynamics(truth.slots, truth.positions, truth.gate, action)


def score_events(fired: torch.Tensor, prob: torch.Tensor, truth: torch.Tensor | None, tolerance: int = TOLERANCE
                 ) -> dict[str, Any]:
    """Event scores of N clips from their gate firings ``fired`` (N, T) bool, probabilities ``prob`` (N, T) and
    true events ``truth`` (N, T) bool or None.

    Returns ``clips``, ``events_per_clip``, ``event_prob`` (mean probability) and, with ``truth``,
    ``true_events_per_clip`` and micro-averaged ``event_precision``, ``event_recall`` and ``event_f1`` with a
    ±``tolerance`` step window (``hclsm.metrics.events.event_prf``).
    """
    res: dict[str, Any] = {"clips": len(fired), "events_per_clip": float(fired.sum(1).float().mean()),
                           "event_prob": float(prob.float().mean())}
    if truth is not None:
        prf = event_prf(truth, fired, tolerance)
        res |= {"true_events_per_clip": float(truth.sum(1).float().mean()), "event_precision": prf["precision"],
                "event_recall": prf["recall"], "event_f1": prf["f1"]}
    return res


def event_metrics(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], tolerance: int = TOLERANCE
                  ) -> dict[str, Any]:
    """``score_events`` of the event gate of ``clip_events`` over every clip of ``batches`` against
    ``true_events`` (left out when a batch has none)."""
    fired, probs, truths = [], [], []
    with _evaluating(model) as device:
        for batch in batches:
            interrupt_point()
            events = clip_events(model, _to(batch, device))
            fired.append((events.gate > 0.5).cpu())
            probs.append(events.prob.cpu())
            truths.append(true_events(batch))
    if not fired:
        raise ValueError("event_metrics got no batches")
    truth = torch.cat(truths) if all(t is not None for t in truths) else None
    return score_events(torch.cat(fired), torch.cat(probs), truth, tolerance)


# ---- runs and the eval directory --------------------------------------------------------------------

def load_run(run_dir: str | os.PathLike | Run) -> tuple[Config, nn.Module, dict[str, Any]]:
    """A run's config, its model with the newest checkpoint loaded strictly, and the checkpoint's ``state.json``
    (with ``path``). ``run_dir`` is any run ``hclsm.runs.Run`` reads: ``hclsm train``'s, ``hclsm demo``'s (its
    ``train/stage2``) or a continual run's (its last task). Raises ``HclsmError`` naming the fix for a missing run
    directory, a run without checkpoints, or a model without dynamics."""
    from hclsm.models import build_model
    from hclsm.train.checkpoint import load_checkpoint

    run = run_dir if isinstance(run_dir, Run) else Run(run_dir)
    ckpt = run.require_checkpoint()
    cfg = run.config
    model = build_model(cfg.model)
    if not isinstance(model, HCLSM):
        raise HclsmError(f"run {run.path} trained model {cfg.model.name!r}; hclsm eval evaluates HCLSM's dynamics: "
                         f"pass a run of --model hclsm")
    state = load_checkpoint(ckpt, model)
    return cfg, model, state


def _check_out(out: Path) -> None:
    """The eval directory is replaced as a whole, so it must be new, empty, or an earlier eval's."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "metrics.json").is_file())):
        raise HclsmError(f"--out {out} exists and is not an earlier `hclsm eval` output (no metrics.json); it "
                         f"would be replaced: choose another --out")


def _picked(n_windows: int, clips: int) -> list[int]:
    """Up to ``clips`` window indices spread evenly over ``n_windows`` (windows come in episode order)."""
    return sorted({int(i) for i in np.linspace(0, n_windows - 1, min(clips, n_windows)).round()}) if clips else []


def write_eval(model: nn.Module, data_root: str | os.PathLike, out_dir: str | os.PathLike, context: int, horizon: int,
               clips: int, *, val_fraction: float = 0.0, seed: int = 0, frame_skip: int = 1,
               batch_size: int = EVAL_BATCH, progress: bool = False, meta: Mapping[str, Any] | None = None,
               counterfactual: bool = False) -> dict[str, Any]:
    """Evaluate ``model`` on the dataset at ``data_root`` and write ``out_dir``; returns what ``metrics.json`` holds.

    The clips are the non-overlapping windows of ``context + horizon`` frames (every ``frame_skip``-th) of
    the held-out episodes: ``split_episodes(n, val_fraction, seed)``, the training loop's split (all
    episodes when ``val_fraction`` is 0). ``out_dir`` gets, for ``clips`` of them spread over the episodes,
    ``clipN_rollout.png`` (pixel models), ``clipN_events.png`` and ``clipN_slots_pca.png``, and
    ``metrics.json`` with ``rollout`` (``rollout_metrics``), ``events`` (``event_metrics``), the clips shown
    and ``meta``. With ``counterfactual`` (a physics dataset with twins) it also holds ``counterfactual``
    (``hclsm.eval.counterfactual.summarise`` over the held-out episodes' twins) and ``cfN_KIND.png`` shows
    ``clips`` of them (factual truth and prediction, the intervened prediction, the re-simulated truth). It
    is built aside and renamed into place (an earlier eval there is replaced).

    Raises ``DataError`` when the dataset is missing or its held-out episodes are shorter than a clip, and
    ``HclsmError`` for bad numbers or an ``out_dir`` that is something else.
    """
    if context < 1 or horizon < 1 or clips < 0:
        raise HclsmError(f"need --context >= 1, --horizon >= 1 and --clips >= 0, got {context}, {horizon}, {clips}")
    out = Path(out_dir)
    _check_out(out)
    source = open_dataset(data_root)
    if counterfactual and not getattr(source, "meta", {}).get("counterfactual"):  # only physics datasets have twins
        raise DataError(f"{data_root}: --counterfactual needs a physics dataset with counterfactual twins; generate "
                        f"one with `hclsm data physics` (data.physics.counterfactual is on by default)")
    lengths = [int(n) for n in source.episode_lengths]
    held_out = val_fraction > 0 and len(lengths) > 1
    episodes = split_episodes(len(lengths), val_fraction, seed)[1] if held_out else list(range(len(lengths)))
    n = context + horizon
    span = (n - 1) * frame_skip + 1
    longest = max((lengths[e] for e in episodes), default=0)
    if longest < span:
        raise DataError(f"{source.name}: --context {context} + --horizon {horizon} frames (frame_skip {frame_skip}) "
                        f"span {span} frames but the longest {'held-out ' if held_out else ''}episode has {longest}; "
                        f"lower --context or --horizon")
    data = MemoryClips(source, ClipConfig(length=n, frame_skip=frame_skip, stride=n * frame_skip), episodes,
                       model.cfg.perception.image_size, progress=progress)
    n_batches = -(-len(data) // batch_size)

    def walk(desc: str) -> Iterator[dict[str, torch.Tensor]]:
        return tqdm(data.batches(batch_size), desc=desc, total=n_batches, unit="batch", disable=not progress,
                    leave=False)

    record: dict[str, Any] = {"context": context, "horizon": horizon, "frame_skip": frame_skip,
                              "episodes": episodes, "held_out": held_out,
                              "rollout": rollout_metrics(model, walk("rollouts"), context, horizon),
                              "events": event_metrics(model, walk("events"))}
    picks = _picked(len(data), clips)
    pictures: dict[str, np.ndarray] = {}
    shown = []
    if picks:
        batch = data.get(picks)
        truth_events = true_events(batch)
        with _evaluating(model) as device:
            on_device = _to(batch, device)
            _, roll, truth = rollout_errors(model, on_device, context, horizon)
            events = clip_events(model, on_device, truth)
        pixels = model.cfg.decoder.target == "pixels"
        for i in range(len(picks)):
            ep, frames = int(batch[keys.EPISODE][i]), batch[keys.FRAMES][i].tolist()
            where = f"episode {ep}, frames {frames[0]}-{frames[-1]}"
            shown.append({"episode": ep, "frames": frames})
            if pixels:  # a feature-target model decodes features: no frames to show
                pictures[f"clip{i + 1}_rollout.png"] = rollout_figure(
                    truth.target[i, context:], roll.frames[i], truth.target[i, :context])
            pictures[f"clip{i + 1}_events.png"] = event_timeline(
                events.prob[i], events.gate[i], float(events.threshold),
                None if truth_events is None else truth_events[i], title=f"{where}: event probability per step")
            pictures[f"clip{i + 1}_slots_pca.png"] = slot_pca_figure(
                truth.slots[i], truth.alive[i], roll.slots[i], background=truth.has_background,
                title=f"{where}: slot trajectories (PCA), rollout dashed")
    if counterfactual:
        record["counterfactual"] = _counterfactuals(model, data_root, episodes, context, horizon, clips, pictures)
    record |= {"shown": shown, "pictures": sorted(pictures), **(meta or {})}
    record = finite_or_none(record)
    with atomic_output_dir(out, overwrite=True) as tmp:
        for name, image in pictures.items():
            save_png(image, tmp / name)
        (tmp / "metrics.json").write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
    return record


def _counterfactuals(model: nn.Module, data_root: str | os.PathLike, episodes: list[int], context: int, horizon: int,
                     clips: int, pictures: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counterfactual rollouts on the twins of ``episodes`` (summary), drawing ``clips`` of them into ``pictures``."""
    from hclsm.eval.counterfactual import counterfactual_cases, summarise

    with _evaluating(model):
        cases, unmatched = counterfactual_cases(model, data_root, episodes, context, horizon)
    for i in _picked(len(cases), clips):
        c = cases[i]
        pictures[f"cf{i + 1}_{c.kind}.png"] = counterfactual_figure(
            c.context, c.factual, c.plain.frames[0], c.intervened.frames[0], c.twin, what=c.kind)
    return summarise(cases, unmatched)
