"""``hclsm demo``: the main job, end to end on CPU.

1. **Data.** PushT episodes from the real gym-pusht simulator (``cfg.data.pusht``), written as a
   LeRobot v3 dataset in ``data/pusht/``, with a picture of frames and ground-truth masks.
2. **Stage 1 of HCLSM.** The object layers (perception, slot attention with existence / birth / death,
   the spatial broadcast decoder) are trained with ``hclsm.train.train`` for a wall-clock budget
   (``--minutes``; default ``train.max_minutes`` when set, else ``DEFAULT_MINUTES``), at most
   ``train.steps`` steps. The run (config, logs, TensorBoard, checkpoint, summary) is ``train/``.
3. **Evaluation on held-out episodes** (the training loop's own split, ``train.val_fraction`` and
   ``train.seed``): agent and block IoU against the simulator's masks, FG-ARI and mIoU, how peaked the
   alpha masks are, the SBD and diversity losses beside the seed's indicators (< 0.01, < 0.15), and
   the number of alive slots against the number of visible objects; the same model untrained (step 0,
   same initialisation) is the baseline.
4. **Report.** ``report.md`` with the metrics, pictures (slot masks over frames for two held-out clips,
   segmentation against ground truth, alpha heat maps, alive slots per frame) and a plain statement of
   which stages ran; ``metrics.json`` has every number.

Everything is written into a temporary directory renamed to ``OUT/NAME`` at the end
(``atomic_output_dir``): a failure or Ctrl-C leaves no half-written run, and an earlier run of the
same name is replaced only by a complete one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hclsm import keys
from hclsm.bench.objects import pusht_metrics
from hclsm.config import Config, save_config
from hclsm.config.data import ClipConfig
from hclsm.data.clips import split_episodes
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.memory import MemoryClips
from hclsm.data.pusht import generate_pusht_dataset
from hclsm.demo_report import SEED_DIVERSITY, SEED_SBD, render_report
from hclsm.errors import HclsmError
from hclsm.eval.objects import decomposer, evaluate_objects, true_counts
from hclsm.models import build_model
from hclsm.train import train
from hclsm.train.loop import seed_everything
from hclsm.utils.atomic import atomic_output_dir, atomic_write_text
from hclsm.viz import (
    alive_count_figure,
    alpha_heatmaps,
    frame_strip,
    overlay,
    save_png,
    segmentation_figure,
    slot_masks_figure,
    to_uint8_frames,
)

DEFAULT_MINUTES = 6.0  # training budget when neither --minutes nor train.max_minutes is given
EVAL_BATCH = 16
TRAIN_CLIP = 4  # frames per training clip in the demo (at most data.clip.length)


def check_run_name(name: str) -> None:
    """A run name is one plain directory name (it is replaced on every run, so never a path)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise HclsmError(f"--name {name!r} is not a plain directory name; use e.g. --name demo "
                         f"(the run directory OUT/NAME is replaced on every run)")


def demo_minutes(cfg: Config, minutes: float | None = None) -> float:
    """The training budget in minutes: ``minutes``, else ``train.max_minutes`` when > 0, else the default."""
    if minutes is None:
        return cfg.train.max_minutes if cfg.train.max_minutes > 0 else DEFAULT_MINUTES
    if not (isinstance(minutes, (int, float)) and math.isfinite(minutes) and minutes > 0):
        raise HclsmError(f"--minutes must be a positive number of minutes, got {minutes!r}")
    return float(minutes)


def demo_config(cfg: Config, minutes: float) -> Config:
    """``cfg`` set up for the demo's training: stage 1 only (the objects), for ``minutes`` of wall clock.

    Raises ``HclsmError`` when nothing can be held out for evaluation (fewer than two episodes, or
    ``train.val_fraction`` = 0).
    """
    if cfg.data.pusht.episodes < 2 or cfg.train.val_fraction <= 0:
        raise HclsmError(f"the demo evaluates on held-out episodes: it needs data.pusht.episodes >= 2 (got "
                         f"{cfg.data.pusht.episodes}) and train.val_fraction > 0 (got {cfg.train.val_fraction})")
    t = dataclasses.replace(cfg.train, stage=1, stage1_fraction=1.0, max_minutes=minutes)
    # stage 1 learns per-frame objects (slots carried over between frames): short clips buy more steps
    # in the budget; evaluation and pictures still use data.clip.length
    clip = dataclasses.replace(cfg.data.clip, length=min(cfg.data.clip.length, TRAIN_CLIP))
    return dataclasses.replace(cfg, train=t, data=dataclasses.replace(cfg.data, clip=clip))


# ---- evaluation ---------------------------------------------------------------------------------

