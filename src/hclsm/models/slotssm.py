"""SlotSSM and OC-SlotSSM (Jiang et al., NeurIPS 2024): slots whose states evolve independently
(one selective SSM, weights shared across slots) and interact only through self-attention.

**SlotSSM** (section 4.3): per layer l, with x_t the step's input tokens (B, T, M, d_in)::

    s_t^l   = SlotEncoder(CLS^l, x_t)          first layer, or where the slot count changes (reads s_t^{l-1})
            = s_t^{l-1}                        otherwise
    h^l     = SSM(s^l)                         per slot over time: slots folded into the batch (B*K, T, d),
                                               so every slot runs the same weights with its own state
    s_t^l   = SlotMixer(h_t^l)                 self-attention across the K slots of step t, then an MLP

Nothing at step t reads a step after t: the encoder and the mixer see one step, the SSM is causal.
``step`` runs one time step with the SSM's recurrent state (O(1) per step: the latency benchmark).

**OC-SlotSSM** (section 5.1): the same layer, but every layer's slot encoder is one *inverted*
cross-attention (softmax over the slots, renormalised over the inputs) whose queries are the previous
layer's slots (the first layer's: learnable CLS tokens), reading the frame's CNN tokens; the slots are
decoded by a spatial broadcast decoder into per-slot images and alpha masks (reconstruction objective,
eq. 17); the masks are the argmax of the alphas over slots.

Optional, off by default (``OCSlotSSMConfig``), the levers HCLSM's object layer proved on the ball scenes
(``hclsm.nn.slots.SlotAttention``), added where the paper's design has room for them:

* ``spatial_prior``: every slot carries a position; the inverted attention's logits get
  ``-|x_m - pos_k|^2 / (2 sigma^2)`` (sigma learned), the first layer's positions are learned (a grid at
  init, like the CLS tokens they go with), each later layer's are the previous read's attention centroids;
  ``sharpness_init`` is the learned inverse temperature of those logits. The decoder then broadcasts
  slot-relative coordinates (``decoder.relative_positions``). With ``carry_positions`` the first layer's
  read of frame t is centred on the slots' positions on frame t-1 (as slot attention carries its slots),
  so a slot follows its object through the clip.
* ``background``: slot 0 has no spatial prior and is decoded as a flat colour layer behind the objects.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.config.model import DecoderConfig, PerceptionConfig
from hclsm.nn.attention import MultiHeadAttention, SlotEncoder, SlotMixer, inverted_attention_weights
from hclsm.nn.decoders import SpatialBroadcastDecoder
from hclsm.nn.encoders import CNNEncoder, coord_grid
from hclsm.nn.ssm import SelectiveSSM, SSMState


@dataclass
class SlotSSMConfig:
    """Sizes of a SlotSSM stack. ``slots[l]`` is the number of slots of layer l (len = number of layers)."""

    d_in: int = 64  # width of the input tokens
    d_model: int = 64  # slot width (paper, Blinking Color Balls: 64)
    slots: tuple[int, ...] = (6, 6)  # slots per layer (paper: 6)
    heads: int = 4
    encoder_layers: int = 3  # layers of the first slot encoder (paper: 3); a re-encoder has 1
    d_state: int = 16  # SSM state per channel (paper: 16)
    d_conv: int = 4
    expand: int = 2  # SSM inner width = expand * d_model (paper: 1.25; ours is an integer)

    def __post_init__(self) -> None:
        if not self.slots or min(self.slots) < 1:
            raise ValueError(f"SlotSSMConfig.slots must be a non-empty tuple of positive counts, got {self.slots}")
        if self.d_model % self.heads:
            raise ValueError(f"SlotSSMConfig: heads ({self.heads}) must divide d_model ({self.d_model})")


class SlotSSMLayer(nn.Module):
    """Optional slot encoder, per-slot selective SSM (shared weights), slot mixer."""

    def __init__(self, d: int, heads: int, d_state: int, d_conv: int, expand: int,
                 encoder: nn.Module | None = None, num_slots: int = 2):
        super().__init__()
        self.encoder = encoder
        self.ssm = SelectiveSSM(d, d_state, d_conv, expand)
        self.mixer = SlotMixer(d, heads, attention=num_slots > 1)

    def encode(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (N, L, d_in) of one step each -> slots (N, K, d); identity without an encoder."""
        return inputs if self.encoder is None else self.encoder(inputs)

    def ssm_forward(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, T, K, d) -> (B, T, K, d): each slot's sequence through the same SSM, independently."""
        b, t, k, d = slots.shape
        h = self.ssm(slots.transpose(1, 2).reshape(b * k, t, d))  # (B*K, T, d): slots folded into the batch
        return h.view(b, k, t, d).transpose(1, 2)  # (B, T, K, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, L, d_in) tokens or previous slots -> slots (B, T, K, d)."""
        b, t = x.shape[:2]
        slots = self.encode(x.flatten(0, 1)).unflatten(0, (b, t))  # (B, T, K, d)
        h = self.ssm_forward(slots)
        return self.mixer(h.flatten(0, 1)).unflatten(0, (b, t))

    def step(self, x_t: torch.Tensor, state: SSMState) -> tuple[torch.Tensor, SSMState]:
        """x_t (B, L, d_in) -> slots (B, K, d); ``state`` holds B*K slot states (slots folded into the batch)."""
        slots = self.encode(x_t)  # (B, K, d)
        b, k, d = slots.shape
        h, state = self.ssm.step(slots.reshape(b * k, d), state)  # (B*K, d)
        return self.mixer(h.view(b, k, d)), state


