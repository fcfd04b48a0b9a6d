"""Episode graph inference (NRI-style): one causal graph per episode, inferred from its observed history.

``EpisodeGraph`` is a pass of its own beside ``hclsm.nn.causal.CausalGraph``: an encoder reads every step of the
history and pools the evidence of each ordered pair into one logit per episode; a decoder predicts each object's
state change with the graph gating every non-contact message; the prediction loss alone teaches the encoder
which pairs matter. Convention as in ``CausalGraph``: ``[receiver i, sender j]``, 1 = object i's change reads j.

Why each piece (measured on true states of the physics scenes, ``hclsm bench causal-states``):

* **one graph per episode, from the whole history**: a per-step (running-mean) graph gets too little evidence
  per decision and goes dense; pooling every step's pair evidence gives each edge the whole episode's.
* **relaxed gates**: ``soft = sigmoid((logit + logistic noise) / temperature)`` (a binary-concrete sample) in
  training and ``sigmoid(logit)`` in evaluation, so the loss reaches every pair's logit; a hard straight-through
  gate carries no per-pair signal and the graph never leaves the empty one.
* **a robust likelihood**: Huber on the state change (velocity change for physical states): collisions and wall
  bounces make a few huge residuals that would dominate a squared error and push the graph dense.
* **an ungated contact channel**: collisions need a message between *every* close pair, whatever the graph. Pairs
  whose gap ``|p_j - p_i| - r_i - r_j`` is below ``contact_reach`` exchange messages of their own weights, so the
  graph is only about influence at a distance.
* **penalties after a ranking exists**: the sparsity (l1 of the probabilities, or a KL to a Bernoulli prior) and
  the NOTEARS acyclicity ``h(A)`` (``hclsm.nn.causal.acyclicity``) under an augmented Lagrangian switch on after
  ``penalty_start`` training steps (``after_step`` counts them); from step 0 they prune every edge first.

Per step t of the history the encoder reads positions p (B, T, K, n), their changes u(t) = p(t) - p(t-1) and
second differences a(t) = p(t+1) - 2 p(t) + p(t-1), and the states x (B, T, K, d)::

    n_i(t)     = MLP([x_i(t); x_i(t+1) - x_i(t)])                                # object token and its change
    g_ij(t)    = [p_j - p_i, u_j - u_i, dist, d dist, gap, a_i . e_ij, |a_i x e_ij|, a_j . e_ij, |a_j x e_ij|]
    e_ij(t)    = MLP([n_i(t); n_j(t); g_ij(t)])                                  # the step's pair evidence
    h_ij       = MLP(mean_t e_ij(t))                                             # pooled over the history
    logit_ij   = MLP([h_ij; sum_k h_ik; sum_k h_kj])                             # explaining away across pairs

The decoder (``InteractionDecoder``) reads the states at t only::

    m_ij(t) = MLP_g([x_i; x_j; p_j - p_i; dist; gap; e_ij])   c_ij(t) = MLP_c(same)   # e_ij: unit vector i -> j
    dx_i(t) = MLP_o([x_i; sum_j A_ij m_ij; sum_j contact_ij(t) c_ij])

Messages are summed (not averaged), so two leaders' pulls add as forces do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.config.model import EpisodeGraphConfig
from hclsm.nn.causal import GraphOutput, PenaltySchedule, acyclicity


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): geometry spans distances of tens of px and accelerations of hundredths, so the MLPs
    read it on a log scale (near-linear below 1)."""
    return torch.sign(x) * torch.log1p(x.abs())


def pair_mask(alive: torch.Tensor) -> torch.Tensor:
    """(..., K) alive -> (..., K, K) float: both alive, off the diagonal."""
    alive = alive.float()
    k = alive.shape[-1]
    return alive[..., :, None] * alive[..., None, :] * (1.0 - torch.eye(k, device=alive.device))


