"""Build configs from dicts, YAML files and dotted overrides, strictly.

Resolution order: preset < YAML file < ``KEY=VALUE`` overrides. Each layer changes only the keys it
names. Keys and types are checked against the dataclass annotations (generic over nested dataclasses),
and every dataclass is re-constructed so its ``__post_init__`` validates the final values. Any unknown
key, wrong type, bad value or unreadable file raises ``ConfigError`` naming the dotted key (and the
valid keys, or the file).
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from hclsm.config.model import check_int64, show
from hclsm.config.presets import Config, get_preset
from hclsm.errors import ConfigError
from hclsm.utils.atomic import atomic_write_text

# PyYAML (YAML 1.1) reads 3e-4 as a string; a float field accepts such exponent-only spellings
_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
_OVERRIDE_FORM = "KEY=VALUE with a dotted key, e.g. model.slots.num_slots=8 or train.lr=3e-4"


@dataclasses.dataclass(frozen=True)
class _Raw:
    """An override value: the text as typed and its YAML parse (a str field keeps the text)."""

    text: str
    value: Any


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_type_name(get_args(tp)[0])}" if get_args(tp) else "a list"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(key: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{key}: expected {_type_name(tp)}, got {show(value) if isinstance(value, int) else repr(value)} "
                       f"({type(value).__name__})")


def _unquote(text: str) -> str:
    """A string override as typed, without the quotes of a quoted YAML scalar (``'a b'`` or ``"a b"``)."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            return text
        return value if isinstance(value, str) else text
    return text


def _unknown_key(path: str, key: object, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f" under {path}" if path else ""
    return ConfigError(f"{_join(path, key)}: unknown key{hint}; valid keys{where}: {', '.join(valid)}")


def _coerce(value: Any, tp: Any, key: str, current: Any) -> Any:
    """Check ``value`` against annotation ``tp``; a mapping for a dataclass overlays ``current``."""
    raw = value if isinstance(value, _Raw) else None
    if raw is not None:
        value = raw.value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):  # an instance: re-validate it as it is
            return config_from_dict(tp, {}, key, value)
        if value is None or isinstance(value, Mapping):  # an empty YAML section is None
            return config_from_dict(tp, value or {}, key, current)
        raise _wrong_type(key, tp, value)
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for opt in options:
            try:
                return _coerce(raw if raw is not None else value, opt, key, current)
            except ConfigError:
                if len(options) == 1:
                    raise _wrong_type(key, tp, value) from None
        raise _wrong_type(key, tp, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, tp, value)
        elem = args[0] if args else Any
        items = [v if elem is Any else _coerce(v, elem, f"{key}[{i}]", None) for i, v in enumerate(value)]
        return origin(items)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value  # its range: the dataclass's own checks, then 64 bits (config_from_dict)
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str) and _EXP_FLOAT.fullmatch(value.strip()):
            number = float(value)
        if number is not None:
            if not math.isfinite(number):  # YAML's .inf / .nan, or 1e999: no setting means that
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif tp is str:
        if raw is not None and value is not None and not isinstance(value, (list, dict)):
            # the text as typed: train.run_name=001 stays "001", and "exp #2" is not cut at a YAML comment
            return _unquote(raw.text.strip())
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:
        raise TypeError(f"{key}: unsupported config annotation {tp!r}")  # a bug in a config class, not user input
    raise _wrong_type(key, tp, value)


