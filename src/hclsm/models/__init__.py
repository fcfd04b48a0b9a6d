"""Models: assemble ``hclsm.nn`` blocks. ``build_model(cfg.model)`` picks one by ``cfg.model.name``;
``save_pretrained`` / ``from_pretrained`` write and read a trained one in the hub's layout."""
from __future__ import annotations

from torch import nn

from hclsm.config.model import ModelConfig
from hclsm.errors import HclsmError
from hclsm.models.pretrained import from_pretrained, save_pretrained

__all__ = ["build_model", "from_pretrained", "save_pretrained"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The video model named by ``cfg.name`` (``hclsm``, ``flat_ssm``, ``slotssm``, ``oc_slotssm``). ``cjepa``
    trains on slot sequences, not video: ``hclsm.models.cjepa`` and ``hclsm cjepa train``."""
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
    if cfg.name == "cjepa":
        raise HclsmError("model 'cjepa' trains on slot sequences, not video: make a slot file with `hclsm cjepa slots` "
                         "and train it with `hclsm cjepa train`")
    raise HclsmError(f"model {cfg.name!r} is not built yet in this version of hclsm; use --model hclsm")
