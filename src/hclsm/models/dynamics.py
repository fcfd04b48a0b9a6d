"""HCLSM's hierarchical dynamics (seed Layer 3): how object slots evolve, at three timescales.

Input per clip: object slots (B, T, K, d_slot), their positions (B, T, K, 2), the alive gate (B, T, K)
and optionally actions (B, T, A). Output at step t is the prediction of step t + 1, reading steps <= t
only (every level is causal in time; tested by perturbing the future).

* **Input**: each object's token is ``in_proj([slot; position; velocity])`` (velocity = the position's
  change since the previous step, 0 on the first) plus the embedded action of step t (the action taken
  between t and t + 1).
* **Global track**: an SSM stack over the alive-mean of the object tokens; its output is projected and
  added to every object's token, so each object knows the scene's state.
* **L0**: a selective SSM stack run per object with shared weights (objects folded into the batch),
  followed by the relation GNN among the objects of each step.
* **L1**: the event detector fires on steps where the scene changes abruptly (trained on the L0
  prediction error: a surprise signal); the sparse event transformer lets each object read the object
  states of past event steps.
* **L2**: learned summary queries compress the past events into goal-level tokens, broadcast to objects.
* **Hierarchy**: ``h = h0 + g1 * l1`` then ``h + g2 * l2``, with gates ``sigmoid(Linear([h; level]))``
  learned per level and per channel.
* **Head**: the next slot as a residual on the current one; the next position as the current one moved by
  its velocity plus a learned correction (a constant-velocity prior: the head learns the acceleration, e.g.
  bounces and collisions, not the motion itself).

``forward`` runs a whole sequence; ``init_state`` / ``step`` run one step at a time for rollouts (the SSMs
carry O(1) state; L1/L2 keep the history of their inputs and compute only the newest step), and equal
``forward`` on the same inputs (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hclsm.config.model import ModelConfig
from hclsm.nn.events import EventDetector, EventOutput, EventTransformer
from hclsm.nn.gnn import RelationGNN
from hclsm.nn.goals import GoalCompressor
from hclsm.nn.ssm import SSMState, SSMStack


@dataclass
class DynamicsOutput:
    """Predictions made at each step t for step t + 1."""

    slots: torch.Tensor  # (B, T, K, d_slot)
    positions: torch.Tensor  # (B, T, K, 2)
    events: EventOutput  # per step: event probability and gate (B, T)
    pooled: torch.Tensor  # (B, T, d_slot) alive-mean of the L0 object states (the event detector's input)


@dataclass
class DynamicsState:
    """What ``step`` carries between steps: the SSM states and the history L1/L2 read."""

    global_ssm: list[SSMState]
    object_ssm: list[SSMState]
    positions: torch.Tensor | None  # (B, K, 2) the previous step's positions (None before the first step)
    h0: torch.Tensor  # (B, t, K, d) L0 object states so far
    alive: torch.Tensor  # (B, t, K) their alive gates
    pooled: torch.Tensor  # (B, t, d)


def masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (..., K, d) over K weighted by ``weight`` (..., K); zero when no weight."""
    w = weight.to(x.dtype)[..., None]
    return (x * w).sum(-2) / w.sum(-2).clamp_min(1.0)


