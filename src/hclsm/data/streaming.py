"""Datasets larger than memory: clip windows decoded on demand, behind the batch interface of ``MemoryClips``.

``StreamingClips`` decodes the episodes a batch's windows come from when the batch is asked for, with
``hclsm.data.memory.load_episode``, the very code ``MemoryClips`` loads with, so a batch is the same, value for value,
whichever store serves it. It keeps the most recently used decoded episodes (an LRU of at most ``cache_episodes``
episodes and ``cache_bytes`` bytes, and never fewer than one): an evaluation pass, which walks the windows in
order, decodes each episode once; a random training batch mostly decodes afresh, so a step also pays for decoding
up to one episode per window (less on datasets of few, or short, episodes).

``decoded_bytes`` is what holding the chosen episodes' frames in memory would take; ``hclsm.train.data.run_clips``
streams when it exceeds ``data.memory_mb`` (``data.streaming: auto``) or when told to (``true``).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from hclsm import keys
from hclsm.config.data import ClipConfig
from hclsm.data.clips import EpisodeSource
from hclsm.data.memory import ClipWindows, StoredEpisode, load_episode, serve
from hclsm.errors import DataError


def decoded_bytes(source: EpisodeSource, episodes: Sequence[int], image_size: int, channels: int = 3) -> int:
    """Bytes the frames of ``episodes`` take decoded at ``image_size`` (uint8, as the clip stores keep them)."""
    lengths = source.episode_lengths
    return sum(int(lengths[e]) for e in episodes) * channels * image_size * image_size


class StreamingClips(ClipWindows):
    """Clip windows (``ClipWindows``) whose episodes are decoded when a batch needs them, the most recently used
    ones kept: at most ``cache_episodes`` of them and ``cache_bytes`` bytes (None: no byte bound), at least one.
    The first chosen episode is decoded on construction, so an unreadable dataset fails here, not at a batch."""

    def __init__(self, source: EpisodeSource, clip: ClipConfig, episodes: Sequence[int] | None = None,
                 image_size: int | None = None, cache_episodes: int = 16, cache_bytes: int | None = None):
        super().__init__(source, clip, episodes, image_size)
        if cache_episodes < 1:
            raise ValueError(f"cache_episodes must be >= 1, got {cache_episodes}")
        self.cache_episodes, self.cache_bytes = cache_episodes, cache_bytes
        self._cache: OrderedDict[int, StoredEpisode] = OrderedDict()  # episode -> decoded, least recent first
        self.nbytes = 0  # bytes the decoded episodes in the cache hold
        # every episode must have the first one's keys; a batch serves each in the first one's dtype (as MemoryClips)
        self._frame_keys: set[str] | None = None
        first = self._decode(self.episodes[0])
        self._frame_keys, self._constant_keys, self._dtypes = set(first.frames), set(first.constants), first.dtypes

    def _decode(self, episode: int) -> StoredEpisode:
        """Episode ``episode`` decoded, from the cache or freshly (then cached, evicting the least recent)."""
        stored = self._cache.get(episode)
        if stored is not None:
            self._cache.move_to_end(episode)
            return stored
        stored = load_episode(self.source, episode, self.lengths[episode], self.image_size)
        if self._frame_keys is not None and (set(stored.frames), set(stored.constants)) != (self._frame_keys,
                                                                                             self._constant_keys):
            have, want = sorted({*stored.frames, *stored.constants}), sorted(self._frame_keys | self._constant_keys)
            raise DataError(f"{self.source.name}: episode {episode} has keys {have} but episode {self.episodes[0]} "
                            f"has {want}; the dataset is inconsistent")
        self._cache[episode] = stored
        self.nbytes += stored.nbytes
        while len(self._cache) > 1 and (len(self._cache) > self.cache_episodes or
                                        (self.cache_bytes is not None and self.nbytes > self.cache_bytes)):
            self.nbytes -= self._cache.popitem(last=False)[1].nbytes
        return stored

    def get(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of windows ``indices`` (positions in ``self.windows``), as ``MemoryClips.get`` gives it."""
        episode, frames = self.window_frames(indices)  # (B,), (B, T)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*self._frame_keys, *self._constant_keys)}
        for e, f in zip(episode.tolist(), frames):  # each window's frames taken at once: an evicted episode is freed
            stored = self._decode(e)
            for k, v in stored.frames.items():
                parts[k].append(serve(k, v[f], self._dtypes[k]))  # (T, ...)
            for k, v in stored.constants.items():
                parts[k].append(v.to(self._dtypes[k]))
        out: dict[str, torch.Tensor] = {}
        for k, p in parts.items():
            try:
                out[k] = torch.stack(p)  # (B, T, ...) or (B, ...)
            except RuntimeError:
                shapes = sorted({tuple(x.shape) for x in p})
                raise DataError(f"{self.source.name}: key {k!r} has different shapes across episodes {shapes[:3]}; "
                                f"the dataset is inconsistent") from None
        out[keys.EPISODE] = episode.clone()
        out[keys.FRAMES] = frames
        return out

    def median_frame(self, max_frames: int = 2000, seed: int = 0) -> torch.Tensor:
        """As ``MemoryClips.median_frame``: the same frames (``median_rows``), decoded an episode at a time."""
        starts = np.cumsum([0] + [self.lengths[e] for e in self.episodes])  # row of each chosen episode's frame 0
        rows = self.median_rows(max_frames, seed)
        rows = np.arange(starts[-1]) if rows is None else np.sort(rows.numpy())
        which = np.searchsorted(starts, rows, side="right") - 1  # position in self.episodes of each row
        video = []
        for i in np.unique(which):
            frames = torch.from_numpy(rows[which == i] - starts[i])
            video.append(self._decode(self.episodes[i]).frames[keys.VIDEO][frames])  # (n_i, C, H, W) uint8
        return torch.cat(video).float().div_(255.0).median(dim=0).values
