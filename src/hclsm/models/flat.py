"""Flat SSM: the no-slot baseline of the dynamics benchmark.

One latent vector per frame instead of a set of object slots; everything else is built from the same
parts as HCLSM, so comparing the two isolates what the object decomposition buys:

* **encoder**: HCLSM's perception encoder (``build_encoder(cfg.perception)``): frames (resized by area to
  ``perception.image_size``) -> tokens (B, T, M, d_world) on a (g x g) grid;
* **pool**: stride-2 3x3 convolutions of width ``c`` halve the token grid until it is at most 4 x 4 (at
  least once); the (c, P, P) map is flattened, projected to the latent ``z_t`` of width ``d`` and
  normalised (LayerNorm without a gain: a fixed latent scale, so the latent loss cannot shrink the latents
  away);
* **dynamics**: ``x_t = z_t + Linear(action_t)`` (the action taken between t and t + 1; zero actions for
  data without any) runs through an ``SSMStack`` (``dynamics.l0`` sizes), and a head predicts the next
  latent as a residual, ``zhat_{t+1} = norm(z_t + head(h_t))`` (normalised like the encoder's latents, so
  a rollout feeds back inputs of the same scale; the head starts near zero: "nothing changes");
* **decoder**: Linear to a (c, s0, s0) map, stride-2 transposed convolutions up to
  ``decoder.resolution`` (s0 = the resolution halved while even and above 4), then a 3x3 convolution to
  RGB.

Losses (unweighted, by name; the same in both training stages): ``frame`` = pixel MSE of decoding z_t
against frame t (reconstruction) + pixel MSE of decoding zhat_{t+1} against frame t + 1 (frames resized
by area to ``decoder.resolution``); ``jepa`` = MSE of zhat_{t+1} against the detached z_{t+1}. Every part
is per frame or causal in time, so nothing at step t reads a frame after t (tested).

**Sizes come from the HCLSM config fields** so that ``build_model(cfg)`` rebuilds a saved run exactly:
``d = slots.d_slot`` (the whole scene is the one slot), ``c = decoder.hidden``, the SSM from
``dynamics.l0``. ``flat_config_matching`` picks ``d`` so that the model has as many trainable parameters
as a given HCLSM. The count (``flat_parameter_count``), with w = d_world, g the token grid, A = d_action,
L blocks of expand e = expand * d, r = ceil(d / 16), N = d_state, K = d_conv::

    encoder  exactly HCLSM's (counted by building it on the meta device)
    pool     9wc + c + (n_down - 1)(9c^2 + c) + c P^2 d + d          n_down halvings: g -> P <= 4
    action   A d + d                                                 (only when A > 0)
    ssm      L [2d + 3de + e (K + 2r + 3N + 3)] + 2d
    head     4d^2 + 5d
    decoder  c s0^2 d + c s0^2 + n_up (16c^2 + c) + 9 C c + C        n_up doublings: s0 -> resolution, C = 3

It is quadratic in d, dominated by (6L + 4) d^2 once d is large.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

from hclsm import keys
from hclsm.config.model import ModelConfig
from hclsm.models.pretrained import Pretrained
from hclsm.nn.actions import ActionEmbedding
from hclsm.nn.encoders import build_encoder
from hclsm.nn.ssm import SSMStack

POOL_SIDE = 4  # the pool halves the token grid until its side is at most this
DECODER_SIDE = 4  # the decoder starts from the resolution halved while even and above this
WIDTH_STEP = 8  # flat_config_matching tries latent widths in multiples of this


def pool_halvings(grid: int) -> tuple[int, int]:
    """(number of stride-2 convolutions, side after them) taking a ``grid`` token grid to <= POOL_SIDE."""
    n, side = 1, (grid + 1) // 2
    while side > POOL_SIDE:
        n, side = n + 1, (side + 1) // 2
    return n, side


def decoder_doublings(resolution: int) -> tuple[int, int]:
    """(number of stride-2 transposed convolutions, starting side) that end at ``resolution``."""
    n, side = 0, resolution
    while side % 2 == 0 and side > DECODER_SIDE:
        n, side = n + 1, side // 2
    return n, side


class FramePool(nn.Module):
    """Tokens (N, g*g, w) of one frame each -> one latent (N, d): strided convs, flatten, Linear, LayerNorm."""

    def __init__(self, d_world: int, grid: int, width: int, d_latent: int):
        super().__init__()
        self.grid = grid
        n_down, side = pool_halvings(grid)
        convs: list[nn.Module] = []
        for i in range(n_down):
            convs += [nn.Conv2d(d_world if i == 0 else width, width, 3, stride=2, padding=1), nn.ReLU()]
        self.convs = nn.Sequential(*convs)
        self.proj = nn.Linear(width * side * side, d_latent)
        self.norm = nn.LayerNorm(d_latent, elementwise_affine=False)  # a learned gain could shrink the latents

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n, _, w = tokens.shape
        x = self.convs(tokens.transpose(1, 2).reshape(n, w, self.grid, self.grid))  # tokens are row-major
        return self.norm(self.proj(x.flatten(1)))


class FrameDecoder(nn.Module):
    """Latents (N, d) -> frames (N, channels, resolution, resolution)."""

    def __init__(self, d_latent: int, width: int, resolution: int, channels: int):
        super().__init__()
        n_up, self.side = decoder_doublings(resolution)
        self.width = width
        self.proj = nn.Linear(d_latent, width * self.side * self.side)
        layers: list[nn.Module] = []
        for _ in range(n_up):
            layers += [nn.ReLU(), nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)]
        layers += [nn.ReLU(), nn.Conv2d(width, channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.proj(z).reshape(-1, self.width, self.side, self.side))


@dataclass
class FlatOutput:
    latents: torch.Tensor  # (B, T, d) encoder latents z_t
    predicted: torch.Tensor  # (B, T, d) made at step t: the prediction of z_{t+1}
    recon: torch.Tensor  # (B, T, C, R, R) decoded z_t
    predicted_frames: torch.Tensor  # (B, T-1, C, R, R) decoded predictions of frames 1 .. T-1
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class FlatRollout:
    """An autoregressive prediction of ``horizon`` frames after the context frames."""

    frames: torch.Tensor  # (B, H, C, R, R) decoded predictions
    latents: torch.Tensor  # (B, H, d) predicted latents


class FlatSSM(Pretrained, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, l0 = cfg.perception, cfg.dynamics.l0
        d, c = cfg.slots.d_slot, cfg.decoder.hidden
        self.encoder = build_encoder(p)
        self.pool = FramePool(p.d_world, p.grid_size, c, d)
        self.action = ActionEmbedding(cfg.d_action, d, cfg.action_scale) if cfg.d_action > 0 else None
        self.ssm = SSMStack(d, l0.blocks, l0.d_state, l0.d_conv, l0.expand)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        with torch.no_grad():  # start as "nothing changes": the copy-last prediction, then learn the change
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()
        self.decoder = FrameDecoder(d, c, cfg.decoder.resolution, p.channels)

    def _resize(self, video: torch.Tensor, size: int) -> torch.Tensor:
        if video.shape[-2:] == (size, size):
            return video
        return F.interpolate(video.flatten(0, 1), size=(size, size), mode="area").reshape(
            *video.shape[:3], size, size)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video (B, T, C, H, W) -> latents (B, T, d), each frame on its own."""
        tokens = self.encoder(self._resize(video, self.cfg.perception.image_size))  # (B, T, M, d_world)
        return self.pool(tokens.flatten(0, 1)).reshape(*tokens.shape[:2], -1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (..., d) -> frames (..., C, R, R)."""
        frames = self.decoder(latents.reshape(-1, latents.shape[-1]))
        return frames.reshape(*latents.shape[:-1], *frames.shape[1:])

    def _input(self, z: torch.Tensor, action: torch.Tensor | None) -> torch.Tensor:
        return z if self.action is None else z + self.action(action).to(z.dtype)

    def _next(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The next latent: a residual on z, normalised like the encoder's latents (the rollout's inputs)."""
        return F.layer_norm(z + self.head(h), z.shape[-1:])

    def _actions(self, action: torch.Tensor | None, b: int, steps: int, like: torch.Tensor) -> torch.Tensor | None:
        """The actions the SSM input needs (zeros when the data has none); None without conditioning."""
        if self.action is None:
            return None
        if action is None:
            return like.new_zeros(b, steps, self.cfg.d_action)
        if action.shape[1] < steps:
            raise ValueError(f"need actions for {steps} steps (every step the SSM runs), got {action.shape[1]}")
        return action

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0, stage: int = 1) -> FlatOutput:
        """The losses of a clip; ``progress`` and ``stage`` are accepted for the training loop and unused."""
        video = batch[keys.VIDEO]
        b, t = video.shape[:2]
        if t < 2:
            raise ValueError(f"the flat SSM predicts the next frame: clips need at least 2 frames, got {t}")
        z = self.encode(video)
        action = self._actions(batch.get(keys.ACTION), b, t, z)
        predicted = self._next(z, self.ssm(self._input(z, action)))
        recon, predicted_frames = self.decode(torch.cat([z, predicted[:, :-1]], dim=1)).split([t, t - 1], dim=1)
        target = self._resize(video, self.cfg.decoder.resolution).float()
        losses = {
            "frame": F.mse_loss(recon.float(), target) + F.mse_loss(predicted_frames.float(), target[:, 1:]),
            "jepa": F.mse_loss(predicted[:, :-1].float(), z[:, 1:].detach().float()),
        }
        return FlatOutput(z, predicted, recon, predicted_frames, losses)

    def predict_latents(self, z: torch.Tensor, horizon: int, action: torch.Tensor | None = None,
                        shared_context: bool = False) -> torch.Tensor:
        """The latents (B, H, d) of the ``horizon`` steps after the context latents z (B, C, d), autoregressively:
        the first C - 1 context steps run as one sequence, then each predicted latent is the next input.
        ``action`` (B, C + horizon - 1, A): the actions of every step run. ``shared_context``: every sequence has the
        same context and the same actions over it (planning), so the context runs once and its state is shared."""
        if horizon < 1:
            raise ValueError(f"rollout horizon must be >= 1, got {horizon}")
        b, c = z.shape[:2]
        action = self._actions(action, b, c + horizon - 1, z)
        src = slice(0, 1 if shared_context and b > 1 else b)
        if c > 1:
            _, state = self.ssm(self._input(z[src, :c - 1], None if action is None else action[src, :c - 1]),
                                return_state=True)
            if src.stop == 1 and b > 1:
                state = [tuple(x.expand(b, *x.shape[1:]) for x in block) for block in state]
        else:
            state = self.ssm.init_state(b, z.device, z.dtype)
        cur, latents = z[:, -1], []
        for t in range(c - 1, c + horizon - 1):
            h, state = self.ssm.step(self._input(cur, None if action is None else action[:, t]), state)
            cur = self._next(cur, h)
            latents.append(cur)
        return torch.stack(latents, dim=1)

    @torch.no_grad()
    def rollout(self, video: torch.Tensor, horizon: int, action: torch.Tensor | None = None) -> FlatRollout:
        """Predict ``horizon`` frames after the context ``video`` (B, C, 3, H, W), autoregressively
        (``predict_latents``), decoded.

        ``action`` (B, C + horizon - 1, A) are the actions of every step that is run (the context frames
        and all predicted frames but the last); omitted for zero actions or a model without conditioning.
        """
        pred = self.predict_latents(self.encode(video), horizon, action)
        return FlatRollout(self.decode(pred), pred)


