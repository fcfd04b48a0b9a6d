"""PushT episodes from the real simulator (``gym_pusht/PushT-v0``), written as a LeRobot v3 dataset.

A scripted pusher with noise drives the env: it picks a push direction for the T block (towards the
goal or a random one), walks the agent to a point behind the block on that line, pushes through it
for a few steps, and re-plans. Most episodes therefore have agent-block contact and a block that
moves. Frames, keys and fps follow ``lerobot/pusht`` (96 x 96 ``observation.image``, agent xy as
``observation.state``, absolute target xy as ``action``, fps 10, ``next.*`` shifted by one step).

Per-frame ground truth in the same parquet: ``gt.block_pose`` (x, y, angle; simulator px/rad),
``gt.contact`` (agent touches the block), ``gt.coverage`` (of the goal region) and ``gt.positions``
(agent, block centre of gravity, goal centre in image pixels). Object masks (0 background, 1 agent,
2 block, 3 goal), rasterised from the simulator state with the env's own draw order, go to
``extras/mask/episode_*.npz``.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from hclsm.config.data import PushTDataConfig
from hclsm.data.lerobot_write import LeRobotV3Writer
from hclsm.utils.atomic import atomic_output_dir
from hclsm.utils.interrupt import interrupt_point, sigint_deferred

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless pygame
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

FPS = 10
SIM_SIZE = 512  # simulator canvas side (px)
AGENT_RADIUS = 15.0
MASK_IDS = {"background": 0, "agent": 1, "block": 2, "goal": 3}
TASK = "Push the T-shaped block onto the T-shaped target."
DISPLACEMENT_PX = 20.0  # "the block moved": max displacement over the episode above this (sim px)


def make_env(image_size: int = 96):
    """The real gym-pusht env, pixels + agent position, rendered headless at ``image_size``."""
    import gymnasium as gym
    import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)

    return gym.make("gym_pusht/PushT-v0", obs_type="pixels_agent_pos", render_mode="rgb_array",
                    observation_width=image_size, observation_height=image_size)


class ScriptedPusher:
    """Approach-then-push policy; ``act`` returns an absolute target position (simulator px)."""

    def __init__(self, rng: np.random.Generator, noise: float):
        self.rng, self.noise = rng, noise
        self.direction: np.ndarray | None = None
        self.phase, self.steps_left = "approach", 0

    def _new_direction(self, block_xy: np.ndarray, goal_xy: np.ndarray) -> None:
        to_goal = goal_xy - block_xy
        for _ in range(20):  # re-draw directions whose push would start outside the arena
            if self.rng.random() < 0.6 and np.linalg.norm(to_goal) > 30:
                angle = np.arctan2(to_goal[1], to_goal[0]) + self.rng.normal(0, 0.4)
            else:  # a random push keeps the data diverse
                angle = self.rng.uniform(-np.pi, np.pi)
            self.direction = np.array([np.cos(angle), np.sin(angle)])
            behind = block_xy - self.direction * 90.0
            if np.all((behind > 30) & (behind < SIM_SIZE - 30)):
                break
        self.phase, self.steps_left = "approach", 25

    def _detour(self, agent_xy: np.ndarray, block_xy: np.ndarray, behind: np.ndarray) -> np.ndarray:
        """Walk around the block (not through it) when it lies between the agent and ``behind``."""
        rel = agent_xy - block_xy
        if rel @ self.direction < -60 or np.linalg.norm(rel) > 160:
            return behind  # already behind the block, or far enough that the straight path is fine
        perp = np.array([-self.direction[1], self.direction[0]])
        side = 1.0 if rel @ perp >= 0 else -1.0
        return block_xy + side * perp * 95.0 - self.direction * 75.0  # ends outside the detour zone

    def act(self, agent_xy: np.ndarray, block_xy: np.ndarray, goal_xy: np.ndarray) -> np.ndarray:
        if self.direction is None or self.steps_left <= 0:
            self._new_direction(block_xy, goal_xy)
        self.steps_left -= 1
        behind = block_xy - self.direction * 90.0  # start of the push, outside the T's reach
        if self.phase == "approach" and np.linalg.norm(agent_xy - behind) < 25:
            self.phase, self.steps_left = "push", int(self.rng.integers(6, 14))
        if self.phase == "approach":
            goal = self._detour(agent_xy, block_xy, behind)
        else:
            goal = block_xy + self.direction * 60.0
        step = goal - agent_xy
        step *= min(1.0, 45.0 / (np.linalg.norm(step) + 1e-9))  # at most 45 px per control step
        target = agent_xy + step + self.rng.normal(0, self.noise, size=2)
        return np.clip(target, 10, SIM_SIZE - 10).astype(np.float32)


def _polygons(body) -> list[np.ndarray]:
    return [np.array([body.local_to_world(v) for v in s.get_vertices()]) for s in body.shapes]


def render_masks(env, image_size: int) -> np.ndarray:
    """Object-id mask (H, W) uint8 of the current simulator state, drawn in the env's order."""
    u = env.unwrapped
    canvas = np.zeros((SIM_SIZE, SIM_SIZE), np.uint8)
    goal_body = u.get_goal_pose_body(u.goal_pose)
    goal_polys = [np.array([goal_body.local_to_world(v) for v in s.get_vertices()]) for s in u.block.shapes]
    scale = 16  # cv2 fixed-point subpixel precision (shift=4)
    for poly in goal_polys:
        cv2.fillPoly(canvas, [np.round(poly * scale).astype(np.int32)], MASK_IDS["goal"], shift=4)
    ax, ay = u.agent.position
    cv2.circle(canvas, (int(round(ax * scale)), int(round(ay * scale))), int(round(AGENT_RADIUS * scale)),
               MASK_IDS["agent"], thickness=-1, shift=4)
    for poly in _polygons(u.block):  # the block is drawn after the agent by pymunk's debug_draw
        cv2.fillPoly(canvas, [np.round(poly * scale).astype(np.int32)], MASK_IDS["block"], shift=4)
    return sample_centres(canvas, image_size)


