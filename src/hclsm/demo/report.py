"""The markdown report of ``hclsm demo`` (``report.md``): pure rendering of the numbers ``run_demo`` measured."""
from __future__ import annotations

import math

from hclsm.config import Config

SEED_SBD, SEED_DIVERSITY = 0.01, 0.15  # the seed's indicators of a working stage 1 (losses below these)
SEED_JEPA = (0.008, 0.01)  # the seed's held-out stage-2 prediction loss (a range it reports, not a limit)
SEED_EVENTS = (2, 3)  # the seed's events per 16-frame clip


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "—" if v is None or not math.isfinite(v) else format(v, spec)


def _indicator(v: float | None, limit: float) -> str:
    if v is None or not math.isfinite(v):
        return f"< {limit:g}: —"
    return f"< {limit:g}: {'met' if v < limit else 'not met'}"


def _seed_range(v: float | None, bounds: tuple[float, float]) -> str:
    """``v`` placed against a range the seed reports: below, in range or above."""
    lo, hi = bounds
    where = "—" if v is None or not math.isfinite(v) else "below" if v < lo else "above" if v > hi else "in range"
    return f"{lo:g}–{hi:g}: {where}"


def _table(rows: list[tuple], m: dict, u: dict) -> str:
    """Markdown rows ``| label | trained | untrained | seed's indicator |`` for ``(label, key, format, seed)``
    rows; ``seed`` is an upper limit (a number), a reported range (a pair) or None."""
    def seed(v: float | None, ref: float | tuple | None) -> str:
        if ref is None:
            return "—"
        return _seed_range(v, ref) if isinstance(ref, tuple) else _indicator(v, ref)

    return "\n".join(f"| {label} | {_fmt(m.get(k), f)} | {_fmt(u.get(k), f)} | {seed(m.get(k), ref)} |"
                     for label, k, f, ref in rows)


def _steps(v: list[int]) -> str:
    return ", ".join(map(str, v)) or "none"


FOUND_IOU = 0.5  # an object counts as found when its best slot's mask overlaps it with IoU >= this


def _objects_verdict(cfg: Config, m: dict) -> str:
    """One plain paragraph: were the agent and the block found (IoU >= ``FOUND_IOU``), and was the agent's position
    given to the model (the proprioception cue)?"""
    found = [name for name, k in (("the agent", "agent_iou"), ("the block", "block_iou"))
             if m.get(k) is not None and m[k] >= FOUND_IOU]
    scores = f"agent IoU {_fmt(m.get('agent_iou'))}, block IoU {_fmt(m.get('block_iou'))}"
    if len(found) == 2:
        verdict = f"**The model found both objects** ({scores}; found = IoU >= {FOUND_IOU})."
    elif found:
        verdict = (f"**The model found {found[0]} only** ({scores}; found = IoU >= {FOUND_IOU}): train more steps "
                   f"(`hclsm demo --steps S1 S2`).")
    else:
        verdict = (f"**The objects were not found** ({scores}; found = IoU >= {FOUND_IOU}): this many steps are too "
                   f"few (the PushT recipe reached agent / block IoU 0.51 / 0.68 after 8,000 stage-1 steps; "
                   f"`hclsm demo --steps S1 S2`).")
    if cfg.model.slots.cue_scale > 0:
        verdict += (" The first object slot was placed at the agent's position from the proprioceptive state "
                    "(`model.slots.cue_scale`), so the agent's position is given to the model, not discovered; its "
                    "mask and the block are learned from the pixels alone.")
    return verdict


