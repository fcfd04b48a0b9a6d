"""Figures of the SlotSSM benchmarks from their JSON lines (``hclsm bench ... --out FILE``).

``line_chart`` is a small matplotlib line plot (optionally log-2 x axis); ``slotssm_figures`` writes the
latency curve, the Blinking Color Balls error per length and the video-prediction rollout error per
step, for whichever of the benchmark records it is given.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from matplotlib.ticker import NullLocator

from hclsm.viz import _chart, _pixels, _rgb, save_png

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (127, 127, 127)]


def line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
               log_x: bool = False, width: int = 560, height: int = 320) -> np.ndarray:
    """(H, W, 3) uint8 chart of ``series`` {label: (xs, ys)} with dots on the points, the legend on the right
    and the y axis from 0; points with a None y are skipped. The x ticks are the points' x values (thinned
    to about 8)."""
    xticks = sorted({x for xs, ys in series.values() for x, y in zip(xs, ys) if y is not None})
    with _chart(width, height) as fig:
        ax = fig.add_subplot()
        for i, (label, (xs, ys)) in enumerate(series.items()):
            kept = [n for n, y in enumerate(ys) if y is not None]
            ax.plot([xs[n] for n in kept], [ys[n] for n in kept], color=_rgb(PALETTE[i % len(PALETTE)]), linewidth=2,
                    marker="o", markersize=5, label=label)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xticks[::max(1, len(xticks) // 8)] if len(xticks) > 8 else xticks)
        ax.xaxis.set_major_formatter("{x:g}")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_ylim(0, None)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        return _pixels(fig)


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