def heldout_clips(source: LeRobotSource, cfg: Config, episodes: list[int], length: int | None = None) -> MemoryClips:
    """Non-overlapping clips (``data.clip.length`` frames unless ``length``) of ``episodes``, at the model's size."""
    clip = cfg.data.clip
    n = length or clip.length
    return MemoryClips(source, ClipConfig(length=n, frame_skip=clip.frame_skip, stride=n * clip.frame_skip),
                       episodes, cfg.model.perception.image_size, progress=False)


class _Memo:
    """An object decomposer memoised on its input video: the metric functions below each walk the same
    held-out clips, and this runs the network once per batch for all of them (a batch it has not seen,
    e.g. from a different batch size, is simply computed)."""

    def __init__(self, net: torch.nn.Module):
        self.net = net
        self._seen: list[tuple[torch.Tensor, object]] = []

    @property
    def training(self) -> bool:
        return self.net.training

    def eval(self) -> _Memo:
        self.net.eval()
        return self

    def train(self, mode: bool = True) -> _Memo:
        self.net.train(mode)
        return self

    def __call__(self, video: torch.Tensor):
        for seen, out in self._seen:
            if seen.shape == video.shape and torch.equal(seen, video):
                return out
        out = self.net(video)
        self._seen.append((video, out))
        return out


@torch.no_grad()
def heldout_metrics(model: torch.nn.Module, clips: MemoryClips) -> dict[str, float]:
    """Object metrics of ``model`` on ``clips`` (CPU): ``evaluate_objects`` (FG-ARI, mIoU, count accuracy),
    ``pusht_metrics`` (agent / block IoU, alpha peakedness), and the unweighted SBD and diversity losses
    with the mean numbers of alive object slots and of visible objects per frame."""
    net = decomposer(model).eval()
    memo = _Memo(net)
    m = evaluate_objects(memo, clips.batches(EVAL_BATCH))
    m |= pusht_metrics(memo, clips)
    sums, clips_seen, frames = {"sbd": 0.0, "diversity": 0.0, "alive": 0.0, "true": 0.0}, 0, 0
    for batch in clips.batches(EVAL_BATCH):
        out = memo(batch[keys.VIDEO])
        losses = net.losses(out, progress=1.0)
        b = batch[keys.VIDEO].shape[0]
        sums["sbd"] += float(losses["sbd"]) * b
        sums["diversity"] += float(losses["diversity"]) * b
        sums["alive"] += float(out.count.float().sum())
        sums["true"] += float(true_counts(batch[keys.MASK]).float().sum())
        clips_seen, frames = clips_seen + b, frames + out.count.numel()
    m |= {"sbd": sums["sbd"] / clips_seen, "diversity": sums["diversity"] / clips_seen,
          "alive_slots": sums["alive"] / frames, "true_objects": sums["true"] / frames}
    return m


