"""C-JEPA: masked object-slot prediction in latent space, with the CTT causal losses on a real graph.

The predictor reads a window of slot sequences from a frozen object model: ``history`` frames it sees
and ``future`` frames it predicts, all at once. Tokens are (time x slot); slots carry no index embedding
(they are exchangeable), every token gets its frame's time embedding. With M the hidden slots of a sample
and V = ``visible`` the history frames never hidden::

    visible       z[t, s] = W_in [x[t, s]; dx[t, s]] + p_t            t < T_h, and t < V or s not in M
    query         z[t, s] = m + p_t + W_id x[0, s]                    s in M on history frames V..T_h-1,
                                                                      and every s on future frames
    output        y[t, s] = b[t, s] + W_out LN(Transformer(z))[t, s]

dx is the change since the frame before, 0 across a birth or a death (a slot re-armed on a new object is not
an object moving). The output is an offset from b, the slot's last visible state carried on at its last
visible velocity (b[t, s] = x_l + max(t - l, 0) dx_l with l = T_h - 1, or V - 1 for a hidden slot). W_out
starts at zero, so an untrained predictor *is* constant velocity and the network spends itself on what
constant motion misses: collisions, walls, springs, the other objects. A dead slot's tokens (dead on that
history frame, or on the last history frame for a future one) are read by no other token.

Attention has one learned bias per head on the tokens of the query's own slot (the same for every slot,
so slots stay exchangeable): the predictor can follow an object through its frames without having to
recognise it by content first. The query of a hidden slot holds the mask token, the time and that
slot's **first-frame** state (the first V frames are never hidden), so it names which object to predict
but carries nothing of its hidden states. With V = 1 (the C-JEPA paper's setting) a hidden object's
motion cannot be known at all; V = 2 shows its velocity too, so its hidden frames follow from how it moves
and what it meets, which is the interaction the masking is meant to teach. M is
drawn afresh for every sample at every call (|M| = ``masked`` among the slots alive on frame 0), unlike
the public C-JEPA whose re-seeded generator hides the same slot indices at every step.

Losses (``prediction_losses``, in the normalised slot space, stop-gradient targets, dead target slots
excluded; with ``position_dims`` the position weighs as much as the rest of the state): ``masked`` = MSE
on hidden slots over history frames V..T_h-1 (the visible ones are not scored), ``future`` = MSE
on every slot of the future frames (+ ``proprio`` on PushT's node).

Extra nodes (PushT): with ``action_dim`` an action token per frame (given on every frame, as a planner
gives candidate actions; never predicted), with ``proprio_dim`` a proprioception token (read on history
frames, predicted on future ones). Node types get their own embedding; they are never masked.

**Graphs for CTT** (``[receiver i, sender j]``: j is a parent of i):

* ``attention``: the attention the future queries of slot i give to slot j's tokens, summed over key
  times, averaged over future frames, layers and heads, then renormalised over the *other alive slots*
  of the sample, so a row sums to 1 whatever the window length (the public CTT fork's rows sum to 1/T, so
  its 0.15 threshold is out of reach for T >= 7). j is a parent when its share is at least
  ``attention_threshold`` times an even split. Per sample, never averaged over a batch (slot indices are
  not objects across videos); free of dropout noise at the default ``dropout`` 0 (the fork's has it).
* ``learned`` (``graph_gate``): a ``CausalGraph`` (``hclsm.nn.causal``: Gumbel-sigmoid edges, l1
  sparsity, NOTEARS; with ``position_dims`` its pair features also read each pair's relative position and
  velocity, distance and approach rate) reads the *visible* history (hidden slots held at their state on
  frame ``visible`` - 1, as the history tokens show them) and gates
  the attention: a token of slot i attends to slot j's tokens only when the edge j -> i is on (its own
  slot and the extra nodes always). The prediction loss trains the edges through the straight-through
  gate; ``causal`` adds the sparsity and acyclicity terms.

``ctt_losses``: **invariance** hides one more visible slot i and asks every visible slot j of which i is
not a parent to keep its (detached) future prediction; **sufficiency** hides every slot that is not a
parent of a random slot k and scores k's future against the truth. Both are 0 when the graph is complete
and the predictions perfect.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.config.cjepa import CJEPAConfig
from hclsm.nn.causal import CausalGraph, GraphOutput


@dataclass
class CJEPAOutput:
    """One pass over a window (T = history + future frames, S object slots, D slot width)."""

    pred: torch.Tensor  # (B, T, S, D) predicted slots, normalised space (history frames too)
    mask: torch.Tensor  # (B, S) bool: the slots hidden on history frames visible..T_h-1
    attention: torch.Tensor  # (B, T, S, T, S) slot-to-slot attention, mean over layers and heads (detached)
    proprio: torch.Tensor | None  # (B, T, P) predicted proprioception (normalised as given), when a node
    graph: GraphOutput | None  # the learned graph over the history, (B, T_h, S, S), when graph_gate


class Block(nn.Module):
    """Pre-norm transformer block whose attention can be gated token-to-token (0/1, renormalised)."""

    def __init__(self, d: int, heads: int, mlp: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.same_bias = nn.Parameter(torch.zeros(heads))  # per head: extra logit on tokens of the query's own node
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, mlp), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp, d),
                                nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, same: torch.Tensor, gate: torch.Tensor | None,
                readable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, d), same (N, N) float 1 where two tokens belong to one node (slot), gate (B, N, N) or None,
        readable (B, N, N) bool keys each query may read (None: all; must include the query itself)
        -> x, the head-averaged attention (B, N, N)."""
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads) + self.same_bias[:, None, None] * same
        if readable is not None:
            logits = logits.masked_fill(~readable[:, None], float("-inf"))
        w = logits.softmax(-1)  # (B, H, N, N)
        if gate is not None:  # a token always attends to its own slot, so a row never sums to 0
            w = w * gate[:, None]
            w = w / w.sum(-1, keepdim=True)
        out = self.drop(w) @ v  # (B, H, N, dh)
        x = x + self.drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
        return x + self.ff(self.norm2(x)), w.mean(1)


