"""Whole datasets in memory: load every episode once, then serve clip windows by slicing.

Decoding video (PushT mp4) or npz episodes for every clip dominates a small model's training step.
``MemoryClips`` reads each chosen episode of an ``EpisodeSource`` completely, once, and keeps it in
RAM: frames as uint8 (4x smaller than float; 206 PushT episodes at 96 px take ~0.9 GB), masks in the
narrowest integer type that holds them, everything else as the source gave it. A batch is then one
gather per key. The windows are exactly those of ``clip_windows`` (and ``ClipDataset``).

``ClipWindows`` is what every clip store shares (the windows, ``sample``, ``batches``, ``clips[i]``) and
``load_episode`` the one way an episode is decoded for one, so a dataset too large for memory served by
``hclsm.data.streaming.StreamingClips`` gives the same batches, value for value.

``open_dataset(root)`` picks the reader for a dataset directory (physics scenes or LeRobot v3).
"""
from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from hclsm import keys
from hclsm.config.data import ClipConfig
from hclsm.data.clips import EpisodeSource, clip_windows
from hclsm.errors import DataError
from hclsm.utils.interrupt import interrupt_point

# keys that describe a whole episode (no time axis), whatever their first dimension
EPISODE_KEYS = frozenset({keys.OBJECTS, keys.GRAPH})
# keys in pixel units, rescaled with the frames
_PIXEL_KEYS = (keys.POSITIONS, keys.VELOCITIES)
_MAKE_ONE = "make one with `hclsm data physics --out DIR` or `hclsm data pusht --out DIR`"


def open_dataset(root: str | os.PathLike, cache_size: int = 64) -> EpisodeSource:
    """The reader of the dataset at ``root``: ``PhysicsSource`` (``meta.json``) or ``LeRobotSource``
    (``meta/info.json``); anything else raises ``DataError`` saying how to make a dataset. ``cache_size``: the
    episode files the reader keeps after reading them (0 for a clip store, which keeps decoded episodes itself)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"dataset {root} does not exist; {_MAKE_ONE}")
    if not root.is_dir():
        raise DataError(f"dataset {root} is a file, not a dataset directory; {_MAKE_ONE}")
    if (root / "meta.json").is_file():
        from hclsm.data.physics import PhysicsSource

        return PhysicsSource(root, cache_size=cache_size)  # checks the format and version itself
    if (root / "meta" / "info.json").is_file():
        from hclsm.data.lerobot_read import LeRobotSource

        return LeRobotSource(root, cache_size=cache_size)
    raise DataError(f"{root} is not a dataset (no meta.json of a physics dataset, no meta/info.json of a LeRobot "
                    f"v3 dataset); {_MAKE_ONE}")


def _narrow_int(t: torch.Tensor) -> torch.Tensor:
    """``t`` in uint8 / int16 when its values fit (masks are small ids), else unchanged."""
    if t.is_floating_point() or t.dtype == torch.bool or t.numel() == 0:
        return t
    lo, hi = int(t.min()), int(t.max())
    if 0 <= lo and hi <= 255:
        return t.to(torch.uint8)
    if -(2**15) <= lo and hi < 2**15:
        return t.to(torch.int16)
    return t


def _check_frames(name: str, episode: int, n: int, video: torch.Tensor | None) -> None:
    """An episode's frames are (n, 3, H, W), floating point, finite and in [0, 1]: checked once on load, so a
    NaN, an Inf or a wrong shape is named here instead of silently becoming garbage pixels (the in-memory
    store is uint8, where a NaN has no value) or failing deep inside a model."""
    where = f"{name}: episode {episode}"
    fix = "the dataset is corrupt, regenerate it or fix its reader"
    if video is None:
        raise DataError(f"{where} has no {keys.VIDEO!r} frames; {fix}")
    if video.dim() != 4 or video.shape[0] != n or video.shape[1] != 3:
        raise DataError(f"{where}: frames have shape {tuple(video.shape)}, expected ({n}, 3, H, W) RGB; {fix}")
    if not video.is_floating_point():
        raise DataError(f"{where}: frames are {video.dtype}, expected floats in [0, 1]; {fix}")
    if video.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(video))  # one pass; a NaN anywhere makes both NaN
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = (~torch.isfinite(video)).flatten(1).any(1).nonzero()[:, 0].tolist()  # frames holding a NaN or Inf
        kind = "NaN" if math.isnan(lo) else "Inf"
        raise DataError(f"{where}: frames hold {kind} values (frames {bad[:5]}{', ...' if len(bad) > 5 else ''}); "
                        f"{fix}")
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{where}: frame values span [{lo:.4g}, {hi:.4g}], expected [0, 1]; {fix}")


def _resize_episode(ep: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """Frames to ``size`` x ``size`` (area interpolation), masks nearest, pixel coordinates scaled."""
    video = ep[keys.VIDEO]  # (T, 3, H, W) float in [0, 1]
    h, w = video.shape[-2:]
    if (h, w) == (size, size):
        return ep
    ep[keys.VIDEO] = F.interpolate(video, size=(size, size), mode="area").clamp_(0.0, 1.0)
    if keys.MASK in ep:  # (T, H, W) ids: nearest keeps them ids
        ep[keys.MASK] = F.interpolate(ep[keys.MASK][:, None].float(), size=(size, size),
                                      mode="nearest-exact")[:, 0].to(ep[keys.MASK].dtype)
    scale = torch.tensor([size / w, size / h])  # (x, y)
    for k in _PIXEL_KEYS:
        if k in ep:
            ep[k] = ep[k] * scale.to(ep[k].dtype)
    return ep


@dataclass
class StoredEpisode:
    """One episode as a clip store keeps it: frames uint8 (exact for 8-bit sources; resized ones round to 1/255),
    masks in the narrowest integer type, everything else as the reader gave it."""

    frames: dict[str, torch.Tensor]  # the per-frame keys, each (n, ...): video (n, 3, S, S) uint8
    constants: dict[str, torch.Tensor]  # the per-episode keys (EPISODE_KEYS, or anything without n rows)
    dtypes: dict[str, torch.dtype]  # the dtype the reader gave each key, which a batch serves it in

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.frames.values(), *self.constants.values()))


def load_episode(source: EpisodeSource, episode: int, n: int, image_size: int | None) -> StoredEpisode:
    """Episode ``episode`` (``n`` frames) of ``source``, checked and resized to ``image_size``, as stores keep it."""
    ep = source.load_clip(episode, np.arange(n))
    _check_frames(source.name, episode, n, ep.get(keys.VIDEO))
    if image_size is not None:
        ep = _resize_episode(ep, image_size)
    stored = StoredEpisode({}, {}, {})
    for k, v in ep.items():
        stored.dtypes[k] = v.dtype
        if k == keys.VIDEO:
            v = (v * 255.0).round_().to(torch.uint8)
        elif k == keys.MASK:
            v = _narrow_int(v)
        is_frame = k not in EPISODE_KEYS and v.dim() >= 1 and v.shape[0] == n
        (stored.frames if is_frame else stored.constants)[k] = v
    return stored


def serve(key: str, stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor as a batch holds it: video float32 in [0, 1], the rest in the reader's ``dtype``."""
    return stored.float().div_(255.0) if key == keys.VIDEO else stored.to(dtype)


