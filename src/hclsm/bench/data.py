"""``hclsm bench data``: generation and loading throughput of the data pipelines.

Generates PushT episodes in the real simulator and physics scenes (with counterfactual twins) into a
temporary directory, times them, and times clip loading through ``ClipDataset`` (video decode +
ground truth). Reports the PushT contact / block-moved fractions the issue asks to watch.
"""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

from hclsm.bench import BenchResult, register
from hclsm.config.data import ClipConfig, PhysicsDataConfig, PushTDataConfig
from hclsm.data.clips import ClipDataset
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.physics import PhysicsSource, generate_physics_dataset
from hclsm.data.pusht import generate_pusht_dataset


def _clip_rate(dataset: ClipDataset, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(min(n, len(dataset))):
        dataset[i]
    return min(n, len(dataset)) / (time.perf_counter() - t0)


@register("data")
def bench_data(quick: bool, seed: int) -> BenchResult:
    pusht = PushTDataConfig(episodes=4 if quick else 20, max_steps=50 if quick else 100, seed=seed)
    physics = PhysicsDataConfig(episodes=20 if quick else 200, seed=seed)
    clip = ClipConfig(length=8, seed=seed)
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-data-") as tmp:
        p = generate_pusht_dataset(Path(tmp) / "pusht", pusht, progress=False)
        q = generate_physics_dataset(Path(tmp) / "physics", physics, progress=False)
        pusht_clips = _clip_rate(ClipDataset(LeRobotSource(Path(tmp) / "pusht"), clip, shuffle=True), 50)
        physics_clips = _clip_rate(ClipDataset(PhysicsSource(Path(tmp) / "physics"), clip, shuffle=True), 200)
    metrics = {
        "pusht_episodes_per_s": p["episodes"] / p["seconds"],
        "pusht_frames_per_s": p["frames"] / p["seconds"],
        "pusht_seconds": p["seconds"],
        "pusht_contact_fraction": p["contact_fraction"],
        "pusht_moved_fraction": p["moved_fraction"],
        "pusht_contact_and_moved_fraction": p["contact_and_moved_fraction"],
        "physics_episodes_per_s": q["episodes"] / q["seconds"],
        "physics_frames_per_s": q["episodes"] * physics.frames / q["seconds"],
        "physics_seconds": q["seconds"],
        "pusht_clips_per_s": pusht_clips,
        "physics_clips_per_s": physics_clips,
    }
    rows = [
        {"dataset": "pusht (gym-pusht)", "episodes": p["episodes"], "frames": p["frames"],
         "gen s": p["seconds"], "episodes/s": metrics["pusht_episodes_per_s"],
         "frames/s": metrics["pusht_frames_per_s"], "clips/s (T=8)": pusht_clips,
         "contact&moved": p["contact_and_moved_fraction"]},
        {"dataset": "physics (+twins)", "episodes": q["episodes"], "frames": q["episodes"] * physics.frames,
         "gen s": q["seconds"], "episodes/s": metrics["physics_episodes_per_s"],
         "frames/s": metrics["physics_frames_per_s"], "clips/s (T=8)": physics_clips},
    ]
    config = {"pusht_episodes": pusht.episodes, "pusht_max_steps": pusht.max_steps, "physics_episodes": physics.episodes,
              "physics_frames": physics.frames, "clip_length": clip.length, "machine": platform.machine(),
              "cpus": os.cpu_count()}
    return BenchResult(metrics=metrics, config=config, rows=rows, title="data generation and loading throughput")
