"""Models: assemble ``hclsm.nn`` blocks. ``build_model(cfg.model)`` picks one by ``cfg.model.name``."""
from __future__ import annotations

from torch import nn

from hclsm.config.model import ModelConfig
from hclsm.errors import HclsmError


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model named by ``cfg.name`` (``hclsm``, ``flat_ssm``, ``slotssm``, ``oc_slotssm``; ``cjepa`` is not
    built yet)."""
    if cfg.name == "hclsm":
        from hclsm.models.hclsm import HCLSM

        return HCLSM(cfg)
    if cfg.name == "flat_ssm":
        from hclsm.models.flat import FlatSSM

        return FlatSSM(cfg)
    if cfg.name == "slotssm":
        from hclsm.models.slot_world import SlotSSMWorld

        return SlotSSMWorld(cfg)
    if cfg.name == "oc_slotssm":
        from hclsm.models.slot_world import OCSlotSSMWorld

        return OCSlotSSMWorld(cfg)
    raise HclsmError(f"model {cfg.name!r} is not built yet in this version of hclsm; use --model hclsm")
