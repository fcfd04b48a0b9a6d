"""What ``hclsm demo`` measures and draws on the held-out episodes (``hclsm.demo`` runs the job,
``hclsm.demo.report`` renders the report).

* objects (``heldout_metrics``): agent and block IoU against the simulator's masks, FG-ARI and mIoU, alpha
  peakedness, the SBD and diversity losses and alive slots against visible objects;
* dynamics (``dynamics_metrics``): the stage-2 prediction losses in eval mode, rollouts against the
  copy-last baselines and the event gate against the contact onsets, on ``EVENT_CLIP``-frame clips;
* pictures (``draw_figures``);
* planning (``demo_planning``): MPPI with the trained model against random actions from ``PLAN_EPISODES``
  held-out PushT start states in the real simulator (the ``hclsm plan`` protocol, with a cheaper planner).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hclsm import keys
from hclsm.config import Config
from hclsm.config.data import ClipConfig
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.memory import MemoryClips
from hclsm.eval.dynamics import clip_dynamics, rollout_errors, rollout_metrics, score_events, true_events
from hclsm.eval.objects import decomposer, evaluate_objects, pusht_metrics, true_counts
from hclsm.models.hclsm import HCLSM
from hclsm.models.objects import agent_cue
from hclsm.viz import (
    alive_count_figure,
    alpha_heatmaps,
    save_png,
    segmentation_figure,
    slot_masks_figure,
)
from hclsm.viz.dynamics import causal_graph_figure, event_timeline, rollout_figure, slot_pca_figure

EVAL_BATCH = 16
EVENT_CLIP = 16  # frames per held-out dynamics clip: the seed counts events per 16-frame clip
DYNAMICS_CLIPS = 32  # at most this many held-out dynamics clips are evaluated (spread over the held-out episodes)
ROLLOUT_CONTEXT = 6  # context frames of a rollout (as `hclsm eval`); the rest of the clip is predicted
PLAN_EPISODES = 2  # held-out start states the demo plans from (`hclsm bench planning` uses 50)
PLAN_SAMPLES, PLAN_ITERATIONS = 32, 3  # MPPI candidates and refits per plan (`hclsm plan`'s default: 64 x 5)
PLAN_REPLAN = 5  # env steps executed per plan


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

    @property
    def cfg(self):
        return self.net.cfg

    def eval(self) -> _Memo:
        self.net.eval()
        return self

    def train(self, mode: bool = True) -> _Memo:
        self.net.train(mode)
        return self

    def __call__(self, video: torch.Tensor, cue: torch.Tensor | None = None):
        for seen, out in self._seen:  # a batch's cue comes with its video
            if seen.shape == video.shape and torch.equal(seen, video):
                return out
        out = self.net(video, cue=cue)
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
        out = memo(batch[keys.VIDEO], cue=agent_cue(batch, net.cfg))
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
    out = net(video, cue=agent_cue(batch, net.cfg))
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
    long_out = net(long[keys.VIDEO], cue=agent_cue(long, net.cfg))
    ep, frames = _where(long)["episode"], long[keys.FRAMES][0]
    count = long_out.count[0]
    truth_count = true_counts(long[keys.MASK].long())[0]
    title = f"held-out episode {ep}, frames {int(frames[0])}-{int(frames[-1])}"
    save_png(alive_count_figure(count, truth_count, title=f"{title}: object slots alive per frame"),
             run / "alive_count.png")
    dynamics = clip_dynamics(model, long, long_out)
    events = dynamics.events
    contact = true_events(long)[0]
    save_png(event_timeline(events.prob[0], events.gate[0], float(events.threshold), contact,
                            title=f"{title}: event probability per step"), run / "event_timeline.png")
    if dynamics.graph is not None:  # the learned causal graph after the whole stretch, on its last frame
        prob, alive = dynamics.graph.prob[0, -1], long_out.alive[0, -1]
        save_png(causal_graph_figure(long[keys.VIDEO][0, -1], long_out.positions[0, -1], alive, prob,
                                     background=long_out.has_background,
                                     title=f"{title}: learned causal graph at the last frame"),
                 run / "causal_graph.png")
        edges = torch.nonzero((dynamics.graph.adjacency[0, -1] > 0).T).tolist()  # [sender, receiver]
        shown["graph"] = {"edges": edges, "alive_slots": int(alive.sum()) - int(long_out.has_background)}
    return shown | {"count_episode": ep, "count_first_frame": int(frames[0]), "count_frames": len(frames),
                    "count": count.tolist(), "true_count": truth_count.tolist(),
                    "events_fired": torch.nonzero(events.gate[0] > 0.5).flatten().tolist(),
                    "contact_onsets": torch.nonzero(contact).flatten().tolist()}


def demo_planning(model: HCLSM, source: LeRobotSource, val_eps: list[int], out: Path, seed: int,
                  progress: bool, budget: int | None = None) -> dict:
    """MPPI with ``model`` and random actions, each from the same ``PLAN_EPISODES`` held-out start states, in
    the real PushT simulator (``hclsm.planning``: goal = the state after replaying the next 25 recorded actions,
    ``budget`` env steps, default the protocol's 50, success within 20 px and pi / 9); a GIF of each policy's
    first episode into ``out``. Returns the results per policy, or ``skipped`` with the reason when no held-out
    episode is long enough or the model takes no 2-D actions."""
    from dataclasses import asdict

    from hclsm.planning.env_loop import BUDGET, GOAL_OFFSET, RandomPolicy, make_tasks
    from hclsm.planning.planners import PlannerConfig
    from hclsm.planning.run import plan_tasks, planning_policies

    if model.cfg.d_action != 2:
        return {"skipped": f"the model takes {model.cfg.d_action}-D actions; PushT planning needs 2-D ones"}
    try:
        tasks = make_tasks(source, val_eps, PLAN_EPISODES, seed)
    except ValueError:
        return {"skipped": f"no held-out episode has more than {GOAL_OFFSET} frames (a goal is {GOAL_OFFSET} recorded "
                           f"actions ahead)"}
    cfg = PlannerConfig(samples=PLAN_SAMPLES, iterations=PLAN_ITERATIONS,
                        elites=min(PlannerConfig.elites, PLAN_SAMPLES))
    mppi, = planning_policies(model, ["mppi"], cfg, PLAN_REPLAN, seed)
    # the same planner with the proprioception term off: what the predicted slots alone are worth
    slots_only, = planning_policies(model, ["mppi"], cfg, PLAN_REPLAN, seed)
    slots_only.name, slots_only.proprio_weight = "mppi_slots_only", 0.0
    budget = BUDGET if budget is None else budget
    results = plan_tasks(source, tasks, [mppi, slots_only, RandomPolicy(seed)], out, gifs=1, budget=budget,
                         progress=progress)
    return {"results": results, "starts": [[t.episode, t.frame] for t in tasks], "budget": budget,
            "replan_every": PLAN_REPLAN, "planner": asdict(cfg), "gifs": sorted(p.name for p in out.glob("*.gif")),
            "cost_weights": {"slot_positions": mppi.position_weight, "proprio": mppi.proprio_weight}}
