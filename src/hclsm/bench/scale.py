"""``hclsm bench ddp`` and ``hclsm bench resume``: scale-out and interruption, measured.

Both run ``hclsm train`` as separate processes, exactly as a user would, on a generated physics dataset
with the tiny HCLSM (stage 1), and compare the final checkpoints tensor by tensor.

* ``ddp``: ``torchrun --nproc_per_node 2`` (gloo, CPU) against one process with the same global batch
  for the same steps. The slot-query noise and the stochastic existence gates draw random numbers per
  rank, so they are switched off here: with them on the runs differ by design, not by error. The one
  process runs twice:

  - as the ranks compute (``train.accumulate=2``, one thread): the two ranks' halves of the global
    batch as two micro-batches whose gradients are averaged, which is what DDP's all-reduce does, with
    the same floating-point operations in the same order. Reported: the largest absolute weight and
    optimizer-state difference (target <= 1e-5; anything above 0 is a logic difference).
  - as a user would by default (one mean over the whole batch, every core). Reported: the same
    difference, which here also holds fp32 reduction order (a mean over 8 is not the mean of two
    means over 4) amplified by training, also after a single step (that order difference before
    training amplifies it); and the speed of 2 ranks against this run (on a 2-core machine the two
    ranks share the cores one process would use).
* ``resume``: the same run uninterrupted, and again killed with SIGKILL at a random step (chosen from
  the seed) and continued with ``hclsm train --resume``. Reported: whether the final weights and
  optimizer state are bit-identical, and that every checkpoint left on disk after the kill loads
  strictly (none is corrupt).
"""
from __future__ import annotations

import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from hclsm.bench import BenchResult, register
from hclsm.config import load_config
from hclsm.config.data import PhysicsDataConfig
from hclsm.data.physics import generate_physics_dataset
from hclsm.errors import HclsmError
from hclsm.models import build_model
from hclsm.train import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint

# the stochastic parts off (see the module docstring); everything else is the tiny preset's stage 1
_DETERMINISTIC = ("--model.slots.query_noise=0", "--model.slots.existence_start=1.0")