class SlotSSM(nn.Module):
    """The SlotSSM sequence model: tokens (B, T, M, d_in) -> slots (B, T, K_last, d_model)."""

    def __init__(self, cfg: SlotSSMConfig, encode_inputs: bool = True):
        """``encode_inputs=False`` takes slots (B, T, K_0, d_model) as input (no first slot encoder), as
        the SlotSSM of section 3 does when the input is already in slot format."""
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        layers = []
        for i, k in enumerate(cfg.slots):
            if i == 0:
                enc = SlotEncoder(k, d, cfg.heads, cfg.d_in, cfg.encoder_layers) if encode_inputs else None
            else:
                enc = SlotEncoder(k, d, cfg.heads, d, 1) if k != cfg.slots[i - 1] else None
            layers.append(SlotSSMLayer(d, cfg.heads, cfg.d_state, cfg.d_conv, cfg.expand, enc, num_slots=k))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d)

    @property
    def num_slots(self) -> int:
        return self.cfg.slots[-1]

    @property
    def d_model(self) -> int:
        return self.cfg.d_model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def init_state(self, batch: int, device: torch.device | None = None) -> list[SSMState]:
        return [layer.ssm.init_state(batch * k, device) for layer, k in zip(self.layers, self.cfg.slots)]

    def step(self, x_t: torch.Tensor, state: list[SSMState]) -> tuple[torch.Tensor, list[SSMState]]:
        """One time step: x_t (B, M, d_in) -> slots (B, K, d); O(1) in the number of past steps."""
        new = []
        for layer, s in zip(self.layers, state):
            x_t, s = layer.step(x_t, s)
            new.append(s)
        return self.norm(x_t), new


def single_state_ssm(cfg: SlotSSMConfig, d_model: int) -> SlotSSM:
    """The single-state SSM baseline: the same architecture with one slot (a monolithic state) of width
    ``d_model`` (chosen to match the SlotSSM's parameter count)."""
    heads = cfg.heads if d_model % cfg.heads == 0 else 1
    return SlotSSM(SlotSSMConfig(d_in=cfg.d_in, d_model=d_model, slots=(1,) * len(cfg.slots), heads=heads,
                                 encoder_layers=cfg.encoder_layers, d_state=cfg.d_state, d_conv=cfg.d_conv,
                                 expand=cfg.expand))


# ---- OC-SlotSSM ------------------------------------------------------------------------------------

@dataclass
class OCSlotSSMConfig:
    image_size: int = 32  # frames are resized (area) to this side
    patch_size: int = 2  # CNN downsampling factor (token grid = image_size / patch_size)
    d_model: int = 64  # slot and token width (paper, MOVi: 192)
    num_slots: int = 7  # paper, MOVi: 11
    layers: int = 2
    heads: int = 4  # slot-mixer heads
    inverted_heads: int = 1  # inverted-attention heads (the official code uses 1 "to encourage segmentation")
    cnn_layers: int = 4
    d_state: int = 16
    expand: int = 2
    spatial_prior: bool = False  # slot positions + a Gaussian locality term in the inverted attention (module doc)
    background: bool = False  # slot 0: no spatial prior, decoded as a flat background layer
    sigma_init: float = 0.3  # initial width of the spatial prior, in [-1, 1] image coordinates
    sharpness_init: float = 1.0  # initial inverse temperature of the inverted attention's logits (learned)
    # with spatial_prior: the first layer reads frame t around the slots' positions on frame t-1 (a slot follows its
    # object; the reads run frame by frame, the SSMs stay parallel over time)
    carry_positions: bool = False
    # the SlotSSM family keeps the layouts its benchmarks were measured with (transposed-conv decoder, conv stem)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(hidden=32, layers=3, kernel=1, grid_size=8,
                                                                         resolution=32, relative_positions=False,
                                                                         upsample="transposed"))