def config_from_dict(cls: type, d: Mapping[str, Any], path: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from the (partial) mapping ``d`` overlaid on ``base`` (default ``cls()``).

    Only the keys present in ``d`` change; nested mappings overlay nested dataclasses. ``path`` is the
    dotted prefix used in error messages (``"model.slots"``).
    """
    if not isinstance(d, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a mapping of {cls.__name__} keys, got {d!r}")
    if base is None:
        base = cls()
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    for key in d:
        if key not in names:
            raise _unknown_key(path, key, names)
    hints = _hints(cls)
    kwargs = {}
    for f in fields:
        key, tp, current = _join(path, f.name), hints[f.name], getattr(base, f.name)
        if f.name in d:
            kwargs[f.name] = _coerce(d[f.name], tp, key, current)
        elif dataclasses.is_dataclass(tp):
            kwargs[f.name] = config_from_dict(tp, {}, key, current)  # fresh copy, validated again
        else:
            kwargs[f.name] = current
    obj = cls(**kwargs)  # validates: the field's own bounds, with their reasons, come first
    for f in fields:
        if hints[f.name] is int:  # then every int, bounded or not, must fit in the 64 bits torch counts in
            check_int64(getattr(obj, f.name), _join(path, f.name))
    return obj


def config_to_dict(cfg: Any) -> Any:
    """A plain nested dict (lists for tuples) of a config, ready for YAML or JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["model.slots.num_slots=8", ...]`` -> nested dict of parsed values (later keys win)."""
    if isinstance(overrides, str):
        overrides = (overrides,)
    out: dict[str, Any] = {}
    for text in overrides:
        if not isinstance(text, str) or "=" not in text:
            raise ConfigError(f"override {text!r}: expected {_OVERRIDE_FORM}")
        key, _, val = text.partition("=")
        key = key.strip()
        key = key[2:] if key.startswith("--") else key
        parts = key.split(".")
        if not key or any(not p.strip() or p != p.strip() for p in parts):
            raise ConfigError(f"override {text!r}: bad key {key!r}; expected {_OVERRIDE_FORM}")
        try:
            parsed = yaml.safe_load(val)
        except yaml.YAMLError:
            parsed = val  # not YAML: keep the text (fine for str fields, a type error elsewhere)
        _set_dotted(out, parts, _Raw(val, parsed))
    return out


def _set_dotted(tree: dict[str, Any], parts: list[str], leaf: Any) -> None:
    """``tree[a][b][c] = leaf`` for ``parts = [a, b, c]``, making (or opening up) the sections on the way."""
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if isinstance(nxt, _Raw) and isinstance(nxt.value, dict):
            nxt = dict(nxt.value)  # a whole-section override followed by one of its keys
        if not isinstance(nxt, dict):
            nxt = {}
        node[p] = nxt
        node = nxt
    node[parts[-1]] = leaf


def _names(tree: Any, *path: str) -> bool:
    """Whether the nested overlay ``tree`` (a YAML document or parsed overrides) sets the key at ``path``."""
    for key in path:
        if isinstance(tree, _Raw):
            tree = tree.value
        if not isinstance(tree, Mapping) or key not in tree:
            return False
        tree = tree[key]
    return True


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A new config: ``cfg`` with dotted ``KEY=VALUE`` overrides applied (all at once, then validated)."""
    over = parse_overrides(overrides)
    return config_from_dict(type(cfg), over, base=cfg) if over else cfg


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file into a dict; missing, unreadable, invalid or non-mapping -> ConfigError."""
    p = Path(path)
    if not p.is_file():
        why = "is a directory" if p.is_dir() else "not found"
        raise ConfigError(f"config file {p}: {why}; pass the path of an existing YAML file")
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"config file {p}: invalid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p}: not a text file; pass a UTF-8 YAML file") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {p}: expected a mapping with keys preset, model, train, data; "
                          f"got a {type(doc).__name__}")
    return doc


def load_config(preset: str | None = None, yaml_path: str | os.PathLike | None = None,
                overrides: Iterable[str] = (), values: Mapping[str, Any] | None = None) -> Config:
    """Resolve a config: preset < YAML overlay < dotted overrides < ``values``.

    The base preset is, in order of precedence, a ``preset=NAME`` override, the ``preset`` argument,
    the YAML file's top-level ``preset:`` key, and otherwise ``"tiny"``. ``values`` maps dotted keys to
    values that are already typed (command-line options): they are checked like any other, but never parsed
    as YAML, so a string stays exactly the string given (``--name "exp #2"``, ``--name null``).

    ``train.warmup_steps`` follows ``train.steps`` unless the YAML or an override sets it: the preset's
    warmup, capped at the step count (so a smoke run of a few steps needs no warmup setting).
    """
    over = parse_overrides(overrides)
    for key, value in (values or {}).items():
        _set_dotted(over, key.split("."), value)
    doc = read_yaml(yaml_path) if yaml_path is not None else {}
    over_preset = over.pop("preset", None)
    yaml_preset = doc.pop("preset", None)
    if yaml_preset is not None and not isinstance(yaml_preset, str):
        raise ConfigError(f"config file {yaml_path}: preset: expected str, got {yaml_preset!r}")
    if isinstance(over_preset, dict):
        raise ConfigError(f"preset: expected a preset name, got keys under it ({', '.join(over_preset)})")
    if isinstance(over_preset, _Raw):
        name = over_preset.text.strip()
    else:
        name = preset if preset is not None else yaml_preset if yaml_preset is not None else "tiny"
    cfg = get_preset(name)
    warmup = None if _names(doc, "train", "warmup_steps") or _names(over, "train", "warmup_steps") \
        else cfg.train.warmup_steps  # not set by the user: it follows the step count
    if warmup is not None:  # 0 while the overlays are checked, so that a short train.steps is not refused
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=0))
    if doc:
        try:
            cfg = config_from_dict(Config, doc, base=cfg)
        except ConfigError as e:
            raise ConfigError(f"config file {yaml_path}: {e}") from None
    if over:
        cfg = config_from_dict(Config, over, base=cfg)
    if warmup is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, warmup_steps=min(warmup, cfg.train.steps)))
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the full resolved config as YAML (atomically); ``load_config(yaml_path=path)`` gives it back."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        text = f"# hclsm config (preset {cfg.preset})\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
        atomic_write_text(p, text)
    except OSError as e:
        raise ConfigError(f"cannot write config to {p}: {e.strerror}; choose a writable path") from None
    return p
