"""Parameter counts of a model, module by module (``hclsm info --preset P``).

``parameter_table`` splits a model's parameters by module path down to ``depth`` levels: one row per
child of the model (depth 1) and, under each, one row per child of that (depth 2), with the trainable
and the frozen count (frozen = ``requires_grad`` off: the EMA target copies). Each level partitions its
parent: parameters a module holds directly, beside its children, get their own ``<path>.(direct)`` row,
and modules without parameters get none. So the depth-1 rows sum to the model's total and the rows
under any row sum to it. A parameter shared by several modules is counted once, under the first path
that reaches it (``named_parameters`` order).

``format_info`` builds a preset's model on the meta device (shapes only: no memory, so even ``large``
is instant; a model whose modules cannot initialise there is built on the CPU) and renders the
table with totals.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from hclsm.config.model import ModelConfig
from hclsm.config.presets import get_preset
from hclsm.models import build_model

DIRECT = "(direct)"  # last path component of the row for a module's own parameters


def parameter_table(model: nn.Module, depth: int = 2) -> list[dict]:
    """Rows ``{"module", "type", "depth", "trainable", "frozen"}`` in tree order (a row, then its children)."""
    params = list(model.named_parameters())  # each parameter once, under its first name

    def counts(selected: list[tuple[str, nn.Parameter]]) -> tuple[int, int]:
        trainable = sum(p.numel() for _, p in selected if p.requires_grad)
        return trainable, sum(p.numel() for _, p in selected) - trainable

    def row(path: str, kind: str, level: int, selected: list[tuple[str, nn.Parameter]]) -> dict:
        trainable, frozen = counts(selected)
        return {"module": path, "type": kind, "depth": level, "trainable": trainable, "frozen": frozen}

    def children_rows(module: nn.Module, path: str, level: int) -> list[dict]:
        prefix = f"{path}." if path else ""
        rows: list[dict] = []
        for name, child in module.named_children():
            child_path = prefix + name
            inside = [(n, p) for n, p in params if n.startswith(child_path + ".")]
            if not inside:
                continue
            rows.append(row(child_path, type(child).__name__, level, inside))
            if level < depth:
                rows += children_rows(child, child_path, level + 1)
        direct = [(n, p) for n, p in params if n.startswith(prefix) and "." not in n[len(prefix):]]
        if direct and (rows or level == 1):  # a module with only direct parameters is already its own row
            rows.append(row(prefix + DIRECT, "Parameter", level, direct))
        return rows

    return children_rows(model, "", 1)


def _build_shapes_only(cfg: ModelConfig) -> nn.Module:
    """The model on the meta device; on the CPU when one of its modules cannot initialise on meta."""
    try:
        with torch.device("meta"):
            return build_model(cfg)
    except (NotImplementedError, RuntimeError):
        return build_model(cfg)


def format_info(preset: str, model: str | None = None) -> str:
    """The parameter table of ``build_model(get_preset(preset).model)`` (``model`` overrides the config's
    model name, e.g. ``flat_ssm``), with totals; counts in millions when the model has a million or more."""
    cfg = get_preset(preset).model
    if model is not None:
        cfg = replace(cfg, name=model)  # validated: an unknown name is a ConfigError
    net = _build_shapes_only(cfg)
    rows = parameter_table(net)
    trainable = sum(r["trainable"] for r in rows if r["depth"] == 1)
    frozen = sum(r["frozen"] for r in rows if r["depth"] == 1)
    millions = trainable + frozen >= 1_000_000

    def fmt(n: int) -> str:
        return f"{n / 1e6:,.3f}M" if millions and n else f"{n:,}"

    def cell(n: int) -> str:
        return fmt(n) if n else "-"

    names = ["  " * (r["depth"] - 1) + r["module"].rsplit(".", 1)[-1] for r in rows]
    w_name = max([len("module"), *map(len, names)])
    w_type = max([len("type"), *(len(r["type"]) for r in rows)])
    w_num = max([len("trainable"), len(fmt(trainable)), len(fmt(frozen))])
    lines = [f"{cfg.name} (preset {preset}): parameters by module",
             f"{'module':<{w_name}}  {'type':<{w_type}}  {'trainable':>{w_num}}  {'frozen':>{w_num}}"]
    lines += [f"{name:<{w_name}}  {r['type']:<{w_type}}  {cell(r['trainable']):>{w_num}}  {cell(r['frozen']):>{w_num}}"
              for name, r in zip(names, rows)]
    lines.append(f"{'total':<{w_name}}  {'':<{w_type}}  {fmt(trainable):>{w_num}}  {fmt(frozen):>{w_num}}")
    lines.append(f"trainable {fmt(trainable)}, frozen {fmt(frozen)} (EMA/target copies: not trained), "
                 f"all {fmt(trainable + frozen)}")
    return "\n".join(lines)
