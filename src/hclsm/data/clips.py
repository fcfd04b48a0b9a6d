"""Clip windows over episodes, shared by every dataset (PushT/LeRobot, physics scenes, ...).

A *source* is anything with ``episode_lengths`` (frames per episode) and
``load_clip(episode, frames) -> dict`` that returns one clip in the batch format of ``hclsm.keys``
(tensors without the batch dimension). ``ClipDataset`` cuts windows of ``length`` frames, every
``frame_skip``-th frame, that never cross an episode boundary, and turns them into a torch Dataset.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from hclsm import keys
from hclsm.config.data import ClipConfig
from hclsm.errors import DataError


class EpisodeSource(Protocol):
    """What a dataset reader provides to ``ClipDataset``."""

    name: str  # shown in error messages (e.g. the dataset directory)

    @property
    def episode_lengths(self) -> Sequence[int]: ...

    def load_clip(self, episode: int, frames: np.ndarray) -> dict[str, torch.Tensor]: ...


def clip_windows(episode_lengths: Sequence[int], length: int, frame_skip: int = 1, stride: int = 1,
                 episodes: Sequence[int] | None = None) -> np.ndarray:
    """All valid (episode, start) windows, shape (W, 2) int64, in episode then start order.

    A window covers frames ``start + frame_skip * arange(length)``; it is valid when its last frame
    lies inside the episode. ``episodes`` restricts the windows to those episode indices (a split).
    """
    span = (length - 1) * frame_skip + 1  # frames a window covers
    chosen = range(len(episode_lengths)) if episodes is None else episodes
    rows = [(e, s) for e in chosen for s in range(0, int(episode_lengths[e]) - span + 1, stride)]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class ClipDataset(Dataset):
    """Fixed-length clips from an ``EpisodeSource``; deterministic order, shuffled by ``clip.seed``.

    Item ``i`` is the clip dict from ``source.load_clip`` plus ``episode_index`` and ``frame_index``.
    """

    def __init__(self, source: EpisodeSource, clip: ClipConfig | None = None,
                 episodes: Sequence[int] | None = None, shuffle: bool = False):
        self.source = source
        self.clip = clip or ClipConfig()
        lengths = list(source.episode_lengths)
        if not lengths:
            raise DataError(f"{source.name}: the dataset has no episodes; make one with `hclsm data physics --out DIR` "
                            f"or `hclsm data pusht --out DIR`")
        self.windows = clip_windows(lengths, self.clip.length, self.clip.frame_skip, self.clip.stride, episodes)
        if len(self.windows) == 0:
            span = (self.clip.length - 1) * self.clip.frame_skip + 1
            longest = max((lengths[e] for e in (episodes if episodes is not None else range(len(lengths)))),
                          default=0)
            raise DataError(
                f"{source.name}: a clip of length {self.clip.length} with frame_skip {self.clip.frame_skip} "
                f"needs {span} frames but the longest episode has {longest}; lower data.clip.length or "
                f"data.clip.frame_skip")
        if shuffle:
            rng = np.random.default_rng(self.clip.seed)
            self.windows = self.windows[rng.permutation(len(self.windows))]

    def __len__(self) -> int:
        return len(self.windows)

    def frame_indices(self, i: int) -> tuple[int, np.ndarray]:
        episode, start = (int(v) for v in self.windows[i])
        return episode, start + self.clip.frame_skip * np.arange(self.clip.length)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        episode, frames = self.frame_indices(i)
        item = self.source.load_clip(episode, frames)
        item[keys.EPISODE] = torch.tensor(episode, dtype=torch.int64)
        item[keys.FRAMES] = torch.from_numpy(frames.astype(np.int64))
        return item


def split_episodes(num_episodes: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic train/val split of episode indices (at least one val episode when possible)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(num_episodes).tolist()
    n_val = min(max(1, round(val_fraction * num_episodes)), num_episodes - 1) if num_episodes > 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])
