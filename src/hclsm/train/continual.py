"""Training on a sequence of datasets, one after another, with EWC between them (``hclsm train --continual``).

Task 1 trains as an ordinary run (the config's stage schedule). After each task the diagonal Fisher of its
training loss is estimated on its training clips and consolidated with the earlier tasks' (``hclsm.train.ewc``);
every later task starts from the previous task's weights (a fresh optimizer), trains in the final stage of the
schedule with the object layers' schedules finished (``train.progress_start = 1``), and adds the EWC penalty
(weight ``train.loss.ewc``). With ``train.rehearsal_clips`` > 0 the later tasks also replay clips of the finished
ones (``hclsm.train.rehearsal``): a bounded buffer split evenly over them fills ``train.rehearsal_fraction`` of
every batch. A run directory::

    RUN/config.yaml              the config (each task's own config.yaml is derived from it)
    RUN/continual.json           the datasets, in order
    RUN/taskI/                   an ordinary run per dataset: config.yaml, log.jsonl, checkpoints/, summary.json
    RUN/taskI/ewc.safetensors    the EWC state after task I (Fisher of tasks 1..I summed, anchors = its weights)

``train_continual(..., resume=True)`` continues where the run stopped: finished tasks are loaded from their last
checkpoint, the interrupted one resumes from its newest checkpoint (which holds the EWC state it trains under),
a missing Fisher is re-estimated (it depends only on the weights, the clips and the seed), and the replay buffer
is rebuilt (it depends only on the datasets and the seed). On the CPU the
result is the same, bit for bit, as an uninterrupted run's.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from hclsm.config import Config, save_config
from hclsm.data.memory import ClipWindows, open_dataset
from hclsm.errors import HclsmError
from hclsm.train.checkpoint import latest_checkpoint, load_checkpoint
from hclsm.train.data import run_clips
from hclsm.train.distributed import env_world
from hclsm.train.ewc import EWC, consolidate, estimate_fisher
from hclsm.train.loop import EvalFn, TrainResult, seed_everything, train
from hclsm.train.rehearsal import ReplayBuffer
from hclsm.train.rundir import check_run_dir, default_run_dir
from hclsm.utils.atomic import atomic_write_text, writing

CONTINUAL_FILE, EWC_FILE = "continual.json", "ewc.safetensors"


@dataclass
class ContinualResult:
    run_dir: Path
    data: list[str]  # the datasets, in order
    tasks: list[TrainResult | None]  # one per dataset; None for a task finished before a resume (not re-run)
    model: nn.Module  # the model after the last task
    ewc: EWC  # the EWC state after the last task
    replay: ReplayBuffer | None = None  # the rehearsal buffer after the last task (train.rehearsal_clips > 0)


def task_config(cfg: Config, index: int) -> Config:
    """The config of task ``index`` (0-based): ``cfg`` for the first; for later ones the final stage of its
    schedule from the first step, with the model's progress-driven schedules already finished."""
    if index == 0:
        return cfg
    final = 1 if cfg.train.stage == 1 and cfg.train.stage1_fraction >= 1.0 else 2
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=final, progress_start=1.0))


def final_stage(cfg: Config) -> int:
    return task_config(cfg, 1).train.stage


def task_train_clips(cfg: Config, root: str | os.PathLike) -> ClipWindows:
    """The training clips of a task: its dataset minus the held-out episodes, split as ``train`` splits them."""
    return run_clips(cfg, root, held_out=False)[0]


def read_continual(run_dir: str | os.PathLike) -> list[str]:
    """The datasets of the continual run in ``run_dir``; ``HclsmError`` when it is not one."""
    path = Path(run_dir) / CONTINUAL_FILE
    try:
        data = json.loads(path.read_text())["data"]
    except (OSError, ValueError, KeyError, TypeError):
        raise HclsmError(f"{run_dir} is not a continual run (no readable {CONTINUAL_FILE}); pass the RUN directory "
                         f"of an earlier `hclsm train --continual`") from None
    return [str(d) for d in data]


def train_continual(cfg: Config, data_roots: list[str | os.PathLike] | None, run_dir: str | os.PathLike | None = None,
                    eval_fn: EvalFn | None = None, progress: bool = True, resume: bool = False) -> ContinualResult:
    """Train one model on ``data_roots`` in order (at least two), EWC between tasks; see the module doc.

    ``resume`` continues the run in ``run_dir`` (with its own datasets when ``data_roots`` is None). Every
    dataset is opened before anything trains, so a bad path fails at once (``DataError`` naming it)."""
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(cfg)
    if resume:
        data_roots = data_roots or read_continual(run_dir)
    if not data_roots or len(data_roots) < 2:
        raise HclsmError(f"--continual needs at least two datasets, in training order (got {len(data_roots or [])}); "
                         f"repeat --data: --data A --data B")
    roots = [str(Path(r).resolve()) for r in data_roots]
    for r in roots:
        open_dataset(r)
    main = env_world().main
    if not resume:
        check_run_dir(run_dir)
        if main:
            with writing(run_dir, "--out (train.out_dir)"):
                run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, run_dir / "config.yaml")
                atomic_write_text(run_dir / CONTINUAL_FILE, json.dumps({"data": roots}, indent=1) + "\n")

    from hclsm.models import build_model

    seed_everything(cfg.train.seed)  # the initial weights, as ``train`` would draw them
    model: nn.Module = build_model(cfg.model)
    ewc: EWC | None = None
    t = cfg.train
    replay = ReplayBuffer(t.rehearsal_clips, t.seed) if t.rehearsal_clips > 0 else None
    results: list[TrainResult | None] = []
    for i, root in enumerate(roots):
        sub, task_cfg = run_dir / f"task{i + 1}", task_config(cfg, i)
        if (sub / "summary.json").is_file():  # finished before an interruption
            load_checkpoint(latest_checkpoint(sub), model)
            results.append(None)
        else:
            started = resume and (sub / "config.yaml").is_file()  # killed before its first checkpoint: from step 0
            resumable = started and latest_checkpoint(sub) is not None  # its checkpoints hold its EWC state
            r = train(task_cfg, root, run_dir=sub, eval_fn=eval_fn, progress=progress, model=model,
                      resume=started, ewc=None if resumable else ewc, replay=replay if i > 0 else None)
            model = r.model
            results.append(r)
        need_fisher = not (sub / EWC_FILE).is_file()
        need_replay = replay is not None and i + 1 < len(roots)  # a later task replays this one
        clips = task_train_clips(task_cfg, root) if need_fisher or need_replay else None  # loaded once for both
        if need_fisher:
            fisher = estimate_fisher(model, clips, task_cfg.train, final_stage(cfg))
            ewc = consolidate(ewc, model, fisher, t.ewc_normalize, t.ewc_decay)
            if main:
                with writing(sub, None):
                    ewc.save(sub / EWC_FILE)
        else:
            ewc = EWC.load(sub / EWC_FILE)
        if need_replay:
            replay.add_task(clips, f"task {i + 1} ({root})")
    assert ewc is not None
    return ContinualResult(run_dir, roots, results, model, ewc, replay)
