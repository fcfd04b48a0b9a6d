"""Blinking Color Balls (SlotSSM paper, section 7.2 and appendix B): a long-range reasoning benchmark.

An episode is ``context_frames`` frames of balls bouncing in a box (walls and elastic ball-ball
collisions) plus one target frame (the next time step). In every context frame all balls are first
white, then **one** ball, picked uniformly and independently per frame, is coloured with one of 5
non-white colours (also uniform and independent), so a ball may be picked never, once or many times.
The target frame shows the balls at their next positions, coloured by a rule (appendix B.2):

* ``earliest``: a ball's colour is the earliest non-white colour it was assigned; white if never picked.
* ``most_frequent``: the non-white colour assigned to it most often; ties go to the colour (among the
  most frequent) that was assigned first; white if never picked.

Images are class maps: 0 background (black), 1 white, 2..6 the five colours (``PALETTE``); the model's
target is 7-way pixel classification (lossless: the renderer only uses these colours). Balls are drawn
in index order (a later ball covers an earlier one where they touch). For the long-sequence task the
context frames are cut into non-overlapping ``patch`` = (ph, pw) patches, flattened frame by frame in
raster order: a sequence of ``context_frames * (H / ph) * (W / pw)`` patches (``sequence_length``).

Episode i depends only on (seed, i): ``np.random.default_rng([seed, i])``.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from hclsm.errors import ConfigError, DataError

RULES = ("earliest", "most_frequent")
BACKGROUND, WHITE = 0, 1
NUM_COLORS = 5  # non-white colours: classes 2..6
CLASSES = 2 + NUM_COLORS
PALETTE = np.array([[0, 0, 0], [255, 255, 255], [230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 220, 40],
                    [200, 60, 220]], dtype=np.uint8)  # (7, 3) RGB of each class


@dataclass
class BlinkingConfig:
    rule: str = "earliest"  # one of RULES
    context_frames: int = 5  # paper: 5 (Earliest Color) and 10 (Most Frequent Color); see BENCHMARKS.md
    image_size: int = 16
    balls: int = 3
    radius: float = 2.2  # ball radius in pixels
    speed: float = 1.0  # initial speed in pixels per frame
    patch: tuple[int, int] = (4, 4)  # (ph, pw) of the patchified context
    seed: int = 0

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, msg: str) -> None:
            if not ok:
                raise ConfigError(f"blinking.{name}: {msg}")

        check(self.rule in RULES, "rule", f"must be one of {', '.join(RULES)}, got {self.rule!r}")
        check(self.context_frames >= 1, "context_frames", f"must be >= 1, got {self.context_frames}")
        check(8 <= self.image_size <= 128, "image_size", f"must be in [8, 128], got {self.image_size}")
        check(1 <= self.balls <= 8, "balls", f"must be in [1, 8], got {self.balls}")
        check(0.5 <= self.radius <= self.image_size / 4, "radius",
              f"must be in [0.5, image_size / 4 = {self.image_size / 4:g}], got {self.radius}")
        self.patch = tuple(int(p) for p in self.patch)
        check(len(self.patch) == 2 and all(p >= 1 and self.image_size % p == 0 for p in self.patch), "patch",
              f"must be two sides that divide image_size ({self.image_size}), got {self.patch}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")

    @property
    def patches_per_frame(self) -> int:
        return (self.image_size // self.patch[0]) * (self.image_size // self.patch[1])

    @property
    def sequence_length(self) -> int:
        return self.context_frames * self.patches_per_frame


def earliest_color(picks: np.ndarray, colors: np.ndarray, balls: int) -> np.ndarray:
    """(balls,) target classes: each ball's first assigned colour, WHITE if never picked.

    ``picks`` (T,) ball picked at each context frame, ``colors`` (T,) its colour class (2..6)."""
    out = np.full(balls, WHITE, dtype=np.uint8)
    for b in range(balls):
        hits = np.flatnonzero(picks == b)
        if hits.size:
            out[b] = colors[hits[0]]
    return out


def most_frequent_color(picks: np.ndarray, colors: np.ndarray, balls: int) -> np.ndarray:
    """(balls,) target classes: each ball's most often assigned colour (ties: the one assigned first among
    the most frequent), WHITE if never picked."""
    out = np.full(balls, WHITE, dtype=np.uint8)
    for b in range(balls):
        mine = colors[picks == b]  # this ball's colours in time order
        if mine.size:
            values, counts = np.unique(mine, return_counts=True)
            tied = set(values[counts == counts.max()].tolist())
            out[b] = next(c for c in mine if c in tied)  # the earliest assigned among the most frequent
    return out


def simulate(rng: np.random.Generator, cfg: BlinkingConfig, frames: int) -> np.ndarray:
    """(frames, balls, 2) centres (x, y) in pixels: constant velocity, elastic walls and equal-mass elastic
    collisions between balls (exchange of the normal velocity components)."""
    size, r, n = cfg.image_size, cfg.radius, cfg.balls
    pos = np.zeros((n, 2))
    for i in range(n):  # rejection-sample non-overlapping starts
        for _ in range(1000):
            p = rng.uniform(r, size - r, size=2)
            if all(np.linalg.norm(p - pos[j]) >= 2 * r for j in range(i)):
                break
        pos[i] = p
    ang = rng.uniform(0, 2 * np.pi, size=n)
    vel = cfg.speed * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    out = np.zeros((frames, n, 2))
    substeps = 4
    for t in range(frames):
        out[t] = pos
        for _ in range(substeps):
            pos = pos + vel / substeps
            for d in range(2):
                low, high = pos[:, d] < r, pos[:, d] > size - r
                vel[low | high, d] *= -1
                pos[low, d] = 2 * r - pos[low, d]
                pos[high, d] = 2 * (size - r) - pos[high, d]
            for i in range(n):
                for j in range(i + 1, n):
                    delta = pos[j] - pos[i]
                    dist = np.linalg.norm(delta)
                    if 0 < dist < 2 * r:
                        normal = delta / dist
                        approach = np.dot(vel[i] - vel[j], normal)
                        if approach > 0:
                            vel[i] -= approach * normal
                            vel[j] += approach * normal
    return out


def render(positions: np.ndarray, classes: np.ndarray, size: int, radius: float) -> np.ndarray:
    """(size, size) uint8 class map of balls at ``positions`` (balls, 2) with ``classes`` (balls,)."""
    c = np.arange(size) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((size, size), dtype=np.uint8)
    for (x, y), k in zip(positions, classes):
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius ** 2] = k
    return img


def blinking_episode(cfg: BlinkingConfig, index: int) -> dict[str, np.ndarray]:
    """One episode: ``context`` (T, H, W) and ``target`` (H, W) class maps, ``picks`` / ``colors`` (T,),
    ``target_colors`` (balls,) and ``positions`` (T + 1, balls, 2)."""
    rng = np.random.default_rng([cfg.seed, index])
    t = cfg.context_frames
    positions = simulate(rng, cfg, t + 1)
    picks = rng.integers(0, cfg.balls, size=t)
    colors = rng.integers(2, 2 + NUM_COLORS, size=t).astype(np.uint8)
    context = np.zeros((t, cfg.image_size, cfg.image_size), dtype=np.uint8)
    for i in range(t):
        classes = np.full(cfg.balls, WHITE, dtype=np.uint8)
        classes[picks[i]] = colors[i]
        context[i] = render(positions[i], classes, cfg.image_size, cfg.radius)
    rule = earliest_color if cfg.rule == "earliest" else most_frequent_color
    target_colors = rule(picks, colors, cfg.balls)
    target = render(positions[t], target_colors, cfg.image_size, cfg.radius)
    return {"context": context, "target": target, "picks": picks, "colors": colors,
            "target_colors": target_colors, "positions": positions.astype(np.float32)}


def make_blinking(cfg: BlinkingConfig, episodes: int, start: int = 0, progress: bool = False
                  ) -> dict[str, np.ndarray]:
    """Episodes start .. start + episodes - 1, stacked: ``context`` (N, T, H, W), ``target`` (N, H, W), ..."""
    eps = [blinking_episode(cfg, i) for i in tqdm(range(start, start + episodes), desc=f"blinking {cfg.rule}",
                                                   unit="ep", disable=not progress)]
    return {k: np.stack([e[k] for e in eps]) for k in eps[0]}


def to_rgb(classes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Class maps (..., H, W) -> float RGB (..., H, W, 3) in [0, 1]."""
    classes = torch.as_tensor(np.asarray(classes), dtype=torch.long)
    return torch.from_numpy(PALETTE.astype(np.float32) / 255.0)[classes]


