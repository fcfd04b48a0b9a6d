"""Training logs: one JSON object per line in ``log.jsonl``, the same scalars for TensorBoard and, optionally,
for Weights & Biases.

A record is a flat or nested dict such as ``{"step": 25, "stage": 1, "lr": 4e-4, "losses": {"sbd":
0.02}, "grad_norm": 0.7, "steps_per_s": 11.2, "elapsed": 2.3}``. In the JSONL file it is written as is
(non-finite floats as ``null``, since JSON has no NaN); TensorBoard and W&B get every number under its
slash-joined path (``losses/sbd``) at ``step``. Read the JSONL with
``[json.loads(line) for line in open(path)]``; view the rest with ``tensorboard --logdir RUN/tb``.

W&B (``train.wandb=true``, the ``hclsm[wandb]`` extra) is never required: ``require_wandb`` names the install when
it is asked for and missing. Its run is named after the run directory and its files go to ``RUN/wandb/`` (or
``$WANDB_DIR``); the run's W&B id is kept in ``RUN/wandb_id``, so a resumed run continues the same W&B run.
``WANDB_MODE=offline`` logs without an account or network (``wandb sync`` uploads it later).
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from hclsm.errors import ConfigError
from hclsm.utils.atomic import atomic_write_text
from hclsm.utils.jsonsafe import finite_or_none

WANDB_ID_FILE = "wandb_id"


def flatten_scalars(record: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(path, value)`` for every int/float (not bool) in a nested record, paths joined by ``/``."""
    for key, value in record.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flatten_scalars(value, f"{path}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield path, float(value)


def require_wandb() -> ModuleType:
    """The ``wandb`` module, or ``ConfigError`` naming the extra to install."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.wandb: logging to Weights & Biases needs the wandb package; "
                          "pip install 'hclsm[wandb]' (or set train.wandb=false)") from None
    return wandb


def start_wandb(run_dir: Path, project: str, config: Mapping[str, Any]) -> Any:
    """A W&B run for the hclsm run in ``run_dir`` (the same W&B run again when ``run_dir`` has started one)."""
    wandb = require_wandb()
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)  # W&B run ids: [a-z0-9]
    try:
        run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", config=dict(config),
                         dir=None if os.environ.get("WANDB_DIR") else str(run_dir))
    except wandb.Error as e:  # e.g. no API key in a non-interactive shell
        raise ConfigError(f"train.wandb: W&B did not start ({' '.join(str(e).split())[:200]}); run `wandb login`, "
                          f"or log offline with WANDB_MODE=offline") from None
    atomic_write_text(id_file, run_id + "\n")
    return run


class RunLogger:
    """Writes ``run_dir/log.jsonl``, when ``tensorboard`` scalars under ``run_dir/tb``, and when ``wandb`` names a
    project, the same scalars to a W&B run (``start_wandb``) whose config is ``config``.

    Use as a context manager or call ``close()``, which flushes every writer. Lines are flushed as they are
    written, so the JSONL is readable while the run goes on.
    """

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, wandb: str | None = None,
                 config: Mapping[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "log.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import, only when wanted

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))
        self._wandb = None
        if wandb:
            try:
                self._wandb = start_wandb(self.run_dir, wandb, config or {})
            except BaseException:
                self.close()
                raise

    def log(self, record: Mapping[str, Any], step: int | None = None, scalars: bool = True) -> None:
        """Append ``record`` to the JSONL file and, when ``scalars``, its numbers to TensorBoard and W&B at
        ``step`` (default ``record["step"]``)."""
        self._file.write(json.dumps(finite_or_none(dict(record)), allow_nan=False) + "\n")
        self._file.flush()
        if not scalars or (self._tb is None and self._wandb is None):
            return
        step = int(record["step"]) if step is None else step
        values = {path: value for path, value in flatten_scalars(record) if path != "step"}
        if self._tb is not None:
            for path, value in values.items():
                self._tb.add_scalar(path, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def close(self) -> None:
        """Flush and close every writer (idempotent)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_log(path: str | os.PathLike) -> list[dict]:
    """The records of a ``log.jsonl`` file, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