def distances(positions: torch.Tensor, radii: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
    """positions (B, T, K, n), radii (B, K) or None -> rel (B, T, K, K, n) ``p_j - p_i``, dist (B, T, K, K) and the
    surface gap ``dist - r_i - r_j`` (dist itself without radii)."""
    rel = positions[:, :, None] - positions[:, :, :, None]  # (B, T, K, K, n) [i, j] = p_j - p_i
    dist = (rel.pow(2).sum(-1) + 1e-6).sqrt()  # (B, T, K, K), smooth on the diagonal
    gap = dist if radii is None else dist - (radii[:, None, :, None] + radii[:, None, None, :])
    return rel, dist, gap


def contact_mask(positions: torch.Tensor, alive: torch.Tensor, reach: float,
                 radii: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, K, K) float: alive pairs that are, or are about to be, in contact at each step t: the surface gap at t,
    or at t + 1 extrapolated at constant velocity (``2 p(t) - p(t-1)``), is below ``reach``. Balls a few px apart
    that close fast collide within the frame, so the gap at t alone misses about one collision in ten."""
    ahead = torch.cat([positions[:, :1], 2 * positions[:, 1:] - positions[:, :-1]], 1)  # (B, T, K, n)
    near = torch.minimum(distances(positions, radii)[2], distances(ahead, radii)[2])  # (B, T, K, K)
    return (near < reach).float() * pair_mask(alive)


def huber_change_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, delta: float) -> torch.Tensor:
    """Mean Huber loss of predicted vs true state changes (B, T, K, d) over the valid (B, T, K) object-steps."""
    per = F.huber_loss(pred.float(), target.float(), delta=delta, reduction="none").sum(-1)  # (B, T, K)
    valid = valid.float()
    return (per * valid).sum() / valid.sum().clamp_min(1.0)


@dataclass
class EpisodeGraphOutput:
    """One graph per episode: ``logits`` and ``prob`` = sigmoid(logits) (B, K, K) [receiver, sender], zero on the
    diagonal and for pairs not alive in the history; ``gate``: what gates the decoder's messages (a relaxed
    sample in training, ``prob`` in evaluation); ``pairs`` (B, K, K) 1 for the possible edges (both objects alive in
    the history, off the diagonal)."""

    logits: torch.Tensor
    prob: torch.Tensor
    gate: torch.Tensor
    pairs: torch.Tensor


class EpisodeGraphEncoder(nn.Module):
    """History (B, C, K, d) -> per-episode edge logits (B, K, K); see the module docstring."""

    def __init__(self, d: int, position_dims: int, d_hidden: int):
        super().__init__()
        n_geo = 2 * position_dims + 7
        self.node = mlp(2 * d, d_hidden, d_hidden)
        # the pair MLP's first layer on [n_i; n_j; g_ij], split by block so the (K, K) concatenation is never built
        self.recv = nn.Linear(d_hidden, d_hidden)
        self.send = nn.Linear(d_hidden, d_hidden, bias=False)
        self.geo = nn.Linear(n_geo, d_hidden, bias=False)
        self.pair = nn.Sequential(nn.GELU(), nn.Linear(d_hidden, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden))
        self.pooled = mlp(d_hidden, d_hidden, d_hidden)
        self.out = mlp(3 * d_hidden, d_hidden, 1)
        with torch.no_grad():  # every edge starts at probability about 1/2: no ranking before evidence (not exactly
            self.out[-1].weight.mul_(0.01)  # zero, so the layers below get a gradient from the first step on)
            self.out[-1].bias.zero_()

    def evidence(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                 radii: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair evidence of every inner step t = 1..C-2 of x (B, C, K, d), positions (B, C, K, n), alive (B, C, K)
        (each reads frames t-1, t and t+1): e (B, C-2, K, K, h) and its weight w (B, C-2, K, K, 1), 1 where both
        objects are alive on all three frames."""
        if x.shape[1] < 3:
            raise ValueError(f"graph inference needs a history of at least 3 steps, got {x.shape[1]}")
        p = positions.float()
        u = p[:, 1:-1] - p[:, :-2]  # (B, C-2, K, n) velocity into each inner step t = 1..C-2
        acc = p[:, 2:] - 2 * p[:, 1:-1] + p[:, :-2]  # (B, C-2, K, n) second difference at t
        rel, dist, gap = distances(p[:, 1:-1], radii)  # (B, C-2, K, K, n), (B, C-2, K, K)
        unit = rel / dist[..., None]
        drel = u[:, :, None] - u[:, :, :, None]  # (B, C-2, K, K, n) u_j - u_i
        approach = (rel * drel).sum(-1) / dist  # (B, C-2, K, K) d dist / dt

        def along(a: torch.Tensor, side: int) -> list[torch.Tensor]:  # a (B, C-2, K, n) of receiver / sender
            a = a[:, :, :, None] if side == 0 else a[:, :, None]
            par = (a * unit).sum(-1)
            return [par, ((a - par[..., None] * unit).pow(2).sum(-1) + 1e-6).sqrt()]

        geo = torch.cat([rel, drel, torch.stack([dist, approach, gap, *along(acc, 0), *along(acc, 1)], -1)], -1)
        geo = symlog(geo)
        node = self.node(torch.cat([x[:, 1:-1], x[:, 2:] - x[:, 1:-1]], -1).float())  # (B, C-2, K, h)
        e = self.pair(self.recv(node)[:, :, :, None] + self.send(node)[:, :, None] + self.geo(geo))  # (B, C-2, K, K, h)
        steps = (alive[:, :-2] * alive[:, 1:-1] * alive[:, 2:]).float()  # (B, C-2, K): all three frames seen
        return e, pair_mask(steps)[..., None]

    def readout(self, mean: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """Pooled evidence (..., K, K, h) and the possible pairs off (..., K, K) -> logits (..., K, K)."""
        h = self.pooled(mean) * off[..., None]
        return self.out(torch.cat([h, h.sum(-2, keepdim=True).expand_as(h),
                                   h.sum(-3, keepdim=True).expand_as(h)], -1)).squeeze(-1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                radii: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, K, d), positions (B, C, K, n), alive (B, C, K), radii (B, K) or None -> logits (B, K, K): the
        evidence of every step pooled over the history."""
        e, w = self.evidence(x, positions, alive, radii)
        return self.readout((e * w).sum(1) / w.sum(1).clamp_min(1.0), pair_mask(alive.any(1)))


class InteractionDecoder(nn.Module):
    """States at t (B, T, K, d) and the graph -> each object's predicted change (B, T, K, d_out)."""

    def __init__(self, d: int, position_dims: int, d_out: int, d_hidden: int):
        super().__init__()
        # the two message MLPs' first layers on [x_i; x_j; g_ij] (g: p_j - p_i, dist, gap, the unit vector from i to
        # j), split by block
        self.recv = nn.Linear(d, 2 * d_hidden)
        self.send = nn.Linear(d, 2 * d_hidden, bias=False)
        self.geo = nn.Linear(2 * position_dims + 2, 2 * d_hidden, bias=False)
        self.gated = nn.Sequential(nn.GELU(), nn.Linear(d_hidden, d_hidden))
        self.contact = nn.Sequential(nn.GELU(), nn.Linear(d_hidden, d_hidden))
        self.out = nn.Sequential(nn.Linear(d + 2 * d_hidden, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_hidden),
                                 nn.GELU(), nn.Linear(d_hidden, d_out))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, gate: torch.Tensor,
                contact: torch.Tensor, radii: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, K, d), positions (B, T, K, n), alive (B, T, K), gate (B, K, K), contact (B, T, K, K)."""
        x = x.float()
        rel, dist, gap = distances(positions.float(), radii)
        geo = torch.cat([symlog(torch.cat([rel, dist[..., None], gap[..., None]], -1)), rel / dist[..., None]],
                        -1)  # (B, T, K, K, 2n + 2): a pull along the pair's axis is then linear in its inputs
        first = self.recv(x)[:, :, :, None] + self.send(x)[:, :, None] + self.geo(geo)  # (B, T, K, K, 2h)
        m_gated, m_contact = first.chunk(2, -1)
        live = pair_mask(alive)  # (B, T, K, K)
        gated = torch.einsum("btij,btijh->btih", gate[:, None] * live, self.gated(m_gated))  # (B, T, K, h)
        touch = torch.einsum("btij,btijh->btih", contact * live, self.contact(m_contact))  # (B, T, K, h)
        return self.out(torch.cat([x, gated, touch], -1))  # (B, T, K, d_out)


def bounded(raw: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(raw / bound)`` (``raw`` itself when bound is 0): saturated logits would stop learning for good."""
    return raw if bound == 0 else bound * torch.tanh(raw / bound)