def _planning_section(p: dict) -> str:
    """The report's planning section from ``hclsm.demo.evaluate.demo_planning``'s record."""
    head = "## Planning in the real PushT simulator\n\n"
    if "skipped" in p:
        return head + f"Skipped: {p['skipped']}. `hclsm plan --checkpoint RUN` plans with this run's model."
    rows = "\n".join(f"| {name} | {r['success_rate']:.0%} | {r['coverage_success_rate']:.0%} | "
                     f"{r['mean_final_distance_px']:.1f} | {r['plan_ms_per_step']:.0f} |"
                     for name, r in p["results"].items())
    starts = "; ".join(f"episode {e}, frame {t}" for e, t in p["starts"])
    pc = p["planner"]
    w = p.get("cost_weights", {"slot_positions": 2.0, "proprio": 1.0})
    gifs = "\n\n".join(f"![{g}](plan/{g})" for g in p["gifs"])
    return head + f"""From {len(p['starts'])} held-out start states ({starts}) the goal is the state after
replaying the next 25 recorded actions in the simulator; each policy has {p['budget']} env steps, and succeeds once the agent and
block positions are within 20 px of the goal's and the block angle within 20°. `mppi` plans with the trained
model ({pc['samples']} candidates x {pc['iterations']} refits over {pc['horizon']} steps, re-planning every
{p['replan_every']} steps). Its cost has two terms: the predicted object slots of the last planned step matched to
the goal frame's by optimal transport (squared distance of unit-norm slot contents and of positions scaled by
{w['slot_positions']:g}), and a proprioception
term ({w['proprio']:g} x the squared distance between the last planned agent target and the goal's agent position).
`mppi_slots_only` is the same planner with the proprioception term off: only what the model predicts for the
objects guides it. `random` acts at random.
{len(p["starts"])} start states say little: `hclsm bench planning` measures 50 (with the scripted pusher and a
true-simulator oracle beside them).

| policy | success | env coverage task | final distance (px) | planning ms per env step |
|---|---|---|---|---|
{rows}

The first episode of each policy, with the goal drawn in red:

{gifs}"""


def _start_note(start: dict) -> str:
    """Where stage 1 started: from scratch, or from the object layers shipped in the package."""
    if start["from"] == "scratch":
        return ("Stage 1 started from scratch (`--from-scratch`): a few hundred steps on two cores cannot find "
                "PushT's objects (the recipe needs thousands), so expect the objects below not to be found.")
    return (f"Stage 1 started from the object layers shipped in the package (`hclsm.assets`, `{start['from']}`: "
            f"{start['steps']} stage-1 steps of the PushT recipe, trained by `{start['command']}`) and continued "
            f"them on this demo's data; the dynamics (stage 2) are trained here from scratch. "
            f"`hclsm demo --from-scratch` trains everything from scratch.")


