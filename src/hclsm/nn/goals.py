"""Level 2 of the HCLSM dynamics: learned summary queries compress the past events into goal-level tokens.

At every step t, ``n_summary`` learned queries (shifted by a projected goal vector when the module has
``d_goal > 0`` and a goal is passed) cross-attend to the **event steps s <= t** only, each event being
the alive-weighted mean of the object states at that step (or a caller's own pooled state). ``layers`` blocks of cross-attention + MLP
(``MemoryBlock``, shared with level 1) refine the queries; the memory itself is fixed. As in level 1, the
scores carry a learned per-head recency slope, values are scaled by the event gate (its straight-through
gradient reaches the detector), a learned null token makes the no-event case well defined, and the
softmax is in fp32.

The reference pooled all events of the clip, future ones included, and broadcast that context to every
step; here the summary at t is a function of steps <= t (tested). ``to_slot`` maps a summary to slot width
(mean over its tokens, then a linear map) for broadcasting onto the objects.
"""
from __future__ import annotations

import torch
from torch import nn

from hclsm.config.model import L2Config
from hclsm.nn.events import EventMemory, MemoryBlock, event_bias, gather_events, gather_steps, recency_slopes


class GoalCompressor(nn.Module):
    def __init__(self, d_slot: int, cfg: L2Config, d_goal: int = 0):
        super().__init__()
        d = cfg.d_model
        self.proj_in = nn.Linear(d_slot, d)
        self.queries = nn.Parameter(torch.randn(cfg.n_summary, d))
        self.goal_proj = nn.Linear(d_goal, d) if d_goal > 0 else None
        self.blocks = nn.ModuleList(MemoryBlock(d, cfg.heads) for _ in range(cfg.layers))
        self.slope = recency_slopes(cfg.heads)
        self.norm = nn.LayerNorm(d)
        self.slot_proj = nn.Linear(d, d_slot)
        self.max_events = cfg.max_events

    def forward(self, states: torch.Tensor, gate: torch.Tensor, goal: torch.Tensor | None = None,
                alive: torch.Tensor | None = None) -> torch.Tensor:
        """states (B, T, N, d_slot), gate (B, T), goal (B, d_goal), alive (B, T, N) -> (B, T, n_summary, d_model).

        ``states`` may also be already pooled over the objects, (B, T, d_slot); ``alive`` is then unused.
        """
        B, T = gate.shape
        return self._run(states, gate, torch.arange(T, device=gate.device).expand(B, T), goal, alive)

    def step(self, state: torch.Tensor, gate: torch.Tensor, time: torch.Tensor, memory: EventMemory,
             goal: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of a rollout: the step's pooled state (R, d_slot), gate (R,) and index ``time`` (R,), and the
        memory tokens of the most recent event steps -> the step's summary (R, n_summary, d_model) (== ``forward``'s
        at that step) and its own memory token (R, d_model) (kept when the step is an event)."""
        token = self.proj_in(state)  # (R, d)
        times, valid, gates, _ = memory.with_step(time, gate, None)
        mem = torch.cat([memory.summary, token[:, None]], dim=1)  # (R, M + 1, d)
        return self._attend(mem, gates * valid, times, valid, time[:, None], goal)[:, 0], token

    def to_slot(self, summary: torch.Tensor) -> torch.Tensor:
        """(..., n_summary, d_model) -> (..., d_slot): mean over the summary tokens, then a linear map."""
        return self.slot_proj(summary.mean(-2))

    def _run(self, states: torch.Tensor, gate: torch.Tensor, steps: torch.Tensor, goal: torch.Tensor | None,
             alive: torch.Tensor | None) -> torch.Tensor:
        """Summaries (B, S, n_summary, d_model) at query steps ``steps`` (B, S) of ``states`` (B, T, ...)."""
        idx, valid = gather_events(gate)  # (B, K)
        pooled = gather_steps(states, idx)  # (B, K, d_slot), or (B, K, N, d_slot) to pool here
        if pooled.dim() == 4:
            a = torch.ones_like(pooled[..., :1]) if alive is None else gather_steps(alive, idx)[..., None]
            a = a.to(pooled.dtype)  # (B, K, N, 1)
            pooled = (a * pooled).sum(2) / a.sum(2).clamp_min(1e-6)
        return self._attend(self.proj_in(pooled), gather_steps(gate, idx) * valid, idx, valid, steps, goal)

    def _attend(self, mem: torch.Tensor, weight: torch.Tensor, ev_times: torch.Tensor, valid: torch.Tensor,
                steps: torch.Tensor, goal: torch.Tensor | None) -> torch.Tensor:
        """The summary queries at times ``steps`` (B, S) refined over memory tokens ``mem`` (B, K, d) of events at
        ``ev_times`` (B, K) (valid, value weights (B, K)) -> (B, S, n_summary, d_model)."""
        B, S = steps.shape
        q = self.queries.expand(B, S, *self.queries.shape)  # (B, S, n_summary, d)
        if goal is not None:
            if self.goal_proj is None:
                raise ValueError("GoalCompressor got a goal but was built with d_goal=0")
            q = q + self.goal_proj(goal)[:, None, None]
        n = q.shape[2]
        bias = event_bias(steps, ev_times, valid, self.slope, self.max_events).repeat_interleave(n, dim=2)
        x = q.reshape(B, S * n, -1)  # bias: (B, H, S n, K)
        for block in self.blocks:
            x = block(x, mem, bias, weight)
        return self.norm(x).view(B, S, n, -1)
