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
  followed by the relation GNN among the objects of each step (with ``model.gnn.relative_geometry`` its edges
  also read each pair's relative position, velocity and distance).
* **L1**: the event detector fires on steps where the scene changes abruptly (trained on the L0
  prediction error: a surprise signal); the sparse event transformer lets each object read the object
  states of past event steps.
* **L2**: learned summary queries compress the past events into goal-level tokens, broadcast to objects.
* **Hierarchy**: ``h = h0 + g1 * l1`` then ``h + g2 * l2``, with gates ``sigmoid(Linear([h; level]))``
  learned per level and per channel.
* **Head**: the next slot as a residual on the current one; the next position as the current one moved by
  its velocity plus a learned correction (a constant-velocity prior: the head learns the acceleration, e.g.
  bounces and collisions, not the motion itself). ``model.dynamics.velocity_prior`` scales the velocity term:
  0 suits quasi-static scenes (PushT), where an object not pushed stays put.

**Causal graph** (``model.causal.enabled``, seed Layer 4): a ``CausalGraph`` infers from the object tokens
so far which object may affect which (``A[i, j]``: i reads j), and then every channel between objects reads
only along it: the GNN's messages are gated by A; the global track, the event detector and L2 run per
object on its *view* (the mean over itself and its parents); each object has its own event gate, and its
L1 attention reaches only its own and its parents' past at its own events. So the prediction loss decides
which edges exist, and an object without children affects no other object. ``DynamicsOutput.events`` is
then the scene's summary (an event when any object has one) and ``object_events`` holds the per-object
gates. Without the graph the scene mean is shared by all objects and there is one event gate per step.

With ``model.causal.inference=episode`` the graph is a ``DynamicsEpisodeGraph`` (``hclsm.nn.graph_inference``):
the episode-graph encoder's pair evidence (object tokens, positions in px, their first and second differences)
pooled over the history so far, so at the end of a context it is the one graph that context infers; relaxed gates
(a per-pair gradient), and a contact channel: the GNN's messages also pass between pairs about to touch
(``model.causal.episode.contact_reach``), whatever the graph.

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
from hclsm.nn.actions import ActionEmbedding
from hclsm.nn.causal import CausalGraph, GraphOutput, GraphState
from hclsm.nn.graph_inference import DynamicsEpisodeGraph, EpisodeGraphState
from hclsm.nn.events import DetectorState, EventDetector, EventMemory, EventOutput, EventTransformer
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
    """What ``step`` carries between steps, O(1) in the history's length: the SSM states, the event detector's
    recent inputs, the most recent event steps (``EventMemory``), the causal graph's evidence and the memory."""

    global_ssm: list[SSMState]
    object_ssm: list[SSMState]
    positions: torch.Tensor | None  # (B, K, 2) the previous step's positions (None before the first step)
    detector: DetectorState  # the event detector's recent inputs (R rows: the batch, or batch x objects)
    events: EventMemory  # the most recent event steps, what L1 and L2 read
    t: int = 0  # steps run so far (the index of the next one)
    graph: GraphState | EpisodeGraphState | None = None  # the causal graph's evidence so far (model.causal.enabled)
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


def gnn_gate(graph: GraphOutput) -> torch.Tensor:
    """What gates the GNN's messages: the graph, opened for the pairs about to touch when it has a contact channel
    (collisions need a message between every close pair, so the graph is only about influence at a distance)."""
    return graph.adjacency if graph.contact is None else torch.maximum(graph.adjacency, graph.contact)


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
        self.background = cfg.slots.background  # slot 0 is the scene: carried unchanged (``_predict``)
        self.velocity_prior = cfg.dynamics.velocity_prior
        self.in_proj = nn.Linear(d + 4, d)
        self.action = ActionEmbedding(cfg.d_action, d, cfg.action_scale) if cfg.d_action > 0 else None
        self.global_ssm = SSMStack(d, l0.blocks, l0.d_state, l0.d_conv, l0.expand)
        self.condition = nn.Linear(d, d)
        self.object_ssm = SSMStack(d, l0.blocks, l0.d_state, l0.d_conv, l0.expand)
        self.gnn = RelationGNN(d, cfg.gnn)
        self.graph = None if not cfg.causal.enabled else CausalGraph(d, cfg.gnn.d_edge, cfg.causal) \
            if cfg.causal.inference == "step" else DynamicsEpisodeGraph(d, cfg.causal.episode, 2,
                                                                       cfg.perception.image_size / 2)
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
            x = x + self.action(action).to(x.dtype)[..., None, :]
        return x

    def _levels(self, h0: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
        """The hierarchy: ``h = h0 + g1 * l1``, then ``h + g2 * l2``, with learned per-channel gates."""
        h = h0 + torch.sigmoid(self.gate1(torch.cat([h0, l1], dim=-1))) * l1
        l2 = l2.expand_as(h)
        return h + torch.sigmoid(self.gate2(torch.cat([h, l2], dim=-1))) * l2

    def _upper(self, h0: torch.Tensor, alive: torch.Tensor, views: torch.Tensor, gate: torch.Tensor,
               adjacency: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """L1 and L2 on top of the L0 states (B, T, K, d) of every step, and L1's block inputs (per event stream).

        Without a graph ``views`` is the scene mean (B, T, d) and ``gate`` the scene's events (B, T). With one,
        ``views`` are the objects' views (B, T, K, d) and ``gate`` their own events (B, T, K): L1 runs once per
        object (its events, its row of the graph) and L2 on each object's view."""
        k = h0.shape[2]
        if adjacency is None:
            l1, layers = self.l1(h0, gate, alive, return_layers=True)
            l2 = self.l2.to_slot(self.l2(views, gate))[:, :, None]  # (B, T, 1, d)
        else:  # object i's pass reads every object's states, keeps its own output row
            own = fold(gate)  # (B * K, T)
            states, alive_r, adj_r = (x.repeat_interleave(k, 0) for x in (h0, alive, adjacency))
            l1, layers = self.l1(states, own, alive_r, adj_r, return_layers=True)  # (B * K, T, K, d)
            l1 = l1.unflatten(0, (-1, k)).diagonal(dim1=1, dim2=3).permute(0, 1, 3, 2)  # (B, T, K, d)
            l2 = unfold(self.l2.to_slot(self.l2(fold(views), own)), k)  # (B, T, K, d)
        return self._levels(h0, l1, l2), layers

    def _predict(self, h: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, velocity: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next slots and positions (..., K, d), (..., K, 2): a residual on each object's slot, its position moved
        by its velocity plus a correction. The background slot (index 0, ``model.slots.background``) is the static
        scene, not an object: it is carried unchanged. No loss scores its prediction (the prediction losses are over
        object slots), so a predicted background would drift freely in an open-loop rollout, and its decoded layer
        (a constant and an alpha logit read from the slot) with it: measured on PushT, the background slot's
        content drifted within 10 rollout steps until the background hid the objects (rollout pixel error 1.4-1.6x
        copy-last)."""
        delta = self.head(h)
        d = slots.shape[-1]
        nxt = slots + delta[..., :d].to(slots.dtype)
        pos = positions + self.velocity_prior * velocity + delta[..., d:].to(positions.dtype)
        if self.background:
            nxt = torch.cat([slots[..., :1, :], nxt[..., 1:, :]], dim=-2)
            pos = torch.cat([positions[..., :1, :], pos[..., 1:, :]], dim=-2)
        return nxt, pos

    def forward(self, slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                action: torch.Tensor | None = None, return_state: bool = False):
        """slots (B, T, K, d), positions (B, T, K, 2), alive (B, T, K) float/bool, action (B, T, A) -> the
        predictions of every step. With ``return_state`` also the ``DynamicsState`` after the last step, from which
        ``step`` continues exactly (a rollout's context run as one sequence instead of step by step)."""
        b, t, k, d = slots.shape
        alive = alive.to(slots.dtype)
        velocity = torch.cat([torch.zeros_like(positions[:, :1]), positions[:, 1:] - positions[:, :-1]], dim=1)
        x = self._tokens(slots, positions, velocity, action)  # (B, T, K, d)
        graph, graph_state = None, None
        if isinstance(self.graph, DynamicsEpisodeGraph):
            graph, graph_state = self.graph(x, positions, alive, return_state=True)
        elif self.graph is not None:
            graph, graph_state = self.graph(x, alive, return_state=True)
        adjacency = None if graph is None else graph.adjacency  # (B, T, K, K)
        track = masked_mean(x, alive) if adjacency is None else fold(parent_views(x, alive, adjacency))
        track, global_state = self.global_ssm(track, return_state=True)  # (B, T, d) or (B * K, T, d)
        x = x + self.condition(track[:, :, None] if adjacency is None else unfold(track, k))
        h0, object_state = self.object_ssm(fold(x), return_state=True)
        h0 = unfold(h0, k)
        gate = None if adjacency is None else gnn_gate(graph).flatten(0, 1)
        geometry = (positions.flatten(0, 1), velocity.flatten(0, 1)) if self.gnn.relative_geometry else None
        h0 = self.gnn(h0.flatten(0, 1), alive.flatten(0, 1), gate, geometry=geometry).reshape(b, t, k, d)
        memory = None
        if self.memory is not None:  # each step reads what the steps before it wrote
            h0, memory = self.memory(h0, alive, adjacency, return_state=True)
        pooled = masked_mean(h0, alive)
        if adjacency is None:
            summary = pooled  # the detector's (and L2's) input, one row per event stream
            stream, detector = self.detector(pooled, return_state=True)
            events = stream
            h, layers = self._upper(h0, alive, pooled, events.gate, None)
            out = DynamicsOutput(*self._predict(h, slots, positions, velocity), events, pooled)
        else:
            views = parent_views(h0, alive, adjacency)  # (B, T, K, d)
            summary = fold(views)  # (B * K, T, d)
            stream, detector = self.detector(summary, return_state=True)  # (B * K, T) each object's own events
            h, layers = self._upper(h0, alive, views, unfold(stream.gate, k), adjacency)
            out = DynamicsOutput(*self._predict(h, slots, positions, velocity), scene_events(stream, k), pooled, graph,
                                 stream, summary)
        if not return_state:
            return out
        rows_alive = alive if adjacency is None else alive.repeat_interleave(k, 0)
        events = EventMemory.recent(stream.gate, self.event_capacity, layers, self.l2.proj_in(summary), rows_alive)
        state = DynamicsState(global_state, object_state, positions[:, -1], detector, events, t, graph_state, memory)
        return out, state

    @property
    def event_capacity(self) -> int:
        """Event steps a rollout keeps: as many as L1 or L2 read."""
        return max(self.l1.max_events, self.l2.max_events)

    def init_state(self, batch: int, num_slots: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> DynamicsState:
        d, k = self.in_proj.out_features, num_slots
        rows = batch if self.graph is None else batch * k  # event streams (and global tracks): per object with a graph
        return DynamicsState(self.global_ssm.init_state(rows, device, dtype),
                             self.object_ssm.init_state(batch * k, device, dtype), None,
                             self.detector.init_state(rows, device, dtype),
                             EventMemory.empty(rows, self.event_capacity, k, self.l1.proj_in.out_features,
                                               len(self.l1.blocks), self.l2.proj_in.out_features, True, device, dtype),
                             0, None if self.graph is None else self.graph.init_state(batch, k, d, device, dtype),
                             None if self.memory is None else self.memory.init_state(batch, device, dtype))

    def step(self, slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
             action: torch.Tensor | None, state: DynamicsState
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicsState]:
        """One step: slots (B, K, d), positions (B, K, 2), alive (B, K), action (B, A) -> (next slots, next
        positions, the scene's event gate (B,), new state). Its cost does not depend on how many steps came before:
        the state holds the detector's last inputs, the last ``event_capacity`` events and running sums."""
        b, k, d = slots.shape
        alive = alive.to(slots.dtype)
        velocity = torch.zeros_like(positions) if state.positions is None else positions - state.positions
        x = self._tokens(slots, positions, velocity, action)  # (B, K, d)
        adjacency, graph_state = None, None
        episode = None  # the episode graph's output of this step (B, K, K)
        if isinstance(self.graph, DynamicsEpisodeGraph):
            episode, graph_state = self.graph.step(x, positions, alive, state.graph)
            adjacency = episode.adjacency
        elif self.graph is not None:  # the graph's evidence is a running sum (one noise draw per rollout in training)
            adjacency, graph_state = self.graph.step(x, alive, state.graph)  # (B, K, K)
        if adjacency is not None:
            g, gs = self.global_ssm.step(parent_views(x, alive, adjacency).reshape(b * k, d), state.global_ssm)
            x = x + self.condition(g).reshape(b, k, d)
        else:
            g, gs = self.global_ssm.step(masked_mean(x, alive), state.global_ssm)
            x = x + self.condition(g)[:, None]
        h0, os_ = self.object_ssm.step(x.reshape(b * k, d), state.object_ssm)
        h0 = self.gnn(h0.reshape(b, k, d), alive, adjacency if episode is None else gnn_gate(episode),
                      geometry=(positions, velocity) if self.gnn.relative_geometry else None)
        memory = state.memory
        if self.memory is not None:
            h0, memory = self.memory.step(h0, alive, memory, adjacency)
        if adjacency is None:
            summary, states, rows_alive, graph = masked_mean(h0, alive), h0, alive, None  # (B, d) ...
        else:  # one row per object: its view, every object's states, the whole graph
            summary = parent_views(h0, alive, adjacency).reshape(b * k, d)
            states, rows_alive, graph = (x.repeat_interleave(k, 0) for x in (h0, alive, adjacency))
        stream, detector = self.detector.step(summary, state.detector)
        gate = stream.gate  # (R,) this step's event gate
        time = torch.full((summary.shape[0],), state.t, dtype=torch.long, device=summary.device)
        l1, l1_keys = self.l1.step(states, gate, rows_alive, graph, time, state.events)  # (R, K, d)
        l2, l2_key = self.l2.step(summary, gate, time, state.events)  # (R, n_summary, d2)
        l2 = self.l2.to_slot(l2)  # (R, d)
        events = state.events.push(l1_keys, l2_key, rows_alive, gate, time)
        if adjacency is None:
            scene_gate, l2 = gate, l2[:, None]
        else:  # object i keeps its own row of its own pass
            scene_gate = gate.unflatten(0, (b, k)).amax(1)
            l1, l2 = l1.unflatten(0, (b, k)).diagonal(dim1=1, dim2=2).transpose(1, 2), l2.reshape(b, k, d)
        h = self._levels(h0, l1, l2)
        next_slots, next_pos = self._predict(h, slots, positions, velocity)
        new_state = DynamicsState(gs, os_, positions, detector, events, state.t + 1, graph_state, memory)
        return next_slots, next_pos, scene_gate, new_state
