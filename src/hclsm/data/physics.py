"""Physics-scene datasets: generate them to disk and read them back as clips.

The scenes (balls with collisions, hidden springs and one-way follow forces) are simulated and
rendered by ``hclsm.data.physics_sim``; see its docstring for the physics. A dataset directory is::

    meta.json                          format "hclsm-physics", version, config, palette, sizes
    episodes/episode_000000.npz        one factual episode per file
    counterfactual/episode_000000.npz  its intervened twin (when config.counterfactual)

Each npz holds ``video`` (T, H, W, 3) uint8, ``mask`` (T, H, W) uint8 (id k + 1 for ball k),
``positions`` / ``velocities`` (T, K, 2) float32 in pixels (/ frame), ``contacts`` (T, K, K) bool,
``events`` (T,) bool, ``radii`` (K,), ``colours`` (K, 3) uint8, ``springs`` / ``follow`` (K, K) bool
and ``graph`` (K, K) float32 (``[i, j] = 1``: i acts on j). Twins add ``intervention_kind``,
``intervention_step``, ``intervention_object`` and ``intervention_vector`` (see ``Intervention``);
a removed object has NaN positions and velocities from the intervention step on.

Episode i depends only on ``(seed, i)``, so datasets are reproducible and independent of the
number of episodes generated.
"""
from __future__ import annotations

import functools
import json
import os
import time
import zipfile
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hclsm import keys
from hclsm.config.data import PhysicsDataConfig
from hclsm.data.physics_sim import (
    INTERVENTIONS, PALETTE, Scene, Trajectory, counterfactual, render, sample_intervention,
    sample_scene, simulate,
)
from hclsm.errors import DataError
from hclsm.utils.atomic import atomic_output_dir
from hclsm.utils.interrupt import interrupt_point

FORMAT = "hclsm-physics"
VERSION = 1
ARRAYS = ("video", "mask", "positions", "velocities", "contacts", "events", "radii", "colours", "springs",
          "follow", "graph")
INTERVENTION_ARRAYS = ("intervention_kind", "intervention_step", "intervention_object", "intervention_vector")


def _episode_arrays(scene: Scene, traj: Trajectory, background: tuple[int, ...]) -> dict[str, np.ndarray]:
    video, mask = render(scene, traj.positions, background)  # (T, H, W, 3), (T, H, W)
    return {
        "video": video, "mask": mask, "positions": traj.positions, "velocities": traj.velocities,
        "contacts": traj.contacts, "events": traj.events, "radii": scene.radii.astype(np.float32),
        "colours": scene.colours, "springs": scene.springs, "follow": scene.follow, "graph": scene.graph,
    }


def simulate_episode(cfg: PhysicsDataConfig, index: int) -> tuple[dict[str, np.ndarray], dict | None]:
    """Arrays of factual episode ``index`` and of its twin (None unless ``cfg.counterfactual``)."""
    rng = np.random.default_rng([cfg.seed, index])
    num_objects = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    scene, state = sample_scene(rng, cfg.image_size, num_objects, cfg.spring_prob, cfg.follow_prob,
                                cfg.follow_strength)
    factual = simulate(scene, state, cfg.frames, cfg.substeps)
    if not cfg.counterfactual:
        return _episode_arrays(scene, factual, cfg.background), None
    iv = sample_intervention(np.random.default_rng([cfg.seed, index, 1]), scene, factual)
    twin = _episode_arrays(scene, counterfactual(scene, factual, iv, cfg.substeps), cfg.background)
    twin.update(intervention_kind=np.array(iv.kind), intervention_step=np.array(iv.step),
                intervention_object=np.array(iv.target), intervention_vector=iv.vector)
    return _episode_arrays(scene, factual, cfg.background), twin


def episode_file(index: int) -> str:
    return f"episode_{index:06d}.npz"


