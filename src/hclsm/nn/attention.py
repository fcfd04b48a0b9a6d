"""Attention blocks of the SlotSSM family: multi-head attention (regular or inverted), pre-LN residual
blocks, the slot encoder and the slot mixer.

* ``MultiHeadAttention``: queries (N, Q, d) attend to keys/values (N, L, d). Regular attention is a
  softmax over the keys (each query's weights sum to 1). **Inverted attention** (Tsai et al. 2020,
  Wu et al. 2023; OC-SlotSSM eq. 23-26) takes the softmax over the *queries* instead, so the queries
  (slots) compete for every input token, then renormalises each query's weights over the inputs
  (a weighted mean): ``A = softmax_q(logits); A <- A / (sum_inputs A + eps)``. Per head.
* ``SlotEncoder`` (SlotSSM eq. 7-8, App. C.1 eq. 18-20): learnable CLS slot tokens; each layer is
  self-attention among the slots, cross-attention to the inputs and an MLP, all pre-LN residual; a
  linear projection of the CLS outputs gives the slots. With ``inputs`` = the previous layer's slots it
  re-encodes a set of slots into a different number of slots (SlotSSM section 4.3).
* ``SlotMixer`` (eq. 9-10): self-attention across the slots of one step, then an MLP per slot, both
  pre-LN residual.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def inverted_attention_weights(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(..., Q, L) logits -> weights: softmax over the queries (dim -2), then renormalised over the inputs."""
    a = logits.float().softmax(dim=-2)  # each input token's attention sums to 1 over the queries
    return a / (a.sum(dim=-1, keepdim=True) + eps)  # each query takes a weighted mean of its inputs


class MultiHeadAttention(nn.Module):
    """Multi-head attention; ``inverted=True`` normalises over the queries (see the module docstring)."""

    def __init__(self, d_model: int, heads: int, d_kv: int | None = None, inverted: bool = False):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"attention: heads ({heads}) must divide d_model ({d_model})")
        self.heads, self.inverted = heads, inverted
        d_kv = d_model if d_kv is None else d_kv
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_kv, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, d = x.shape
        return x.view(n, length, self.heads, d // self.heads).transpose(1, 2)  # (N, h, len, d_h)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (N, L, d_kv) -> keys and values (N, h, L, d_h) (what a KV cache keeps)."""
        k, v = self.kv(context).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """x (N, Q, d) attends to context (N, L, d_kv) (self-attention when None) -> (N, Q, d).

        ``mask`` (Q, L) bool, True = may attend (regular attention only); ``kv``: precomputed
        ``keys_values(context)`` (then ``context`` is not read).
        """
        q = self._split(self.q(x))  # (N, h, Q, d_h)
        k, v = kv if kv is not None else self.keys_values(x if context is None else context)  # (N, h, L, d_h)
        if self.inverted:
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (N, h, Q, L)
            y = (inverted_attention_weights(logits).to(v.dtype) @ v)  # (N, h, Q, d_h)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (N, h, Q, d_h)
        return self.out(y.transpose(1, 2).flatten(2))  # (N, Q, d)

    def weights(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The attention weights (N, h, Q, L) of ``forward(x, context)`` (for tests and pictures)."""
        q, k = self._split(self.q(x)), self._split(self.kv(context).chunk(2, dim=-1)[0])
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        return inverted_attention_weights(logits) if self.inverted else logits.float().softmax(dim=-1)


def mlp(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


class SlotMixer(nn.Module):
    """Interaction across slots (SlotSSM eq. 9-10): x + SelfAttn(LN(x)), then x + MLP(LN(x)); (N, K, d) -> same.

    ``attention=False`` (a single slot: self-attention over one token is only a linear map, and its
    query/key weights would get no gradient) keeps the MLP block alone.
    """

    def __init__(self, d: int, heads: int, mlp_ratio: int = 4, attention: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(d) if attention else None
        self.attn = MultiHeadAttention(d, heads) if attention else None
        self.norm2, self.mlp = nn.LayerNorm(d), mlp(d, mlp_ratio * d)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        if self.attn is not None:
            slots = slots + self.attn(self.norm1(slots))
        return slots + self.mlp(self.norm2(slots))


class SlotEncoderLayer(nn.Module):
    """CLS self-attention, cross-attention to the inputs, MLP; each pre-LN residual (App. C.1 eq. 18-20).
    Without ``self_attention`` (one CLS token) the first block is left out."""

    def __init__(self, d: int, heads: int, d_in: int, mlp_ratio: int = 4, self_attention: bool = True):
        super().__init__()
        self.norm_self = nn.LayerNorm(d) if self_attention else None
        self.self_attn = MultiHeadAttention(d, heads) if self_attention else None
        self.norm_q, self.norm_in = nn.LayerNorm(d), nn.LayerNorm(d_in)
        self.cross = MultiHeadAttention(d, heads, d_kv=d_in)
        self.norm_mlp, self.mlp = nn.LayerNorm(d), mlp(d, mlp_ratio * d)

    def forward(self, cls: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            cls = cls + self.self_attn(self.norm_self(cls))
        cls = cls + self.cross(self.norm_q(cls), self.norm_in(inputs))
        return cls + self.mlp(self.norm_mlp(cls))


class SlotEncoder(nn.Module):
    """Learnable CLS tokens read a set of inputs into ``num_slots`` slots (SlotSSM eq. 7-8).

    inputs (N, L, d_in) -> slots (N, num_slots, d). The CLS tokens are the same for every input set, so
    the slots of one step depend only on that step's inputs.
    """

    def __init__(self, num_slots: int, d: int, heads: int, d_in: int, layers: int = 3):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(num_slots, d) * d ** -0.5)  # (K, d)
        self.layers = nn.ModuleList(SlotEncoderLayer(d, heads, d_in, self_attention=num_slots > 1)
                                    for _ in range(layers))
        self.norm, self.proj = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        cls = self.cls.expand(inputs.shape[0], -1, -1)  # (N, K, d)
        for layer in self.layers:
            cls = layer(cls, inputs)
        return self.proj(self.norm(cls))  # (N, K, d)
