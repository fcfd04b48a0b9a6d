"""HCLSM's two-stage protocol on a wall-clock budget, each stage on its own clip length.

Stage 1 learns per-frame objects (slots carried between frames), which short clips serve best: more
steps in the budget. Stage 2 learns dynamics, which needs clips long enough to show motion. One
``train`` run has one clip length, so ``train_two_stages`` runs two: stage 1 for
``train.stage1_fraction`` of the budget on ``stage1_clip``-frame clips (``RUN/stage1``), then stage 2 (the
full loss) for the rest on ``data.clip.length``-frame clips (``RUN/stage2``), starting from the stage-1
model, its EMA target included. The object layers' progress-driven schedules (slot-query noise annealed
to 0, the existence prior ramped in) run their whole course in stage 1, so stage 2 sees them finished
(``train.progress_start = 1``) instead of starting them over. Each stage is an ordinary run: logs,
checkpoints, summary.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hclsm.config import Config
from hclsm.errors import ConfigError
from hclsm.train.loop import EvalFn, TrainResult, train

STAGE2_WARMUP = 20  # warmup steps of stage 2 (it continues a trained model)


def stage_configs(cfg: Config, minutes: float, stage1_clip: int = 4, steps: tuple[int, int] | None = None
                  ) -> tuple[Config, Config]:
    """The configs of the two runs: ``minutes`` split by ``train.stage1_fraction``, or, with ``steps`` = (stage-1
    steps, stage-2 steps), exactly those steps with no time limit (``minutes`` unused): the same training
    whatever the machine's load."""
    if steps is not None:
        if min(steps) < 1:
            raise ConfigError(f"steps: both stages need at least one step, got {tuple(steps)}")
        s1, s2 = stage_configs(cfg, 1.0, stage1_clip)
        return tuple(dataclasses.replace(c, train=dataclasses.replace(c.train, max_minutes=0.0, steps=n,
                                                                      warmup_steps=min(c.train.warmup_steps, n)))
                     for c, n in ((s1, steps[0]), (s2, steps[1])))
    if not minutes > 0:
        raise ConfigError(f"train.max_minutes: the two-stage budget must be > 0 minutes, got {minutes}")
    share = cfg.train.stage1_fraction
    if not 0 < share < 1:
        raise ConfigError(f"train.stage1_fraction: both stages need a share of the budget, so it must be strictly "
                          f"between 0 and 1, got {share}")
    clip = cfg.data.clip
    s1_clip = dataclasses.replace(clip, length=min(stage1_clip, clip.length))
    s1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=1, stage1_fraction=1.0,
                                                            max_minutes=minutes * share),
                             data=dataclasses.replace(cfg.data, clip=s1_clip))
    s2 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=2, max_minutes=minutes * (1 - share),
                                                            warmup_steps=min(STAGE2_WARMUP, cfg.train.steps),
                                                            progress_start=1.0))
    return s1, s2


def train_two_stages(cfg: Config, data_root: str | os.PathLike, run_dir: str | os.PathLike, minutes: float, *,
                     stage1_clip: int = 4, progress: bool = True, eval_fn: EvalFn | None = None,
                     steps: tuple[int, int] | None = None) -> tuple[TrainResult, TrainResult]:
    """Train stage 1 then stage 2 into ``run_dir/stage1`` and ``run_dir/stage2``; returns both results (the
    second holds the final model). ``steps`` = (stage 1, stage 2) counts the stages in steps instead of
    ``minutes`` (see ``stage_configs``)."""
    s1_cfg, s2_cfg = stage_configs(cfg, minutes, stage1_clip, steps)
    run_dir = Path(run_dir)
    s1 = train(s1_cfg, data_root, run_dir=run_dir / "stage1", progress=progress, eval_fn=eval_fn)
    s2 = train(s2_cfg, data_root, run_dir=run_dir / "stage2", model=s1.model, progress=progress, eval_fn=eval_fn)
    return s1, s2
