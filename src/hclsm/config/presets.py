"""The root ``Config`` and the named presets ``tiny``, ``small``, ``base`` and ``large``.

``tiny`` is the CPU default (the class defaults). ``small`` is the seed's 68 M-parameter HCLSM;
``small``, ``base`` and ``large`` take their sizes from the reference's preset table
(research/hclsm_reference.md §4). Training values of small follow the seed (batch 4, lr 1.5e-4,
2000 warmup steps, 50k steps, bf16, 16-frame clips at 224 px).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hclsm.config.data import ClipConfig, DataConfig, PushTDataConfig
from hclsm.config.model import (
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
    SlotWorldConfig,
    check,
)
from hclsm.config.train import TrainConfig
from hclsm.errors import ConfigError

PRESETS = ("tiny", "small", "base", "large")

# The object layer's settings for PushT (dotted overrides on the tiny preset; the ball scenes keep the defaults).
# PushT is a white field with a fixed goal T, a small agent disc and a grey T block: the background slot paints the
# training frames' per-pixel median (static_background), the reconstruction weighs pixels that differ from it 30x
# (foreground_weight), the decoder reads Fourier features of its coordinates (5 octaves) to draw small sharp shapes,
# the first object slot follows the agent's proprioception (cue_scale: the state's xy on PushT's 512-px canvas), and
# three object proposals cover agent, block and one spare; the encoder's fast layout (one stride-4 conv: 16 x 16
# tokens at 64 px) is enough for PushT's large shapes. No masks or object states are used in training.
# Measured in BENCHMARKS.md (objects: PushT rows) and docs/benchmarks/history.md (the recipe's ablation).
# For the dynamics (stage 2): actions (the agent's target in [0, 512] px) are read in [-1, 1] (action_scale), and the
# position prediction loss weighs 20x the default: an object moves 0.02-0.05 model units per step, so its squared
# error (~1e-4) gave the dynamics no reason to read the action (measured: after 1500 stage-2 steps at weight 0.5 the
# predicted agent moved the same way whichever target it was given; at 20 it follows the target; at 100 the rollout
# error was 1.39x copy-last after 200 steps). PushT is quasi-static (the block stops when the push stops, the agent
# follows its target), so the position head has no constant-velocity prior (velocity_prior=0), and the GNN's edges
# read each pair's relative position, velocity and distance (relative_geometry), where agent-block contact shows.
# Measured on held-out PushT rollouts after 600 stage-2 steps (BENCHMARKS.md, dynamics-pusht): 10-step error vs
# copy-last 0.747 without these two, 0.709 with the prior alone, 0.723 with the geometry alone, 0.671 with both.
PUSHT_RECIPE = ("model.perception.stem=patch", "model.perception.patch_size=4", "model.decoder.static_background=true",
                "model.decoder.foreground_weight=30", "model.decoder.fourier_octaves=5", "model.slots.cue_scale=512",
                "model.slots.num_slots=3", "model.action_scale=512", "train.loss.obj=20", "model.dynamics.velocity_prior=0",
                "model.gnn.relative_geometry=true")


@dataclass
class Config:
    """Everything a run needs: which preset it started from, the model, training and data."""

    preset: str = "tiny"  # the preset this config was overlaid on (one of PRESETS)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", _unknown_preset_msg(self.preset))
        clip, frames = self.data.clip.length, self.model.perception.max_frames
        check(clip <= frames, "data.clip.length",
              f"must be <= model.perception.max_frames ({frames}), got {clip}; raise max_frames or shorten clips")


def _unknown_preset_msg(name: object) -> str:
    close = difflib.get_close_matches(str(name), PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown preset {name!r}{hint}; valid presets: {', '.join(PRESETS)}"


def _tiny() -> Config:
    return Config(preset="tiny")  # the class defaults are the tiny preset


def _vit_model(*, d_world: int, vit: tuple[int, int, int], slots: tuple[int, int, int], gnn: tuple[int, int],
               l0: tuple[int, int], l1: tuple[int, int, int], l2: tuple[int, int, int], memory: tuple[int, int],
               chunk_size: int) -> ModelConfig:
    """A ViT-at-224 HCLSM with sizes given as in the reference's preset table."""
    (d_vit, vit_layers, vit_heads), (d_slot, n_slots, iters) = vit, slots
    return ModelConfig(
        perception=PerceptionConfig(encoder="vit", image_size=224, patch_size=16, d_model=d_vit, layers=vit_layers,
                                    heads=vit_heads, d_world=d_world, max_frames=32),
        slots=SlotConfig(num_slots=n_slots, d_slot=d_slot, iterations=iters, mlp_hidden=4 * d_slot),
        # DINOSAUR-style target: EMA-encoder patch features on the 14 x 14 token grid
        decoder=DecoderConfig(target="features", hidden=256, layers=4, kernel=1, grid_size=14, resolution=14,
                              relative_positions=False),
        dynamics=DynamicsConfig(
            l0=L0Config(d_state=l0[0], blocks=l0[1]),
            l1=L1Config(d_model=l1[0], layers=l1[1], heads=l1[2]),
            l2=L2Config(d_model=l2[0], layers=l2[1], heads=l2[2], n_summary=8),
        ),
        gnn=GNNConfig(d_edge=gnn[0], rounds=gnn[1], chunk_size=chunk_size),
        causal=CausalConfig(enabled=True),
        memory=MemoryConfig(enabled=True, size=memory[0], d_memory=memory[1]),
        slot_world=SlotWorldConfig(layers=l0[1] + 1, patch=16),  # the SlotSSM family at the ViT's patch and depth
    )


