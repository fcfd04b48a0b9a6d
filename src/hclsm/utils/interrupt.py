"""Ctrl-C that always stops a command, even when it arrives where Python cannot raise it.

A SIGINT is turned into ``KeyboardInterrupt`` by Python at the next bytecode of the main thread. Two places
swallow an exception raised there: a Python callback run from C (pymunk's collision and debug-draw handlers,
which gym-pusht installs, are called from the C simulator through cffi; cffi prints the traceback and goes on),
and a finalizer (``__del__``: "Exception ignored in ..."). The program then runs on as if Ctrl-C had never been
pressed. Three pieces close the gap:

* ``sigint_deferred()`` around calls into such C code: inside the block a SIGINT is only recorded; when the block
  ends (back in ordinary Python code) the signal goes to the handler installed before::

      with sigint_deferred():
          obs, reward, terminated, truncated, info = env.step(action)

* ``handle_sigint()`` (the CLI's handler for the length of a command): it records every SIGINT, raises
  ``KeyboardInterrupt`` where that is safe, and only records it inside a finalizer or a deferred block;
* ``interrupt_point()`` in the long loops (training steps, episodes generated or loaded, evaluation batches):
  it raises ``KeyboardInterrupt`` for a SIGINT that was recorded but never raised, or raised and swallowed.
  (An interrupt that propagates never reaches the next loop iteration, so this never raises twice.)

Without ``handle_sigint`` (library use) Python's own handler stays, and ``interrupt_point`` does nothing.
Blocks nest (only the outermost one installs its handler) and everything is a no-op outside the main thread,
where signals are never delivered.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_depth = 0  # how many sigint_deferred blocks the main thread is in
_pending = False  # a SIGINT arrived under handle_sigint and no KeyboardInterrupt has reached the command's end


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Within the block a SIGINT is only recorded; at its end it goes to the previous handler (see the module)."""
    global _depth
    if not _main_thread():
        yield
        return
    if _depth:  # an outer block holds the handler and will deliver
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    arrived: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: arrived.append(signum))
    _depth = 1
    try:
        yield
    finally:
        _depth = 0
        signal.signal(signal.SIGINT, previous)
        if arrived:
            _deliver(previous)


def _deliver(handler) -> None:
    """Hand one SIGINT to ``handler`` as the kernel would have: call it, ignore it, or die of it."""
    if callable(handler):
        handler(signal.SIGINT, None)  # Python's default_int_handler (or ours) raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
    # SIG_IGN (e.g. a job started in the background with SIGINT ignored): nothing to do


def _in_finalizer(frame) -> bool:
    """Whether the interrupted Python code runs inside a ``__del__`` (where an exception is printed and dropped)."""
    while frame is not None:
        if frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _on_sigint(signum, frame) -> None:
    global _pending
    _pending = True
    if _depth or _in_finalizer(frame):
        return  # raised at the end of the deferred block, or at the next interrupt_point
    raise KeyboardInterrupt


@contextlib.contextmanager
def handle_sigint() -> Iterator[None]:
    """For the length of the block, Ctrl-C goes through ``_on_sigint`` (see the module). A process that ignores
    SIGINT (started in the background) keeps ignoring it."""
    global _pending
    if not _main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    _pending = False
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _pending = False


def interrupt_point() -> None:
    """Raise ``KeyboardInterrupt`` if a SIGINT arrived that has not stopped the command yet (see the module)."""
    global _pending
    if _pending and not _depth:
        _pending = False
        raise KeyboardInterrupt
