"""The learned causal graph (seed Layer 4): NOTEARS acyclicity, the augmented Lagrangian that really
updates during training, a graph trained by the prediction loss, and objects that read only their parents."""
from __future__ import annotations

import math

import pytest
import torch

from hclsm.config import load_config
from hclsm.config.model import CausalConfig
from hclsm.models import build_model
from hclsm.models.dynamics import HierarchicalDynamics
from hclsm.nn.causal import CausalGraph, GraphOutput, acyclicity, pair_geometry
from hclsm.train import build_optimizer, train_step

from helpers import SMALL
from test_dynamics import dynamics_inputs

CAUSAL = ["model.dynamics.l1.d_model=16", "model.dynamics.l2.d_model=16", "model.gnn.d_edge=8",
          "model.causal.enabled=true"]


def causal_cfg(*extra: str):
    return load_config("tiny", overrides=[*SMALL, *CAUSAL, *extra])


def test_acyclicity_is_zero_exactly_for_dags_and_positive_with_a_cycle():
    dag = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)  # 0 -> 1 -> 2, 0 -> 2
    cycle = dag.clone()
    cycle[0, 2] = 1.0  # and 2 -> 0
    h = acyclicity(torch.stack([dag, cycle, 0.5 * cycle]))
    assert h[0] == 0 and h[1] > 0.5 and 0 < h[2] < h[1]


def test_the_lagrangian_update_changes_the_multiplier_and_the_penalty():
    graph = CausalGraph(8, 8, CausalConfig(update_every=2, rho_init=0.1, rho_mult=2.0, rho_max=0.3, penalty_start=0))
    graph.after_step(0.4)
    assert graph.alpha == 0 and graph.rho == pytest.approx(0.1)  # one step into a window of two: no update
    graph.after_step(0.6)
    assert graph.alpha.item() == pytest.approx(0.1 * 0.5) and graph.rho == pytest.approx(0.1)  # first: no rho rise
    graph.after_step(0.5)
    graph.after_step(0.5)  # h did not fall below a quarter of 0.5: rho doubles
    assert graph.alpha.item() == pytest.approx(0.05 + 0.1 * 0.5) and graph.rho == pytest.approx(0.2)
    for _ in range(4):
        graph.after_step(0.5)
    assert graph.rho == pytest.approx(0.3)  # capped at rho_max
    graph.after_step(math.nan)  # a skipped step's NaN is not counted in h
    assert graph.h_count == 0 and graph.steps == 9
    late = CausalGraph(8, 8, CausalConfig(update_every=1, penalty_start=2))
    late.after_step(0.5)  # the penalty is not on yet (before penalty_start): no update, but the step counts
    assert late.h_count == 0 and late.alpha == 0 and late.steps == 1
    names = {n for n, _ in graph.named_buffers()}
    assert {"alpha", "rho", "h_prev", "h_sum", "h_count", "steps"} <= names and all(
        n in graph.state_dict() for n in names)  # checkpointed: a resumed run continues them


def test_the_penalties_ramp_in_after_penalty_start_graph_steps():
    graph = CausalGraph(16, 8, CausalConfig(penalty_start=3, penalty_ramp=2))
    out = graph.eval()(torch.randn(2, 4, 3, 16), torch.ones(2, 4, 3))
    ramps = []
    for _ in range(6):
        ramps.append(graph.ramp())
        if len(ramps) == 1:
            assert graph.losses(out, torch.ones(2, 4, 3))["causal"] == 0
        graph.after_step(0.0)
    assert ramps == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert graph.losses(out, torch.ones(2, 4, 3))["causal"] > 0


def test_a_training_step_updates_the_multiplier_from_the_logged_acyclicity():
    torch.manual_seed(0)
    cfg = causal_cfg("model.causal.update_every=1", "model.causal.penalty_start=0")
    model = build_model(cfg.model).train()
    batch = {"video": torch.rand(2, 5, 3, 32, 32), "action": torch.randn(2, 5, 2)}
    result = train_step(model, build_optimizer(model, cfg.train), batch, cfg=cfg.train, stage=2, progress=0.5)
    graph = model.dynamics.graph
    assert result.losses["acyclicity"] > 0  # edge probabilities near 0.5 at the start: cycles everywhere
    assert graph.alpha.item() == pytest.approx(cfg.model.causal.rho_init * result.losses["acyclicity"], rel=1e-5)
    assert graph.steps == 1


def test_the_graph_learns_from_the_prediction_loss_alone():
    torch.manual_seed(0)
    model = build_model(causal_cfg().model).train()
    out = model({"video": torch.rand(2, 5, 3, 32, 32), "action": torch.randn(2, 5, 2)}, progress=0.5, stage=2)
    out.losses["jepa"].backward()
    graph = model.dynamics.graph
    for name, p in graph.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_training_samples_edges_and_evaluation_thresholds_them():
    torch.manual_seed(0)
    graph = CausalGraph(16, 8, CausalConfig(temperature_init=2.0, temperature_min=0.5, anneal_steps=4))
    x, alive = torch.randn(3, 6, 4, 16), torch.ones(3, 6, 4)
    alive[0, :, 2] = 0
    out = graph.eval()(x, alive)
    assert torch.equal(out.adjacency, ((out.logits > 0).float() * (out.prob > 0)))
    assert out.adjacency[0, :, 2].sum() == 0 and out.adjacency[0, :, :, 2].sum() == 0  # a dead slot: no edges
    assert torch.all(out.adjacency.diagonal(dim1=-2, dim2=-1) == 0)
    graph.train()
    a, b = graph(x, alive).adjacency, graph(x, alive).adjacency
    assert not torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}  # sampled, hard in value
    noise = graph.noise(3, 4)
    assert torch.equal(graph(x, alive, noise=noise).adjacency, graph(x, alive, noise=noise).adjacency)
    temps = []
    for _ in range(6):
        temps.append(graph.temperature())
        graph.after_step(0.0)
    assert temps == [2.0, pytest.approx(2.0 * 0.25 ** 0.25), pytest.approx(1.0), pytest.approx(2.0 * 0.25 ** 0.75), 0.5, 0.5]


