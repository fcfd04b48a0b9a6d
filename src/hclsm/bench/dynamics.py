"""Benchmarks of HCLSM's dynamics: ``dynamics`` (rollouts), ``dynamics-pusht`` (its PushT row alone) and ``events``
(event detection).

* ``dynamics``: physics scenes (3-6 balls, 64 px). The tiny HCLSM trains both stages for a fixed number of
  steps (``STEPS``); a flat (no-slot) SSM with a matched number of trainable parameters trains as many steps.
  On held-out clips both roll out ``HORIZON`` frames autoregressively from ``CONTEXT`` frames; the table
  gives pixel MSE (decoder resolution) against the truth beside the copy-last-frame baseline, and the
  latent error of the predicted slots beside copying the last context slots. A PushT row: the tiny HCLSM with the
  PushT recipe, stage 1 continuing the shipped PushT object layers (finding PushT's objects takes 8000 stage-1
  steps) and stage 2 learning the dynamics (``PUSHT_STEPS``), on scripted-pusher episodes of the real simulator
  that those layers never saw, rolled out from the recorded actions (``pusht_ratio_vs_copy_last``).
* ``events``: the same HCLSM training; the dynamics' event gate on held-out clips against the simulator's
  contact events (tolerance +-1 step): precision, recall, F1, events per 16-frame clip.

Trained runs go to a temporary directory, or to ``HCLSM_BENCH_KEEP`` when that names a directory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from hclsm import keys
from hclsm.bench import BenchResult, register
from hclsm.bench.objects import val_clips
from hclsm.config import PUSHT_RECIPE, Config, load_config
from hclsm.config.data import PhysicsDataConfig, PushTDataConfig
from hclsm.data.memory import MemoryClips
from hclsm.data.physics import generate_physics_dataset
from hclsm.data.pusht import generate_pusht_dataset
from hclsm.eval.dynamics import event_metrics, rollout_metrics
from hclsm.models.flat import flat_config_matching
from hclsm.train import train, train_two_stages


def _machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}


# ---- dynamics and events: train on physics scenes, evaluate on held-out clips --------------------------

CONTEXT, HORIZON = 6, 10  # rollout: frames given, frames predicted
STAGE1_CLIP, STAGE2_CLIP = 4, 8  # frames per training clip: stage 1 learns per-frame objects, stage 2 dynamics


def _physics(root: Path, quick: bool, seed: int) -> PhysicsDataConfig:
    cfg = PhysicsDataConfig(episodes=24 if quick else 300, frames=32 if not quick else CONTEXT + HORIZON + 2,
                            image_size=64, min_objects=3, max_objects=6, seed=seed)
    generate_physics_dataset(root, cfg, progress=False)
    return cfg


# training counted in steps (stage 1, stage 2), the same model whatever the machine's load
STEPS, STEPS_QUICK = (2000, 600), (30, 10)


def _train_config(steps: int, seed: int, clip: int, *overrides: str) -> Config:
    return load_config("tiny", overrides=[f"train.steps={steps}", f"train.warmup_steps={min(100, steps // 10)}",
                                          "train.eval_every=0", "train.ckpt_every=0", f"train.seed={seed}",
                                          f"data.clip.length={clip}", *overrides])


def train_hclsm(root: Path, runs: Path, steps: tuple[int, int], seed: int, progress: bool,
                overrides: Sequence[str] = (), model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """The tiny HCLSM's two stages (``train_two_stages``): ``steps[0]`` stage-1 steps on 4-frame clips, then
    ``steps[1]`` stage-2 steps on 8-frame clips; ``overrides`` are dotted config settings; ``model``: start from it
    (e.g. shipped object layers) instead of a new model."""
    s1, s2 = train_two_stages(_train_config(sum(steps), seed, STAGE2_CLIP, *overrides), root, runs / "hclsm",
                              stage1_clip=STAGE1_CLIP, progress=progress, steps=steps, model=model)
    return s2.model, {"stage1_steps": s1.steps, "stage2_steps": s2.steps, "minutes": (s1.seconds + s2.seconds) / 60,
                      "skipped": s1.skipped + s2.skipped, **{f"final_{k}": v for k, v in s2.losses.items()}}


@contextlib.contextmanager
def trained_hclsm(name: str, quick: bool, seed: int, data: PhysicsDataConfig | None = None,
                  overrides: Sequence[str] = (), steps: tuple[int, int] | None = None) -> Iterator[tuple]:
    """Generate the physics scenes (``data``, default 3-6 balls) and train the tiny HCLSM's two stages (with the
    dotted config ``overrides``; ``steps`` = (stage 1, stage 2) steps, default ``STEPS``) in a temporary directory;
    yields (data root, runs directory, data config, the trained model on the CPU in eval mode, training facts
    (steps and the minutes they took)). Runs go to ``HCLSM_BENCH_KEEP`` when it names a directory."""
    steps = steps or (STEPS_QUICK if quick else STEPS)
    keep = os.environ.get("HCLSM_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix=f"hclsm-bench-{name}-") as tmp:
        runs = Path(keep) if keep else Path(tmp)
        root = Path(tmp) / "physics"
        if data is None:
            data = _physics(root, quick, seed)
        else:
            generate_physics_dataset(root, data, progress=False)
        model, info = train_hclsm(root, runs, steps, seed, progress=not quick, overrides=overrides)
        yield root, runs, data, model.cpu().eval(), info


@torch.no_grad()
def flat_rollout_mse(model: torch.nn.Module, clips: MemoryClips) -> dict[str, float]:
    """Frame MSE (per step and over the horizon) of the flat SSM's rollouts on ``clips``."""
    model.eval()
    errs = []
    for batch in clips.batches(16):
        video = batch[keys.VIDEO][:, :CONTEXT + HORIZON]
        roll = model.rollout(video[:, :CONTEXT], HORIZON)
        r = roll.frames.shape[-1]
        truth = F.interpolate(video[:, CONTEXT:].flatten(0, 1), size=(r, r), mode="area").reshape(roll.frames.shape)
        errs.append((roll.frames.float() - truth).pow(2).flatten(2).mean(-1))  # (B, H)
    e = torch.cat(errs)
    return {"frame_mse": float(e.mean()), "frame_mse_per_step": e.mean(0).tolist()}