def patchify(context: np.ndarray | torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """Context class maps (N, T, H, W) -> the patch sequence (N, T * P, ph, pw, 3) in [0, 1] (RGB), frame by
    frame, patches in raster order."""
    rgb = to_rgb(context)  # (N, T, H, W, 3)
    n, t, h, w, _ = rgb.shape
    ph, pw = patch
    x = rgb.view(n, t, h // ph, ph, w // pw, pw, 3).permute(0, 1, 2, 4, 3, 5, 6)  # (N, T, gh, gw, ph, pw, 3)
    return x.reshape(n, t * (h // ph) * (w // pw), ph, pw, 3)


def save_blinking(out: str | os.PathLike, cfg: BlinkingConfig, episodes: int, progress: bool = True) -> Path:
    """Generate ``episodes`` episodes and write them to ``out`` (a .npz file) with their config."""
    out = Path(out)
    data = make_blinking(cfg, episodes, progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.npz")
    np.savez_compressed(tmp, config=np.array(json.dumps(asdict(cfg))), **data)
    os.replace(tmp, out)
    return out


def load_blinking(path: str | os.PathLike) -> tuple[BlinkingConfig, dict[str, np.ndarray]]:
    """Read a file written by ``save_blinking``; a missing or foreign file raises ``DataError``."""
    path = Path(path)
    try:
        with np.load(path) as f:
            cfg = BlinkingConfig(**json.loads(str(f["config"])))
            data = {k: f[k] for k in f.files if k != "config"}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: not a Blinking Color Balls file ({e}); regenerate it with save_blinking") from e
    return cfg, data
