"""Parameter tables: rows partition the model at every level; frozen (EMA) copies are counted apart."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hclsm.config import get_preset
from hclsm.models import build_model
from hclsm.models.info import format_info, parameter_table


class Toy(nn.Module):
    """Direct parameters beside children, a parameter-free child, a shared Linear and a frozen EMA copy."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))
        self.body = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        self.body.bias = nn.Parameter(torch.zeros(2))  # a direct parameter of a module with children
        self.tied = self.body[0]  # shared: counted once, under body.0
        self.act = nn.ReLU()
        self.target = copy.deepcopy(self.body).requires_grad_(False)


def check_partition(model: nn.Module, rows: list[dict]) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    top = [r for r in rows if r["depth"] == 1]
    assert sum(r["trainable"] for r in top) == trainable and sum(r["frozen"] for r in top) == frozen
    for parent in top:
        kids = [r for r in rows if r["depth"] == 2 and r["module"].startswith(parent["module"] + ".")]
        if kids:
            for key in ("trainable", "frozen"):
                assert sum(r[key] for r in kids) == parent[key], (parent["module"], key)


def test_rows_partition_the_model():
    model = Toy()
    rows = parameter_table(model)
    check_partition(model, rows)
    by_path = {r["module"]: r for r in rows}
    assert by_path["(direct)"]["trainable"] == 3
    assert by_path["body"]["trainable"] == 25 + 12 + 2 and by_path["body.(direct)"]["trainable"] == 2
    assert by_path["target"] == {"module": "target", "type": "Sequential", "depth": 1, "trainable": 0, "frozen": 39}
    assert "tied" not in by_path and "act" not in by_path
    assert all(r["depth"] == 1 for r in parameter_table(model, depth=1))


def test_flat_ssm_table_and_format():
    cfg = get_preset("tiny").model
    cfg.name = "flat_ssm"
    model = build_model(cfg)
    check_partition(model, parameter_table(model))
    total = sum(p.numel() for p in model.parameters())
    text = format_info("tiny", model="flat_ssm")
    assert text.splitlines()[-2].split()[:2] == ["total", f"{total:,}"]
    assert "M" in format_info("small", model="flat_ssm").splitlines()[-2]  # millions for big models


def test_hclsm_table_counts_ema_copies_as_frozen():
    pytest.importorskip("hclsm.models.hclsm")
    model = build_model(get_preset("tiny").model)
    rows = parameter_table(model)
    check_partition(model, rows)
    assert next(r for r in rows if r["module"] == "target_objects")["trainable"] == 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable {trainable:,}" in format_info("tiny")