PUSHT_EPISODES = {False: 40, True: 6}  # PushT episodes of 100 (quick: 40) scripted-pusher steps for the PushT row
# PushT: (stage 1, stage 2) steps from the shipped object layers (finding PushT's objects takes 8000 stage-1 steps,
# hclsm bench objects-pusht; those layers are shipped as hclsm.assets pusht_objects_tiny and continued here)
PUSHT_STEPS, PUSHT_STEPS_QUICK = (100, 600), (5, 5)
PUSHT_START = "pusht_objects_tiny"


def pusht_world_model(root: Path, runs: Path, steps: tuple[int, int], seed: int, progress: bool,
                      overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, dict]:
    """The tiny HCLSM with the PushT recipe (``hclsm.config.PUSHT_RECIPE``) on the PushT dataset at ``root``: stage 1
    continues the shipped object layers (``hclsm.assets`` ``PUSHT_START``) for ``steps[0]`` steps, stage 2 trains
    the dynamics for ``steps[1]``; the model (CPU, eval mode) and the training facts."""
    from hclsm.assets import load_object_layers
    from hclsm.models import build_model
    from hclsm.train.loop import seed_everything

    cfg = _train_config(sum(steps), seed, STAGE2_CLIP, *PUSHT_RECIPE, *overrides)
    seed_everything(seed)
    start = build_model(cfg.model)
    load_object_layers(start, PUSHT_START)
    model, info = train_hclsm(root, runs, steps, seed, progress, [*PUSHT_RECIPE, *overrides], model=start)
    return model.cpu().eval(), info | {"start": PUSHT_START}


