"""Episode graph inference (``hclsm.nn.graph_inference``): a trained toy model finds a follower's leader and gives an
episode without interactions no edges, the prediction loss alone reaches every pair's logit, the graph reads only
the history it is given, and messages flow only along the graph's edges and between touching objects."""
from __future__ import annotations

import pytest
import torch

from hclsm.config.model import EpisodeGraphConfig
from hclsm.errors import ConfigError
from hclsm.nn.graph_inference import EpisodeGraph, contact_mask, huber_change_loss

K, FRAMES, PULL = 3, 16, 0.5  # toy: objects, frames, a follower's acceleration toward its leader (px / frame^2)


def toy_episodes(n: int, gen: torch.Generator, graph: torch.Tensor | None = None):
    """n episodes of K point objects in open space: each ordered pair of a random order is an edge with
    probability 0.4 (or every episode has ``graph``, (K, K) [source, target]); a follower accelerates by PULL toward
    each leader. Returns states x = [p / 32, v] (n, T, K, 4), positions (n, T, K, 2), velocity changes
    (n, T-1, K, 2) and the graphs (n, K, K) [source, target]."""
    if graph is None:
        order = torch.stack([torch.randperm(K, generator=gen) for _ in range(n)])  # (n, K)
        upper = torch.triu(torch.rand(n, K, K, generator=gen) < 0.4, 1)  # edges from earlier to later in the order
        graphs = torch.zeros(n, K, K, dtype=torch.bool)
        for e in range(n):
            graphs[e][order[e][:, None], order[e][None, :]] = upper[e]
    else:
        graphs = graph.bool().expand(n, K, K)
    p = torch.rand(n, K, 2, generator=gen) * 60.0
    v = (torch.rand(n, K, 2, generator=gen) - 0.5) * 3.0
    ps, vs = [p], [v]
    for _ in range(FRAMES - 1):
        rel = p[:, :, None] - p[:, None]  # (n, K, K, 2) [i, j] = p_i - p_j: from j toward i
        unit = rel / (rel.norm(dim=-1, keepdim=True) + 1e-6)
        acc = PULL * (graphs.float()[..., None] * unit).sum(1)  # (n, K, 2): sum over leaders i of follower j
        v = v + acc
        p = p + v
        ps.append(p)
        vs.append(v)
    p, v = torch.stack(ps, 1), torch.stack(vs, 1)  # (n, T, K, 2)
    return torch.cat([p / 32, v], -1), p, v[:, 1:] - v[:, :-1], graphs


def toy_model(**cfg) -> EpisodeGraph:
    return EpisodeGraph(4, 2, 2, EpisodeGraphConfig(d_hidden=16, **cfg))