def generate_physics_dataset(out: str | os.PathLike, cfg: PhysicsDataConfig, overwrite: bool = False,
                             progress: bool = True) -> dict:
    """Write ``cfg.episodes`` episodes (and twins) to ``out`` atomically; return a summary dict."""
    start = time.perf_counter()
    collided, edges, objects, max_speed = [], [], [], 0.0
    kinds = dict.fromkeys(INTERVENTIONS, 0)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        (tmp / "episodes").mkdir()
        if cfg.counterfactual:
            (tmp / "counterfactual").mkdir()
        for i in tqdm(range(cfg.episodes), desc="physics episodes", unit="ep", disable=not progress):
            interrupt_point()
            factual, twin = simulate_episode(cfg, i)
            np.savez_compressed(tmp / "episodes" / episode_file(i), **factual)
            collided.append(bool(factual["events"].any()))
            edges.append(int(factual["graph"].sum()))
            objects.append(len(factual["radii"]))
            max_speed = max(max_speed, float(np.linalg.norm(factual["velocities"], axis=-1).max()))
            if twin is not None:
                np.savez_compressed(tmp / "counterfactual" / episode_file(i), **twin)
                kinds[str(twin["intervention_kind"])] += 1
        meta = {
            "format": FORMAT, "version": VERSION, "config": asdict(cfg), "episodes": cfg.episodes,
            "frames": cfg.frames, "image_size": cfg.image_size, "max_objects": cfg.max_objects,
            "counterfactual": cfg.counterfactual, "palette": PALETTE.tolist(),
            "background": list(cfg.background),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    seconds = time.perf_counter() - start
    return {
        "out": str(out), "episodes": cfg.episodes, "frames": cfg.frames, "seconds": round(seconds, 3),
        "seconds_per_episode": round(seconds / cfg.episodes, 4),
        "collision_fraction": float(np.mean(collided)), "mean_edges": float(np.mean(edges)),
        "mean_objects": float(np.mean(objects)), "max_speed": round(max_speed, 3),
        "interventions": kinds if cfg.counterfactual else {},
    }


def _regenerate_hint(root: Path) -> str:
    return f"regenerate it with `hclsm data physics --out {root} --overwrite`"


class PhysicsSource:
    """Reader of a physics dataset; an ``EpisodeSource`` for ``hclsm.data.clips.ClipDataset``.

    ``counterfactual=True`` serves the twins as clips instead (a removed object's positions and
    velocities are NaN from the intervention step on).
    """

    def __init__(self, root: str | os.PathLike, counterfactual: bool = False, cache_size: int = 64):
        self.root = Path(root)
        self.name = str(self.root)
        self.meta = self._read_meta()
        if counterfactual and not self.meta["counterfactual"]:
            raise DataError(f"{self.root} has no counterfactual twins; regenerate it with "
                            f"data.physics.counterfactual set to true")
        self.counterfactual = counterfactual
        self.episode_lengths = [int(self.meta["frames"])] * int(self.meta["episodes"])
        self.max_objects = int(self.meta["max_objects"])
        self._read = functools.lru_cache(maxsize=cache_size)(self._read_npz)

    def _read_meta(self) -> dict:
        path = self.root / "meta.json"
        if not self.root.exists():
            raise DataError(f"dataset {self.root} does not exist; create one with `hclsm data physics --out {self.root}`")
        if not path.is_file():
            raise DataError(f"{self.root} is not an hclsm physics dataset (missing meta.json); create one with "
                            f"`hclsm data physics --out {self.root}`")
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: cannot read ({e}); {_regenerate_hint(self.root)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DataError(f"{path}: not an hclsm physics dataset (format is not {FORMAT!r}); create one with "
                            f"`hclsm data physics --out DIR`")
        if meta.get("version") != VERSION:
            raise DataError(f"{path}: format version {meta.get('version')} is not supported "
                            f"(expected {VERSION}); {_regenerate_hint(self.root)}")
        missing = [k for k in ("episodes", "frames", "max_objects", "counterfactual") if k not in meta]
        if missing:
            raise DataError(f"{path}: lacks required keys {missing}; {_regenerate_hint(self.root)}")
        for key, least in (("episodes", 0), ("frames", 1), ("max_objects", 0), ("image_size", 1)):
            v = meta.get(key)
            if key == "image_size" and v is None:
                continue  # optional: frames of any size are accepted
            if not isinstance(v, int) or isinstance(v, bool) or v < least:
                raise DataError(f"{path}: {key} must be an integer >= {least}, got {v!r}; "
                                f"{_regenerate_hint(self.root)}")
        if meta["episodes"] == 0:
            raise DataError(f"{self.root} is empty (meta.json says 0 episodes); {_regenerate_hint(self.root)} and "
                            f"--episodes N")
        if not isinstance(meta["counterfactual"], bool):
            raise DataError(f"{path}: counterfactual must be true or false, got {meta['counterfactual']!r}; "
                            f"{_regenerate_hint(self.root)}")
        return meta

    def episode_path(self, index: int, counterfactual: bool = False) -> Path:
        if not 0 <= index < len(self.episode_lengths):
            raise DataError(f"{self.root}: episode {index} out of range [0, {len(self.episode_lengths)})")
        return self.root / ("counterfactual" if counterfactual else "episodes") / episode_file(index)

    def _read_npz(self, path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
            if magic[:2] != b"PK":  # an npz is a zip archive; anything else would be tried as a pickle
                what = "empty" if not magic else "not an .npz (zip) archive"
                raise DataError(f"{path}: corrupt physics episode (the file is {what}); "
                                f"{_regenerate_hint(self.root)}")
            with np.load(path, allow_pickle=False) as data:
                missing = [n for n in names if n not in data.files]
                if missing:
                    raise DataError(f"{path}: corrupt physics episode (missing arrays {missing}); "
                                    f"{_regenerate_hint(self.root)}")
                arrays = {n: data[n] for n in names}
        except FileNotFoundError:
            raise DataError(f"{path}: episode file is missing; {_regenerate_hint(self.root)}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise DataError(f"{path}: corrupt physics episode ({type(e).__name__}: {' '.join(str(e).split())}); "
                            f"{_regenerate_hint(self.root)}") from None
        self._check_arrays(path, arrays)
        for a in arrays.values():
            a.flags.writeable = False  # cached and shared between calls
        return arrays

    def _check_arrays(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        """The shapes and dtypes the format promises (see the module docstring), checked once per file read,
        so a wrong-sized, grayscale or float episode fails here with its name instead of deep in a model."""
        def bad(what: str) -> DataError:
            return DataError(f"{path}: {what}; the episode does not match the hclsm physics format, "
                             f"{_regenerate_hint(self.root)}")

        video, mask = arrays["video"], arrays["mask"]
        if video.ndim != 4 or video.shape[-1] != 3:
            got = f"{video.shape[-1]} channels" if video.ndim == 4 else f"{video.ndim} dimensions"
            raise bad(f"video has shape {video.shape} ({got}), expected (T, H, W, 3) RGB frames")
        if video.dtype != np.uint8:
            raise bad(f"video is {video.dtype}, expected uint8 frames in [0, 255]")
        frames, size = self.meta["frames"], self.meta.get("image_size")
        if video.shape[0] != frames:
            raise bad(f"video has {video.shape[0]} frames but meta.json says {frames}")
        if size is not None and video.shape[1:3] != (size, size):
            raise bad(f"video frames are {video.shape[1]}x{video.shape[2]} but meta.json says {size}x{size}")
        if mask.shape != video.shape[:3] or mask.dtype.kind not in "iu":
            raise bad(f"mask is {mask.dtype} {mask.shape}, expected integer ids of shape {video.shape[:3]}")
        k = len(arrays["radii"])
        if k > self.max_objects:
            raise bad(f"has {k} objects but meta.json says at most {self.max_objects}")
        for name in ("positions", "velocities"):
            if arrays[name].shape != (frames, k, 2):
                raise bad(f"{name} has shape {arrays[name].shape}, expected {(frames, k, 2)}")
        if arrays["events"].shape != (frames,) or arrays["graph"].shape != (k, k):
            raise bad(f"events {arrays['events'].shape} / graph {arrays['graph'].shape} do not match {frames} frames "
                      f"and {k} objects")

    def load_episode(self, index: int, counterfactual: bool = False) -> dict:
        """Raw arrays of one episode (read-only); twins also carry the intervention metadata, with
        ``intervention_kind`` a str and ``intervention_step`` / ``intervention_object`` ints."""
        names = ARRAYS + INTERVENTION_ARRAYS if counterfactual else ARRAYS
        episode = dict(self._read(self.episode_path(index, counterfactual), names))
        if counterfactual:
            for name in ("intervention_kind", "intervention_step", "intervention_object"):
                episode[name] = episode[name].item()
        return episode

    def load_clip(self, episode: int, frames: np.ndarray) -> dict[str, torch.Tensor]:
        """One clip in the ``hclsm.keys`` batch format; object slots padded to ``max_objects``."""
        ep = self.load_episode(episode, self.counterfactual)
        frames = np.asarray(frames, dtype=np.int64)  # (T,)
        length = self.episode_lengths[episode]
        if frames.size and (frames.min() < 0 or frames.max() >= length):
            raise DataError(f"{self.root}: frames {frames.min()}..{frames.max()} outside episode {episode} "
                            f"of {length} frames")
        k, kmax = len(ep["radii"]), self.max_objects
        video = ep["video"][frames].transpose(0, 3, 1, 2).astype(np.float32) / 255.0  # (T, 3, H, W)
        positions = np.zeros((len(frames), kmax, 2), dtype=np.float32)  # (T, Kmax, 2)
        positions[:, :k] = ep["positions"][frames]
        velocities = np.zeros((len(frames), kmax, 2), dtype=np.float32)  # (T, Kmax, 2)
        velocities[:, :k] = ep["velocities"][frames]
        graph = np.zeros((kmax, kmax), dtype=np.float32)  # (Kmax, Kmax)
        graph[:k, :k] = ep["graph"]
        return {
            keys.VIDEO: torch.from_numpy(np.ascontiguousarray(video)),
            keys.MASK: torch.from_numpy(ep["mask"][frames].astype(np.int64)),  # (T, H, W)
            keys.POSITIONS: torch.from_numpy(positions),
            keys.VELOCITIES: torch.from_numpy(velocities),
            keys.OBJECTS: torch.arange(kmax) < k,  # (Kmax,)
            keys.EVENTS: torch.from_numpy(ep["events"][frames]),  # (T,)
            keys.GRAPH: torch.from_numpy(graph),
        }
