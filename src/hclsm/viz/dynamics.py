"""Pictures of the dynamics, as uint8 RGB arrays in the style of ``hclsm.viz``: a rollout against the true
frames with its error and a causal graph on a frame (numpy and PIL), a timeline of the event detector against
true contact events and the PCA projection of slot trajectories with the predicted part dashed (matplotlib)."""
from __future__ import annotations

import itertools
import math

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.markers import TICKUP
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw

from hclsm.viz import (
    COUNT_RGB,
    GRID_RGB,
    PALETTE,
    TRUTH_RGB,
    _as_frames,
    _chart,
    _font,
    _header,
    _np,
    _pixels,
    _rgb,
    _slot_labels,
    _text,
    colormap,
    labelled_grid,
)

FIRED_RGB, FIRED_BAND = (214, 39, 40), (250, 222, 222)  # steps where the event gate fired: dot, column shading
THRESHOLD_RGB = (110, 110, 110)
PREDICTED_RGB = (150, 150, 150)  # the legend key of the predicted (dashed) part of the slot trajectories
MIN_TILE = 40  # rollout tiles are scaled up to at least this many pixels, so the column labels fit


# ---- rollout ----------------------------------------------------------------------------------------

def rollout_figure(truth, pred, context=None, scale: int | None = None) -> np.ndarray:
    """A rollout against the true frames: rows truth, prediction and |error|, one column per predicted step.

    Args:
        truth: (H, 3, R, R) float in [0, 1] (or (H, R, R, 3) uint8), the true frames t+1 .. t+H.
        pred: the predicted frames, same shape (values outside [0, 1] are clipped).
        context: (C, 3, R, R) the context frames t-C+1 .. t, shown at the start of the truth row; or None.
        scale: pixel repeat (default: enough for tiles of ``MIN_TILE`` pixels).

    The error row is the per-pixel mean absolute error over the channels on the viridis map (dark = 0,
    yellow = 1). Columns are labelled t-C+1 .. t (context) and t+1 .. t+H.
    """
    t_frames, p_frames = _as_frames(truth), _as_frames(pred)
    if t_frames.shape != p_frames.shape:
        raise ValueError(f"truth {t_frames.shape} and pred {p_frames.shape} must have the same shape (H, R, R, 3)")
    h = t_frames.shape[0]
    err = colormap(np.abs(t_frames.astype(np.float32) - p_frames.astype(np.float32)).mean(-1) / 255.0)
    labels = [f"t+{i + 1}" for i in range(h)]
    rows = [t_frames, p_frames, err]
    if context is not None:
        c_frames = _as_frames(context)
        if c_frames.shape[1:] != t_frames.shape[1:]:
            raise ValueError(f"context frames {c_frames.shape[1:]} must match the truth frames {t_frames.shape[1:]}")
        c = c_frames.shape[0]
        blank = np.full_like(c_frames, 255)
        rows = [np.concatenate([c_frames, t_frames]), np.concatenate([blank, p_frames]), np.concatenate([blank, err])]
        labels = [f"t-{c - 1 - i}" if i < c - 1 else "t" for i in range(c)] + labels
    return _columns_labelled(rows, ["truth", "prediction", "|error|"], labels, scale)


