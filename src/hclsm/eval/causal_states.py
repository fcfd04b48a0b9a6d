"""Graph inference from true states (``hclsm bench causal-states``, the NRI setting): the simulator's states of
physics episodes as tensors, the training loop of an ``EpisodeGraph`` on them (counted in steps), and the
per-episode graphs it infers for held-out scenes.

An object's state is ``[p / 32 - 1, v / 2, r / 5]`` (position, velocity, radius at 64 px, scaled to about unit
range); the graph's pair geometry reads the positions in px (at 64 px), and the decoder predicts each ball's
velocity change over the frame, ``v(t + 1) - v(t)`` (px / frame^2), from the states at t.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hclsm.data.physics import PhysicsSource
from hclsm.nn.graph_inference import EpisodeGraph

STATE_DIM, POSITION_DIMS, TARGET_DIM = 5, 2, 2  # [p, v, r]; positions; velocity change


@dataclass
class EpisodeStates:
    """E episodes of T frames and up to K objects (padding: ``alive`` False, zeros)."""

    x: torch.Tensor  # (E, T, K, 5) the scaled states [p / 32 - 1, v / 2, r / 5]
    positions: torch.Tensor  # (E, T, K, 2) px at 64 px
    velocities: torch.Tensor  # (E, T, K, 2) px / frame at 64 px
    radii: torch.Tensor  # (E, K) px at 64 px
    alive: torch.Tensor  # (E, T, K) float
    graph: np.ndarray  # (E, K, K) bool, the true follow DAG [source, target]

    def __len__(self) -> int:
        return self.x.shape[0]

    def select(self, index: torch.Tensor) -> EpisodeStates:
        return EpisodeStates(self.x[index], self.positions[index], self.velocities[index], self.radii[index],
                             self.alive[index], self.graph[index.numpy()])


def load_states(root: str | Path, episodes: range | None = None) -> EpisodeStates:
    """The true states of a physics dataset's episodes (all when None), padded to its ``max_objects``."""
    source = PhysicsSource(root)
    episodes = range(len(source.episode_lengths)) if episodes is None else episodes
    scale = 64.0 / float(source.meta.get("image_size") or 64)
    frames, kmax = source.episode_lengths[0], source.max_objects
    e = len(episodes)
    pos, vel = np.zeros((e, frames, kmax, 2), np.float32), np.zeros((e, frames, kmax, 2), np.float32)
    radii, alive = np.zeros((e, kmax), np.float32), np.zeros((e, frames, kmax), np.float32)
    graph = np.zeros((e, kmax, kmax), bool)
    for n, i in enumerate(episodes):
        ep = source.load_episode(i)
        k = len(ep["radii"])
        live = np.isfinite(ep["positions"]).all(-1)  # (T, K)
        pos[n, :, :k] = np.nan_to_num(ep["positions"]) * scale
        vel[n, :, :k] = np.nan_to_num(ep["velocities"]) * scale
        radii[n, :k] = ep["radii"] * scale
        alive[n, :, :k] = live
        graph[n, :k, :k] = ep["follow"]
    p, v, r = torch.from_numpy(pos), torch.from_numpy(vel), torch.from_numpy(radii)
    x = torch.cat([p / 32 - 1, v / 2, (r / 5)[:, None, :, None].expand(-1, frames, -1, 1)], -1)  # (E, T, K, 5)
    live = torch.from_numpy(alive)
    return EpisodeStates(x * live[..., None], p, v, r, live, graph)


def step_losses(model: EpisodeGraph, batch: EpisodeStates) -> dict[str, torch.Tensor]:
    """One batch's losses: the graph inferred from every frame, the velocity change of frames 0..T-2 predicted."""
    graph = model.infer(batch.x, batch.positions, batch.alive, batch.radii)
    pred = model.predict(batch.x[:, :-1], batch.positions[:, :-1], batch.alive[:, :-1], graph.gate, batch.radii)
    target = batch.velocities[:, 1:] - batch.velocities[:, :-1]  # (B, T-1, K, 2)
    return model.losses(graph, pred, target, batch.alive[:, :-1] * batch.alive[:, 1:])


def train_episode_graph(model: EpisodeGraph, data: EpisodeStates, steps: int, batch: int = 16, lr: float = 1e-3,
                        clip: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Adam on ``step_losses`` of random batches of episodes for ``steps`` steps, the gradient norm clipped at
    ``clip`` (a rare batch's spike otherwise knocks every gate shut for good); ``model.after_step`` after each.
    Returns the last 100 steps' mean losses and the minutes taken."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    start, recent = time.perf_counter(), []
    for _ in range(steps):
        out = step_losses(model, data.select(torch.randint(len(data), (batch,), generator=gen)))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        model.after_step(float(out["acyclicity"]))
        recent = (recent + [{k: float(v.detach()) for k, v in out.items()}])[-100:]
    model.eval()
    final = {f"final_{k}": float(np.mean([r[k] for r in recent])) for k in recent[0]} if recent else {}
    return {**final, "steps": steps, "minutes": (time.perf_counter() - start) / 60}


def infer_graphs(model: EpisodeGraph, data: EpisodeStates, refine: bool = True, chunk: int = 64
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Each episode's edge logits read from all its frames, (E, K, K) [source, target] (an edge where > 0): the
    encoder's, and refined on the episode's own velocity changes (``EpisodeGraph.refine``; the encoder's again
    when ``refine`` is off). -inf for pairs with padding."""
    model.eval()
    amortised, refined = [], []
    for i in range(0, len(data), chunk):
        b = data.select(torch.arange(i, min(i + chunk, len(data))))
        with torch.no_grad():
            graph = model.infer(b.x, b.positions, b.alive, b.radii)
        amortised.append(graph.logits.masked_fill(graph.pairs == 0, -torch.inf))  # no edge to or from padding
        if refine:
            graph = model.refine(graph, b.x, b.positions, b.alive, b.velocities[:, 1:] - b.velocities[:, :-1], b.radii)
        refined.append(graph.logits.masked_fill(graph.pairs == 0, -torch.inf))
    return (torch.cat(amortised).transpose(-1, -2).numpy(), torch.cat(refined).transpose(-1, -2).numpy())
