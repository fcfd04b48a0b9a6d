"""The clips a training run reads: its dataset's episodes split into training and held-out ones
(``train.val_fraction``, ``train.seed``), each side loaded into memory at the model's frame size. The
training loop and the continual runs' Fisher estimate take them from here, so both see the same split."""
from __future__ import annotations

import os

from hclsm.config import Config
from hclsm.data.clips import clip_windows, split_episodes
from hclsm.data.memory import MemoryClips, open_dataset


def run_split(n_episodes: int, cfg: Config) -> tuple[list[int], list[int]]:
    """(training, held-out) episode indices of a dataset of ``n_episodes`` under the run's config; every
    episode trains when ``train.val_fraction`` is 0."""
    t = cfg.train
    if t.val_fraction > 0:
        return split_episodes(n_episodes, t.val_fraction, t.seed)
    return list(range(n_episodes)), []


def run_clips(cfg: Config, data_root: str | os.PathLike, progress: bool = False, held_out: bool = True
              ) -> tuple[MemoryClips, MemoryClips | None, list[int]]:
    """(training clips, held-out clips or None, held-out episodes) of ``data_root``: None when ``held_out`` is
    false or the held-out episodes are too short for one clip."""
    source = open_dataset(data_root)
    train_eps, val_eps = run_split(len(source.episode_lengths), cfg)
    clip, size = cfg.data.clip, cfg.model.perception.image_size
    train_clips = MemoryClips(source, clip, train_eps, size, progress=progress)
    val_clips = None
    if held_out and val_eps and len(clip_windows(source.episode_lengths, clip.length, clip.frame_skip, clip.stride,
                                                 val_eps)):
        val_clips = MemoryClips(source, clip, val_eps, size, progress=progress)
    return train_clips, val_clips, val_eps
