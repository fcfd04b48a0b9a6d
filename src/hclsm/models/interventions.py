"""Interventions on object slots, for counterfactual rollouts ("what if object k had been elsewhere?").

An ``Intervention`` acts on one slot of every sample at the **last context step** of a rollout
(``HCLSM.rollout(..., intervention=...)`` / ``HCLSM.predict_ahead``), after the object layers have read
the context frames and before the dynamics predicts the first future step:

* ``displace``: the slot's position becomes ``value`` (B, 2) (model coordinates: x and y in [-1, 1]); its
  velocity is kept (the previous position moves with it), as in a teleport;
* ``push``: ``value`` (B, 2) is added to the slot's velocity (model units per frame);
* ``remove``: the slot is dead from then on (``value`` unused);
* ``set``: the slot's state vector becomes ``value`` (B, d_slot) — ``do(slot, value)`` in latent space.

Pixels and model coordinates: ``to_model_xy`` / ``to_model_velocity`` convert from image pixels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from hclsm.models.dynamics import DynamicsState

KINDS = ("displace", "push", "remove", "set")


def to_model_xy(xy_px: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixel coordinates (x = column, y = row, in [0, image_size]) -> model positions in [-1, 1]."""
    return xy_px * (2.0 / image_size) - 1.0


def to_model_velocity(v_px: torch.Tensor, image_size: int) -> torch.Tensor:
    """Pixels per frame -> model position units per frame."""
    return v_px * (2.0 / image_size)


@dataclass
class Intervention:
    kind: str  # one of KINDS
    slot: torch.Tensor  # (B,) int64: the slot intervened on, per sample
    value: torch.Tensor | None = None  # (B, 2) displace / push, (B, d_slot) set, None for remove

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"intervention kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind != "remove" and self.value is None:
            raise ValueError(f"a {self.kind!r} intervention needs a value")

    def apply(self, slots: torch.Tensor, positions: torch.Tensor, gate: torch.Tensor,
              previous: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One step's slots (B, K, d), positions (B, K, 2), alive gate (B, K) and the previous step's
        positions (B, K, 2) or None (the dynamics reads the velocity as their difference) -> the same, intervened
        (new tensors; the inputs are not modified)."""
        rows = torch.arange(slots.shape[0], device=slots.device)
        k = self.slot.to(slots.device)
        slots, positions, gate = slots.clone(), positions.clone(), gate.clone()
        previous = None if previous is None else previous.clone()
        if self.kind == "displace":
            shift = self.value.to(positions) - positions[rows, k]
            positions[rows, k] += shift
            if previous is not None:
                previous[rows, k] += shift
        elif self.kind == "push":
            if previous is None:  # no velocity yet: the step reads 0; the push is the velocity
                previous = positions.clone()
            previous[rows, k] -= self.value.to(positions)
        elif self.kind == "remove":
            gate[rows, k] = 0.0
        else:
            slots[rows, k] = self.value.to(slots)
        return slots, positions, gate, previous


def apply_to_state(intervention: Intervention, slots: torch.Tensor, positions: torch.Tensor, gate: torch.Tensor,
                   state: DynamicsState) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DynamicsState]:
    """``intervention.apply`` on a dynamics step's inputs and its ``DynamicsState`` (whose ``positions`` field
    holds the previous step's positions)."""
    slots, positions, gate, previous = intervention.apply(slots, positions, gate, state.positions)
    return slots, positions, gate, dataclasses.replace(state, positions=previous)
