"""Training: the one loop for every model, AdamW + warmup/cosine, pickle-free checkpoints, logs.

>>> from hclsm.config import load_config
>>> from hclsm.train import train
>>> result = train(load_config("tiny", overrides=["train.steps=200"]), "data/physics")  # doctest: +SKIP
>>> result.run_dir, result.losses  # doctest: +SKIP
"""
from __future__ import annotations

from hclsm.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from hclsm.train.logging import RunLogger, read_log
from hclsm.train.loop import TrainingDiverged, TrainResult, train
from hclsm.train.optim import build_optimizer, lr_at, param_groups
from hclsm.train.stages import train_two_stages
from hclsm.train.step import train_step, weighted_loss

__all__ = [
    "train", "train_two_stages", "train_step", "weighted_loss", "TrainResult", "TrainingDiverged",
    "build_optimizer", "param_groups", "lr_at",
    "save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "CheckpointError",
    "RunLogger", "read_log",
]