class MaskedSlotPredictor(nn.Module):
    """The C-JEPA predictor; slots go in and come out in the frozen model's raw space (normalised inside)."""

    def __init__(self, slot_dim: int, cfg: CJEPAConfig):
        super().__init__()
        self.cfg, self.slot_dim = cfg, slot_dim
        d = cfg.d_model
        self.inp = nn.Linear(2 * slot_dim, d)  # a visible state and its change since the frame before
        self.anchor = nn.Linear(slot_dim, d)  # W_id: the hidden / future query's first-frame identity
        self.mask_token = nn.Parameter(torch.zeros(d))
        self.time_pos = nn.Parameter(torch.zeros(cfg.window, d))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.time_pos, std=0.02)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.mlp, cfg.dropout) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, slot_dim)
        nn.init.zeros_(self.out.weight)  # an untrained predictor is exactly the constant-velocity base
        nn.init.zeros_(self.out.bias)
        self.extra = int(cfg.proprio_dim > 0) + int(cfg.action_dim > 0)  # extra nodes per frame
        if self.extra:
            self.node_type = nn.Parameter(torch.zeros(self.extra, d))  # proprio first, then action
            nn.init.trunc_normal_(self.node_type, std=0.02)
        if cfg.proprio_dim:
            self.proprio_in = nn.Linear(cfg.proprio_dim, d)
            self.proprio_anchor = nn.Linear(cfg.proprio_dim, d)
            self.proprio_out = nn.Linear(d, cfg.proprio_dim)
        if cfg.action_dim:
            self.action_in = nn.Linear(cfg.action_dim, d)
        # per-dimension statistics of the training slots (set_normaliser): the predictor works in z-scores
        self.register_buffer("slot_mean", torch.zeros(slot_dim))
        self.register_buffer("slot_std", torch.ones(slot_dim))
        n = cfg.position_dims
        if n >= slot_dim:
            raise ValueError(f"cjepa.position_dims ({n}) must be below the slot width ({slot_dim})")
        weight = torch.ones(slot_dim)
        if n:
            weight[-n:] = (slot_dim - n) / n  # the position weighs as much as the rest of the state
        self.register_buffer("dim_weight", weight / weight.mean())
        # the learned graph also reads each pair's geometry from the position dims (hclsm.nn.causal)
        self.graph = CausalGraph(slot_dim, cfg.d_edge, cfg.causal, n) if cfg.graph_gate else None

    # ---- normalisation -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_normaliser(self, slots: torch.Tensor, alive: torch.Tensor) -> None:
        """Mean and std per dimension over the alive slots of (..., S, D) training slots."""
        live = slots[alive.bool()].double()  # (N, D)
        if len(live) < 2:
            raise ValueError("set_normaliser needs at least two alive slots")
        self.slot_mean.copy_(live.mean(0).float())
        self.slot_std.copy_(live.std(0).clamp_min(1e-6).float())

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.slot_mean) / self.slot_std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.slot_std + self.slot_mean

    # ---- masks ---------------------------------------------------------------------------------------
    def draw_mask(self, alive0: torch.Tensor, count: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, S) bool: ``count`` (default ``cfg.masked``) slots per sample, uniformly among those alive
        on frame 0 (all of them when fewer are alive); a fresh draw on every call."""
        count = self.cfg.masked if count is None else count
        b, s = alive0.shape
        if count == 0:
            return torch.zeros(b, s, dtype=torch.bool, device=alive0.device)
        score = torch.rand(b, s, generator=generator, device=alive0.device) - 2.0 * (~alive0).float()
        rank = score.argsort(-1, descending=True).argsort(-1)  # 0 = the highest score
        return rank < torch.clamp(alive0.sum(-1, keepdim=True), max=count)

    # ---- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, alive: torch.Tensor, mask: torch.Tensor | None = None,
                action: torch.Tensor | None = None, proprio: torch.Tensor | None = None) -> CJEPAOutput:
        """x (B, T_h, S, D) raw history slots (frames past T_h are ignored), alive (B, T_h, S) bool, mask
        (B, S) bool slots to hide on history frames ``visible``..T_h-1 (None: none); action (B, T, A) for every frame
        of the window, proprio (B, >= T_h, P) read on history frames. The output covers all T frames."""
        cfg = self.cfg
        th, t = cfg.history, cfg.window
        x, alive = x[:, :th], alive[:, :th].bool()
        b, _, s, _ = x.shape
        if mask is None:
            mask = torch.zeros(b, s, dtype=torch.bool, device=x.device)
        z = self.normalise(x)
        v = cfg.visible  # history frames never hidden
        hidden = torch.zeros(b, th, s, dtype=torch.bool, device=x.device)
        hidden[:, v:] = mask[:, None]
        # what may be read: a hidden slot's states stay at its last visible one
        z_vis = torch.where(hidden[..., None], z[:, v - 1:v], z)
        alive_vis = torch.where(hidden, alive[:, v - 1:v], alive)
        # the change since the frame before: 0 on frame 0, on hidden frames, and across a birth or a death (a
        # slot re-armed on a new object is not an object moving)
        steady = alive_vis[:, 1:] & alive_vis[:, :-1]
        dz = torch.cat([torch.zeros_like(z_vis[:, :1]), (z_vis[:, 1:] - z_vis[:, :-1]) * steady[..., None]], 1)
        query = self.mask_token + self.anchor(z[:, 0])[:, None]  # (B, 1, S, d)
        tokens = torch.cat([torch.where(hidden[..., None], query, self.inp(torch.cat([z_vis, dz], -1))),
                            query.expand(b, t - th, s, -1)], dim=1) + self.time_pos[:, None]  # (B, T, S, d)
        nodes = []
        if cfg.proprio_dim:
            if proprio is None:
                raise ValueError("this predictor has a proprioception node: pass proprio (B, T_h, P)")
            p_in = self.proprio_in(proprio[:, :th])  # (B, T_h, d)
            p_q = (self.mask_token + self.proprio_anchor(proprio[:, :1])).expand(b, t - th, -1)
            nodes.append(torch.cat([p_in, p_q], 1) + self.node_type[0])
        if cfg.action_dim:
            if action is None or action.shape[1] < t:
                raise ValueError(f"this predictor has an action node: pass action (B, {t}, A) for every frame")
            nodes.append(self.action_in(action[:, :t]) + self.node_type[-1])
        if nodes:
            tokens = torch.cat([tokens, torch.stack(nodes, 2) + self.time_pos[:, None]], dim=2)  # (B, T, S', d)
        n_nodes = tokens.shape[2]
        graph, gate = None, None
        if self.graph is not None:
            graph = self.graph(z_vis, alive_vis)
            g = graph.adjacency[:, -1] + torch.eye(s, device=x.device)  # (B, S, S) receiver x sender, self on
            g = F.pad(g, (0, n_nodes - s, 0, n_nodes - s), value=1.0)  # the extra nodes are never gated
            gate = g[:, None, :, None, :].expand(b, t, n_nodes, t, n_nodes).reshape(b, t * n_nodes, t * n_nodes)
        h = tokens.reshape(b, t * n_nodes, -1)
        node = torch.arange(n_nodes, device=x.device).repeat(t)  # (N,) the node (slot) of every token
        same = (node[:, None] == node[None, :]).float()
        # a dead slot's token (dead on that history frame, or on the last one for a future frame) holds no object:
        # no other token reads it
        key_alive = torch.cat([alive_vis, alive_vis[:, -1:].expand(b, t - th, s)], 1)  # (B, T, S)
        key_alive = F.pad(key_alive, (0, n_nodes - s), value=True).reshape(b, 1, t * n_nodes)
        readable = key_alive | torch.eye(t * n_nodes, dtype=torch.bool, device=x.device)  # (B, N, N)
        attn = 0.0
        for block in self.blocks:
            h, w = block(h, same, gate, readable)
            attn = attn + w.detach()
        h = self.norm(h).view(b, t, n_nodes, -1)
        attention = (attn / len(self.blocks)).view(b, t, n_nodes, t, n_nodes)[:, :, :s, :, :s]
        pred_p = self.proprio_out(h[:, :, s]) if cfg.proprio_dim else None
        # every slot is predicted as an offset from its last visible state carried on at its last visible velocity
        # (a hidden slot: its state and change on frame visible-1)
        last = torch.where(mask, v - 1, th - 1)  # (B, S) each slot's last visible frame
        ahead = (torch.arange(t, device=x.device)[None, :, None] - last[:, None]).clamp_min(0).float()  # (B, T, S)
        pick = last[:, None, :, None].expand(b, 1, s, z.shape[-1])
        base = z_vis.gather(1, pick) + ahead[..., None] * dz.gather(1, pick)  # (B, T, S, D)
        return CJEPAOutput(base + self.out(h[:, :, :s]), mask, attention, pred_p, graph)

    @torch.no_grad()
    def rollout(self, x: torch.Tensor, alive: torch.Tensor, steps: int, action: torch.Tensor | None = None,
                proprio: torch.Tensor | None = None) -> torch.Tensor:
        """Predict ``steps`` frames after the history x (B, T_h, S, D) raw, nothing hidden; beyond
        ``future`` frames the last T_h frames (predicted ones included) become the next history. Returns
        (B, steps, S, D) raw slots. ``action`` covers the history and the ``steps`` frames after it."""
        cfg = self.cfg
        th, tp = cfg.history, cfg.future
        hist, live, out, done = x[:, -th:], alive[:, -th:], [], 0
        while done < steps:
            act = None if action is None else action[:, done:done + cfg.window]
            if act is not None and act.shape[1] < cfg.window:  # the last window runs past the given actions
                act = torch.cat([act, act[:, -1:].expand(-1, cfg.window - act.shape[1], -1)], 1)
            o = self(hist, live, action=act, proprio=proprio)
            fut = self.denormalise(o.pred[:, th:])  # (B, T_p, S, D)
            out.append(fut)
            done += tp
            hist = torch.cat([hist, fut], 1)[:, -th:]
            live = torch.cat([live, live[:, -1:].expand(-1, tp, -1)], 1)[:, -th:]
            if o.proprio is not None:
                proprio = torch.cat([proprio[:, -th:], o.proprio[:, th:]], 1)[:, -th:]
        return torch.cat(out, 1)[:, :steps]


# ---- losses ----------------------------------------------------------------------------------------------
def masked_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
               dim_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the tokens where ``weight`` (pred's shape without the last dim) is on of the per-token MSE
    (dims weighted by ``dim_weight``, mean 1); 0 when none is on."""
    err = (pred.float() - target.float()).pow(2)
    err = (err * dim_weight).mean(-1) if dim_weight is not None else err.mean(-1)
    w = weight.float()
    return (err * w).sum() / w.sum().clamp_min(1.0)


