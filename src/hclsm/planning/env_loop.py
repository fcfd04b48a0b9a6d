"""Closed-loop goal reaching in the real PushT simulator, following DINO-WM / C-JEPA.

* **Tasks.** A start is a recorded state of a held-out dataset episode at frame t0 (t0 <= length - 26). The env is
  put exactly in that state (``set_sim_state``: the block's angle is set before its position, so the recorded
  pose is reproduced; gym-pusht's own ``reset_to_state`` sets them the other way round and moves the block), and
  the goal is made by **replaying the next ``GOAL_OFFSET`` recorded actions in the simulator**, so it is reachable
  by construction; the recorded frame t0 + 25 is never used.
* **Budget.** ``BUDGET`` env steps; the policy is asked for actions whenever the previous ones are used up (a
  planner returns ``replan_every`` of its planned steps: model-predictive control).
* **Success** (DINO-WM's ``eval_state``): ``||(agent xy, block xy) - goal||_2 < 20`` px over the 4-vector and the
  wrapped block-angle error ``< pi / 9``, checked after every step, counted once reached (sticky). The env's own
  task (coverage of its fixed T target > 95 %) is a separate column; when it is met the env **terminates** and the
  episode ends there, as a gym episode does.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from pymunk import Vec2d
from tqdm import tqdm

from hclsm import keys
from hclsm.utils.interrupt import interrupt_point, sigint_deferred

GOAL_OFFSET = 25  # recorded actions replayed to make the goal (DINO-WM: feasible within 25 steps)
BUDGET = 50  # env steps per episode (the swm / C-JEPA budget)
SUCCESS_POS_PX = 20.0  # threshold on ||(agent xy, block xy) - goal|| in simulator px
SUCCESS_ANGLE = np.pi / 9  # threshold on the wrapped block-angle error (rad)
ACTION_LOW, ACTION_HIGH = 0.0, 512.0  # PushT's action box: the agent's absolute target (simulator px)


@dataclass
class Task:
    """One start state (agent x, y, block x, y, angle) and the recorded actions that make its goal."""

    episode: int
    frame: int
    start: np.ndarray  # (5,)
    actions: np.ndarray  # (GOAL_OFFSET, 2)


@dataclass
class Goal:
    state: np.ndarray  # (5,) simulator state after the replay
    frame: np.ndarray  # (H, W, 3) uint8 observation of the goal
    block_polygons: list[np.ndarray]  # the goal block's polygons (simulator px), for drawing


@dataclass
class EpisodeResult:
    success: bool  # goal reached (DINO-WM criterion) at some step
    success_step: int | None
    covered: bool  # the env's own task (coverage > 95 %) met at some step; the env terminated then
    steps: int
    final_distance: float  # ||state - goal|| over (agent xy, block xy) at the end (px)
    final_angle_error: float  # rad
    policy_seconds: float  # time spent choosing actions (planning)
    frames: list[np.ndarray] = field(default_factory=list)  # observations, when recorded


class Policy(Protocol):
    name: str

    def reset(self, env, goal: Goal) -> None: ...

    def act(self, env, frames: Sequence[np.ndarray], actions: Sequence[np.ndarray],
            proprio: Sequence[np.ndarray]) -> np.ndarray:
        """The next actions (k >= 1, 2) to execute, given the observations so far, the actions taken and the
        proprioception (the agent's xy) at every observation."""


# ---- the simulator's state ---------------------------------------------------------------------

def angle_error(a: float, b: float) -> float:
    d = abs(a - b) % (2 * np.pi)
    return float(min(d, 2 * np.pi - d))


def sim_state(u) -> np.ndarray:
    """(5,) agent x, y, block x, y, angle of the unwrapped PushT env."""
    return np.array([*u.agent.position, *u.block.position, u.block.angle % (2 * np.pi)], dtype=np.float64)


def full_state(u) -> tuple:
    """Everything the dynamics carry from step to step: positions, angle and the velocities."""
    return (tuple(u.agent.position), tuple(u.agent.velocity), tuple(u.block.position), float(u.block.angle),
            tuple(u.block.velocity), float(u.block.angular_velocity))


def set_full_state(u, s: tuple) -> None:
    agent_pos, agent_vel, block_pos, angle, block_vel, ang_vel = s
    u.block.angle = angle  # angle first: setting it rotates about the centre of gravity and would move the position
    u.block.position = block_pos
    u.block.velocity, u.block.angular_velocity = block_vel, ang_vel
    u.agent.position, u.agent.velocity = agent_pos, agent_vel


def physics_step(u, action: np.ndarray) -> None:
    """One control step of the unwrapped env's physics only (PD control of the agent towards ``action`` and the
    pymunk sub-steps, exactly as ``PushTEnv.step``), without its reward, coverage and observation."""
    target = Vec2d(float(action[0]), float(action[1]))
    with sigint_deferred():  # pymunk runs gym-pusht's Python collision callback from C
        for _ in range(int(1 / (u.dt * u.control_hz))):
            u.agent.velocity += (u.k_p * (target - u.agent.position) + u.k_v * (Vec2d(0, 0) - u.agent.velocity)) * u.dt
            u.space.step(u.dt)


def set_sim_state(env, state: np.ndarray) -> None:
    """Reset ``env`` and put it exactly in ``state`` (agent x, y, block x, y, angle), everything at rest."""
    u = env.unwrapped
    with sigint_deferred():
        u.reset(seed=0)
    set_full_state(u, (tuple(state[:2]), (0.0, 0.0), tuple(state[2:4]), float(state[4]), (0.0, 0.0), 0.0))
    u._last_action = None


def goal_reached(state: np.ndarray, goal: np.ndarray) -> bool:
    return bool(np.linalg.norm(state[:4] - goal[:4]) < SUCCESS_POS_PX
                and angle_error(state[4], goal[4]) < SUCCESS_ANGLE)


def make_goal(env, task: Task) -> Goal:
    """Put the env in the task's start state and replay its recorded actions; the end state is the goal."""
    u = env.unwrapped
    set_sim_state(env, task.start)
    for a in task.actions:
        with sigint_deferred():
            u.step(np.asarray(a, dtype=np.float64))
    polys = [np.array([u.block.local_to_world(v) for v in s.get_vertices()]) for s in u.block.shapes]
    with sigint_deferred():  # rendering draws through pymunk's debug-draw callbacks
        pixels = np.asarray(u.get_obs()["pixels"]).copy()
    return Goal(sim_state(u), pixels, polys)


def make_tasks(source, episodes: Sequence[int], n: int, seed: int = 0) -> list[Task]:
    """``n`` start states drawn (without replacement where possible) from ``episodes`` of a PushT dataset
    (``hclsm.data.lerobot_read.LeRobotSource`` with ground-truth block poses), each with the next
    ``GOAL_OFFSET`` recorded actions."""
    lengths = source.episode_lengths
    pairs = [(e, t) for e in episodes for t in range(lengths[e] - GOAL_OFFSET)]
    if not pairs:
        raise ValueError(f"no episode among {list(episodes)} has more than {GOAL_OFFSET} frames")
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(pairs), size=n, replace=n > len(pairs))
    tasks = []
    for i in sorted(picked.tolist()):
        e, t = pairs[i]
        clip = source.load_clip(e, np.arange(t, t + GOAL_OFFSET))
        if keys.BLOCK_POSE not in clip or keys.STATE not in clip or keys.ACTION not in clip:
            raise ValueError(f"{source.name} has no block poses / agent states / actions: not a PushT dataset made by "
                             f"`hclsm data pusht`")
        start = np.concatenate([clip[keys.STATE][0].numpy(), clip[keys.BLOCK_POSE][0].numpy()]).astype(np.float64)
        tasks.append(Task(e, t, start, clip[keys.ACTION].numpy().astype(np.float64)))
    return tasks


