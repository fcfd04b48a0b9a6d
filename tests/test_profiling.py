"""``hclsm.utils.profiling``: a training step's CPU time attributed to the parts that did it."""
from __future__ import annotations

import torch
from torch import nn

from hclsm.utils.profiling import profile_parts, scope, shares


class TwoParts(nn.Module):
    """A big part (``heavy``), a small one (``light``), and a loss scope that owns a call of ``heavy``."""

    def __init__(self):
        super().__init__()
        self.heavy = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
        self.light = nn.Linear(512, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.light(self.heavy(x))
        with scope("loss/extra"):  # a loss term that runs the heavy part again: its cost is the loss term's
            z = self.heavy(x).pow(2).mean()
        return y.pow(2).mean() + z


def test_forward_and_backward_time_goes_to_the_part_that_did_the_work():
    torch.manual_seed(0)
    model = TwoParts()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(1024, 512)

    def step():
        opt.zero_grad()
        model(x).backward()
        with scope("optimizer"):
            opt.step()

    step()
    parts = profile_parts(model, step)
    assert {"heavy", "light", "loss/extra", "optimizer"} <= set(parts)
    # heavy (forward + backward of two 512x512 layers on 1024 rows) has ~500x the arithmetic of light (512 -> 2);
    # the loss scope owns its own call of heavy, which costs about as much as the first one
    assert parts["heavy"] > 2 * parts["light"] and parts["loss/extra"] > 2 * parts["light"]
    assert 0.2 < parts["loss/extra"] / parts["heavy"] < 5
    assert abs(sum(shares(parts).values()) - 1) < 1e-9
