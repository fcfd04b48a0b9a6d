"""Sampling-based planners over action sequences: CEM and MPPI.

Both optimise a Gaussian over action sequences (H, A) against a batched cost ``cost_fn(actions (N, H, A)) -> (N,)``
that scores every candidate in one call (for the world model: one batched rollout, never a loop over candidates).
The design follows LeRobot's ``TDMPCPolicy.plan``: the mean is warm-started from the previous plan shifted by the
steps executed since, the first candidate of every iteration is the mean itself, the refit mean moves with momentum
and the std is clamped to ``[min_std, max_std]`` so the search neither collapses nor explodes. Actions are clamped
to the box ``[low, high]``.

* **CEM** refits mean and std to the ``elites`` lowest-cost candidates, equally weighted.
* **MPPI** refits them to all candidates weighted by ``softmax(-(cost - min) / (temperature * spread))``, where
  ``spread`` is the candidates' cost standard deviation, so the temperature is unitless: small = greedy (the best
  candidate dominates), large = the plain mean of the candidates.

Stds are given in units of the half-width of the action box, ``(high - low) / 2``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

CostFn = Callable[[torch.Tensor], torch.Tensor]  # actions (N, H, A) -> cost (N,)


@dataclass
class PlannerConfig:
    horizon: int = 5  # actions per plan (one per env step)
    samples: int = 64  # candidates per iteration (the mean is one of them)
    iterations: int = 5  # refits per plan
    elites: int = 8  # CEM: candidates the Gaussian is refitted to
    temperature: float = 0.5  # MPPI: softmax temperature in units of the candidates' cost std
    init_std: float = 0.3  # std of a fresh plan (fraction of the action box's half-width)
    min_std: float = 0.02  # std clamp, same units
    max_std: float = 1.0
    momentum: float = 0.1  # share of the old mean kept at each refit

    def __post_init__(self):
        for name in ("horizon", "samples", "iterations", "elites"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlannerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.elites > self.samples:
            raise ValueError(f"PlannerConfig.elites ({self.elites}) must be <= samples ({self.samples})")
        if not 0 < self.min_std <= self.max_std:
            raise ValueError(f"PlannerConfig needs 0 < min_std <= max_std, got {self.min_std}, {self.max_std}")
        if self.temperature <= 0 or not 0 <= self.momentum < 1:
            raise ValueError("PlannerConfig needs temperature > 0 and 0 <= momentum < 1")


class SamplingPlanner(ABC):
    """Shared loop of CEM and MPPI; subclasses say how candidates are weighted (``weights``)."""

    def __init__(self, cfg: PlannerConfig, low: torch.Tensor, high: torch.Tensor, seed: int = 0):
        self.cfg = cfg
        self.low, self.high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.scale = (self.high - self.low) / 2  # (A,)
        self.generator = torch.Generator().manual_seed(seed)
        self._prev: torch.Tensor | None = None  # the last plan's mean (H, A)

    def reset(self) -> None:
        """Forget the previous plan (a new episode)."""
        self._prev = None

    @abstractmethod
    def weights(self, cost: torch.Tensor) -> torch.Tensor:
        """The candidates' weights in the refit, (N,) costs -> (N,) summing to 1 (CEM: elites; MPPI: softmax)."""

    def initial_mean(self, default: torch.Tensor, executed: int) -> torch.Tensor:
        """Warm start: the previous mean shifted by the ``executed`` steps, its tail padded with its last action;
        ``default`` (H, A) when there is no previous plan."""
        if self._prev is None or executed >= self.cfg.horizon:
            return default.clone()
        kept = self._prev[executed:]  # (H - executed, A)
        return torch.cat([kept, kept[-1:].expand(executed, -1)], dim=0)

    @torch.no_grad()
    def plan(self, cost_fn: CostFn, default: torch.Tensor, executed: int = 0) -> torch.Tensor:
        """The planned actions (H, A). ``default`` (H, A) seeds a fresh plan (e.g. "hold the current position");
        ``executed`` is the number of steps of the previous plan that were carried out since it was made."""
        c = self.cfg
        h, a = c.horizon, self.low.numel()
        mean = self.initial_mean(torch.as_tensor(default, dtype=torch.float32).reshape(h, a), executed)
        std = (c.init_std * self.scale).expand(h, a).clone()  # (H, A)
        for _ in range(c.iterations):
            noise = torch.randn(c.samples, h, a, generator=self.generator)  # (N, H, A)
            noise[0] = 0  # candidate 0 is the current mean
            cand = torch.maximum(torch.minimum(mean + std * noise, self.high), self.low)  # (N, H, A)
            cost = cost_fn(cand).float()  # (N,)
            if cost.shape != (c.samples,):
                raise ValueError(f"cost_fn must return one cost per candidate ({c.samples},), got {tuple(cost.shape)}")
            w = self.weights(cost)[:, None, None]  # (N, 1, 1)
            new_mean = (w * cand).sum(0)  # (H, A)
            new_std = (w * (cand - new_mean).pow(2)).sum(0).sqrt()
            mean = c.momentum * mean + (1 - c.momentum) * new_mean
            std = torch.maximum(torch.minimum(new_std, c.max_std * self.scale), c.min_std * self.scale)
        self._prev = mean
        return mean


class CEM(SamplingPlanner):
    """Cross-entropy method: the Gaussian refitted to the ``elites`` cheapest candidates, equally weighted."""

    def weights(self, cost: torch.Tensor) -> torch.Tensor:
        w = torch.zeros_like(cost)
        w[torch.topk(cost, self.cfg.elites, largest=False).indices] = 1.0 / self.cfg.elites
        return w


class MPPI(SamplingPlanner):
    """Model-predictive path integral: every candidate weighted by ``exp(-cost / lambda)`` (normalised)."""

    def weights(self, cost: torch.Tensor) -> torch.Tensor:
        spread = cost.std().clamp_min(1e-8) if cost.numel() > 1 else cost.new_tensor(1.0)
        return torch.softmax(-(cost - cost.min()) / (self.cfg.temperature * spread), dim=0)


PLANNERS = {"cem": CEM, "mppi": MPPI}


def make_planner(name: str, cfg: PlannerConfig, low, high, seed: int = 0) -> SamplingPlanner:
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; choose one of {sorted(PLANNERS)}")
    return PLANNERS[name](cfg, low, high, seed)
