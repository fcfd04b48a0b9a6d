"""Small trained models shipped with hclsm (no downloads at run time).

``objects_tiny``: the tiny HCLSM's object layers (``ObjectDecomposer``) as trained by ``hclsm bench
objects`` (seed 0) on physics scenes of 3-6 balls at 64 px; held-out FG-ARI 0.924 (see its README.md and
BENCHMARKS.md, objects). C-JEPA reads its slot sequences from it (``hclsm bench cjepa``); the tests use it
for what only a trained object model can show.

``pusht_objects_tiny``: the same layers with the PushT recipe (``hclsm.config.PUSHT_RECIPE``) as trained by
``hclsm bench objects-pusht`` (seed 0, 8000 stage-1 steps on 36 PushT training episodes); ``hclsm demo`` starts
from it (``load_object_layers``) unless ``--from-scratch``. Its episodes were recorded with env seeds 0-39
(``data.pusht.seed`` = 0); whatever starts from it generates its PushT episodes from ``PUSHT_FRESH_SEED`` on, so
that none of them, training or held-out, was seen by the shipped layers.
"""
from __future__ import annotations

from pathlib import Path

from hclsm.errors import HclsmError

ASSETS = Path(__file__).parent
NAMES = ("objects_tiny", "pusht_objects_tiny")
OBJECT_SECTIONS = ("perception", "slots", "decoder")  # the model config sections the object layers are built from
PUSHT_FRESH_SEED = 1000  # the first env seed of PushT episodes that pusht_objects_tiny never saw (it saw 0-39)


def pretrained_decomposer(name: str = "objects_tiny"):
    """The shipped object model ``name`` in eval mode (weights from safetensors, strict load)."""
    from hclsm.config import load_config
    from hclsm.models.objects import ObjectDecomposer

    tensors = _object_tensors(name)  # an unknown name is refused here
    net = ObjectDecomposer(load_config(yaml_path=ASSETS / name / "config.yaml").model)  # the object layers only
    net.load_state_dict(tensors, strict=True)
    return net.eval()


def _object_tensors(name: str) -> dict:
    """The shipped object layers ``name`` as a state dict of ``ObjectDecomposer`` (the ``objects.`` prefix off)."""
    from safetensors.torch import load_file

    if name not in NAMES:
        raise HclsmError(f"unknown shipped model {name!r}; available: {', '.join(NAMES)}")
    return {k.removeprefix("objects."): v for k, v in load_file(ASSETS / name / "model.safetensors").items()}


def load_object_layers(model, name: str) -> None:
    """Copy the shipped object layers ``name`` into ``model.objects`` and its EMA target (an HCLSM built from a config whose
    ``OBJECT_SECTIONS`` equal the shipped model's). A model configured otherwise is refused in one line naming
    the first differing field, since the weights would not fit it or would mean something else."""
    from hclsm.config import config_to_dict, load_config

    tensors = _object_tensors(name)  # an unknown name is refused here
    shipped = config_to_dict(load_config(yaml_path=ASSETS / name / "config.yaml"))["model"]
    mine = config_to_dict(model.cfg)
    for section in OBJECT_SECTIONS:
        for key, value in shipped[section].items():
            if mine[section].get(key) != value:
                raise HclsmError(f"the shipped object model {name} was trained with model.{section}.{key}="
                                 f"{value!r}, this model has {mine[section].get(key)!r}; keep the default or train "
                                 f"from scratch (hclsm demo --from-scratch)")
    model.objects.load_state_dict(tensors, strict=True)
    target = getattr(model, "target_objects", None)
    if target is not None:  # the EMA target starts equal to the object layers, as in a new model
        target.load_state_dict(tensors, strict=True)