def _encoder_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # no memory, no initialisation cost: only the shapes are needed
        encoder = build_encoder(cfg.perception)
    return sum(p.numel() for p in encoder.parameters())


def _latent_params(cfg: ModelConfig, d: int) -> int:
    """Trainable parameters of everything but the encoder at latent width ``d`` (module docstring)."""
    w, c, a, ch = cfg.perception.d_world, cfg.decoder.hidden, cfg.d_action, cfg.perception.channels
    l0 = cfg.dynamics.l0
    n_down, p = pool_halvings(cfg.perception.grid_size)
    n_up, s0 = decoder_doublings(cfg.decoder.resolution)
    e, r = l0.expand * d, math.ceil(d / 16)
    pool = 9 * w * c + c + (n_down - 1) * (9 * c * c + c) + c * p * p * d + d
    action = a * d + d if a > 0 else 0
    ssm = l0.blocks * (2 * d + 3 * d * e + e * (l0.d_conv + 2 * r + 3 * l0.d_state + 3)) + 2 * d
    head = 4 * d * d + 5 * d
    decoder = c * s0 * s0 * d + c * s0 * s0 + n_up * (16 * c * c + c) + 9 * ch * c + ch
    return pool + action + ssm + head + decoder


def flat_parameter_count(cfg: ModelConfig) -> int:
    """Trainable parameters of ``FlatSSM(cfg)``, from the formula in the module docstring (no build)."""
    return _encoder_params(cfg) + _latent_params(cfg, cfg.slots.d_slot)


