"""Training logs: one JSON object per line in ``log.jsonl`` and the same scalars for TensorBoard.

A record is a flat or nested dict such as ``{"step": 25, "stage": 1, "lr": 4e-4, "losses": {"sbd":
0.02}, "grad_norm": 0.7, "steps_per_s": 11.2, "elapsed": 2.3}``. In the JSONL file it is written as is
(non-finite floats as ``null``, since JSON has no NaN); TensorBoard gets every number under its
slash-joined path (``losses/sbd``) at ``step``. Read the JSONL with
``[json.loads(line) for line in open(path)]``; view the rest with ``tensorboard --logdir RUN/tb``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hclsm.utils.jsonsafe import finite_or_none


def flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(path, value)`` for every int/float (not bool) in a nested record, paths joined by ``/``."""
    for key, value in record.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_scalars(value, f"{path}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, float(value)


class RunLogger:
    """Writes ``run_dir/log.jsonl`` and, when ``tensorboard``, scalars under ``run_dir/tb``.

    Use as a context manager or call ``close()``, which flushes both. Lines are flushed as they are
    written, so the JSONL is readable while the run goes on.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "log.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(self, record: Mapping[str, Any], step: int | None = None, scalars: bool = True) -> None:
        """Append ``record`` to the JSONL file and, when ``scalars``, its numbers to TensorBoard at
        ``step`` (default ``record["step"]``)."""
        self._file.write(json.dumps(finite_or_none(dict(record)), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None and scalars:
            step = int(record["step"]) if step is None else step
            for path, value in flatten_scalars(record):
                if path != "step":
                    self._tb.add_scalar(path, value, global_step=step)

    def close(self) -> None:
        """Flush and close both writers (idempotent)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
