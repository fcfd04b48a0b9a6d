"""A training run's directory on disk: its default name, the refusal to mix two runs in one directory, the
checkpoint a resumed run continues from, and the repair of what a killed run left behind."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from hclsm.config import Config
from hclsm.errors import HclsmError
from hclsm.train.checkpoint import latest_checkpoint
from hclsm.utils.atomic import atomic_write_text


def default_run_dir(cfg: Config) -> Path:
    """``out_dir / run_name``, or ``out_dir / MODEL-PRESET-YYYYmmdd-HHMMSS`` when no name is set."""
    name = cfg.train.run_name or f"{cfg.model.name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def check_run_dir(run_dir: Path) -> None:
    """A run never writes into an existing non-empty directory (it would mix two runs' logs)."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise HclsmError(f"run directory {run_dir} already exists and is not empty; choose another --name "
                         f"(train.run_name) or --out (train.out_dir), or remove it")


def resume_checkpoint(run_dir: Path) -> Path:
    """The newest checkpoint of ``run_dir``; ``HclsmError`` naming the fix when there is none."""
    ckpt = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    if ckpt is None:
        raise HclsmError(f"cannot resume {run_dir}: it holds no checkpoint (checkpoints/step_*); start a new run "
                         f"instead, or pass the run directory that has them")
    return ckpt


def first_new_dir(run_dir: Path) -> Path | None:
    """The outermost directory that creating ``run_dir`` would make (the run directory itself, or an ``--out``
    root that is not there yet); None when it already exists. A run that fails before its first step removes it."""
    return ([d for d in (run_dir, *run_dir.parents) if not d.exists()] or [None])[-1]


def repair_for_resume(run_dir: Path, step: int) -> None:
    """Undo what a killed run wrote after the checkpoint at ``step``: its log lines (and a last line the kill cut
    in half), and checkpoint directories it had not finished (``checkpoints/.step_*``)."""
    log = run_dir / "log.jsonl"
    if log.exists():
        kept = []
        for line in log.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line + "\n")
        atomic_write_text(log, "".join(kept))
    for stale in (run_dir / "checkpoints").glob(".step_*"):
        shutil.rmtree(stale, ignore_errors=True)
