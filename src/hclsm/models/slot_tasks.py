"""Task heads around the SlotSSM family's sequence models (the paper's sections 7.1 and 7.2).

* ``build_backbone(kind, ...)``: ``slotssm``, ``single_ssm`` (one slot), ``slot_transformer`` or
  ``slot_rnn``, with one interface (``forward``, ``init_state``, ``step``; see ``slot_baselines``).
* ``SlotQueryDecoder``: the paper's image decoder (App. C.3 eq. 35-37): one learned query per output
  patch; each layer self-attention among the queries, cross-attention to the slots, MLP (pre-LN
  residual); a linear head gives each patch's values.
* ``VideoPredictor`` (7.1): frames -> patch tokens (linear embedding + learned spatial position) ->
  backbone -> slots of step t -> decoder -> frame t+1. Trained with teacher forcing and, as in the paper,
  binary cross-entropy on the pixel values (``losses``; their MSE is reported beside it), optionally plus
  the same on frames predicted in open loop (``losses(open_loop=n)``); ``rollout`` feeds its own
  predictions back, one ``step`` at a time.
* ``BlinkingClassifier`` (7.2): a long sequence of image patches; each patch is cut into sub-patch
  tokens with spatial (patch and sub-patch) and temporal (frame) position embeddings; the slots of the
  last step are decoded into 7-way colour logits for every pixel of the target image.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.models.slot_baselines import SlotRNN, SlotTransformer
from hclsm.models.slotssm import SlotSSM, SlotSSMConfig, single_state_ssm
from hclsm.nn.attention import SlotEncoderLayer

BACKBONES = ("slotssm", "single_ssm", "slot_transformer", "slot_rnn")


def build_backbone(kind: str, d_in: int, d_model: int, num_slots: int = 6, layers: int = 2, heads: int = 4,
                   encoder_layers: int = 3, d_state: int = 16) -> nn.Module:
    """A sequence model (B, T, M, d_in) -> (B, T, K, d_model) of the given ``kind`` (one of BACKBONES)."""
    cfg = SlotSSMConfig(d_in=d_in, d_model=d_model, slots=(num_slots,) * layers, heads=heads,
                        encoder_layers=encoder_layers, d_state=d_state)
    if kind == "slotssm":
        return SlotSSM(cfg)
    if kind == "single_ssm":
        return single_state_ssm(cfg, d_model)
    if kind == "slot_transformer":
        return SlotTransformer(d_in, d_model, num_slots, layers, heads, encoder_layers)
    if kind == "slot_rnn":
        return SlotRNN(d_in, d_model, num_slots, layers, heads, encoder_layers)
    raise ValueError(f"unknown backbone {kind!r}; choose one of {', '.join(BACKBONES)}")


class SlotQueryDecoder(nn.Module):
    """slots (N, K, d) -> (N, P, d_out): P learned patch queries read the slots through ``layers`` layers."""

    def __init__(self, d: int, heads: int, patches: int, d_out: int, layers: int = 3):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(patches, d) * 0.02)  # (P, d)
        self.layers = nn.ModuleList(SlotEncoderLayer(d, heads, d) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, d_out)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(slots.shape[0], -1, -1)  # (N, P, d)
        for layer in self.layers:
            q = layer(q, slots)
        return self.head(self.norm(q))  # (N, P, d_out)


class VideoPredictor(nn.Module):
    """Next-frame prediction with a slot backbone; frames are (B, T, 3, S, S) in [0, 1], S = ``size``."""

    def __init__(self, backbone: str, size: int = 32, patch: int = 4, d_model: int = 64, num_slots: int = 6,
                 layers: int = 2, heads: int = 4, decoder_layers: int = 2):
        super().__init__()
        self.size, self.patch, self.kind = size, patch, backbone
        g = size // patch
        px = 3 * patch * patch
        self.embed = nn.Linear(px, d_model)
        self.pos = nn.Parameter(torch.randn(g * g, d_model) * 0.02)  # (M, d) spatial position
        self.backbone = build_backbone(backbone, d_model, d_model, num_slots, layers, heads)
        d = self.backbone.d_model
        self.decoder = SlotQueryDecoder(d, heads if d % heads == 0 else 1, g * g, px, decoder_layers)

    def tokens(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) -> (B, T, M, d) patch tokens."""
        b, t, c, s, _ = video.shape
        g, p = s // self.patch, self.patch
        x = video.reshape(b, t, c, g, p, g, p).permute(0, 1, 3, 5, 4, 6, 2)  # (B, T, gh, gw, ph, pw, C)
        return self.embed(x.reshape(b, t, g * g, p * p * c)) + self.pos

    def decode_logits(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (N, K, d) -> pixel logits (N, 3, S, S) (the frame is their sigmoid)."""
        g = self.size // self.patch
        p = self.patch
        out = self.decoder(slots)  # (N, M, p*p*3)
        out = out.view(-1, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)  # (N, 3, gh, ph, gw, pw)
        return out.reshape(-1, 3, self.size, self.size)

    def decode(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (N, K, d) -> frames (N, 3, S, S) in [0, 1]."""
        return torch.sigmoid(self.decode_logits(slots))

    def logits(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) -> pixel logits (B, T, 3, S, S) of frames 1..T (prediction t reads frames <= t)."""
        slots = self.backbone(self.tokens(video))  # (B, T, K, d)
        return self.decode_logits(slots.flatten(0, 1)).unflatten(0, video.shape[:2])

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) -> predictions (B, T, 3, S, S) in [0, 1] of frames 1..T (prediction t reads frames <= t)."""
        return torch.sigmoid(self.logits(video))

    def losses(self, video: torch.Tensor, open_loop: int = 0) -> dict[str, torch.Tensor]:
        """Teacher forcing on frames 1..T-1 -> frames 2..T: ``frame`` is the paper's binary cross-entropy of the
        pixel values (the trained loss), ``mse`` the per-pixel MSE (reported, no gradient). With ``open_loop``
        = n > 0 also ``open_loop``: the same cross-entropy of the last n frames predicted in open loop from the
        first T - n (``rollout_logits``: each prediction fed back, with its gradient), so the model is trained
        on its own predictions as the rollout at evaluation uses it.

        Why BCE: on these mostly-background scenes every model first settles on the mean frame; through the
        sigmoid, MSE's gradient on a pixel is scaled by p (1 - p), BCE's is not, and at the same step count
        the slot models leave that plateau sooner with it (measured on 32 px physics scenes, reconstruction
        through the slot bottleneck, batch 16, lr 1e-3: pixel MSE ~0.020 with MSE training vs ~0.016 with
        BCE after 2000 steps; the mean frame is 0.022)."""
        logits, target = self.logits(video[:, :-1]), video[:, 1:]
        with torch.no_grad():
            mse = F.mse_loss(torch.sigmoid(logits), target)
        out = {"frame": F.binary_cross_entropy_with_logits(logits, target), "mse": mse}
        if open_loop > 0:
            n = min(open_loop, video.shape[1] - 1)
            roll = self.rollout_logits(video[:, :-n], n)  # (B, n, 3, S, S)
            out["open_loop"] = F.binary_cross_entropy_with_logits(roll, video[:, -n:])
        return out

    def rollout_logits(self, context: torch.Tensor, horizon: int) -> torch.Tensor:
        """context (B, C, 3, S, S) -> pixel logits (B, horizon, 3, S, S) of the next ``horizon`` frames, each
        step fed the previous prediction (its sigmoid; step by step: O(1) per step for the SSMs and the RNN).
        Differentiable: gradients flow back through the fed-back predictions."""
        state = self.backbone.init_state(context.shape[0], context.device)
        tokens = self.tokens(context)
        for i in range(context.shape[1]):
            slots, state = self.backbone.step(tokens[:, i], state)
        logits = []
        for i in range(horizon):
            out = self.decode_logits(slots)  # (B, 3, S, S)
            logits.append(out)
            if i + 1 < horizon:
                slots, state = self.backbone.step(self.tokens(torch.sigmoid(out)[:, None])[:, 0], state)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def rollout(self, context: torch.Tensor, horizon: int) -> torch.Tensor:
        """context (B, C, 3, S, S) -> ``horizon`` predicted frames (B, horizon, 3, S, S) in [0, 1], each step fed
        the previous prediction (``rollout_logits`` without gradient)."""
        return torch.sigmoid(self.rollout_logits(context, horizon))


class BlinkingClassifier(nn.Module):
    """Patch sequence (B, L, ph, pw, 3) -> colour logits (B, classes, H, W) of the target image.

    Patch i of the sequence is patch ``i % patches_per_frame`` (raster order) of context frame
    ``i // patches_per_frame``; it is cut into sub-patches of (ceil(ph/2), ceil(pw/2)) pixels.
    """

    def __init__(self, backbone: str, image_size: int, patch: tuple[int, int], frames: int, classes: int = 7,
                 d_model: int = 64, num_slots: int = 6, layers: int = 2, heads: int = 4, decoder_layers: int = 2):
        super().__init__()
        ph, pw = patch
        self.image_size, self.patch, self.classes = image_size, patch, classes
        self.sub = (max(1, ph // 2), max(1, pw // 2))
        subs = (ph // self.sub[0]) * (pw // self.sub[1])
        self.per_frame = (image_size // ph) * (image_size // pw)
        self.embed = nn.Linear(3 * self.sub[0] * self.sub[1], d_model)
        self.sub_pos = nn.Parameter(torch.randn(subs, d_model) * 0.02)  # position inside the patch
        self.patch_pos = nn.Parameter(torch.randn(self.per_frame, d_model) * 0.02)  # patch in the image
        self.frame_pos = nn.Parameter(torch.randn(frames, d_model) * 0.02)  # context frame
        self.backbone = build_backbone(backbone, d_model, d_model, num_slots, layers, heads)
        d = self.backbone.d_model
        self.dec_patch = 4 if image_size % 4 == 0 else 1
        g = image_size // self.dec_patch
        self.decoder = SlotQueryDecoder(d, heads if d % heads == 0 else 1, g * g, classes * self.dec_patch ** 2,
                                        decoder_layers)

    def tokens(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, L, ph, pw, 3) in [0, 1] -> (B, L, subs, d)."""
        sh, sw = self.sub
        b, length, ph, pw, c = patches.shape
        x = patches.reshape(b, length, ph // sh, sh, pw // sw, sw, c).transpose(3, 4)  # (B, L, gh, gw, sh, sw, C)
        x = x.reshape(b, length, (ph // sh) * (pw // sw), sh * sw * c)
        idx = torch.arange(length, device=patches.device)
        pos = self.patch_pos[idx % self.per_frame] + self.frame_pos[idx // self.per_frame]  # (L, d)
        return self.embed(x) + self.sub_pos + pos[:, None]

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        slots = self.backbone(self.tokens(patches))[:, -1]  # (B, K, d): the slots after the last patch
        g, p = self.image_size // self.dec_patch, self.dec_patch
        out = self.decoder(slots).view(-1, g, g, p, p, self.classes)  # (B, gh, gw, ph, pw, classes)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(-1, self.classes, self.image_size, self.image_size)
