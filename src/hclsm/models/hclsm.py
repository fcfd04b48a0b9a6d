"""HCLSM: the hierarchical causal latent state machine (seed 000).

This version has the perception and object layers (seed Layers 1-2): stage-1 training reconstructs the
frames through the spatial broadcast decoder with slot diversity and the existence prior. The dynamics,
causal and memory layers join in later stages of the package.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hclsm import keys
from hclsm.config.model import ModelConfig
from hclsm.errors import HclsmError
from hclsm.models.objects import ObjectDecomposer, ObjectOutput


@dataclass
class HCLSMOutput:
    objects: ObjectOutput
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class HCLSM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.objects = ObjectDecomposer(cfg)

    def update_target(self, tau: float) -> None:
        """EMA update of the target encoder (no-op without one)."""
        self.objects.update_target(tau)

    def forward(self, batch: dict[str, torch.Tensor], progress: float = 1.0, stage: int = 1) -> HCLSMOutput:
        if stage != 1:
            raise HclsmError("HCLSM stage 2 (dynamics, JEPA) is not built yet in this version; train with --stage 1")
        out = self.objects(batch[keys.VIDEO], progress)
        return HCLSMOutput(objects=out, losses=self.objects.losses(out, progress))
