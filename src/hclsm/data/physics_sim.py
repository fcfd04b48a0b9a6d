"""2-D ball physics with hidden interactions, a mask-exact renderer and counterfactual interventions.

Units are pixels of the rendered image (x = column, y = row, positions in [0, image_size]) and
frames (one rendered frame = one unit of time, integrated in ``substeps`` semi-implicit Euler steps).
All quantities below are given for a 64 px image and scale with ``s = image_size / 64``.

Objects are balls of distinct colours and distinct radii (3.0 .. 7.5 px), mass ``(r / 5s)^2``.
Per substep ``dt = 1 / substeps``:

1. accelerations from the hidden interactions (below), then ``v += a dt`` and a tiny damping;
2. ``x += v dt``; balls crossing a wall are mirrored back and their normal velocity reflected;
3. overlapping ball pairs are resolved in index order: a mass-weighted elastic impulse along the
   contact normal (only while approaching) and a mass-weighted positional correction that puts them
   exactly in touch. Every overlap found here is a *contact* of the frame.

Hidden interactions (the ground-truth graph, ``graph[i, j] = 1`` when i's state affects j's):

* springs, undirected: Hooke force ``SPRING_K (d - rest)`` along the pair axis, divided by each
  ball's mass, with a rest length shorter than the initial distance so springs visibly contract;
* follow forces along a random DAG: edge ``i -> j`` accelerates j (and only j) toward a stand-off
  distance from i, ``FOLLOW_GAIN (d - d0) u - FOLLOW_DAMP (v_j - v_i)``, clipped to ``FOLLOW_MAX``; the gain
  and the clip are scaled by the scene's ``follow_strength`` (1 by default: the figures above).

Speeds are capped at ``MAX_SPEED`` (a guard against tunnelling; natural dynamics stay well below).
Nothing after the scene is sampled is random, so a run continued from a copied state reproduces the
original bit for bit; counterfactual twins rely on this.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PALETTE = np.array([
    (230, 25, 40), (40, 200, 60), (30, 90, 230), (250, 220, 30), (250, 130, 20), (150, 40, 210),
    (20, 220, 230), (240, 40, 200), (160, 240, 30), (0, 150, 130), (140, 80, 20), (110, 170, 255),
], dtype=np.uint8)  # (P, 3) distinct saturated colours
BACKGROUND = np.array((40, 40, 40), dtype=np.uint8)  # (3,) dark grey
BASE_RADII = np.arange(3.0, 8.0, 0.5)  # (10,) px at 64 px, sampled without replacement
SPRING_K = 0.004  # spring force per px of stretch (mass units * px / frame^2)
FOLLOW_GAIN = 0.004  # follow acceleration per px beyond the stand-off distance (1 / frame^2)
FOLLOW_DAMP = 0.03  # follow damping of the velocity relative to the leader (1 / frame)
FOLLOW_GAP = 4.0  # stand-off distance beyond touching, px at 64 px
FOLLOW_MAX = 0.1  # follow acceleration clip, px / frame^2 at 64 px
DAMPING = 0.002  # fraction of velocity lost per frame
MAX_SPEED = 12.0  # px / frame at 64 px: 1.2 px per substep at 10 substeps, under the smallest radius
INTERVENTIONS = ("displace", "push", "remove")


@dataclass
class Scene:
    """The fixed properties of one episode (K objects)."""

    image_size: int
    radii: np.ndarray  # (K,) float64 px
    colours: np.ndarray  # (K, 3) uint8
    springs: np.ndarray  # (K, K) bool, symmetric, zero diagonal
    rest: np.ndarray  # (K, K) float64 spring rest lengths (meaningful where springs)
    follow: np.ndarray  # (K, K) bool, [i, j] = i pulls j; acyclic
    follow_strength: float = 1.0  # multiplies FOLLOW_GAIN and FOLLOW_MAX

    @property
    def scale(self) -> float:
        return self.image_size / 64.0

    @property
    def mass(self) -> np.ndarray:
        return (self.radii / (5.0 * self.scale)) ** 2  # (K,)

    @property
    def graph(self) -> np.ndarray:
        return (self.springs | self.follow).astype(np.float32)  # (K, K)


@dataclass
class State:
    """The full float64 simulator state; removed objects keep frozen finite values and alive=False."""

    pos: np.ndarray  # (K, 2)
    vel: np.ndarray  # (K, 2)
    alive: np.ndarray  # (K,) bool

    def copy(self) -> State:
        return State(self.pos.copy(), self.vel.copy(), self.alive.copy())


@dataclass
class Trajectory:
    """Recorded frames of a run; ``states[t]`` is the exact simulator state at frame t."""

    positions: np.ndarray  # (T, K, 2) float32, NaN where removed
    velocities: np.ndarray  # (T, K, 2) float32, NaN where removed
    contacts: np.ndarray  # (T, K, K) bool, symmetric
    states: list[State]

    @property
    def events(self) -> np.ndarray:
        return self.contacts.any(axis=(1, 2))  # (T,)


def _place(rng: np.random.Generator, radii: np.ndarray, size: int, margin: float) -> np.ndarray:
    """Non-overlapping centres inside the walls, largest ball first, by rejection sampling."""
    pos = np.zeros((len(radii), 2))  # (K, 2)
    while True:
        placed: list[int] = []
        for k in np.argsort(-radii, kind="stable"):
            for _ in range(200):
                p = rng.uniform(radii[k], size - radii[k], size=2)  # (2,)
                d = np.linalg.norm(pos[placed] - p, axis=1)  # (len(placed),)
                if np.all(d >= radii[placed] + radii[k] + margin):
                    pos[k] = p
                    placed.append(int(k))
                    break
            else:
                break
        if len(placed) == len(radii):
            return pos


def sample_scene(rng: np.random.Generator, image_size: int, num_objects: int, spring_prob: float,
                 follow_prob: float, follow_strength: float = 1.0) -> tuple[Scene, State]:
    """Draw one episode's objects, hidden interactions and initial state."""
    k, s = num_objects, image_size / 64.0
    radii = rng.choice(BASE_RADII, size=k, replace=False) * s  # (K,)
    colours = PALETTE[rng.choice(len(PALETTE), size=k, replace=False)]  # (K, 3)
    pos = _place(rng, radii, image_size, margin=2.0 * s)  # (K, 2)
    angle = rng.uniform(0.0, 2 * np.pi, size=k)  # (K,)
    vel = rng.uniform(1.0, 2.5, size=k)[:, None] * s * np.stack([np.cos(angle), np.sin(angle)], 1)  # (K, 2)
    pair = np.triu(rng.random((k, k)) < spring_prob, 1)  # (K, K)
    springs = pair | pair.T  # (K, K)
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)  # (K, K)
    rest = np.maximum(rng.uniform(0.5, 1.0, size=(k, k)) * dist, radii[:, None] + radii[None] + 2.0 * s)
    rest = np.triu(rest, 1) + np.triu(rest, 1).T  # (K, K) symmetric
    order = rng.permutation(k)  # (K,) topological order of the follow DAG
    follow = np.zeros((k, k), dtype=bool)  # (K, K)
    follow[np.ix_(order, order)] = np.triu(rng.random((k, k)) < follow_prob, 1)
    scene = Scene(image_size, radii, colours, springs, rest, follow, follow_strength)
    return scene, State(pos, vel, np.ones(k, dtype=bool))