def _pusht_rollouts(quick: bool, seed: int) -> tuple[dict[str, Any], dict]:
    """The PushT row: the PushT world model (``pusht_world_model``) on scripted-pusher episodes of the real simulator
    (env seeds from ``PUSHT_FRESH_SEED`` on: episodes the shipped object layers never saw), then open-loop rollouts
    of held-out clips from the recorded actions (``CONTEXT`` frames given, ``HORIZON`` predicted); the rollout
    metrics and the training facts."""
    from hclsm.assets import PUSHT_FRESH_SEED

    keep = os.environ.get("HCLSM_BENCH_KEEP")
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-dynamics-pusht-") as tmp:
        root = Path(tmp) / "pusht"
        generate_pusht_dataset(root, PushTDataConfig(episodes=PUSHT_EPISODES[quick], max_steps=40 if quick else 100,
                                                     seed=seed + PUSHT_FRESH_SEED), progress=False)
        model, info = pusht_world_model(root, Path(keep) / "pusht" if keep else Path(tmp) / "runs",
                                        PUSHT_STEPS_QUICK if quick else PUSHT_STEPS, seed, not quick)
        clips = val_clips(root, _train_config(1, seed, STAGE2_CLIP, *PUSHT_RECIPE), CONTEXT + HORIZON)
        return rollout_metrics(model, clips.batches(16), CONTEXT, HORIZON), info


def _pusht_metrics(pusht: dict, info: dict) -> dict:
    return {"pusht_frame_mse": pusht["frame_mse"], "pusht_frame_mse_copy_last": pusht["frame_mse_copy_last"],
            "pusht_ratio_vs_copy_last": pusht["frame_mse"] / pusht["frame_mse_copy_last"],
            "pusht_latent_mse": pusht["latent_mse"], "pusht_latent_mse_copy_last": pusht["latent_mse_copy_last"],
            "pusht_clips": pusht["clips"], **{f"pusht_{k}": v for k, v in info.items()}}


def _pusht_rows(pusht: dict) -> list[dict]:
    return [{"model": "PushT: hclsm (PushT recipe, action-conditioned)", "frame_mse": pusht["frame_mse"],
             "latent_mse": pusht["latent_mse"], "frame_mse_t+1": pusht["frame_mse_per_step"][0],
             f"frame_mse_t+{HORIZON}": pusht["frame_mse_per_step"][-1]},
            {"model": "PushT: copy last frame / last slots", "frame_mse": pusht["frame_mse_copy_last"],
             "latent_mse": pusht["latent_mse_copy_last"], "frame_mse_t+1": pusht["frame_mse_copy_last_per_step"][0],
             f"frame_mse_t+{HORIZON}": pusht["frame_mse_copy_last_per_step"][-1]}]


@register("dynamics-pusht")
def bench_dynamics_pusht(quick: bool, seed: int) -> BenchResult:
    """The PushT row of ``hclsm bench dynamics`` alone: the same data, steps and metrics."""
    pusht, info = _pusht_rollouts(quick, seed)
    config = {"pusht_episodes": PUSHT_EPISODES[quick], "context": CONTEXT, "horizon": HORIZON,
              "steps": list(PUSHT_STEPS_QUICK if quick else PUSHT_STEPS), "clip_lengths": [STAGE1_CLIP, STAGE2_CLIP],
              "pusht_recipe": list(PUSHT_RECIPE), "preset": "tiny", **_machine()}
    title = (f"dynamics-pusht: held-out PushT clips, {CONTEXT} context frames -> {HORIZON}-frame rollout under the "
             f"recorded actions; pixel MSE at the decoder's resolution; hclsm from the shipped object layers, "
             f"{info['stage1_steps']} + {info['stage2_steps']} steps ({info['minutes']:.1f} min) (target: <= 0.6x "
             f"copy-last)")
    return BenchResult(metrics=_pusht_metrics(pusht, info), config=config, rows=_pusht_rows(pusht), title=title)