def _columns_labelled(rows: list[np.ndarray], row_labels: list[str], column_labels: list[str],
                      scale: int | None = None) -> np.ndarray:
    """``labelled_grid`` of frame rows (each (N, R, R, 3) uint8) with a header naming every column."""
    r, gap = rows[0].shape[1], 2
    scale = scale or max(2, -(-MIN_TILE // r))
    grid = labelled_grid(rows, row_labels, scale=scale, gap=gap)
    margin = grid.shape[1] - (len(column_labels) * (r + gap) - gap) * scale  # labelled_grid's label margin
    header = 18
    canvas = Image.new("RGB", (grid.shape[1], grid.shape[0] + header), "white")
    canvas.paste(Image.fromarray(grid), (0, header))
    draw, font = ImageDraw.Draw(canvas), _font()
    for i, label in enumerate(column_labels):
        _text(draw, (margin + (i * (r + gap) + r / 2) * scale, header / 2), label, font, "mm")
    return np.asarray(canvas)


def counterfactual_figure(context, factual, plain, intervened, twin, what: str = "intervention") -> np.ndarray:
    """A "what if" beside what happened: rows factual truth, factual prediction, counterfactual prediction and
    the re-simulated truth, one column per frame.

    Args:
        context: (C, 3, R, R) float in [0, 1], the frames t-C+1 .. t the model read (first row only).
        factual: (H, 3, R, R) the true frames t+1 .. t+H; plain: the rollout from the context.
        intervened: the rollout with ``what`` applied at t; twin: the re-simulated frames t+1 .. t+H.
    """
    c_frames, frames = _as_frames(context), [_as_frames(x) for x in (factual, plain, intervened, twin)]
    if any(f.shape != frames[0].shape for f in frames) or c_frames.shape[1:] != frames[0].shape[1:]:
        raise ValueError(f"frames must share one shape, got context {c_frames.shape} and "
                         f"{[f.shape for f in frames]}")
    c, h = c_frames.shape[0], frames[0].shape[0]
    blank = np.full_like(c_frames, 255)
    rows = [np.concatenate([c_frames, frames[0]])] + [np.concatenate([blank, f]) for f in frames[1:]]
    labels = [f"t-{c - 1 - i}" if i < c - 1 else "t" for i in range(c)] + [f"t+{i + 1}" for i in range(h)]
    return _columns_labelled(rows, ["truth", "prediction", f"{what}: prediction", f"{what}: re-simulated"],
                             labels)


# ---- events -----------------------------------------------------------------------------------------

def event_timeline(prob, gate, threshold: float, truth_events=None, width: int = 480, height: int = 200,
                   title: str = "event probability per step") -> np.ndarray:
    """The event detector over one clip, (height, width, 3) uint8.

    ``prob`` (T,) the event probability (blue curve), ``threshold`` the detector's threshold (grey dashed
    line), ``gate`` (T,) where it fired (> 0.5: shaded column and red dot), ``truth_events`` (T,) bool the
    true contact events (orange ticks on the step axis), when given.
    """
    prob = _np(prob).astype(np.float64).reshape(-1)
    fired = _np(gate).reshape(-1) > 0.5
    t = len(prob)
    if t == 0 or fired.shape != prob.shape:
        raise ValueError(f"prob {prob.shape} and gate {fired.shape} must be the same non-empty (T,)")
    truth = None if truth_events is None else _np(truth_events).astype(bool).reshape(-1)
    if truth is not None and truth.shape != prob.shape:
        raise ValueError(f"truth_events {truth.shape} must have the shape of prob {prob.shape}")
    steps, p = np.arange(t), np.clip(prob, 0.0, 1.0)
    with _chart(width, height) as fig:
        ax = fig.add_subplot()
        for i in np.flatnonzero(fired):
            ax.axvspan(i - 0.5, i + 0.5, color=_rgb(FIRED_BAND), linewidth=0, zorder=0)
        ax.plot(steps, p, color=_rgb(COUNT_RGB), linewidth=2, marker="o", markersize=3, label="probability")
        ax.axhline(float(np.clip(threshold, 0.0, 1.0)), color=_rgb(THRESHOLD_RGB), linewidth=1, linestyle="--",
                   label="threshold")
        ax.plot(steps[fired], p[fired], color=_rgb(FIRED_RGB), linestyle="none", marker="o", markersize=6,
                label="fired")
        if truth is not None:  # ticks standing on the step axis
            ax.plot(steps[truth], np.zeros(int(truth.sum())), color=_rgb(TRUTH_RGB), linestyle="none", marker=TICKUP,
                    markersize=9, markeredgewidth=3, transform=ax.get_xaxis_transform(), clip_on=False,
                    label="true event")
        ax.set(xlim=(-0.5, t - 0.5), ylim=(-0.04, 1.04), yticks=[0.0, 0.5, 1.0], xlabel="step")
        ax.xaxis.set_major_locator(MaxNLocator(10, integer=True))
        ax.yaxis.set_major_formatter("{x:g}")
        ax.grid(axis="y", color=_rgb(GRID_RGB))
        ax.set_axisbelow(True)
        _header(fig, ax, title)
        return _pixels(fig, least=20)


# ---- slot trajectories ----------------------------------------------------------------------------------

def _pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, the top two principal directions (2, d) (zero rows where there are fewer) and their variance shares."""
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    n = min(2, len(vt))
    basis, share = np.zeros((2, x.shape[1])), np.zeros(2)
    basis[:n] = vt[:n]
    var = s ** 2
    if var.sum() > 0:
        share[:n] = var[:n] / var.sum()
    return mean, basis, share


def slot_pca_figure(slots, alive, predicted=None, background: bool = True, width: int = 480, height: int = 400,
                    title: str = "PCA projection of slot trajectories") -> np.ndarray:
    """Slot trajectories projected to their first two principal components, (height, width, 3) uint8.

    Args:
        slots: (T, K, d) slot vectors per frame (e.g. the object decomposition of a whole clip).
        alive: (T, K) bool; the PCA is fitted on the alive slot vectors, and only those are drawn.
        predicted: (H, K, d) with H < T, a rollout of the last H frames of ``slots``: drawn dashed and
            lighter from each slot's point H + 1 frames before the end (the last context frame), for the
            slots alive there; None: no prediction.
        background: slot 0 is the background slot (labelled ``bg`` and drawn black).

    One polyline per slot in ``hclsm.viz.PALETTE`` colours (the colour of its id in the segmentation
    figures), solid through its alive frames, with a ring on its first point.
    """
    x, a = _np(slots).astype(np.float64), _np(alive).astype(bool)
    if x.ndim != 3 or a.shape != x.shape[:2]:
        raise ValueError(f"slots must be (T, K, d) and alive (T, K), got {x.shape} and {a.shape}")
    if not a.any():
        raise ValueError("no alive slot to project")
    t, k, d = x.shape
    p = None if predicted is None else _np(predicted).astype(np.float64)
    if p is not None and (p.ndim != 3 or p.shape[1:] != (k, d) or not 0 < p.shape[0] < t):
        raise ValueError(f"predicted must be (H, K={k}, d={d}) with 0 < H < T={t}, got {p.shape}")
    mean, basis, share = _pca2(x[a])
    xy = (x - mean) @ basis.T  # (T, K, 2)
    start = None if p is None else t - len(p) - 1  # the frame the prediction continues from
    colours = [_rgb(PALETTE[(j + (not background)) % len(PALETTE)]) for j in range(k)]
    with _chart(width, height) as fig:
        ax = fig.add_subplot()
        for j, (rgb, label) in enumerate(zip(colours, _slot_labels(k, background))):
            steps = np.flatnonzero(a[:, j])
            if not len(steps):
                continue
            if p is not None and a[start, j]:
                path = np.concatenate([xy[start, j][None], (p[:, j] - mean) @ basis.T])
                ax.plot(*path.T, color=rgb, alpha=0.5, linewidth=2, linestyle="--")
            path = np.where(a[:, j, None], xy[:, j], np.nan)  # gaps where the slot is dead
            ax.plot(*path.T, color=rgb, linewidth=2, marker="o", markersize=3, label=label)
            ax.plot(*xy[steps[0], j], color=rgb, marker="o", markersize=9, markerfacecolor="none", markeredgewidth=2)
        if p is not None:
            ax.add_line(Line2D([], [], color=_rgb(PREDICTED_RGB), linewidth=2, linestyle="--", label="predicted"))
        ax.margins(0.05)
        ax.set(xticks=[], yticks=[], xlabel=f"PC1 ({share[0]:.0%} of variance)", ylabel=f"PC2 ({share[1]:.0%})")
        _header(fig, ax, title)
        return _pixels(fig, least=40)


EDGE_RGB, MISSED_RGB = (230, 0, 170), (120, 120, 120)  # learned edges; true edges the graph missed (dashed)


def _dashed(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], rgb, width: int = 2,
            dash: float = 6.0, gap: float = 4.0) -> None:
    """A dashed straight line from ``a`` to ``b``."""
    length = math.dist(a, b)
    if length == 0:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    s = 0.0
    while s < length:
        e = min(s + dash, length)
        draw.line([(a[0] + ux * s, a[1] + uy * s), (a[0] + ux * e, a[1] + uy * e)], fill=rgb, width=width)
        s = e + gap


def _arrow(draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], rgb, width: int,
           shorten: float, dashed: bool = False) -> None:
    """An arrow from ``a`` to ``b``, both ends pulled in by ``shorten`` pixels (to stop at the node circles)."""
    length = math.dist(a, b)
    if length <= 2 * shorten:
        return
    ux, uy = (b[0] - a[0]) / length, (b[1] - a[1]) / length
    p, q = (a[0] + ux * shorten, a[1] + uy * shorten), (b[0] - ux * shorten, b[1] - uy * shorten)
    if dashed:
        _dashed(draw, p, q, rgb, width=width)
    else:
        draw.line([p, q], fill=rgb, width=width)
    head, side = 3.0 * width + 4, 1.6 * width + 3
    draw.polygon([q, (q[0] - ux * head - uy * side, q[1] - uy * head + ux * side),
                  (q[0] - ux * head + uy * side, q[1] - uy * head - ux * side)], fill=rgb)


def causal_graph_figure(frame, positions, alive, prob, true=None, background: bool = True, scale: int = 4,
                        title: str = "") -> np.ndarray:
    """The learned causal graph drawn on a frame: one node per alive object slot at its position, an arrow
    sender -> receiver for every edge with probability > 0.5 (width by probability), and, when ``true`` is
    given (an object-level graph already in slot order, [sender, receiver]), the true edges the graph missed
    dashed grey.

    frame (3, H, W) in [0, 1]; positions (K, 2) in [-1, 1] (x, y); alive (K,) bool; prob (K, K)
    [receiver, sender] edge probabilities; slot 0 is the background when ``background`` (not drawn)."""
    img = _as_frames(np.asarray(_np(frame))[None])[0]
    h, w = img.shape[:2]
    pos, alive, prob = _np(positions), _np(alive).astype(bool), _np(prob)
    font = _font(12)
    top = 20 if title else 0
    canvas = Image.new("RGB", (w * scale, h * scale + top), (255, 255, 255))
    canvas.paste(Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST), (0, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        _text(draw, (4, 3), title, font)
    first = 1 if background else 0
    xy = {k: ((pos[k, 0] + 1) / 2 * w * scale, (pos[k, 1] + 1) / 2 * h * scale + top)
          for k in range(first, len(pos)) if alive[k]}
    radius = 7.0
    for (i, a), (j, b) in itertools.permutations(xy.items(), 2):  # i sends to j
        if prob[j, i] > 0.5:
            _arrow(draw, a, b, EDGE_RGB, width=max(1, round(1 + 3 * (prob[j, i] - 0.5) * 2)), shorten=radius)
        elif true is not None and _np(true)[i, j]:
            _arrow(draw, a, b, MISSED_RGB, width=2, shorten=radius, dashed=True)
    labels = _slot_labels(len(pos), background)
    for k, (x, y) in xy.items():
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 255, 255),
                     outline=tuple(int(c) for c in PALETTE[k % len(PALETTE)]),
                     width=3)
        _text(draw, (x, y), labels[k].removeprefix("slot "), _font(10), anchor="mm")
    return np.asarray(canvas)