class ClipWindows(ABC):
    """The clip windows of a dataset's chosen episodes and the batch interface over them; subclasses hold the
    frames (``MemoryClips``: every episode in memory; ``StreamingClips``: decoded on demand) and define ``get``
    and ``median_frame``.

    Args:
        source: any ``EpisodeSource`` (``PhysicsSource``, ``LeRobotSource``, ...).
        clip: window length, frame skip and stride (as for ``ClipDataset``).
        episodes: the episode indices to serve (a split); ``None`` = all.
        image_size: resize frames to this square side on load (area interpolation); ``None`` = as stored.

    ``sample(B, generator)`` draws B random windows; ``batches(B)`` walks all windows in order (for
    evaluation); ``clips[i]`` is one clip without the batch dimension. Every batch is a dict in the
    ``hclsm.keys`` format with ``video`` float32 in [0, 1], plus ``episode_index`` and ``frame_index``.
    """

    def __init__(self, source: EpisodeSource, clip: ClipConfig, episodes: Sequence[int] | None = None,
                 image_size: int | None = None):
        self.source = source
        self.clip = clip
        self.image_size = image_size
        self.lengths = [int(n) for n in source.episode_lengths]
        lengths = self.lengths
        self.episodes = list(range(len(lengths)) if episodes is None else episodes)
        if not lengths:
            raise DataError(f"{source.name}: the dataset has no episodes; {_MAKE_ONE}")
        if not self.episodes:
            raise DataError(f"{source.name}: no episodes chosen (an empty split); choose at least one of its "
                            f"{len(lengths)} episodes")
        bad = [e for e in self.episodes if not 0 <= e < len(lengths)]
        if bad:
            raise DataError(f"{source.name}: episodes {bad[:5]} out of range [0, {len(lengths)})")
        self.windows = clip_windows(lengths, clip.length, clip.frame_skip, clip.stride, self.episodes)  # (W, 2)
        if len(self.windows) == 0:
            span = (clip.length - 1) * clip.frame_skip + 1
            longest = max((lengths[e] for e in self.episodes), default=0)
            raise DataError(f"{source.name}: a clip of length {clip.length} with frame_skip {clip.frame_skip} needs "
                            f"{span} frames but the longest chosen episode has {longest}; lower data.clip.length "
                            f"or data.clip.frame_skip")

    def window_frames(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(episode (B,), frame indices (B, T)) of windows ``indices`` (positions in ``self.windows``)."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)  # (B,)
        win = torch.from_numpy(self.windows)[idx]  # (B, 2) episode, start
        return win[:, 0], win[:, 1:2] + self.clip.frame_skip * torch.arange(self.clip.length)  # (B,), (B, T)

    def median_rows(self, max_frames: int, seed: int) -> torch.Tensor | None:
        """The frames ``median_frame`` takes, as rows of the chosen episodes' frames laid end to end (in
        ``self.episodes`` order): an even draw of ``max_frames`` of them, or None for all."""
        total = sum(self.lengths[e] for e in self.episodes)
        if total <= max_frames:
            return None
        return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:max_frames]

    @abstractmethod
    def get(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of windows ``indices`` (positions in ``self.windows``)."""

    @abstractmethod
    def median_frame(self, max_frames: int = 2000, seed: int = 0) -> torch.Tensor:
        """(C, H, W) float in [0, 1]: the per-pixel median of up to ``max_frames`` of the frames (an even draw
        over all of them, ``median_rows``), the static scene wherever the objects move on."""

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        """Window ``i`` as one clip (no batch dimension)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"window {i} out of range [0, {len(self)})")
        return {k: v[0] for k, v in self.get([i % len(self)]).items()}

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """``batch_size`` windows drawn uniformly at random (with replacement) using ``generator``."""
        return self.get(torch.randint(len(self), (batch_size,), generator=generator))

    def batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Every window once, in order, ``batch_size`` at a time (the last batch may be smaller)."""
        for first in range(0, len(self), batch_size):
            yield self.get(torch.arange(first, min(first + batch_size, len(self))))


class MemoryClips(ClipWindows):
    """Clip windows over episodes held in memory (``ClipWindows``); ``progress`` shows a tqdm bar while loading."""

    def __init__(self, source: EpisodeSource, clip: ClipConfig, episodes: Sequence[int] | None = None,
                 image_size: int | None = None, progress: bool = True):
        super().__init__(source, clip, episodes, image_size)
        self._load(self.lengths, progress)

    def _load(self, lengths: list[int], progress: bool) -> None:
        per_frame: dict[str, list[torch.Tensor]] = {}
        per_episode: dict[str, list[torch.Tensor]] = {}
        self._dtypes: dict[str, torch.dtype] = {}  # dtype each key is served in
        offsets = np.zeros(len(lengths), dtype=np.int64)  # first row of episode e in the per-frame store
        row = 0
        for e in tqdm(self.episodes, desc=f"loading {Path(self.source.name).name}", unit="ep", disable=not progress,
                      leave=False):
            interrupt_point()
            stored = load_episode(self.source, e, lengths[e], self.image_size)
            for k, dtype in stored.dtypes.items():
                self._dtypes.setdefault(k, dtype)
            for k, v in stored.frames.items():
                per_frame.setdefault(k, []).append(v)
            for k, v in stored.constants.items():
                per_episode.setdefault(k, []).append(v)
            offsets[e] = row
            row += lengths[e]
        self._offsets = torch.from_numpy(offsets)
        self._frames = {k: self._cat(k, v, torch.cat) for k, v in per_frame.items()}  # (sum of T, ...)
        self._per_episode = {k: self._cat(k, v, torch.stack) for k, v in per_episode.items()}  # (E, ...)
        self._episode_row = torch.full((len(lengths),), -1, dtype=torch.int64)  # episode -> row in _per_episode
        self._episode_row[torch.as_tensor(self.episodes, dtype=torch.int64)] = torch.arange(len(self.episodes))

    def _cat(self, key: str, parts: list[torch.Tensor], join: Callable[..., torch.Tensor]) -> torch.Tensor:
        if len(parts) != len(self.episodes):
            raise DataError(f"{self.source.name}: key {key!r} is present in only {len(parts)} of "
                            f"{len(self.episodes)} episodes; the dataset is inconsistent")
        if len({p.dtype for p in parts}) > 1:  # e.g. masks narrowed differently per episode
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            parts = [p.to(dtype) for p in parts]
        try:
            return join(parts)
        except RuntimeError:
            shapes = sorted({tuple(p.shape[1:] if join is torch.cat else p.shape) for p in parts})
            raise DataError(f"{self.source.name}: key {key!r} has different shapes across episodes {shapes[:3]}; "
                            f"the dataset is inconsistent") from None

    @property
    def nbytes(self) -> int:
        """Bytes held in memory by the loaded episodes."""
        stores = (*self._frames.values(), *self._per_episode.values())
        return sum(t.numel() * t.element_size() for t in stores)

    def get(self, indices: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of windows ``indices`` (positions in ``self.windows``)."""
        episode, frames = self.window_frames(indices)  # (B,), (B, T)
        rows = self._offsets[episode][:, None] + frames  # (B, T) rows in the per-frame store
        out: dict[str, torch.Tensor] = {}
        for k, store in self._frames.items():
            out[k] = serve(k, store[rows], self._dtypes[k])  # (B, T, ...)
        ep_rows = self._episode_row[episode]  # (B,)
        for k, store in self._per_episode.items():
            out[k] = store[ep_rows].to(self._dtypes[k])
        out[keys.EPISODE] = episode.clone()
        out[keys.FRAMES] = frames
        return out

    def median_frame(self, max_frames: int = 2000, seed: int = 0) -> torch.Tensor:
        video = self._frames[keys.VIDEO]  # (N, C, H, W) uint8, the episodes end to end
        rows = self.median_rows(max_frames, seed)
        if rows is not None:
            video = video[rows]
        return video.float().div_(255.0).median(dim=0).values

