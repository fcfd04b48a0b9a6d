"""HCLSM's two-stage protocol, counted in steps, each stage on its own clip length.

Stage 1 learns per-frame objects (slots carried between frames), which short clips serve best: cheaper steps.
Stage 2 learns dynamics, which needs clips long enough to show motion. One ``train`` run has one clip length, so
``train_two_stages`` runs two: ``steps[0]`` stage-1 steps on ``stage1_clip``-frame clips (``RUN/stage1``), then
``steps[1]`` stage-2 steps (the full loss) on ``data.clip.length``-frame clips (``RUN/stage2``), starting from the
stage-1 model, its EMA target included. The object layers' progress-driven schedules (slot-query noise annealed
to 0, the existence prior ramped in) run their whole course in stage 1, so stage 2 sees them finished
(``train.progress_start = 1``) instead of starting them over. Each stage is an ordinary run: logs, checkpoints,
summary. Counting steps, not minutes, trains the same model on a loaded machine as on a quiet one.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from hclsm.config import Config
from hclsm.errors import ConfigError
from hclsm.train.loop import EvalFn, TrainResult, train

STAGE2_WARMUP = 20  # warmup steps of stage 2 (it continues a trained model)


def stage_configs(cfg: Config, steps: tuple[int, int], stage1_clip: int = 4) -> tuple[Config, Config]:
    """The configs of the two runs: ``steps`` = (stage-1 steps, stage-2 steps), no time limit."""
    if len(steps) != 2 or min(steps) < 1:
        raise ConfigError(f"steps: both stages need at least one step, got {tuple(steps)}")
    t, clip = cfg.train, cfg.data.clip
    s1 = dataclasses.replace(cfg, train=dataclasses.replace(t, stage=1, stage1_fraction=1.0, max_minutes=0.0,
                                                            steps=steps[0], warmup_steps=min(t.warmup_steps, steps[0])),
                             data=dataclasses.replace(cfg.data, clip=dataclasses.replace(
                                 clip, length=min(stage1_clip, clip.length))))
    s2 = dataclasses.replace(cfg, train=dataclasses.replace(t, stage=2, max_minutes=0.0, steps=steps[1],
                                                            warmup_steps=min(STAGE2_WARMUP, steps[1]),
                                                            progress_start=1.0))
    return s1, s2


def train_two_stages(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike, steps: tuple[int, int],
                     *, stage1_clip: int = 4, progress: bool = True, eval_fn: EvalFn | None = None,
                     model: nn.Module | None = None) -> tuple[TrainResult, TrainResult]:
    """Train ``steps[0]`` stage-1 steps then ``steps[1]`` stage-2 steps into ``run_dir/stage1`` and
    ``run_dir/stage2``; returns both results (the second holds the final model).

    ``model``: start stage 1 from it (e.g. object layers already trained) instead of a new model; its schedules
    are then taken as finished (stage 1 runs with ``train.progress_start = 1``, as stage 2 does)."""
    s1_cfg, s2_cfg = stage_configs(cfg, steps, stage1_clip)
    if model is not None:
        s1_cfg = dataclasses.replace(s1_cfg, train=dataclasses.replace(s1_cfg.train, progress_start=1.0))
    run_dir = Path(run_dir)
    s1 = train(s1_cfg, data_root, run_dir=run_dir / "stage1", progress=progress, eval_fn=eval_fn, model=model)
    s2 = train(s2_cfg, data_root, run_dir=run_dir / "stage2", model=s1.model, progress=progress, eval_fn=eval_fn)
    return s1, s2
