"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a directory ``RUN/checkpoints/step_0001234/``::

    model.safetensors       the model's state_dict (parameters and persistent buffers)
    optimizer.safetensors   the optimizer's per-parameter state tensors, keyed "state.<param id>.<name>"
    state.json              step, stage, extra (e.g. the config), RNG states as lists, and the optimizer's
                            param_groups and non-tensor state
    extra.safetensors       (optional) other tensors the run trains with, e.g. its EWC Fisher and anchors

It is built in a hidden temporary directory, every file fsynced, then renamed into place, so a crash
leaves either the whole checkpoint or none. Loading is strict: a checkpoint whose tensors do not match
the model key for key and shape for shape is refused with the differences named (it was made with
another config). Nothing is ever unpickled, so a checkpoint from elsewhere cannot run code.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from hclsm.errors import HclsmError

FORMAT = "hclsm-checkpoint"
VERSION = 1
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
EXTRA_FILE = "extra.safetensors"
_STEP_DIR = re.compile(r"step_(\d{7,})")


class CheckpointError(HclsmError):
    """A checkpoint is missing, corrupt, or does not fit the model / optimizer it is loaded into."""


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                 metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, whose I/O errors (a full disk, a read-only directory) come back as the
    ``OSError`` they are (safetensors wraps them in its own error type), so callers report them as such."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first (hidden temporary directories are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.fullmatch(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ---- RNG state ------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) global RNG states as JSON-able lists."""
    py_version, py_state, py_gauss = random.getstate()
    name, keys_, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [name, keys_.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the global RNGs from ``rng_state()``'s output."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    name, keys_, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys_, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# ---- tensors ----------------------------------------------------------------------------------------

def _cpu_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory (safetensors refuses aliases, e.g. tied weights)."""
    out, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach()
        v = v.to("cpu") if v.device.type != "cpu" else v  # a copy for accelerator tensors
        storage = v.untyped_storage().data_ptr() if v.numel() else None
        if storage in seen:
            v = v.clone(memory_format=torch.contiguous_format)
        elif not v.is_contiguous():
            v = v.contiguous()
        if storage is not None:
            seen.add(storage)
        out[k] = v
    return out


def _flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return _cpu_tensors(tensors), {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


# ---- save -----------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, extra: dict[str, Any] | None = None, *,
                    stage: int | None = None, keep_last: int = 0, model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint of ``step`` atomically and return its directory.

    ``extra`` must be JSON-able (the loop stores the config, its batch sampler's RNG and counters).
    With ``keep_last`` > 0 only the newest ``keep_last`` checkpoints are kept. A checkpoint of the
    same step is replaced. ``model_state`` / ``optimizer_state`` (a state dict in the optimizer's own
    layout) stand in for ``model.state_dict()`` / ``optimizer.state_dict()`` when given (sharded
    training gathers them first). ``extra_tensors``, when given and not empty, go to ``extra.safetensors``
    (``read_checkpoint_tensors``).
    """
    if model_state is None:
        if model is None:
            raise ValueError("save_checkpoint needs a model or a model_state")
        model_state = model.state_dict()
    if optimizer_state is None and optimizer is not None:
        optimizer_state = optimizer.state_dict()
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, "step": int(step), "stage": stage, "extra": extra or {},
             "rng": rng_state()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        save_tensors(_cpu_tensors(model_state), tmp / MODEL_FILE, metadata={"format": "pt"})
        if optimizer_state is not None:
            tensors, state["optimizer"] = _flatten_optimizer(optimizer_state)
            save_tensors(tensors, tmp / OPTIM_FILE, metadata={"format": "pt"})
        if extra_tensors:
            save_tensors(_cpu_tensors(extra_tensors), tmp / EXTRA_FILE, metadata={"format": "pt"})
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, allow_nan=False) + "\n")
        for f in tmp.iterdir():
            _fsync_file(f)
        _fsync_dir(tmp)
        if final.exists():  # same step again: swap the old one out, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---- load -----------------------------------------------------------------------------------------

def _some(names: list[str], n: int = 6) -> str:
    shown = ", ".join(names[:n])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > n else shown


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir() and (latest := latest_checkpoint(path)) is not None:
        return latest  # a run directory: its newest checkpoint
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a run directory or one of its "
                              f"checkpoints/step_* directories")
    raise CheckpointError(f"{path} is not a checkpoint (no {STATE_FILE}) nor a run directory with checkpoints; pass "
                          f"RUN or RUN/checkpoints/step_NNNNNNN")


# how pickles start: torch.save's zip archive, or a raw pickle (protocol 2+ opens with 0x80); a safetensors
# file opens with its header's 8-byte length and then the JSON header's "{"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if head[8:9] != b"{" and head.startswith(_PICKLE_MAGIC):
            raise CheckpointError(f"{path} is a pickle (torch.save) file, not safetensors; hclsm never unpickles "
                                  f"checkpoints (a pickle can run code): use a checkpoint written by hclsm, or "
                                  f"convert a trusted one with safetensors.torch.save_file")
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, use another one") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e}); use another checkpoint") from None


def read_optimizer_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state dict stored in a checkpoint, checked to fit ``optimizer``'s parameter groups."""
    ckpt = _resolve(path)
    state = json.loads((ckpt / STATE_FILE).read_text())
    if "optimizer" not in state:
        raise CheckpointError(f"checkpoint {ckpt} has no optimizer state; load it without an optimizer")
    sd = _unflatten_optimizer(_load_tensors(ckpt / OPTIM_FILE), state["optimizer"])
    have = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g["params"]) for g in sd["param_groups"]]
    if have != saved:
        raise CheckpointError(f"checkpoint {ckpt}: optimizer groups hold {saved} parameters but this optimizer's "
                              f"hold {have}; it was made with another config or model")
    return sd


def read_checkpoint_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` a checkpoint (or a run directory's newest) was saved with; {} when it has none."""
    ckpt = _resolve(path)
    return _load_tensors(ckpt / EXTRA_FILE) if (ckpt / EXTRA_FILE).is_file() else {}


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = False) -> dict[str, Any]:
    """Load a checkpoint into ``model`` (and ``optimizer``), strictly; return its ``state.json``.

    ``path`` is a checkpoint directory or a run directory (its newest checkpoint). Tensors are copied
    into the model's own parameters, on their device and dtype. Any missing or unexpected key or
    shape mismatch raises ``CheckpointError`` naming them. With ``restore_rng`` the global RNGs are
    set to their state at save time. The returned dict has ``step``, ``stage``, ``extra``, ``rng``
    and ``path``.
    """
    ckpt = _resolve(path)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE_FILE}: cannot read ({e}); use another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"{ckpt}: not an hclsm checkpoint of version {VERSION}; use a checkpoint written by "
                              f"this version of hclsm")
    tensors = _load_tensors(ckpt / MODEL_FILE)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in set(tensors) & set(expected) if tensors[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        parts = [f"missing keys: {_some(missing)}" if missing else "",
                 f"unexpected keys: {_some(unexpected)}" if unexpected else "",
                 f"shape mismatches (checkpoint vs model): {_some(mismatched, 3)}" if mismatched else ""]
        raise CheckpointError(f"checkpoint {ckpt} does not fit this model ({'; '.join(p for p in parts if p)}); it "
                              f"was made with another config: build the model from the run's config.yaml")
    model.load_state_dict(tensors, strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(read_optimizer_state(ckpt, optimizer))
    if restore_rng:
        set_rng_state(state["rng"])
    state["path"] = str(ckpt)
    return state
