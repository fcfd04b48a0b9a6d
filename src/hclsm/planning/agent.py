"""The planning agent: a sampling planner (CEM or MPPI) over a learned world model, in the PushT loop.

At every re-plan the agent encodes the ``context`` most recent observations (HCLSM's object layers; padded with
the first frame and "hold still" actions at the start of an episode, when the env is at rest), builds a
``WorldModelCost`` against the goal frame's slots, and asks the planner for ``horizon`` actions, each held for
``action_repeat`` env steps, of which it executes the first ``replan_every`` env steps. Observations are resized
to the model's frame size the way the training data are (bilinear, antialiased).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from hclsm import keys
from hclsm.models.objects import agent_cue
from hclsm.planning.cost import LatentCost, SlotSet, WorldModelCost
from hclsm.planning.env_loop import ACTION_HIGH, ACTION_LOW, Goal, execute
from hclsm.planning.planners import SamplingPlanner


def frames_to_video(frames, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 observations -> (1, T, 3, size, size) float in [0, 1]."""
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
    if video.shape[-1] != size or video.shape[-2] != size:
        video = F.interpolate(video, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return video.clamp(0, 1)[None]


class ModelPlanner:
    """``Policy`` that plans with ``model`` and ``planner``: an action-conditioned HCLSM (the cost compares object
    slots, ``WorldModelCost``) or a flat world model (one latent per frame, ``LatentCost``)."""

    def __init__(self, model, planner: SamplingPlanner, name: str, replan_every: int = 5, action_repeat: int = 1,
                 context: int | None = None, position_weight: float = 2.0, proprio_weight: float = 1.0):
        self.model, self.planner, self.name = model.eval(), planner, name
        self.replan_every, self.repeat = replan_every, action_repeat
        self.context = max(1, context if context is not None else model.cfg.dynamics.rollout_context)
        self.size = model.cfg.perception.image_size
        self.position_weight, self.proprio_weight = position_weight, proprio_weight
        self.executed = 0

    @property
    def flat(self) -> bool:
        """A flat world model (one latent per frame) rather than an object model."""
        return hasattr(self.model, "predict_latents")

    @torch.no_grad()
    def reset(self, env, goal: Goal) -> None:
        self.planner.reset()
        self.executed = 0
        video = frames_to_video([goal.frame], self.size)
        if self.flat:
            self.goal = self.model.encode(video)[0, 0]  # (d,)
        else:
            g = self.model.objects(video, cue=self._cue([goal.state[:2]]))
            self.goal = SlotSet(g.slots[0, 0], g.positions[0, 0], g.alive[0, 0], g.has_background)
        self.goal_action = torch.tensor(goal.state[:2], dtype=torch.float32)
        self.start_agent = np.asarray(env.unwrapped.agent.position, dtype=np.float64)

    def _cue(self, agent_xy) -> torch.Tensor | None:
        """The object model's proprioception cue for frames with the agent at ``agent_xy`` (T, 2), if it reads one."""
        if self.flat:
            return None
        return agent_cue({keys.STATE: torch.tensor(np.asarray(agent_xy, dtype=np.float32))[None]}, self.model.cfg)

    @torch.no_grad()
    def act(self, env, frames, actions, proprio) -> np.ndarray:
        c = self.context
        # the last c frames and the c - 1 actions between them; early in an episode the first frame is repeated in
        # front, with "hold" actions (the agent's start position: the env starts at rest)
        pad = max(0, c - len(frames))
        hist_frames = [frames[0]] * pad + list(frames[-c:])
        hist_xy = [proprio[0]] * pad + list(proprio[-c:])
        hist_actions = ([self.start_agent] * pad + [np.asarray(a, dtype=np.float64) for a in actions])[-(c - 1):] \
            if c > 1 else []
        video = frames_to_video(hist_frames, self.size)
        past = torch.tensor(np.array(hist_actions, dtype=np.float64).reshape(c - 1, 2), dtype=torch.float32)
        scale = (ACTION_HIGH - ACTION_LOW) / 2
        if self.flat:
            cost = LatentCost(self.model, self.model.encode(video), past, self.goal, self.goal_action, scale,
                              self.proprio_weight)
        else:
            cost = WorldModelCost(self.model, self.model.objects(video, cue=self._cue(hist_xy)), past, self.goal,
                                  self.goal_action, scale,
                                  self.position_weight, self.proprio_weight)
        agent = torch.tensor(np.asarray(env.unwrapped.agent.position), dtype=torch.float32)
        plan = self.planner.plan(lambda c: cost(c.repeat_interleave(self.repeat, dim=1)),
                                 agent.expand(self.planner.cfg.horizon, 2), self.executed)
        return execute(self, plan)
