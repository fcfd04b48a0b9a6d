"""The clips a training run reads: its dataset's episodes split into training and held-out ones
(``train.val_fraction``, ``train.seed``), each side served at the model's frame size from memory or, for a dataset
whose decoded frames would not fit ``data.memory_mb`` (or with ``data.streaming=true``), streamed (``uses_streaming``).
The training loop and the continual runs' Fisher estimate take them from here, so both see the same split."""
from __future__ import annotations

import os

from hclsm.config import ClipConfig, Config
from hclsm.config.data import DataConfig
from hclsm.data.clips import clip_windows, split_episodes
from hclsm.data.memory import ClipWindows, MemoryClips, open_dataset
from hclsm.data.streaming import StreamingClips, decoded_bytes

MIB = 2 ** 20


def run_split(n_episodes: int, cfg: Config) -> tuple[list[int], list[int]]:
    """(training, held-out) episode indices of a dataset of ``n_episodes`` under the run's config; every
    episode trains when ``train.val_fraction`` is 0."""
    t = cfg.train
    if t.val_fraction > 0:
        return split_episodes(n_episodes, t.val_fraction, t.seed)
    return list(range(n_episodes)), []


def split_clips(root: str | os.PathLike, cfg: Config, length: int, split: str = "val") -> MemoryClips:
    """Non-overlapping clips of ``length`` frames of the run's held-out (``"val"``) or training (``"train"``)
    episodes (``run_split``), at the model's frame size, in memory; evaluation reads them."""
    source = open_dataset(root)
    train_eps, val_eps = run_split(len(source.episode_lengths), cfg)
    return MemoryClips(source, ClipConfig(length=length, stride=length), val_eps if split == "val" else train_eps,
                       cfg.model.perception.image_size, progress=False)


def uses_streaming(data: DataConfig, frame_bytes: int) -> bool:
    """Whether a run streams its clips: ``data.streaming`` when true or false; under auto, when the decoded frames
    (``frame_bytes``) exceed ``data.memory_mb``."""
    if data.streaming == "auto":
        return frame_bytes > data.memory_mb * MIB
    return bool(data.streaming)


def run_clips(cfg: Config, data_root: str | os.PathLike, progress: bool = False, held_out: bool = True
              ) -> tuple[ClipWindows, ClipWindows | None, list[int]]:
    """(training clips, held-out clips or None, held-out episodes) of ``data_root``: None when ``held_out`` is
    false or the held-out episodes are too short for one clip. Both sides are ``MemoryClips``, or both
    ``StreamingClips`` (each caching at most ``data.cache_episodes`` episodes and ``data.memory_mb``)."""
    source = open_dataset(data_root, cache_size=0)  # the clip stores keep decoded episodes themselves
    train_eps, val_eps = run_split(len(source.episode_lengths), cfg)
    clip, size, data = cfg.data.clip, cfg.model.perception.image_size, cfg.data
    has_val = held_out and bool(val_eps) and len(clip_windows(source.episode_lengths, clip.length, clip.frame_skip,
                                                              clip.stride, val_eps)) > 0
    stream = uses_streaming(data, decoded_bytes(source, train_eps + (val_eps if has_val else []), size))

    def clips(episodes: list[int]) -> ClipWindows:
        if stream:
            return StreamingClips(source, clip, episodes, size, cache_episodes=data.cache_episodes,
                                  cache_bytes=int(data.memory_mb * MIB))
        return MemoryClips(source, clip, episodes, size, progress=progress)

    return clips(train_eps), (clips(val_eps) if has_val else None), val_eps
