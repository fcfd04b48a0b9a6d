"""Typed configuration: component dataclasses, presets, YAML overlays and dotted overrides.

>>> cfg = load_config("small", overrides=["model.slots.num_slots=8", "train.lr=3e-4"])
>>> cfg.model.perception.d_world, cfg.model.slots.num_slots
(384, 8)
"""
from __future__ import annotations

from hclsm.config.data import ClipConfig, DataConfig, PhysicsDataConfig, PushTDataConfig
from hclsm.config.loader import (
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
)
from hclsm.config.model import (
    DECODER_TARGETS,
    ENCODERS,
    MODEL_NAMES,
    CausalConfig,
    DecoderConfig,
    DynamicsConfig,
    GNNConfig,
    L0Config,
    L1Config,
    L2Config,
    MemoryConfig,
    ModelConfig,
    PerceptionConfig,
    SlotConfig,
)
from hclsm.config.presets import PRESETS, PUSHT_RECIPE, Config, diff_from_preset, get_preset
from hclsm.config.train import PRECISIONS, LossWeights, TrainConfig
from hclsm.errors import ConfigError

__all__ = [
    "PUSHT_RECIPE",
    "ConfigError", "Config", "ModelConfig", "TrainConfig", "DataConfig", "PushTDataConfig", "PhysicsDataConfig", "ClipConfig",
    "PerceptionConfig", "SlotConfig", "DecoderConfig", "DynamicsConfig", "L0Config", "L1Config", "L2Config",
    "GNNConfig", "CausalConfig", "MemoryConfig", "LossWeights",
    "PRESETS", "ENCODERS", "DECODER_TARGETS", "MODEL_NAMES", "PRECISIONS",
    "get_preset", "load_config", "config_from_dict", "config_to_dict", "save_config", "apply_overrides",
    "parse_overrides", "read_yaml", "diff_from_preset",
]
