"""Counterfactual rollouts on the physics scenes' twins, scored against re-simulation.

Every factual episode of a physics dataset generated with ``data.physics.counterfactual`` has a twin: the
same run until frame t, where one object is displaced, pushed or removed, then simulated onward. For each
twin whose intervention leaves ``context`` frames before it and ``horizon`` after:

1. the model reads the factual frames t-C+1 .. t;
2. the slot showing the intervened object at frame t is found (the alive object slot nearest to its true
   position; twins where none is within ``MATCH_RADIUS`` are counted as unmatched and skipped);
3. the same intervention is applied to that slot (``hclsm.models.interventions``; positions and velocity
   kicks converted from pixels) and the model rolls out H frames: the **counterfactual** prediction;
4. errors (pixel MSE at the decoder's resolution, per clip over the horizon): ``factual`` (the plain
   rollout against the factual frames t+1 .. t+H), ``counterfactual`` (the intervened rollout against the
   twin's frames), ``reuse`` (the plain rollout against the twin's frames: what ignoring the intervention
   costs).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from hclsm.data.physics import PhysicsSource
from hclsm.errors import DataError
from hclsm.models.hclsm import HCLSM, Rollout
from hclsm.models.interventions import Intervention, to_model_velocity, to_model_xy

MATCH_RADIUS = 0.25  # model units (1/8 of the frame): farther than this, no slot shows the object


@dataclass
class Case:
    """One twin's counterfactual rollout and its errors."""

    episode: int
    kind: str  # displace | push | remove
    step: int  # the intervention frame t
    context: np.ndarray  # (C, 3, R, R) factual frames t-C+1 .. t at the decoder's resolution
    factual: np.ndarray  # (H, 3, R, R) factual frames t+1 .. t+H
    twin: np.ndarray  # (H, 3, R, R) the twin's frames t+1 .. t+H (re-simulated truth)
    plain: Rollout  # the rollout without the intervention
    intervened: Rollout  # the counterfactual rollout
    errors: dict[str, float]  # factual, counterfactual, reuse


def model_frames(video: np.ndarray, size: int) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (1, T, 3, size, size) float in [0, 1]."""
    x = torch.from_numpy(np.array(video)).permute(0, 3, 1, 2).float().div_(255.0)  # a copy: the arrays are read-only
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x[None]


def _intervention(kind: str, slot: int, vector: np.ndarray, image_size: int) -> Intervention:
    v = torch.as_tensor(np.asarray(vector, dtype=np.float32))[None]  # (1, 2) pixels
    value = {"displace": lambda: to_model_xy(v, image_size), "push": lambda: to_model_velocity(v, image_size),
             "remove": lambda: None}[kind]()
    return Intervention(kind, torch.tensor([slot]), value)


def twin_episodes(root: str | Path, episodes: Iterable[int], context: int, horizon: int) -> list[int]:
    """The episodes whose twin's intervention has ``context`` frames up to it and ``horizon`` after."""
    source = PhysicsSource(root, counterfactual=True)
    keep = []
    for e in episodes:
        step = int(source.load_episode(e, counterfactual=True)["intervention_step"])
        if step - context + 1 >= 0 and step + horizon < source.episode_lengths[e]:
            keep.append(e)
    return keep


@torch.no_grad()
def counterfactual_cases(model: HCLSM, root: str | Path, episodes: Iterable[int], context: int, horizon: int
                         ) -> tuple[list[Case], int]:
    """The counterfactual rollouts of the twins of ``episodes`` (see the module docstring); returns the cases
    and the number of twins skipped because no slot showed the intervened object."""
    source = PhysicsSource(root, counterfactual=True)
    model.eval()
    size = model.cfg.perception.image_size
    data_size = int(source.meta["image_size"])
    cases, unmatched = [], 0
    for e in twin_episodes(root, episodes, context, horizon):
        fact, twin = source.load_episode(e), source.load_episode(e, counterfactual=True)
        t, k = int(twin["intervention_step"]), int(twin["intervention_object"])
        ctx = model_frames(fact["video"][t - context + 1:t + 1], size)
        objects = model.objects(ctx)
        where = to_model_xy(torch.tensor(fact["positions"][t, k], dtype=torch.float32), data_size)
        dist = (objects.positions[0, -1] - where).norm(dim=-1)  # (K,)
        dist = dist.masked_fill(~objects.alive[0, -1], float("inf"))
        if objects.has_background:
            dist[0] = float("inf")
        slot = int(dist.argmin())
        if not dist[slot] <= MATCH_RADIUS:
            unmatched += 1
            continue
        iv = _intervention(str(twin["intervention_kind"]), slot, twin["intervention_vector"], data_size)
        plain, intervened = model.rollout(ctx, horizon), model.rollout(ctx, horizon, intervention=iv)
        truth = model.objects(model_frames(fact["video"][t - context + 1:t + horizon + 1], size)).target[0]
        resim = model.objects(model_frames(twin["video"][t + 1:t + horizon + 1], size)).target[0]
        fact_future, pred, cf = truth[context:], plain.frames[0], intervened.frames[0]
        errors = {"factual": float((pred - fact_future).pow(2).mean()),
                  "counterfactual": float((cf - resim).pow(2).mean()),
                  "reuse": float((pred - resim).pow(2).mean())}
        cases.append(Case(e, str(twin["intervention_kind"]), t, truth[:context].numpy(), fact_future.numpy(),
                          resim.numpy(), plain, intervened, errors))
    return cases, unmatched


def summarise(cases: list[Case], unmatched: int) -> dict[str, Any]:
    """Mean errors over the cases, overall and per intervention kind, and their ratios."""
    if not cases:
        raise DataError("no counterfactual twin could be evaluated (none long enough, or no slot showed the "
                        "intervened object); use a dataset with more or longer episodes")
    out: dict[str, Any] = {"twins": len(cases), "unmatched": unmatched}
    groups = {"all": cases, **{k: [c for c in cases if c.kind == k] for k in sorted({c.kind for c in cases})}}
    for name, group in groups.items():
        prefix = "" if name == "all" else f"{name}_"
        means = {k: float(np.mean([c.errors[k] for c in group])) for k in ("factual", "counterfactual", "reuse")}
        out |= {f"{prefix}{k}_mse": v for k, v in means.items()}
        out[f"{prefix}n"] = len(group)
        out[f"{prefix}ratio_cf_vs_factual"] = means["counterfactual"] / max(means["factual"], 1e-12)
        out[f"{prefix}ratio_cf_vs_reuse"] = means["counterfactual"] / max(means["reuse"], 1e-12)
    return out