def sample_centres(ids: np.ndarray, size: int) -> np.ndarray:
    """An id map (H, W) brought to (size, size) by taking, for every output pixel, the id at its centre. (cv2's and
    torch's plain "nearest" take the id at the pixel's top-left corner instead, which moves every mask by half an
    output pixel less half an input pixel, down and right, against frames resized about pixel centres.)"""
    h, w = ids.shape
    rows = np.minimum(((np.arange(size) + 0.5) * h / size).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * w / size).astype(np.int64), w - 1)
    return ids[rows[:, None], cols[None, :]]


def _touching(u) -> bool:
    """Agent circle within 1 px of the block's polygons."""
    p = u.agent.position
    return min(s.point_query(p).distance for s in u.block.shapes) <= AGENT_RADIUS + 1.0


def record_episode(env, cfg: PushTDataConfig, index: int) -> dict[str, np.ndarray]:
    """Run one scripted episode; returns per-frame arrays (T, ...) incl. frames and masks."""
    rng = np.random.default_rng([cfg.seed, index])
    with sigint_deferred():  # the simulator runs Python callbacks from C: Ctrl-C is taken after each call
        obs, _ = env.reset(seed=cfg.seed * 100_003 + index)
    u = env.unwrapped
    policy = ScriptedPusher(rng, cfg.action_noise)
    goal_xy = np.asarray(u.goal_pose[:2], dtype=np.float64)
    rec: dict[str, list] = {k: [] for k in ("image", "mask", "state", "action", "reward", "done", "success",
                                            "block_pose", "contact", "coverage", "positions")}
    coverage = float(u._get_coverage())
    s = cfg.image_size / SIM_SIZE
    for t in range(cfg.max_steps):
        agent_xy = np.asarray(obs["agent_pos"], dtype=np.float64)
        block_xy = np.asarray(u.block.position, dtype=np.float64)
        rec["image"].append(obs["pixels"])
        rec["mask"].append(render_masks(env, cfg.image_size))
        rec["state"].append(agent_xy.astype(np.float32))
        rec["block_pose"].append(np.array([*block_xy, u.block.angle], dtype=np.float32))
        rec["contact"].append(_touching(u))
        rec["coverage"].append(coverage)
        rec["positions"].append((np.array([agent_xy, block_xy, goal_xy]) * s).reshape(-1).astype(np.float32))
        action = policy.act(agent_xy, block_xy, goal_xy)
        with sigint_deferred():
            obs, reward, terminated, truncated, info = env.step(action)
        coverage = float(info["coverage"])
        last = terminated or t == cfg.max_steps - 1
        rec["action"].append(action)
        rec["reward"].append(np.float32(reward))  # next.* = outcome of this frame's action
        rec["success"].append(bool(info["is_success"]))
        rec["done"].append(bool(last))
        if terminated:
            break
    return {k: np.stack(v) if isinstance(v[0], np.ndarray) else np.asarray(v) for k, v in rec.items()}


