"""``hclsm bench throughput``: how fast the models train and plan on this machine, and where the time goes.

* **HCLSM at the demo's settings** (the tiny preset, batch 16, 64 px; stage 1 on 4-frame clips, stage 2 on
  8-frame clips): milliseconds per training step (forward, backward, clipping, AdamW, EMA) **now** and **before**,
  side by side in one process (the two alternate, so a change in the machine's load hits both). "Before" is the
  layout the tiny preset had until these optimisations, kept behind options: ``BEFORE`` (a CNN stem of stride-2
  5x5 convolutions to a 32x32 token grid, a transposed-convolution decoder, every predicted frame decoded). The
  code-level changes (the EMA target without the evaluation-time rules, the rollout's context run as one
  sequence, the cheaper SSM step) speed up both rows, so the ratio understates the gain over the older code.
  A third row, ``FAST``, is the encoder's fast layout (a 16 x 16 token grid) that PushT's recipe uses; the tiny
  preset keeps the 32 x 32 grid because the fast one loses held-out FG-ARI on the ball scenes.
  Then each part's share of a step now (``hclsm.utils.profiling``: encoder, slot attention, decoder, each loss
  term, optimizer).
* **Length**: a stage-2 step at T = 16 and T = 256 frames (batch 2): the growth for 16x the frames.
* **The other models**: SlotSSM, OC-SlotSSM and the flat SSM (``hclsm train --model NAME``, the same batch and
  clips as stage 2) and C-JEPA's masked slot predictor (its own training loop, its default batch): ms per step and
  the share of each of their top-level modules.
* **Planning**: one re-plan at the stable-worldmodel protocol's scale (CEM, 300 candidates x 30 iterations,
  horizon 5) with the tiny HCLSM on a 3-frame context, and what it costs per environment step when the plan is
  remade every 5 steps.

Timings are medians over repeated steps after a warm-up step. Run it on a quiet machine (nothing else busy).
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence

import torch

from hclsm.bench import BenchResult, register
from hclsm.config import load_config
from hclsm.config.cjepa import CJEPAConfig
from hclsm.data.slots import SlotSequences
from hclsm.models import build_model
from hclsm.planning.cost import SlotSet, WorldModelCost
from hclsm.planning.planners import PlannerConfig, make_planner
from hclsm.train import build_optimizer, train_step
from hclsm.train.cjepa import train_cjepa
from hclsm.utils.profiling import profile_parts, shares

# the tiny preset's layout before the throughput work, as config overrides
BEFORE = ("model.perception.patch_size=2", "model.perception.stem=conv", "model.decoder.upsample=transposed",
          "model.dynamics.decoded_frames=0")
# the encoder's fast layout (one stride-4 conv, a 16 x 16 token grid): PushT's recipe uses it; on the ball scenes it
# costs held-out FG-ARI (0.84 against 0.94 after 4000 steps), so the tiny preset keeps the 32 x 32 grid
FAST = ("model.perception.stem=patch", "model.perception.patch_size=4")
DEMO = {"batch": 16, "size": 64, "clips": {1: 4, 2: 8}}  # the demo's training settings
REPLAN = PlannerConfig(horizon=5, samples=300, iterations=30, elites=30)  # stable-worldmodel's CEM on PushT
REPLAN_EVERY = 5  # env steps per plan (receding horizon 5)


def _machine() -> dict:
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__}


def _batch(batch: int, frames: int, size: int, d_action: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.rand(batch, frames, 3, size, size, generator=g),
            "action": torch.rand(batch, frames, max(d_action, 1), generator=g)[..., :d_action]}


def train_step_fn(overrides: Sequence[str], stage: int, frames: int, batch: int, size: int, seed: int
                  ) -> tuple[torch.nn.Module, Callable[[], object]]:
    """A model of the tiny preset with ``overrides`` and a function running one training step of it."""
    cfg = load_config("tiny", overrides=[f"model.perception.image_size={size}", f"train.seed={seed}",
                                         f"model.perception.max_frames={max(frames, 32)}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model, cfg.train)
    data = _batch(batch, frames, size, cfg.model.d_action, seed)
    return model, lambda: train_step(model, optimizer, data, cfg=cfg.train, stage=stage, progress=0.8)


def interleaved(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions called in turn ``repeats`` times (after one warm-up
    call each), so that a drift in the machine's speed reaches all of them alike."""
    for f in steps.values():
        f()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, f in steps.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _parts_row(name: str, parts: dict[str, float]) -> dict:
    return {"model": name, **{k: f"{v:.0%}" for k, v in shares(parts).items() if v >= 0.005}}


