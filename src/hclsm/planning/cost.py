"""The planning cost: how far a candidate's predicted object slots end from the goal's slots (``WorldModelCost``), or
a flat model's predicted latent from the goal's latent (``LatentCost``).

``WorldModelCost`` rolls every candidate action sequence out through the world model in **one batched call**
(the context slots and the actions between them are shared: the context's first steps run once and their
state is tiled over the candidates, ``predict_ahead(shared_context=True)``) and scores the last predicted step
against the goal frame's slots, as DINO-WM's ``objective.mode: last`` and C-JEPA's criterion do:

* ``matched_slot_cost``: the alive object slots of the prediction and of the goal are put in correspondence by
  entropic optimal transport (log-domain Sinkhorn, ``hclsm.nn.matching``; uniform marginals, so the two sets may
  differ in size), and the cost is the transport-weighted squared distance between
  ``[unit-norm slot; position_weight * position]`` vectors. The background slot is left out: it is the scene,
  not an object.
* a proprioception term: the squared distance between the last commanded agent target and the goal's agent
  position, in units of the action box's half-width (for PushT the action is the agent's absolute target, so
  this is the agent part of the goal).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from hclsm.nn.matching import pairwise_cost, sinkhorn


@dataclass
class SlotSet:
    """The objects of one frame: slots (K, d), positions (K, 2) in [-1, 1], alive (K,) bool."""

    slots: torch.Tensor
    positions: torch.Tensor
    alive: torch.Tensor
    has_background: bool = True

    def objects(self) -> torch.Tensor:
        """Indices of the alive object slots (background excluded)."""
        alive = self.alive.clone()
        if self.has_background:
            alive[0] = False
        return alive.nonzero().flatten()


def slot_features(slots: torch.Tensor, positions: torch.Tensor, position_weight: float) -> torch.Tensor:
    """(..., K, d + 2): unit-norm slot content beside the weighted position."""
    return torch.cat([F.normalize(slots.float(), dim=-1), position_weight * positions.float()], dim=-1)


def matched_slot_cost(slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, goal: SlotSet,
                      position_weight: float = 2.0, epsilon: float = 0.05) -> torch.Tensor:
    """Cost (N,) of N predicted slot sets, slots (N, K, d) and positions (N, K, 2) with the alive flags (K,) they
    share, against ``goal``: the optimal-transport-matched squared feature distance (see the module docstring)."""
    pred = SlotSet(slots[0], positions[0], alive, goal.has_background).objects()
    tgt = goal.objects()
    if len(pred) == 0 or len(tgt) == 0:  # nothing to compare: every candidate is equally good
        return slots.new_zeros(slots.shape[0], dtype=torch.float32)
    a = slot_features(slots[:, pred], positions[:, pred], position_weight)  # (N, Kp, d + 2)
    b = slot_features(goal.slots[tgt], goal.positions[tgt], position_weight)  # (Kg, d + 2)
    cost = pairwise_cost(a, b[None].expand(a.shape[0], -1, -1))  # (N, Kp, Kg)
    plan = sinkhorn(cost, epsilon)  # (N, Kp, Kg), total mass 1
    return (plan * cost).sum((1, 2))


class WorldModelCost:
    """``cost(actions (N, H, A)) -> (N,)`` for a model with ``predict_ahead`` (HCLSM's latent rollout).

    ``context`` is the object decomposition of the C most recent frames (batch 1: slots (1, C, K, d), positions,
    alive), ``past_actions`` (C - 1, A) the actions taken between them, ``goal`` the goal frame's slots and
    ``goal_action`` (A,) the action that corresponds to the goal's proprioception (PushT: the goal's agent
    position; None = no proprioception term)."""

    def __init__(self, model, context, past_actions: torch.Tensor, goal: SlotSet, goal_action: torch.Tensor | None
                 = None, action_scale: torch.Tensor | float = 1.0, position_weight: float = 2.0,
                 proprio_weight: float = 1.0):
        self.model = model
        # only the slots alive on some context frame are rolled out: a slot dead throughout reaches no other slot
        # (every channel between objects skips dead ones) and is no object of the cost, so leaving it out gives the
        # same costs at a fraction of the work (the tiny model has 8 slots; a PushT scene uses 3)
        keep = context.alive[0].any(0)  # (K,)
        self.slots, self.positions = context.slots[0][:, keep], context.positions[0][:, keep]  # (C, K', d), (C, K', 2)
        self.gate = context.alive[0][:, keep].float()  # (C, K')
        self.alive = context.alive[0, -1][keep]  # (K',): the rollout keeps the last context frame's slots
        self.past = torch.as_tensor(past_actions, dtype=torch.float32)  # (C - 1, A)
        if self.past.dim() != 2 or self.past.shape[0] != self.slots.shape[0] - 1:
            raise ValueError(f"past_actions must be (context - 1, A) = ({self.slots.shape[0] - 1}, A), got "
                             f"{tuple(self.past.shape)}")
        self.goal, self.goal_action = goal, goal_action
        self.action_scale = torch.as_tensor(action_scale, dtype=torch.float32)
        self.position_weight, self.proprio_weight = position_weight, proprio_weight

    @torch.no_grad()
    def rollout(self, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted slots (N, H, K, d) and positions (N, H, K, 2) of N candidates, in one batched call."""
        n, h, _ = actions.shape
        expand = (n, *self.slots.shape)
        steps = torch.cat([self.past[None].expand(n, -1, -1), actions.float()], dim=1)  # (N, C - 1 + H, A)
        slots, pos, _ = self.model.predict_ahead(self.slots[None].expand(expand),
                                                 self.positions[None].expand(n, *self.positions.shape),
                                                 self.gate[None].expand(n, *self.gate.shape), h, steps,
                                                 shared_context=True)
        return slots, pos

    @torch.no_grad()
    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        slots, pos = self.rollout(actions)
        cost = matched_slot_cost(slots[:, -1], pos[:, -1], self.alive, self.goal, self.position_weight)
        return cost + proprio_cost(actions, self.goal_action, self.action_scale, self.proprio_weight)


