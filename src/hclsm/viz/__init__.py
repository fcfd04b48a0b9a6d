"""Pictures for reports, as uint8 RGB arrays: frame strips with object-mask overlays, slot masks over
frames (with birth and death), segmentation against ground truth and alpha heat maps (numpy and PIL),
and a chart of alive slots per frame (matplotlib, off-screen on the Agg canvas); saved as PNG."""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
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
    """Values in [0, 1] (any shape) -> (..., 3) uint8 colours of matplotlib's viridis map (clipped outside
    [0, 1])."""
    v = np.clip(np.nan_to_num(_np(values).astype(np.float32)), 0.0, 1.0)
    return np.asarray(matplotlib.colormaps["viridis"](v, bytes=True), np.uint8)[..., :3]


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
    k = a.shape[1]
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


# ---- charts (matplotlib) ----------------------------------------------------------------------------

CHART_STYLE = {"font.size": 9, "legend.fontsize": 9, "legend.frameon": False}  # rcParams of every chart
GRID_RGB = (225, 225, 225)  # chart grid lines


def _rgb(rgb: tuple[int, int, int]) -> tuple[float, ...]:
    """A uint8 RGB triple as matplotlib's floats in [0, 1]."""
    return tuple(c / 255 for c in rgb)


@contextmanager
def _chart(width: int, height: int, layout: str | None = "constrained") -> Iterator[Figure]:
    """A white ``width`` x ``height`` px figure (dpi 100) on an Agg canvas, drawn in ``CHART_STYLE`` while the
    ``with`` block runs (no pyplot state); read it with ``_pixels`` inside the block."""
    with matplotlib.rc_context(CHART_STYLE):
        fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout=layout)
        FigureCanvasAgg(fig)
        try:
            yield fig
        finally:
            fig.clear()


def _pixels(fig: Figure, least: int = 0) -> np.ndarray:
    """Render ``fig`` -> (H, W, 3) uint8; ValueError when its layout does not fit or a plot would be smaller
    than ``least`` px either way."""
    width, height = (round(v) for v in fig.bbox.size)
    too_small = f"a chart of {width}x{height} px is too small for its labels; use a larger width and height"
    with warnings.catch_warnings():  # constrained layout gives up with a warning when the labels fill the figure
        warnings.filterwarnings("error", "constrained_layout not applied", UserWarning)
        try:
            fig.canvas.draw()
        except UserWarning:
            raise ValueError(too_small) from None
    if any(min(ax.bbox.width, ax.bbox.height) < least for ax in fig.axes):
        raise ValueError(too_small)
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _header(fig: Figure, ax, title: str) -> None:
    """``title`` at the top left and the legend of ``ax`` under it, right-aligned above the plot, in as many
    columns as fit the figure's width."""
    fig.suptitle(title, x=0.01, ha="left", fontsize=CHART_STYLE["font.size"])
    handles, labels = ax.get_legend_handles_labels()
    renderer = fig.canvas.get_renderer()
    for ncols in range(len(labels), 0, -1):
        legend = ax.legend(handles, labels, ncols=ncols, loc="lower right", bbox_to_anchor=(1, 1), borderaxespad=0.2,
                           columnspacing=1.2, handlelength=1.6)
        if legend.get_window_extent(renderer).width <= 0.95 * fig.bbox.width:
            break


def _colour_bar(width: int, height: int = 40) -> np.ndarray:
    """A white strip with a horizontal viridis colour bar, ticks 0, 0.5, 1 and the label "alpha" (for
    ``alpha_heatmaps``)."""
    with _chart(width, height, layout=None) as fig:
        ax = fig.add_axes((0.25, 1 - 14 / height, 0.5, 10 / height))  # a 10 px bar 4 px below the top
        bar = fig.colorbar(ScalarMappable(cmap="viridis"), cax=ax, orientation="horizontal",
                           ticks=[0.0, 0.5, 1.0])
        bar.ax.tick_params(length=3, pad=1)
        bar.ax.xaxis.set_major_formatter("{x:g}")
        ax.text(-0.02, 0.5, "alpha", transform=ax.transAxes, ha="right", va="center")
        return _pixels(fig)


def alive_count_figure(count, truth=None, width: int = 480, height: int = 200,
                       title: str = "object slots alive per frame") -> np.ndarray:
    """A step chart of the number of alive slots per frame (blue) and, when given, the true number of
    objects (orange, dashed), with integer ticks and a legend; (height, width, 3) uint8."""
    count = _np(count).astype(np.float64).reshape(-1)
    series = [(count, COUNT_RGB, "alive slots", "-")]
    if truth is not None:
        truth = _np(truth).astype(np.float64).reshape(-1)
        if truth.shape != count.shape:
            raise ValueError(f"truth {truth.shape} must have the shape of count {count.shape}")
        series.insert(0, (truth, TRUTH_RGB, "true objects", "--"))  # drawn first, the count on top
    t = len(count)
    if t == 0:
        raise ValueError("count is empty")
    y_max = int(np.ceil(max(float(np.nanmax(s[0])) for s in series))) + 1
    edges = np.arange(t + 1) - 0.5  # frame i spans [i - 0.5, i + 0.5)
    with _chart(width, height) as fig:
        ax = fig.add_subplot()
        for values, rgb, label, style in series:
            ax.stairs(values, edges, baseline=None, color=_rgb(rgb), linestyle=style,
                      linewidth=3 if style == "--" else 2, label=label)
        ax.set(xlim=(edges[0], edges[-1]), ylim=(0, y_max), xlabel="frame")
        ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(6, integer=True))
        ax.grid(axis="y", color=_rgb(GRID_RGB))
        ax.set_axisbelow(True)
        _header(fig, ax, title)
        return _pixels(fig, least=20)
