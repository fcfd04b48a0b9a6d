"""Mamba-style selective SSM block: ``forward`` over a whole sequence, ``step`` one frame at a time.

Per block (pre-norm, residual)::

    x, z   = in_proj(LayerNorm(seq))                    # two (B, L, d_inner) streams
    x      = silu(causal depthwise conv1d(x))           # width d_conv, left-padded: no future frames
    dt, B, C = x_proj(x)                                # input-dependent step size, input and output maps
    delta  = softplus(dt_proj(dt))                      # (B, L, d_inner), bias initialised for delta in [1e-3, 0.1]
    y      = selective_scan(x, delta, A, B, C) + D * x  # A = -exp(A_log), diagonal (d_inner, d_state)
    out    = seq + out_proj(y * silu(z))

``step`` carries the last ``d_conv - 1`` conv inputs and the scan state, so a rollout costs O(1) per step;
it equals ``forward`` on the same inputs (tested). Objects use it with their slots folded into the batch.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.nn.scan import LOG2E, selective_scan

SSMState = tuple[torch.Tensor, torch.Tensor]  # (conv inputs (B, d_inner, d_conv - 1), scan state (B, d_inner, d_state))


class SelectiveSSM(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_min: float = 1e-3, dt_max: float = 0.1):
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = expand * d_model, d_state, d_conv
        self.dt_rank = max(1, math.ceil(d_model / 16))
        di = self.d_inner
        self.norm = nn.LayerNorm(d_model)
        self.in_proj = nn.Linear(d_model, 2 * di, bias=False)
        self.conv = nn.Conv1d(di, di, d_conv, groups=di, padding=0)
        self.x_proj = nn.Linear(di, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, di)
        # softplus(bias) spans [dt_min, dt_max] log-uniformly across channels: slow and fast channels
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.dt_proj.weight.mul_(self.dt_rank ** -0.5 / self.dt_proj.weight.std().clamp_min(1e-8) * 0.5)
        self.A_log = nn.Parameter(torch.empty(di, d_state).uniform_(-0.5, 0.0))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d_model, bias=False)
        with torch.no_grad():  # the block starts close to the identity (residual), which keeps deep stacks stable
            self.out_proj.weight.mul_(0.5)

    @property
    def A(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())

    def _ssm_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt, b, c = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt).float()), b, c

    def forward(self, seq: torch.Tensor, backend: str = "auto", return_state: bool = False):
        """(B, L, d_model) -> (B, L, d_model); output t reads inputs <= t only. With ``return_state`` also the
        state after the last step (what ``step`` continues from: a rollout's context run as one sequence)."""
        x, z = self.in_proj(self.norm(seq)).chunk(2, dim=-1)
        padded = F.pad(x.transpose(1, 2), (self.d_conv - 1, 0))  # (B, d_inner, d_conv - 1 + L)
        # an empty sequence has no conv outputs (and the conv refuses an input shorter than its kernel)
        x = F.silu(self.conv(padded).transpose(1, 2)) if seq.shape[1] else x
        delta, b, c = self._ssm_inputs(x)
        y, h = selective_scan(x, delta, self.A, b, c, return_state=True, backend=backend)
        y = y + self.D.to(y.dtype) * x
        out = seq + self.out_proj((y * F.silu(z)).to(seq.dtype))
        return (out, (padded[..., padded.shape[-1] - self.d_conv + 1:], h)) if return_state else out

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> SSMState:
        return (torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
                torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def step(self, x_t: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """One frame: (B, d_model) and the state after the previous frames -> (B, d_model), new state."""
        conv_in, h = state
        x, z = self.in_proj(self.norm(x_t)).chunk(2, dim=-1)
        window = torch.cat([conv_in.to(x.dtype), x[:, :, None]], dim=-1)  # (B, d_inner, d_conv)
        # the depthwise conv's one output step as a weighted sum: a conv call costs more than its d_conv products
        x = F.silu((window * self.conv.weight[:, 0].to(x.dtype)).sum(-1) + self.conv.bias.to(x.dtype))
        delta, b, c = self._ssm_inputs(x)
        # exp2 and one fused multiply-add over the (B, d_inner, d_state) state (as the scan does): ~3x fewer passes
        decay = torch.exp2(delta[..., None] * (self.A * LOG2E))
        h = torch.addcmul((delta * x.float())[..., None] * b.float()[:, None, :], decay, h)
        y = (h @ c.float()[..., None])[..., 0].to(x.dtype) + self.D.to(x.dtype) * x
        return x_t + self.out_proj((y * F.silu(z)).to(x_t.dtype)), (window[..., 1:], h)


class SSMStack(nn.Module):
    """``blocks`` selective SSM blocks in sequence, with a final LayerNorm."""

    def __init__(self, d_model: int, blocks: int, d_state: int = 16, d_conv: int = 4, expand: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(SelectiveSSM(d_model, d_state, d_conv, expand) for _ in range(blocks))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, seq: torch.Tensor, return_state: bool = False):
        """(B, L, d_model) -> (B, L, d_model); with ``return_state`` also every block's state after the last step."""
        states = []
        for block in self.blocks:
            seq, s = block(seq, return_state=True)
            states.append(s)
        return (self.norm(seq), states) if return_state else self.norm(seq)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> list[SSMState]:
        return [block.init_state(batch, device, dtype) for block in self.blocks]

    def step(self, x_t: torch.Tensor, state: list[SSMState]) -> tuple[torch.Tensor, list[SSMState]]:
        new = []
        for block, s in zip(self.blocks, state):
            x_t, s = block.step(x_t, s)
            new.append(s)
        return self.norm(x_t), new
