"""Figures of the SlotSSM benchmarks from their JSON lines (``hclsm bench ... --out FILE``).

``line_chart`` is a small PIL line plot (optionally log-2 x axis); ``slotssm_figures`` writes the
latency curve, the Blinking Color Balls error per length and the video-prediction rollout error per
step, for whichever of the benchmark records it is given.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hclsm.viz import _font, _text, save_png

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (127, 127, 127)]


def line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
               log_x: bool = False, width: int = 560, height: int = 320) -> np.ndarray:
    """(H, W, 3) uint8 chart of ``series`` {label: (xs, ys)}; points with a None y are skipped."""
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw, font = ImageDraw.Draw(img), _font(12)
    left, right, top, bottom = 64, width - 150, 40, height - 44
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None]
    fx = (lambda v: math.log2(v)) if log_x else (lambda v: float(v))
    x_lo, x_hi = min(fx(x) for x, _ in pts), max(fx(x) for x, _ in pts)
    y_lo, y_hi = 0.0, max(y for _, y in pts) * 1.08 or 1.0
    px = lambda x: left + (fx(x) - x_lo) / max(x_hi - x_lo, 1e-9) * (right - left)  # noqa: E731
    py = lambda y: bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top)  # noqa: E731
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    xticks = sorted({x for x, _ in pts})
    for x in xticks if len(xticks) <= 8 else xticks[::max(1, len(xticks) // 8)]:
        draw.line([px(x), bottom, px(x), bottom + 4], fill=(0, 0, 0))
        _text(draw, (px(x), bottom + 6), f"{x:g}", font, "ma")
    for i in range(5):
        y = y_lo + (y_hi - y_lo) * i / 4
        draw.line([left - 4, py(y), left, py(y)], fill=(0, 0, 0))
        _text(draw, (left - 6, py(y)), f"{y:.3g}", font, "rm")
    _text(draw, ((left + right) / 2 + 40, 6), title, font, "ma")
    _text(draw, ((left + right) / 2, height - 16), xlabel, font, "ma")
    _text(draw, (4, top - 30), ylabel, font, "la")
    for i, (label, (xs, ys)) in enumerate(series.items()):
        rgb = PALETTE[i % len(PALETTE)]
        line = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None]
        if len(line) > 1:
            draw.line(line, fill=rgb, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=rgb)
        ly = top + 8 + 18 * i
        draw.line([right + 10, ly, right + 30, ly], fill=rgb, width=3)
        _text(draw, (right + 36, ly), label, font, "lm")
    return np.asarray(img)


def slotssm_figures(records: dict[str, dict], out_dir: str | Path) -> list[Path]:
    """PNG figures of the benchmark records {bench name: JSON object} in ``out_dir``; returns their paths."""
    out_dir, paths = Path(out_dir), []
    if "slotssm-latency" in records:
        m = records["slotssm-latency"]["metrics"]
        lengths = records["slotssm-latency"]["config"]["lengths"]
        series = {name: (lengths, [m[f"{key}_ms_{n}"] for n in lengths])
                  for key, name in (("slotssm", "SlotSSM"), ("slot_transformer", "SlotTransformer"))}
        paths.append(save_png(line_chart(series, "inference latency per step (batch 6)", "sequence length (log scale)",
                                         "ms / step", log_x=True), out_dir / "slotssm_latency.png"))
    if "blinking" in records:
        m = records["blinking"]["metrics"]
        lengths = sorted({int(k.rsplit("_", 1)[1]) for k in m if k.startswith("white_baseline_")})
        series = {name: (lengths, [m.get(f"{key}_error_{n}") for n in lengths])
                  for key, name in (("slotssm", "SlotSSM"), ("single_ssm", "single-state SSM"),
                                    ("slot_transformer", "SlotTransformer"), ("slot_rnn", "SlotRNN"))}
        series["white balls"] = (lengths, [m[f"white_baseline_{n}"] for n in lengths])
        paths.append(save_png(line_chart(series, "Blinking Color Balls: error on the target's ball pixels",
                                         "sequence length (log scale)", "error", log_x=True),
                              out_dir / "slotssm_blinking.png"))
    if "video-prediction" in records:
        curves = records["video-prediction"]["metrics"]["per_step_mse"]
        names = {"slotssm": "SlotSSM", "single_ssm": "single-state SSM", "slot_transformer": "SlotTransformer",
                 "slot_rnn": "SlotRNN", "copy_last": "copy last frame"}
        series = {names.get(k, k): (list(range(1, len(c) + 1)), c) for k, c in curves.items()}
        paths.append(save_png(line_chart(series, "video prediction: rollout MSE per step (10 context frames)",
                                         "rollout step", "MSE per pixel"), out_dir / "slotssm_video_prediction.png"))
    return paths


def figures_from_files(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """``slotssm_figures`` of benchmark JSON files (the last line of each is the record)."""
    records = {}
    for p in paths:
        rec = json.loads(Path(p).read_text().strip().splitlines()[-1])
        records[rec["bench"]] = rec
    return slotssm_figures(records, out_dir)
