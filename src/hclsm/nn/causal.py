"""Learned causal graph over object slots (seed Layer 4): which object's state may affect which.

``CausalGraph`` infers, for every step t of a clip, an adjacency ``A[b, t, i, j]`` (receiver i, sender j:
1 = object i's next state may read object j's) from the objects' behaviour so far. The graph differs
from scene to scene (a random DAG of forces in the physics scenes), so it is read from the slots'
trajectories, not tied to slot indices::

    a_i(s)     = GELU(Linear([x_i(s); x_i(s) - x_i(s-1)]))                  # object token and its change
    e_ij(s)    = GELU(R a_i(s) + S a_j(s) + P (a_i(s) * a_j(s)) [+ G g_ij(s)])  # pair features at step s
    logit_ij(t) = mean over s <= t (both alive) of score(e_ij(s))           # evidence so far: causal in time

With ``position_dims`` n > 0 (a state whose last n dims are the object's position, as C-JEPA's slots from
our object model) the pair features also read the pair's geometry g_ij: the relative position p_j - p_i,
the relative velocity, the distance and its rate of change (negative while the two approach), which an
MLP over the two tokens could only learn to compute from differences of its own features. The video
model's latent states have no position dims, so its graph reads the tokens alone.

Sampling is a binary Gumbel-softmax: in training ``soft = sigmoid((logit + logistic noise) / tau)``,
one noise draw per clip and pair, with the temperature annealed from ``temperature_init`` to
``temperature_min`` over the graph's first ``anneal_steps`` training steps; the adjacency is hard 0/1 in value with a straight-through gradient
(``hard + soft - soft.detach()``). In evaluation it is ``logit > 0``. The diagonal and pairs with a dead
slot are 0.

The graph is **data-driven**: the dynamics uses it to gate every message between objects (see
``HierarchicalDynamics``), so the prediction loss reaches the logits through the gates and decides
which edges exist. ``losses`` adds the l1 sparsity of the edge probabilities and the NOTEARS acyclicity
``h(A) = tr(exp(A * A)) - K`` (on the probabilities, fp32) under an augmented Lagrangian
``alpha h + rho / 2 h^2``, switched on after ``penalty_start`` graph training steps and ramped in over
``penalty_ramp`` more (``ramp``).

The schedules count the graph's own training steps (buffer ``steps``), not the run's progress: the graph
trains only in stage 2, and in a two-stage run stage 2 starts with every progress-driven schedule of the
object layers finished, so a progress-based anneal would never run. ``after_step`` runs after every
optimizer step that trained the graph (``HCLSM.after_step``), with the step's h averaged over ranks: it
counts the step, and with the penalty on, every ``update_every`` steps ``alpha += rho * mean h`` and
``rho *= rho_mult`` (up to ``rho_max``) when h did not fall below a quarter of its previous mean. The step
count and the multipliers are buffers, so they are checkpointed and a resumed run continues them exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.config.model import CausalConfig


@dataclass
class GraphState:
    """What a rollout's graph carries from step to step: the previous step's object tokens (B, K, d), the
    evidence so far ``sum_s score(e_ij(s)) * pair_ij(s)`` and ``sum_s pair_ij(s)`` (B, K, K), and the clip's
    sampling noise (B, 1, K, K) in training (None in evaluation). O(1) in the history's length."""

    tokens: torch.Tensor
    evidence: torch.Tensor
    pairs: torch.Tensor
    noise: torch.Tensor | None


@dataclass
class GraphOutput:
    """The graph of every step: ``adjacency`` (B, T, K, K) 0/1 in value (straight-through gradient in
    training), ``prob`` the edge probabilities sigmoid(logit) (B, T, K, K), both [receiver, sender] and
    zero on the diagonal and for dead slots; ``logits`` (B, T, K, K). ``contact`` (B, T, K, K): the pairs whose
    messages pass whatever the graph (``hclsm.nn.graph_inference.DynamicsEpisodeGraph``'s contact channel; None
    without one)."""

    adjacency: torch.Tensor
    prob: torch.Tensor
    logits: torch.Tensor
    contact: torch.Tensor | None = None


def pair_geometry(x: torch.Tensor, dx: torch.Tensor, n: int) -> torch.Tensor:
    """(B, T, K, K, 2n + 2) ``[i, j]``: p_j - p_i, v_j - v_i, |p_j - p_i| and d|p_j - p_i|/dt from the last n
    dims of states x and their changes dx (B, T, K, d). Smooth at zero distance (the diagonal)."""
    p, v = x[..., -n:], dx[..., -n:]
    rel = p[:, :, None] - p[:, :, :, None]
    drel = v[:, :, None] - v[:, :, :, None]
    dist = (rel.pow(2).sum(-1, keepdim=True) + 1e-6).sqrt()
    return torch.cat([rel, drel, dist, (rel * drel).sum(-1, keepdim=True) / dist], -1)