def accelerations(scene: Scene, state: State) -> np.ndarray:
    """Accelerations (K, 2) from springs and follow forces; removed objects neither act nor feel."""
    pos, vel, alive = state.pos, state.vel, state.alive
    both = alive[:, None] & alive[None, :]  # (K, K)
    diff = pos[None, :, :] - pos[:, None, :]  # (K, K, 2) diff[i, j] = p_j - p_i
    dist = np.linalg.norm(diff, axis=-1)  # (K, K)
    unit = diff / np.maximum(dist, 1e-9)[..., None]  # (K, K, 2) from i toward j
    stretch = np.where(scene.springs & both, SPRING_K * (dist - scene.rest), 0.0)  # (K, K)
    acc = (stretch[..., None] * unit).sum(axis=1) / scene.mass[:, None]  # (K, 2)
    # Follow: edge i -> j pulls j toward i. Work in [j, i] layout so the sum runs over leaders i.
    pull = follow_pulls(scene.radii, scene.scale, scene.follow_strength, pos, vel)  # (K, K, 2) [j, i]
    active = (scene.follow.T & both)[..., None]  # (K, K, 1) [j, i] = i pulls j
    return acc + np.where(active, pull, 0.0).sum(axis=1)  # (K, 2)


def follow_pulls(radii: np.ndarray, scale: float, strength: float, pos: np.ndarray, vel: np.ndarray) -> np.ndarray:
    """The follow acceleration every ball j would feel from every ball i if i led j: (K, K, 2), [j, i], for
    radii (K,), positions and velocities (K, 2) (diagonal meaningless)."""
    diff = pos[None, :, :] - pos[:, None, :]  # (K, K, 2) diff[j, i] = p_i - p_j
    dist = np.linalg.norm(diff, axis=-1)  # (K, K)
    unit = diff / np.maximum(dist, 1e-9)[..., None]  # (K, K, 2) from j toward i
    stand_off = radii[:, None] + radii[None, :] + FOLLOW_GAP * scale  # (K, K)
    pull = strength * FOLLOW_GAIN * (dist - stand_off)[..., None] * unit  # (K, K, 2) j toward i
    pull = pull - FOLLOW_DAMP * (vel[:, None, :] - vel[None, :, :])  # (K, K, 2) minus v_j - v_i
    norm = np.linalg.norm(pull, axis=-1, keepdims=True)  # (K, K, 1)
    return pull * np.minimum(1.0, strength * FOLLOW_MAX * scale / np.maximum(norm, 1e-12))  # (K, K, 2)


