"""``hclsm bench objects``: does the object layer find the objects, and count them?

Physics scenes (3-6 balls, 64x64): train the tiny HCLSM's stage 1 for a fixed number of steps, then
on held-out episodes report video-level FG-ARI, mIoU (Hungarian) and how often the number of alive
slots equals the number of visible balls (per frame, and on every frame of a clip). Birth and death
are measured on the counterfactual twins where one ball is *removed* at step t: death = the count
drops on the removal and a slot dies; birth = the same clip played backwards (a ball appears).
A fixed-slot baseline (existence gating never on in training: all N_max slots stay alive) gets the
same budget. PushT: stage 1 on simulator episodes with the PushT recipe (``hclsm.config.PUSHT_RECIPE``), and
the same without the agent's proprioception cue; IoU of the agent and block masks against the simulator's,
the fraction of frames with exactly two alive object slots, and how far the alpha maps are from uniform.

The trained runs (config, logs, final checkpoint) are written to a temporary directory and deleted,
unless the environment variable ``HCLSM_BENCH_KEEP`` names a directory to keep them in.
"""
from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from hclsm.bench import BenchResult, register
from hclsm.config import PUSHT_RECIPE, Config, load_config
from hclsm.config.data import PhysicsDataConfig, PushTDataConfig
from hclsm.data.memory import MemoryClips
from hclsm.data.physics import PhysicsSource, generate_physics_dataset
from hclsm.data.pusht import generate_pusht_dataset
from hclsm.eval.objects import decomposer, evaluate_objects, pusht_metrics, true_counts
from hclsm.train import train
from hclsm.train.data import run_split, split_clips


PHYSICS_STEPS = 4000  # stage-1 steps per physics model (the full bench; what the object layer needs to converge)
PUSHT_STEPS = 8000  # stage-1 steps on PushT (the recipe: ~35 min on one loaded core)
QUICK_STEPS = 40  # --quick: a smoke run


def _config(steps: int, seed: int, *overrides: str) -> Config:
    """The tiny HCLSM's stage 1 for ``steps`` optimizer steps (counted in steps: a loaded machine trains the same
    model), batch 16, 4-frame clips."""
    return load_config("tiny", overrides=[f"train.steps={steps}", f"train.warmup_steps={min(100, steps // 10)}",
                                          "train.eval_every=0", "train.ckpt_every=0", f"train.seed={seed}",
                                          "train.stage1_fraction=1.0", "data.clip.length=4", *overrides])


def val_clips(root: Path, cfg: Config, length: int) -> MemoryClips:
    """Non-overlapping held-out clips of ``length`` frames (the training loop's split of ``cfg``), at the model's size."""
    return split_clips(root, cfg, length)


