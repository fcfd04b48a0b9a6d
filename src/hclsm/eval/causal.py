"""Graph recovery: the learned causal graph of held-out physics episodes against the true follow DAG.

For each episode the model reads all its frames; the causal graph of the last step (evaluation mode: an edge
where its logit is > 0, evidence from the whole episode) is over slots. Slots are matched to the true
objects by the Hungarian algorithm on the mean distance between the slot's position and the object's over the
frames where the slot is alive (``match_slots``); the slot graph is then read out in object order
(``object_graph``; an object no slot matched has no edges). Scores use ``hclsm.metrics.graphs`` (row =
source): SHD with a reversal counting 1 (NOTEARS' ``count_accuracy``) and 2 (cdt's default), edge accuracy
over the K (K - 1) ordered pairs, directed precision / recall, and the NOTEARS acyclicity h of the graph's
edge probabilities and of the binary graph. ``EpisodeGraph.valid`` marks the matched objects, so the ranking of
the edge probabilities can be scored over their pairs (``hclsm.metrics.graphs.edge_auc``: a signal under the
threshold shows there). ``follow_law_graph`` is the upper reference: the simulator's
follow law fitted on an episode's true states.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from hclsm.data import physics_sim
from hclsm.data.physics import PhysicsSource
from hclsm.eval.counterfactual import model_frames
from hclsm.metrics.graphs import edge_accuracy, edge_precision_recall_f1, shd
from hclsm.models.hclsm import HCLSM
from hclsm.models.interventions import to_model_xy
from hclsm.nn.causal import acyclicity

UNMATCHED_COST = 1e6  # a slot never alive while the object is visible cannot show it


@dataclass
class EpisodeGraph:
    """One episode's graphs over its K objects, [i, j] = edge i -> j."""

    true: np.ndarray  # (K, K) bool
    pred: np.ndarray  # (K, K) bool: the learned graph read out in object order
    prob: np.ndarray  # (K, K) float: its edge probabilities
    matched: int  # objects that got a slot
    valid: np.ndarray  # (K,) bool: the objects that got a slot (pairs of them are the ones the graph can score)
    h_prob: float  # acyclicity of the slot graph's probabilities (alive slots)
    h_binary: float  # acyclicity of the binary slot graph


def match_slots(slot_xy: torch.Tensor, slot_alive: torch.Tensor, object_xy: torch.Tensor) -> np.ndarray:
    """slot_xy (T, S, 2), slot_alive (T, S) bool, object_xy (T, K, 2) (NaN where removed) -> (K,) int: the
    slot matched to each object (-1: none), minimising the summed mean distance over frames where the slot is
    alive and the object present."""
    both = slot_alive[:, :, None] & torch.isfinite(object_xy).all(-1)[:, None, :]  # (T, S, K)
    dist = (slot_xy[:, :, None] - torch.nan_to_num(object_xy)[:, None]).norm(dim=-1)  # (T, S, K)
    n = both.sum(0)  # (S, K)
    cost = torch.where(n > 0, (dist * both).sum(0) / n.clamp_min(1), torch.full_like(dist[0], UNMATCHED_COST))
    rows, cols = linear_sum_assignment(cost.double().numpy())
    slot = np.full(object_xy.shape[1], -1)
    for s, k in zip(rows, cols):
        if cost[s, k] < UNMATCHED_COST:
            slot[k] = s
    return slot


def object_graph(slot_graph: np.ndarray, slot_of: np.ndarray) -> np.ndarray:
    """A (S, S) slot graph [source, target] and the slot of each of K objects (-1: none) -> (K, K) in object
    order; rows and columns of unmatched objects are 0."""
    k = len(slot_of)
    out = np.zeros((k, k), dtype=slot_graph.dtype)
    ok = slot_of >= 0
    out[np.ix_(ok, ok)] = slot_graph[np.ix_(slot_of[ok], slot_of[ok])]
    return out


