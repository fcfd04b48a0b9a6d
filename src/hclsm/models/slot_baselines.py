"""Baselines of the SlotSSM paper, built from the same parts as ``hclsm.models.slotssm``.

All sequence baselines share SlotSSM's interface: ``forward(tokens (B, T, M, d_in)) -> (B, T, K, d)``,
``init_state(B)`` and ``step(tokens_t (B, M, d_in), state) -> ((B, K, d), state)``; the single-state SSM
is ``hclsm.models.slotssm.single_state_ssm`` (one slot).

* ``SlotTransformer`` (App. C.2 eq. 33-34): the same slot encoder at every step; the slots of all steps
  so far form one sequence of T*K tokens processed by pre-LN transformer layers with a mask that is
  causal in time (a slot at step t sees every slot at steps <= t). Sinusoidal time embeddings. Its
  ``step`` keeps every past slot of every layer (a KV cache): the cost of a step grows with t.
* ``SlotRNN`` (eq. 29-32): the same slot encoder; per layer a GRU cell shared by all slots (slots
  folded into the batch) updates each slot's state from its input, then the slot mixer (self-attention
  + MLP) lets the slots interact before the next time step. Sequential in time.
* ``SAVi`` (Kipf et al. 2022, the object-centric baseline): CNN tokens; per frame a predictor
  (transformer over the slots) carries the previous frame's slots forward and slot attention (softmax
  over slots, GRU update) corrects them; the same spatial broadcast decoder as OC-SlotSSM.

``match_width`` picks the width of a baseline so its parameter count matches a target model's.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from hclsm.models.slotssm import (OCOutput, OCSlotSSMConfig, object_encoder, reconstruct, resize_video)
from hclsm.nn.attention import MultiHeadAttention, SlotEncoder, SlotMixer, mlp
from hclsm.nn.decoders import SpatialBroadcastDecoder
from hclsm.nn.encoders import coord_grid
from hclsm.nn.slots import SlotAttention


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def match_width(make: Callable[[int], nn.Module], target: int, multiple: int = 4, lo: int = 4, hi: int = 1024) -> int:
    """The width w (a multiple of ``multiple`` in [lo, hi]) whose ``make(w)`` has the trainable parameter
    count closest to ``target`` (counts grow with w, so a bisection on the multiples)."""
    ws = list(range(lo, hi + 1, multiple))
    a, b = 0, len(ws) - 1
    while b - a > 1:
        m = (a + b) // 2
        if n_params(make(ws[m])) < target:
            a = m
        else:
            b = m
    return min((ws[a], ws[b]), key=lambda w: abs(n_params(make(w)) - target))


def time_embedding(t: torch.Tensor, d: int) -> torch.Tensor:
    """Sinusoidal embedding (len(t), d) of step indices t (any length, no table to outgrow)."""
    half = d // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half, 1))
    ang = t.float()[:, None] * freq  # (T, d/2)
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return torch.nn.functional.pad(emb, (0, d - emb.shape[-1]))


# ---- SlotTransformer -----------------------------------------------------------------------------

class _CausalBlock(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), MultiHeadAttention(d, heads)
        self.norm2, self.mlp = nn.LayerNorm(d), mlp(d, 4 * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (B, Q, d) new tokens attend to the cached keys/values (B, h, S, d_h) and themselves (under
        ``mask`` (Q, S + Q) when given); returns the output and the grown cache."""
        h = self.norm1(x)
        k, v = self.attn.keys_values(h)  # (B, h, Q, d_h)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        x = x + self.attn(h, mask=mask, kv=(k, v))
        return x + self.mlp(self.norm2(x)), (k, v)


