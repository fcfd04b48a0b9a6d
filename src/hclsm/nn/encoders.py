"""Frame encoders: video (B, T, C, H, W) -> tokens (B, T, M, d_world) on a (grid x grid) token grid.

``CNNEncoder`` is a small SAVi/SlotSSM-style conv stack for low-resolution CPU runs; ``ViTEncoder`` is
the seed's patch ViT with a learned spatial and a learned temporal position embedding. Both end with a
LayerNorm + MLP projection into the token space the slots read (``d_world``).
"""
from __future__ import annotations

import torch
from torch import nn

from hclsm.config.model import PerceptionConfig


def coord_grid(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(size*size, 2) pixel-centre coordinates (x, y) in [-1, 1], row-major (y outer, x inner)."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)


def _projection(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d_in), nn.ReLU(), nn.Linear(d_in, d_out))


class CNNEncoder(nn.Module):
    """A stem down to the token grid, then stride-1 3x3 convs (``layers`` in total), ReLU; a linear embedding of
    the (x, y, 1-x, 1-y) grid added; LayerNorm + MLP.

    The stem (``PerceptionConfig.stem``) is either ``patch``: one ``patch_size`` x ``patch_size`` convolution of
    stride ``patch_size`` (each token reads its own patch of pixels, as a ViT's patch embedding; every later
    layer runs on the token grid), or ``conv``: log2(patch_size) stride-2 5x5 convolutions (SAVi's stack; the
    early layers run at 2x and 4x the grid's resolution, several times the cost)."""

    def __init__(self, cfg: PerceptionConfig):
        super().__init__()
        patchify = cfg.stem == "patch"
        n_down = 1 if patchify else cfg.patch_size.bit_length() - 1  # layers that downsample
        convs: list[nn.Module] = []
        c_in = cfg.channels
        for i in range(max(cfg.layers, n_down)):
            if i >= n_down:
                k, stride, pad = 3, 1, 1
            else:
                k, stride, pad = (cfg.patch_size, cfg.patch_size, 0) if patchify else (5, 2, 2)
            convs += [nn.Conv2d(c_in, cfg.d_model, k, stride=stride, padding=pad), nn.ReLU()]
            c_in = cfg.d_model
        self.convs = nn.Sequential(*convs)
        self.grid = cfg.grid_size
        self.pos = nn.Linear(4, cfg.d_model)
        self.out = _projection(cfg.d_model, cfg.d_world)
        # skip connection of the pixels themselves (area-pooled to the token grid): colour reaches the
        # slots directly instead of having to survive the conv stack
        self.pixels = nn.Linear(cfg.channels, cfg.d_world)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, video: torch.Tensor, t0: int = 0) -> torch.Tensor:
        """(B, T, C, H, W) -> tokens (B, T, M, d_world); ``t0`` (the clip's first frame index) is unused: the CNN
        has no temporal embedding."""
        b, t = video.shape[:2]
        frames = video.flatten(0, 1)
        x = self.convs(frames)  # (B*T, d, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B*T, M, d)
        xy = (coord_grid(self.grid, x.device) + 1) / 2  # (M, 2) in [0, 1]
        x = x + self.pos(torch.cat([xy, 1 - xy], dim=-1))
        rgb = nn.functional.adaptive_avg_pool2d(frames, self.grid).flatten(2).transpose(1, 2)  # (B*T, M, C)
        return self.dropout(self.out(x) + self.pixels(rgb)).reshape(b, t, x.shape[1], -1)


class ViTEncoder(nn.Module):
    """Patch embedding + learned spatial and temporal position embeddings + pre-norm transformer blocks
    (attention within a frame), then LayerNorm + MLP to ``d_world``."""

    def __init__(self, cfg: PerceptionConfig):
        super().__init__()
        m = cfg.grid_size ** 2
        self.patch = nn.Conv2d(cfg.channels, cfg.d_model, cfg.patch_size, stride=cfg.patch_size)
        self.pos = nn.Parameter(torch.randn(m, cfg.d_model) * 0.02)
        self.time_pos = nn.Parameter(torch.randn(cfg.max_frames, cfg.d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.out = _projection(cfg.d_model, cfg.d_world)

    def forward(self, video: torch.Tensor, t0: int = 0) -> torch.Tensor:
        b, t = video.shape[:2]
        if t0 + t > self.time_pos.shape[0]:
            raise ValueError(f"clip frames {t0}..{t0 + t - 1} exceed model.perception.max_frames "
                             f"({self.time_pos.shape[0]})")
        x = self.patch(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, M, d)
        tp = self.time_pos[t0:t0 + t].repeat(b, 1)[:, None]  # (B*T, 1, d)
        x = self.blocks(x + self.pos + tp)
        return self.out(x).reshape(b, t, x.shape[1], -1)


def build_encoder(cfg: PerceptionConfig) -> nn.Module:
    return CNNEncoder(cfg) if cfg.encoder == "cnn" else ViTEncoder(cfg)
