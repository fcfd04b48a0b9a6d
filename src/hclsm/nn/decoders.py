"""Spatial broadcast decoder with alive-only alpha compositing.

Each slot is broadcast to a grid, given its coordinates (absolute, or relative to the slot's attention
centroid), decoded independently by shared convolutions (kernel 1 = a per-pixel MLP) and upsampled to
the output resolution. The output has ``d_out`` target channels plus one alpha logit. Alphas are a
softmax over slots multiplied by the alive gate and renormalised over the alive slots
(``alpha_k = softmax_k * g_k / sum_j softmax_j * g_j``), so a dead slot draws nothing and, in training,
the straight-through gate receives the reconstruction's gradient.

With ``background`` the first slot is decoded differently: a spatially constant target value and alpha
logit (a linear map of the slot). The background layer can then only fill in behind the objects; it
cannot paint a moving object itself, which a full per-pixel decoder on a slot that attends to the
whole frame learns to do (and then every object slot is redundant).
"""
from __future__ import annotations

import torch
from torch import nn

from hclsm.config.model import DecoderConfig
from hclsm.nn.encoders import coord_grid


class SpatialBroadcastDecoder(nn.Module):
    def __init__(self, d_slot: int, d_out: int, cfg: DecoderConfig, background: bool = False):
        super().__init__()
        self.cfg, self.d_out = cfg, d_out
        self.background = nn.Linear(d_slot, d_out + 1) if background else None
        self.pos = nn.Linear(4 if not cfg.relative_positions else 2, d_slot)
        layers: list[nn.Module] = []
        c_in = d_slot
        for _ in range(cfg.layers):
            layers += [nn.Conv2d(c_in, cfg.hidden, cfg.kernel, padding=cfg.kernel // 2), nn.ReLU()]
            c_in = cfg.hidden
        size = cfg.grid_size
        while size < cfg.resolution:
            layers += [nn.ConvTranspose2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1), nn.ReLU()]
            size *= 2
        layers.append(nn.Conv2d(cfg.hidden, d_out + 1, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("grid", coord_grid(cfg.grid_size), persistent=False)  # (G*G, 2)

    def decode(self, slots: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, K, d), positions (B, K, 2) in [-1, 1] -> per-slot content (B, K, d_out, R, R) and
        alpha logits (B, K, R, R), fp32."""
        n_bg = int(self.background is not None)
        bg_slot, slots, positions = slots[:, :n_bg], slots[:, n_bg:], positions[:, n_bg:]
        b, k, d = slots.shape
        g = self.cfg.grid_size
        if self.cfg.relative_positions:
            rel = self.grid[None, None] - positions[:, :, None, :].to(self.grid.dtype)  # (B, K, G*G, 2)
            pos = self.pos(rel.to(slots.dtype))
        else:
            xy = (self.grid + 1) / 2
            pos = self.pos(torch.cat([xy, 1 - xy], dim=-1).to(slots.dtype))[None, None]
        x = slots[:, :, None, :] + pos  # (B, K, G*G, d)
        x = x.reshape(b * k, g, g, d).permute(0, 3, 1, 2)
        out = self.net(x)  # (B*K, d_out + 1, R, R)
        r = out.shape[-1]
        out = out.reshape(b, k, self.d_out + 1, r, r)
        if self.background is not None:  # constant layer behind the objects
            flat = self.background(bg_slot)[..., None, None].expand(-1, -1, -1, r, r)  # (B, 1, d_out + 1, R, R)
            out = torch.cat([flat.to(out.dtype), out], dim=1)
        return out[:, :, :self.d_out], out[:, :, self.d_out].float()

    @staticmethod
    def composite(content: torch.Tensor, logits: torch.Tensor, alive: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Alive-only alpha compositing: (recon (B, d_out, R, R), alphas (B, K, R, R)) for gate (B, K)."""
        soft = logits.softmax(dim=1) * alive.float()[:, :, None, None]
        alphas = soft / soft.sum(dim=1, keepdim=True).clamp_min(1e-8)
        recon = (alphas.unsqueeze(2).to(content.dtype) * content).sum(dim=1)
        return recon, alphas

    def forward(self, slots: torch.Tensor, positions: torch.Tensor, alive: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """slots (B, K, d), positions (B, K, 2) in [-1, 1], alive gate (B, K) in [0, 1].

        Returns (recon (B, d_out, R, R), per-slot content (B, K, d_out, R, R), alphas (B, K, R, R)).
        """
        content, logits = self.decode(slots, positions)
        recon, alphas = self.composite(content, logits, alive)
        return recon, content, alphas