def prediction_losses(model: MaskedSlotPredictor, out: CJEPAOutput, x: torch.Tensor, alive: torch.Tensor,
                      proprio: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``masked`` (hidden slots, history frames visible..T_h-1) and ``future`` (all slots, future frames) MSE
    against the window's true slots x (B, T, S, D) raw, alive (B, T, S); plus ``proprio`` (future frames)."""
    th = model.cfg.history
    target = model.normalise(x).detach()
    alive = alive.bool()
    w = model.dim_weight
    v = model.cfg.visible
    losses = {"masked": masked_mse(out.pred[:, v:th], target[:, v:th], out.mask[:, None] & alive[:, v:th], w),
              "future": masked_mse(out.pred[:, th:], target[:, th:], alive[:, th:], w)}
    if out.proprio is not None:
        losses["proprio"] = F.mse_loss(out.proprio[:, th:], proprio[:, th:model.cfg.window].detach())
    return losses


def attention_graph(attention: torch.Tensor, alive0: torch.Tensor, history: int, threshold: float) -> torch.Tensor:
    """(B, S, S) bool ``[receiver i, sender j]`` from slot-to-slot attention (B, T, S, T, S): j is a parent of
    i when the share of i's future queries' attention on j's tokens, among the other alive slots, is at
    least ``threshold`` times an even split. Rows of slots with no other alive slot are empty."""
    share = attention[:, history:].sum(3).mean(1).float()  # (B, S_query, S_key): summed over key times
    s = share.shape[-1]
    pair = alive0[:, :, None] & alive0[:, None, :] & ~torch.eye(s, dtype=torch.bool, device=share.device)
    share = share * pair
    p = share / share.sum(-1, keepdim=True).clamp_min(1e-12)
    return (p * pair.sum(-1, keepdim=True) >= threshold - 1e-6) & pair  # an exact even split counts


def learned_graph(out: CJEPAOutput) -> torch.Tensor:
    """(B, S, S) bool: the learned graph that gated this pass (the history's last step), ``[receiver, sender]``."""
    if out.graph is None:
        raise ValueError("this predictor has no learned graph (cjepa.graph_gate is false)")
    return out.graph.adjacency[:, -1].detach() > 0.5


def _pick(allowed: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One index per row, uniformly among ``allowed`` (B, S) bool: (index (B,), whether the row had any)."""
    score = torch.rand(allowed.shape, generator=generator, device=allowed.device).masked_fill(~allowed, -1.0)
    return score.argmax(-1), allowed.any(-1)


def ctt_losses(model: MaskedSlotPredictor, out: CJEPAOutput, graph: torch.Tensor, x: torch.Tensor,
               alive: torch.Tensor, generator: torch.Generator | None = None, **nodes: torch.Tensor | None
               ) -> dict[str, torch.Tensor]:
    """``ctt_inv`` and ``ctt_suf`` of the clean pass ``out`` on the window x (B, T, S, D) raw, alive (B, T, S),
    under ``graph`` (B, S, S) bool ``[receiver, sender]``; ``nodes`` = action / proprio, passed on.

    invariance: per sample, a visible alive slot i is hidden too; every visible alive j != i whose parents
    exclude i must keep its clean future prediction (detached). sufficiency: per sample, an alive slot k;
    every slot that is not a parent of k is hidden on history frames visible..; k's future is scored against the
    truth. Each extra pass runs through the model, so the gradients reach it there."""
    th = model.cfg.history
    alive = alive.bool()
    alive0 = alive[:, 0]
    b, s = alive0.shape
    rows = torch.arange(b, device=x.device)
    visible = alive0 & ~out.mask
    i, has_i = _pick(visible, generator)
    onehot_i = F.one_hot(i, s).bool() & has_i[:, None]
    inter = model(x[:, :th], alive[:, :th], mask=out.mask | onehot_i, **nodes)
    keep = visible & ~onehot_i & ~graph[rows, :, i] & has_i[:, None]  # (B, S): j whose parents exclude i
    w = model.dim_weight
    inv = masked_mse(inter.pred[:, th:], out.pred[:, th:].detach(), keep[:, None].expand(-1, model.cfg.future, -1), w)
    k, has_k = _pick(alive0, generator)
    onehot_k = F.one_hot(k, s).bool()
    hide = ~graph[rows, k] & ~onehot_k  # (B, S): every non-parent of k
    suff = model(x[:, :th], alive[:, :th], mask=hide, **nodes)
    target = model.normalise(x[:, th:]).detach()
    weight = alive[:, th:] & (onehot_k & has_k[:, None])[:, None]
    return {"ctt_inv": inv, "ctt_suf": masked_mse(suff.pred[:, th:], target, weight, w)}