def _collide(scene: Scene, state: State, contacts: np.ndarray) -> None:
    """Resolve overlapping pairs in index order (impulse + positional correction); marks contacts."""
    pos, vel, r, m = state.pos, state.vel, scene.radii, scene.mass
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)  # (K, K)
    touching = np.triu(dist < r[:, None] + r[None, :], 1) & state.alive[:, None] & state.alive[None, :]
    for i, j in np.argwhere(touching):
        delta = pos[j] - pos[i]  # (2,)
        d = float(np.hypot(delta[0], delta[1]))
        overlap = r[i] + r[j] - d
        if overlap <= 0.0:
            continue
        contacts[i, j] = contacts[j, i] = True
        n = delta / d if d > 1e-9 else np.array([1.0, 0.0])  # (2,) normal from i to j
        inv_i, inv_j = 1.0 / m[i], 1.0 / m[j]
        approach = float(np.dot(vel[j] - vel[i], n))
        if approach < 0.0:
            impulse = -2.0 * approach / (inv_i + inv_j)
            vel[i] -= impulse * inv_i * n
            vel[j] += impulse * inv_j * n
        pos[i] -= overlap * inv_i / (inv_i + inv_j) * n
        pos[j] += overlap * inv_j / (inv_i + inv_j) * n


def _step(scene: Scene, state: State, dt: float, contacts: np.ndarray) -> None:
    """One semi-implicit Euler substep in place (see the module docstring for the order)."""
    live = state.alive[:, None]  # (K, 1)
    vel = (state.vel + dt * accelerations(scene, state)) * (1.0 - DAMPING * dt)  # (K, 2)
    speed = np.linalg.norm(vel, axis=1, keepdims=True)  # (K, 1)
    vel = vel * np.minimum(1.0, MAX_SPEED * scene.scale / np.maximum(speed, 1e-12))  # (K, 2)
    state.vel = np.where(live, vel, state.vel)  # (K, 2)
    state.pos = np.where(live, state.pos + dt * state.vel, state.pos)  # (K, 2)
    r = scene.radii[:, None]  # (K, 1)
    top = scene.image_size - r  # (K, 1) largest valid centre coordinate
    low, high = state.pos < r, state.pos > top  # (K, 2)
    state.pos = np.where(low, 2 * r - state.pos, np.where(high, 2 * top - state.pos, state.pos))  # (K, 2)
    state.vel = np.where(low, np.abs(state.vel), np.where(high, -np.abs(state.vel), state.vel))
    _collide(scene, state, contacts)


def simulate(scene: Scene, state: State, frames: int, substeps: int) -> Trajectory:
    """Record ``frames`` frames starting with ``state`` as frame 0 (its contacts are empty)."""
    k = len(scene.radii)
    state = state.copy()
    states = [state.copy()]
    contacts = np.zeros((frames, k, k), dtype=bool)  # (T, K, K)
    for t in range(1, frames):
        for _ in range(substeps):
            _step(scene, state, 1.0 / substeps, contacts[t])
        states.append(state.copy())
    alive = np.stack([s.alive for s in states])[..., None]  # (T, K, 1)
    positions = np.where(alive, np.stack([s.pos for s in states]), np.nan).astype(np.float32)  # (T, K, 2)
    velocities = np.where(alive, np.stack([s.vel for s in states]), np.nan).astype(np.float32)  # (T, K, 2)
    return Trajectory(positions, velocities, contacts, states)


