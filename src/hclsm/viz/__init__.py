"""Pictures for reports, as uint8 RGB arrays (no plotting library): frame strips with object-mask
overlays, slot masks over frames (with birth and death), segmentation against ground truth, alpha heat
maps, and a chart of alive slots per frame; saved as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

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
    """Write an (H, W, 3) uint8 image as PNG (parent directories are created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


# ---- figures of the object layer ----------------------------------------------------------------

# anchor colours of the viridis colour map (matplotlib's, sampled at 0, 1/8, ..., 1), interpolated linearly
_VIRIDIS = np.array([[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141], [39, 173, 129],
                     [92, 200, 99], [170, 220, 50], [253, 231, 37]], np.float32)
BACKDROP = 24  # what a slot's tile shows where its mask is 0 (near black: PushT's background is white)
DIM_GREY, HATCH_GREY = 150, 110  # a dead slot's tile: flat grey with darker diagonal hatching
BIRTH_RGB, DEATH_RGB = (44, 160, 44), (214, 39, 40)  # tile borders on the frame a slot is born / dies
COUNT_RGB, TRUTH_RGB = (31, 119, 180), (255, 127, 14)  # alive-count chart lines


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 as is, or (T, 3, H, W) float in [0, 1] -> (T, H, W, 3) uint8."""
    f = _np(frames)
    if f.ndim == 4 and f.shape[-1] == 3 and f.dtype == np.uint8:
        return f
    if f.ndim != 4 or f.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, H, W) float or (T, H, W, 3) uint8, got shape {f.shape}")
    return to_uint8_frames(f)


def resize_maps(maps, size: tuple[int, int]) -> np.ndarray:
    """(..., R, R') float maps -> (..., H, W) float32, bilinear (the decoder's masks to the frame size)."""
    m = torch.as_tensor(_np(maps), dtype=torch.float32)
    if tuple(m.shape[-2:]) == tuple(size):
        return m.numpy()
    lead = m.shape[:-2]
    flat = m.reshape(-1, 1, *m.shape[-2:])
    out = torch.nn.functional.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size).numpy()


def colormap(values) -> np.ndarray:
    """Values in [0, 1] (any shape) -> (..., 3) uint8 colours of the viridis map (clipped outside [0, 1])."""
    v = np.clip(np.nan_to_num(_np(values).astype(np.float32)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(v).astype(np.int64), len(_VIRIDIS) - 2)
    w = (v - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - w) + _VIRIDIS[lo + 1] * w + 0.5).astype(np.uint8)


def _dead_tile(h: int, w: int) -> np.ndarray:
    """The tile of a dead slot: flat grey with diagonal hatching."""
    tile = np.full((h, w, 3), DIM_GREY, np.uint8)
    yy, xx = np.mgrid[:h, :w]
    tile[(xx + yy) % 8 < 2] = HATCH_GREY
    return tile


def _border(tile: np.ndarray, rgb: tuple[int, int, int], width: int = 2) -> None:
    tile[:width], tile[-width:], tile[:, :width], tile[:, -width:] = rgb, rgb, rgb, rgb


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed-size bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, anchor: str = "la") -> None:
    """Black ``text`` placed by a two-letter anchor (l/m/r, then t/m/d) computed from its bounding box
    (works with the bitmap font of old Pillow versions too, which has no anchors)."""
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - {"l": x0, "m": (x0 + x1) / 2, "r": x1}[anchor[0]]
    y = xy[1] - {"a": 0, "t": y0, "m": (y0 + y1) / 2, "d": y1}[anchor[1]]
    draw.text((round(x), round(y)), text, fill=(0, 0, 0), font=font)


def labelled_grid(rows: list[np.ndarray], labels: list[str], scale: int = 2, gap: int = 2) -> np.ndarray:
    """``frame_strip(rows, scale, gap)`` with each row's label written in a margin on the left."""
    grid = frame_strip(rows, scale=scale, gap=gap)
    font = _font()
    margin = 8 + max((int(font.getlength(s)) for s in labels), default=0)
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, label in zip(rows, labels):
        h = row.shape[1] * scale
        _text(draw, (4, y + h // 2), label, font, "lm")
        y += h + gap * scale
    return np.asarray(canvas)


def _slot_labels(k: int, background: bool) -> list[str]:
    return [("bg" if background and i == 0 else f"slot {i}") for i in range(k)]


def slot_masks_figure(video, recon, alphas, alive, background: bool = True, scale: int = 2) -> np.ndarray:
    """Slot masks over the frames of one clip, as one uint8 image (H', W', 3).

    Args:
        video: (T, 3, H, W) float frames in [0, 1] (or (T, H, W, 3) uint8).
        recon: (T, 3, R, R) the decoder's reconstruction (resized to H x W), or None (no such row; e.g.
            a model that reconstructs features, not pixels).
        alphas: (T, K, R, R) compositing masks (resized bilinearly to H x W).
        alive: (T, K) bool, which slots were alive on each frame.
        background: slot 0 is the background slot (labelled ``bg``).

    Rows: the input frames, the reconstruction (when given), then one row per slot showing the frame weighted by
    that slot's mask over a near-black backdrop. A dead slot's tile is flat grey with hatching; a green border marks the
    frame a slot is born (alive, dead on the previous frame), a red border the frame it dies.
    """
    frames = _as_frames(video)
    t, h, w, _ = frames.shape
    a = resize_maps(alphas, (h, w))  # (T, K, H, W)
    alive = _np(alive).astype(bool)
    if a.shape[:2] != alive.shape or a.shape[0] != t:
        raise ValueError(f"alphas {a.shape[:2]} and alive {alive.shape} must both be (T={t}, K)")
    rows, labels = [frames], ["input"]
    if recon is not None:
        rows.append(to_uint8_frames(np.clip(resize_maps(recon, (h, w)), 0.0, 1.0)))
        labels.append("recon")
    for k in range(a.shape[1]):
        m = np.clip(a[:, k], 0.0, 1.0)[..., None]
        row = (m * frames + (1 - m) * BACKDROP + 0.5).astype(np.uint8)
        for i in range(t):
            if not alive[i, k]:
                row[i] = _dead_tile(h, w)
            if i > 0 and alive[i, k] != alive[i - 1, k]:
                _border(row[i], BIRTH_RGB if alive[i, k] else DEATH_RGB)
        rows.append(row)
    return labelled_grid(rows, [*labels, *_slot_labels(a.shape[1], background)], scale=scale)


def _match_ids(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Renumber the non-zero predicted ids so that each takes the ground-truth id it overlaps best
    (one-to-one, Hungarian on IoU over the clip); unmatched ids get fresh ids above the ground truth's."""
    from hclsm.metrics import hungarian_match

    g_ids = [int(i) for i in np.unique(gt) if i != 0]
    p_ids = [int(i) for i in np.unique(pred) if i != 0]
    out = np.zeros_like(pred)
    mapping: dict[int, int] = {}
    if g_ids and p_ids:
        iou = np.array([[np.logical_and(gt == g, pred == p).sum() / max(np.logical_or(gt == g, pred == p).sum(), 1)
                         for p in p_ids] for g in g_ids])
        for r, c in zip(*hungarian_match(iou, maximize=True)):
            if iou[r, c] > 0:
                mapping[p_ids[c]] = g_ids[r]
    fresh = max(g_ids, default=0) + 1
    for p in p_ids:
        if p not in mapping:
            mapping[p], fresh = fresh, fresh + 1
        out[pred == p] = mapping[p]
    return out


def segmentation_figure(frames, gt_mask, pred_seg, match: bool = True, scale: int = 2) -> np.ndarray:
    """Rows: frames, the ground-truth mask over them, the predicted segmentation over them (uint8 image).

    ``gt_mask`` and ``pred_seg`` are (T, H, W) ids at the frame size (0 = background / the background
    slot, left uncoloured). With ``match`` each predicted slot takes the colour of the ground-truth
    object it overlaps best, so equal colours mean "this slot is that object".
    """
    f = _as_frames(frames)
    gt, pred = _np(gt_mask).astype(np.int64), _np(pred_seg).astype(np.int64)
    if gt.shape != f.shape[:3] or pred.shape != f.shape[:3]:
        raise ValueError(f"gt_mask {gt.shape} and pred_seg {pred.shape} must be (T, H, W) = {f.shape[:3]}")
    if match:
        pred = _match_ids(gt, pred)
    return labelled_grid([f, overlay(f, gt), overlay(f, pred)], ["input", "truth", "slots"], scale=scale)


def alpha_heatmaps(alphas, alive=None, background: bool = True, size: int | None = None,
                   scale: int = 2) -> np.ndarray:
    """Per-slot heat maps of the alpha masks (T, K, R, R): one row per slot, one column per frame.

    Values in [0, 1] are drawn with the viridis map (dark = 0, yellow = 1), at ``size`` pixels a side
    (default R); when ``alive`` (T, K) is given, dead slots are hatched as in ``slot_masks_figure``. A
    colour bar with ticks 0, 0.5 and 1 is drawn below.
    """
    a = _np(alphas).astype(np.float32)
    t, k = a.shape[:2]
    side = size or a.shape[-1]
    a = resize_maps(a, (side, side))
    rows = []
    for j in range(k):
        row = colormap(a[:, j])
        if alive is not None:
            for i in np.flatnonzero(~_np(alive)[:, j].astype(bool)):
                row[i] = _dead_tile(side, side)
        rows.append(row)
    grid = labelled_grid(rows, _slot_labels(k, background), scale=scale)
    return np.concatenate([grid, _colour_bar(grid.shape[1])], axis=0)


def _colour_bar(width: int, height: int = 34) -> np.ndarray:
    """A white strip with a horizontal colour bar and ticks 0, 0.5, 1 (for ``alpha_heatmaps``)."""
    canvas = Image.new("RGB", (width, height), "white")
    x0, x1 = width // 4, width - width // 4
    bar = colormap(np.linspace(0.0, 1.0, max(x1 - x0, 2)))[None].repeat(10, axis=0)
    canvas.paste(Image.fromarray(bar), (x0, 4))
    draw, font = ImageDraw.Draw(canvas), _font()
    for v in (0.0, 0.5, 1.0):
        x = x0 + v * (x1 - x0 - 1)
        draw.line([(x, 14), (x, 17)], fill=(0, 0, 0))
        _text(draw, (x, 18), f"{v:g}", font, "mt")
    _text(draw, (x0 - 6, 9), "alpha", font, "rm")
    return np.asarray(canvas)


def _ticks(n: int, most: int) -> list[int]:
    """Integer ticks 0, s, 2s, ... <= n with at most ``most`` of them."""
    step = max(1, -(-n // max(most - 1, 1)))
    return list(range(0, n + 1, step))


def alive_count_figure(count, truth=None, width: int = 480, height: int = 200,
                       title: str = "object slots alive per frame") -> np.ndarray:
    """A step chart of the number of alive slots per frame (blue) and, when given, the true number of
    objects (orange, dashed), with axis ticks and a legend; (height, width, 3) uint8."""
    count = _np(count).astype(np.float64).reshape(-1)
    series = [(count, COUNT_RGB, "alive slots", False)]
    if truth is not None:
        truth = _np(truth).astype(np.float64).reshape(-1)
        if truth.shape != count.shape:
            raise ValueError(f"truth {truth.shape} must have the shape of count {count.shape}")
        series.insert(0, (truth, TRUTH_RGB, "true objects", True))  # drawn first, the count on top
    t = len(count)
    if t == 0:
        raise ValueError("count is empty")
    y_max = int(np.ceil(max(float(np.nanmax(s[0])) for s in series))) + 1
    left, right, top, bottom = 34, 12, 44, 32
    pw, ph = width - left - right, height - top - bottom
    if pw < 20 or ph < 20:
        raise ValueError(f"a chart of {width}x{height} px is too small; use at least {left + right + 20}x{top + bottom + 20}")

    def px(frame: float) -> float:  # frame i spans [px(i), px(i + 1))
        return left + pw * frame / t

    def py(v: float) -> float:
        return top + ph * (1 - v / y_max)

    img = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(img), _font()
    for v in _ticks(y_max, 6):  # y axis: grid lines and integer ticks
        draw.line([(left, py(v)), (left + pw, py(v))], fill=(225, 225, 225))
        draw.line([(left - 4, py(v)), (left, py(v))], fill=(0, 0, 0))
        _text(draw, (left - 6, py(v)), str(v), font, "rm")
    for i in _ticks(t - 1, 10):  # x axis: frame indices at the middle of each frame's step
        x = (px(i) + px(i + 1)) / 2
        draw.line([(x, top + ph), (x, top + ph + 4)], fill=(0, 0, 0))
        _text(draw, (x, top + ph + 6), str(i), font, "mt")
    draw.line([(left, top), (left, top + ph), (left + pw, top + ph)], fill=(0, 0, 0))
    _text(draw, (left + pw, height - 2), "frame", font, "rd")
    _text(draw, (left, 4), title, font, "lt")

    for values, rgb, _, dashed in series:
        points = []
        for i, v in enumerate(values):
            points += [(px(i), py(v)), (px(i + 1), py(v))]
        lw = 4 if dashed else 2
        for a, b in zip(points[:-1], points[1:]):
            if dashed and a[1] == b[1]:  # dashes along the horizontal runs
                x = a[0]
                while x < b[0]:
                    draw.line([(x, a[1]), (min(x + 6, b[0]), b[1])], fill=rgb, width=lw)
                    x += 10
            else:
                draw.line([a, b], fill=rgb, width=lw)

    x = left + pw  # legend, right-aligned under the title
    for _, rgb, label, _ in reversed(series):
        x -= int(font.getlength(label))
        _text(draw, (x, 26), label, font, "lm")
        draw.line([(x - 18, 26), (x - 4, 26)], fill=rgb, width=3)
        x -= 28
    return np.asarray(img)