def relaxed_gate(logits: torch.Tensor, noise: torch.Tensor, temperature: float) -> torch.Tensor:
    """A binary-concrete sample ``sigmoid((logit + noise) / temperature)``, noise logistic: every pair's logit gets
    its own gradient (a hard straight-through gate's gradient carries no per-pair signal)."""
    return torch.sigmoid((logits + noise) / temperature)


def logistic_noise(shape: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
    u = torch.rand(shape, device=device).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


class GraphPenalties(PenaltySchedule):
    """The sparsity and acyclicity of a learned graph and their step-counted schedule, shared by ``EpisodeGraph``
    and ``DynamicsEpisodeGraph``: a KL of each edge to Bernoulli(``prior``) from step 0, and after
    ``penalty_start`` training steps (ramped over ``penalty_ramp``) the l1 of the edge probabilities and the
    NOTEARS h(A) under an augmented Lagrangian whose multipliers ``after_step`` updates (``PenaltySchedule``)."""

    def __init__(self, cfg: EpisodeGraphConfig):
        super().__init__(cfg)

    def _kl(self, logits: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """(...) mean over the possible pairs of KL(Bernoulli(sigmoid(logit)) || Bernoulli(prior)); logits and off
        (..., K, K)."""
        p0, q = self.cfg.prior, torch.sigmoid(logits)
        kl = q * (F.logsigmoid(logits) - math.log(p0)) + (1 - q) * (F.logsigmoid(-logits) - math.log1p(-p0))
        return (kl * off).sum((-2, -1)) / off.sum((-2, -1)).clamp_min(1.0)

    def penalties(self, logits: torch.Tensor, prob: torch.Tensor, off: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graphs (..., K, K) -> ``kl_weight`` x the mean KL to the prior, ``ramp()`` x (``sparsity_lambda`` x the
        mean edge probability + the augmented Lagrangian of h(prob)), and h (...) itself."""
        c = self.cfg
        prior = c.kl_weight * self._kl(logits, off).mean()
        h = acyclicity(prob)
        dag = (self.alpha * h + 0.5 * self.rho * h.pow(2)).mean()
        l1 = (prob.sum((-2, -1)) / off.sum((-2, -1)).clamp_min(1.0)).mean()
        return prior, self.ramp() * (c.sparsity_lambda * l1 + dag), h


class EpisodeGraph(GraphPenalties):
    """The graph-inference pass on states: ``infer`` (history -> graph), ``predict`` (states + graph -> changes),
    ``refine`` (semi-amortised inference), ``losses`` (prediction, prior, penalties) and the step-counted penalty
    schedule (``ramp``, ``after_step``)."""

    def __init__(self, d: int, position_dims: int, d_out: int, cfg: EpisodeGraphConfig):
        super().__init__(cfg)
        if position_dims < 1:
            raise ValueError(f"position_dims must be >= 1 (the pair geometry reads positions), got {position_dims}")
        self.encoder = EpisodeGraphEncoder(d, position_dims, cfg.d_hidden)
        self.decoder = InteractionDecoder(d, position_dims, d_out, cfg.d_hidden)

    def infer(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, radii: torch.Tensor | None = None,
              context: int | None = None) -> EpisodeGraphOutput:
        """The episode's graph from frames ``[0, context)`` (all when None) of x (B, T, K, d), positions (B, T, K,
        n), alive (B, T, K); nothing after the context is read."""
        c = x.shape[1] if context is None else context
        x, positions, alive = x[:, :c], positions[:, :c], alive[:, :c]
        logits = bounded(self.encoder(x, positions, alive, radii).float(), self.cfg.logit_bound)  # (B, K, K)
        off = pair_mask(alive.any(1))
        prob = torch.sigmoid(logits) * off
        if self.training:
            gate = relaxed_gate(logits, logistic_noise(logits.shape, logits.device), self.cfg.temperature) * off
        else:
            gate = prob
        return EpisodeGraphOutput(logits, prob, gate, off)

    def predict(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, gate: torch.Tensor,
                radii: torch.Tensor | None = None) -> torch.Tensor:
        """Each object's predicted change (B, T, K, d_out) from the states at t, gated by ``gate`` (B, K, K)."""
        contact = contact_mask(positions, alive, self.cfg.contact_reach, radii)
        return self.decoder(x, positions, alive, gate, contact, radii)

    def refine(self, graph: EpisodeGraphOutput, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
               target: torch.Tensor, radii: torch.Tensor | None = None, context: int | None = None,
               steps: int | None = None) -> EpisodeGraphOutput:
        """Semi-amortised inference: start from the encoder's ``graph`` and fit each episode's logits by Adam
        (``refine_lr``, ``refine_steps``) to the decoder's evidence on the same history: the Huber error of the
        changes ``target`` (B, T-1, K, d_out) (target[:, t]: the change from t to t+1) over the steps whose next
        frame lies inside ``context``, plus the KL to the prior and the augmented Lagrangian of h at the layer's
        current multipliers (``rho`` at least ``refine_rho``). The gates are ``sigmoid(logit)``, so a second
        leader whose pull the first one does not explain still lowers the error and is switched on (the
        encoder's per-pair pooling misses about a third of them). The weights stay fixed; reads nothing after
        the context either."""
        c = self.cfg
        steps = c.refine_steps if steps is None else steps
        t = x.shape[1] if context is None else context
        x, positions, alive, target = x[:, :t - 1], positions[:, :t - 1], alive[:, :t], target[:, :t - 1]
        valid = alive[:, :-1] * alive[:, 1:]  # (B, t-1, K)
        off = pair_mask(alive.any(1))  # (B, K, K)
        bound = c.logit_bound
        z0 = graph.logits.detach() if bound == 0 else bound * torch.atanh(
            (graph.logits.detach() / bound).clamp(-0.999, 0.999))
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=c.refine_lr)
        rho = max(float(self.rho), c.refine_rho)
        with torch.enable_grad():
            for _ in range(steps):
                logits = bounded(z, bound)
                prob = torch.sigmoid(logits) * off
                pred = self.predict(x, positions, alive[:, :-1], prob, radii)
                per = F.huber_loss(pred.float(), target.float(), delta=c.huber_delta, reduction="none").sum(-1)
                fit = (per * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1.0)  # (B,) each episode's own
                h = acyclicity(prob)  # (B,)
                loss = fit + c.kl_weight * self._kl(logits, off) + float(self.alpha) * h + 0.5 * rho * h.pow(2)
                grad, = torch.autograd.grad(loss.sum(), z)
                z.grad = grad
                opt.step()
        logits = bounded(z, bound).detach()
        prob = torch.sigmoid(logits) * off
        return EpisodeGraphOutput(logits, prob, prob, off)

    def losses(self, graph: EpisodeGraphOutput, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """``prediction``: Huber of pred vs target (B, T, K, d_out) over valid (B, T, K); ``prior`` and ``penalty``
        (``GraphPenalties.penalties``: the KL to the prior from step 0, NRI's, which keeps the logits near the prior
        until the prediction loss ranks the pairs; the l1 and h(A) after ``penalty_start``); ``loss`` the sum;
        ``acyclicity``: mean h (detached; the input of ``after_step``)."""
        prediction = huber_change_loss(pred, target, valid, self.cfg.huber_delta)
        prior, penalty, h = self.penalties(graph.logits, graph.prob, graph.pairs)
        return {"loss": prediction + prior + penalty, "prediction": prediction.detach(), "prior": prior.detach(),
                "penalty": penalty.detach(), "acyclicity": h.mean().detach()}


@dataclass
class EpisodeGraphState:
    """What a rollout's episode graph carries from step to step, O(1) in the history's length: the last two steps'
    tokens (B, 2, K, d), positions (B, 2, K, n, scaled) and alive (B, 2, K) (zeros before the first steps), the sums
    of the evidence and of its weights so far (B, K, K, h) and (B, K, K, 1), the objects seen so far (B, K), the
    steps run, and the rollout's noise (B, K, K) in training (None in evaluation)."""

    tokens: torch.Tensor
    positions: torch.Tensor
    alive: torch.Tensor
    evidence: torch.Tensor
    weight: torch.Tensor
    seen: torch.Tensor
    t: int
    noise: torch.Tensor | None


class DynamicsEpisodeGraph(GraphPenalties):
    """The episode graph inside a dynamics model (``model.causal.inference=episode``; ``HierarchicalDynamics``):
    the ``EpisodeGraphEncoder``'s evidence pooled over the **history so far**, so the graph of step t reads steps
    <= t only (the evidence of inner step s reads frames s-1..s+1, so it joins the pool at frame s+1) and, at the
    end of a context, is the one graph that context infers; a rollout then runs on it.

    Same interface as ``hclsm.nn.causal.CausalGraph`` (``forward`` / ``init_state`` / ``step`` -> ``GraphOutput``,
    ``losses``, ``after_step``), with positions beside the tokens, scaled by ``position_scale`` (model coordinates
    in [-1, 1] -> px at the model's image size, the units of ``contact_reach``). The adjacency is the relaxed
    gate (a binary-concrete sample with one noise draw per clip, at ``temperature``) in training and the edge
    probability in evaluation; ``contact`` marks the pairs about to touch (``contact_mask``: the centre distance,
    since slots have no radii, below ``contact_reach``), whose messages the dynamics passes whatever the graph."""

    def __init__(self, d: int, cfg: EpisodeGraphConfig, position_dims: int = 2, position_scale: float = 1.0):
        super().__init__(cfg)
        self.encoder = EpisodeGraphEncoder(d, position_dims, cfg.d_hidden)
        self.position_dims, self.position_scale = position_dims, float(position_scale)

    def noise(self, batch: int, k: int, device: torch.device | None = None) -> torch.Tensor:
        """One clip's logistic noise per pair (B, K, K)."""
        return logistic_noise((batch, k, k), device)

    def _sample(self, mean: torch.Tensor, seen: torch.Tensor, alive: torch.Tensor, noise: torch.Tensor | None,
                contact: torch.Tensor) -> GraphOutput:
        """Pooled evidence (B, T, K, K, h), objects seen so far and alive (B, T, K) -> the graph of every step."""
        logits = bounded(self.encoder.readout(mean, pair_mask(seen)).float(), self.cfg.logit_bound)
        pair = pair_mask(alive)
        prob = torch.sigmoid(logits) * pair
        adjacency = prob if noise is None else relaxed_gate(logits, noise[:, None], self.cfg.temperature) * pair
        return GraphOutput(adjacency, prob, logits, contact if self.cfg.contact_reach > 0 else None)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                noise: torch.Tensor | None = None, return_state: bool = False):
        """x (B, T, K, d) object tokens, positions (B, T, K, n), alive (B, T, K) -> the graph of every step (reads
        steps <= t). With ``return_state`` also the ``EpisodeGraphState`` that ``step`` continues from."""
        b, t, k, _ = x.shape
        p, alive = positions.float() * self.position_scale, alive.float()
        sum_e = x.new_zeros(b, t, k, k, self.cfg.d_hidden, dtype=torch.float32)
        sum_w = x.new_zeros(b, t, k, k, 1, dtype=torch.float32)
        if t >= 3:
            e, w = self.encoder.evidence(x, p, alive)  # (B, T-2, K, K, h): available from frame 2 on
            sum_e = torch.cat([sum_e[:, :2], (e.float() * w).cumsum(1)], 1)
            sum_w = torch.cat([sum_w[:, :2], w.cumsum(1)], 1)
        seen = alive.cummax(1).values
        if self.training and noise is None:
            noise = self.noise(b, k, x.device)
        noise = noise if self.training else None
        out = self._sample(sum_e / sum_w.clamp_min(1.0), seen, alive, noise,
                           contact_mask(p, alive, self.cfg.contact_reach))
        if not return_state:
            return out

        def last2(v: torch.Tensor) -> torch.Tensor:  # the last two steps, zeros before the first
            return torch.cat([v.new_zeros(b, max(0, 2 - t), *v.shape[2:]), v[:, -2:]], 1)

        return out, EpisodeGraphState(last2(x), last2(p), last2(alive), sum_e[:, -1], sum_w[:, -1], seen[:, -1], t,
                                      noise)

    def init_state(self, batch: int, k: int, d: int, device: torch.device | None = None,
                   dtype: torch.dtype = torch.float32) -> EpisodeGraphState:
        n = self.position_dims
        return EpisodeGraphState(torch.zeros(batch, 2, k, d, device=device, dtype=dtype),
                                 torch.zeros(batch, 2, k, n, device=device), torch.zeros(batch, 2, k, device=device),
                                 torch.zeros(batch, k, k, self.cfg.d_hidden, device=device),
                                 torch.zeros(batch, k, k, 1, device=device), torch.zeros(batch, k, device=device), 0,
                                 self.noise(batch, k, device) if self.training else None)

    def step(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, state: EpisodeGraphState
             ) -> tuple[GraphOutput, EpisodeGraphState]:
        """One step of tokens x (B, K, d), positions (B, K, n), alive (B, K) -> the step's graph (``GraphOutput`` of
        (B, K, K); == ``forward``'s at that step) and the new state."""
        p, alive = positions.float() * self.position_scale, alive.float()
        tokens = torch.cat([state.tokens, x[:, None]], 1)  # (B, 3, K, d): steps t-2, t-1, t
        ps, al = torch.cat([state.positions, p[:, None]], 1), torch.cat([state.alive, alive[:, None]], 1)
        evidence, weight = state.evidence, state.weight
        if state.t >= 2:
            e, w = self.encoder.evidence(tokens, ps, al)  # (B, 1, K, K, h)
            evidence, weight = evidence + e[:, 0].float() * w[:, 0], weight + w[:, 0]
        seen = torch.maximum(state.seen, alive)
        prev = ps[:, 1] if state.t >= 1 else p  # without a previous step, no motion
        contact = contact_mask(torch.stack([prev, p], 1), al[:, 1:], self.cfg.contact_reach)[:, 1:]
        out = self._sample((evidence / weight.clamp_min(1.0))[:, None], seen[:, None], alive[:, None],
                           None if state.noise is None else state.noise, contact)
        out = GraphOutput(*(None if v is None else v[:, 0] for v in (out.adjacency, out.prob, out.logits,
                                                                     out.contact)))
        return out, EpisodeGraphState(tokens[:, 1:], ps[:, 1:], al[:, 1:], evidence, weight, seen, state.t + 1,
                                      state.noise)

    def losses(self, out: GraphOutput, alive: torch.Tensor) -> dict[str, torch.Tensor]:
        """``causal``: the KL of every step's edges to the prior + the ramped sparsity and acyclicity
        (``GraphPenalties.penalties``); ``acyclicity``: mean h (detached; the input of ``after_step``)."""
        prior, penalty, h = self.penalties(out.logits, out.prob, pair_mask(alive.float()))
        return {"causal": prior + penalty, "acyclicity": h.mean().detach()}