@dataclass
class Intervention:
    """What was done to the twin: ``kind`` on ``target`` at frame ``step``; ``vector`` is the new
    position (displace), the velocity kick (push) or NaN (remove)."""

    kind: str
    step: int
    target: int
    vector: np.ndarray  # (2,) float64


def sample_intervention(rng: np.random.Generator, scene: Scene, factual: Trajectory) -> Intervention:
    """Pick step in [T/4, 3T/4], a target and a kind; a displace with no free spot becomes a push."""
    frames, k = len(factual.states), len(scene.radii)
    step = int(rng.integers(frames // 4, 3 * frames // 4 + 1))
    target = int(rng.integers(k))
    kind = INTERVENTIONS[int(rng.integers(len(INTERVENTIONS)))]
    state, r, s = factual.states[step], scene.radii, scene.scale
    if kind == "displace":
        cand = rng.uniform(r[target], scene.image_size - r[target], size=(256, 2))  # (N, 2)
        others = state.alive & (np.arange(k) != target)  # (K,)
        gap = np.linalg.norm(cand[:, None] - state.pos[None], axis=-1) - r[None] - r[target]  # (N, K)
        moved = np.linalg.norm(cand - state.pos[target], axis=1) >= 2 * r[target]  # (N,)
        ok = np.all((gap >= 2.0 * s) | ~others[None], axis=1) & moved  # (N,)
        if ok.any():
            return Intervention(kind, step, target, cand[np.argmax(ok)])
        kind = "push"
    if kind == "push":
        angle = rng.uniform(0.0, 2 * np.pi)
        kick = rng.uniform(1.5, 3.0) * s * np.array([np.cos(angle), np.sin(angle)])  # (2,)
        return Intervention(kind, step, target, kick)
    return Intervention(kind, step, target, np.full(2, np.nan))


def counterfactual(scene: Scene, factual: Trajectory, iv: Intervention, substeps: int) -> Trajectory:
    """The twin: factual frames before ``iv.step``, then the intervened state re-simulated onward."""
    state = factual.states[iv.step].copy()
    if iv.kind == "displace":
        state.pos[iv.target] = iv.vector
    elif iv.kind == "push":
        state.vel[iv.target] = state.vel[iv.target] + iv.vector
    else:
        state.alive[iv.target] = False
    tail = simulate(scene, state, len(factual.states) - iv.step, substeps)
    # Frame t keeps the factual contacts of its integration, minus those of a moved or removed target.
    t, keep = iv.step, state.alive.copy()  # (K,)
    keep[iv.target] &= iv.kind == "push"
    contacts = factual.contacts[t] & keep[:, None] & keep[None, :]  # (K, K)
    return Trajectory(
        positions=np.concatenate([factual.positions[:t], tail.positions]),  # (T, K, 2)
        velocities=np.concatenate([factual.velocities[:t], tail.velocities]),  # (T, K, 2)
        contacts=np.concatenate([factual.contacts[:t], contacts[None], tail.contacts[1:]]),  # (T, K, K)
        states=factual.states[:t] + tail.states,
    )


def render(scene: Scene, positions: np.ndarray, background: Sequence[int] | np.ndarray = BACKGROUND
           ) -> tuple[np.ndarray, np.ndarray]:
    """Frames (T, H, W, 3) uint8 and masks (T, H, W) uint8 (id k + 1 for ball k, 0 background); ``background``
    is the empty frame's RGB (0-255).

    A pixel belongs to ball k when its centre lies within the radius; later balls are drawn on top;
    NaN (removed) positions draw nothing. Frame colours are looked up from the mask, so they agree.
    """
    size = scene.image_size
    centres = np.arange(size, dtype=np.float64) + 0.5  # (W,)
    mask = np.zeros((len(positions), size, size), dtype=np.uint8)  # (T, H, W)
    for k, r in enumerate(scene.radii):
        dx = centres[None, None, :] - positions[:, k, 0, None, None]  # (T, 1, W)
        dy = centres[None, :, None] - positions[:, k, 1, None, None]  # (T, H, 1)
        mask[dx * dx + dy * dy <= r * r] = k + 1
    lut = np.concatenate([np.asarray(background, dtype=np.uint8)[None], scene.colours])  # (K + 1, 3)
    return lut[mask], mask

