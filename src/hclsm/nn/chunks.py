"""Long batches through memory-heavy modules a chunk at a time.

A module whose activations are large per item (the CNN encoder's full-resolution feature maps, the spatial
broadcast decoder's K maps per frame) run over a long clip at once allocates gigabytes of fresh memory every
step. On the CPU those allocations come straight from the kernel, and the page faults on them, not the
arithmetic, doubled the per-frame cost of a 256-frame train step against a 16-frame one. ``map_chunks`` runs
such a module on slices of the batch instead; with gradients on, each slice is checkpointed (its activations
are recomputed in the backward pass), so only one slice's activations exist at a time and the allocator
reuses the same memory from slice to slice. One slice (a short clip) runs as a plain call: no recomputation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def map_chunks(fn: Callable[[int, int], torch.Tensor], n: int, size: int) -> list[torch.Tensor]:
    """``[fn(start, stop) for each slice of range(n) of length size]``, each call checkpointed when there is more
    than one slice and gradients are enabled. ``fn`` reads its inputs by closure (non-reentrant checkpointing
    recomputes it with the same tensors)."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    bounds = [(i, min(i + size, n)) for i in range(0, n, size)]
    if len(bounds) == 1 or not torch.is_grad_enabled():
        return [fn(a, b) for a, b in bounds]
    return [checkpoint(fn, a, b, use_reentrant=False) for a, b in bounds]
