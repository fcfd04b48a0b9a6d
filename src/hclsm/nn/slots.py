"""Slot attention with learned per-slot queries, an existence head, and birth proposals.

``SlotAttention`` (Locatello et al. 2020): softmax over slots (slots compete for tokens), weighted mean
over tokens, GRU + residual MLP update. Its initial slots are learned per-slot queries (BO-QSA), with
multiplicative Gaussian noise during early training; on a first frame the first ``iterations - 1``
iterations run without gradient and the last one is straight-through to the queries (BO-QSA's bi-level
trick), so the queries learn and backward stays cheap. Every slot also gets an attention centroid
(its position in [-1, 1]^2), which the decoder uses for slot-relative coordinates.

``ExistenceHead`` scores each slot's p_alive; in training the alive gate is a hard binary-concrete
(Gumbel) sample with a straight-through gradient, so the reconstruction loss itself decides which slots
must stay alive while a sparsity prior pushes the others to die.

``BirthSeeder`` turns the per-token residual of the alive slots' reconstruction ("what the alive slots
fail to explain") into a seed for the dead slots of the next frame.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class SlotAttention(nn.Module):
    """Slot attention whose slots also carry a position (their attention centroid, in [-1, 1]^2).

    With ``spatial_prior`` the attention logits get ``-|x_m - pos_k|^2 / (2 sigma^2)`` (sigma learned,
    per model) for every slot but the background (index 0 when ``background``): slots start spread over
    the image at learned positions and each first explains what is near it, which breaks the symmetry
    between slots from the first step instead of after thousands of plateau steps.
    """

    def __init__(self, d_in: int, d_slot: int, num_slots: int, mlp_hidden: int, spatial_prior: bool = True,
                 background: bool = True, sigma_init: float = 0.3, sharpness_init: float = 3.0, eps: float = 1e-8):
        super().__init__()
        self.num_slots, self.d_slot, self.eps = num_slots, d_slot, eps
        self.queries = nn.Parameter(torch.empty(num_slots, d_slot))
        if num_slots <= d_slot:
            nn.init.orthogonal_(self.queries)
        else:
            nn.init.xavier_uniform_(self.queries)
        self.spatial_prior = spatial_prior
        if spatial_prior:
            side = math.ceil(math.sqrt(num_slots))
            c = torch.linspace(-0.6, 0.6, side)
            grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1).reshape(-1, 2)[:num_slots]
            self.query_pos = nn.Parameter(grid.clone())  # (K, 2) learned initial positions
            self.log_sigma = nn.Parameter(torch.full((1,), math.log(sigma_init)))  # 1-D: FSDP shards no scalars
            prior_mask = torch.ones(num_slots)
            if background:
                prior_mask[0] = 0.0
            self.register_buffer("prior_mask", prior_mask, persistent=False)
        # learned inverse temperature of the attention logits (log-parameterised); > 1 at init gives
        # sharper token-to-slot assignments from the start (a sqrt(d) temperature is too soft here)
        self.log_sharpness = nn.Parameter(torch.full((1,), math.log(sharpness_init)))  # 1-D: FSDP shards no scalars
        self.norm_in = nn.LayerNorm(d_in)
        self.to_k = nn.Linear(d_in, d_slot, bias=False)
        self.to_v = nn.Linear(d_in, d_slot, bias=False)
        self.norm_slots = nn.LayerNorm(d_slot)
        self.to_q = nn.Linear(d_slot, d_slot, bias=False)
        self.gru = nn.GRUCell(d_slot, d_slot)
        self.mlp = nn.Sequential(nn.LayerNorm(d_slot), nn.Linear(d_slot, mlp_hidden), nn.ReLU(),
                                 nn.Linear(mlp_hidden, d_slot))

    def project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (..., M, d_slot) of tokens (..., M, d_in); computed once per frame."""
        x = self.norm_in(tokens)
        return self.to_k(x), self.to_v(x)

    def initial(self, batch: int, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K, d_slot) learned queries and (B, K, 2) initial positions; with ``noise`` > 0 the queries
        get ``noise * |query| * N(0, 1)`` and the positions ``0.1 * noise * N(0, 1)``."""
        q = self.queries.unsqueeze(0).expand(batch, -1, -1)
        pos = (self.query_pos if self.spatial_prior else self.queries.new_zeros(self.num_slots, 2))
        pos = pos.unsqueeze(0).expand(batch, -1, -1)
        if noise > 0:
            q = q + noise * q.detach().abs() * torch.randn_like(q)
            pos = pos + 0.1 * noise * torch.randn_like(pos)
        return q, pos

    def attend(self, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """(B, M, K) attention of tokens over slots (softmax over slots, computed in fp32)."""
        q = self.to_q(self.norm_slots(slots))
        logits = torch.einsum("bmd,bkd->bmk", k.float(), q.float()) * (
            torch.exp(self.log_sharpness.float()) / math.sqrt(self.d_slot))
        if self.spatial_prior:
            d2 = (coords[None, :, None, :] - pos.float()[:, None, :, :]).pow(2).sum(-1)  # (B, M, K)
            logits = logits - d2 * self.prior_mask / (2 * torch.exp(2 * self.log_sigma.float()))
        return logits.softmax(dim=-1)

    def iterate(self, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One update; returns new slots (B, K, d), new positions (B, K, 2) and the attention (B, M, K)."""
        attn = self.attend(slots, pos, k, coords)
        weights = attn / (attn.sum(dim=1, keepdim=True) + self.eps)
        updates = torch.einsum("bmk,bmd->bkd", weights, v.float()).to(slots.dtype)
        pos = torch.einsum("bmk,mc->bkc", weights, coords.float())
        b, n, d = slots.shape
        slots = self.gru(updates.reshape(b * n, d), slots.reshape(b * n, d)).reshape(b, n, d)
        return slots + self.mlp(slots), pos, attn

    def forward(self, slots: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, coords: torch.Tensor,
                iterations: int, straight_through: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run ``iterations`` updates from ``slots`` at ``pos``; returns (slots, positions, last attention).

        ``straight_through``: the first ``iterations - 1`` updates run without gradient and the last
        one starts from ``detach(state) + init - detach(init)``, so the initial slots and positions
        still get the last update's gradient (BO-QSA).
        """
        if straight_through and iterations > 1:
            init_s, init_p = slots, pos
            with torch.no_grad():
                for _ in range(iterations - 1):
                    slots, pos, _ = self.iterate(slots, pos, k, v, coords)
            slots = slots.detach() + init_s - init_s.detach()
            pos = pos.detach() + init_p - init_p.detach()
            iterations = 1
        attn = None
        for _ in range(iterations):
            slots, pos, attn = self.iterate(slots, pos, k, v, coords)
        return slots, pos, attn


class ExistenceHead(nn.Module):
    """p_alive per slot from its state (LayerNorm -> MLP -> one logit)."""

    def __init__(self, d_slot: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_slot), nn.Linear(d_slot, 2 * d_slot), nn.ReLU(),
                                 nn.Linear(2 * d_slot, 1))
        nn.init.constant_(self.net[-1].bias, 2.0)  # start alive: slots must first learn to bind

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """Alive logits (B, K)."""
        return self.net(slots).squeeze(-1).float()


def hard_concrete(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Binary Gumbel (logistic-noise) sample in {0, 1} with the straight-through gradient of its soft value."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


class BirthSeeder(nn.Module):
    """Seed and place a birth proposal where the alive slots explain the frame worst.

    ``residual`` (B, M) is the detached per-token error of the alive slots' reconstruction, with the
    tokens below ``threshold`` zeroed, so a seed only forms where something is left unexplained. The
    proposal goes to the worst token: the residual is windowed by a Gaussian of width ``BIRTH_RADIUS``
    around its peak, and the seed is that window's residual-weighted mean of the token values (through
    an MLP), its centre the window's residual-weighted mean position. One blob per frame: a second
    unexplained object is picked up on a later frame.
    """

    BIRTH_RADIUS = 0.2  # width of the window around the residual's peak, in [-1, 1] image coordinates

    def __init__(self, d_slot: int):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(d_slot), nn.Linear(d_slot, d_slot), nn.ReLU(), nn.Linear(d_slot, d_slot))

    @staticmethod
    def unexplained(residual: torch.Tensor, threshold: float) -> torch.Tensor:
        """(B, M) weights of the tokens whose residual exceeds ``threshold`` (0 elsewhere)."""
        return torch.where(residual > threshold, residual, torch.zeros_like(residual))

    def forward(self, values: torch.Tensor, weights: torch.Tensor, coords: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """values (B, M, d), weights (B, M), token coords (M, 2) -> seed (B, d), centre (B, 2), has_seed (B,)."""
        weights = weights.float()
        peak = coords[weights.argmax(dim=1)]  # (B, 2)
        d2 = (coords[None] - peak[:, None]).pow(2).sum(-1)  # (B, M)
        local = weights * torch.exp(-d2 / (2 * self.BIRTH_RADIUS ** 2))
        total = local.sum(dim=1, keepdim=True)
        has = total.squeeze(1) > 0
        norm = local / total.clamp_min(1e-6)
        pooled = torch.einsum("bm,bmd->bd", norm, values.float())
        centre = norm @ coords.float()
        return self.net(pooled.to(values.dtype)) * has[:, None].to(values.dtype), centre, has