def _figure_windows(clips: MemoryClips, n: int = 2) -> list[int]:
    """Up to ``n`` windows of ``clips`` to draw: the middle window of each of the first ``n`` episodes, or
    spread over one episode when there is only one."""
    episodes = list(dict.fromkeys(int(e) for e in clips.windows[:, 0]))
    if len(episodes) >= n:
        picks = []
        for e in episodes[:n]:
            idx = np.flatnonzero(clips.windows[:, 0] == e)
            picks.append(int(idx[len(idx) // 2]))
        return picks
    return sorted({int(i) for i in np.linspace(0, len(clips) - 1, n).round()})


def _stack(images: list[np.ndarray], gap: int = 12) -> np.ndarray:
    """Images one above the other on white, left-aligned."""
    width = max(i.shape[1] for i in images)
    canvas = np.full((sum(i.shape[0] for i in images) + gap * (len(images) - 1), width, 3), 255, np.uint8)
    y = 0
    for i in images:
        canvas[y:y + i.shape[0], :i.shape[1]] = i
        y += i.shape[0] + gap
    return canvas


@torch.no_grad()
def draw_figures(model: torch.nn.Module, source: LeRobotSource, cfg: Config, val_episodes: list[int],
                 clips: MemoryClips, run: Path) -> dict[str, object]:
    """Write the model's pictures into ``run``; returns what they show (clip episodes and frames, counts)."""
    net = decomposer(model).eval()
    picks = _figure_windows(clips)
    batch = clips.get(picks)
    video, mask = batch[keys.VIDEO], batch[keys.MASK].long()
    out = net(video)
    seg = out.segmentation(video.shape[-1])
    shown = [{"episode": int(batch[keys.EPISODE][i]), "frames": batch[keys.FRAMES][i].tolist()}
             for i in range(len(picks))]
    pixels = out.recon.shape[2] == 3  # a model that reconstructs features has no picture to show
    for i in range(len(picks)):
        save_png(slot_masks_figure(video[i], out.recon[i] if pixels else None, out.alphas[i], out.alive[i],
                                   background=out.has_background), run / f"slots_clip{i + 1}.png")
    save_png(_stack([segmentation_figure(video[i], mask[i], seg[i]) for i in range(len(picks))]),
             run / "segmentation.png")
    save_png(alpha_heatmaps(out.alphas[0], out.alive[0], background=out.has_background), run / "alpha_heatmaps.png")

    # alive slots per frame over a longer stretch of the first held-out episode (one clip, slots carried)
    ep = val_episodes[0]
    skip = cfg.data.clip.frame_skip
    length = min(cfg.model.perception.max_frames, (int(source.episode_lengths[ep]) - 1) // skip + 1)
    long = heldout_clips(source, cfg, [ep], length=length)[0]
    long_out = net(long[keys.VIDEO][None])
    count = long_out.count[0]
    truth = true_counts(long[keys.MASK][None].long())[0]
    save_png(alive_count_figure(count, truth, title=f"held-out episode {ep}: object slots alive per frame"),
             run / "alive_count.png")
    return {"clips": shown, "count_episode": ep, "count_frames": length, "count": count.tolist(),
            "true_count": truth.tolist()}


# ---- the demo -----------------------------------------------------------------------------------

def _relocate_paths(summary_path: Path, old: Path, new: Path) -> None:
    """Rewrite paths under ``old`` (the temporary directory) to ``new`` in the training summary."""
    s = json.loads(summary_path.read_text())
    for k, v in s.items():
        if isinstance(v, str) and v.startswith(str(old)):
            s[k] = str(new) + v[len(str(old)):]
    atomic_write_text(summary_path, json.dumps(s, indent=2) + "\n")


def run_demo(cfg: Config, name: str = "demo", out_root: str | Path = "runs", progress: bool = True,
             minutes: float | None = None) -> Path:
    """Run the demo into ``out_root/name`` (replaced if it exists); returns the report path.

    ``minutes`` is the training budget (see ``demo_minutes``). Raises ``HclsmError`` for a bad name,
    budget or config before anything is written.
    """
    check_run_name(name)  # before anything is generated or replaced
    budget = demo_minutes(cfg, minutes)
    eval_length = cfg.data.clip.length  # held-out clips keep the configured length
    cfg = demo_config(cfg, budget)
    final = Path(out_root) / name
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with atomic_output_dir(final, overwrite=True) as run:
        # 1. data
        data_dir = run / "data" / "pusht"
        summary = generate_pusht_dataset(data_dir, cfg.data.pusht, progress=progress)
        source = LeRobotSource(data_dir)
        rows = []
        for ep in range(min(3, len(source))):
            n = source.episode_lengths[ep]
            clip = source.load_clip(ep, np.linspace(0, n - 1, 8).round().astype(int))
            frames = to_uint8_frames(clip[keys.VIDEO])
            rows += [frames, overlay(frames, clip[keys.MASK].numpy())]
        save_png(frame_strip(rows), run / "pusht_frames_and_masks.png")
        save_config(cfg, run / "config.yaml")
        (run / "data_summary.json").write_text(json.dumps(summary, indent=2))
        seconds["data"] = time.perf_counter() - t0

        # 2. the baseline (the same model untrained: train() seeds and builds it identically), then stage 1
        t = time.perf_counter()
        _, val_eps = split_episodes(len(source), cfg.train.val_fraction, cfg.train.seed)
        clips = heldout_clips(source, cfg, val_eps, length=eval_length)
        seed_everything(cfg.train.seed)
        untrained = heldout_metrics(build_model(cfg.model), clips)
        seconds["baseline"] = time.perf_counter() - t
        result = train(cfg, data_dir, run_dir=run / "train", progress=progress)
        _relocate_paths(run / "train" / "summary.json", run, final)
        seconds["train"] = result.seconds

        # 3. evaluation and pictures
        t = time.perf_counter()
        model = result.model.cpu().eval()
        trained = heldout_metrics(model, clips)
        shown = draw_figures(model, source, cfg, val_eps, clips, run)
        seconds["evaluation"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0

        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        record = {"trained": trained, "untrained": untrained, "train": {
            "steps": result.steps, "minutes_budget": budget, "seconds": result.seconds, "stopped": result.stopped,
            "skipped": result.skipped, "final_losses": result.losses, "parameters": n_params},
            "val_episodes": val_eps, "clips": len(clips), "eval_clip_length": eval_length, "figures": shown,
            "seconds": seconds,
            "indicators": {"sbd": SEED_SBD, "diversity": SEED_DIVERSITY},
            "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}}
        (run / "metrics.json").write_text(json.dumps(_finite(record), indent=2, allow_nan=False) + "\n")
        (run / "report.md").write_text(render_report(cfg, summary, record))
    return final / "report.md"


def _finite(v: object) -> object:
    """``v`` with every non-finite float replaced by None (strict JSON), recursively."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v