def acyclicity(adjacency: torch.Tensor) -> torch.Tensor:
    """NOTEARS ``h(A) = tr(exp(A * A)) - K`` of (..., K, K) non-negative matrices, in fp32: 0 exactly when the
    graph has no directed cycle, and positive otherwise."""
    a = adjacency.float()
    k = a.shape[-1]
    return torch.linalg.matrix_exp(a * a).diagonal(dim1=-2, dim2=-1).sum(-1) - k


class PenaltySchedule(nn.Module):
    """The step-counted schedule of a learned graph's sparsity and acyclicity penalties, shared by ``CausalGraph``
    and the episode graphs (``hclsm.nn.graph_inference``): ``ramp`` switches them on after ``cfg.penalty_start``
    graph training steps, and ``after_step`` updates the NOTEARS augmented Lagrangian's multiplier ``alpha`` and
    weight ``rho`` (buffers: checkpointed with the weights). ``cfg`` has ``rho_init``, ``rho_mult``, ``rho_max``,
    ``update_every``, ``penalty_start`` and ``penalty_ramp``."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("alpha", torch.zeros(()))
        self.register_buffer("rho", torch.tensor(float(cfg.rho_init)))
        self.register_buffer("h_prev", torch.tensor(math.inf))
        self.register_buffer("h_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("h_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # graph training steps so far

    def ramp(self) -> float:
        """Weight of the sparsity and acyclicity terms now: 0 for the first ``penalty_start`` graph training
        steps, then linear to 1 over ``penalty_ramp`` steps. Until then the prediction loss alone shapes the
        graph, so the messages learn what they could carry before edges are pruned (with the penalties on
        from the start, every edge is pruned before any message is worth keeping)."""
        c, step = self.cfg, int(self.steps)
        if step < c.penalty_start:
            return 0.0
        return 1.0 if c.penalty_ramp == 0 else min(1.0, (step - c.penalty_start + 1) / c.penalty_ramp)

    @torch.no_grad()
    def after_step(self, h: float) -> None:
        """After an optimizer step that trained the graph, with its h(A) (the same value on every rank): count
        the step; with the penalty on, every ``update_every`` steps update the multiplier and the penalty
        weight from the mean h of those steps."""
        active = self.ramp() > 0  # the penalty was on in this step's loss (see ``ramp``)
        self.steps += 1
        if not math.isfinite(h) or not active:  # no update while the penalty is off
            return
        self.h_sum += h
        self.h_count += 1
        if int(self.h_count) < self.cfg.update_every:
            return
        mean = float(self.h_sum / self.h_count)
        self.alpha += self.rho * mean
        if mean > 0.25 * float(self.h_prev):
            self.rho.copy_(torch.clamp(self.rho * self.cfg.rho_mult, max=self.cfg.rho_max))
        self.h_prev.fill_(mean)
        self.h_sum.zero_()
        self.h_count.zero_()


class CausalGraph(PenaltySchedule):
    def __init__(self, d: int, d_edge: int, cfg: CausalConfig, position_dims: int = 0):
        super().__init__(cfg)
        if not 0 <= position_dims < d:
            raise ValueError(f"position_dims ({position_dims}) must be in [0, {d}) for states of width {d}")
        self.position_dims = position_dims
        self.inp = nn.Linear(2 * d, d_edge)
        self.recv = nn.Linear(d_edge, d_edge)
        self.send = nn.Linear(d_edge, d_edge, bias=False)
        self.prod = nn.Linear(d_edge, d_edge, bias=False)
        self.score = nn.Linear(d_edge, 1)
        self.geo = nn.Linear(2 * position_dims + 2, d_edge) if position_dims else None  # G: the pair's geometry

    def temperature(self) -> float:
        """Geometric anneal from ``temperature_init`` (step 0) to ``temperature_min`` (``anneal_steps``)."""
        lo, hi = self.cfg.temperature_min, self.cfg.temperature_init
        frac = 1.0 if self.cfg.anneal_steps == 0 else min(int(self.steps) / self.cfg.anneal_steps, 1.0)
        return hi * (lo / hi) ** frac

    def noise(self, batch: int, k: int, device: torch.device | None = None) -> torch.Tensor:
        """One clip's logistic noise per pair, (B, 1, K, K), for training's Gumbel-sigmoid sampling."""
        u = torch.rand(batch, 1, k, k, device=device).clamp(1e-6, 1 - 1e-6)
        return torch.log(u) - torch.log1p(-u)

    def _evidence(self, x: torch.Tensor, dx: torch.Tensor, alive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step pair scores and pair masks (B, T, K, K) of tokens x, their changes dx (B, T, K, d), alive."""
        k = x.shape[2]
        a = F.gelu(self.inp(torch.cat([x, dx], dim=-1)))  # (B, T, K, e)
        e = self.recv(a)[:, :, :, None] + self.send(a)[:, :, None] + self.prod(a[:, :, :, None] * a[:, :, None])
        if self.geo is not None:
            e = e + self.geo(pair_geometry(x, dx, self.position_dims))
        score = self.score(F.gelu(e)).squeeze(-1).float()  # (B, T, K, K)
        alive = alive.float()
        pair = alive[..., :, None] * alive[..., None, :] * (1.0 - torch.eye(k, device=x.device))  # (B, T, K, K)
        return score * pair, pair

    def _sample(self, logits: torch.Tensor, pair: torch.Tensor, noise: torch.Tensor | None) -> GraphOutput:
        prob = torch.sigmoid(logits) * pair
        if self.training:
            soft = torch.sigmoid((logits + noise) / self.temperature())
            adjacency = ((soft > 0.5).float() + (soft - soft.detach())) * pair  # exactly 0/1 in value
        else:
            adjacency = (logits > 0).float() * pair
        return GraphOutput(adjacency, prob, logits)

    def forward(self, x: torch.Tensor, alive: torch.Tensor, noise: torch.Tensor | None = None,
                return_state: bool = False):
        """x (B, T, K, d) object tokens, alive (B, T, K) -> the graph of every step (reads steps <= t). In
        training the edges are sampled with ``noise`` (``self.noise``; drawn when not given). With
        ``return_state`` also the ``GraphState`` that ``step`` continues from."""
        b, t, k, _ = x.shape
        dx = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)
        scored, pair = self._evidence(x, dx, alive)
        evidence, pairs = scored.cumsum(1), pair.cumsum(1)
        if self.training and noise is None:
            noise = self.noise(b, k, x.device)
        out = self._sample(evidence / pairs.clamp_min(1.0), pair, noise)  # mean evidence over steps <= t
        if not return_state:
            return out
        return out, GraphState(x[:, -1], evidence[:, -1], pairs[:, -1], noise)

    def init_state(self, batch: int, k: int, d: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> GraphState:
        zeros = torch.zeros(batch, k, k, device=device)
        return GraphState(torch.zeros(batch, 0, d, device=device, dtype=dtype), zeros, zeros,
                          self.noise(batch, k, device) if self.training else None)

    def step(self, x: torch.Tensor, alive: torch.Tensor, state: GraphState) -> tuple[torch.Tensor, GraphState]:
        """One step of tokens x (B, K, d), alive (B, K) -> the step's adjacency (B, K, K) (== ``forward``'s at that
        step) and the new state."""
        dx = x - state.tokens if state.tokens.shape[1] else torch.zeros_like(x)
        scored, pair = self._evidence(x[:, None], dx[:, None], alive[:, None])
        evidence, pairs = state.evidence + scored[:, 0], state.pairs + pair[:, 0]
        out = self._sample(evidence / pairs.clamp_min(1.0), pair[:, 0], None if state.noise is None
                           else state.noise[:, 0])
        return out.adjacency, GraphState(x, evidence, pairs, state.noise)

    def losses(self, out: GraphOutput, alive: torch.Tensor) -> dict[str, torch.Tensor]:
        """``causal``: (``sparsity_lambda`` x mean edge probability over the possible (alive, off-diagonal)
        pairs + the augmented Lagrangian of h(A) on the probabilities) x ``ramp()``; ``acyclicity``: mean h(A)
        itself (detached; weight 0 by default: a logged quantity and the input of ``after_step``)."""
        alive = alive.float()
        pairs = (alive[..., :, None] * alive[..., None, :]).sum((-2, -1)) - alive.pow(2).sum(-1)  # (B, T)
        sparsity = out.prob.sum() / pairs.sum().clamp_min(1.0)
        h = acyclicity(out.prob)  # (B, T)
        dag = (self.alpha * h + 0.5 * self.rho * h.pow(2)).mean()
        return {"causal": self.ramp() * (self.cfg.sparsity_lambda * sparsity + dag),
                "acyclicity": h.mean().detach()}

