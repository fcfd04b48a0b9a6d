"""Small trained models shipped with hclsm (no downloads at run time).

``objects_tiny``: the tiny HCLSM's object layers (``ObjectDecomposer``) as trained by ``hclsm bench
objects`` (seed 0) on physics scenes of 3-6 balls at 64 px; held-out FG-ARI 0.924 (see its README.md and
BENCHMARKS.md, objects). C-JEPA reads its slot sequences from it (``hclsm bench cjepa``); the tests use it
for what only a trained object model can show.
"""
from __future__ import annotations

from pathlib import Path

from hclsm.errors import HclsmError

ASSETS = Path(__file__).parent
NAMES = ("objects_tiny",)


def pretrained_decomposer(name: str = "objects_tiny"):
    """The shipped object model ``name`` in eval mode (weights from safetensors, strict load)."""
    from safetensors.torch import load_file

    from hclsm.config import load_config
    from hclsm.models.objects import ObjectDecomposer

    if name not in NAMES:
        raise HclsmError(f"unknown shipped model {name!r}; available: {', '.join(NAMES)}")
    cfg = load_config(yaml_path=ASSETS / name / "config.yaml")
    net = ObjectDecomposer(cfg.model)  # the file holds the object layers only
    tensors = load_file(ASSETS / name / "model.safetensors")
    net.load_state_dict({k.removeprefix("objects."): v for k, v in tensors.items()}, strict=True)
    return net.eval()
