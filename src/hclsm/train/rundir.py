"""A training run's directory on disk: its default name, the refusal to mix two runs in one directory, the
checkpoint a resumed run continues from, and the repair of what a killed run left behind.

A run directory holds ``config.yaml`` and ``run.json`` (the dataset it trains on) from its first moment, so a
run killed before its first checkpoint can still be resumed: it starts again from step 0 with its own config
and dataset (``resume_checkpoint`` returns None, ``restart_run_dir`` clears what it wrote).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from hclsm.config import Config
from hclsm.errors import HclsmError
from hclsm.train.checkpoint import STATE_FILE, latest_checkpoint
from hclsm.utils.atomic import atomic_write_text

RUN_FILE = "run.json"  # {"data_root": the dataset's absolute path}, written when the run starts


def default_run_dir(cfg: Config) -> Path:
    """``out_dir / run_name``, or ``out_dir / MODEL-PRESET-YYYYmmdd-HHMMSS`` when no name is set."""
    name = cfg.train.run_name or f"{cfg.model.name}-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.train.out_dir) / name


def stopped_before_first_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a single run (its ``config.yaml``; not a continual run's root) that never
    finished a checkpoint."""
    return ((run_dir / "config.yaml").is_file() and not (run_dir / "continual.json").exists()
            and latest_checkpoint(run_dir) is None)


def check_run_dir(run_dir: Path) -> None:
    """A run never writes into an existing non-empty directory (it would mix two runs' logs)."""
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if run_dir.is_dir() and stopped_before_first_checkpoint(run_dir):
            raise HclsmError(f"run directory {run_dir} already holds a run that stopped before its first checkpoint; "
                             f"start it again with `hclsm train --resume {run_dir}` (its own config and dataset), "
                             f"or remove it, or choose another --name (train.run_name)")
        raise HclsmError(f"run directory {run_dir} already exists and is not empty; choose another --name "
                         f"(train.run_name) or --out (train.out_dir), or remove it")


def read_state(ckpt: Path) -> dict:
    """A checkpoint's ``state.json``; ``HclsmError`` naming the damage and the fix when it cannot be read."""
    path = ckpt / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict):
            raise ValueError(f"a JSON {type(state).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else " ".join(str(e).split())[:200]
        raise HclsmError(f"cannot resume {ckpt.parent.parent}: its newest checkpoint {ckpt} is damaged ({STATE_FILE}: "
                         f"{why}); remove that checkpoint directory to resume from the one before it (or from step "
                         f"0 if it is the only one)") from None
    return state


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run in ``run_dir``, or None when it stopped before its first one (it then
    starts again from step 0). ``HclsmError`` naming the fix when ``run_dir`` is not a run, or when that
    checkpoint's ``state.json`` is damaged."""
    if not (run_dir / "config.yaml").is_file():
        why = "does not exist" if not run_dir.exists() else "holds no run (no config.yaml)"
        raise HclsmError(f"cannot resume {run_dir}: it {why}; pass the OUT/NAME directory of an earlier "
                         f"`hclsm train`, or start a new run")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        read_state(ckpt)
    return ckpt


def run_data_root(run_dir: Path) -> str | None:
    """The dataset the run in ``run_dir`` trains on: its newest checkpoint's, else its ``run.json``'s; None
    when neither names one (a run from an hclsm that did not record it)."""
    ckpt = resume_checkpoint(run_dir)
    sources = ([read_state(ckpt).get("extra")] if ckpt is not None else []) + [_read_json(run_dir / RUN_FILE)]
    for doc in sources:
        if isinstance(doc, dict) and isinstance(doc.get("data_root"), str):
            return doc["data_root"]
    return None


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def write_run_file(run_dir: Path, data_root: str) -> None:
    """Record the run's dataset (``run.json``), so that it can be resumed before its first checkpoint."""
    atomic_write_text(run_dir / RUN_FILE, json.dumps({"data_root": data_root}, indent=1) + "\n")


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


def restart_run_dir(run_dir: Path) -> None:
    """Clear what a run killed before its first checkpoint wrote (logs, TensorBoard events, unfinished
    checkpoints), keeping its ``config.yaml`` and ``run.json``: it starts again from step 0."""
    (run_dir / "log.jsonl").unlink(missing_ok=True)
    for sub in ("tb", "checkpoints"):
        if (run_dir / sub).is_dir():
            shutil.rmtree(run_dir / sub)