def episode_stats(ep: dict[str, np.ndarray]) -> dict[str, float]:
    """Contact and block displacement (sim px) of one recorded episode."""
    xy = ep["block_pose"][:, :2].astype(np.float64)
    return {"contact": bool(ep["contact"].any()),
            "displacement": float(np.linalg.norm(xy - xy[0], axis=1).max())}


PUSHT_FEATURES = {
    "observation.state": {"dtype": "float32", "shape": [2], "names": {"motors": ["motor_0", "motor_1"]}},
    "action": {"dtype": "float32", "shape": [2], "names": {"motors": ["motor_0", "motor_1"]}},
    "next.reward": {"dtype": "float32", "shape": [1], "names": None},
    "next.done": {"dtype": "bool", "shape": [1], "names": None},
    "next.success": {"dtype": "bool", "shape": [1], "names": None},
    "gt.block_pose": {"dtype": "float32", "shape": [3], "names": ["x", "y", "theta"]},
    "gt.contact": {"dtype": "bool", "shape": [1], "names": None},
    "gt.coverage": {"dtype": "float32", "shape": [1], "names": None},
    "gt.positions": {"dtype": "float32", "shape": [6], "names": ["agent_x", "agent_y", "block_x", "block_y",
                                                                  "goal_x", "goal_y"]},
}


def generate_pusht_dataset(out: str | Path, cfg: PushTDataConfig, overwrite: bool = False,
                           progress: bool = True) -> dict:
    """Record ``cfg.episodes`` scripted episodes in gym-pusht and write a LeRobot v3 dataset to ``out``.

    Returns a summary: episodes, frames, seconds, and the fraction of episodes with contact and
    with block displacement above 20 px (both, and each). Nothing is left at ``out`` on failure.
    """
    t0 = time.perf_counter()
    env = make_env(cfg.image_size)
    stats = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        writer = LeRobotV3Writer(tmp, fps=FPS, features=PUSHT_FEATURES,
                                 video_keys={"observation.image": (cfg.image_size, cfg.image_size)},
                                 codec=cfg.codec, robot_type="pusht")
        for i in tqdm(range(cfg.episodes), desc="pusht episodes", disable=not progress, unit="ep"):
            interrupt_point()
            ep = record_episode(env, cfg, i)
            stats.append(episode_stats(ep))
            frames = {"observation.state": ep["state"], "action": ep["action"], "next.reward": ep["reward"],
                      "next.done": ep["done"], "next.success": ep["success"], "gt.block_pose": ep["block_pose"],
                      "gt.contact": ep["contact"], "gt.coverage": ep["coverage"].astype(np.float32),
                      "gt.positions": ep["positions"]}
            writer.add_episode(frames, {"observation.image": ep["image"]}, TASK, extras={"mask": ep["mask"]})
        info = writer.finalize({"hclsm_generator": {"name": "pusht", "config": asdict(cfg), "mask_ids": MASK_IDS}})
    env.close()
    contact = np.array([s["contact"] for s in stats])
    moved = np.array([s["displacement"] > DISPLACEMENT_PX for s in stats])
    return {"episodes": cfg.episodes, "frames": int(info["total_frames"]), "seconds": time.perf_counter() - t0,
            "contact_fraction": float(contact.mean()), "moved_fraction": float(moved.mean()),
            "contact_and_moved_fraction": float((contact & moved).mean()),
            "mean_displacement_px": float(np.mean([s["displacement"] for s in stats]))}
