"""Slot sequences: what a frozen object model says about each frame, as arrays a predictor trains on.

A slot file is an ``.npz`` with

* ``slots`` float (N, T, S, D): N sequences of T frames, S slots of width D (required);
* ``alive`` bool (N, T, S): whether each slot shows an object (default: all alive);
* ``action`` float (N, T, A) and ``proprio`` float (N, T, P): optional per-frame nodes (PushT).

``hclsm.eval.cjepa.encode_episodes`` (``hclsm cjepa slots``) writes such arrays from our own object model;
a user can supply slots from any encoder in the same layout.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hclsm.errors import DataError, HclsmError
from hclsm.utils.atomic import atomic_file, writing

LAYOUT = "an .npz with slots (N, T, S, D) float, optionally alive (N, T, S) bool, action (N, T, A), proprio (N, T, P)"


@dataclass
class SlotSequences:
    """Slot sequences in memory (see the module docstring for the shapes)."""

    slots: torch.Tensor
    alive: torch.Tensor
    action: torch.Tensor | None = None
    proprio: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.slots.shape[0]

    @property
    def frames(self) -> int:
        return self.slots.shape[1]


def save_slot_file(path: str | os.PathLike, seqs: SlotSequences) -> None:
    """Write ``seqs`` as a slot file, complete or not at all (written beside, then renamed; a failure leaves
    no temporary behind). Missing parent directories are created; a filesystem fault (no space left, a
    read-only directory) is an ``OutputError`` naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise HclsmError(f"slot file {path} is a directory; give a file path such as {path / 'slots.npz'}")
    arrays = {"slots": seqs.slots.float().numpy(), "alive": seqs.alive.bool().numpy()}
    for name in ("action", "proprio"):
        if getattr(seqs, name) is not None:
            arrays[name] = getattr(seqs, name).float().numpy()
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as f:
            np.savez(f, **arrays)


def load_slot_file(path: str | os.PathLike) -> SlotSequences:
    """Read and check a slot file; every problem is a ``DataError`` naming the file, the array and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"slot file {path} does not exist; give {LAYOUT}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"slot file {path} is not a readable .npz ({e}); give {LAYOUT}") from None
    if "slots" not in arrays:
        raise DataError(f"slot file {path} has no 'slots' array (it has {sorted(arrays)}); give {LAYOUT}")
    slots = arrays["slots"]
    if slots.ndim != 4 or not np.issubdtype(slots.dtype, np.floating) or min(slots.shape) < 1:
        raise DataError(f"slot file {path}: 'slots' must be float (N, T, S, D), got {slots.dtype} {slots.shape}")
    if not np.isfinite(slots).all():
        raise DataError(f"slot file {path}: 'slots' holds NaN or inf values; mark empty slots with 'alive' instead")
    n, t, s, _ = slots.shape
    alive = arrays.get("alive", np.ones((n, t, s), dtype=bool))
    if alive.shape != (n, t, s):
        raise DataError(f"slot file {path}: 'alive' must have shape {(n, t, s)} to match 'slots', got {alive.shape}")
    nodes = {}
    for name in ("action", "proprio"):
        a = arrays.get(name)
        if a is None:
            nodes[name] = None
            continue
        if a.ndim != 3 or a.shape[:2] != (n, t) or not np.isfinite(a).all():
            raise DataError(f"slot file {path}: '{name}' must be finite float (N={n}, T={t}, dim), got {a.shape}")
        nodes[name] = torch.from_numpy(a.astype(np.float32))
    return SlotSequences(torch.from_numpy(slots.astype(np.float32)), torch.from_numpy(alive.astype(bool)), **nodes)
