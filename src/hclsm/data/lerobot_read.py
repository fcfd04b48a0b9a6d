"""Read LeRobot v3.0 datasets (ours and LeRobot's own, e.g. a local ``lerobot/pusht`` copy).

``LeRobotSource(root)`` validates the layout up front (every problem is a one-line ``DataError``
naming the file and the fix), loads the frame table once with pyarrow, and serves clips in the batch
format of ``hclsm.keys``: ``video`` (T, 3, H, W) float in [0, 1], ``action``, ``state`` and, for
datasets written by ``hclsm data pusht``, ground-truth ``mask``, ``positions``, ``block_pose``,
``contact`` and ``coverage``. Video is decoded once per clip (one seek, one forward pass).
"""
from __future__ import annotations

import json
import zipfile
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from hclsm import keys
from hclsm.data.video import decode_frames
from hclsm.errors import DataError

# column in the parquet -> batch key
_COLUMNS = {"action": keys.ACTION, "observation.state": keys.STATE, "gt.block_pose": keys.BLOCK_POSE,
            "gt.contact": keys.CONTACT, "gt.coverage": keys.COVERAGE, "gt.positions": keys.POSITIONS}
_REQUIRED = ("episode_index", "frame_index", "timestamp")
_FIX = "re-create it with `hclsm data pusht --out DIR` or point at a LeRobot v3 dataset"


def _read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    if not path.is_file():
        raise DataError(f"{path} is missing; the dataset is incomplete, {_FIX}")
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet {path} ({str(e).splitlines()[0]}); the file is corrupt, {_FIX}") from None


def _read_schema(path: Path) -> pa.Schema:
    if not path.is_file():
        raise DataError(f"{path} is missing; the dataset is incomplete, {_FIX}")
    try:
        return pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read parquet {path} ({str(e).splitlines()[0]}); the file is corrupt, {_FIX}") from None


def _column_to_numpy(col: pa.ChunkedArray) -> np.ndarray:
    """Scalar column -> (N,); (fixed-size) list column -> (N, D)."""
    col = col.combine_chunks()
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(n, -1) if n else flat.reshape(0, 0)
    return col.to_numpy(zero_copy_only=False)


