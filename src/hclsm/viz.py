"""Pictures for reports: frame strips with object-mask overlays, saved as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

# id 0 (background) stays uncoloured; then distinct colours for object ids 1, 2, ...
PALETTE = np.array([[0, 0, 0], [31, 119, 180], [214, 39, 40], [44, 160, 44], [255, 127, 14], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], np.uint8)


def to_uint8_frames(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """(T, 3, H, W) float in [0, 1] -> (T, H, W, 3) uint8."""
    v = video.detach().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video)
    return (np.clip(v.transpose(0, 2, 3, 1), 0, 1) * 255 + 0.5).astype(np.uint8)


def overlay(frames: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Blend object-id colours over frames where the mask is non-zero. (T, H, W, 3), (T, H, W)."""
    colours = PALETTE[np.asarray(mask) % len(PALETTE)].astype(np.float32)  # (T, H, W, 3)
    fg = (np.asarray(mask) > 0)[..., None]
    out = np.where(fg, (1 - alpha) * frames + alpha * colours, frames)
    return out.astype(np.uint8)


def frame_strip(rows: list[np.ndarray], scale: int = 2, gap: int = 2) -> np.ndarray:
    """Stack rows of frames (each (T, H, W, 3) uint8) into one image with white gaps."""
    tiles = []
    for row in rows:
        t, h, w, _ = row.shape
        line = np.full((h, t * (w + gap) - gap, 3), 255, np.uint8)
        for i, f in enumerate(row):
            line[:, i * (w + gap): i * (w + gap) + w] = f
        tiles.append(line)
    width = max(t.shape[1] for t in tiles)
    canvas = np.full((sum(t.shape[0] + gap for t in tiles) - gap, width, 3), 255, np.uint8)
    y = 0
    for t in tiles:
        canvas[y:y + t.shape[0], :t.shape[1]] = t
        y += t.shape[0] + gap
    return np.kron(canvas, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else canvas


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
