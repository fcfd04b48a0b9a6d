"""Ctrl-C around calls into C code that calls back into Python.

A SIGINT is turned into ``KeyboardInterrupt`` by Python at the next bytecode of the main thread. When that
bytecode belongs to a Python callback run from C (pymunk's collision handlers, which gym-pusht installs, are
called from the C simulator through cffi), the exception is raised inside the callback: cffi prints its
traceback and swallows it, and the program goes on as if Ctrl-C had never been pressed.

``sigint_deferred()`` closes that gap: inside the block a SIGINT only records that it arrived; when the block
ends (back in ordinary Python code, the simulator step finished) the signal is handed to the handler that was
installed before (Python's default raises ``KeyboardInterrupt`` there, so the caller's ``try``/``finally``
cleanup runs and the CLI exits 130). Wrap every call that may run Python callbacks from C::

    with sigint_deferred():
        obs, reward, terminated, truncated, info = env.step(action)

Blocks nest (only the outermost one installs the handler) and are no-ops outside the main thread, where
signals are never delivered. The cost is two ``signal.signal`` calls per block, microseconds.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_depth = 0  # how many sigint_deferred blocks the main thread is in


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Within the block a SIGINT is only recorded; at its end it goes to the previous handler (see the module)."""
    global _depth
    if threading.current_thread() is not threading.main_thread():
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
        handler(signal.SIGINT, None)  # Python's default_int_handler raises KeyboardInterrupt
    elif handler == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
    # SIG_IGN (e.g. a job started in the background with SIGINT ignored): nothing to do