def _gpu_train(**kw: object) -> TrainConfig:
    base = dict(steps=50_000, batch_size=4, warmup_steps=2000, precision="bf16", log_every=50, eval_every=2500,
                ckpt_every=2500, num_workers=4)
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _gpu_data() -> DataConfig:
    # the seed trains on 16-frame clips of lerobot/pusht (206 episodes)
    return DataConfig(pusht=PushTDataConfig(episodes=206), clip=ClipConfig(length=16))


def _small() -> Config:
    model = _vit_model(d_world=384, vit=(512, 12, 8), slots=(192, 32, 5), gnn=(96, 2), l0=(48, 3), l1=(384, 3, 6),
                       l2=(512, 3, 8), memory=(5000, 192), chunk_size=0)
    return Config(preset="small", model=model, train=_gpu_train(lr=1.5e-4), data=_gpu_data())


def _base() -> Config:
    model = _vit_model(d_world=768, vit=(768, 24, 12), slots=(256, 64, 7), gnn=(128, 2), l0=(64, 4), l1=(512, 4, 8),
                       l2=(768, 6, 12), memory=(10_000, 256), chunk_size=16)
    return Config(preset="base", model=model, train=_gpu_train(lr=1e-4), data=_gpu_data())


def _large() -> Config:
    model = _vit_model(d_world=1024, vit=(1024, 32, 16), slots=(384, 128, 7), gnn=(192, 3), l0=(96, 6),
                       l1=(768, 6, 12), l2=(1024, 8, 16), memory=(50_000, 384), chunk_size=16)
    return Config(preset="large", model=model, train=_gpu_train(lr=1e-4), data=_gpu_data())


_BUILDERS: dict[str, Callable[[], Config]] = {"tiny": _tiny, "small": _small, "base": _base, "large": _large}


def get_preset(name: str) -> Config:
    """A fresh ``Config`` of the named preset (one of ``PRESETS``); unknown names raise ``ConfigError``."""
    if not isinstance(name, str) or name not in _BUILDERS:
        raise ConfigError(f"preset: {_unknown_preset_msg(name)}")
    return _BUILDERS[name]()


def diff_from_preset(cfg: Config) -> dict[str, Any]:
    """The nested keys whose values differ from ``cfg.preset``'s (what a YAML overlay would need)."""

    def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in a.items():
            if isinstance(v, dict) and isinstance(b.get(k), dict):
                if sub := diff(v, b[k]):
                    out[k] = sub
            elif b.get(k) != v:
                out[k] = v
        return out

    return diff(asdict(cfg), asdict(get_preset(cfg.preset)))
