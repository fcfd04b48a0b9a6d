"""``hclsm demo``: the main job, end to end on CPU.

1. **Data.** PushT episodes from the real gym-pusht simulator (``cfg.data.pusht``), written as a
   LeRobot v3 dataset in ``data/pusht/``, with a picture of frames and ground-truth masks.
2. **HCLSM, both stages** (``hclsm.train.train_two_stages``) for a wall-clock budget (``--minutes``;
   default ``train.max_minutes`` when set, else ``DEFAULT_MINUTES``), each stage at most ``train.steps``
   steps: stage 1 (the object layers: perception, slot attention with existence / birth / death, the
   spatial broadcast decoder) on ``TRAIN_CLIP``-frame clips for ``train.stage1_fraction`` of the budget,
   then stage 2 (the hierarchical dynamics with JEPA prediction and the event detector, on top of the
   stage-1 losses) on ``data.clip.length``-frame clips for the rest. The runs (config, logs, TensorBoard,
   checkpoint, summary) are ``train/stage1/`` and ``train/stage2/``.
3. **Evaluation on held-out episodes** (the training loop's own split, ``train.val_fraction`` and
   ``train.seed``). Objects, on the ``data.clip.length``-frame clips: agent and block IoU against the
   simulator's masks, FG-ARI and mIoU, how peaked the alpha masks are, the SBD and diversity losses beside
   the seed's indicators (< 0.01, < 0.15), and the number of alive slots against the number of visible
   objects. Dynamics, on up to ``DYNAMICS_CLIPS`` clips of ``EVENT_CLIP`` frames: the stage-2 prediction
   losses in eval mode (JEPA beside the seed's 0.008-0.01), rollouts against the copy-last baselines
   (frames and slots), and the event detector against the contact onsets (events per 16-frame clip beside
   the seed's 2-3; precision / recall / F1). The same model untrained (step 0, same initialisation) is
   the baseline.
4. **Report.** ``report.md`` with the metrics, pictures (slot masks over frames for two held-out clips,
   segmentation against ground truth, alpha heat maps, alive slots per frame, a rollout against the true
   frames, the event timeline with the contact onsets, the PCA of slot trajectories) and a plain
   statement of which stages ran; ``metrics.json`` has every number.

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
from hclsm.demo_report import SEED_DIVERSITY, SEED_EVENTS, SEED_JEPA, SEED_SBD, render_report
from hclsm.errors import HclsmError
from hclsm.eval.dynamics import clip_events, rollout_errors, rollout_metrics, score_events, true_events
from hclsm.eval.objects import decomposer, evaluate_objects, true_counts
from hclsm.models import build_model
from hclsm.models.hclsm import HCLSM
from hclsm.train import TrainResult, train_two_stages
from hclsm.train.loop import seed_everything
from hclsm.train.stages import stage_configs
from hclsm.utils.atomic import atomic_output_dir, atomic_write_text
from hclsm.utils.jsonsafe import finite_or_none
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
from hclsm.viz_dynamics import event_timeline, rollout_figure, slot_pca_figure

DEFAULT_MINUTES = 6.0  # training budget when neither --minutes nor train.max_minutes is given
EVAL_BATCH = 16
TRAIN_CLIP = 4  # frames per stage-1 training clip (at most data.clip.length); stage 2 uses data.clip.length
EVENT_CLIP = 16  # frames per held-out dynamics clip: the seed counts events per 16-frame clip
DYNAMICS_CLIPS = 32  # at most this many held-out dynamics clips are evaluated (spread over the held-out episodes)
ROLLOUT_CONTEXT = 6  # context frames of a rollout (as `hclsm eval`); the rest of the clip is predicted


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
    """``cfg`` set up for the demo's training: both stages (``train_two_stages``) in ``minutes`` of wall clock.

    Raises ``HclsmError`` when nothing can be held out for evaluation (fewer than two episodes, or
    ``train.val_fraction`` = 0), for a model other than HCLSM, when stage 2 has nothing to predict
    (``data.clip.length`` < 2), or when ``train.stage1_fraction`` leaves a stage no share of the budget.
    """
    if cfg.data.pusht.episodes < 2 or cfg.train.val_fraction <= 0:
        raise HclsmError(f"the demo evaluates on held-out episodes: it needs data.pusht.episodes >= 2 (got "
                         f"{cfg.data.pusht.episodes}) and train.val_fraction > 0 (got {cfg.train.val_fraction})")
    if cfg.model.name != "hclsm":
        raise HclsmError(f"the demo trains HCLSM: model.name must be 'hclsm', got {cfg.model.name!r}")
    if cfg.data.clip.length < 2:
        raise HclsmError(f"the demo's stage 2 predicts the next frame: data.clip.length must be >= 2, got "
                         f"{cfg.data.clip.length}")
    d = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=1, max_minutes=minutes))
    stage_configs(d, minutes, TRAIN_CLIP)  # refuses a stage1_fraction that leaves a stage no time
    return d


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


def _longest_clip(source: LeRobotSource, cfg: Config, episodes: list[int]) -> int:
    """The most frames one clip of ``episodes`` can have: the longest episode (every ``data.clip.frame_skip``-th
    frame), at most the model's ``perception.max_frames``."""
    skip = cfg.data.clip.frame_skip
    longest = max((int(source.episode_lengths[e]) - 1) // skip + 1 for e in episodes)
    return min(cfg.model.perception.max_frames, longest)


def dynamics_clips(source: LeRobotSource, cfg: Config, episodes: list[int]) -> MemoryClips:
    """Non-overlapping clips of ``episodes`` for the dynamics: ``EVENT_CLIP`` frames, fewer when no episode
    (or the model's ``perception.max_frames``) is that long."""
    return heldout_clips(source, cfg, episodes, length=min(EVENT_CLIP, _longest_clip(source, cfg, episodes)))


def spread_batches(clips: MemoryClips, n: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``n`` windows of ``clips`` spread evenly over them (so over the episodes), in batches of at most
    ``EVAL_BATCH``."""
    picks = sorted({int(i) for i in np.linspace(0, len(clips) - 1, min(n, len(clips))).round()})
    return [clips.get(picks[i:i + EVAL_BATCH]) for i in range(0, len(picks), EVAL_BATCH)]


def rollout_split(length: int) -> tuple[int, int]:
    """(context, horizon) of a rollout over a clip of ``length`` >= 2 frames: ``ROLLOUT_CONTEXT`` context frames
    (at most half the clip), the rest predicted."""
    context = min(ROLLOUT_CONTEXT, length // 2)
    return context, length - context


@torch.no_grad()
def dynamics_metrics(model: HCLSM, batches: list[dict[str, torch.Tensor]]) -> dict[str, float | list[float]]:
    """Stage-2 metrics of ``model`` on held-out ``batches`` (PushT clips of one length T, CPU).

    * ``jepa`` and ``obj``: the stage-2 prediction losses of the model's own forward pass in eval mode
      (``model(batch, progress=1.0, stage=2)``), averaged over clips;
    * the event gate of that pass against the contact onsets (``score_events``: events and true events per
      clip, precision / recall / F1 within ±1 step), with ``events_per_16_frames`` and
      ``true_events_per_16_frames``, the counts per clip scaled to ``EVENT_CLIP`` frames (equal when T is);
    * the rollout errors of ``rollout_metrics`` (context and horizon: ``rollout_split(T)``): frame and latent
      MSE with their copy-last baselines, averaged over the horizon and ``NAME_per_step``.
    """
    model.eval()
    length = batches[0][keys.VIDEO].shape[1]
    sums, fired, probs, truths = {"jepa": 0.0, "obj": 0.0}, [], [], []
    for batch in batches:
        out = model(batch, progress=1.0, stage=2)
        for k in sums:
            sums[k] += float(out.losses[k]) * batch[keys.VIDEO].shape[0]
        fired.append(out.dynamics.events.gate > 0.5)
        probs.append(out.dynamics.events.prob)
        truths.append(true_events(batch))
    clips = sum(len(f) for f in fired)
    m: dict[str, float | list[float]] = {k: v / clips for k, v in sums.items()}
    events = score_events(torch.cat(fired), torch.cat(probs), torch.cat(truths))
    scale = EVENT_CLIP / length
    m |= {k: v for k, v in events.items() if k != "clips"}
    m |= {"events_per_16_frames": events["events_per_clip"] * scale,
          "true_events_per_16_frames": events["true_events_per_clip"] * scale}
    rollout = rollout_metrics(model, batches, *rollout_split(length))
    return m | {k: v for k, v in rollout.items() if k not in ("clips", "context", "horizon")}


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


def _where(batch: dict[str, torch.Tensor], i: int = 0) -> dict[str, object]:
    """Episode and frame indices of clip ``i`` of ``batch``."""
    return {"episode": int(batch[keys.EPISODE][i]), "frames": batch[keys.FRAMES][i].tolist()}


@torch.no_grad()
def draw_figures(model: HCLSM, source: LeRobotSource, cfg: Config, val_episodes: list[int], clips: MemoryClips,
                 dyn_clips: MemoryClips, run: Path) -> dict[str, object]:
    """Write the model's pictures into ``run``; returns what they show (clip episodes and frames, counts, events).

    ``clips`` are the held-out object clips, ``dyn_clips`` the held-out dynamics clips (``dynamics_clips``).
    """
    model.eval()
    net = decomposer(model)
    picks = _figure_windows(clips)
    batch = clips.get(picks)
    video, mask = batch[keys.VIDEO], batch[keys.MASK].long()
    out = net(video)
    seg = out.segmentation(video.shape[-1])
    shown: dict[str, object] = {"clips": [_where(batch, i) for i in range(len(picks))]}
    pixels = out.recon.shape[2] == 3  # a model that reconstructs features has no picture to show
    for i in range(len(picks)):
        save_png(slot_masks_figure(video[i], out.recon[i] if pixels else None, out.alphas[i], out.alive[i],
                                   background=out.has_background), run / f"slots_clip{i + 1}.png")
    save_png(_stack([segmentation_figure(video[i], mask[i], seg[i]) for i in range(len(picks))]),
             run / "segmentation.png")
    save_png(alpha_heatmaps(out.alphas[0], out.alive[0], background=out.has_background), run / "alpha_heatmaps.png")

    # a rollout of the middle dynamics clip of the first held-out episode, and its slot trajectories
    roll_batch = dyn_clips.get(_figure_windows(dyn_clips, 1))
    context, horizon = rollout_split(roll_batch[keys.VIDEO].shape[1])
    _, roll, truth = rollout_errors(model, roll_batch, context, horizon)
    where, any_alive = _where(roll_batch), bool(truth.alive[0].any())
    shown["rollout"] = where | {"context": context, "horizon": horizon, "frames_drawn": pixels, "pca_drawn": any_alive}
    if pixels:
        save_png(rollout_figure(truth.target[0, context:], roll.frames[0], truth.target[0, :context]),
                 run / "rollout.png")
    if any_alive:  # the PCA projects alive slots only
        save_png(slot_pca_figure(truth.slots[0], truth.alive[0], roll.slots[0], background=truth.has_background,
                                 title=f"held-out episode {where['episode']}: slot trajectories (PCA), rollout "
                                       f"dashed"), run / "slots_pca.png")

    # alive slots and the event detector over a longer held-out stretch (one clip, slots carried): the one
    # with the most contact onsets
    stretches = heldout_clips(source, cfg, val_episodes, length=_longest_clip(source, cfg, val_episodes))
    onsets = true_events(stretches.get(torch.arange(len(stretches)))).sum(1)
    long = stretches.get([int(onsets.argmax())])
    long_out = net(long[keys.VIDEO])
    ep, frames = _where(long)["episode"], long[keys.FRAMES][0]
    count = long_out.count[0]
    truth_count = true_counts(long[keys.MASK].long())[0]
    title = f"held-out episode {ep}, frames {int(frames[0])}-{int(frames[-1])}"
    save_png(alive_count_figure(count, truth_count, title=f"{title}: object slots alive per frame"),
             run / "alive_count.png")
    events = clip_events(model, long, long_out)
    contact = true_events(long)[0]
    save_png(event_timeline(events.prob[0], events.gate[0], float(events.threshold), contact,
                            title=f"{title}: event probability per step"), run / "event_timeline.png")
    return shown | {"count_episode": ep, "count_first_frame": int(frames[0]), "count_frames": len(frames),
                    "count": count.tolist(), "true_count": truth_count.tolist(),
                    "events_fired": torch.nonzero(events.gate[0] > 0.5).flatten().tolist(),
                    "contact_onsets": torch.nonzero(contact).flatten().tolist()}


# ---- the demo -----------------------------------------------------------------------------------

def _relocate_paths(summary_path: Path, old: Path, new: Path) -> None:
    """Rewrite paths under ``old`` (the temporary directory) to ``new`` in a training run's summary."""
    s = json.loads(summary_path.read_text())
    for k, v in s.items():
        if isinstance(v, str) and v.startswith(str(old)):
            s[k] = str(new) + v[len(str(old)):]
    atomic_write_text(summary_path, json.dumps(s, indent=2) + "\n")


def _run_facts(result: TrainResult, clip_length: int) -> dict[str, object]:
    """What the report says about one training run on clips of ``clip_length`` frames."""
    return {"steps": result.steps, "seconds": result.seconds, "stopped": result.stopped, "skipped": result.skipped,
            "final_losses": result.losses, "clip_length": clip_length}


def run_demo(cfg: Config, name: str = "demo", out_root: str | Path = "runs", progress: bool = True,
             minutes: float | None = None) -> Path:
    """Run the demo into ``out_root/name`` (replaced if it exists); returns the report path.

    ``minutes`` is the training budget (see ``demo_minutes``). Raises ``HclsmError`` for a bad name,
    budget or config before anything is written.

    ``metrics.json``: ``trained`` / ``untrained`` (object and dynamics metrics, ``heldout_metrics`` and
    ``dynamics_metrics``), ``train`` (the budget, the parameter count and stage 1's run: steps, seconds,
    why it stopped, skipped steps, final losses; ``train.stage2`` the same for stage 2), ``dynamics`` (the
    held-out dynamics clips: how many, their length, rollout context and horizon), the figures' contents,
    the seed's indicators, timings and the machine.
    """
    check_run_name(name)  # before anything is generated or replaced
    budget = demo_minutes(cfg, minutes)
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

        # 2. the baseline (the same model untrained: train() seeds and builds it identically), then both stages
        t = time.perf_counter()
        _, val_eps = split_episodes(len(source), cfg.train.val_fraction, cfg.train.seed)
        clips = heldout_clips(source, cfg, val_eps)
        dyn_clips = dynamics_clips(source, cfg, val_eps)
        dyn_batches = spread_batches(dyn_clips, DYNAMICS_CLIPS)
        seed_everything(cfg.train.seed)
        baseline = build_model(cfg.model)
        untrained = heldout_metrics(baseline, clips) | dynamics_metrics(baseline, dyn_batches)
        seconds["baseline"] = time.perf_counter() - t
        t = time.perf_counter()
        stage1, stage2 = train_two_stages(cfg, data_dir, run / "train", budget, stage1_clip=TRAIN_CLIP,
                                          progress=progress)
        for result in (stage1, stage2):
            _relocate_paths(result.run_dir / "summary.json", run, final)
        seconds["train"] = time.perf_counter() - t  # both stages, with their data loading

        # 3. evaluation and pictures
        t = time.perf_counter()
        model = stage2.model.cpu().eval()
        trained = heldout_metrics(model, clips) | dynamics_metrics(model, dyn_batches)
        shown = draw_figures(model, source, cfg, val_eps, clips, dyn_clips, run)
        seconds["evaluation"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0

        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        length = dyn_clips.clip.length
        context, horizon = rollout_split(length)
        record = {"trained": trained, "untrained": untrained,
                  "train": {"minutes_budget": budget, "stage1_fraction": cfg.train.stage1_fraction,
                            "parameters": n_params, **_run_facts(stage1, min(TRAIN_CLIP, cfg.data.clip.length)),
                            "stage2": _run_facts(stage2, cfg.data.clip.length)},
                  "val_episodes": val_eps, "clips": len(clips), "eval_clip_length": cfg.data.clip.length,
                  "dynamics": {"clips": sum(len(b[keys.VIDEO]) for b in dyn_batches), "of_clips": len(dyn_clips),
                               "clip_length": length, "context": context, "horizon": horizon},
                  "figures": shown, "seconds": seconds,
                  "indicators": {"sbd": SEED_SBD, "diversity": SEED_DIVERSITY, "jepa": list(SEED_JEPA),
                                 "events_per_16_frames": list(SEED_EVENTS)},
                  "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}}
        (run / "metrics.json").write_text(json.dumps(finite_or_none(record), indent=2, allow_nan=False) + "\n")
        (run / "report.md").write_text(render_report(cfg, summary, record))
    return final / "report.md"
