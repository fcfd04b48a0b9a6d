"""Faults a user's machine can have, made real where this machine allows and injected where it does not.

* ``hclsm(...)`` runs the installed command line in a subprocess (the real process: exit code, stderr, signals),
  optionally with ``inject=`` filesystem faults (see below).
* ``read_only(path)``: a directory that cannot be written. Not being root, ``chmod`` does it; root ignores
  permission bits, so as root the directory is bind-mounted read-only onto itself (the kernel refuses writes
  there to root too: EROFS). Yields how: ``"chmod"``, ``"mount"``, or ``None`` when neither is possible (no
  ``mount`` permission in a container): then the test injects the fault instead.
* ``full_fs(path, size)``: a tiny tmpfs mounted at ``path`` (root with mount permission), else ``None``.
* Injection (``inject={"errno": "EROFS", "under": DIR}``): the subprocess starts through ``_INJECT``, which makes
  every attempt to create or write a file under DIR fail with that errno (``open`` for writing, ``os.open`` with a
  write flag, ``mkdir``, ``mkstemp`` / ``mkdtemp``, ``os.replace``), the way a read-only or full file system does.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

FORCE_INJECTION = os.environ.get("HCLSM_TEST_INJECT_FAULTS") == "1"  # exercise the fallback on a capable machine

_INJECT = r'''
import builtins, errno, os, sys, tempfile
code, under = getattr(errno, sys.argv[1]), os.path.realpath(sys.argv[2])
del sys.argv[1:3]

def _inside(path):
    try:
        p = os.path.realpath(os.fspath(path) if not isinstance(path, int) else "")
    except TypeError:
        return False
    return p == under or p.startswith(under + os.sep)

def _fail(path):
    raise OSError(code, os.strerror(code), os.fspath(path))

_open, _os_open, _mkdir, _replace = builtins.open, os.open, os.mkdir, os.replace
_mkstemp, _mkdtemp = tempfile.mkstemp, tempfile.mkdtemp
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def open_(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and _inside(file):
        _fail(file)
    return _open(file, mode, *a, **k)

def os_open(path, flags, *a, **k):
    if flags & WRITE and _inside(path):
        _fail(path)
    return _os_open(path, flags, *a, **k)

def mkdir(path, *a, **k):
    if _inside(path) and not os.path.isdir(path):
        _fail(path)
    return _mkdir(path, *a, **k)

def replace(src, dst, *a, **k):
    if _inside(dst) or _inside(src):
        _fail(dst)
    return _replace(src, dst, *a, **k)

def mkstemp(*a, dir=None, **k):
    if dir is not None and _inside(dir):
        _fail(dir)
    return _mkstemp(*a, dir=dir, **k)

def mkdtemp(*a, dir=None, **k):
    if dir is not None and _inside(dir):
        _fail(dir)
    return _mkdtemp(*a, dir=dir, **k)

builtins.open, os.open, os.mkdir, os.replace = open_, os_open, mkdir, replace
tempfile.mkstemp, tempfile.mkdtemp = mkstemp, mkdtemp
from hclsm.cli import main
sys.exit(main(sys.argv[1:]))
'''


def console_script() -> Path:
    for candidate in (Path(sys.executable).parent / "hclsm", Path(__file__).resolve().parents[1] / ".venv/bin/hclsm"):
        if candidate.is_file():
            return candidate
    found = shutil.which("hclsm")
    if found is None:
        pytest.skip("the hclsm console script is not installed")
    return Path(found)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _restore_sigint() -> None:
    """In the child: SIGINT as an interactive shell leaves it (a background job may have it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def command(*args: object, inject: dict | None = None, python_hook: str | None = None) -> list[str]:
    """The argv that runs ``hclsm ARGS``: the console script, or python with an injected fault or a hook."""
    args = [str(a) for a in args]
    if inject is not None:
        return [sys.executable, "-c", _INJECT, inject["errno"], str(inject["under"]), *args]
    if python_hook is not None:
        return [sys.executable, "-c", python_hook + "\nfrom hclsm.cli import main\nsys.exit(main(sys.argv[1:]))", *args]
    return [str(console_script()), *args]


def hclsm(*args: object, cwd: Path | None = None, timeout: float = 120, inject: dict | None = None,
          python_hook: str | None = None) -> subprocess.CompletedProcess:
    """Run ``hclsm ARGS`` to the end in a subprocess (one thread) and return the completed process."""
    return subprocess.run(command(*args, inject=inject, python_hook=python_hook), capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=_env(), preexec_fn=_restore_sigint)


def start(*args: object, cwd: Path | None = None, python_hook: str | None = None) -> subprocess.Popen:
    """Start ``hclsm ARGS`` in a subprocess that takes SIGINT as a terminal's Ctrl-C would reach it."""
    return subprocess.Popen(command(*args, python_hook=python_hook), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env=_env(), preexec_fn=_restore_sigint)


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """The project rule in a real process: the exit code, one ``error:`` line on stderr naming every needle, no
    traceback."""
    assert r.returncode == code, f"exit {r.returncode}, stderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines[-10:]}"
    assert lines[0].startswith("error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def leftovers(parent: Path) -> list[str]:
    """Hidden temporaries that writers leave when they fail to clean up."""
    return sorted(p.name for p in parent.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or ".tmp." in p.name)


# ---- read-only directories and full file systems ------------------------------------------------------

def _run(*argv: str) -> bool:
    return subprocess.run(list(argv), capture_output=True).returncode == 0


def _writable(path: Path) -> bool:
    try:
        (path / ".probe").write_text("x")
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[str | None]:
    """Make the existing directory ``path`` (and what it holds) read-only for this test; see the module."""
    if FORCE_INJECTION:
        yield None
        return
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")] if p.is_dir()}
        for p in modes:
            p.chmod(0o555)
        try:
            yield "chmod" if not _writable(path) else None
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("mount") and _run("mount", "--bind", str(path), str(path)):
        try:
            if _run("mount", "-o", "remount,bind,ro", str(path)) and not _writable(path):
                yield "mount"
            else:
                yield None
        finally:
            _run("umount", "-l", str(path))
        return
    yield None


@contextlib.contextmanager
def full_fs(path: Path, size: str = "16k") -> Iterator[str | None]:
    """A ``size`` tmpfs mounted at the (new, empty) directory ``path``: "mount", or None when not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    if FORCE_INJECTION or os.geteuid() != 0 or not shutil.which("mount") \
            or not _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        yield None
        return
    try:
        yield "mount"
    finally:
        _run("umount", "-l", str(path))