def proprio_cost(actions: torch.Tensor, goal_action: torch.Tensor | None, scale: torch.Tensor | float,
                 weight: float) -> torch.Tensor:
    """(N,) ``weight`` x the squared distance between each candidate's last action (N, H, A) and ``goal_action``
    (A,), in units of ``scale`` (the action box's half-width); 0 without a goal action or weight."""
    if goal_action is None or weight <= 0:
        return actions.new_zeros(actions.shape[0], dtype=torch.float32)
    diff = (actions[:, -1].float() - goal_action.float()) / torch.as_tensor(scale, dtype=torch.float32)
    return weight * diff.pow(2).sum(-1)


class LatentCost:
    """``cost(actions (N, H, A)) -> (N,)`` for a flat world model (one latent per frame, ``FlatSSM``): the squared
    distance between each candidate's last predicted latent and the goal frame's latent (DINO-WM's objective, on
    one vector instead of patch features), plus the same proprioception term as ``WorldModelCost``.

    ``context`` (1, C, d) are the latents of the C most recent frames, ``past_actions`` (C - 1, A) the actions
    between them, ``goal`` (d,) the goal frame's latent."""

    def __init__(self, model, context: torch.Tensor, past_actions: torch.Tensor, goal: torch.Tensor,
                 goal_action: torch.Tensor | None = None, action_scale: torch.Tensor | float = 1.0,
                 proprio_weight: float = 1.0):
        self.model, self.context, self.goal = model, context[0], goal  # (C, d), (d,)
        self.past = torch.as_tensor(past_actions, dtype=torch.float32)  # (C - 1, A)
        if self.past.dim() != 2 or self.past.shape[0] != self.context.shape[0] - 1:
            raise ValueError(f"past_actions must be (context - 1, A) = ({self.context.shape[0] - 1}, A), got "
                             f"{tuple(self.past.shape)}")
        self.goal_action, self.action_scale, self.proprio_weight = goal_action, action_scale, proprio_weight

    @torch.no_grad()
    def __call__(self, actions: torch.Tensor) -> torch.Tensor:
        n, h, _ = actions.shape
        steps = torch.cat([self.past[None].expand(n, -1, -1), actions.float()], dim=1)  # (N, C - 1 + H, A)
        pred = self.model.predict_latents(self.context[None].expand(n, -1, -1), h, steps, shared_context=True)
        cost = (pred[:, -1].float() - self.goal.float()).pow(2).mean(-1)  # (N,)
        return cost + proprio_cost(actions, self.goal_action, self.action_scale, self.proprio_weight)