def test_a_trained_toy_model_finds_a_leader_and_gives_an_episode_without_interactions_no_edges():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = toy_model(penalty_start=100, penalty_ramp=50, update_every=10, refine_steps=100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        x, p, dv, _ = toy_episodes(16, gen)
        alive = torch.ones(x.shape[:3])
        graph = model.infer(x, p, alive)
        out = model.losses(graph, model.predict(x[:, :-1], p[:, :-1], alive[:, :-1], graph.gate), dv, alive[:, 1:])
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        model.after_step(float(out["acyclicity"]))
    model.eval()
    chain = torch.zeros(K, K)
    chain[0, 1] = 1.0  # 0 -> 1 [source, target]; 2 moves on its own
    for truth in (torch.zeros(K, K), chain):
        x, p, dv, _ = toy_episodes(8, gen, truth)
        alive = torch.ones(x.shape[:3])
        with torch.no_grad():
            graph = model.infer(x, p, alive)
        refined = model.refine(graph, x, p, alive, dv)
        want = truth.T.bool().expand(8, K, K)  # [receiver, sender]: edges (prob > 0.5) equal the truth, transposed
        assert torch.equal(refined.prob > 0.5, want), (truth, refined.prob)  # the bench's answer: exact
        right = ((graph.prob > 0.5) == want).all(-1).all(-1)  # (8,) the encoder's alone, episode by episode
        assert right.all() if truth.sum() == 0 else right.sum() >= 6, (truth, graph.prob)


def test_the_prediction_loss_alone_reaches_every_pair_of_the_graph():
    torch.manual_seed(0)
    model = toy_model().train()
    x, p, dv, _ = toy_episodes(4, torch.Generator().manual_seed(1))
    alive = torch.ones(x.shape[:3])
    graph = model.infer(x, p, alive)
    graph.logits.retain_grad()
    assert model.ramp() == 0  # no penalty yet: only the prediction loss below
    huber_change_loss(model.predict(x[:, :-1], p[:, :-1], alive[:, :-1], graph.gate), dv, alive[:, 1:],
                      model.cfg.huber_delta).backward()
    grad = graph.logits.grad.abs()  # (B, K, K)
    off = ~torch.eye(K, dtype=torch.bool)
    assert torch.all(grad[:, off] > 0)  # every pair of every episode gets its own signal
    assert torch.all(grad[:, ~off] == 0)  # and the diagonal none
    assert model.encoder.out[-1].weight.grad.abs().sum() > 0


def test_the_graph_reads_only_the_history_it_is_given():
    torch.manual_seed(0)
    model = toy_model(refine_steps=5).eval()
    torch.nn.init.normal_(model.encoder.out[-1].weight)  # untrained, every logit starts near 0 whatever the history
    x, p, dv, _ = toy_episodes(2, torch.Generator().manual_seed(2))
    alive = torch.ones(x.shape[:3])
    later_x, later_p, later_dv = x.clone(), p.clone(), dv.clone()
    later_x[:, 8:] += torch.randn_like(later_x[:, 8:])
    later_p[:, 8:] += 5.0 * torch.randn_like(later_p[:, 8:])
    later_dv[:, 7:] += torch.randn_like(later_dv[:, 7:])  # the change from frame 7 to 8 ends after the history
    with torch.no_grad():
        graph, later = model.infer(x, p, alive, context=8), model.infer(later_x, later_p, alive, context=8)
        assert torch.equal(graph.logits, later.logits)
        earlier_p = p.clone()
        earlier_p[:, 5] += 5.0
        assert not torch.allclose(model.infer(x, earlier_p, alive, context=8).logits, graph.logits)
    refined = model.refine(graph, x, p, alive, dv, context=8)
    assert torch.equal(refined.logits, model.refine(later, later_x, later_p, alive, later_dv, context=8).logits)
    assert not torch.equal(refined.logits, graph.logits)  # refining moved the logits


def test_messages_flow_only_along_the_graph_and_between_touching_objects():
    """Object 1 reads object 0 only through the edge 0 -> 1; object 2, far from both, reads nobody without an edge;
    two objects about to touch exchange contact messages whatever the graph."""
    torch.manual_seed(0)
    model = toy_model(contact_reach=3.0).eval()
    p = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 40.0]]).expand(1, 2, K, 2).clone()  # (1, T=2, K, 2), static
    x = torch.cat([p / 32, torch.zeros_like(p)], -1)
    alive = torch.ones(1, 2, K)
    gate = torch.zeros(1, K, K)
    gate[0, 1, 0] = 1.0  # [receiver 1, sender 0]
    with torch.no_grad():
        base = model.predict(x, p, alive, gate)
        moved_p = p.clone()
        moved_p[:, :, 0] += torch.tensor([0.0, 7.0])  # move object 0 (still far from the others)
        moved = model.predict(torch.cat([moved_p / 32, x[..., 2:]], -1), moved_p, alive, gate)
    assert not torch.allclose(moved[:, :, 1], base[:, :, 1])  # 1 reads its leader
    assert torch.allclose(moved[:, :, 2], base[:, :, 2])  # 2 reads nobody
    # 2 closing on 0 at 4 px / frame from 5 px away touches within the frame: both are in the contact channel
    q = torch.tensor([[[0.0, 0.0], [20.0, 0.0], [0.0, 9.0]], [[0.0, 0.0], [20.0, 0.0], [0.0, 5.0]]])[None]
    contact = contact_mask(q, alive, 3.0)
    assert contact[0, 1, 0, 2] == 1 and contact[0, 1, 2, 0] == 1 and contact[0, 0].sum() == 0
    assert contact[0, 1, 0, 1] == 0  # 20 px apart: no contact


def test_the_config_rejects_impossible_values():
    with pytest.raises(ConfigError, match="model.causal.episode.prior"):
        EpisodeGraphConfig(prior=1.0)
    with pytest.raises(ConfigError, match="model.causal.episode.temperature"):
        EpisodeGraphConfig(temperature=0.0)
    with pytest.raises(ValueError, match="position_dims"):
        EpisodeGraph(4, 0, 2, EpisodeGraphConfig())


def test_bad_graph_settings_are_one_line_errors():
    from hclsm.config import load_config

    for override, key in (("model.causal.inference=nri", "model.causal.inference"),
                          ("model.causal.episode.huber_delta=0", "model.causal.episode.huber_delta"),
                          ("model.causal.episode.d_hidden=0", "model.causal.episode.d_hidden"),
                          ("model.causal.episode.rho_mult=0.5", "model.causal.episode.rho_mult")):
        with pytest.raises(ConfigError) as err:
            load_config("tiny", overrides=[override])
        assert str(err.value).startswith(key) and "\n" not in str(err.value), str(err.value)


def test_in_the_dynamics_every_pair_of_the_episode_graph_learns_from_the_prediction_alone():
    """``model.causal.inference=episode``: the graph of the last step pools the history and is relaxed, so the
    prediction of the next positions alone reaches every pair's logit; nothing of the penalties is on yet."""
    from hclsm.config import load_config
    from hclsm.models.dynamics import HierarchicalDynamics

    from helpers import SMALL

    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[*SMALL, "model.dynamics.l1.d_model=16", "model.dynamics.l2.d_model=16",
                                         "model.gnn.d_edge=8", "model.causal.enabled=true",
                                         "model.causal.inference=episode", "model.causal.episode.d_hidden=8",
                                         "model.causal.episode.contact_reach=0"]).model
    dyn = HierarchicalDynamics(cfg).train()
    g = torch.Generator().manual_seed(0)
    slots, positions = torch.randn(2, 8, 4, 16, generator=g), torch.rand(2, 8, 4, 2, generator=g) * 2 - 1
    out = dyn(slots, positions, torch.ones(2, 8, 4), torch.zeros(2, 8, 2))
    out.graph.logits.retain_grad()
    (out.positions[:, -1] - positions[:, -1]).pow(2).sum().backward()
    grad = out.graph.logits.grad[:, -1].abs()  # (B, K, K) the last step's graph
    off = ~torch.eye(4, dtype=torch.bool)
    assert torch.all(grad[:, off] > 0) and torch.all(grad[:, ~off] == 0)
    assert dyn.graph.ramp() == 0