@dataclass
class OCOutput:
    slots: torch.Tensor  # (B, T, K, d)
    recon: torch.Tensor  # (B, T, 3, R, R)
    alphas: torch.Tensor  # (B, T, K, R, R)
    losses: dict[str, torch.Tensor]

    @property
    def masks(self) -> torch.Tensor:
        """(B, T, R, R) slot ids: argmax of the decoder's alphas over slots."""
        return self.alphas.argmax(dim=2)


def object_encoder(cfg: OCSlotSSMConfig) -> CNNEncoder:
    """The CNN frame encoder shared by OC-SlotSSM and the SAVi-style baseline (tokens of width d_model)."""
    return CNNEncoder(PerceptionConfig(encoder="cnn", image_size=cfg.image_size, patch_size=cfg.patch_size,
                                       stem="conv", d_model=cfg.d_model, layers=cfg.cnn_layers, d_world=cfg.d_model))


def reconstruct(decoder: SpatialBroadcastDecoder, slots: torch.Tensor, video: torch.Tensor,
                positions: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode slots (B, T, K, d) (at ``positions`` (B, T, K, 2), for a decoder with slot-relative
    coordinates); returns (recon (B, T, 3, R, R), alphas (B, T, K, R, R), MSE against ``video``
    (B, T, 3, H, W) resized by area to R)."""
    b, t, k, _ = slots.shape
    flat = slots.flatten(0, 1)  # (B*T, K, d)
    ones = flat.new_ones(b * t, k)
    pos = flat.new_zeros(b * t, k, 2) if positions is None else positions.flatten(0, 1).to(flat.dtype)
    recon, _, alphas = decoder(flat, pos, ones)  # (B*T, 3, R, R), (B*T, K, R, R)
    r = recon.shape[-1]
    target = F.interpolate(video.flatten(0, 1), size=(r, r), mode="area")  # (B*T, 3, R, R)
    return recon.unflatten(0, (b, t)), alphas.unflatten(0, (b, t)), F.mse_loss(recon.float(), target.float())


def resize_video(video: torch.Tensor, size: int) -> torch.Tensor:
    """(B, T, 3, H, W) -> (B, T, 3, size, size) by area (identity when already that size)."""
    if video.shape[-1] == size:
        return video
    return F.interpolate(video.flatten(0, 1), size=(size, size), mode="area").unflatten(0, video.shape[:2])


class OCSlotSSMLayer(SlotSSMLayer):
    """Inverted cross-attention from the previous slots to the frame tokens, per-slot SSM, slot mixer."""

    def __init__(self, d: int, heads: int, inverted_heads: int, d_state: int, expand: int):
        super().__init__(d, heads, d_state, 4, expand, encoder=None)
        self.norm_q, self.norm_in = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, inverted_heads, inverted=True)

    def read(self, slots: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (N, K, d) query tokens (N, M, d) by inverted attention (residual) -> (N, K, d), and the
        weights (N, K, M) averaged over heads (each slot's sum to 1 over the tokens). ``bias`` (N, K, M) is
        added to the logits (the spatial prior), ``scale`` multiplies them (a learned inverse temperature)."""
        a = self.attn
        q = a._split(a.q(self.norm_q(slots)))  # (N, h, K, d_h)
        k, v = a.keys_values(self.norm_in(tokens))  # (N, h, M, d_h)
        logits = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (N, h, K, M)
        if scale is not None:
            logits = logits * scale
        if bias is not None:
            logits = logits + bias[:, None]
        w = inverted_attention_weights(logits)  # softmax over the slots, renormalised over the tokens
        y = (w.to(v.dtype) @ v).transpose(1, 2).flatten(2)  # (N, K, d)
        return slots + a.out(y), w.mean(1)

    def forward_oc(self, slots: torch.Tensor, tokens: torch.Tensor, bias: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """slots (B, T, K, d), tokens (B, T, M, d) -> slots (B, T, K, d) and the read's weights (B, T, K, M)."""
        b, t = slots.shape[:2]
        s, w = self.read(slots.flatten(0, 1), tokens.flatten(0, 1),
                         None if bias is None else bias.flatten(0, 1), scale)
        return self.evolve(s.unflatten(0, (b, t))), w.unflatten(0, (b, t))

    def evolve(self, slots: torch.Tensor) -> torch.Tensor:
        """Read slots (B, T, K, d) through the per-slot SSM and the slot mixer -> (B, T, K, d)."""
        b, t = slots.shape[:2]
        h = self.ssm_forward(slots)
        return self.mixer(h.flatten(0, 1)).unflatten(0, (b, t))


class OCSlotSSM(nn.Module):
    """OC-SlotSSM: video (B, T, 3, H, W) -> slots, reconstruction and alpha masks (``OCOutput``)."""

    def __init__(self, cfg: OCSlotSSMConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.encoder = object_encoder(cfg)
        self.cls = nn.Parameter(torch.randn(cfg.num_slots, d) * d ** -0.5)  # first layer's queries (K, d)
        self.layers = nn.ModuleList(OCSlotSSMLayer(d, cfg.heads, cfg.inverted_heads, cfg.d_state, cfg.expand)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(d)
        self.decoder = SpatialBroadcastDecoder(d, 3, cfg.decoder, background=cfg.background)
        if cfg.spatial_prior:
            k = cfg.num_slots
            side = math.ceil(math.sqrt(k - cfg.background))
            c = torch.linspace(-0.6, 0.6, side)
            grid = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1).reshape(-1, 2)[:k - cfg.background]
            grid = torch.cat([grid.new_zeros(int(cfg.background), 2), grid])  # the background's is unused
            self.query_pos = nn.Parameter(grid)  # (K, 2): the first layer's slot positions
            self.log_sigma = nn.Parameter(torch.full((1,), math.log(cfg.sigma_init)))
            self.log_sharpness = nn.Parameter(torch.full((1,), math.log(cfg.sharpness_init)))
            prior = torch.ones(k)
            prior[:int(cfg.background)] = 0.0
            self.register_buffer("prior_mask", prior, persistent=False)
            self.register_buffer("coords", coord_grid(self.encoder.grid), persistent=False)  # (M, 2) token centres

    def _prior(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, T, K, M) spatial-prior logits of slots at ``pos`` (B, T, K, 2) over the token grid."""
        d2 = (self.coords[None, None, None] - pos.float()[..., None, :]).pow(2).sum(-1)  # (B, T, K, M)
        return -d2 * self.prior_mask[:, None] / (2 * torch.exp(2 * self.log_sigma.float()))

    def _track(self, layer: OCSlotSSMLayer, tokens: torch.Tensor, scale: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer with ``carry_positions``: frame t's read is centred on frame t-1's attention centroids
        (frame 0's on those of a first read from the learned positions), then the SSM and mixer over all frames.
        Returns slots (B, T, K, d) and positions (B, T, K, 2)."""
        b, t = tokens.shape[:2]
        cls = self.cls.expand(b, -1, -1)  # (B, K, d)
        pos = self.query_pos.expand(b, -1, -1)  # (B, K, 2)
        _, w = layer.read(cls, tokens[:, 0], self._prior(pos[:, None])[:, 0], scale)  # settle frame 0
        pos = w @ self.coords
        reads, where = [], []
        for i in range(t):
            s, w = layer.read(cls, tokens[:, i], self._prior(pos[:, None])[:, 0], scale)
            pos = w @ self.coords
            reads.append(s)
            where.append(pos)
        return layer.evolve(torch.stack(reads, dim=1)), torch.stack(where, dim=1)

    def forward(self, video: torch.Tensor) -> OCOutput:
        video = resize_video(video, self.cfg.image_size)
        b, t = video.shape[:2]
        tokens = self.encoder(video)  # (B, T, M, d)
        slots = self.cls.expand(b, t, -1, -1)  # (B, T, K, d)
        prior = self.cfg.spatial_prior
        pos = self.query_pos.expand(b, t, -1, -1) if prior else None  # (B, T, K, 2)
        scale = torch.exp(self.log_sharpness.float()) if prior else None
        for i, layer in enumerate(self.layers):
            if i == 0 and prior and self.cfg.carry_positions:
                slots, pos = self._track(layer, tokens, scale)
                continue
            slots, w = layer.forward_oc(slots, tokens, self._prior(pos) if prior else None, scale)
            if prior:
                pos = w @ self.coords  # (B, T, K, 2): each slot's attention centroid
        slots = self.norm(slots)
        recon, alphas, mse = reconstruct(self.decoder, slots, video, pos)
        return OCOutput(slots=slots, recon=recon, alphas=alphas, losses={"recon": mse})
