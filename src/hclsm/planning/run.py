"""``hclsm plan``: a trained HCLSM run plans in the real PushT simulator; summary table, JSON and GIFs.

``RUN_DIR`` is either a training run (``config.yaml`` + ``checkpoints/``) or a ``hclsm demo`` run (its
``train/stage2`` and ``data/pusht``). Start states come from the run's held-out episodes (its own
``train.val_fraction`` / ``train.seed`` split) of the PushT dataset: ``--data``, else the demo's ``data/pusht``, else
the dataset the checkpoint names.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hclsm.errors import HclsmError
from hclsm.planning.env_loop import (
    ACTION_HIGH,
    ACTION_LOW,
    BUDGET,
    SUCCESS_POS_PX,
    EpisodeResult,
    Goal,
    OraclePlanner,
    RandomPolicy,
    ScriptedPolicy,
    Task,
    evaluate,
    make_tasks,
)
from hclsm.planning.planners import PLANNERS, PlannerConfig, make_planner
from hclsm.runs import Run
from hclsm.utils.atomic import atomic_write_text, writing

GIF_SCALE = 3  # observation pixels -> GIF pixels
ORACLE_REPEAT = 5  # the oracle holds each planned action for 5 env steps: a 25-step look-ahead
SIM_SIZE = 512


def find_run(run_dir: str | os.PathLike, data: str | os.PathLike | None = None) -> tuple[Run, Path]:
    """(the run, its PushT dataset directory) for ``run_dir``, any run ``hclsm.runs.Run`` reads (a demo's
    included); ``data`` defaults to the dataset the run trained on. ``HclsmError`` naming the fix."""
    run = Run(run_dir)
    run.require_checkpoint()
    if data is None:
        data = run.data_root
        if data is None:
            raise HclsmError(f"--checkpoint {run_dir}: its checkpoint names no dataset that exists; pass --data DIR "
                             f"of the PushT dataset it was trained on")
    return run, Path(data)


def load_planning_model(run: Run):
    """The run's config, its HCLSM with the newest checkpoint loaded (eval mode), and the checkpoint state."""
    from hclsm.models import build_model
    from hclsm.models.hclsm import HCLSM
    from hclsm.train.checkpoint import load_checkpoint

    cfg = run.config
    if cfg.model.name != "hclsm":
        raise HclsmError(f"{run.path} trained model {cfg.model.name!r}; planning rolls out HCLSM's dynamics: pass a "
                         f"run of --model hclsm")
    if cfg.model.d_action != 2:
        raise HclsmError(f"{run.path}: the model takes {cfg.model.d_action}-D actions (model.d_action); planning in "
                         f"PushT needs a model trained on PushT with its 2-D actions (model.d_action=2)")
    model = build_model(cfg.model)
    assert isinstance(model, HCLSM)
    state = load_checkpoint(run.require_checkpoint(), model)
    return cfg, model.eval(), state


def _draw_goal(img: Image.Image, goal: Goal, scale: float) -> None:
    d = ImageDraw.Draw(img)
    for poly in goal.block_polygons:
        pts = [(float(x) * scale, float(y) * scale) for x, y in poly]
        d.polygon(pts, outline=(220, 30, 30), width=2)
    ax, ay, r = goal.state[0] * scale, goal.state[1] * scale, 15 * scale
    d.ellipse([ax - r, ay - r, ax + r, ay + r], outline=(220, 30, 30), width=2)


def episode_gif(frames, goal: Goal, result: EpisodeResult, path: str | os.PathLike, title: str = "") -> Path:
    """The episode's observations, upscaled, with the goal's block and agent drawn over them in red, and the step,
    the distance to the goal and (once reached) "reached" written on each frame; 10 fps."""
    images = []
    for i, f in enumerate(frames):
        img = Image.fromarray(np.asarray(f)).resize((f.shape[1] * GIF_SCALE, f.shape[0] * GIF_SCALE), Image.NEAREST)
        _draw_goal(img, goal, img.width / SIM_SIZE)
        reached = result.success_step is not None and i >= result.success_step
        text = f"{title} step {i}" + ("  reached" if reached else "")
        ImageDraw.Draw(img).text((4, 2), text, fill=(0, 0, 0))
        images.append(img.convert("P", palette=Image.ADAPTIVE))
    path = Path(path)
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


def action_box() -> tuple[np.ndarray, np.ndarray]:
    return np.full(2, ACTION_LOW, np.float32), np.full(2, ACTION_HIGH, np.float32)


