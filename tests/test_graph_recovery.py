"""Graph recovery (``hclsm bench causal``): linear NOTEARS finds a linear SEM's DAG, slots are matched to
objects by their tracks, and the learned slot graph is read out in object order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hclsm.config import load_config
from hclsm.config.data import PhysicsDataConfig
from hclsm.data.physics import generate_physics_dataset, simulate_episode
from hclsm.eval.causal import episode_graphs, follow_law_graph, graph_scores, match_slots, object_graph
from hclsm.eval.notears import notears_linear, trajectory_graph, trajectory_samples
from hclsm.models import build_model

from helpers import SMALL
from test_causal import CAUSAL


@pytest.mark.parametrize("strength", [1.0, 3.0])
def test_follow_law_fit_recovers_the_follow_dags_from_true_states(strength):
    cfg = PhysicsDataConfig(episodes=1, frames=32, image_size=64, min_objects=4, max_objects=4, spring_prob=0.0,
                            follow_prob=0.5, follow_strength=strength, counterfactual=False, seed=7)
    eps = [simulate_episode(cfg, i)[0] for i in range(12)]
    true = np.stack([e["follow"] for e in eps])
    pred = np.stack([follow_law_graph(e, 64, strength) for e in eps])
    s = graph_scores(true, pred)
    assert true.sum() >= 12 and s["edge_accuracy"] >= 0.95 and s["recall"] >= 0.9, s
    # the same law with the wrong strength is a worse fit: the coefficients move off 1
    assert not np.array_equal(pred, np.stack([follow_law_graph(e, 64, strength * 10) for e in eps]))


def test_notears_recovers_a_linear_sem_and_its_output_is_acyclic():
    rng = np.random.default_rng(0)
    true = np.zeros((4, 4), dtype=bool)
    true[0, 1] = true[1, 2] = true[0, 3] = True  # 0 -> 1 -> 2, 0 -> 3
    weights = np.where(true, 1.5, 0.0)
    x = np.zeros((600, 4))
    for j in range(4):  # 0..3 is a topological order
        x[:, j] = x @ weights[:, j] + rng.normal(size=600)
    w = notears_linear(x)
    assert np.array_equal(w != 0, true), w
    assert np.all(np.diag(w) == 0)


def test_trajectory_samples_take_finite_differences_and_drop_missing_frames():
    pos = np.arange(5 * 2 * 2, dtype=np.float64).reshape(5, 2, 2) ** 2  # (T, K, 2)
    v = trajectory_samples(pos, "velocity")
    assert v.shape == (4 * 2, 2)
    assert v[0, 0] == pos[1, 0, 0] - pos[0, 0, 0] and v[1, 0] == pos[1, 0, 1] - pos[0, 0, 1]
    assert trajectory_samples(pos, "acceleration").shape == (3 * 2, 2)
    pos[2, 1] = np.nan  # object 1 removed at frame 2: the samples touching that frame go
    assert trajectory_samples(pos, "position").shape == (4 * 2, 2)
    with pytest.raises(ValueError, match="kind must be one of"):
        trajectory_samples(pos, "jerk")
    graph = trajectory_graph(np.random.default_rng(1).normal(size=(16, 3, 2)).cumsum(0))
    assert graph.shape == (3, 3) and graph.dtype == bool and not graph.diagonal().any()


def test_slots_are_matched_to_objects_by_their_tracks():
    t = torch.linspace(0, 1, 6)[:, None]
    objects = torch.stack([torch.cat([t, 0 * t], 1), torch.cat([0 * t, t], 1), torch.cat([-t, -t], 1)], 1)  # (6, 3, 2)
    slots = torch.stack([objects[:, 2], objects[:, 0] + 0.01, torch.zeros(6, 2), objects[:, 1]], 1)  # (6, 4, 2)
    alive = torch.ones(6, 4, dtype=torch.bool)
    alive[:, 2] = False  # a dead slot sitting where nothing is
    assert match_slots(slots, alive, objects).tolist() == [1, 3, 0]
    alive[:, 0] = False  # object 2's slot never alive: no slot shows it
    assert match_slots(slots, alive, objects).tolist() == [1, 3, -1]
    slot_graph = np.zeros((4, 4), dtype=bool)
    slot_graph[1, 3] = slot_graph[3, 0] = True  # slot 1 -> 3 (object 0 -> 1), slot 3 -> 0 (object 1 -> 2)
    assert np.argwhere(object_graph(slot_graph, np.array([1, 3, 0]))).tolist() == [[0, 1], [1, 2]]
    assert not object_graph(slot_graph, np.array([1, 3, -1]))[1, 2]  # an unmatched object has no edges


def test_graph_scores_count_a_reversal_once_and_twice():
    true = np.zeros((1, 3, 3), dtype=bool)
    true[0, 0, 1] = True
    pred = np.zeros_like(true)
    pred[0, 1, 0] = True  # reversed
    s = graph_scores(true, pred)
    assert s["shd"] == 1 and s["shd_cdt"] == 2 and s["edge_accuracy"] == pytest.approx(4 / 6) and s["recall"] == 0


def test_episode_graphs_read_the_learned_graph_of_every_episode(tmp_path):
    root = tmp_path / "scenes"
    generate_physics_dataset(root, PhysicsDataConfig(episodes=2, frames=6, image_size=32, min_objects=3, max_objects=3,
                                                     spring_prob=0.0, follow_prob=1.0, counterfactual=False), progress=False)
    torch.manual_seed(0)
    model = build_model(load_config("tiny", overrides=[*SMALL, *CAUSAL, "model.d_action=0"]).model)
    graphs = episode_graphs(model, root, range(2))
    assert len(graphs) == 2
    for g in graphs:
        assert g.true.shape == g.pred.shape == g.prob.shape == (3, 3)
        assert g.true.sum() == 3  # follow_prob 1: a full DAG on 3 objects
        assert 0 <= g.matched <= 3 and g.h_prob >= 0.0 and g.valid.shape == (3,) and g.valid.sum() == g.matched
        assert not g.pred.diagonal().any()
        assert not g.pred[~g.valid].any() and not g.pred[:, ~g.valid].any()  # an unmatched object has no edges
    plain = build_model(load_config("tiny", overrides=SMALL).model)
    with pytest.raises(ValueError, match="no causal graph"):
        episode_graphs(plain, root, range(1))


def test_causal_graph_figure_draws_learned_edges_and_missed_true_edges():
    from hclsm.viz.dynamics import EDGE_RGB, MISSED_RGB, causal_graph_figure

    frame = torch.full((3, 16, 16), 0.2)
    pos = torch.tensor([[0.0, 0.0], [-0.6, -0.6], [0.6, -0.6], [0.0, 0.6]])  # slot 0 is the background
    alive = torch.tensor([True, True, True, True])
    prob = torch.zeros(4, 4)
    none = causal_graph_figure(frame, pos, alive, prob, scale=8)
    assert none.shape == (16 * 8, 16 * 8, 3)
    assert not (none == EDGE_RGB).all(-1).any()
    prob[2, 1] = 0.9  # slot 1 -> slot 2 [receiver, sender]
    one = causal_graph_figure(frame, pos, alive, prob, scale=8)
    red = (one == EDGE_RGB).all(-1)
    assert red[20:44, 40:88].any() and not red[80:, :].any()  # along the top, between slots 1 and 2 only
    true = np.zeros((4, 4), dtype=bool)
    true[1, 3] = True  # slot 1 -> slot 3 exists, the graph missed it
    missed = causal_graph_figure(frame, pos, alive, prob, true=true, scale=8)
    assert (missed == MISSED_RGB).all(-1)[40:100, 20:60].any()
    alive[3] = False  # a dead slot has no node and no edges
    dead = causal_graph_figure(frame, pos, alive, prob, true=true, scale=8, title="t")
    assert dead.shape == (16 * 8 + 20, 16 * 8, 3) and not (dead == MISSED_RGB).all(-1).any()
