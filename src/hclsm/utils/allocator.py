"""Keep freed memory in the process instead of handing it back to the kernel at every training step.

PyTorch's CPU tensors come from the C allocator. glibc's ``malloc`` serves large blocks with fresh ``mmap``
pages and returns them on ``free`` (and trims the heap's top), so every training step faults in its
activations again: on this project's 2-core machine a third of a training step's time was kernel time
(page faults). ``keep_freed_memory`` raises glibc's mmap and trim thresholds, so freed blocks are reused by
the next step. It changes no result, only where memory comes from; memory the process has used stays
reserved to it. A no-op where the C library is not glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters
MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's largest allowed value on 64-bit)
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before any is returned
TOP_PAD = 64 << 20  # extra memory taken from the kernel at each heap growth

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's ``malloc`` once per process (see the module docstring); True when it took effect."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return False
    if mallopt is None:
        return False
    _done = all(mallopt(param, value) == 1 for param, value in
                ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _done
