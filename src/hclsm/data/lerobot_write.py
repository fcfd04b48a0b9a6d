"""Write datasets in the LeRobot v3.0 layout.

    meta/info.json                                   features, fps, path templates, totals
    meta/stats.json                                  per-feature min/max/mean/std/count
    meta/tasks.parquet                               task string -> task_index
    meta/episodes/chunk-000/file-000.parquet         one row per episode: length, data/video pointers
    data/chunk-000/file-000.parquet                  one row per frame, many episodes per file
    videos/{video_key}/chunk-000/file-000.mp4        many episodes concatenated per file

As in LeRobot, episodes are concatenated inside data and video files, and an episode's frames are
found through ``dataset_from_index/dataset_to_index`` (rows) and ``from_timestamp`` (video seconds).
Vector features are fixed-size float32 list columns; scalar ones are plain columns. hclsm's extra
per-episode arrays (e.g. object masks) go to ``extras/{name}/episode_{i:06d}.npz`` and are listed in
``info.json["hclsm_extras"]``, a key LeRobot ignores.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hclsm.data.video import encode_video

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
EXTRA_PATH = "extras/{name}/episode_{episode_index:06d}.npz"
CHUNK_SIZE = 1000  # files per chunk directory (LeRobot's default)


@dataclass
class _Episode:
    length: int
    task: str
    from_index: int


@dataclass
class LeRobotV3Writer:
    """Accumulate episodes, then ``finalize()`` writes the whole dataset under ``root``.

    ``features`` maps non-video column names to ``{"dtype", "shape", "names"}`` as in info.json;
    ``video_keys`` maps each camera key to its (H, W) and are stored as mp4 with ``codec``.
    ``episodes_per_file`` bounds how many episodes share one data/video file.
    """

    root: Path
    fps: int
    features: dict
    video_keys: dict[str, tuple[int, int]]
    codec: str = "h264"
    robot_type: str = "unknown"
    episodes_per_file: int = 50
    _columns: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _videos: dict[str, list[np.ndarray]] = field(default_factory=dict)
    _episodes: list[_Episode] = field(default_factory=list)
    _tasks: dict[str, int] = field(default_factory=dict)
    _extras: set[str] = field(default_factory=set)

    def add_episode(self, frames: dict[str, np.ndarray], videos: dict[str, np.ndarray], task: str,
                    extras: dict[str, np.ndarray] | None = None) -> int:
        """Add one episode; ``frames`` holds (T, ...) arrays for every feature, ``videos`` (T, H, W, 3) uint8."""
        lengths = {k: len(v) for k, v in {**frames, **videos}.items()}
        T = next(iter(lengths.values()))
        if set(lengths.values()) != {T}:
            raise ValueError(f"episode arrays disagree on length: {lengths}")
        if set(frames) != set(self.features) or set(videos) != set(self.video_keys):
            raise ValueError(f"episode keys {sorted(frames) + sorted(videos)} != declared features "
                             f"{sorted(self.features) + sorted(self.video_keys)}")
        ep = len(self._episodes)
        task_index = self._tasks.setdefault(task, len(self._tasks))
        from_index = sum(e.length for e in self._episodes)
        auto = {"episode_index": np.full(T, ep, np.int64), "frame_index": np.arange(T, dtype=np.int64),
                "timestamp": (np.arange(T) / self.fps).astype(np.float32),
                "index": from_index + np.arange(T, dtype=np.int64), "task_index": np.full(T, task_index, np.int64)}
        for k, v in {**frames, **auto}.items():
            self._columns.setdefault(k, []).append(np.asarray(v))
        for k, v in videos.items():
            self._videos.setdefault(k, []).append(np.asarray(v, dtype=np.uint8))
        for name, arr in (extras or {}).items():
            path = self.root / EXTRA_PATH.format(name=name, episode_index=ep)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **{name: arr})
            self._extras.add(name)
        self._episodes.append(_Episode(T, task, from_index))
        return ep

    def _file_groups(self) -> list[list[int]]:
        n = len(self._episodes)
        return [list(range(s, min(s + self.episodes_per_file, n))) for s in range(0, n, self.episodes_per_file)]

    def finalize(self, extra_info: dict | None = None) -> dict:
        """Write data, videos and metadata; returns the info.json dict (``extra_info`` keys added to it)."""
        if not self._episodes:
            raise ValueError("no episodes were added")
        groups = self._file_groups()
        ep_rows: dict[str, list] = {k: [] for k in (
            "episode_index", "tasks", "length", "data/chunk_index", "data/file_index",
            "dataset_from_index", "dataset_to_index", "meta/episodes/chunk_index", "meta/episodes/file_index")}
        for g, eps in enumerate(groups):
            chunk, fidx = divmod(g, CHUNK_SIZE)
            self._write_data_file(chunk, fidx, eps)
            for key in self.video_keys:
                self._write_video_file(key, chunk, fidx, eps, ep_rows)
            for e in eps:
                ep = self._episodes[e]
                ep_rows["episode_index"].append(e)
                ep_rows["tasks"].append([ep.task])
                ep_rows["length"].append(ep.length)
                ep_rows["data/chunk_index"].append(chunk)
                ep_rows["data/file_index"].append(fidx)
                ep_rows["dataset_from_index"].append(ep.from_index)
                ep_rows["dataset_to_index"].append(ep.from_index + ep.length)
                ep_rows["meta/episodes/chunk_index"].append(0)
                ep_rows["meta/episodes/file_index"].append(0)
        path = self.root / EPISODES_PATH
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(ep_rows), path)
        tasks = sorted(self._tasks, key=self._tasks.get)
        pq.write_table(pa.table({"task_index": pa.array([self._tasks[t] for t in tasks], pa.int64()),
                                 "task": tasks}), self.root / "meta/tasks.parquet")
        info = {**self._info(), **(extra_info or {})}
        (self.root / "meta/info.json").write_text(json.dumps(info, indent=2))
        (self.root / "meta/stats.json").write_text(json.dumps(self._stats(), indent=2))
        return info

    def _write_data_file(self, chunk: int, fidx: int, eps: list[int]) -> None:
        cols = {}
        for k, parts in self._columns.items():
            v = np.concatenate([parts[e] for e in eps])
            if v.ndim == 1:
                cols[k] = pa.array(v)
            else:  # (N, D) -> fixed-size list column
                flat = pa.array(v.reshape(len(v), -1).reshape(-1))
                cols[k] = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(v.shape[1:])))
        path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=fidx)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols), path)

    def _write_video_file(self, key: str, chunk: int, fidx: int, eps: list[int], ep_rows: dict) -> None:
        frames = np.concatenate([self._videos[key][e] for e in eps])  # (sum T, H, W, 3)
        path = self.root / VIDEO_PATH.format(video_key=key, chunk_index=chunk, file_index=fidx)
        path.parent.mkdir(parents=True, exist_ok=True)
        encode_video(path, frames, self.fps, self.codec)
        start = 0
        for e in eps:
            T = self._episodes[e].length
            for col, val in ((f"videos/{key}/chunk_index", chunk), (f"videos/{key}/file_index", fidx),
                             (f"videos/{key}/from_timestamp", start / self.fps),
                             (f"videos/{key}/to_timestamp", (start + T) / self.fps)):
                ep_rows.setdefault(col, []).append(val)
            start += T

    def _info(self) -> dict:
        feats = {}
        for key, (h, w) in self.video_keys.items():
            feats[key] = {"dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channel"],
                          "info": {"video.height": h, "video.width": w, "video.codec": self.codec,
                                   "video.pix_fmt": "yuv420p", "video.is_depth_map": False,
                                   "video.fps": self.fps, "video.channels": 3, "has_audio": False}}
        feats.update(self.features)
        for k, dtype in (("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
                         ("index", "int64"), ("task_index", "int64")):
            feats[k] = {"dtype": dtype, "shape": [1], "names": None}
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": self.robot_type,
                "total_episodes": len(self._episodes), "total_frames": sum(e.length for e in self._episodes),
                "total_tasks": len(self._tasks), "chunks_size": CHUNK_SIZE, "data_files_size_in_mb": 100,
                "video_files_size_in_mb": 200, "fps": self.fps,
                "splits": {"train": f"0:{len(self._episodes)}"}, "data_path": DATA_PATH,
                "video_path": VIDEO_PATH if self.video_keys else None, "features": feats}
        if self._extras:
            info["hclsm_extras"] = {name: EXTRA_PATH.replace("{name}", name) for name in sorted(self._extras)}
        return info

    def _stats(self) -> dict:
        stats = {}
        for k, parts in self._columns.items():
            v = np.concatenate(parts).astype(np.float64)
            v = v.reshape(len(v), -1)
            stats[k] = {"min": v.min(0).tolist(), "max": v.max(0).tolist(), "mean": v.mean(0).tolist(),
                        "std": v.std(0).tolist(), "count": [len(v)]}
        for k, parts in self._videos.items():  # per channel, in [0, 1], shaped (3, 1, 1) as LeRobot
            v = np.concatenate(parts).reshape(-1, 3).astype(np.float64) / 255.0
            stats[k] = {s: [[[x]] for x in f(v)] for s, f in (
                ("min", lambda a: a.min(0)), ("max", lambda a: a.max(0)), ("mean", lambda a: a.mean(0)),
                ("std", lambda a: a.std(0)))}
            stats[k]["count"] = [sum(len(p) for p in parts)]
        return stats
