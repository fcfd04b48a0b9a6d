"""Frame encoders: video (B, T, C, H, W) -> tokens (B, T, M, d_world) on a (grid x grid) token grid.

``CNNEncoder`` is a small SAVi/SlotSSM-style conv stack for low-resolution CPU runs; ``ViTEncoder`` is
the seed's patch ViT with a learned spatial and a learned temporal position embedding; ``DINOv2Encoder`` is a
frozen pretrained DINOv2 (DINOSAUR, VideoSAUR and C-JEPA build on its features). All end with a LayerNorm + MLP
projection into the token space the slots read (``d_world``); for the frozen backbone it is the only trained part.
"""
from __future__ import annotations

import torch
from torch import nn

from hclsm.config.model import PerceptionConfig
from hclsm.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2 was trained on frames normalised by ImageNet's statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
SAVE_DINOV2 = ("python -c \"from transformers import Dinov2Model; Dinov2Model.from_pretrained('facebook/dinov2-small')"
               ".save_pretrained('dinov2-small')\"")  # run where the hub is reachable; then weights=dinov2-small


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


def load_dinov2(weights: str) -> nn.Module:
    """The ``transformers.Dinov2Model`` saved at ``weights`` (a ``save_pretrained`` directory, or a hub id already in
    the local cache), in eval mode; never downloads. A missing package or unreadable weights raise ``ConfigError``."""
    try:
        from transformers import AutoConfig, Dinov2Config, Dinov2Model
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise ConfigError("model.perception.encoder: dinov2 needs the transformers package; "
                          "pip install 'hclsm[pretrained]'") from None
    key = "model.perception.weights"
    try:
        config = AutoConfig.from_pretrained(weights, local_files_only=True)
        if not isinstance(config, Dinov2Config):
            raise ConfigError(f"{key}: {weights} holds a {config.model_type!r} model, not DINOv2; point it at a "
                              f"DINOv2 saved with {SAVE_DINOV2}")
        quiet = hf_logging.is_progress_bar_enabled()
        if quiet:  # a local read of a few files: no bar of transformers' own beside hclsm's
            hf_logging.disable_progress_bar()
        try:
            return Dinov2Model.from_pretrained(weights, config=config, local_files_only=True).eval()
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
    except (OSError, ValueError) as e:  # no such directory, no config.json / weights there, not in the cache
        reason = " ".join(str(e).split())[:200]
        raise ConfigError(f"{key}: cannot load a DINOv2 backbone from {weights!r} without downloading ({reason}); "
                          f"save one where the hub is reachable with {SAVE_DINOV2} and pass its directory") from None


class DINOv2Encoder(nn.Module):
    """A frozen DINOv2 (``load_dinov2(cfg.weights)``) and a trained LayerNorm + MLP projection of its features.

    The backbone gets no gradient (``requires_grad`` off, so the optimizer never holds it), stays in eval mode
    whatever mode the model is put in, and runs under ``torch.no_grad()``. ``features`` are its last layer's patch
    tokens (the CLS token dropped), which a feature-target decoder reconstructs (DINOSAUR); ``forward`` projects
    them to ``d_world`` for slot attention. Frames are ImageNet-normalised first, as DINOv2 was trained."""

    def __init__(self, cfg: PerceptionConfig):
        super().__init__()
        self.backbone = load_dinov2(cfg.weights).requires_grad_(False)
        patch = self.backbone.config.patch_size
        if patch != cfg.patch_size:
            raise ConfigError(f"model.perception.patch_size: the backbone in {cfg.weights} has {patch}-pixel patches, "
                              f"got {cfg.patch_size}; set model.perception.patch_size={patch}")
        self.feature_dim = self.backbone.config.hidden_size  # 384 for ViT-S/14
        self.tokens = cfg.grid_size ** 2
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.out = _projection(self.feature_dim, cfg.d_world)
        self.dropout = nn.Dropout(cfg.dropout)

    def train(self, mode: bool = True) -> "DINOv2Encoder":
        super().train(mode)
        self.backbone.eval()  # frozen: the same features in training as at evaluation (no dropout, no drop-path)
        return self

    @torch.no_grad()
    def features(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) in [0, 1] -> the backbone's patch features (B, T, M, feature_dim), no gradient."""
        b, t = video.shape[:2]
        x = (video.flatten(0, 1) - self.mean) / self.std  # (B*T, 3, H, W)
        h = self.backbone(pixel_values=x).last_hidden_state  # (B*T, 1 + M, D): CLS first, then row-major patches
        if h.shape[1] != 1 + self.tokens:
            raise ValueError(f"the backbone gave {h.shape[1] - 1} patch tokens for {tuple(x.shape[-2:])} frames, "
                             f"expected {self.tokens}")
        return h[:, 1:].reshape(b, t, self.tokens, -1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features (B, T, M, D) -> tokens (B, T, M, d_world) (trained)."""
        return self.dropout(self.out(features))

    def forward(self, video: torch.Tensor, t0: int = 0) -> torch.Tensor:
        """(B, T, C, H, W) -> tokens (B, T, M, d_world); ``t0`` is unused (no temporal embedding)."""
        return self.project(self.features(video))


def build_encoder(cfg: PerceptionConfig) -> nn.Module:
    if cfg.encoder == "dinov2":
        return DINOv2Encoder(cfg)
    return CNNEncoder(cfg) if cfg.encoder == "cnn" else ViTEncoder(cfg)
