"""Atomic outputs: a dataset or report directory appears complete or not at all.

Writers build everything inside a hidden temporary directory next to the destination and rename it
into place at the end, so an error, Ctrl-C or crash never leaves a half-written dataset behind.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from hclsm.errors import HclsmError


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes without error.

    ``out`` must not exist unless ``overwrite`` is set (then the old directory is replaced only after
    the new one is complete). On any exception, including KeyboardInterrupt, the temporary
    directory is removed and ``out`` is left as it was.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise HclsmError(f"output {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise HclsmError(f"output {out} exists and is not a directory; choose another --out")
    parent = out.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]  # removed again on failure

    def remove_created() -> None:  # innermost first; only directories this call made and left empty
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()

    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        remove_created()
        raise HclsmError(f"cannot create output under {parent}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temp file + fsync + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
