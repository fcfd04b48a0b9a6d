"""Rehearsal: clips of finished tasks kept in a bounded buffer and replayed while a later task trains.

EWC (``hclsm.train.ewc``) protects an earlier task through a local, quadratic picture of its loss; rehearsal
(experience replay) trains on the earlier task itself. ``ReplayBuffer`` keeps at most ``capacity`` clips,
split evenly over the tasks added so far: each task's clips are a uniform random draw from its training clips
(without replacement, seeded), and when a task is added the earlier tasks give up their excess clips (each keeps
a prefix of its random draw, itself a uniform draw). While a later task trains, ``train.rehearsal_fraction`` of
every batch is drawn uniformly from the buffer (``mix``) and the rest from the task's own clips, so a step costs
what a plain step costs.

Frames are kept as uint8 (as the clip stores keep them), so the memory bound is
``capacity * clip_bytes``: ``nbytes`` never exceeds ``bound_bytes`` (tested). The buffer depends only on the
datasets, the capacity and the seed; ``hclsm train --continual --resume`` rebuilds it the same, so a resumed run
is still bit-identical.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from hclsm import keys
from hclsm.data.memory import ClipWindows, serve
from hclsm.errors import HclsmError

# the fields models train on; a dataset's ground truth (masks, positions, graphs, ...) is for evaluation, differs in
# shape between tasks (one ball or six) and is not kept
TRAINED = (keys.VIDEO, keys.ACTION, keys.STATE)


def _pack(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch as the buffer keeps it: its ``TRAINED`` fields, video as uint8 (as clip stores keep it;
    ``hclsm.data.memory.serve`` turns it back)."""
    return {k: (v * 255.0).round_().to(torch.uint8) if k == keys.VIDEO else v.clone()
            for k, v in batch.items() if k in TRAINED}


class ReplayBuffer:
    """At most ``capacity`` clips of earlier tasks, split evenly over them (see the module doc)."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = int(capacity), int(seed)
        self.stored: dict[str, torch.Tensor] = {}  # every kept clip, the tasks' in order, each key (N, ...)
        self.counts: list[int] = []  # clips kept per task
        self.dtypes: dict[str, torch.dtype] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # per key, one clip's shape (every task's must match)
        self.clip_bytes = 0

    def __len__(self) -> int:
        return sum(self.counts)

    @property
    def nbytes(self) -> int:
        """Bytes the stored clips hold."""
        return sum(v.numel() * v.element_size() for v in self.stored.values())

    @property
    def bound_bytes(self) -> int:
        """The most the buffer can hold: ``capacity`` clips of this clip size."""
        return self.capacity * self.clip_bytes

    def add_task(self, clips: ClipWindows, name: str = "task") -> None:
        """Keep a uniform draw of ``clips`` (a task's training clips) and cut every task to ``capacity // tasks``
        clips (the first tasks keep one more while the division leaves a remainder). ``name`` names the task in
        errors."""
        if len(clips) == 0:
            raise HclsmError(f"rehearsal: {name} has no training clips to keep")
        tasks = len(self.counts) + 1
        share = [self.capacity // tasks] * tasks
        for i in range(self.capacity - sum(share)):
            share[i] += 1
        g = torch.Generator().manual_seed(self.seed + 7919 * len(self.counts))
        order = torch.randperm(len(clips), generator=g)[:share[-1]]
        served = clips.get(order)
        packed = _pack(served)
        if self.counts:
            shapes = {k: tuple(v.shape[1:]) for k, v in packed.items()}
            if shapes != self.shapes:
                raise HclsmError(f"rehearsal: {name}'s clips have fields {shapes}, the earlier tasks' {self.shapes}; "
                                 f"replay needs tasks with the same fields and shapes (same clip length, image "
                                 f"size, action and state sizes), or set train.rehearsal_clips=0")
        else:
            self.dtypes = {k: served[k].dtype for k in packed}
            self.shapes = {k: tuple(v.shape[1:]) for k, v in packed.items()}
            self.clip_bytes = sum(v[:1].numel() * v.element_size() for v in packed.values())
        keep = [min(n, c) for n, c in zip(share, self.counts)]  # each earlier task's first clips: a uniform draw
        starts = [sum(self.counts[:i]) for i in range(len(self.counts))]
        self.stored = {k: torch.cat([*(self.stored[k][s:s + n] for s, n in zip(starts, keep)), v])
                       for k, v in packed.items()}
        self.counts = [*keep, len(order)]

    def check_batch(self, batch: Mapping[str, torch.Tensor], name: str = "this task") -> None:
        """Refuse, in one line, a task whose batches cannot be mixed with the buffer's clips."""
        shapes = {k: tuple(v.shape[1:]) for k, v in batch.items() if k in TRAINED}
        if shapes != self.shapes:
            raise HclsmError(f"rehearsal: {name}'s clips have fields {shapes}, the replayed ones {self.shapes}; "
                             f"replay needs tasks with the same fields and shapes (same clip length, image size, "
                             f"action and state sizes), or set train.rehearsal_clips=0")

    def sample(self, n: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``n`` stored clips drawn uniformly (with replacement), as a batch serves them."""
        if not self.counts:
            raise HclsmError("rehearsal: the buffer is empty; add a finished task first")
        idx = torch.randint(len(self), (n,), generator=generator)
        return {k: serve(k, v[idx], self.dtypes[k]) for k, v in self.stored.items()}

    def mix(self, batch: Mapping[str, torch.Tensor], replayed: int, generator: torch.Generator | None = None
            ) -> dict[str, torch.Tensor]:
        """``batch`` (this task's clips) followed by ``replayed`` clips from the buffer, one batch of the
        ``TRAINED`` fields."""
        old = self.sample(replayed, generator)
        return {k: torch.cat([batch[k], old[k].to(batch[k].dtype)]) for k in old}


def replayed_count(batch_size: int, fraction: float) -> int:
    """Clips of a batch of ``batch_size`` drawn from the buffer: ``fraction`` of it, rounded, at least one and
    leaving at least one for the task being trained."""
    return min(batch_size - 1, max(1, round(fraction * batch_size)))