# ---- baselines -----------------------------------------------------------------------------------

class RandomPolicy:
    """Uniform random targets in the action box (the random-action floor)."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, env, goal: Goal) -> None:
        pass

    def act(self, env, frames, actions, proprio) -> np.ndarray:
        return self.rng.uniform(ACTION_LOW, ACTION_HIGH, size=(1, 2))


class ScriptedPolicy:
    """The data-generating scripted pusher (``hclsm.data.pusht.ScriptedPusher``), pushing the block towards the
    goal's block position (it does not know about the angle or the agent's goal)."""

    name = "scripted"

    def __init__(self, seed: int = 0, noise: float = 6.0):
        self.seed, self.noise, self.episode = seed, noise, 0

    def reset(self, env, goal: Goal) -> None:
        from hclsm.data.pusht import ScriptedPusher

        self.pusher = ScriptedPusher(np.random.default_rng([self.seed, self.episode]), self.noise)
        self.goal_xy = goal.state[2:4].copy()
        self.episode += 1

    def act(self, env, frames, actions, proprio) -> np.ndarray:
        u = env.unwrapped
        return self.pusher.act(np.asarray(u.agent.position), np.asarray(u.block.position), self.goal_xy)[None]


class OraclePlanner:
    """The same sampling planner with the **true simulator** as its model (the upper bound): each candidate is
    re-simulated from a copy of the env's full state (positions and velocities) in a separate state-only env
    (each planned action held for ``action_repeat`` env steps), and scored by the squared success margins
    ``(d / 20 px)^2 + (angle error / (pi / 9))^2`` at its best step (success is sticky: passing through the goal
    counts)."""

    def __init__(self, planner, replan_every: int = 5, action_repeat: int = 1, name: str = "oracle"):
        import gymnasium as gym
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

        self.planner, self.replan_every, self.repeat, self.name = planner, replan_every, action_repeat, name
        self.sim = gym.make("gym_pusht/PushT-v0", obs_type="state").unwrapped
        with sigint_deferred():
            self.sim.reset(seed=0)
        self.executed = 0

    def reset(self, env, goal: Goal) -> None:
        self.planner.reset()
        self.goal, self.executed = goal, 0

    def _cost(self, start: tuple, candidates) -> np.ndarray:
        cost = np.empty(len(candidates))
        seqs = candidates.repeat_interleave(self.repeat, dim=1).numpy().astype(np.float64)  # (N, H * repeat, 2)
        for i, seq in enumerate(seqs):  # the simulator is not batched
            set_full_state(self.sim, start)
            margins = []
            for a in seq:
                physics_step(self.sim, a)
                s = sim_state(self.sim)
                margins.append((np.linalg.norm(s[:4] - self.goal.state[:4]) / SUCCESS_POS_PX) ** 2
                               + (angle_error(s[4], self.goal.state[4]) / SUCCESS_ANGLE) ** 2)
            cost[i] = min(margins)  # success is sticky: passing through the goal counts
        return cost

    def act(self, env, frames, actions, proprio) -> np.ndarray:
        import torch

        u = env.unwrapped
        start = full_state(u)
        hold = torch.tensor(np.asarray(u.agent.position), dtype=torch.float32).expand(self.planner.cfg.horizon, 2)
        plan = self.planner.plan(lambda c: torch.from_numpy(self._cost(start, c)), hold, self.executed)
        return execute(self, plan)


def execute(policy, plan) -> np.ndarray:
    """The env steps to carry out now from a plan (H, A) of ``policy.repeat``-step blocks: the first
    ``policy.replan_every`` env steps (at least one block); records how many blocks that consumed."""
    blocks = max(1, min(len(plan), -(-policy.replan_every // policy.repeat)))
    policy.executed = blocks
    return plan[:blocks].repeat_interleave(policy.repeat, dim=0)[:max(policy.replan_every, 1)].numpy().astype(
        np.float64)


# ---- the loop ------------------------------------------------------------------------------------

def run_episode(env, task: Task, goal: Goal, policy: Policy, budget: int = BUDGET, record: bool = False
                ) -> EpisodeResult:
    """One closed-loop episode from ``task.start`` towards ``goal`` (see the module docstring)."""
    u = env.unwrapped
    set_sim_state(env, task.start)
    policy.reset(env, goal)
    with sigint_deferred():
        frames = [np.asarray(u.get_obs()["pixels"]).copy()]
    proprio = [np.asarray(u.agent.position, dtype=np.float64).copy()]  # the agent's xy at every observation
    taken: list[np.ndarray] = []
    queue: list[np.ndarray] = []
    success_step, covered, seconds = None, False, 0.0
    for step in range(1, budget + 1):
        interrupt_point()
        if not queue:
            t0 = time.perf_counter()
            queue = [np.clip(np.asarray(a, dtype=np.float64), ACTION_LOW, ACTION_HIGH)
                     for a in policy.act(env, frames, taken, proprio)]
            seconds += time.perf_counter() - t0
            if not queue:
                raise RuntimeError(f"policy {policy.name} returned no actions")
        action = queue.pop(0)
        with sigint_deferred():
            obs, _, terminated, _, info = u.step(action)
        taken.append(action)
        frames.append(np.asarray(obs["pixels"]).copy())
        proprio.append(np.asarray(u.agent.position, dtype=np.float64).copy())
        if success_step is None and goal_reached(sim_state(u), goal.state):
            success_step = step
        covered = covered or bool(info["is_success"])
        if terminated:  # the env's own task is solved: its episode is over
            break
    s = sim_state(u)
    return EpisodeResult(success_step is not None, success_step, covered, step,
                         float(np.linalg.norm(s[:4] - goal.state[:4])), angle_error(s[4], goal.state[4]), seconds,
                         frames if record else [])


def summarise(results: Sequence[EpisodeResult]) -> dict[str, float]:
    n = len(results)
    steps = sum(r.steps for r in results)
    reached = [r.success_step for r in results if r.success_step is not None]
    return {"episodes": n, "success_rate": sum(r.success for r in results) / n,
            "coverage_success_rate": sum(r.covered for r in results) / n,
            "mean_final_distance_px": float(np.mean([r.final_distance for r in results])),
            "mean_final_angle_error": float(np.mean([r.final_angle_error for r in results])),
            "mean_steps_to_success": float(np.mean(reached)) if reached else None,
            "plan_ms_per_step": 1000 * sum(r.policy_seconds for r in results) / max(steps, 1)}


def evaluate(env, tasks: Sequence[Task], policies: Sequence[Policy], budget: int = BUDGET, progress: bool = False,
             on_episode=None) -> dict[str, dict[str, float]]:
    """Every policy on every task; returns ``summarise`` per policy name. ``on_episode(policy, i, task, goal,
    result)`` sees each episode (frames recorded) as it ends, e.g. to write a GIF."""
    goals = [make_goal(env, t) for t in tasks]
    out = {}
    for policy in policies:
        results = []
        for i, (task, goal) in enumerate(tqdm(list(zip(tasks, goals)), desc=policy.name, unit="ep",
                                              disable=not progress)):
            r = run_episode(env, task, goal, policy, budget, record=on_episode is not None)
            if on_episode is not None:
                on_episode(policy, i, task, goal, r)
                r.frames = []
            results.append(r)
        out[policy.name] = summarise(results)
    return out