class HierarchicalDynamics(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.slots.d_slot
        l0 = cfg.dynamics.l0
        self.in_proj = nn.Linear(d + 4, d)
        self.action = nn.Linear(cfg.d_action, d) if cfg.d_action > 0 else None
        self.global_ssm = SSMStack(d, l0.blocks, l0.d_state, l0.d_conv, l0.expand)
        self.condition = nn.Linear(d, d)
        self.object_ssm = SSMStack(d, l0.blocks, l0.d_state, l0.d_conv, l0.expand)
        self.gnn = RelationGNN(d, cfg.gnn)
        self.detector = EventDetector(d, cfg.dynamics.l1)
        self.l1 = EventTransformer(d, cfg.dynamics.l1)
        self.l2 = GoalCompressor(d, cfg.dynamics.l2)
        self.gate1 = nn.Linear(2 * d, d)
        self.gate2 = nn.Linear(2 * d, d)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d + 2))
        with torch.no_grad():  # start at the prior (content unchanged, constant velocity), then learn the change
            self.head[-1].weight.mul_(0.01)
            self.head[-1].bias.zero_()

    def _tokens(self, slots: torch.Tensor, positions: torch.Tensor, velocity: torch.Tensor,
                action: torch.Tensor | None) -> torch.Tensor:
        x = self.in_proj(torch.cat([slots, positions.to(slots.dtype), velocity.to(slots.dtype)], dim=-1))
        if self.action is not None:
            if action is None:
                raise ValueError("this dynamics model is action-conditioned (model.d_action > 0): pass actions")
            x = x + self.action(action.to(x.dtype))[..., None, :]
        return x

    def _upper(self, h0: torch.Tensor, alive: torch.Tensor, pooled: torch.Tensor, events: EventOutput,
               last: bool) -> torch.Tensor:
        """L1 and L2 on top of the L0 states (B, T, K, d): all steps, or only the newest (``last``)."""
        gate = events.gate
        if last:
            l1 = self.l1.forward_last(h0, gate, alive)[:, None]  # (B, 1, K, d)
            l2 = self.l2.to_slot(self.l2.forward_last(pooled, gate)[:, None])  # (B, 1, d)
            h0 = h0[:, -1:]
        else:
            l1 = self.l1(h0, gate, alive)
            l2 = self.l2.to_slot(self.l2(pooled, gate))
        h = h0 + torch.sigmoid(self.gate1(torch.cat([h0, l1], dim=-1))) * l1
        l2 = l2[:, :, None].expand_as(h)
        return h + torch.sigmoid(self.gate2(torch.cat([h, l2], dim=-1))) * l2

    def _predict(self, h: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, velocity: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self.head(h)
        d = slots.shape[-1]
        return slots + delta[..., :d].to(slots.dtype), positions + velocity + delta[..., d:].to(positions.dtype)

    def forward(self, slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                action: torch.Tensor | None = None) -> DynamicsOutput:
        """slots (B, T, K, d), positions (B, T, K, 2), alive (B, T, K) float/bool, action (B, T, A)."""
        b, t, k, d = slots.shape
        alive = alive.to(slots.dtype)
        velocity = torch.cat([torch.zeros_like(positions[:, :1]), positions[:, 1:] - positions[:, :-1]], dim=1)
        x = self._tokens(slots, positions, velocity, action)  # (B, T, K, d)
        g = self.global_ssm(masked_mean(x, alive))  # (B, T, d)
        x = x + self.condition(g)[:, :, None]
        h0 = self.object_ssm(x.transpose(1, 2).reshape(b * k, t, d)).reshape(b, k, t, d).transpose(1, 2)
        h0 = self.gnn(h0.reshape(b * t, k, d), alive.reshape(b * t, k)).reshape(b, t, k, d)
        pooled = masked_mean(h0, alive)
        events = self.detector(pooled)
        h = self._upper(h0, alive, pooled, events, last=False)
        next_slots, next_pos = self._predict(h, slots, positions, velocity)
        return DynamicsOutput(next_slots, next_pos, events, pooled)

    def init_state(self, batch: int, num_slots: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> DynamicsState:
        d = self.in_proj.out_features
        return DynamicsState(self.global_ssm.init_state(batch, device, dtype),
                             self.object_ssm.init_state(batch * num_slots, device, dtype), None,
                             torch.zeros(batch, 0, num_slots, d, device=device, dtype=dtype),
                             torch.zeros(batch, 0, num_slots, device=device, dtype=dtype),
                             torch.zeros(batch, 0, d, device=device, dtype=dtype))

    def step(self, slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
             action: torch.Tensor | None, state: DynamicsState
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicsState]:
        """One step: slots (B, K, d), positions (B, K, 2), alive (B, K), action (B, A) ->
        (next slots, next positions, event gate (B,), new state)."""
        b, k, d = slots.shape
        alive = alive.to(slots.dtype)
        velocity = torch.zeros_like(positions) if state.positions is None else positions - state.positions
        x = self._tokens(slots, positions, velocity, action)  # (B, K, d)
        g, gs = self.global_ssm.step(masked_mean(x, alive), state.global_ssm)
        x = x + self.condition(g)[:, None]
        h0, os_ = self.object_ssm.step(x.reshape(b * k, d), state.object_ssm)
        h0 = self.gnn(h0.reshape(b, k, d), alive)
        hist_h0 = torch.cat([state.h0, h0[:, None]], dim=1)
        hist_alive = torch.cat([state.alive, alive[:, None]], dim=1)
        hist_pooled = torch.cat([state.pooled, masked_mean(h0, alive)[:, None]], dim=1)
        events = self.detector(hist_pooled)
        h = self._upper(hist_h0, hist_alive, hist_pooled, events, last=True)[:, 0]
        next_slots, next_pos = self._predict(h, slots, positions, velocity)
        new_state = DynamicsState(gs, os_, positions, hist_h0, hist_alive, hist_pooled)
        return next_slots, next_pos, events.gate[:, -1], new_state
