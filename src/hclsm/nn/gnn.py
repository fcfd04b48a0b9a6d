"""Relation graph over object slots: all-pairs edge MLP and weighted message passing.

Per round (pre-LN, residual; each round has its own weights)::

    h      = LayerNorm(o)
    e_ij   = edge_mlp([h_i; h_j; h_i - h_j; h_i * h_j])           # (B, N, N, d_edge), receiver i, sender j
    w_ij   = sigmoid(Linear(e_ij))                                # edge weight (exposed for the causal layer)
    agg_i  = Wm sum_{j != i} alive_j w_ij g_ij e_ij / max(1, sum_{j != i} alive_j g_ij)
    o_i    = o_i + update_mlp([h_i; agg_i])

``g`` is an optional external edge gate (a causal adjacency), 1 when absent. With ``relative_geometry`` the
first edge layer also reads the pair's geometry, ``G [p_j - p_i; v_j - v_i; |p_j - p_i|]`` from the objects'
positions and velocities (interaction networks' relative state): whether two objects touch is then a direct input
of their edge rather than something to decode from two normalised tokens. The message map Wm is
linear and bias-free, so the weighted sum is taken over the edge features before it (one (B, N, d_edge)
product instead of a (B, N, N, d) message tensor). The first edge layer acting on the concatenation is
split into its four column blocks: ``A h_i + B h_j + C (h_i - h_j) + D (h_i * h_j) = (A + C) h_i +
(B - C) h_j + D (h_i * h_j)``, so the (N, N, 4 d) pair tensor is never built; only the product term is
per pair. With ``chunk_size > 0`` receivers are processed ``chunk_size`` at a time, and under autograd
each chunk is checkpointed, so training memory is O(chunk N) rather than O(N^2); results equal the dense
path (tested, values and gradients).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from hclsm.config.model import GNNConfig


GEOMETRY = 5  # per pair: relative position (2), relative velocity (2), distance


def pair_geometry(positions: torch.Tensor, velocities: torch.Tensor, a: int = 0, b: int | None = None
                  ) -> torch.Tensor:
    """(B, b - a, N, 5) for receivers a:b and every sender j: ``[p_j - p_i; v_j - v_i; |p_j - p_i|]`` from positions
    and velocities (B, N, 2)."""
    b = positions.shape[1] if b is None else b
    rel = positions[:, None, :, :] - positions[:, a:b, None, :]  # (B, c, N, 2)
    vel = velocities[:, None, :, :] - velocities[:, a:b, None, :]
    dist = (rel.float().pow(2).sum(-1, keepdim=True) + 1e-8).sqrt().to(rel.dtype)  # no NaN gradient at 0
    return torch.cat([rel, vel, dist], dim=-1)


class RelationRound(nn.Module):
    """One round of message passing (see the module docstring)."""

    def __init__(self, d: int, d_edge: int, relative_geometry: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.edge_in = nn.Linear(4 * d, d_edge)  # on [h_i; h_j; h_i - h_j; h_i * h_j], applied block-wise
        self.geometry = nn.Linear(GEOMETRY, d_edge, bias=False) if relative_geometry else None
        self.edge_hidden = nn.Linear(d_edge, d_edge)
        self.edge_weight = nn.Linear(d_edge, 1)
        self.message = nn.Linear(d_edge, d, bias=False)
        self.update = nn.Sequential(nn.Linear(2 * d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor, alive: torch.Tensor, edge_gate: torch.Tensor | None, chunk_size: int,
                geometry: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d), alive (B, N), optional (positions, velocities) (B, N, 2) each -> updated x (B, N, d), edge
        weights (B, N, N) [receiver, sender]."""
        if (self.geometry is None) != (geometry is None):
            raise ValueError("a relation round built with relative_geometry needs the objects' positions and "
                             "velocities, and one built without takes none")
        N, d = x.shape[1:]
        h = self.norm(x)
        w_i, w_j, w_diff, w_prod = self.edge_in.weight.split(d, dim=1)  # (d_edge, d) each
        recv = F.linear(h, w_i + w_diff, self.edge_in.bias)  # (B, N, d_edge)
        send = F.linear(h, w_j - w_diff)  # (B, N, d_edge)
        alive = alive.to(h.dtype)
        if edge_gate is None:
            n_senders = (alive.sum(1, keepdim=True) - alive).clamp_min(1.0)  # (B, N): alive senders j != i
        else:  # only the senders the gate lets through count (an object without an edge to i is not seen by i)
            eye = torch.eye(N, device=x.device, dtype=h.dtype)
            n_senders = ((edge_gate.to(h.dtype) * (1 - eye)) * alive[:, None, :]).sum(-1).clamp_min(1.0)
        step = chunk_size if chunk_size > 0 else max(N, 1)
        aggs, weights = [], []
        for a in range(0, max(N, 1), step):  # N = 0 (no slots): one empty block, so the shapes still come out
            b = min(a + step, N)
            gate = None if edge_gate is None else edge_gate[..., a:b, :]
            args = (h, recv, send, w_prod, alive, gate, geometry, a, b)
            if chunk_size > 0 and torch.is_grad_enabled():
                agg, w = checkpoint(self._receivers, *args, use_reentrant=False)
            else:
                agg, w = self._receivers(*args)
            aggs.append(agg)
            weights.append(w)
        agg = torch.cat(aggs, dim=1) / n_senders[..., None]  # (B, N, d)
        return x + self.update(torch.cat([h, agg], dim=-1)), torch.cat(weights, dim=1)

    def _receivers(self, h: torch.Tensor, recv: torch.Tensor, send: torch.Tensor, w_prod: torch.Tensor,
                   alive: torch.Tensor, gate: torch.Tensor | None, geometry: tuple[torch.Tensor, torch.Tensor] | None,
                   a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Receivers a:b: summed messages (B, b - a, d) and edge weights (B, b - a, N), diagonal zeroed."""
        prod = h[:, a:b, None, :] * h[:, None, :, :]  # (B, c, N, d)
        pre = recv[:, a:b, None] + send[:, None] + F.linear(prod, w_prod)  # (B, c, N, d_edge)
        if geometry is not None:
            pre = pre + self.geometry(pair_geometry(*geometry, a, b).to(h.dtype))
        e = F.gelu(pre)
        e = F.gelu(self.edge_hidden(e))
        not_self = 1.0 - torch.eye(h.shape[1], device=h.device, dtype=h.dtype)[a:b]  # (c, N)
        w = torch.sigmoid(self.edge_weight(e)).squeeze(-1) * not_self  # (B, c, N)
        coef = w * alive[:, None, :]
        if gate is not None:
            coef = coef * gate
        return self.message(torch.einsum("bij,bije->bie", coef, e)), w


class RelationGNN(nn.Module):
    def __init__(self, d_slot: int, cfg: GNNConfig):
        super().__init__()
        self.chunk_size = cfg.chunk_size
        self.relative_geometry = cfg.relative_geometry
        self.rounds = nn.ModuleList(RelationRound(d_slot, cfg.d_edge, cfg.relative_geometry)
                                    for _ in range(cfg.rounds))

    def forward(self, slots: torch.Tensor, alive: torch.Tensor, edge_gate: torch.Tensor | None = None,
                return_edges: bool = False, geometry: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """slots (B, N, d_slot), alive (B, N) in [0, 1] -> slots (B, N, d_slot) [, edge weights (B, N, N)].

        ``edge_gate`` (B, N, N) or (N, N), [receiver, sender], scales each message (e.g. a causal
        adjacency). ``geometry``: the objects' positions and velocities (B, N, 2) each, which a GNN built with
        ``relative_geometry`` reads on its edges (``pair_geometry``). The returned edge weights are the last
        round's w_ij (diagonal 0, not alive-masked).
        """
        for rnd in self.rounds:
            slots, edges = rnd(slots, alive, edge_gate, self.chunk_size, geometry)
        return (slots, edges) if return_edges else slots