@torch.no_grad()
def birth_death(model: torch.nn.Module, root: Path, episodes: list[int], frames: int = 6) -> dict[str, float]:
    """On removal twins: a clip of ``frames`` frames centred on the removal step. Death fires when the
    alive count drops by one within two frames of the removal and a slot dies there; birth when the
    reversed clip's count rises by one and a slot is born there."""
    net = decomposer(model).eval()
    size = net.cfg.perception.image_size
    source = PhysicsSource(root)
    death_ok, birth_ok, n = [], [], 0
    for e in episodes:
        twin = source.load_episode(e, counterfactual=True)
        if twin["intervention_kind"] != "remove":
            continue
        t = twin["intervention_step"]
        start = int(np.clip(t - frames // 2, 0, len(twin["video"]) - frames))
        sl = slice(start, start + frames)
        video = torch.from_numpy(np.array(twin["video"][sl])).permute(0, 3, 1, 2).float()[None] / 255
        if video.shape[-1] != size:
            video = torch.nn.functional.interpolate(video[0], size=(size, size), mode="area")[None]
        mask = torch.from_numpy(twin["mask"][sl].astype(np.int64))[None]
        i = t - start  # first frame without the removed ball
        truth = true_counts(mask)[0]
        if not (truth[:i] == truth[0]).all() or not (truth[i:] == truth[0] - 1).all():
            continue  # the removed ball was occluded / not visible: no count change to detect
        n += 1
        for clip, ok, born in ((video, death_ok, False), (video.flip(1), birth_ok, True)):
            out = net(clip)
            count = out.count[0]
            j = i if not born else frames - i  # the frame where the count should change
            before, after = count[:j].float().mode().values, count[j:].float().mode().values
            events = (out.births if born else out.deaths)[0, j:min(j + 2, frames)].any()
            ok.append(float(bool(after == before + (1 if born else -1)) and bool(events)))
    return {"death_fired": float(np.mean(death_ok)) if death_ok else float("nan"),
            "birth_fired": float(np.mean(birth_ok)) if birth_ok else float("nan"), "removal_clips": float(n)}


def _row(name: str, m: dict[str, float], minutes: float, steps: int) -> dict:
    return {"model": name, "minutes": round(minutes, 1), "steps": steps, "fg_ari": m.get("fg_ari"),
            "miou": m.get("miou"), "count_clip_acc": m.get("count_clip_ok"), "count_frame_acc": m.get("count_frame_acc"),
            "count_mae": m.get("count_abs_err"), "death_fired": m.get("death_fired"), "birth_fired": m.get("birth_fired")}


# the PushT rows: the recipe (hclsm.config.PUSHT_RECIPE), and the same without the agent's proprioception cue
PUSHT_VARIANTS = {
    "pusht": ("hclsm on PushT (recipe)", PUSHT_RECIPE),
    "pusht_nocue": ("hclsm on PushT (recipe, no proprioception cue)",
                    (*(o for o in PUSHT_RECIPE if not o.startswith("model.slots.cue_scale")), "model.slots.cue_scale=0")),
}
PUSHT_EPISODES = {False: 40, True: 6}  # PushT episodes of the full bench / --quick (max 100 / 40 steps each)


def pusht_steps(quick: bool) -> int:
    """Stage-1 steps on PushT: ``PUSHT_STEPS``, or a smoke run's."""
    return QUICK_STEPS // 2 if quick else PUSHT_STEPS


def pusht_rows(tmp: Path, runs: Path, seed: int, quick: bool, variants: dict, rows: list, metrics: dict) -> Config:
    """Stage 1 on PushT simulator episodes for each of ``variants`` (``prefix: (label, overrides)``), scored on the
    held-out episodes (``pusht_metrics``); rows and ``<prefix>_*`` metrics appended. Returns the last config."""
    steps = pusht_steps(quick)
    pusht = PushTDataConfig(episodes=PUSHT_EPISODES[quick], max_steps=40 if quick else 100, seed=seed)
    proot = tmp / "pusht"
    generate_pusht_dataset(proot, pusht, progress=False)
    for prefix, (label, recipe) in variants.items():
        cfg = _config(steps, seed, *recipe)
        run = train(cfg, proot, run_dir=runs / f"objects-{prefix}", progress=not quick)
        p = pusht_metrics(run.model, val_clips(proot, cfg, length=8))
        p |= {"sbd": run.losses.get("sbd"), "train_minutes": run.seconds / 60, "train_steps": run.steps}
        metrics |= {f"{prefix}_{k}": v for k, v in p.items()}
        rows.append({"model": label, "minutes": round(run.seconds / 60, 1), "steps": run.steps,
                     "agent_iou": p["agent_iou"], "block_iou": p["block_iou"],
                     "count2_frames": p["count2_frames"], "alpha_peakedness": p["alpha_peakedness"]})
    return cfg


@register("objects-pusht")
def bench_objects_pusht(quick: bool, seed: int) -> BenchResult:
    """The PushT recipe's row of ``hclsm bench objects`` alone (~35 min on one core instead of the whole bench's
    ~3 h): the same data, steps and metrics."""
    rows: list = []
    metrics: dict = {}
    keep = os.environ.get("HCLSM_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-objects-") as tmp:
        runs = Path(keep) if keep else Path(tmp)
        pusht_rows(Path(tmp), runs, seed, quick, {"pusht": PUSHT_VARIANTS["pusht"]}, rows, metrics)
    steps = pusht_steps(quick)
    config = {"pusht_episodes": PUSHT_EPISODES[quick], "pusht_steps": steps, "pusht_recipe": list(PUSHT_RECIPE),
              "preset": "tiny", "machine": platform.machine(), "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads()}
    title = (f"objects-pusht: tiny HCLSM stage 1 with the PushT recipe, {steps} steps, on {os.cpu_count()} CPUs; "
             f"held-out PushT episodes: agent / block IoU against the simulator's masks (targets >= 0.6), frames "
             f"with two alive object slots (target >= 0.8)")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


@register("objects")
def bench_objects(quick: bool, seed: int) -> BenchResult:
    steps = QUICK_STEPS if quick else PHYSICS_STEPS
    physics = PhysicsDataConfig(episodes=24 if quick else 300, frames=32, image_size=64, min_objects=3, max_objects=6,
                                seed=seed, counterfactual=True)
    rows, metrics = [], {}
    keep = os.environ.get("HCLSM_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-objects-") as tmp:
        runs = Path(keep) if keep else Path(tmp)
        root = Path(tmp) / "physics"
        generate_physics_dataset(root, physics, progress=False)
        results = {}
        for name, extra in (("hclsm (birth/death)", ()), ("fixed slots", ("model.slots.dynamic=false",))):
            cfg = _config(steps, seed, *extra)
            run = train(cfg, root, run_dir=runs / f"objects-physics-{len(results)}", progress=not quick)
            val = val_clips(root, cfg, length=8)
            m = evaluate_objects(run.model, val.batches(16))
            _, val_eps = run_split(physics.episodes, cfg)
            m |= birth_death(run.model, root, val_eps)
            results[name] = m
            rows.append(_row(name, m, run.seconds / 60, run.steps))
            if name.startswith("hclsm"):
                metrics |= {"fg_ari": m["fg_ari"], "fg_ari_frame": m["fg_ari_frame"], "miou": m["miou"],
                            "count_clip_acc": m["count_clip_ok"], "count_frame_acc": m["count_frame_acc"],
                            "count_mae": m["count_abs_err"], "death_fired": m["death_fired"],
                            "birth_fired": m["birth_fired"], "removal_clips": m["removal_clips"],
                            "train_minutes": run.seconds / 60, "train_steps": run.steps,
                            "final_sbd": run.losses.get("sbd")}
            else:
                metrics |= {"fixed_fg_ari": m["fg_ari"], "fixed_miou": m["miou"],
                            "fixed_count_clip_acc": m["count_clip_ok"], "fixed_count_frame_acc": m["count_frame_acc"]}

        cfg = pusht_rows(Path(tmp), runs, seed, quick, PUSHT_VARIANTS, rows, metrics)
    config = {"physics_episodes": physics.episodes, "val_fraction": cfg.train.val_fraction, "steps": steps,
              "pusht_episodes": PUSHT_EPISODES[quick], "pusht_steps": pusht_steps(quick), "pusht_recipe": list(PUSHT_RECIPE),
              "preset": "tiny",
              "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    title = (f"objects: tiny HCLSM stage 1, {steps} steps per physics model and {pusht_steps(quick)} on PushT, on "
             f"{os.cpu_count()} CPUs; held-out physics episodes (3-6 balls, 64 px) and PushT")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
