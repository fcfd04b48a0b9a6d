"""``hclsm demo``: the main job, end to end on CPU.

Today it runs the data stage for real (PushT episodes from gym-pusht, LeRobot v3 on disk, clips
read back with ground-truth masks) and writes ``runs/<name>/report.md`` with pictures and figures.
The HCLSM model stages (training, rollouts, causal graph) are added to this report as they land; the
report says plainly which stages ran.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from hclsm import keys
from hclsm.config import Config, save_config
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.pusht import generate_pusht_dataset
from hclsm.errors import HclsmError
from hclsm.utils.atomic import atomic_output_dir
from hclsm.viz import frame_strip, overlay, save_png, to_uint8_frames


def check_run_name(name: str) -> None:
    """A run name is one plain directory name (it is replaced on every run, so never a path)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise HclsmError(f"--name {name!r} is not a plain directory name; use e.g. --name demo "
                         f"(the run directory OUT/NAME is replaced on every run)")


def run_demo(cfg: Config, name: str = "demo", out_root: str | Path = "runs", progress: bool = True) -> Path:
    """Run the demo into ``out_root/name`` (replaced if it exists); returns the report path."""
    check_run_name(name)  # before anything is generated or replaced
    t0 = time.perf_counter()
    with atomic_output_dir(Path(out_root) / name, overwrite=True) as run:
        data_dir = run / "data" / "pusht"
        summary = generate_pusht_dataset(data_dir, cfg.data.pusht, progress=progress)
        source = LeRobotSource(data_dir)
        rows = []
        for ep in range(min(3, len(source))):
            n = source.episode_lengths[ep]
            clip = source.load_clip(ep, np.linspace(0, n - 1, 8).round().astype(int))
            frames = to_uint8_frames(clip[keys.VIDEO])
            rows += [frames, overlay(frames, clip[keys.MASK].numpy())]
        save_png(frame_strip(rows), run / "pusht_frames_and_masks.png")
        save_config(cfg, run / "config.yaml")
        (run / "data_summary.json").write_text(json.dumps(summary, indent=2))
        report = run / "report.md"
        report.write_text(_report(cfg, summary, time.perf_counter() - t0))
    return Path(out_root) / name / "report.md"


def _report(cfg: Config, s: dict, seconds: float) -> str:
    d = cfg.data.pusht
    return f"""# hclsm demo report

Stages run: **data** (PushT from the gym-pusht simulator). Not yet available in this version: model
training (HCLSM stage 1 and 2), rollouts, event timeline, causal graph; they are added here as they land.

## Data: PushT from the real simulator

{s['episodes']} episodes, {s['frames']} frames at {d.image_size}x{d.image_size}, fps 10, scripted pusher with
action noise {d.action_noise} px (seed {d.seed}); written as a LeRobot v3 dataset in `data/pusht/` in
{s['seconds']:.1f} s.

| figure | value |
|---|---|
| episodes with agent-block contact | {s['contact_fraction']:.0%} |
| episodes where the block moved > 20 px | {s['moved_fraction']:.0%} |
| both | {s['contact_and_moved_fraction']:.0%} |
| mean max block displacement | {s['mean_displacement_px']:.0f} px (of the 512 px simulator canvas) |

Frames of three episodes (odd rows) and the ground-truth object masks rendered from the simulator
state (even rows; blue agent, red block, green goal region):

![frames and masks](pusht_frames_and_masks.png)

Total time: {seconds:.1f} s. Config: `config.yaml`.
"""