def free_port() -> int:
    """A TCP port no process is listening on now (for a torchrun rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hclsm(*args: str, torchrun: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun),
                "--master_port", str(free_port())] if torchrun else [sys.executable]
    return [*launcher, "-m", "hclsm", "train", "--quiet", "--stage", "1", *args]


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise HclsmError(f"{what} failed (exit {done.returncode}): {' | '.join(tail)}")


def _data(root: Path, quick: bool, seed: int) -> Path:
    cfg = PhysicsDataConfig(episodes=8 if quick else 24, frames=16, image_size=64, seed=seed, counterfactual=False)
    generate_physics_dataset(root, cfg, progress=False)
    return root


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise HclsmError(f"{run} has no checkpoint")
    out = {f"model.{k}": v for k, v in load_file(ckpt / "model.safetensors").items()}
    out |= {f"optimizer.{k}": v for k, v in load_file(ckpt / "optimizer.safetensors").items()}
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str = "model.") -> float:
    if set(a) != set(b):
        raise HclsmError("the two runs' checkpoints hold different tensors")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if k.startswith(prefix))


def _train_seconds(run: Path) -> tuple[float, int]:
    s = json.loads((run / "summary.json").read_text())
    return float(s["seconds"]), int(s["steps"])


@register("ddp")
def bench_ddp(quick: bool, seed: int) -> BenchResult:
    steps, batch = (6, 4) if quick else (20, 8)
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-ddp-") as tmp:
        data, runs = _data(Path(tmp) / "physics", quick, seed), Path(tmp)

        def train(name: str, n: int, *extra: str, torchrun: int = 0) -> dict[str, torch.Tensor]:
            _run(_hclsm("--data", str(data), "--steps", str(n), "--out", tmp, "--name", name,
                        f"--train.batch_size={batch}", f"--train.warmup_steps={n // 4}", f"--train.seed={seed}",
                        "--train.log_every=5", "--train.eval_every=0", "--train.val_fraction=0", *_DETERMINISTIC,
                        *extra, torchrun=torchrun), f"training run {name!r}")
            return _tensors(runs / name)

        two = train("two", steps, torchrun=2)
        same = train("one-as-ranks", steps, "--train.accumulate=2", "--train.threads=1")
        plain = train("one", steps)
        diff, diff_opt = _max_diff(same, two), _max_diff(same, two, "optimizer.")
        diff_plain = _max_diff(plain, two)
        diff_plain_1 = _max_diff(train("one-1", 1), train("two-1", 1, torchrun=2))
        (s1, n1), (s2, n2) = _train_seconds(runs / "one"), _train_seconds(runs / "two")
    metrics = {"max_abs_weight_diff": diff, "max_abs_optimizer_diff": diff_opt,
               "max_abs_weight_diff_one_mean": diff_plain, "max_abs_weight_diff_one_mean_step1": diff_plain_1,
               "steps": n1, "global_batch": batch, "steps_per_s_1": n1 / s1, "steps_per_s_2": n2 / s2,
               "speedup_2_vs_1": (n2 / s2) / (n1 / s1)}
    rows = [{"run": "1 process, as the ranks compute (accumulate=2, 1 thread)",
             f"max |w - w_ddp| after {n1} steps": f"{diff:.2e}", "optimizer state": f"{diff_opt:.2e}"},
            {"run": "1 process, one mean over the batch (default)", f"max |w - w_ddp| after {n1} steps":
             f"{diff_plain:.2e}", "after 1 step": f"{diff_plain_1:.2e}", "steps/s": round(n1 / s1, 2)},
            {"run": "torchrun, 2 ranks", "steps/s": round(n2 / s2, 2)}]
    config = {"backend": "gloo", "preset": "tiny", "stage": 1, "image_size": 64, "clip_length": 4,
              "stochastic_parts": "off (query noise, existence gates)", "machine": platform.machine(),
              "cpus": os.cpu_count()}
    title = (f"ddp: tiny HCLSM stage 1, {steps} steps, global batch {batch}: torchrun 2 ranks (gloo) vs 1 process "
             f"on {os.cpu_count()} CPUs")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


def _kill_at(cmd: list[str], run: Path, step: int, timeout: float = 600.0) -> int:
    """Start ``cmd`` and SIGKILL it once its log shows ``step``; returns the last logged step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log, last, t0 = run / "log.jsonl", 0, time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if log.exists():
                lines = [ln for ln in log.read_text().splitlines() if ln.endswith("}")]
                steps = [json.loads(ln).get("step", 0) for ln in lines]
                last = max(steps, default=0)
                if last >= step:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if last < step:
        raise HclsmError(f"the run to interrupt ended before step {step} (exit {proc.returncode})")
    return last


def _check_checkpoints(run: Path) -> tuple[int, int]:
    """(checkpoints on disk, corrupt ones): each must load strictly into a model of the run's config."""
    cfg = load_config(yaml_path=run / "config.yaml")
    bad, ckpts = 0, list_checkpoints(run)
    for ckpt in ckpts:
        try:
            load_checkpoint(ckpt, build_model(cfg.model), None)
        except CheckpointError:
            bad += 1
    return len(ckpts), bad


