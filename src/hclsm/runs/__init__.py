"""``Run(DIR)``: a finished or interrupted training run, the one place a run is read.

A run directory is what ``hclsm train`` writes (``config.yaml``, ``checkpoints/step_*``, logs), or one that holds
such runs: ``hclsm demo``'s output (its model is ``train/stage2``) and a ``--continual`` run (its last task,
``taskN``). ``Run`` finds the training run inside, its config, its newest checkpoint, the dataset it was trained on,
and builds its model with the checkpoint's weights (``load_model``). Every problem a user can cause (a missing
directory, a run without a checkpoint) is an ``HclsmError`` naming the fix.
"""
from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path
from typing import Any

from torch import nn

from hclsm.config import Config, load_config
from hclsm.errors import HclsmError


def _training_run(path: Path) -> Path:
    """The directory holding the training run's own config.yaml: ``path``, a demo's ``train/stage2``, or a
    continual run's last task."""
    if (path / "train" / "stage2" / "config.yaml").is_file():
        return path / "train" / "stage2"
    tasks = sorted((p for p in path.glob("task*") if (p / "config.yaml").is_file() and p.name[4:].isdigit()),
                   key=lambda p: int(p.name[4:]))
    if tasks and not (path / "checkpoints").is_dir():
        return tasks[-1]
    return path


class Run:
    """The training run in ``path`` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            what = "is a file, not a run directory" if self.path.exists() else "does not exist"
            raise HclsmError(f"run {self.path} {what}; pass OUT/NAME of an earlier `hclsm train` or `hclsm demo`")
        self.dir = _training_run(self.path)
        if not (self.dir / "config.yaml").is_file():
            raise HclsmError(f"{self.path} is not a run directory (no config.yaml, no train/stage2/config.yaml); pass "
                             f"OUT/NAME of an earlier `hclsm train` or `hclsm demo`")

    @cached_property
    def config(self) -> Config:
        return load_config(yaml_path=self.dir / "config.yaml")

    @property
    def checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        from hclsm.train.checkpoint import latest_checkpoint

        return latest_checkpoint(self.dir)

    def require_checkpoint(self) -> Path:
        ckpt = self.checkpoint
        if ckpt is None:
            raise HclsmError(f"run {self.path} has no checkpoint yet (checkpoints/step_*); train it (a run checkpoints "
                             f"every train.ckpt_every steps and at the end) or pass a run that has one")
        return ckpt

    @property
    def state(self) -> dict[str, Any]:
        """The newest checkpoint's ``state.json`` ({} without one, or when it is unreadable)."""
        ckpt = self.checkpoint
        try:
            return json.loads((ckpt / "state.json").read_text()) if ckpt is not None else {}
        except (OSError, ValueError):
            return {}

    @property
    def data_root(self) -> Path | None:
        """The dataset the run trained on: a demo's own ``data/pusht``, else the one its checkpoint names (None
        when neither exists)."""
        if (self.path / "data" / "pusht").is_dir():
            return self.path / "data" / "pusht"
        extra = self.state.get("extra")
        root = extra.get("data_root") if isinstance(extra, dict) else None
        return Path(root) if isinstance(root, str) and Path(root).is_dir() else None

    def load_model(self, device: str = "cpu") -> nn.Module:
        """The run's model (``build_model(config.model)``) with the newest checkpoint's weights, strictly, in eval
        mode on ``device``."""
        from hclsm.models import build_model
        from hclsm.train.checkpoint import load_checkpoint

        ckpt = self.require_checkpoint()
        model = build_model(self.config.model)
        load_checkpoint(ckpt, model)
        return model.to(device).eval()

    def clips(self, length: int, split: str = "val", data: str | os.PathLike | None = None):
        """Non-overlapping clips of ``length`` frames of the run's held-out (``split="val"``) or training
        (``"train"``) episodes, as the run split them (its ``train.val_fraction`` and ``train.seed``), at the
        model's frame size, loaded into memory: a ``hclsm.data.memory.MemoryClips`` (``.batches(n)`` yields
        batches in the training format, ``hclsm.keys``). ``data`` defaults to the dataset the run trained on."""
        from hclsm.train.data import split_clips

        if split not in ("val", "train"):
            raise HclsmError(f"split must be 'val' or 'train', got {split!r}")
        root = data if data is not None else self.data_root
        if root is None:
            raise HclsmError(f"run {self.path} does not say which dataset it trained on (or it is gone); pass data=DIR")
        if split == "val" and self.config.train.val_fraction <= 0:
            raise HclsmError(f"run {self.path} held out no episodes (train.val_fraction = 0); use split='train'")
        return split_clips(root, self.config, length, split)
