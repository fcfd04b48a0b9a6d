"""``hclsm bench planning``: goal reaching in the real PushT simulator with the learned world model.

PushT episodes of the scripted pusher are generated (env seeds the shipped object layers never saw), and the tiny
HCLSM is trained on them as ``hclsm bench dynamics``' PushT row trains it (``hclsm.bench.dynamics.pusht_world_model``:
stage 1 continues the shipped PushT object layers on 4-frame clips, then stage 2 learns the dynamics on 8-frame
clips, counted in steps). Start states are drawn from the held-out episodes (the training loop's own split), goals made by
replaying the next 25 recorded actions (``hclsm.planning.env_loop``), 50 env steps per episode, re-planning every
5 steps. The table compares, on the same start states:

* ``cem`` / ``mppi``: the planners over the learned model (the PushT recipe, ``hclsm.config.PUSHT_RECIPE``; batched
  latent rollouts; cost: slot matching against the goal frame's slots plus the proprioception term);
* ``cem_slots_only``: CEM over the same model with the proprioception term off (the predicted slots alone);
* ``flat_cem``: CEM over a flat world model (the flat SSM: one latent per frame, no slots, DINO-WM-like) with as many
  parameters and training steps, cost: distance to the goal frame's latent plus the same proprioception term;
* ``random``: uniform random actions (the floor);
* ``scripted``: the data-generating scripted pusher, aimed at the goal's block position;
* ``oracle``: CEM with the true simulator as its model (each planned action held for 5 env steps; the ceiling).

Success = ``||(agent, block) xy - goal|| < 20 px`` and block angle error ``< pi / 9`` at some step; ``coverage`` is
the env's own task (> 95 % of its fixed T target). ``plan_ms_per_step`` is the time spent choosing actions per env
step. The issue's target: the model planners' success >= 3x random and >= 50 %.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hclsm.bench import BenchResult, register
from hclsm.assets import PUSHT_FRESH_SEED
from hclsm.bench.dynamics import PUSHT_STEPS, PUSHT_STEPS_QUICK, STAGE2_CLIP, _machine, _train_config, pusht_world_model
from hclsm.config import PUSHT_RECIPE
from hclsm.config.data import PushTDataConfig
from hclsm.data.clips import split_episodes
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.pusht import generate_pusht_dataset, make_env
from hclsm.planning.agent import ModelPlanner
from hclsm.planning.env_loop import (
    ACTION_HIGH,
    ACTION_LOW,
    BUDGET,
    OraclePlanner,
    RandomPolicy,
    ScriptedPolicy,
    evaluate,
    make_tasks,
)
from hclsm.models.flat import flat_config_matching
from hclsm.planning.planners import PlannerConfig, make_planner
from hclsm.train import train

REPLAN_EVERY = 5
VAL_FRACTION = 0.1  # the tiny preset's train.val_fraction: the held-out episodes are the training loop's own


def _settings(quick: bool) -> dict:
    if quick:
        return {"episodes": 5, "max_steps": 40, "steps": PUSHT_STEPS_QUICK, "states": 2, "train": ["train.batch_size=4"],
                "model": PlannerConfig(horizon=3, samples=8, iterations=1, elites=2),
                "oracle": PlannerConfig(samples=24, iterations=2, elites=4)}
    return {"episodes": 200, "max_steps": 100, "steps": PUSHT_STEPS, "states": 50, "train": [],
            "model": PlannerConfig(samples=48, iterations=3, elites=6),
            "oracle": PlannerConfig(samples=48, iterations=4, elites=6)}


@register("planning")
def bench_planning(quick: bool, seed: int) -> BenchResult:
    s = _settings(quick)
    keep = os.environ.get("HCLSM_BENCH_KEEP")
    low, high = np.full(2, ACTION_LOW, np.float32), np.full(2, ACTION_HIGH, np.float32)
    seconds, t0 = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-planning-") as tmp:
        root = Path(tmp) / "pusht"
        # env seeds from PUSHT_FRESH_SEED on: episodes the shipped object layers never saw
        data = generate_pusht_dataset(root, PushTDataConfig(episodes=s["episodes"], max_steps=s["max_steps"],
                                                            seed=seed + PUSHT_FRESH_SEED), progress=False)
        seconds["data"] = time.perf_counter() - t0
        runs = Path(keep) if keep else Path(tmp) / "runs"
        model, facts = pusht_world_model(root, runs, s["steps"], seed, False,
                                         [f"train.val_fraction={VAL_FRACTION}", *s["train"]])
        # the flat world model (one latent per frame, no slots) with as many trainable parameters and optimizer
        # steps as HCLSM's two stages, on the stage-2 clips
        base = _train_config(sum(s["steps"]), seed, STAGE2_CLIP, *PUSHT_RECIPE, f"train.val_fraction={VAL_FRACTION}",
                             *s["train"])
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        flat = train(dataclasses.replace(base, model=flat_config_matching(base.model, n_params)), root,
                     run_dir=runs / "flat-ssm", progress=False)
        facts |= {"flat_steps": flat.steps, "flat_minutes": flat.seconds / 60,
                  "flat_params": sum(p.numel() for p in flat.model.parameters() if p.requires_grad)}
        seconds["train"] = time.perf_counter() - t0 - seconds["data"]
        source = LeRobotSource(root)
        val = split_episodes(len(source), VAL_FRACTION, seed)[1]
        tasks = make_tasks(source, val, s["states"], seed)
        policies = [ModelPlanner(model, make_planner(name, s["model"], low, high, seed), name, REPLAN_EVERY)
                    for name in ("cem", "mppi")]
        # the object model with the proprioception term off (only the predicted slots guide the plan), and the flat
        # world model with the same planner, cost terms and budget
        policies += [ModelPlanner(model, make_planner("cem", s["model"], low, high, seed), "cem_slots_only",
                                  REPLAN_EVERY, proprio_weight=0.0),
                     ModelPlanner(flat.model.cpu().eval(), make_planner("cem", s["model"], low, high, seed),
                                  "flat_cem", REPLAN_EVERY)]
        policies += [RandomPolicy(seed), ScriptedPolicy(seed),
                     OraclePlanner(make_planner("cem", s["oracle"], low, high, seed), REPLAN_EVERY, action_repeat=5)]
        env = make_env(source.frame_size[0] if source.frame_size else 96)
        try:
            results = evaluate(env, tasks, policies)
        finally:
            env.close()
        seconds["planning"] = time.perf_counter() - t0 - seconds["data"] - seconds["train"]
    rows = [{"policy": name, "success": r["success_rate"], "coverage": r["coverage_success_rate"],
             "final_px": r["mean_final_distance_px"], "final_deg": float(np.degrees(r["mean_final_angle_error"])),
             "steps_to_success": r["mean_steps_to_success"], "plan_ms_per_step": r["plan_ms_per_step"]}
            for name, r in results.items()]
    metrics = {f"{name}_{k}": v for name, r in results.items() for k, v in r.items() if k != "episodes"}
    best = max(results["cem"]["success_rate"], results["mppi"]["success_rate"])
    rand = results["random"]["success_rate"]
    metrics["model_best_success_rate"] = best
    metrics["slots_only_success_rate"] = results["cem_slots_only"]["success_rate"]
    metrics["flat_success_rate"] = results["flat_cem"]["success_rate"]
    metrics["model_best_over_random"] = best / rand if rand > 0 else None
    title = (f"planning: PushT goal reaching, {len(tasks)} held-out start states, goal = replay of 25 recorded "
             f"actions, {BUDGET} env steps, re-plan every {REPLAN_EVERY}; tiny HCLSM trained "
             f"{facts['minutes']:.1f} min (stage 2: {facts['stage2_steps']} steps). Target: model success >= 3x "
             f"random and >= 50 %"
             + (" (quick: smoke only, a barely trained model)" if quick else ""))
    config = {"states": len(tasks), "start_states": [[t.episode, t.frame] for t in tasks], "budget": BUDGET,
              "replan_every": REPLAN_EVERY, "model_planner": vars(s["model"]), "oracle_planner": vars(s["oracle"]),
              "oracle_action_repeat": 5,
              "data": {k: data[k] for k in ("episodes", "frames", "contact_and_moved_fraction")},
              "train": facts, "seconds": seconds, **_machine()}
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
