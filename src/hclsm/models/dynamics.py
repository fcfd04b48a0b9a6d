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

**Causal graph** (``model.causal.enabled``, seed Layer 4): a ``CausalGraph`` infers from the object tokens
so far which object may affect which (``A[i, j]``: i reads j), and then every channel between objects reads
only along it: the GNN's messages are gated by A; the global track, the event detector and L2 run per
object on its *view* (the mean over itself and its parents); each object has its own event gate, and its
L1 attention reaches only its own and its parents' past at its own events. So the prediction loss decides
which edges exist, and an object without children affects no other object. ``DynamicsOutput.events`` is
then the scene's summary (an event when any object has one) and ``object_events`` holds the per-object
gates. Without the graph the scene mean is shared by all objects and there is one event gate per step.

**Memory** (``model.memory.enabled``, seed Layer 5): after the GNN, each object's L0 state reads an episodic
modern-Hopfield memory of the object states of the earlier steps and adds what it retrieved; then the step's
novel states are written (``hclsm.nn.memory``). Everything above L0 (the events, L1, L2, the head) sees the
states with the memory read in. With the causal graph an object reads only its own and its parents' entries.

``forward`` runs a whole sequence; ``init_state`` / ``step`` run one step at a time for rollouts (the SSMs
carry O(1) state; L1/L2 keep the history of their inputs and compute only the newest step), and equal
``forward`` on the same inputs (tested).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from hclsm.config.model import ModelConfig
from hclsm.nn.causal import CausalGraph, GraphOutput
from hclsm.nn.events import EventDetector, EventOutput, EventTransformer
from hclsm.nn.gnn import RelationGNN
from hclsm.nn.goals import GoalCompressor
from hclsm.nn.memory import HopfieldMemory, MemoryState
from hclsm.nn.ssm import SSMState, SSMStack


@dataclass
class DynamicsOutput:
    """Predictions made at each step t for step t + 1."""

    slots: torch.Tensor  # (B, T, K, d_slot)
    positions: torch.Tensor  # (B, T, K, 2)
    events: EventOutput  # per step: event probability and gate (B, T)
    pooled: torch.Tensor  # (B, T, d_slot) alive-mean of the L0 object states (the event detector's input)
    graph: GraphOutput | None = None  # the causal graph of every step (model.causal.enabled)
    # with the graph: each object's events, objects folded into the batch (B * K, T), and the detector's
    # input (each object's view of the L0 states, (B * K, T, d_slot))
    object_events: EventOutput | None = None
    views: torch.Tensor | None = None


@dataclass
class DynamicsState:
    """What ``step`` carries between steps: the SSM states and the history L1/L2 read."""

    global_ssm: list[SSMState]
    object_ssm: list[SSMState]
    positions: torch.Tensor | None  # (B, K, 2) the previous step's positions (None before the first step)
    h0: torch.Tensor  # (B, t, K, d) L0 object states so far
    alive: torch.Tensor  # (B, t, K) their alive gates
    pooled: torch.Tensor  # (B, t, d)
    tokens: torch.Tensor  # (B, t, K, d) the input tokens so far (the causal graph's input)
    adjacency: torch.Tensor | None  # (B, t, K, K) the causal graph so far
    views: torch.Tensor | None  # (B, t, K, d) each object's view of its own and its parents' L0 states
    noise: torch.Tensor | None  # (B, 1, K, K) the causal graph's sampling noise for this rollout (training)
    memory: MemoryState | None = None  # the episodic memory of this rollout (model.memory.enabled)


def tile_batch(state, n: int):
    """A rollout state of batch 1 (``DynamicsState`` or any of its parts) repeated for ``n`` sequences: every
    tensor is tiled along its first dimension, which is the batch, or batch x objects for the per-object SSM
    states (with a batch of 1 both tile the same way). Used to share a context run once among candidates."""
    if isinstance(state, torch.Tensor):
        return state.repeat(n, *([1] * (state.dim() - 1)))
    if isinstance(state, (list, tuple)):
        return type(state)(tile_batch(x, n) for x in state)
    if dataclasses.is_dataclass(state):
        return dataclasses.replace(state, **{f.name: tile_batch(getattr(state, f.name), n)
                                             for f in dataclasses.fields(state)})
    return state


def masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (..., K, d) over K weighted by ``weight`` (..., K); zero when no weight."""
    w = weight.to(x.dtype)[..., None]
    return (x * w).sum(-2) / w.sum(-2).clamp_min(1.0)


def parent_views(x: torch.Tensor, alive: torch.Tensor, adjacency: torch.Tensor) -> torch.Tensor:
    """Each object's view of the scene through the causal graph: the alive-weighted mean of ``x`` (..., K, d)
    over the object itself and its parents (``adjacency`` (..., K, K) [receiver, sender]) -> (..., K, d)."""
    a = alive.to(x.dtype)
    w = adjacency.to(x.dtype) * a[..., None, :] + torch.diag_embed(a)  # (..., K, K)
    return (w @ x) / w.sum(-1, keepdim=True).clamp_min(1.0)


def fold(x: torch.Tensor) -> torch.Tensor:
    """(B, T, K, ...) -> (B * K, T, ...): every object's own sequence, objects folded into the batch."""
    return x.transpose(1, 2).flatten(0, 1)


def unfold(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``fold``: (B * K, T, ...) -> (B, T, K, ...)."""
    return x.unflatten(0, (-1, k)).transpose(1, 2)


def scene_events(own: EventOutput, k: int) -> EventOutput:
    """Per-object events (B * K, T) -> the scene's (B, T): an event when any object has one."""
    def most(x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(0, (-1, k)).amax(1)

    return EventOutput(most(own.logit), most(own.prob), most(own.gate), own.threshold)


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
        self.graph = CausalGraph(d, cfg.gnn.d_edge, cfg.causal) if cfg.causal.enabled else None
        self.memory = HopfieldMemory(d, cfg.memory) if cfg.memory.enabled else None
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

    def _upper(self, h0: torch.Tensor, alive: torch.Tensor, views: torch.Tensor, gate: torch.Tensor,
               adjacency: torch.Tensor | None, last: bool) -> torch.Tensor:
        """L1 and L2 on top of the L0 states (B, T, K, d): all steps, or only the newest (``last``).

        Without a graph ``views`` is the scene mean (B, T, d) and ``gate`` the scene's events (B, T). With one,
        ``views`` are the objects' views (B, T, K, d) and ``gate`` their own events (B, T, K): L1 runs once per
        object (its events, its row of the graph) and L2 on each object's view."""
        k = h0.shape[2]
        if adjacency is None:
            if last:
                l1 = self.l1.forward_last(h0, gate, alive)[:, None]  # (B, 1, K, d)
                l2 = self.l2.to_slot(self.l2.forward_last(views, gate)[:, None])[:, :, None]  # (B, 1, 1, d)
            else:
                l1 = self.l1(h0, gate, alive)
                l2 = self.l2.to_slot(self.l2(views, gate))[:, :, None]  # (B, T, 1, d)
        else:  # object i's pass reads every object's states, keeps its own output row
            own = fold(gate)  # (B * K, T)
            states, alive_r, adj_r = (x.repeat_interleave(k, 0) for x in (h0, alive, adjacency))
            if last:
                l1 = self.l1.forward_last(states, own, alive_r, adj_r)  # (B * K, K, d)
                l1 = l1.unflatten(0, (-1, k)).diagonal(dim1=1, dim2=2).transpose(1, 2)[:, None]  # (B, 1, K, d)
                l2 = unfold(self.l2.to_slot(self.l2.forward_last(fold(views), own))[:, None], k)  # (B, 1, K, d)
            else:
                l1 = self.l1(states, own, alive_r, adj_r)  # (B * K, T, K, d)
                l1 = l1.unflatten(0, (-1, k)).diagonal(dim1=1, dim2=3).permute(0, 1, 3, 2)  # (B, T, K, d)
                l2 = unfold(self.l2.to_slot(self.l2(fold(views), own)), k)  # (B, T, K, d)
        if last:
            h0 = h0[:, -1:]
        h = h0 + torch.sigmoid(self.gate1(torch.cat([h0, l1], dim=-1))) * l1
        l2 = l2.expand_as(h)
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
        graph = None if self.graph is None else self.graph(x, alive)
        adjacency = None if graph is None else graph.adjacency  # (B, T, K, K)
        if adjacency is None:
            x = x + self.condition(self.global_ssm(masked_mean(x, alive)))[:, :, None]  # (B, T, d) track
        else:
            x = x + self.condition(unfold(self.global_ssm(fold(parent_views(x, alive, adjacency))), k))
        h0 = unfold(self.object_ssm(fold(x)), k)
        gate = None if adjacency is None else adjacency.flatten(0, 1)
        h0 = self.gnn(h0.flatten(0, 1), alive.flatten(0, 1), gate).reshape(b, t, k, d)
        if self.memory is not None:  # each step reads what the steps before it wrote
            h0 = self.memory(h0, alive, adjacency)
        pooled = masked_mean(h0, alive)
        if adjacency is None:
            events = self.detector(pooled)
            h = self._upper(h0, alive, pooled, events.gate, None, last=False)
            return DynamicsOutput(*self._predict(h, slots, positions, velocity), events, pooled)
        views = parent_views(h0, alive, adjacency)  # (B, T, K, d)
        own = self.detector(fold(views))  # (B * K, T)
        h = self._upper(h0, alive, views, unfold(own.gate, k), adjacency, last=False)
        return DynamicsOutput(*self._predict(h, slots, positions, velocity), scene_events(own, k), pooled, graph, own,
                              fold(views))

    def init_state(self, batch: int, num_slots: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> DynamicsState:
        d = self.in_proj.out_features
        tracks = batch if self.graph is None else batch * num_slots  # the global track runs per object with a graph
        causal = None if self.graph is None else torch.zeros(batch, 0, num_slots, num_slots, device=device, dtype=dtype)
        views = None if self.graph is None else torch.zeros(batch, 0, num_slots, d, device=device, dtype=dtype)
        noise = self.graph.noise(batch, num_slots, device) if self.graph is not None and self.training else None
        memory = None if self.memory is None else self.memory.init_state(batch, device, dtype)
        return DynamicsState(self.global_ssm.init_state(tracks, device, dtype),
                             self.object_ssm.init_state(batch * num_slots, device, dtype), None,
                             torch.zeros(batch, 0, num_slots, d, device=device, dtype=dtype),
                             torch.zeros(batch, 0, num_slots, device=device, dtype=dtype),
                             torch.zeros(batch, 0, d, device=device, dtype=dtype),
                             torch.zeros(batch, 0, num_slots, d, device=device, dtype=dtype), causal, views, noise,
                             memory)

    def step(self, slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
             action: torch.Tensor | None, state: DynamicsState
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicsState]:
        """One step: slots (B, K, d), positions (B, K, 2), alive (B, K), action (B, A) ->
        (next slots, next positions, the scene's event gate (B,), new state)."""
        b, k, d = slots.shape
        alive = alive.to(slots.dtype)
        velocity = torch.zeros_like(positions) if state.positions is None else positions - state.positions
        x = self._tokens(slots, positions, velocity, action)  # (B, K, d)
        hist_x = torch.cat([state.tokens, x[:, None]], dim=1)
        hist_alive = torch.cat([state.alive, alive[:, None]], dim=1)
        adjacency, hist_adj, hist_views = None, None, None
        if self.graph is not None:  # the graph's evidence is a running mean: recomputed over the history
            # (a rollout samples its graph, in training, with one noise draw at the current temperature)
            adjacency = self.graph(hist_x, hist_alive, noise=state.noise).adjacency[:, -1]  # (B, K, K)
            hist_adj = torch.cat([state.adjacency, adjacency[:, None]], dim=1)
            g, gs = self.global_ssm.step(parent_views(x, alive, adjacency).reshape(b * k, d), state.global_ssm)
            x = x + self.condition(g).reshape(b, k, d)
        else:
            g, gs = self.global_ssm.step(masked_mean(x, alive), state.global_ssm)
            x = x + self.condition(g)[:, None]
        h0, os_ = self.object_ssm.step(x.reshape(b * k, d), state.object_ssm)
        h0 = self.gnn(h0.reshape(b, k, d), alive, adjacency)
        memory = state.memory
        if self.memory is not None:
            h0, memory = self.memory.step(h0, alive, memory, adjacency)
        hist_h0 = torch.cat([state.h0, h0[:, None]], dim=1)
        hist_pooled = torch.cat([state.pooled, masked_mean(h0, alive)[:, None]], dim=1)
        if adjacency is None:
            events = self.detector(hist_pooled)
            h = self._upper(hist_h0, hist_alive, hist_pooled, events.gate, None, last=True)[:, 0]
        else:
            hist_views = torch.cat([state.views, parent_views(h0, alive, adjacency)[:, None]], dim=1)
            own = self.detector(fold(hist_views))  # (B * K, t)
            events = scene_events(own, k)
            h = self._upper(hist_h0, hist_alive, hist_views, unfold(own.gate, k), hist_adj, last=True)[:, 0]
        next_slots, next_pos = self._predict(h, slots, positions, velocity)
        new_state = DynamicsState(gs, os_, positions, hist_h0, hist_alive, hist_pooled, hist_x, hist_adj, hist_views,
                                  state.noise, memory)
        return next_slots, next_pos, events.gate[:, -1], new_state
