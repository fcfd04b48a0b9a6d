"""Spatial broadcast decoder with alive-only alpha compositing.

Each slot is broadcast to a ``grid_size`` grid, given the grid's coordinates (absolute, or relative to the
slot's attention centroid, optionally with Fourier features), decoded independently by a shared per-cell
network (kernel 1 = a per-cell MLP) and brought to the output resolution. The output has ``d_out`` target
channels plus one alpha logit. Alphas are a softmax over slots multiplied by the alive gate and
renormalised over the alive slots (``alpha_k = softmax_k * g_k / sum_j softmax_j * g_j``), so a dead slot
draws nothing and, in training, the straight-through gate receives the reconstruction's gradient.

Two ways to reach the output resolution (``DecoderConfig.upsample``):

* ``subpixel`` (default): the last layer emits every output pixel of its cell at once (``r * r`` pixels
  for an upsampling factor ``r``, each its own linear read-out of the cell's features), rearranged into
  the image (a pixel shuffle). All the network's work happens on the coarse grid, and with kernel 1 it runs
  as plain matrix products on channel-last tensors: about 6x cheaper than ``transposed`` at the tiny
  preset's sizes (``hclsm bench throughput``).
* ``transposed``: stride-2 transposed convolutions (4x4) on full feature maps, then a 1x1 read-out: the
  original layout, kept for the models trained with it.

With ``background`` the first slot is decoded differently: a spatially constant target value and alpha
logit (a linear map of the slot). The background layer can then only fill in behind the objects; it
cannot paint a moving object itself, which a full per-pixel decoder on a slot that attends to the
whole frame learns to do (and then every object slot is redundant).

With ``bounded`` (pixel targets, ``DecoderConfig.bounded_content``) an object's content is squashed into [0, 1] like
the pixels it draws. Unbounded, a half-transparent object can brighten its content to make up for the background
showing through, and the reconstruction then barely asks for opaque objects: masks go soft and their argmax loses
the objects' edges (measured: the background kept a median alpha of 0.17 inside the balls). With ``DecoderConfig.static_background``
the layer paints the dataset's static scene instead of a flat colour: a fixed image (``set_static``, the
per-pixel median of the training frames) plus the slot's constant offset (a scene with a textured floor or a
fixed goal marking, as PushT's, is then background, not an object).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hclsm.config.model import DecoderConfig
from hclsm.nn.encoders import coord_grid


def fourier_features(xy: torch.Tensor, octaves: int) -> torch.Tensor:
    """(..., 2) coordinates -> (..., 2 + 4 * octaves): the coordinates, then sin and cos of
    ``2^k * pi * xy`` for k < ``octaves`` (so a per-pixel MLP can draw edges sharper than a grid cell)."""
    if octaves == 0:
        return xy
    freq = math.pi * 2.0 ** torch.arange(octaves, device=xy.device, dtype=xy.dtype)  # (F,)
    angles = (xy[..., None] * freq).flatten(-2)  # (..., 2F)
    return torch.cat([xy, angles.sin(), angles.cos()], dim=-1)


class SpatialBroadcastDecoder(nn.Module):
    def __init__(self, d_slot: int, d_out: int, cfg: DecoderConfig, background: bool = False, bounded: bool = False):
        super().__init__()
        self.cfg, self.d_out, self.bounded = cfg, d_out, bounded
        self.background = nn.Linear(d_slot, d_out + 1) if background else None
        # the static scene the background layer paints (zeros = a flat colour); saved with the weights when used
        self.register_buffer("static", torch.zeros(d_out, cfg.resolution, cfg.resolution),
                             persistent=background and cfg.static_background)
        d_pos = 2 + 4 * cfg.fourier_octaves if cfg.relative_positions else 4
        self.pos = nn.Linear(d_pos, d_slot)
        self.ratio = cfg.resolution // cfg.grid_size  # upsampling factor
        self.linear = cfg.upsample != "transposed" and cfg.kernel == 1  # per-cell MLP as matrix products
        layers: list[nn.Module] = []
        c_in = d_slot
        for _ in range(cfg.layers):
            layers += [nn.Linear(c_in, cfg.hidden) if self.linear
                       else nn.Conv2d(c_in, cfg.hidden, cfg.kernel, padding=cfg.kernel // 2), nn.ReLU()]
            c_in = cfg.hidden
        if cfg.upsample != "transposed":  # smooth: one more value per cell, bilinearly upsampled under the rest
            n_out = (d_out + 1) * (self.ratio ** 2 + (cfg.upsample == "smooth"))
            layers.append(nn.Linear(cfg.hidden, n_out) if self.linear else nn.Conv2d(cfg.hidden, n_out, 1))
        else:
            size = cfg.grid_size
            while size < cfg.resolution:
                layers += [nn.ConvTranspose2d(cfg.hidden, cfg.hidden, 4, stride=2, padding=1), nn.ReLU()]
                size *= 2
            layers.append(nn.Conv2d(cfg.hidden, d_out + 1, 1))
        self.net = nn.Sequential(*layers)
        self.register_buffer("grid", coord_grid(cfg.grid_size), persistent=False)  # (G*G, 2)

    def _position_features(self, positions: torch.Tensor) -> torch.Tensor:
        """The grid coordinates each object slot is broadcast with: (B, K, G*G, d_pos) relative to the slots'
        ``positions`` (B, K, 2), or (1, 1, G*G, 4) absolute ones."""
        if self.cfg.relative_positions:
            rel = self.grid[None, None] - positions[:, :, None, :].to(self.grid.dtype)  # (B, K, G*G, 2)
            return fourier_features(rel, self.cfg.fourier_octaves)
        xy = (self.grid + 1) / 2
        return torch.cat([xy, 1 - xy], dim=-1)[None, None]

    def _run(self, slots: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Object slots (B, K, d) and their grids' coordinate features -> decoded maps (B*K, d_out + 1, R, R).

        The network reads ``slot + pos(feats)`` at every cell. With the per-cell MLP the first layer is applied
        to the two terms apart, ``W1 slot + (W1 P) feats + ...``: the same function, without a d_slot-wide
        tensor per cell (the slot is constant over its grid)."""
        g, r = self.cfg.grid_size, self.ratio
        c = self.d_out + 1
        if self.linear:  # channel-last all the way: (B, K, G*G, .) -> (B*K, G*G, r*r*(d_out+1))
            first = self.net[0]
            w = first.weight @ self.pos.weight.to(first.weight.dtype)  # (hidden, d_pos)
            h = first(slots)[:, :, None] + nn.functional.linear(feats.to(w.dtype), w, first.weight @ self.pos.bias)
            n = h.shape[0] * h.shape[1]
            out = self.net[1:](h).reshape(n, g, g, -1)
            fine = out[..., :r * r * c].reshape(n, g, g, r, r, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, g * r, g * r)
            if self.cfg.upsample == "smooth":
                coarse = out[..., r * r * c:].permute(0, 3, 1, 2)  # (N, C, G, G)
                fine = fine + nn.functional.interpolate(coarse, scale_factor=r, mode="bilinear", align_corners=False)
            return fine
        x = (slots[:, :, None, :] + self.pos(feats.to(slots.dtype))).flatten(0, 1)  # (B*K, G*G, d)
        out = self.net(x.reshape(x.shape[0], g, g, -1).permute(0, 3, 1, 2))  # (B*K, C', G', G')
        if self.cfg.upsample == "transposed":
            return out
        fine = nn.functional.pixel_shuffle(out[:, :r * r * c], r)
        if self.cfg.upsample == "smooth":
            fine = fine + nn.functional.interpolate(out[:, r * r * c:], scale_factor=r, mode="bilinear",
                                                    align_corners=False)
        return fine

    def decode(self, slots: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, K, d), positions (B, K, 2) in [-1, 1] -> per-slot content (B, K, d_out, R, R) and
        alpha logits (B, K, R, R), fp32."""
        n_bg = int(self.background is not None)
        bg_slot, slots, positions = slots[:, :n_bg], slots[:, n_bg:], positions[:, n_bg:]
        b, k, _ = slots.shape
        out = self._run(slots, self._position_features(positions))  # (B*K, d_out + 1, R, R)
        r = out.shape[-1]
        out = out.reshape(b, k, self.d_out + 1, r, r)
        if self.bounded:  # object content in [0, 1], as the pixels it draws
            out = torch.cat([torch.sigmoid(out[:, :, :self.d_out]), out[:, :, self.d_out:]], dim=2)
        if self.background is not None:  # the layer behind the objects: a constant (plus the static scene)
            flat = self.background(bg_slot)[..., None, None].expand(-1, -1, -1, r, r)  # (B, 1, d_out + 1, R, R)
            if self.cfg.static_background:
                flat = flat + torch.cat([self.static, self.static.new_zeros(1, r, r)])
            out = torch.cat([flat.to(out.dtype), out], dim=1)
        return out[:, :, :self.d_out], out[:, :, self.d_out].float()

    @torch.no_grad()
    def set_static(self, image: torch.Tensor) -> None:
        """The static scene (d_out, H, W) (e.g. ``MemoryClips.median_frame``), resized to the decoder's resolution."""
        r = self.cfg.resolution
        self.static.copy_(nn.functional.interpolate(image[None].float(), size=(r, r), mode="area")[0])

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