@torch.no_grad()
def episode_graphs(model: HCLSM, root: str | Path, episodes: Iterable[int]) -> list[EpisodeGraph]:
    """The learned graph of each episode (see the module docstring); the model needs ``model.causal.enabled``."""
    if model.dynamics.graph is None:
        raise ValueError("this model has no causal graph (model.causal.enabled is false)")
    source = PhysicsSource(root)
    size, data_size = model.cfg.perception.image_size, int(source.meta["image_size"])
    model.eval()
    out = []
    for e in episodes:
        ep = source.load_episode(e)
        video = model_frames(ep["video"], size)  # (1, T, 3, R, R)
        objects = model.objects(video)
        action = video.new_zeros(*video.shape[:2], model.cfg.d_action) if model.cfg.d_action > 0 else None
        graph = model.dynamics(objects.slots, objects.positions, objects.gate, action).graph
        first = 1 if objects.has_background else 0  # the background slot is not an object
        alive = objects.alive[0, :, first:]  # (T, S)
        slot_of = match_slots(objects.positions[0, :, first:], alive,
                              to_model_xy(torch.tensor(ep["positions"], dtype=torch.float32), data_size))
        adjacency = graph.adjacency[0, -1, first:, first:]  # (S, S) [receiver, sender]
        prob = graph.prob[0, -1, first:, first:]
        live = alive[-1]
        out.append(EpisodeGraph(
            true=np.asarray(ep["graph"]) > 0,
            pred=object_graph(adjacency.T.numpy() > 0, slot_of),
            prob=object_graph(prob.T.numpy(), slot_of),
            matched=int((slot_of >= 0).sum()),
            valid=slot_of >= 0,
            h_prob=float(acyclicity(prob[live][:, live])),
            h_binary=float(acyclicity(adjacency[live][:, live]))))
    return out


def graph_scores(true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """(E, K, K) true and predicted graphs [source, target] -> mean SHD (reversal 1 and 2), edge accuracy,
    micro precision / recall / F1, edges per episode."""
    prf = edge_precision_recall_f1(true, pred)
    return {"shd": shd(true, pred), "shd_cdt": shd(true, pred, reversal_counts_double=True),
            "edge_accuracy": edge_accuracy(true, pred), "precision": prf["precision"], "recall": prf["recall"],
            "f1": prf["f1"], "edges_pred": float(np.asarray(pred, dtype=bool).sum((1, 2)).mean()),
            "edges_true": float(np.asarray(true, dtype=bool).sum((1, 2)).mean())}


def follow_law_graph(episode: dict[str, np.ndarray], image_size: int, strength: float = 1.0,
                     threshold: float = 0.5, wall_margin: float = 4.0) -> np.ndarray:
    """An upper reference for graph recovery: the simulator's own follow law fitted on an episode's *true*
    states, (K, K) bool [leader, follower].

    For every ball j, its velocity change over each frame (plus the simulator's velocity damping) is regressed
    by least squares on the follow pull every other ball i would exert on it (``physics_sim.follow_pulls`` at
    the frame's start), over the frames where j touches no ball and stays ``wall_margin`` px (at 64 px) off
    the walls; an edge i -> j where i's coefficient exceeds ``threshold`` (the law's own coefficient is 1 for
    a leader, 0 otherwise). It knows the functional form, so it shows how identifiable the DAG is from exact
    states, not what a learner without that knowledge can do."""
    pos, vel = episode["positions"].astype(np.float64), episode["velocities"].astype(np.float64)  # (T, K, 2)
    contacts, radii = episode["contacts"], episode["radii"].astype(np.float64)  # (T, K, K), (K,)
    frames, k = pos.shape[:2]
    scale = image_size / 64.0
    pulls = np.stack([physics_sim.follow_pulls(radii, scale, strength, pos[t], vel[t])
                      for t in range(frames - 1)])  # (T-1, K, K, 2) [t, j, i]
    change = vel[1:] - vel[:-1] + physics_sim.DAMPING * vel[:-1]  # (T-1, K, 2)
    graph = np.zeros((k, k), dtype=bool)
    for j in range(k):
        p, r = pos[:-1, j], radii[j] + wall_margin * scale  # (T-1, 2)
        clear = ~contacts[1:, j].any(-1) & np.all((p > r) & (p < image_size - r), axis=-1)  # (T-1,)
        clear &= np.isfinite(change[:, j]).all(-1) & np.isfinite(pulls[:, j]).all((-1, -2))
        others = [i for i in range(k) if i != j]
        if clear.sum() * 2 < len(others):  # too few clean frames to fit: no edges
            continue
        x = pulls[clear][:, j, others].transpose(0, 2, 1).reshape(-1, len(others))  # (2 n, K-1)
        y = change[clear, j].reshape(-1)  # (2 n,)
        coef = np.linalg.lstsq(x, y, rcond=None)[0]  # (K-1,)
        graph[others, j] = coef > threshold
    return graph