class LeRobotSource:
    """An ``EpisodeSource`` over a LeRobot v3 dataset directory.

    ``video_key`` picks the camera (default: ``observation.image`` if present, else the first video
    feature). ``image_size`` resizes frames (and masks, nearest) to a square side on load. ``cache_size``: the
    episodes' ground-truth mask files kept after reading them.
    """

    def __init__(self, root: str | Path, video_key: str | None = None, image_size: int | None = None,
                 cache_size: int = 64):
        self.root = Path(root)
        self.name = str(self.root)
        self.image_size = image_size
        if not self.root.exists():
            raise DataError(f"dataset {self.root} does not exist; {_FIX}")
        if not self.root.is_dir():
            raise DataError(f"dataset {self.root} is a file, not a dataset directory; {_FIX}")
        self.info = self._load_info()
        self.fps = float(self.info["fps"])
        feats = self.info["features"]
        videos = [k for k, f in feats.items() if f.get("dtype") == "video"]
        if video_key is None:
            if not videos:
                raise DataError(f"{self.root}/meta/info.json declares no video feature; hclsm needs camera frames")
            video_key = "observation.image" if "observation.image" in videos else videos[0]
        elif video_key not in videos:
            raise DataError(f"{self.root}: video key {video_key!r} not found; available: {videos}")
        self.video_key = video_key
        self.frame_size = self._frame_size()
        self._npz = lru_cache(maxsize=cache_size)(_load_npz)  # per dataset, so a rewritten dataset is never stale
        self.episodes = self._load_episodes()
        self._load_frames()

    # ---- metadata -------------------------------------------------------------------------------
    def _load_info(self) -> dict:
        path = self.root / "meta" / "info.json"
        if not path.is_file():
            raise DataError(f"{self.root} is not a LeRobot dataset (missing meta/info.json); {_FIX}")
        try:
            info = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path} is not valid JSON ({e}); the dataset is corrupt, {_FIX}") from None
        if not isinstance(info, dict):
            raise DataError(f"{path} is not a JSON object; the dataset is corrupt, {_FIX}")
        version = str(info.get("codebase_version", ""))
        if version.startswith("v2"):
            raise DataError(f"{self.root} is a LeRobot {version} dataset and hclsm reads v3.x; convert it with "
                            f"LeRobot's converter (lerobot >= 0.4): `python -m "
                            f"lerobot.datasets.v30.convert_dataset_v21_to_v30 --repo-id=OWNER/NAME --root={self.root}`")
        if not version.startswith("v3"):
            raise DataError(f"{path}: codebase_version {version!r} is not supported (need v3.x); {_FIX}")
        missing = [k for k in ("fps", "features") if k not in info]
        if missing:
            raise DataError(f"{path} lacks required keys {missing}; the dataset is corrupt, {_FIX}")
        fps = info["fps"]
        if not isinstance(fps, (int, float)) or isinstance(fps, bool) or not fps > 0 or fps == float("inf"):
            raise DataError(f"{path}: fps must be a positive number, got {fps!r}; the dataset is corrupt, {_FIX}")
        feats = info["features"]
        if not isinstance(feats, dict) or not all(isinstance(f, dict) for f in feats.values()):
            raise DataError(f"{path}: features must map each feature name to an object (dtype, shape, names); "
                            f"the dataset is corrupt, {_FIX}")
        return info

    def _frame_size(self) -> tuple[int, int] | None:
        """(height, width) of the video feature as meta/info.json declares it, or None when it does not."""
        feat = self.info["features"][self.video_key]
        shape, names = feat.get("shape"), feat.get("names")
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) for v in shape)):
            return None
        if isinstance(names, list) and len(names) == 3 and {"height", "width"} <= set(names):
            return shape[names.index("height")], shape[names.index("width")]
        return (shape[1], shape[2]) if shape[0] in (1, 3, 4) and shape[2] not in (1, 3, 4) else (shape[0], shape[1])

    def _load_episodes(self) -> dict[str, np.ndarray]:
        files = sorted((self.root / "meta" / "episodes").glob("chunk-*/file-*.parquet"))
        if not files:
            raise DataError(f"{self.root}/meta/episodes/ has no parquet files; the dataset is incomplete, {_FIX}")
        table = pa.concat_tables([_read_parquet(f) for f in files], promote_options="permissive")
        vk = f"videos/{self.video_key}/"
        need = ["episode_index", "length", "dataset_from_index", "dataset_to_index", "data/chunk_index",
                "data/file_index", vk + "chunk_index", vk + "file_index", vk + "from_timestamp"]
        missing = [c for c in need if c not in table.column_names]
        if missing:
            raise DataError(f"{self.root}/meta/episodes lacks columns {missing}; {_FIX}")
        eps = {c: _column_to_numpy(table[c]) for c in need}
        order = np.argsort(eps["episode_index"])
        eps = {c: v[order] for c, v in eps.items()}
        if len(eps["episode_index"]) == 0:
            raise DataError(f"{self.root} has no episodes; {_FIX}")
        empty = eps["episode_index"][eps["length"] < 1].tolist()
        if empty:
            raise DataError(f"{self.root}/meta/episodes: episodes {empty[:5]} have no frames; the dataset is corrupt, "
                            f"{_FIX}")
        return eps

    def _load_frames(self) -> None:
        """Read every data file once; keep the needed columns as numpy, sliced per episode."""
        pairs = sorted(set(zip(self.episodes["data/chunk_index"].tolist(), self.episodes["data/file_index"].tolist())))
        template = self.info.get("data_path", "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet")
        tables = []
        for chunk, fidx in pairs:
            path = self.root / template.format(chunk_index=chunk, file_index=fidx, episode_chunk=chunk)
            schema_names = _read_schema(path).names
            missing = [c for c in _REQUIRED if c not in schema_names]
            if missing:
                raise DataError(f"{path} lacks required columns {missing}; {_FIX}")
            wanted = [c for c in ("index", *_REQUIRED, *_COLUMNS) if c in schema_names]
            tables.append(_read_parquet(path, columns=wanted))
        table = pa.concat_tables(tables, promote_options="permissive")
        self.columns = {c: _column_to_numpy(table[c]) for c in table.column_names}
        self._rows: list[np.ndarray] = []  # per episode: row numbers in self.columns, by frame_index
        ep_col, fr_col = self.columns["episode_index"], self.columns["frame_index"]
        order = np.lexsort((fr_col, ep_col))
        bounds = np.searchsorted(ep_col[order], self.episodes["episode_index"], side="left")
        ends = np.searchsorted(ep_col[order], self.episodes["episode_index"], side="right")
        for i, (ep, length) in enumerate(zip(self.episodes["episode_index"], self.episodes["length"])):
            if ends[i] - bounds[i] != length:
                raise DataError(f"{self.root}: episode {ep} has {int(ends[i] - bounds[i])} frames in data/ but "
                                f"meta/episodes says {length}; the dataset is corrupt, {_FIX}")
            self._rows.append(order[bounds[i]:ends[i]])
        present = {c: _COLUMNS[c] for c in _COLUMNS if c in self.columns}
        self.batch_columns = present

    # ---- EpisodeSource --------------------------------------------------------------------------
    @property
    def episode_lengths(self) -> list[int]:
        return [int(v) for v in self.episodes["length"]]

    def __len__(self) -> int:
        return len(self._rows)

    def video_path(self, episode: int) -> Path:
        vk = f"videos/{self.video_key}/"
        template = self.info.get("video_path") or "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
        return self.root / template.format(video_key=self.video_key, chunk_index=int(self.episodes[vk + "chunk_index"][episode]),
                                           file_index=int(self.episodes[vk + "file_index"][episode]))

    def load_frames_uint8(self, episode: int, frames: np.ndarray) -> np.ndarray:
        """Raw video frames (T, H, W, 3) uint8 of ``episode`` at positions ``frames``."""
        rows = self._rows[episode][frames]
        start = float(self.episodes[f"videos/{self.video_key}/from_timestamp"][episode])
        ts = start + self.columns["timestamp"][rows].astype(np.float64)
        tol = 0.5 / self.fps  # timestamps are stored as float32; any error below half a frame is unambiguous
        path = self.video_path(episode)
        video = decode_frames(path, ts, tolerance_s=tol)
        if self.frame_size is not None and video.shape[1:3] != self.frame_size:
            (h, w), (mh, mw) = video.shape[1:3], self.frame_size
            raise DataError(f"video {path} has {h}x{w} frames but meta/info.json says {mh}x{mw} for "
                            f"{self.video_key}; the dataset is inconsistent, {_FIX}")
        return video

    def load_clip(self, episode: int, frames: np.ndarray) -> dict[str, torch.Tensor]:
        frames = np.asarray(frames)
        if frames.min() < 0 or frames.max() >= len(self._rows[episode]):
            raise IndexError(f"frames {frames.min()}..{frames.max()} outside episode {episode} "
                             f"of length {len(self._rows[episode])}")
        rows = self._rows[episode][frames]
        video = torch.from_numpy(self.load_frames_uint8(episode, frames)).permute(0, 3, 1, 2).float() / 255.0
        out: dict[str, torch.Tensor] = {keys.VIDEO: video}  # (T, 3, H, W)
        for col, key in self.batch_columns.items():
            v = self.columns[col][rows]
            out[key] = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bool if v.dtype == bool else torch.float32)
        if keys.POSITIONS in out:  # stored flat (T, K*2)
            out[keys.POSITIONS] = out[keys.POSITIONS].reshape(len(frames), -1, 2)
        mask = self._load_extra("mask", episode)
        if mask is not None:
            want = (len(self._rows[episode]), *video.shape[-2:])
            if mask.shape != want:
                raise DataError(f"{self._extra_path('mask', episode)}: mask has shape {mask.shape} but episode "
                                f"{episode} has {want[0]} frames of {want[1]}x{want[2]}; the dataset is inconsistent, "
                                f"{_FIX}")
            out[keys.MASK] = torch.from_numpy(mask[frames].astype(np.int64))  # (T, H, W)
        if self.image_size is not None:
            out = self._resize(out)
        return out

    def _extra_path(self, name: str, episode: int) -> Path | None:
        template = self.info.get("hclsm_extras", {}).get(name)
        if template is None:
            return None
        return self.root / template.format(episode_index=int(self.episodes["episode_index"][episode]))

    def _load_extra(self, name: str, episode: int) -> np.ndarray | None:
        path = self._extra_path(name, episode)
        return None if path is None else self._npz(path, name)

    def _resize(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s, (h, w) = self.image_size, out[keys.VIDEO].shape[-2:]
        if (h, w) == (s, s):
            return out
        out[keys.VIDEO] = F.interpolate(out[keys.VIDEO], size=(s, s), mode="bilinear", antialias=True,
                                        align_corners=False).clamp_(0, 1)
        if keys.MASK in out:
            out[keys.MASK] = F.interpolate(out[keys.MASK][:, None].float(), size=(s, s), mode="nearest-exact")[:, 0].long()
        if keys.POSITIONS in out:
            out[keys.POSITIONS] = out[keys.POSITIONS] * (s / w)
        return out


def _load_npz(path: Path, name: str) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"PK":  # an npz is a zip archive; anything else would be tried as a pickle
                raise DataError(f"cannot read {path} (not an .npz archive); the file is corrupt, {_FIX}")
        with np.load(path, allow_pickle=False) as z:
            if name not in z.files:
                raise DataError(f"{path} has no array {name!r} (it has {z.files[:5]}); the file is corrupt, {_FIX}")
            return z[name]
    except FileNotFoundError:
        raise DataError(f"{path} is missing; the dataset is incomplete, {_FIX}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path} ({e.__class__.__name__}: {' '.join(str(e).split())}); the file is corrupt, "
                        f"{_FIX}") from None