class SlotTransformer(nn.Module):
    """Slot encoder per step + transformer over all slots of steps <= t; (B, T, M, d_in) -> (B, T, K, d)."""

    def __init__(self, d_in: int, d_model: int, num_slots: int = 6, layers: int = 2, heads: int = 4,
                 encoder_layers: int = 3):
        super().__init__()
        self.d_model, self.num_slots = d_model, num_slots
        self.encoder = SlotEncoder(num_slots, d_model, heads, d_in, encoder_layers)
        self.blocks = nn.ModuleList(_CausalBlock(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def _embed(self, x: torch.Tensor, t0: int) -> torch.Tensor:
        """tokens (B, T, M, d_in) -> slots with time embedding, flat (B, T*K, d)."""
        b, t = x.shape[:2]
        s = self.encoder(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, K, d)
        s = s + time_embedding(torch.arange(t0, t0 + t, device=x.device), self.d_model)[None, :, None]
        return s.flatten(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        k = self.num_slots
        h = self._embed(x, 0)  # (B, T*K, d)
        step_of = torch.arange(t, device=x.device).repeat_interleave(k)  # (T*K,)
        mask = step_of[None, :] <= step_of[:, None]  # (T*K, T*K): causal in time, full within a step
        for block in self.blocks:
            h, _ = block(h, mask)
        return self.norm(h).view(b, t, k, -1)

    def init_state(self, batch: int, device: torch.device | None = None) -> dict:
        return {"t": 0, "cache": [None] * len(self.blocks)}

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x_t (B, M, d_in) -> (B, K, d); the state is every layer's keys and values of all past slots (a KV
        cache), so a step costs O(t) attention."""
        h = self._embed(x_t[:, None], state["t"])  # (B, K, d)
        caches = []
        for block, cache in zip(self.blocks, state["cache"]):
            h, cache = block(h, None, cache)  # the new step sees all past steps and itself
            caches.append(cache)
        return self.norm(h), {"t": state["t"] + 1, "cache": caches}


# ---- SlotRNN --------------------------------------------------------------------------------------

class SlotRNN(nn.Module):
    """Slot encoder per step; per layer a shared GRU per slot and a slot mixer between time steps."""

    def __init__(self, d_in: int, d_model: int, num_slots: int = 6, layers: int = 2, heads: int = 4,
                 encoder_layers: int = 3):
        super().__init__()
        self.d_model, self.num_slots = d_model, num_slots
        self.encoder = SlotEncoder(num_slots, d_model, heads, d_in, encoder_layers)
        self.grus = nn.ModuleList(nn.GRUCell(d_model, d_model) for _ in range(layers))
        self.mixers = nn.ModuleList(SlotMixer(d_model, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)

    def init_state(self, batch: int, device: torch.device | None = None) -> list[torch.Tensor]:
        return [torch.zeros(batch, self.num_slots, self.d_model, device=device) for _ in self.grus]

    def _recur(self, s: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encoded slots (B, K, d) of one step through the layers -> (B, K, d), new states."""
        b, k, d = s.shape
        new = []
        for gru, mixer, h in zip(self.grus, self.mixers, state):
            h = mixer(gru(s.reshape(b * k, d), h.reshape(b * k, d)).view(b, k, d))  # (B, K, d)
            new.append(h)
            s = h
        return s, new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        s = self.encoder(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, K, d): all steps at once
        state = self.init_state(b, x.device)
        outs = []
        for i in range(t):
            o, state = self._recur(s[:, i], state)
            outs.append(o)
        return self.norm(torch.stack(outs, dim=1))

    def step(self, x_t: torch.Tensor, state: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        o, state = self._recur(self.encoder(x_t), state)
        return self.norm(o), state


# ---- SAVi-style object-centric baseline --------------------------------------------------------

class SAVi(nn.Module):
    """CNN tokens -> (predictor, slot attention corrector) per frame -> spatial broadcast decoder."""

    def __init__(self, cfg: OCSlotSSMConfig, iterations: int = 2):
        super().__init__()
        self.cfg, self.iterations = cfg, iterations
        d = cfg.d_model
        self.encoder = object_encoder(cfg)
        # the object layer's levers when cfg asks for them (OCSlotSSMConfig.spatial_prior / background): slot
        # attention's own spatial prior (learned initial positions, Gaussian locality, centroids carried to the next
        # frame) and a background slot; otherwise plain slot attention
        self.attention = SlotAttention(d, d, cfg.num_slots, 2 * d, spatial_prior=cfg.spatial_prior,
                                       background=cfg.background, sigma_init=cfg.sigma_init)
        self.predictor = SlotMixer(d, cfg.heads)
        self.decoder = SpatialBroadcastDecoder(d, 3, cfg.decoder, background=cfg.background)
        self.register_buffer("coords", coord_grid(self.encoder.grid), persistent=False)  # (M, 2) token centres

    def forward(self, video: torch.Tensor) -> OCOutput:
        video = resize_video(video, self.cfg.image_size)
        b, t = video.shape[:2]
        tokens = self.encoder(video)  # (B, T, M, d)
        k, v = self.attention.project(tokens)  # (B, T, M, d) each
        slots, pos = self.attention.initial(b)
        out, where = [], []
        for i in range(t):
            if i:
                slots = self.predictor(slots)  # carry the slots (and their positions) to the next frame
            slots, pos, _ = self.attention(slots, pos, k[:, i], v[:, i], self.coords, self.iterations)
            out.append(slots)
            where.append(pos)
        slots = torch.stack(out, dim=1)  # (B, T, K, d)
        recon, alphas, mse = reconstruct(self.decoder, slots, video, torch.stack(where, dim=1))
        return OCOutput(slots=slots, recon=recon, alphas=alphas, losses={"recon": mse})
