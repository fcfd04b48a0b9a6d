"""The embedding of an action into a model's token width, read at the scale of the other inputs."""
from __future__ import annotations

import torch
from torch import nn


class ActionEmbedding(nn.Linear):
    """``Linear(d_action, d)`` of ``a / scale * 2 - 1`` (``scale`` > 0), else of ``a`` as given.

    PushT's action is the agent's absolute target in simulator pixels, [0, 512]: read raw, its embedding is
    hundreds of times larger than the slot tokens it is added to (an embedding norm ~1000 against tokens of
    norm ~1-10 in a trained tiny model), so it swamps them until the weights shrink. With ``scale`` = 512 it is
    read in [-1, 1], like the positions. A ``nn.Linear``, so checkpoints keep the ``weight`` / ``bias`` names."""

    def __init__(self, d_action: int, d: int, scale: float = 0.0):
        super().__init__(d_action, d)
        self.scale = float(scale)

    def forward(self, action: torch.Tensor) -> torch.Tensor:
        a = action.to(self.weight.dtype)
        return super().forward(a / self.scale * 2 - 1 if self.scale > 0 else a)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale}"
