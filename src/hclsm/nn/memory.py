"""Episodic modern-Hopfield memory of object states (seed Layer 5), read by the dynamics at every step.

One memory per sequence (per sample of a clip, per rollout), empty at its start and holding at most
``model.memory.size`` entries. At step t the dynamics first **reads** (every object queries the entries written
at steps < t), then **writes** (step t's object states become candidates for the steps after), so the read of
step t never sees step t or later: the memory is as causal as the rest of the dynamics.

* **Read** (modern Hopfield retrieval, Ramsauer et al. 2021, in its cosine form):
  ``r = W_o softmax(beta * cos(W_q h, W_k M)) W_v M`` over the readable entries M, added to each object's state.
  beta (the inverse temperature; starts at ``model.memory.beta``) and the four projections learn from the
  prediction loss. An empty memory reads 0.
* **Write by novelty**: an alive object's state x is stored only when its best similarity to the stored entries
  is below ``model.memory.write_threshold`` (a repeat is not stored twice). The similarity is the cosine of the
  states **relative to the scene**: centred on the mean of the step's alive object states (what every object of
  the scene shares at that step, e.g. the global track, would otherwise make all states look alike; measured on
  a trained model: raw cosine 0.93 between different objects, 0.999 between one object's consecutive steps);
  with fewer than two alive objects it is the plain cosine, and an exact repeat (plain cosine 1) is never new. It goes into a free row while
  there is one, else over the least recently used entry: the one whose last write or last use (being the best
  match of some object's read) is oldest; among those, the one written first (so a step's writes do not replace
  each other while older entries remain), then the lowest row. The objects of one step write one after
  another, so two equal states of one step are stored once.
* Entries are detached records of the states: no gradient flows back in time through the memory (the read
  projections and beta get theirs through every read).
* With a causal graph (``adjacency[b, i, j]``: i reads j), object i reads only entries written by itself or its
  parents, so an object without children still affects no other object.

``recall`` is the plain Hopfield association on the stored states themselves (no projections; cosine centred on
the mean of the stored entries): the retrieval ``hclsm bench memory`` scores on noisy queries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from hclsm.config.model import MemoryConfig


@dataclass
class MemoryState:
    """The memory of a batch of sequences; rows grow (up to ``size``) as objects are written."""

    patterns: torch.Tensor  # (B, n, d) stored object states (detached)
    owner: torch.Tensor  # (B, n) int64: the object (slot index) that wrote each row
    valid: torch.Tensor  # (B, n) bool: the row holds an entry
    last_used: torch.Tensor  # (B, n) int64: the step of the row's last write or last use as a best match
    written: torch.Tensor  # (B, n) int64: the step of the row's write
    step: int = 0  # steps run so far (the step index of the next one)

    @property
    def count(self) -> torch.Tensor:
        """Stored entries per sequence (B,)."""
        return self.valid.sum(-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a (B, Q, d) against b (B, n, d) -> (B, Q, n), in fp32 (also under autocast: the
    write policy thresholds it)."""
    with torch.autocast(a.device.type, enabled=False):
        return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)


