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
from hclsm.nn.causal import acyclicity


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
        nn.init.zeros_(self.out[-1].weight)  # every edge starts at probability 1/2: no ranking before evidence
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor,
                radii: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, K, d), positions (B, C, K, n), alive (B, C, K), radii (B, K) or None -> logits (B, K, K)."""
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
        w = pair_mask(steps)[..., None]  # (B, C-2, K, K, 1)
        h = self.pooled((e * w).sum(1) / w.sum(1).clamp_min(1.0))  # (B, K, K, h) pooled over the history
        off = pair_mask(alive.any(1))[..., None]  # (B, K, K, 1)
        h = h * off
        return self.out(torch.cat([h, h.sum(2, keepdim=True).expand_as(h),
                                   h.sum(1, keepdim=True).expand_as(h)], -1)).squeeze(-1)  # (B, K, K)


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


class EpisodeGraph(nn.Module):
    """The graph-inference pass: ``infer`` (history -> graph), ``predict`` (states + graph -> changes), ``losses``
    (prediction, sparsity, acyclicity) and the step-counted penalty schedule (``ramp``, ``after_step``)."""

    def __init__(self, d: int, position_dims: int, d_out: int, cfg: EpisodeGraphConfig):
        super().__init__()
        if position_dims < 1:
            raise ValueError(f"position_dims must be >= 1 (the pair geometry reads positions), got {position_dims}")
        self.cfg = cfg
        self.encoder = EpisodeGraphEncoder(d, position_dims, cfg.d_hidden)
        self.decoder = InteractionDecoder(d, position_dims, d_out, cfg.d_hidden)
        self.register_buffer("alpha", torch.zeros(()))
        self.register_buffer("rho", torch.tensor(float(cfg.rho_init)))
        self.register_buffer("h_prev", torch.tensor(math.inf))
        self.register_buffer("h_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("h_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def infer(self, x: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor, radii: torch.Tensor | None = None,
              context: int | None = None) -> EpisodeGraphOutput:
        """The episode's graph from frames ``[0, context)`` (all when None) of x (B, T, K, d), positions (B, T, K,
        n), alive (B, T, K); nothing after the context is read."""
        c = x.shape[1] if context is None else context
        x, positions, alive = x[:, :c], positions[:, :c], alive[:, :c]
        raw = self.encoder(x, positions, alive, radii).float()  # (B, K, K)
        bound = self.cfg.logit_bound
        logits = raw if bound == 0 else bound * torch.tanh(raw / bound)  # saturated logits stop learning for good
        off = pair_mask(alive.any(1))
        prob = torch.sigmoid(logits) * off
        if self.training:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            gate = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / self.cfg.temperature) * off
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
                logits = z if bound == 0 else bound * torch.tanh(z / bound)
                prob = torch.sigmoid(logits) * off
                pred = self.predict(x, positions, alive[:, :-1], prob, radii)
                per = F.huber_loss(pred.float(), target.float(), delta=c.huber_delta, reduction="none").sum(-1)
                fit = (per * valid).sum((1, 2)) / valid.sum((1, 2)).clamp_min(1.0)  # (B,) each episode's own
                h = acyclicity(prob)  # (B,)
                loss = fit + c.kl_weight * self._kl(logits, off) + float(self.alpha) * h + 0.5 * rho * h.pow(2)
                grad, = torch.autograd.grad(loss.sum(), z)
                z.grad = grad
                opt.step()
        logits = (z if bound == 0 else bound * torch.tanh(z / bound)).detach()
        prob = torch.sigmoid(logits) * off
        return EpisodeGraphOutput(logits, prob, prob, off)

    def _kl(self, logits: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        """(B,) mean over the possible pairs of KL(Bernoulli(sigmoid(logit)) || Bernoulli(prior))."""
        p0, q = self.cfg.prior, torch.sigmoid(logits)
        kl = q * (F.logsigmoid(logits) - math.log(p0)) + (1 - q) * (F.logsigmoid(-logits) - math.log1p(-p0))
        return (kl * off).sum((-2, -1)) / off.sum((-2, -1)).clamp_min(1.0)

    def ramp(self) -> float:
        """Weight of the sparsity and acyclicity terms: 0 before ``penalty_start`` steps, then linear to 1 over
        ``penalty_ramp`` steps."""
        c, step = self.cfg, int(self.steps)
        if step < c.penalty_start:
            return 0.0
        return 1.0 if c.penalty_ramp == 0 else min(1.0, (step - c.penalty_start + 1) / c.penalty_ramp)

    def losses(self, graph: EpisodeGraphOutput, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
               ) -> dict[str, torch.Tensor]:
        """``prediction``: Huber of pred vs target (B, T, K, d_out) over valid (B, T, K); ``prior``: ``kl_weight`` x
        the mean KL of each edge to Bernoulli(``prior``), from step 0 (NRI's KL: it keeps the logits near the prior
        until the prediction loss ranks the pairs); ``penalty``: (``sparsity_lambda`` x mean edge probability + the
        augmented Lagrangian of h(prob)) x ``ramp()``; ``loss`` the sum; ``acyclicity``: mean h (detached; the input
        of ``after_step``)."""
        c = self.cfg
        prediction = huber_change_loss(pred, target, valid, c.huber_delta)
        off = graph.pairs
        prior = c.kl_weight * self._kl(graph.logits, off).mean()
        h = acyclicity(graph.prob)  # (B,)
        dag = (self.alpha * h + 0.5 * self.rho * h.pow(2)).mean()
        l1 = (graph.prob.sum((-2, -1)) / off.sum((-2, -1)).clamp_min(1.0)).mean()
        penalty = self.ramp() * (c.sparsity_lambda * l1 + dag)
        return {"loss": prediction + prior + penalty, "prediction": prediction.detach(), "prior": prior.detach(),
                "penalty": penalty.detach(), "acyclicity": h.mean().detach()}

    @torch.no_grad()
    def after_step(self, h: float) -> None:
        """Count a training step; with the penalty on, every ``update_every`` steps ``alpha += rho * mean h`` and
        ``rho *= rho_mult`` (up to ``rho_max``) unless h fell below a quarter of its previous mean."""
        active = self.ramp() > 0
        self.steps += 1
        if not math.isfinite(h) or not active:
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