def flat_config_matching(cfg: ModelConfig, target_params: int, tolerance: float = 0.15) -> ModelConfig:
    """A ``flat_ssm`` config of about ``target_params`` trainable parameters (e.g. an HCLSM's, EMA copies
    excluded): ``cfg``'s encoder, SSM depth and decoder width, with the latent width ``slots.d_slot`` the
    multiple of WIDTH_STEP whose count is nearest. Raises ValueError when none lands within ``tolerance``
    (relative), e.g. when the encoder and convolutions alone already exceed the target."""
    fixed = _encoder_params(cfg)

    def count(d: int) -> int:
        return fixed + _latent_params(cfg, d)

    d = WIDTH_STEP
    while count(d + WIDTH_STEP) <= target_params:  # the count grows with d: the last width not above the target
        d += WIDTH_STEP
    best = min((d, d + WIDTH_STEP), key=lambda k: abs(count(k) - target_params))
    if abs(count(best) - target_params) > tolerance * target_params:
        raise ValueError(f"no flat SSM latent width reaches {target_params:,} parameters within "
                         f"{tolerance:.0%}: the nearest is d={best} with {count(best):,} (of which the encoder "
                         f"is {fixed:,}); change the encoder or decoder.hidden")
    cfg = copy.deepcopy(cfg)  # no sub-config shared with the caller's
    return replace(cfg, name="flat_ssm", slots=replace(cfg.slots, d_slot=best))