def render_report(cfg: Config, s: dict, r: dict) -> str:
    """``report.md`` of a demo run: ``s`` the PushT data summary, ``r`` the record ``run_demo`` writes to
    ``metrics.json`` (trained / untrained metrics, training facts, figures shown, timings)."""
    d, tr, m, u, sec = cfg.data.pusht, r["train"], r["trained"], r["untrained"], r["seconds"]
    tr2, dyn, shown = tr["stage2"], r["dynamics"], r["figures"]
    l1, l2 = tr["final_losses"], tr2["final_losses"]
    object_rows = [  # label, key, format, the seed's indicator (an upper limit) or None
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
    h = dyn["horizon"]
    dynamics_rows = [  # label, key, format, the seed's indicator (an upper limit or a reported range) or None
        ("stage-2 prediction loss (JEPA: slot MSE against the EMA targets)", "jepa", ".4f", SEED_JEPA),
        ("position prediction loss (obj)", "obj", ".4f", None),
        (f"rollout frame MSE (mean over t+1 .. t+{h})", "frame_mse", ".4f", None),
        ("copy-last frame MSE (last context frame repeated)", "frame_mse_copy_last", ".4f", None),
        (f"rollout latent MSE (predicted vs inferred slots, mean over t+1 .. t+{h})", "latent_mse", ".4f", None),
        ("copy-last latent MSE (last context slots repeated)", "latent_mse_copy_last", ".4f", None),
        ("events per 16-frame clip", "events_per_16_frames", ".2f", SEED_EVENTS),
        ("contact onsets per 16-frame clip (truth)", "true_events_per_16_frames", ".2f", None),
        ("event precision (±1 step)", "event_precision", ".3f", None),
        ("event recall (±1 step)", "event_recall", ".3f", None),
        ("event F1 (±1 step)", "event_f1", ".3f", None),
        ("mean event probability", "event_prob", ".3f", None),
    ]
    loss_rows = [("SBD reconstruction", "sbd", SEED_SBD), ("slot diversity", "diversity", SEED_DIVERSITY),
                 ("existence prior", "existence", None), ("object-area prior", "object_area", None),
                 ("JEPA slot prediction", "jepa", None), ("position prediction (obj)", "obj", None),
                 ("decoded next frame (frame)", "frame", None), ("open-loop rollout (rollout)", "rollout", None),
                 ("event detector", "event", None)]
    losses = "\n".join(f"| {label} | {_fmt(l1.get(k), '.4f')} | {_fmt(l2.get(k), '.4f')} | "
                       f"{'—' if lim is None else _indicator(l1.get(k), lim)} |" for label, k, lim in loss_rows)
    per_step = "; ".join(f"t+{i + 1} {_fmt(a, '.4f')} / {_fmt(b, '.4f')}" for i, (a, b) in
                         enumerate(zip(m["frame_mse_per_step"], m["frame_mse_copy_last_per_step"])))
    scaled = "" if dyn["clip_length"] == 16 else (
        f" Events were counted on {dyn['clip_length']}-frame clips (no held-out episode has 16 frames, or "
        f"`model.perception.max_frames` is less) and scaled to 16 frames (x {16 / dyn['clip_length']:.2f}).")
    clips = "; ".join(f"episode {c['episode']}, frames {c['frames'][0]}-{c['frames'][-1]}" for c in shown["clips"])
    slot_pics = "\n\n".join(f"![slot masks, held-out clip {i + 1}](slots_clip{i + 1}.png)"
                            for i in range(len(shown["clips"])))
    ro = shown["rollout"]
    ro_where = f"held-out episode {ro['episode']}, frames {ro['frames'][0]}-{ro['frames'][-1]}"
    rollout_pic = (f"A rollout on {ro_where}: the {ro['context']} context frames, then the model's prediction of "
                   f"the next {ro['horizon']} frames (slots predicted step by step and decoded) against the truth "
                   f"(the decoder's target frames), with the absolute error:\n\n![rollout vs truth](rollout.png)"
                   if ro["frames_drawn"] else f"No rollout frames for {ro_where}: the decoder reconstructs features.")
    pca_pic = ("The slot trajectories of that clip projected to their first two principal components (the slots "
               "inferred from the true frames solid, the rollout dashed from the last context frame):\n\n"
               "![slot trajectories (PCA)](slots_pca.png)"
               if ro["pca_drawn"] else "No slot trajectories to project: no slot was alive in that clip.")
    if "graph" in shown:
        g = shown["graph"]
        edges = ", ".join(f"{i} → {j}" for i, j in g["edges"]) or "none"
        graph_note = ("The causal graph was on (`model.causal.enabled`): every message between objects in the "
                      "dynamics read only along it. Not in this demo: memory.")
        graph_pic = ("The learned causal graph after the same stretch, drawn on its last frame: a node per alive "
                     "object slot at its position, an arrow from sender to receiver per edge (logit > 0; wider = "
                     f"more probable). Edges: {edges} ({g['alive_slots']} object slots alive). PushT has no "
                     "ground-truth graph; `hclsm bench causal` scores the graph against true ones.\n\n"
                     "![learned causal graph](causal_graph.png)")
    else:
        graph_note = ("Not in this demo: the causal graph (off in this config; `--set model.causal.enabled=true` "
                      "turns it on and draws it below) and memory.")
        graph_pic = "No causal graph to draw: `model.causal.enabled` is false in this run."
    planning = _planning_section(r.get("planning") or {"skipped": "not run"})
    first, n_long = shown["count_first_frame"], shown["count_frames"]
    stretch = f"frames {first}-{first + n_long - 1} of held-out episode {shown['count_episode']}"
    stages = "\n".join(
        f"| {label} | {t['clip_length']} frames | {planned} | {t['steps']} | {t['seconds']:.0f} s | "
        f"{t['skipped']} | `train/stage{i + 1}/` |"
        for i, (label, t, planned) in enumerate((("1: objects", tr, tr["planned_steps"][0]),
                                                  ("2: dynamics + objects", tr2, tr["planned_steps"][1]))))
    start = r.get("start") or {"from": "scratch"}
    started = ("from scratch" if start["from"] == "scratch" else
               f"continuing the shipped PushT object model `{start['from']}`")
    return f"""# hclsm demo report

Stages run: **data** (PushT from the gym-pusht simulator); **HCLSM stage 1, the objects** (perception, slot
attention with existence / birth / death, spatial broadcast decoder; SBD, diversity, existence and
object-area losses), trained {tr['steps']} steps in {tr['seconds'] / 60:.1f} min {started}; and **HCLSM stage 2, the
dynamics** (hierarchical dynamics: per-object and global SSMs, the relation GNN, the event detector and event
transformer, the goal compressor; JEPA slot prediction against an EMA target, position prediction, the
decoded next frame, an open-loop rollout term and the event losses, on top of the stage-1 losses), trained
{tr2['steps']} steps in {tr2['seconds'] / 60:.1f} min;
then both evaluated on held-out episodes. {graph_note}

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

## Training: HCLSM stages 1 and 2

The `{cfg.preset}` HCLSM ({tr['parameters']:,} trainable parameters, {cfg.model.slots.num_slots} object slots
+ {'a background slot' if cfg.model.slots.background else 'no background slot'}, frames at
{cfg.model.perception.image_size} px, batch {cfg.train.batch_size}) on the training episodes, counted in steps
(`hclsm demo --steps S1 S2`: the same model on a loaded machine as on a quiet one); stage 2 continues stage 1's
model (its EMA target included). {_start_note(r.get("start") or {"from": "scratch"})}

| stage | clips | planned steps | steps run | time | skipped steps | run directory |
|---|---|---|---|---|---|---|
{stages}

Each run directory has its config, `log.jsonl`, TensorBoard logs in `tb/`, the checkpoint in `checkpoints/`
and `summary.json`. Steps with a non-finite loss are skipped.

| final training losses (last logging interval, unweighted) | stage 1 | stage 2 | seed's indicator (stage 1) |
|---|---|---|---|
{losses}

## Objects on held-out episodes

{r['clips']} clips of {r['eval_clip_length']} frames from the held-out episodes
({', '.join(map(str, r['val_episodes']))}); masks are compared with the simulator's (agent, block, goal region).
The model is the final one (after both stages); the baseline is the same model untrained (step 0, the same
initialisation).

| metric | trained | untrained | seed's indicator (trained) |
|---|---|---|---|
{_table(object_rows, m, u)}

{_objects_verdict(cfg, m)}

## Dynamics on held-out episodes

{dyn['clips']} of the {dyn['of_clips']} non-overlapping {dyn['clip_length']}-frame clips of the held-out
episodes, spread over them (stage 2 trained on {tr2['clip_length']}-frame clips), in eval mode. The prediction
losses are the model's own stage-2 losses on these clips. Rollouts: the first {dyn['context']} frames are
context, the next {h} are predicted step by step (the recorded actions given) and decoded, against the
copy-last baselines; latent errors compare the predicted slots with the slots inferred from the true frames
(matched per frame, over slots alive in both). Events: where the event gate fires over each clip, against the
onsets of agent-block contact in the simulator.{scaled}

| metric | trained | untrained | seed's indicator (trained) |
|---|---|---|---|
{_table(dynamics_rows, m, u)}

Frame MSE by predicted step, trained rollout / copy-last: {per_step}.

A low JEPA loss alone is not good prediction: slots that barely change from frame to frame (as an untrained
model's do) make predicting no change easy. The rollout errors against copy-last say whether the dynamics
predict better than no change.

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

{rollout_pic}

{pca_pic}

Alive object slots per frame against the number of visible objects, over {stretch} (the held-out stretch with
the most contact onsets; one clip, slots carried from frame to frame):

![alive slots per frame](alive_count.png)

The event detector over the same stretch: the event probability per step, the learned threshold, the steps
where the gate fired (steps {_steps(shown['events_fired'])}) and the true contact onsets (steps
{_steps(shown['contact_onsets'])}):

![event timeline](event_timeline.png)

{graph_pic}

{planning}

Times: data {sec['data']:.0f} s, baseline {sec['baseline']:.0f} s, training {sec['train']:.0f} s (both stages, with
loading their data), evaluation and pictures {sec['evaluation']:.0f} s, planning {sec.get('planning', 0):.0f} s;
total {sec['total']:.0f} s. Config:
`config.yaml`; every number: `metrics.json`.
"""