def planning_policies(model, planner_names, cfg: PlannerConfig, replan_every: int, seed: int):
    from hclsm.planning.agent import ModelPlanner

    return [ModelPlanner(model, make_planner(n, cfg, *action_box(), seed), n, replan_every) for n in planner_names]


def run_plan(run_dir, episodes: int = 50, planner: str = "mppi", out=None, data=None, seed: int = 0,
             gifs: int = 4, baselines: bool = False, cfg: PlannerConfig | None = None, replan_every: int = 5,
             budget: int = BUDGET, progress: bool = True) -> dict:
    """Plan from ``episodes`` held-out start states with the run's model; writes ``summary.json`` and GIFs of the
    first ``gifs`` episodes per policy into ``out`` (default ``RUN_DIR/plan``); returns the summary."""
    from hclsm.train.data import run_split
    from hclsm.data.lerobot_read import LeRobotSource

    if planner not in PLANNERS:
        raise HclsmError(f"--planner {planner!r}: choose one of {', '.join(sorted(PLANNERS))}")
    if episodes < 1:
        raise HclsmError(f"--episodes must be >= 1, got {episodes}")
    train_run, data_dir = find_run(run_dir, data)
    run_cfg, model, state = load_planning_model(train_run)
    source = LeRobotSource(data_dir)
    n = len(source)
    val = run_split(n, run_cfg)[1] or list(range(n))  # the run's held-out episodes; all when it held none out
    try:
        tasks = make_tasks(source, val, episodes, seed)
    except ValueError as e:
        raise HclsmError(f"--data {data_dir}: {e}") from None
    cfg = cfg or PlannerConfig()
    policies = planning_policies(model, [planner], cfg, replan_every, seed)
    if baselines:  # the oracle gets the model planner's budget of candidates and iterations
        policies += [RandomPolicy(seed), ScriptedPolicy(seed),
                     OraclePlanner(make_planner("cem", cfg, *action_box(), seed), replan_every, ORACLE_REPEAT)]
    out = Path(out) if out is not None else Path(run_dir) / "plan"
    if out.exists() and not out.is_dir():
        raise HclsmError(f"--out {out} is a file; give a directory for summary.json and the GIFs")
    with writing(out):  # a read-only or full --out is one line, not a traceback
        summary = plan_tasks(source, tasks, policies, out, gifs, budget, progress)
    record = {"run": str(train_run.dir), "out": str(out), "budget": budget, "checkpoint": state["path"],
              "step": state["step"], "stage": state["stage"],
              "data": str(data_dir), "episodes": episodes, "held_out_episodes": val, "seed": seed,
              "planner": asdict(cfg), "replan_every": replan_every, "success_px": SUCCESS_POS_PX,
              "results": summary}
    with writing(out):
        atomic_write_text(out / "summary.json", json.dumps(record, indent=2) + "\n")
    return record


def plan_tasks(source, tasks: list[Task], policies, out: Path, gifs: int = 4, budget: int = BUDGET,
               progress: bool = True) -> dict[str, dict]:
    """Every policy on every task in a fresh PushT env (the dataset's frame size); GIFs of the first ``gifs``
    episodes per policy into ``out`` as ``POLICY_III.gif``; returns ``evaluate``'s summary per policy."""
    from hclsm.data.pusht import make_env

    out.mkdir(parents=True, exist_ok=True)

    def save_gif(policy, i: int, task: Task, goal: Goal, result: EpisodeResult) -> None:
        if i < gifs:
            episode_gif(result.frames, goal, result, out / f"{policy.name}_{i:03d}.gif",
                        f"{policy.name} ep{task.episode} t{task.frame}")

    env = make_env(source.frame_size[0] if source.frame_size else 96)
    try:
        return evaluate(env, tasks, policies, budget, progress=progress, on_episode=save_gif)
    finally:
        env.close()


def format_summary(results: dict[str, dict]) -> str:
    """One row per policy: success, env coverage success, final distance, planning time per env step."""
    lines = [f"{'policy':<10}{'success':>9}{'coverage':>10}{'final px':>10}{'final deg':>10}{'ms/step':>9}"]
    for name, r in results.items():
        lines.append(f"{name:<10}{r['success_rate']:>9.0%}{r['coverage_success_rate']:>10.0%}"
                     f"{r['mean_final_distance_px']:>10.1f}{np.degrees(r['mean_final_angle_error']):>10.1f}"
                     f"{r['plan_ms_per_step']:>9.1f}")
    return "\n".join(lines)