@register("dynamics")
def bench_dynamics(quick: bool, seed: int) -> BenchResult:
    with trained_hclsm("dynamics", quick, seed) as (root, runs, data, model, info):
        # the flat SSM gets as many optimizer steps as HCLSM's two stages together, on the stage-2 clips
        base = _train_config(info["stage1_steps"] + info["stage2_steps"], seed, STAGE2_CLIP)
        clips = val_clips(root, base, CONTEXT + HORIZON)
        m = rollout_metrics(model, clips.batches(16), CONTEXT, HORIZON)
        ev = event_metrics(model, clips.batches(16))
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flat_cfg = flat_config_matching(base.model, n_params)
        flat = train(dataclasses.replace(base, model=flat_cfg), root, run_dir=runs / "flat-ssm", progress=not quick)
        f = flat_rollout_mse(flat.model.cpu(), clips)
        flat_params = sum(p.numel() for p in flat.model.parameters() if p.requires_grad)
    pusht, pusht_info = _pusht_rollouts(quick, seed)
    copy = m["frame_mse_copy_last"]
    metrics = {"frame_mse": m["frame_mse"], "frame_mse_copy_last": copy, "ratio_vs_copy_last": m["frame_mse"] / copy,
               "flat_frame_mse": f["frame_mse"], "ratio_vs_flat": m["frame_mse"] / f["frame_mse"],
               "latent_mse": m["latent_mse"], "latent_mse_copy_last": m["latent_mse_copy_last"],
               "event_f1": ev.get("event_f1"), "events_per_clip": ev["events_per_clip"],
               "hclsm_params": n_params, "flat_params": flat_params, "clips": m["clips"],
               "flat_steps": flat.steps, **info,
               **_pusht_metrics(pusht, pusht_info)}
    rows = [{"model": "hclsm (objects + hierarchical dynamics)", "params": n_params,
             "frame_mse": m["frame_mse"], "latent_mse": m["latent_mse"],
             "frame_mse_t+1": m["frame_mse_per_step"][0], f"frame_mse_t+{HORIZON}": m["frame_mse_per_step"][-1]},
            {"model": "flat SSM (no slots), same budget", "params": flat_params, "frame_mse": f["frame_mse"],
             "frame_mse_t+1": f["frame_mse_per_step"][0], f"frame_mse_t+{HORIZON}": f["frame_mse_per_step"][-1]},
            {"model": "copy last frame / last slots", "frame_mse": copy, "latent_mse": m["latent_mse_copy_last"],
             "frame_mse_t+1": m["frame_mse_copy_last_per_step"][0],
             f"frame_mse_t+{HORIZON}": m["frame_mse_copy_last_per_step"][-1]}, *_pusht_rows(pusht)]
    config = {"physics_episodes": data.episodes, "pusht_episodes": PUSHT_EPISODES[quick], "context": CONTEXT, "horizon": HORIZON,
              "steps": [info["stage1_steps"], info["stage2_steps"]], "flat_steps": flat.steps,
              "clip_lengths": [STAGE1_CLIP, STAGE2_CLIP], "preset": "tiny", **_machine()}
    title = (f"dynamics: held-out physics clips, {CONTEXT} context frames -> {HORIZON}-frame rollout; pixel MSE at "
             f"the decoder's resolution; hclsm {info['stage1_steps']} + {info['stage2_steps']} steps "
             f"({info['minutes']:.1f} min), the flat SSM {flat.steps} (target: hclsm <= 0.6x copy-last and below the "
             f"flat SSM)")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


@register("events")
def bench_events(quick: bool, seed: int) -> BenchResult:
    with trained_hclsm("events", quick, seed) as (root, _, data, model, info):
        clips = val_clips(root, _train_config(1, seed, STAGE2_CLIP), 16)
        ev = event_metrics(model, clips.batches(16))
    threshold = float(torch.sigmoid(model.dynamics.detector.threshold_logit))
    metrics = {"event_f1": ev.get("event_f1"), "event_precision": ev.get("event_precision"),
               "event_recall": ev.get("event_recall"), "events_per_clip": ev["events_per_clip"],
               "true_events_per_clip": ev.get("true_events_per_clip"), "threshold": threshold, "clips": ev["clips"],
               **info}
    rows = [{"detector": "hclsm L1 (surprise-trained)", "precision": ev.get("event_precision"),
             "recall": ev.get("event_recall"), "f1": ev.get("event_f1"), "events_per_16_frames": ev["events_per_clip"],
             "true_events_per_16_frames": ev.get("true_events_per_clip"), "threshold": threshold}]
    config = {"physics_episodes": data.episodes, "clip_length": 16, "tolerance_steps": 1,
              "steps": [info["stage1_steps"], info["stage2_steps"]], "preset": "tiny", **_machine()}
    title = (f"events: the dynamics' event gate vs the simulator's contact events (+-1 step) on held-out 16-frame "
             f"physics clips; {info['stage1_steps']} + {info['stage2_steps']} training steps (target F1 >= 0.7)")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
