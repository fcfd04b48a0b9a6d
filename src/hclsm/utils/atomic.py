"""Atomic outputs: a dataset or report directory appears complete or not at all.

Writers build everything inside a hidden temporary directory next to the destination and rename it
into place at the end, so an error, Ctrl-C or crash never leaves a half-written dataset behind.

A process killed outright (SIGKILL, a power cut) cannot remove its temporary directory. Each writer
therefore holds an advisory lock (``flock``) on its temporary directory while it works; the kernel drops
the lock when the process dies, however it dies. The next writer of the same output removes every
unlocked ``.NAME.tmp-*`` left next to it, and puts back an earlier output that a killed ``--overwrite``
had moved aside into ``.NAME.old-*`` but not yet replaced. ``atomic_write_text`` does the same for its
``.NAME.tmp-*`` files.

Filesystem faults a user can cause or fix (no space left, a read-only or not writable directory) become
``OutputError``, one line naming the path and the fix (``writing``, ``output_error``).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from hclsm.errors import HclsmError

try:
    import fcntl
except ImportError:  # not on Windows: temporaries of killed writers are then left in place
    fcntl = None

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # the device (or the user's quota) is full
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}  # the place cannot be written at all


class OutputError(HclsmError):
    """An output could not be written: no space left, a read-only file system, or no permission."""


def output_error(e: OSError, target: str | os.PathLike, option: str | None = "--out") -> OutputError | None:
    """The one-line ``OutputError`` for a filesystem fault while writing ``target`` (None for other errors).

    ``option`` is what the user can change to write elsewhere (``--out``); None when the place is given (a run
    to resume), and the fix is to make it writable or free space there."""
    if e.errno in _FULL:
        fix = "free some space there" + (f" or choose another {option}" if option else "")
    elif e.errno in _DENIED:
        fix = f"choose a writable {option}" if option else "make it writable"
    else:
        return None
    what = e.strerror or os.strerror(e.errno)
    where = f" ({e.filename})" if e.filename and str(e.filename) != str(target) else ""
    return OutputError(f"cannot write {target}: {what}{where}; {fix}")


@contextlib.contextmanager
def writing(target: str | os.PathLike, option: str | None = "--out") -> Iterator[None]:
    """Turn a filesystem fault raised in the block (``output_error``) into ``OutputError`` about ``target``."""
    try:
        yield
    except OSError as e:
        err = output_error(e, target, option)
        if err is None:
            raise
        raise err from None


# ---- locks that die with their process ------------------------------------------------------------

def _lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive ``flock`` on ``path``; None when it is held by a live process
    (or locks are not supported here)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing drops the flock


def remove_stale(parent: str | os.PathLike, name: str) -> list[Path]:
    """Clean up after writers of ``parent/name`` that were killed: remove their unlocked ``.NAME.tmp-*``
    temporaries and restore an output a killed ``--overwrite`` had moved into ``.NAME.old-*``. Returns what
    it removed. Temporaries a live writer holds are left alone."""
    parent, removed = Path(parent), []
    if fcntl is None or not parent.is_dir():
        return removed
    out = parent / name
    stale = sorted(parent.glob(f".{name}.old-*")) + sorted(parent.glob(f".{name}.tmp-*"))  # old first: restore it
    for path in stale:
        fd = _lock(path)
        if fd is None:
            continue  # a live writer's (or not lockable): not ours to touch
        try:
            if path.is_dir():
                moved = path / name
                if ".old-" in path.name and moved.exists() and not out.exists():
                    os.replace(moved, out)  # killed between its two renames: the earlier output comes back
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        except OSError:
            pass  # e.g. a read-only parent: the caller's own write reports that
        finally:
            _release(fd)
    return removed


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``out`` when the block finishes without error.

    ``out`` must not exist unless ``overwrite`` is set (then the old directory is replaced only after
    the new one is complete). On any exception, including KeyboardInterrupt, the temporary
    directory is removed and ``out`` is left as it was; a filesystem fault (no space, read-only) in the
    block becomes ``OutputError``. Temporaries of earlier, killed writers of ``out`` are cleaned up first.
    """
    out = Path(out)
    parent = out.parent
    remove_stale(parent, out.name)
    if out.exists() and not overwrite:
        raise HclsmError(f"output {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise HclsmError(f"output {out} exists and is not a directory; choose another --out")
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise HclsmError(f"output {out}: {existing} is a file, not a directory; choose another --out")
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
        err = output_error(OSError(e.errno, e.strerror), out)  # no space: free some; read-only: another --out
        raise err or HclsmError(f"cannot create output under {parent}: {e.strerror}; choose a writable --out") from None
    held = [_lock(tmp)]  # released when the block ends; the kernel releases it if this process is killed
    try:
        try:
            yield tmp
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                held.append(_lock(old))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except OSError as e:
            ours = e.filename is None or Path(e.filename).is_relative_to(parent)  # not an input file's error
            err = output_error(e, out) if ours else None
            if err is None:
                raise
            raise err from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created()
        raise
    finally:
        for fd in held:
            _release(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Yield a file open for writing that becomes ``path`` (temp file + fsync + rename) when the block
    finishes without error; on any exception the temporary file is removed and ``path`` is left as it was.
    Stale temporaries of killed writers of ``path`` go first."""
    path = Path(path)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with os.fdopen(fd, mode) as f:  # the lock is held until the file is in place
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (``atomic_file``)."""
    with atomic_file(path, "w") as f:
        f.write(text)


def check_file_out(out: str | os.PathLike, option: str = "--out", example: str = "result.json") -> Path:
    """Validate an output file path up front, before the work that fills it: not a directory, its nearest
    existing parent a directory this process can create files in. ``HclsmError`` naming the fix otherwise."""
    out = Path(out)
    if out.is_dir():
        raise HclsmError(f"{option} {out} is a directory; give a file path such as {out / example}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise HclsmError(f"{option} {out}: {parent} is a file, not a directory; choose another {option}")
            probe_writable(parent, option)
            break
    return out


def probe_writable(directory: str | os.PathLike, option: str | None = "--out") -> None:
    """Create and remove a file in ``directory``: ``OutputError`` naming the fix when that fails. (Permission
    bits are not enough to ask: root ignores them, while a read-only mount stops root too.)"""
    try:
        fd, probe = tempfile.mkstemp(prefix=".hclsm-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        err = output_error(OSError(e.errno, e.strerror), directory, option)  # the probe's own name is noise
        if err is None:
            raise
        raise err from None
