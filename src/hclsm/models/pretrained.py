"""A trained model as a directory anyone can load: the Hugging Face hub's layout, without the hub.

``save_pretrained(model, DIR)`` writes ``DIR/config.json`` (the model's ``ModelConfig``, every field) and
``DIR/model.safetensors`` (every parameter and saved buffer, pickle-free); ``from_pretrained(DIR)`` rebuilds the
model from the config (``hclsm.models.build_model``) and loads the weights strictly, so a directory from another
config is refused by name instead of half-loaded. The models mix in ``Pretrained``, so
``model.save_pretrained(DIR)`` and ``HCLSM.from_pretrained(DIR)`` work as in ``transformers``. A name that is not a
local directory is taken as a hub repository id and fetched with ``huggingface_hub`` when that package is
installed (nothing is downloaded otherwise; ``hclsm export RUN DIR`` writes the layout from a training run).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from hclsm.errors import HclsmError

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
FORMAT = 1  # the layout's version, written into config.json

M = TypeVar("M", bound=nn.Module)


def save_pretrained(model: nn.Module, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (anything ``build_model`` makes, with its ``cfg``) to ``directory`` in the hub's layout;
    ``dtype`` stores the floating-point tensors in another precision (e.g. ``torch.float16`` for a small file).
    Returns the directory. Both files are written beside their final names and renamed, so a failure leaves no
    half-written file."""
    from safetensors.torch import save_file

    from hclsm.config.loader import config_to_dict
    from hclsm.utils.atomic import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.contiguous().clone()  # safetensors stores no shared or strided storage
    tmp = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_FILE)
    atomic_write_text(directory / CONFIG_FILE, json.dumps({"format": FORMAT, "library": "hclsm",
                                                            "model": config_to_dict(model.cfg)}, indent=2) + "\n")
    return directory


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local directory, or a hub repository id fetched with ``huggingface_hub`` (when installed)."""
    path = Path(path_or_repo)
    if path.is_dir():
        return path
    if path.exists():
        raise HclsmError(f"{path} is a file; from_pretrained needs the directory holding {CONFIG_FILE} and "
                         f"{WEIGHTS_FILE}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise HclsmError(f"{path_or_repo} is not a directory; give the directory written by save_pretrained or "
                         f"`hclsm export` (or install huggingface_hub to fetch a hub repository)") from None
    try:
        return Path(snapshot_download(str(path_or_repo), allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as e:  # the hub's errors: not found, offline, gated, ...
        raise HclsmError(f"could not fetch {path_or_repo!r} from the hub ({type(e).__name__}: {e}); give a local "
                         f"directory instead") from None


def from_pretrained(path_or_repo: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The model saved in ``path_or_repo`` (see ``save_pretrained``), in eval mode on ``device``."""
    from safetensors.torch import load_file

    from hclsm.config.loader import config_from_dict
    from hclsm.config.model import ModelConfig
    from hclsm.errors import ConfigError
    from hclsm.models import build_model

    directory = resolve(path_or_repo)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise HclsmError(f"{directory} has no {name}; it is not a directory written by save_pretrained or "
                             f"`hclsm export`")
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        cfg = config_from_dict(ModelConfig, meta["model"], "model")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise HclsmError(f"{directory / CONFIG_FILE} is not a model config ({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise HclsmError(f"{directory / CONFIG_FILE}: {e}") from None
    model = build_model(cfg)
    state = model.state_dict()
    tensors = load_file(str(directory / WEIGHTS_FILE))
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    bad = sorted(n for n in set(state) & set(tensors) if state[n].shape != tensors[n].shape)
    if missing or extra or bad:
        detail = "; ".join(f"{what}: {', '.join(names[:4])}" for what, names in
                           (("missing", missing), ("unexpected", extra), ("wrong shape", bad)) if names)
        raise HclsmError(f"{directory / WEIGHTS_FILE} does not fit the model its config.json describes ({detail})")
    model.load_state_dict({n: t.to(state[n].dtype) for n, t in tensors.items()}, strict=True)
    return model.to(device).eval()


class Pretrained:
    """``model.save_pretrained(DIR)`` and ``Class.from_pretrained(DIR_OR_REPO)`` for the video models."""

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        return save_pretrained(self, directory, dtype)  # type: ignore[arg-type]

    @classmethod
    def from_pretrained(cls: type[M], path_or_repo: str | os.PathLike, device: str | torch.device = "cpu") -> M:
        model = from_pretrained(path_or_repo, device)
        if not isinstance(model, cls):
            raise HclsmError(f"{path_or_repo} holds a {type(model).__name__}, not a {cls.__name__}; load it with "
                             f"hclsm.models.from_pretrained or {type(model).__name__}.from_pretrained")
        return model