def test_pair_geometry_reads_relative_position_velocity_distance_and_approach():
    """Two objects 5 apart on x; one still, the other moving towards it at 2 per step, then a third far
    away and receding: the geometry [i, j] is j seen from i, and the distance falls while they approach."""
    p = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 10.0]])
    v = torch.tensor([[0.0, 0.0], [-2.0, 0.0], [0.0, 1.0]])
    pad = torch.zeros(1, 1, 3, 4)  # states of width 6 whose last 2 dims are the position, B = T = 1
    geo = pair_geometry(torch.cat([pad, p[None, None]], -1), torch.cat([pad, v[None, None]], -1), 2)
    assert geo.shape == (1, 1, 3, 3, 6)
    assert torch.allclose(geo[0, 0, 0, 1], torch.tensor([5.0, 0.0, -2.0, 0.0, 5.0, -2.0]), atol=1e-4)
    assert torch.allclose(geo[0, 0, 1, 0], torch.tensor([-5.0, 0.0, 2.0, 0.0, 5.0, -2.0]), atol=1e-4)  # mutual
    assert geo[0, 0, 0, 2, 5] == pytest.approx(1.0, abs=1e-4)  # receding
    assert torch.allclose(geo[0, 0].diagonal(dim1=0, dim2=1), torch.zeros(6, 3), atol=1e-3)


def test_a_graph_with_position_dims_adds_the_geometry_to_the_pair_features_and_trains_it():
    torch.manual_seed(0)
    graph = CausalGraph(6, 8, CausalConfig(), position_dims=2).train()
    x, alive = torch.randn(2, 4, 3, 6), torch.ones(2, 4, 3)
    graph(x, alive).prob.sum().backward()
    assert graph.geo.weight.grad.abs().sum() > 0
    plain = CausalGraph(6, 8, CausalConfig()).eval()  # the same weights without G
    plain.load_state_dict({k: v for k, v in graph.state_dict().items() if not k.startswith("geo.")})
    graph.eval()
    with torch.no_grad():
        assert not torch.allclose(graph(x, alive).logits, plain(x, alive).logits)
        graph.geo.weight.zero_()
        graph.geo.bias.zero_()
        assert torch.allclose(graph(x, alive).logits, plain(x, alive).logits)
    with pytest.raises(ValueError, match="position_dims"):
        CausalGraph(6, 8, CausalConfig(), position_dims=6)


def fix_graph(graph: torch.nn.Module, adjacency: torch.Tensor) -> None:
    """Make ``graph`` (a CausalGraph) return ``adjacency`` (K, K) at every step, in ``forward`` and ``step``."""
    real_forward = graph.forward

    def forward(x, alive, noise=None, return_state=False):
        b, t, k, _ = x.shape
        a = adjacency.expand(b, t, k, k) * alive[..., :, None] * alive[..., None, :]
        return (GraphOutput(a, a, a), real_forward(x, alive, return_state=True)[1]) if return_state else \
            GraphOutput(a, a, a)

    def step(x, alive, state):
        return adjacency * alive[..., :, None] * alive[..., None, :], state

    graph.forward, graph.step = forward, step


def test_objects_read_only_their_parents():
    """With the graph 0 -> 1 -> 2 (3 and 4 unconnected), changing object 2 (no children) changes no other
    object's prediction at any step, while changing object 0 reaches its descendants 1 and 2 only."""
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(causal_cfg().model).eval()
    adjacency = torch.zeros(5, 5)
    adjacency[1, 0] = adjacency[2, 1] = 1.0  # [receiver, sender]
    fix_graph(dyn.graph, adjacency)
    slots, positions, alive, action = dynamics_inputs()
    alive = torch.ones_like(alive)
    with torch.no_grad():  # some steps fire, so the event levels take part
        dyn.detector.threshold_logit.fill_(dyn(slots, positions, alive, action).object_events.logit.median())
    ref = dyn(slots, positions, alive, action)
    for changed, affected in ((2, {2}), (0, {0, 1, 2})):
        s2, p2 = slots.clone(), positions.clone()
        s2[:, :, changed] += 3.0
        p2[:, :, changed] = -p2[:, :, changed]
        new = dyn(s2, p2, alive, action)
        for k in range(5):
            same = torch.allclose(new.slots[:, :, k], ref.slots[:, :, k], atol=1e-6) and torch.allclose(
                new.positions[:, :, k], ref.positions[:, :, k], atol=1e-6)
            assert same == (k not in affected), (changed, k)
