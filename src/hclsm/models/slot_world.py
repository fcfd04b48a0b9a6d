"""``hclsm train --model slotssm | oc_slotssm``: the SlotSSM family under the one training loop.

``build_model`` maps the shared ``ModelConfig`` onto the paper's models (so ``hclsm info`` and a saved
run's config rebuild them exactly):

* ``slotssm``: ``VideoPredictor`` with a SlotSSM backbone (section 7.1): frames resized by area to
  ``perception.image_size``, ``slot_world.patch``-pixel patch tokens, slot width ``slots.d_slot``,
  ``slots.num_slots`` slots, ``slot_world.layers`` layers with ``slot_world.heads`` mixer heads; loss ``frame``
  (teacher-forced next-frame MSE, the same in both stages).
* ``oc_slotssm``: ``OCSlotSSM`` (section 5): the CNN of ``perception`` (its patch size, ``layers``),
  ``slots.num_slots`` (+ 1 with ``slots.background``) slots of width ``slots.d_slot``, ``slot_world.layers``
  layers with ``slot_world.heads`` mixer heads, ``dynamics.l0``'s SSM state size and expansion, the spatial
  broadcast decoder of ``decoder`` (absolute coordinates); loss ``sbd`` (reconstruction MSE, weighted per stage
  like HCLSM's).

Actions in the batch are not read (the paper's models are not action-conditioned).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from hclsm import keys
from hclsm.config.model import ModelConfig
from hclsm.models.pretrained import Pretrained
from hclsm.models.slot_tasks import VideoPredictor
from hclsm.models.slotssm import OCSlotSSM, OCSlotSSMConfig, resize_video


@dataclass
class SlotWorldOutput:
    losses: dict[str, torch.Tensor]
    predictions: torch.Tensor | None = None  # slotssm: (B, T-1, 3, S, S) predictions of frames 1..T-1
    recon: torch.Tensor | None = None  # oc_slotssm: (B, T, 3, R, R)
    masks: torch.Tensor | None = None  # oc_slotssm: (B, T, R, R) slot ids (argmax of the alphas)


class SlotSSMWorld(Pretrained, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.slot_world
        self.net = VideoPredictor("slotssm", size=cfg.perception.image_size, patch=w.patch, d_model=cfg.slots.d_slot,
                                  num_slots=cfg.slots.num_slots, layers=w.layers, heads=w.heads)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0, stage: int = 2) -> SlotWorldOutput:
        video = resize_video(batch[keys.VIDEO], self.net.size)
        pred = self.net(video[:, :-1])
        return SlotWorldOutput(losses={"frame": nn.functional.mse_loss(pred, video[:, 1:])}, predictions=pred)


class OCSlotSSMWorld(Pretrained, nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p, s, l0, w = cfg.perception, cfg.slots, cfg.dynamics.l0, cfg.slot_world
        self.net = OCSlotSSM(OCSlotSSMConfig(
            image_size=p.image_size, patch_size=p.patch_size, d_model=s.d_slot,
            num_slots=s.num_slots + int(s.background), layers=w.layers, heads=w.heads,
            cnn_layers=p.layers, d_state=l0.d_state, expand=l0.expand,
            decoder=replace(cfg.decoder, relative_positions=False)))

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0, stage: int = 2) -> SlotWorldOutput:
        out = self.net(batch[keys.VIDEO])
        return SlotWorldOutput(losses={"sbd": out.losses["recon"]}, recon=out.recon, masks=out.masks)
