"""Object decomposition of video: encoder -> slot attention with existence/birth/death -> SBD decoder.

``ObjectDecomposer`` is the perception + object layers of HCLSM (seed Layers 1-2) and the object front
end other models reuse. Per clip:

* frame 0: slots start from the learned queries and run ``slots.iterations`` slot-attention updates;
* frame t > 0: each **alive** slot carries its state from frame t-1 (so slot k keeps its object through
  time) and runs ``slots.video_iterations`` updates; each **dead** slot is re-armed as a birth proposal
  (its learned query and position), and the one nearest the blob the alive slots explained worst on
  frame t-1 is moved onto that blob with a seed pooled from its tokens (``BirthSeeder``);
* an existence head gives p_alive per object slot; in training the alive gate is a straight-through
  binary-concrete sample (after ``existence_start`` of training; all slots alive before). At evaluation
  a slot is alive when p_alive > ``alive_threshold`` and it is the top alpha on at least
  ``min_area`` of the frame's pixels (a slot that draws nothing is a duplicate or an empty proposal),
  and a birth must take ``birth_min_new`` of its pixels from the background layer (not split an object
  another slot draws). These rules act at evaluation only: in training they would cut the gate's
  straight-through gradient, and a slot they killed could never earn its life back;
* at evaluation the first frame also gets ``settle_rounds`` birth rounds on itself (re-arm the dead
  slots, place one proposal on the worst-explained blob, iterate, decide again), so the objects the
  initial slots missed are found before the clip starts, not one per frame during it.

The decoder composites alive slots only. A slot is *born* at frame t when it is alive at t but was dead
at t-1, and *dies* when the reverse happens. The background slot (index 0, when ``slots.background``) is
always alive and never counted.

With a frozen pretrained encoder (``model.perception.encoder=dinov2``) the slots read a trained projection of the
backbone's patch features, and a feature-target decoder (``model.decoder.target=features``) reconstructs those
features themselves (DINOSAUR): they are fixed, so no EMA copy of the encoder is kept.

Losses (unweighted, by name): ``sbd`` reconstruction MSE; ``diversity`` a squared hinge on the cosine
similarity of pairs of alive object slots above ``DIVERSITY_MARGIN`` (duplicate suppression); ``existence`` the sparsity prior ``-log(1 - p_alive)`` averaged over
object slots, its weight ramped in over training (a dead slot costs nothing); ``object_area`` the
share of the frame drawn by object slots (with a background slot; ramped in the same way).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hclsm import keys
from hclsm.config.model import ModelConfig
from hclsm.errors import DataError
from hclsm.nn.chunks import map_chunks
from hclsm.nn.decoders import SpatialBroadcastDecoder
from hclsm.nn.encoders import build_encoder, coord_grid
from hclsm.nn.slots import BirthSeeder, ExistenceHead, SlotAttention, hard_concrete
from hclsm.utils.profiling import scope

DIVERSITY_MARGIN = 0.5  # cosine similarity two object slots may share before the diversity loss acts
FOREGROUND_SCALE = 0.1  # mean absolute difference from the static scene at which a pixel counts fully as foreground
ENCODE_FRAMES = 64  # frames per encoder pass on long clips (hclsm.nn.chunks: bounded activation memory)


@dataclass
class ObjectOutput:
    """Per-frame object decomposition of a clip. K = object slots (+ background at index 0)."""

    slots: torch.Tensor  # (B, T, K, d_slot)
    positions: torch.Tensor  # (B, T, K, 2) attention centroids (x, y) in [-1, 1]
    alive_logits: torch.Tensor  # (B, T, K) existence logits (the background's is unused)
    alive: torch.Tensor  # (B, T, K) bool: the gate used this frame (hard)
    gate: torch.Tensor  # (B, T, K) float alive gate as used (carries the straight-through gradient in training)
    alphas: torch.Tensor  # (B, T, K, R, R) compositing masks, sum to 1 over alive slots
    recon: torch.Tensor  # (B, T, C, R, R) decoded target
    target: torch.Tensor  # (B, T, C, R, R) what was reconstructed (resized frames, backbone or EMA features)
    attn: torch.Tensor  # (B, T, M, K) last slot-attention map per frame
    births: torch.Tensor  # (B, T, K) bool, alive now and dead on the previous frame
    deaths: torch.Tensor  # (B, T, K) bool, dead now and alive on the previous frame
    has_background: bool
    features: torch.Tensor | None = None  # (B, T, M, D) the frozen backbone's features (a pretrained encoder only)

    @property
    def object_alive(self) -> torch.Tensor:
        """(B, T, K_obj) alive flags of the object slots (background excluded)."""
        return self.alive[..., 1:] if self.has_background else self.alive

    @property
    def count(self) -> torch.Tensor:
        """(B, T) number of alive object slots per frame."""
        return self.object_alive.sum(-1)

    def segmentation(self, size: int) -> torch.Tensor:
        """(B, T, size, size) int64 argmax slot id per pixel (alphas resized bilinearly); 0 = background slot
        when there is one, object slots are 1..N_max (slot index + 1 without a background slot)."""
        b, t, k, r, _ = self.alphas.shape
        a = self.alphas.flatten(0, 1).float()
        if size != r:
            a = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)
        seg = a.argmax(dim=1).reshape(b, t, size, size)
        return seg if self.has_background else seg + 1


def agent_cue(batch: Mapping[str, torch.Tensor], cfg: ModelConfig) -> torch.Tensor | None:
    """The proprioception cue of a batch for a model with ``model.slots.cue_scale`` > 0: the agent's position
    (B, T, 2) in [-1, 1], from the first two state dims (PushT: the agent's xy on its 512-px canvas); None for a
    model without a cue. A dataset without states cannot serve such a model: ``DataError`` naming it."""
    scale = cfg.slots.cue_scale
    if scale <= 0:
        return None
    state = batch.get(keys.STATE)
    if state is None or state.shape[-1] < 2:
        raise DataError("this model follows the agent's position (model.slots.cue_scale > 0), but the data has no "
                        "state (observation.state with the agent's xy); train it on PushT data or set "
                        "model.slots.cue_scale=0")
    return state[..., :2].float() / scale * 2 - 1


class ObjectDecomposer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, s, d = cfg.perception, cfg.slots, cfg.decoder
        self.encoder = build_encoder(p)
        self.num_slots = s.num_slots + int(s.background)
        self.slot_attention = SlotAttention(p.d_world, s.d_slot, self.num_slots, s.mlp_hidden,
                                            spatial_prior=s.spatial_prior, background=s.background)
        # existence and birth exist only with dynamic slots (the fixed-slot baseline keeps all N_max alive)
        self.existence = ExistenceHead(s.d_slot) if s.dynamic else None
        self.birth = BirthSeeder(s.d_slot) if s.dynamic else None
        self.pretrained = p.pretrained  # a frozen backbone: its features are the slots' inputs (projected) and target
        if d.target == "pixels":
            self.d_out = p.channels
        else:
            self.d_out = self.encoder.feature_dim if self.pretrained else p.d_world
        self.decoder = SpatialBroadcastDecoder(s.d_slot, self.d_out, d, background=s.background,
                                               bounded=d.bounded_content and d.target == "pixels")
        # DINOSAUR-style target of a trained encoder: an EMA copy of it (no gradient), updated by update_target()
        self.target_encoder = None
        if d.target == "features" and not self.pretrained:
            self.target_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
        self.register_buffer("coords", coord_grid(p.grid_size), persistent=False)  # (M, 2)

    @torch.no_grad()
    def update_target(self, tau: float) -> None:
        if self.target_encoder is not None:
            for t, o in zip(self.target_encoder.parameters(), self.encoder.parameters()):
                t.lerp_(o.detach(), 1 - tau)

    def _noise(self, progress: float) -> float:
        s = self.cfg.slots
        if not self.training or s.query_noise == 0 or progress >= s.noise_anneal:
            return 0.0
        return s.query_noise * 0.5 * (1 + math.cos(math.pi * progress / max(s.noise_anneal, 1e-8)))

    def _targets(self, video: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """(B, T, C, R, R): the frames resized to R, or the feature maps (backbone ``features`` or the EMA encoder's)."""
        r = self.cfg.decoder.resolution
        if self.cfg.decoder.target == "pixels":
            if video.shape[-1] == r:
                return video
            return F.interpolate(video.flatten(0, 1), size=(r, r), mode="area").reshape(*video.shape[:3], r, r)
        if features is None:
            with torch.no_grad():
                features = self.target_encoder(video)  # (B, T, M, d_world)
        return features.transpose(2, 3).reshape(*features.shape[:2], features.shape[-1], r, r)

    @property
    def cue_slot(self) -> int | None:
        """The slot that follows the agent's proprioception cue (the first object slot), or None without a cue."""
        return int(self.cfg.slots.background) if self.cfg.slots.cue_scale > 0 else None

    def _pin(self, pos: torch.Tensor, cue: torch.Tensor | None) -> torch.Tensor:
        """Positions (B, K, 2) with the cue slot's set to ``cue`` (B, 2), when there is a cue."""
        if cue is None:
            return pos
        c = self.cue_slot
        return torch.cat([pos[:, :c], cue[:, None].to(pos.dtype), pos[:, c + 1:]], dim=1)

    def forward(self, video: torch.Tensor, progress: float = 1.0, rules: bool | None = None,
                features: torch.Tensor | None = None, cue: torch.Tensor | None = None) -> ObjectOutput:
        """The object decomposition of ``video`` (B, T, C, H, W) at training ``progress``.

        ``rules``: apply the evaluation-time rules (settle rounds on the first frame, the area and birth rules on
        the gate); default: in eval mode. HCLSM's EMA target runs in eval mode without them: its slots only
        need to be deterministic, and the rules would cost as much again as the target itself.
        ``features``: a frozen backbone's features of this video when already computed (``ObjectOutput.features``
        of another pass over it, e.g. HCLSM's EMA target reads the online pass's); else computed here.
        ``cue``: the agent's position on every frame (B, T, 2) in [-1, 1] (``agent_cue``), for a model with
        ``model.slots.cue_scale`` > 0: the first object slot sits there on every frame and stays alive."""
        if (cue is None) != (self.cue_slot is None):
            raise ValueError("this object model follows the agent's proprioception cue (model.slots.cue_scale > 0): "
                             "pass cue=agent_cue(batch, cfg)" if cue is None else
                             "a cue was given to an object model without one (model.slots.cue_scale = 0)")
        s, size = self.cfg.slots, self.cfg.perception.image_size
        if video.shape[-1] != size or video.shape[-2] != size:
            video = F.interpolate(video.flatten(0, 1), size=(size, size), mode="area").reshape(
                *video.shape[:3], size, size)
        b, t = video.shape[:2]
        # ENCODE_FRAMES frames (of the B * T) per encoder pass, checkpointed on long clips (hclsm.nn.chunks)
        step = max(1, ENCODE_FRAMES // b)
        with scope("encoder"):
            if self.pretrained:  # the frozen backbone without gradient, then the trained projection
                if features is None:
                    with torch.no_grad():
                        features = torch.cat(map_chunks(lambda t0, t1: self.encoder.features(video[:, t0:t1]), t,
                                                        step), dim=1)  # (B, T, M, D)
                tokens = self.encoder.project(features)  # (B, T, M, d_world)
            else:
                if features is not None:
                    raise ValueError("features are a frozen backbone's; this encoder is trained (model.perception."
                                     f"encoder={self.cfg.perception.encoder})")
                tokens = torch.cat(map_chunks(lambda t0, t1: self.encoder(video[:, t0:t1], t0=t0), t, step), dim=1)
        with scope("slot_attention"):
            k_all, v_all = self.slot_attention.project(tokens)
        # per-frame views by unbind: its backward stacks the frames' gradients once (indexing frame by frame
        # would allocate a full-size zero gradient per frame, quadratic in the clip length)
        ks, vs = k_all.unbind(1), v_all.unbind(1)
        target = self._targets(video, features)
        gating = s.dynamic and (not self.training or progress >= s.existence_start)
        noise = self._noise(progress)
        bg = int(s.background)

        slots, pos = self.slot_attention.initial(b, noise)
        alive_prev = seed = centre = has_seed = None
        outs: dict[str, list[torch.Tensor]] = {n: [] for n in
                                               ("slots", "pos", "logits", "gate", "alphas", "recon", "attn")}
        rules = (not self.training) if rules is None else rules
        settle = s.settle_rounds if gating and rules else 0
        for i in range(t):
            rounds = 1 + (settle if i == 0 else 0)
            for r in range(rounds):
                here = None if cue is None else cue[:, i]  # (B, 2) where the agent is on this frame
                with scope("slot_attention"):
                    if i == 0 and r == 0:
                        slots, pos, attn = self.slot_attention(slots, self._pin(pos, here), ks[0], vs[0], self.coords,
                                                               s.iterations, straight_through=True)
                    else:  # alive slots carry on; dead ones are re-armed as birth proposals
                        if s.dynamic:
                            slots, pos = self._rearm(slots, pos, alive_prev, seed, centre, has_seed, noise)
                        slots, pos, attn = self.slot_attention(slots, self._pin(pos, here), ks[i], vs[i],
                                                               self.coords, s.video_iterations)
                    pos = self._pin(pos, here)  # the cue slot is drawn where the agent is, not at its centroid
                with scope("decoder"):
                    logits, gate, alphas, recon = self._gate_and_draw(slots, pos, alive_prev, gating, rules)
                if s.dynamic and (i + 1 < t or r + 1 < rounds):  # birth seed: what the alive slots leave unexplained
                    with scope("birth"):
                        seed, centre, has_seed = self._birth_seed(recon, alphas, target[:, i], vs[i])
                alive_prev = gate.detach()
            for name, val in zip(outs, (slots, pos, logits, gate, alphas, recon, attn)):
                outs[name].append(val)

        st = {n: torch.stack(v, dim=1) for n, v in outs.items()}
        alive = st["gate"].detach() > 0.5
        prev = torch.cat([alive[:, :1], alive[:, :-1]], dim=1)
        return ObjectOutput(slots=st["slots"], positions=st["pos"], alive_logits=st["logits"], alive=alive,
                            alphas=st["alphas"], recon=st["recon"], target=target, attn=st["attn"],
                            gate=st["gate"], births=alive & ~prev, deaths=~alive & prev, has_background=bool(bg),
                            features=features)

    def _rearm(self, slots: torch.Tensor, pos: torch.Tensor, alive_prev: torch.Tensor, seed: torch.Tensor,
               centre: torch.Tensor, has_seed: torch.Tensor, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Alive slots keep their state; each dead one becomes its birth proposal (learned query and
        position), and the dead proposal nearest the unexplained blob takes the seed and moves onto it."""
        proposal, proposal_pos = self.slot_attention.initial(slots.shape[0], noise)
        dead = alive_prev < 0.5
        dist = (proposal_pos - centre[:, None]).pow(2).sum(-1).masked_fill(~dead, float("inf"))
        chosen = F.one_hot(dist.argmin(1), dist.shape[1]).bool() & dead & has_seed[:, None]
        proposal = proposal + chosen[..., None].to(slots.dtype) * seed[:, None, :]
        proposal_pos = torch.where(chosen[..., None], centre[:, None].to(pos.dtype), proposal_pos)
        keep = alive_prev[..., None]
        return keep * slots + (1 - keep) * proposal, keep * pos + (1 - keep) * proposal_pos

    def _gate_and_draw(self, slots: torch.Tensor, pos: torch.Tensor, alive_prev: torch.Tensor | None, gating: bool,
                       rules: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Existence logits, alive gate, alphas and reconstruction of one frame's slots."""
        s = self.cfg.slots
        logits = self.existence(slots) if s.dynamic else slots.new_full(slots.shape[:2], 20.0)  # (B, K)
        content, alpha_logits = self.decoder.decode(slots, pos)
        if not gating:
            gate = torch.ones_like(logits)
        elif self.training:
            gate = hard_concrete(logits)
        else:
            gate = (torch.sigmoid(logits) > s.alive_threshold).float()
        always = int(s.background) + int(self.cue_slot is not None)  # the background and the agent's slot live
        if always:
            gate = torch.cat([torch.ones_like(gate[:, :always]), gate[:, always:]], dim=1)
        if gating and rules and not self.training:
            gate = self._area_rules(gate, content, alpha_logits, alive_prev)
        recon, alphas = self.decoder.composite(content, alpha_logits, gate)
        return logits, gate, alphas, recon

    def _area_rules(self, gate: torch.Tensor, content: torch.Tensor, alpha_logits: torch.Tensor,
                    alive_prev: torch.Tensor | None) -> torch.Tensor:
        """Evaluation-time rules on the alive gate (B, K) by what the slots draw.

        With ``min_area``, an alive object slot must be the top alpha (among the alive slots) on at least
        that share of the pixels: one that draws (almost) nothing is a duplicate or an empty proposal. A
        slot dead on the previous frame (a birth) must also take at least ``birth_min_new`` of its pixels
        from the background layer: a new object is something nothing explained, not a piece of an object
        another slot already draws.
        """
        s = self.cfg.slots

        def owners(g: torch.Tensor) -> torch.Tensor:  # (B, R*R) the slot each pixel is drawn by
            return self.decoder.composite(content, alpha_logits, g)[1].argmax(dim=1).flatten(1)

        if s.min_area > 0:
            share = F.one_hot(owners(gate), gate.shape[1]).float().mean(1)  # (B, K)
            share[:, :int(s.background) + int(self.cue_slot is not None)] = 1.0  # always alive, whatever they draw
            gate = gate * (share >= s.min_area).float()
        if s.background and s.birth_min_new > 0 and alive_prev is not None:
            born = gate * (1 - alive_prev)
            if born.any():
                took = F.one_hot(owners(gate), gate.shape[1]).float()  # (B, P, K)
                from_bg = (owners(gate - born) == 0).float()  # (B, P) drawn by the background without the newborn
                new = (took * from_bg[..., None]).sum(1) / took.sum(1).clamp_min(1.0)  # (B, K)
                gate = gate * (1 - born * (new < s.birth_min_new).float())
        return gate

    def _birth_seed(self, recon: torch.Tensor, alphas: torch.Tensor, target: torch.Tensor, values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Seed, centre and has-seed of the next birth proposal from one frame's reconstruction error."""
        err = (recon.detach().float() - target.float()).pow(2).mean(dim=1, keepdim=True)
        if self.cfg.slots.background:  # what the background paints wrong; a slot's own blurry edges are no new object
            err = err * alphas[:, :1].detach().float()
        err = F.adaptive_avg_pool2d(err, self.cfg.perception.grid_size).flatten(1)  # (B, M)
        return self.birth(values, self.birth.unexplained(err, self.cfg.slots.birth_threshold), self.coords)

    @torch.no_grad()
    def prepare(self, clips) -> None:
        """Before training, from the training clips (``MemoryClips`` or ``StreamingClips``): the static scene the
        background layer paints (their per-pixel median frame), when ``model.decoder.static_background``."""
        if self.cfg.decoder.static_background and self.decoder.background is not None:
            self.decoder.set_static(clips.median_frame())

    def reconstruction_loss(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``sbd``: the MSE of the reconstruction (..., C, R, R), with the pixels that differ from the static scene
        weighted up by ``model.decoder.foreground_weight`` (small moving objects on a large static scene are
        otherwise a rounding error of the loss)."""
        w_fg = self.cfg.decoder.foreground_weight
        err = (recon.float() - target.float()).pow(2)
        if w_fg == 0:
            return err.mean()
        away = (target.float() - self.decoder.static).abs().mean(dim=-3, keepdim=True)  # (..., 1, R, R)
        w = 1 + w_fg * (away / FOREGROUND_SCALE).clamp(max=1.0)
        return (err * (w / w.mean())).mean()

    def losses(self, out: ObjectOutput, progress: float) -> dict[str, torch.Tensor]:
        s = self.cfg.slots
        bg = int(s.background)
        sbd = self.reconstruction_loss(out.recon, out.target)
        # diversity: pairs of alive object slots more similar than DIVERSITY_MARGIN (cosine) are pushed
        # apart (squared hinge). Duplicates of one object are what this is for; demanding orthogonal
        # slots instead squeezes their content into a tiny subspace (the reconstructions turn grey)
        z = F.normalize(out.slots[:, :, bg:].float(), dim=-1)  # (B, T, N, d)
        w = out.gate[:, :, bg:].detach()
        sim = F.relu(torch.einsum("btnd,btmd->btnm", z, z) - DIVERSITY_MARGIN).pow(2)
        pair = w[..., :, None] * w[..., None, :] * (1 - torch.eye(z.shape[2], device=z.device))
        diversity = (sim * pair).sum() / pair.sum().clamp_min(1.0)
        ramp = min(max((progress - s.existence_start) / max(s.existence_ramp, 1e-8), 0.0), 1.0)
        if s.dynamic:
            # -log(1 - p_alive) = softplus(logit): unlike the mean p_alive, its gradient does not vanish
            # once a slot's p_alive saturates at 1 (which the reconstruction drives every slot to)
            existence = ramp * s.existence_sparsity * F.softplus(out.alive_logits[:, :, bg:]).mean()
        else:
            existence = out.alive_logits.new_zeros(())
        # share of the frame the object slots draw: where the background layer reconstructs as well, it
        # should draw, so object masks shrink to their objects (otherwise object slots may tile the
        # background, and areas, counts and mIoU mean little). Ramped in with the existence prior: early on
        # it would hand the whole frame to the background before any slot found an object
        if bg:
            object_area = ramp * out.alphas[:, :, bg:].float().sum(2).mean()
        else:
            object_area = out.alphas.new_zeros((), dtype=torch.float32)
        return {"sbd": sbd, "diversity": diversity, "existence": existence, "object_area": object_area}