def _hclsm(quick: bool, seed: int, rows: list, parts_rows: list) -> dict:
    batch, size, repeats = (4, 32, 2) if quick else (DEMO["batch"], DEMO["size"], 5)
    metrics = {}
    for stage, frames in DEMO["clips"].items():
        (now_model, now), (_, before), (_, fast) = (train_step_fn(o, stage, frames, batch, size, seed)
                                                    for o in ((), BEFORE, FAST))
        sec = interleaved({"now": now, "before": before, "fast": fast}, repeats)
        ratio, fast_ratio = sec["before"] / sec["now"], sec["before"] / sec["fast"]
        metrics |= {f"stage{stage}_ms": 1000 * sec["now"], f"stage{stage}_before_ms": 1000 * sec["before"],
                    f"stage{stage}_speedup": ratio, f"stage{stage}_fast_ms": 1000 * sec["fast"],
                    f"stage{stage}_fast_speedup": fast_ratio}
        rows.append({"what": f"HCLSM stage {stage} step", "frames": frames, "batch": batch, "image_size": size,
                     "ms_now": 1000 * sec["now"], "ms_before": 1000 * sec["before"], "speedup": ratio})
        rows.append({"what": f"HCLSM stage {stage} step, fast encoder layout (PushT recipe)", "frames": frames,
                     "batch": batch, "image_size": size, "ms_now": 1000 * sec["fast"], "ms_before": 1000 * sec["before"],
                     "speedup": fast_ratio})
        parts = profile_parts(now_model, now)
        parts_rows.append(_parts_row(f"HCLSM stage {stage}", parts))
        metrics |= {f"stage{stage}_share_{k.replace('/', '_')}": v for k, v in shares(parts).items()}
    lengths = (4, 16) if quick else (16, 256)
    sec = {t: interleaved({"s": train_step_fn((), 2, t, 2, size, seed)[1]}, 1 if quick else 3)["s"] for t in lengths}
    short, long = lengths
    metrics |= {f"s_per_step_t{short}": sec[short], f"s_per_step_t{long}": sec[long], "growth": sec[long] / sec[short],
                "length_ratio": long / short}
    rows.append({"what": f"HCLSM stage 2 step, T = {short} -> {long}", "batch": 2, "image_size": size,
                 "ms_now": 1000 * sec[long], "growth": sec[long] / sec[short]})
    return metrics


def _slot_models(quick: bool, seed: int, rows: list, parts_rows: list) -> dict:
    batch, size, repeats, frames = (4, 32, 2, 4) if quick else (DEMO["batch"], DEMO["size"], 3, DEMO["clips"][2])
    metrics = {}
    for name in ("slotssm", "oc_slotssm", "flat_ssm"):
        model, step = train_step_fn((f"model.name={name}",), 2, frames, batch, size, seed)
        sec = interleaved({name: step}, repeats)[name]
        metrics[f"{name}_ms"] = 1000 * sec
        rows.append({"what": f"{name} step", "frames": frames, "batch": batch, "image_size": size, "ms_now": 1000 * sec})
        parts_rows.append(_parts_row(name, profile_parts(getattr(model, "net", model), step)))
    # C-JEPA's predictor: its own loop over slot sequences of the tiny object model's width (8 slots x 64)
    cfg = CJEPAConfig(epochs=2 if quick else 4, batch_size=16 if quick else 64, warmup_steps=1, seed=seed)
    n = 2 * cfg.batch_size  # two steps per epoch
    g = torch.Generator().manual_seed(seed)
    seqs = SlotSequences(torch.randn(n, cfg.window, 8, 64, generator=g), torch.ones(n, cfg.window, 8, dtype=torch.bool))
    train_cjepa(seqs, CJEPAConfig(epochs=1, batch_size=cfg.batch_size, warmup_steps=1, seed=seed), progress=False)
    result = train_cjepa(seqs, cfg, progress=False)
    metrics["cjepa_ms"] = 1000 * result.seconds / result.steps
    rows.append({"what": "C-JEPA predictor step", "batch": cfg.batch_size, "frames": cfg.window,
                 "ms_now": metrics["cjepa_ms"]})
    return metrics


def _replan(quick: bool, seed: int, rows: list) -> dict:
    """Seconds of one CEM re-plan at the protocol's scale with the tiny HCLSM (a warm re-plan, as in an episode)."""
    torch.manual_seed(seed)
    model = build_model(load_config("tiny").model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        context = model.objects(torch.rand(1, 3, 3, 64, 64, generator=g))
        goal = model.objects(torch.rand(1, 1, 3, 64, 64, generator=g))
    cost = WorldModelCost(model, context, torch.zeros(2, 2), SlotSet(goal.slots[0, 0], goal.positions[0, 0],
                                                                     goal.alive[0, 0]), torch.zeros(2))
    cfg = PlannerConfig(horizon=5, samples=30, iterations=3, elites=3) if quick else REPLAN
    planner = make_planner("cem", cfg, -torch.ones(2), torch.ones(2), seed)
    planner.plan(cost, torch.zeros(cfg.horizon, 2))  # warm-up (and the plan the next one starts from)
    start = time.perf_counter()
    planner.plan(cost, torch.zeros(cfg.horizon, 2), executed=REPLAN_EVERY)
    seconds = time.perf_counter() - start
    live = int(cost.alive.sum())
    rows.append({"what": f"re-plan, CEM {cfg.samples} x {cfg.iterations}, horizon {cfg.horizon}",
                 "ms_now": 1000 * seconds, "ms_per_env_step": 1000 * seconds / REPLAN_EVERY, "slots_rolled_out": live})
    return {"replan_s": seconds, "plan_ms_per_env_step": 1000 * seconds / REPLAN_EVERY, "replan_samples": cfg.samples,
            "replan_iterations": cfg.iterations, "replan_horizon": cfg.horizon}


@register("throughput")
def bench_throughput(quick: bool, seed: int) -> BenchResult:
    rows: list[dict] = []
    parts_rows: list[dict] = []
    metrics = _hclsm(quick, seed, rows, parts_rows)
    metrics |= _slot_models(quick, seed, rows, parts_rows)
    metrics |= _replan(quick, seed, rows)
    title = ("throughput: ms per training step (forward + backward + AdamW) now and before (the preset's old "
             "layout, side by side), length growth, the other models, and a CEM re-plan at the protocol's scale; "
             "then each part's share of a step (profiled)")
    return BenchResult(metrics=metrics, config={"demo_settings": DEMO, "before": list(BEFORE), "fast": list(FAST),
                                                **_machine()},
                       rows=rows, title=title, tables=[("share of a step, by part (profiled)", parts_rows)])