def scene_center(x: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """The mean of the alive ones of the K states x (B, K, d) -> (B, 1, d); 0 where fewer than two are alive."""
    w = (alive > 0.5).to(x.dtype)[..., None]  # (B, K, 1)
    n = w.sum(1, keepdim=True)
    zero = x.new_zeros(x.shape[0], 1, *x.shape[2:])  # (B, 1, d) also when K = 0
    return torch.where(n >= 2, (x * w).sum(1, keepdim=True) / n.clamp_min(1.0), zero)


def hopfield_weights(scores: torch.Tensor, beta: torch.Tensor | float, mask: torch.Tensor) -> torch.Tensor:
    """softmax(beta * scores) over the entries where ``mask`` (B, Q, n) holds; rows without one are all 0."""
    logits = (beta * scores).masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(logits, dim=-1) * mask.any(-1, keepdim=True)


class HopfieldMemory(nn.Module):
    def __init__(self, d: int, cfg: MemoryConfig):
        super().__init__()
        self.size, self.threshold = cfg.size, cfg.write_threshold
        self.beta0 = cfg.beta
        m = cfg.d_memory
        self.norm = nn.LayerNorm(d)
        self.query, self.key, self.value = nn.Linear(d, m), nn.Linear(d, m), nn.Linear(d, m)
        self.out = nn.Linear(m, d, bias=False)  # no bias: nothing to read adds exactly 0
        self.log_beta = nn.Parameter(torch.full((), math.log(cfg.beta)))
        with torch.no_grad():  # start close to the memory-free dynamics, then learn how much to read
            self.out.weight.mul_(0.1)

    def init_state(self, batch: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> MemoryState:
        d = self.norm.normalized_shape[0]
        return MemoryState(torch.zeros(batch, 0, d, device=device, dtype=dtype),
                           torch.zeros(batch, 0, dtype=torch.long, device=device),
                           torch.zeros(batch, 0, dtype=torch.bool, device=device),
                           torch.zeros(batch, 0, dtype=torch.long, device=device),
                           torch.zeros(batch, 0, dtype=torch.long, device=device))

    def readable(self, state: MemoryState, k: int, adjacency: torch.Tensor | None) -> torch.Tensor:
        """(B, K, n) bool: which entries each of the K objects may read (all valid ones without a graph)."""
        mask = state.valid[:, None, :].expand(-1, k, -1)
        if adjacency is None:
            return mask
        allowed = (adjacency > 0) | torch.eye(k, dtype=torch.bool, device=adjacency.device)  # (B, K, K)
        return mask & allowed.gather(2, state.owner[:, None, :].expand(-1, k, -1))

    def read(self, h: torch.Tensor, state: MemoryState, adjacency: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, K, d) -> the retrieved vectors (B, K, d) and the attention weights (B, K, n)."""
        mask = self.readable(state, h.shape[1], adjacency)
        q = self.query(self.norm(h))  # (B, K, m)
        entries = self.norm(state.patterns.to(h.dtype))  # (B, n, d)
        w = hopfield_weights(cosine(q, self.key(entries)), self.log_beta.exp(), mask)  # (B, K, n)
        return self.out((w.to(h.dtype) @ self.value(entries))), w

    @torch.no_grad()
    def write(self, x: torch.Tensor, alive: torch.Tensor, state: MemoryState, used: torch.Tensor | None = None
              ) -> MemoryState:
        """Write the novel ones of the K states x (B, K, d) (alive (B, K)) in order; ``used`` (B, n) marks the
        entries this step's read used (their last use becomes this step). Returns the new state."""
        b, k, d = x.shape
        t = state.step
        n = min(self.size, state.patterns.shape[1] + k)  # room for this step's writes, never past size
        pad = n - state.patterns.shape[1]
        patterns = torch.cat([state.patterns, state.patterns.new_zeros(b, pad, d)], 1)
        owner = F.pad(state.owner, (0, pad))
        valid = F.pad(state.valid, (0, pad))
        last_used, written = F.pad(state.last_used, (0, pad)), F.pad(state.written, (0, pad))
        if used is not None:
            last_used = torch.where(F.pad(used, (0, pad)), t, last_used)
        rows = torch.arange(n, device=x.device)
        never = torch.iinfo(torch.long).max
        x = x.detach().to(patterns.dtype)
        center = scene_center(x, alive)  # (B, 1, d)
        for i in range(k):
            cand = x[:, i]  # (B, d)
            sim = torch.maximum(cosine(cand[:, None] - center, patterns - center),  # relative to the scene
                                (cosine(cand[:, None], patterns) > 1 - 1e-6).float())  # an exact repeat: 1
            best = sim[:, 0].masked_fill(~valid, -2.0).amax(-1)  # (B,); -2: empty
            write = (alive[:, i] > 0.5) & (best < self.threshold)  # (B,)
            free = ~valid
            used_at = last_used.masked_fill(free, never)
            oldest = used_at == used_at.amin(-1, keepdim=True)  # (B, n) the least recently used rows
            lru = written.masked_fill(~oldest, never).argmin(-1)  # (B,) the first written of them
            row = torch.where(free.any(-1), free.long().argmax(-1), lru)  # the first free row, else the LRU one
            hit = (rows[None] == row[:, None]) & write[:, None]  # (B, n)
            patterns = torch.where(hit[..., None], cand[:, None], patterns)
            owner = torch.where(hit, i, owner)
            valid = valid | hit
            last_used, written = torch.where(hit, t, last_used), torch.where(hit, t, written)
        return MemoryState(patterns, owner, valid, last_used, written, t + 1)

    def step(self, h: torch.Tensor, alive: torch.Tensor, state: MemoryState, adjacency: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, MemoryState]:
        """One step: the K object states h (B, K, d) read the memory (entries of earlier steps), then are written
        into it. Returns h plus what was read, and the new state."""
        r, w = self.read(h, state, adjacency)
        used = None
        if w.shape[-1]:  # the best match of each alive object that read something is used now
            w = w.detach()
            best = F.one_hot(w.argmax(-1), w.shape[-1]).bool() & (w > 0).any(-1, keepdim=True)  # (B, K, n)
            used = (best & (alive[..., None] > 0.5)).any(1)  # (B, n)
        return h + r, self.write(h, alive, state, used)

    def forward(self, h: torch.Tensor, alive: torch.Tensor, adjacency: torch.Tensor | None = None,
                return_state: bool = False):
        """A whole sequence: h (B, T, K, d), alive (B, T, K), adjacency (B, T, K, K) or None -> h plus, at every
        step, what it read from the earlier steps (exactly ``step`` run T times); with ``return_state`` also the
        memory after the last step."""
        state = self.init_state(h.shape[0], h.device, h.dtype)
        out = []
        for t in range(h.shape[1]):
            y, state = self.step(h[:, t], alive[:, t], state, None if adjacency is None else adjacency[:, t])
            out.append(y)
        return (torch.stack(out, 1), state) if return_state else torch.stack(out, 1)

    @torch.no_grad()
    def recall(self, query: torch.Tensor, state: MemoryState, beta: float | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hopfield association on the stored states: query (B, Q, d) -> the retrieved states
        softmax(beta * cos(query - c, M - c)) M (B, Q, d), c the mean of the stored entries M, and the weights
        (B, Q, n); beta defaults to ``model.memory.beta``."""
        mask = state.valid[:, None, :].expand(-1, query.shape[1], -1)
        center = scene_center(state.patterns, state.valid)  # (B, 1, d) the stored entries' mean
        w = hopfield_weights(cosine(query - center, state.patterns - center), self.beta0 if beta is None else beta,
                             mask)
        return w @ state.patterns.float(), w
