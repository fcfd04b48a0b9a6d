"""The markdown report of ``hclsm demo`` (``report.md``): pure rendering of the numbers ``run_demo`` measured."""
from __future__ import annotations

import math

from hclsm.config import Config

SEED_SBD, SEED_DIVERSITY = 0.01, 0.15  # the seed's indicators of a working stage 1 (losses below these)


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def _indicator(v: float | None, limit: float) -> str:
    if v is None or not math.isfinite(v):
        return f"< {limit:g}: —"
    return f"< {limit:g}: {'met' if v < limit else 'not met'}"


def render_report(cfg: Config, s: dict, r: dict) -> str:
    """``report.md`` of a demo run: ``s`` the PushT data summary, ``r`` the record ``run_demo`` writes to
    ``metrics.json`` (trained / untrained metrics, training facts, figures shown, timings)."""
    d, tr, m, u, sec = cfg.data.pusht, r["train"], r["trained"], r["untrained"], r["seconds"]
    losses = tr["final_losses"]
    stopped = {"time": "the time budget", "steps": f"train.steps = {cfg.train.steps}"}.get(tr["stopped"], tr["stopped"])
    rows = [  # label, key, format, the seed's indicator (an upper limit) or None
        ("agent IoU (best slot, one-to-one)", "agent_iou", ".3f", None),
        ("block IoU (best slot, one-to-one)", "block_iou", ".3f", None),
        ("agent / block mean IoU", "agent_block_miou", ".3f", None),
        ("FG-ARI (video, all objects)", "fg_ari", ".3f", None),
        ("mIoU (Hungarian, all objects)", "miou", ".3f", None),
        ("alpha peakedness (0 = uniform masks)", "alpha_peakedness", ".3f", None),
        ("SBD reconstruction loss", "sbd", ".4f", SEED_SBD),
        ("slot diversity loss", "diversity", ".4f", SEED_DIVERSITY),
        ("alive object slots per frame (mean)", "alive_slots", ".2f", None),
        ("visible objects per frame (truth, mean)", "true_objects", ".2f", None),
        ("frames where alive slots = visible objects", "count_frame_acc", ".0%", None),
    ]
    table = "\n".join(f"| {label} | {_fmt(m.get(k), f)} | {_fmt(u.get(k), f)} | "
                      f"{'—' if lim is None else _indicator(m.get(k), lim)} |" for label, k, f, lim in rows)
    shown = r["figures"]
    clips = "; ".join(f"episode {c['episode']}, frames {c['frames'][0]}-{c['frames'][-1]}" for c in shown["clips"])
    slot_pics = "\n\n".join(f"![slot masks, held-out clip {i + 1}](slots_clip{i + 1}.png)"
                            for i in range(len(shown["clips"])))
    return f"""# hclsm demo report

Stages run: **data** (PushT from the gym-pusht simulator) and **HCLSM stage 1, the objects**
(perception, slot attention with existence / birth / death, spatial broadcast decoder; SBD, diversity
and existence losses), trained {tr['steps']} steps in {tr['seconds'] / 60:.1f} min, then evaluated on
held-out episodes. Not yet in this version: stage 2 (hierarchical dynamics, JEPA prediction), rollouts,
the event timeline, the causal graph and planning; they are added here as they land.

## Data: PushT from the real simulator

{s['episodes']} episodes, {s['frames']} frames at {d.image_size}x{d.image_size}, fps 10, scripted pusher with
action noise {d.action_noise} px (seed {d.seed}); written as a LeRobot v3 dataset in `data/pusht/` in
{s['seconds']:.1f} s.

| figure | value |
|---|---|
| episodes with agent-block contact | {s['contact_fraction']:.0%} |
| episodes where the block moved > 20 px | {s['moved_fraction']:.0%} |
| both | {s['contact_and_moved_fraction']:.0%} |
| mean max block displacement | {s['mean_displacement_px']:.0f} px (of the 512 px simulator canvas) |

Frames of three episodes (odd rows) and the ground-truth object masks rendered from the simulator
state (even rows; blue agent, red block, green goal region):

![frames and masks](pusht_frames_and_masks.png)

## Training: HCLSM stage 1

The `{cfg.preset}` HCLSM ({tr['parameters']:,} trainable parameters, {cfg.model.slots.num_slots} object slots
+ {'a background slot' if cfg.model.slots.background else 'no background slot'}, frames at
{cfg.model.perception.image_size} px, clips of {cfg.data.clip.length} frames, batch {cfg.train.batch_size}) on the
training episodes for a budget of {tr['minutes_budget']:g} min: {tr['steps']} steps in {tr['seconds']:.0f} s (stopped
by {stopped}; {tr['skipped']} steps skipped for a non-finite loss). Run directory `train/`: config, `log.jsonl`,
TensorBoard logs in `tb/`, the checkpoint in `checkpoints/`, `summary.json`.

| final training losses (last logging interval) | value | seed's indicator |
|---|---|---|
| SBD reconstruction | {_fmt(losses.get('sbd'), '.4f')} | {_indicator(losses.get('sbd'), SEED_SBD)} |
| slot diversity | {_fmt(losses.get('diversity'), '.4f')} | {_indicator(losses.get('diversity'), SEED_DIVERSITY)} |
| existence prior | {_fmt(losses.get('existence'), '.4f')} | — |
| object-area prior | {_fmt(losses.get('object_area'), '.4f')} | — |

## Objects on held-out episodes

{r['clips']} clips of {r['eval_clip_length']} frames from the held-out episodes
({', '.join(map(str, r['val_episodes']))}); masks are compared with the simulator's (agent, block, goal region).
The baseline is the same model untrained (step 0, the same initialisation).

| metric | trained | untrained | seed's indicator (trained) |
|---|---|---|---|
{table}

## Pictures

Slot masks over two held-out clips ({clips}): input frames, the reconstruction, then each slot's mask
applied to the frame (black where the mask is 0). A grey hatched tile is a dead slot; a green border marks the frame a slot is born,
a red one the frame it dies.

{slot_pics}

Segmentation against the ground truth (per clip: frames, simulator masks, argmax of the slot masks with
each slot coloured as the object it overlaps best; the background slot is uncoloured):

![segmentation vs ground truth](segmentation.png)

Alpha masks of the first clip as heat maps (one row per slot):

![alpha heat maps](alpha_heatmaps.png)

Alive object slots per frame against the number of visible objects, over {shown['count_frames']} frames of
held-out episode {shown['count_episode']} (one clip, slots carried from frame to frame):

![alive slots per frame](alive_count.png)

Times: data {sec['data']:.0f} s, baseline {sec['baseline']:.0f} s, training {sec['train']:.0f} s, evaluation and
pictures {sec['evaluation']:.0f} s; total {sec['total']:.0f} s. Config: `config.yaml`; every number: `metrics.json`.
"""