@register("resume")
def bench_resume(quick: bool, seed: int) -> BenchResult:
    steps = 20 if quick else 200
    kill_step = random.Random(seed).randrange(1, steps)
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-resume-") as tmp:
        data = _data(Path(tmp) / "physics", quick, seed)
        common = ["--data", str(data), "--steps", str(steps), "--out", tmp, "--train.batch_size=8",
                  f"--train.warmup_steps={steps // 10}",
                  f"--train.seed={seed}", "--train.log_every=1", "--train.eval_every=0", "--train.ckpt_every=5",
                  "--train.keep_last=3"]
        _run(_hclsm(*common, "--name", "whole"), "uninterrupted training")
        killed = Path(tmp) / "killed"
        last = _kill_at(_hclsm(*common, "--name", "killed"), killed, kill_step)
        on_disk, corrupt = _check_checkpoints(killed)
        resumed_from = latest_checkpoint(killed)
        _run([sys.executable, "-m", "hclsm", "train", "--quiet", "--resume", str(killed)], "resumed training")
        whole, again = _tensors(Path(tmp) / "whole"), _tensors(killed)
        identical = set(whole) == set(again) and all(torch.equal(whole[k], again[k]) for k in whole)
        diff = _max_diff(whole, again, prefix="")
        resumed_step = int(resumed_from.name.split("_")[1]) if resumed_from else 0
    metrics = {"bit_identical": float(identical), "max_abs_diff": diff, "steps": steps, "killed_after_step": last,
               "resumed_from_step": resumed_step, "checkpoints_after_kill": on_disk, "corrupt_checkpoints": corrupt}
    rows = [{"run": "uninterrupted", "steps": steps},
            {"run": f"SIGKILL after step {last}, --resume from step {resumed_step}", "steps": steps,
             "bit-identical (weights + optimizer)": identical, "corrupt checkpoints": f"{corrupt}/{on_disk}"}]
    config = {"preset": "tiny", "stage": 1, "image_size": 64, "batch_size": 8, "ckpt_every": 5,
              "machine": platform.machine(), "cpus": os.cpu_count()}
    title = f"resume: tiny HCLSM stage 1, {steps} steps, killed with SIGKILL at a random step and resumed"
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


@register("stability")
def bench_stability(quick: bool, seed: int) -> BenchResult:
    """Seeds x steps of the tiny HCLSM under bf16 autocast on the CPU: how many runs diverge (stop after
    ``MAX_CONSECUTIVE_SKIPS`` non-finite steps in a row), and how many steps the NaN/Inf guard skipped.

    Both stages run: stage 1 for the first ``train.stage1_fraction`` (40 %) of the steps, then stage 2
    (dynamics, JEPA prediction, events) on the same 4-frame clips."""
    from hclsm.train import TrainingDiverged, train

    seeds, steps = (2, 20) if quick else (10, 1000)
    rows, diverged, skips, finite = [], 0, 0, 0
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-stability-") as tmp:
        data = _data(Path(tmp) / "physics", quick, seed)
        for s in range(seed, seed + seeds):
            cfg = load_config("tiny", overrides=[f"train.steps={steps}", f"train.seed={s}", "train.precision=bf16",
                                                 "train.eval_every=0", "train.val_fraction=0",
                                                 f"train.warmup_steps={steps // 10}", "train.log_every=50",
                                                 "data.clip.length=4"])
            t0 = time.perf_counter()
            try:
                result = train(cfg, data, run_dir=Path(tmp) / f"seed{s}", progress=not quick)
                state, skipped = "ok", result.skipped
                ok = all(bool(torch.isfinite(p).all()) for p in result.model.parameters())
                loss = result.losses.get("loss", float("nan"))
            except TrainingDiverged:
                summary = json.loads((Path(tmp) / f"seed{s}" / "summary.json").read_text())
                state, skipped, ok, loss = "diverged", int(summary["skipped_steps"]), False, float("nan")
            diverged += state == "diverged"
            skips += skipped
            finite += ok
            rows.append({"seed": s, "steps": steps, "run": state, "guard skips": skipped,
                         "final loss": round(loss, 5), "finite weights": ok,
                         "minutes": round((time.perf_counter() - t0) / 60, 1)})
    metrics = {"runs": seeds, "diverged": diverged, "guard_skips": skips, "finite_weight_runs": finite,
               "steps_per_run": steps}
    config = {"preset": "tiny", "precision": "bf16 autocast", "stages": [1, 2], "stage1_fraction": 0.4, "batch_size": 16, "clip_length": 4,
              "image_size": 64, "machine": platform.machine(), "cpus": os.cpu_count()}
    title = f"stability: tiny HCLSM, both stages, bf16 autocast on CPU, {seeds} seeds x {steps} steps"
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
