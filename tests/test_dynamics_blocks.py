"""Level-1/level-2 dynamics blocks and the relation GNN: causality, gradients, no-event cases, chunking."""
from __future__ import annotations

import pytest
import torch

from hclsm.config.model import GNNConfig, L1Config, L2Config
from hclsm.nn.events import EventDetector, EventMemory, EventOutput, EventTransformer, gather_events
from hclsm.nn.gnn import RelationGNN
from hclsm.nn.goals import GoalCompressor

B, T, N, D = 2, 16, 8, 64
ATOL = 1e-6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _gate() -> torch.Tensor:
    """(B, T) 0/1 gate: sample 0 fires at 2, 5, 6, 11; sample 1 at 0 and 9 only."""
    g = torch.zeros(B, T)
    g[0, [2, 5, 6, 11]] = 1.0
    g[1, [0, 9]] = 1.0
    return g


def _assert_all_grads(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_gather_events_in_time_order_with_padding():
    idx, valid = gather_events(_gate())
    assert idx.tolist() == [[2, 5, 6, 11], [0, 9, 0, 0]]
    assert valid.tolist() == [[True] * 4, [True, True, False, False]]
    idx, valid = gather_events(torch.zeros(B, T))
    assert idx.shape == valid.shape == (B, 0)


# ---------------------------------------------------------------- event detector

def test_detector_is_causal_and_prefix_equals_full():
    det = EventDetector(D, L1Config())
    x = torch.randn(B, T, D)
    full = det(x)
    for t in (0, 3, 9):
        y = x.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:]) * 5
        out = det(y)
        assert torch.allclose(out.prob[:, :t + 1], full.prob[:, :t + 1], atol=ATOL)
        assert torch.equal(out.gate[:, :t + 1], full.gate[:, :t + 1])
        assert torch.allclose(det(x[:, :t + 1]).prob, full.prob[:, :t + 1], atol=ATOL)


@pytest.mark.parametrize("context", [0, 1, 3, 7])
def test_detector_step_by_step_equals_full(context):
    """A rollout's detector, carrying only its last inputs and its convolutions' reach (``step``), after a context
    run as one sequence (``return_state``) or from nothing, gives ``forward``'s logit and gate at every step."""
    det = EventDetector(D, L1Config())
    x = torch.randn(B, 20, D)
    full = det(x)
    state = det(x[:, :context], return_state=True)[1] if context else det.init_state(B)
    for t in range(context, 20):
        out, state = det.step(x[:, t], state)
        assert torch.allclose(out.logit, full.logit[:, t], atol=ATOL) and torch.equal(out.gate, full.gate[:, t])


def test_detector_gate_is_hard_and_threshold_learns():
    det = EventDetector(D, L1Config(event_threshold_init=0.3))
    out = det(torch.randn(B, T, D))
    assert out.threshold.item() == pytest.approx(0.3)
    assert set(out.gate.unique().tolist()) == {0.0, 1.0}  # at initialisation some steps fire, some do not
    assert torch.equal(out.gate.bool(), out.prob > out.threshold)
    (out.gate * torch.randn(B, T)).sum().backward()
    assert det.threshold_logit.grad.abs() > 0
    _assert_all_grads(det)


def test_rate_hinge_is_zero_inside_the_band_and_positive_outside():
    cfg = L1Config(event_rate_min=0.1, event_rate_max=0.5)
    det = EventDetector(D, cfg)
    x = torch.randn(B, T, D)

    def rate(p: float, fired: int) -> float:
        prob, gate = torch.full((B, T), p), torch.zeros(B, T)
        gate[:, :fired] = 1.0
        return det.losses(EventOutput(torch.logit(prob), prob, gate, torch.tensor(0.5)), x)["rate"].item()

    assert rate(0.1, 2) == rate(0.3, 4) == rate(0.5, 8) == 0.0  # mean prob and event fraction in the band
    assert rate(0.05, 4) == pytest.approx(0.05) and rate(0.8, 4) == pytest.approx(0.3)
    assert rate(0.3, 0) == pytest.approx(0.1) and rate(0.3, 12) == pytest.approx(0.25)


def test_rate_hinge_trains_the_threshold_while_nothing_fires():
    det = EventDetector(D, L1Config())
    x = torch.randn(B, T, D)
    with torch.no_grad():
        det.threshold_logit.copy_(det(x).logit.max() + 0.1)
    out = det(x)
    assert out.gate.sum() == 0
    det.losses(out, x)["rate"].backward()
    assert det.threshold_logit.grad > 0  # descent lowers the threshold


def test_signal_loss_fits_the_scale_free_target():
    det = EventDetector(D, L1Config())
    surprise = torch.rand(B, T)
    aligned = torch.logit((surprise / surprise.quantile(0.9, dim=1, keepdim=True)).clamp(0.01, 0.99))

    def signal(logit: torch.Tensor, s: torch.Tensor | None, x: torch.Tensor) -> float:
        out = EventOutput(logit, torch.sigmoid(logit), (logit > 0).float(), torch.tensor(0.5))
        return det.losses(out, x, s)["signal"].item()

    x = torch.randn(B, T, D)
    assert signal(aligned, surprise, x) < signal(-aligned, surprise, x)
    assert signal(aligned, surprise * 1000, x) == pytest.approx(signal(aligned, surprise, x), rel=1e-5)
    # without surprise, the target is the state change: a jump at step 7 is the likeliest event
    x = torch.zeros(B, T, D)
    x[:, 7:] = 1.0
    jump = torch.full((B, T), -4.0)
    jump[:, 7] = 4.0
    assert signal(jump, None, x) < signal(torch.roll(jump, 3, dims=1), None, x)


# ---------------------------------------------------------------- event transformer

def test_event_transformer_is_causal_in_states_and_gate():
    l1 = EventTransformer(D, L1Config(layers=2))
    x, g = torch.randn(B, T, N, D), _gate()
    full = l1(x, g)
    for t in (1, 5, 10):
        y, h = x.clone(), g.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:])
        h[:, t + 1:] = 1.0 - h[:, t + 1:]
        assert torch.allclose(l1(y, h)[:, :t + 1], full[:, :t + 1], atol=ATOL)


def test_event_transformer_reads_only_event_steps():
    l1 = EventTransformer(D, L1Config(layers=2))
    x, g = torch.randn(B, T, N, D), _gate()
    full = l1(x, g)
    y = x.clone()
    y[:, 3] += 1.0  # a non-event step of both samples: only its own output changes
    changed = (l1(y, g) - full).abs().amax(dim=(2, 3)) > ATOL
    assert changed[:, 3].all() and changed.sum() == B
    y = x.clone()
    y[0, 5] += 1.0  # an event step of sample 0: every later step of sample 0 reads it
    changed = (l1(y, g) - full).abs().amax(dim=(2, 3)) > ATOL
    assert changed[0, 5:].all() and not changed[0, :5].any() and not changed[1].any()


def _step_through(l1: EventTransformer, l2: GoalCompressor, x: torch.Tensor, g: torch.Tensor,
                  alive: torch.Tensor | None, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1's and L2's outputs (B, T, ...) step by step, from an event memory of ``capacity`` entries."""
    mem = EventMemory.empty(B, capacity, N, l1.proj_in.out_features, len(l1.blocks), l2.proj_in.out_features,
                            alive is not None)
    out1, out2 = [], []
    for t in range(x.shape[1]):
        time = torch.full((B,), t)
        a = None if alive is None else alive[:, t]
        y1, keys = l1.step(x[:, t], g[:, t], a, None, time, mem)
        y2, token = l2.step(x[:, t].mean(1), g[:, t], time, mem)
        mem = mem.push(keys, token, a, g[:, t], time)
        out1.append(y1)
        out2.append(y2)
    return torch.stack(out1, 1), torch.stack(out2, 1)


@pytest.mark.parametrize("cap", [0, 2])
def test_event_transformer_and_goal_compressor_step_by_step_equal_forward(cap):
    """A rollout's steps, reading only the most recent events kept in an ``EventMemory``, give what ``forward`` gives
    over the whole sequence; with a cap on the events read (2 < sample 0's four events) too."""
    l1 = EventTransformer(D, L1Config(layers=2, **({"max_events": cap} if cap else {})))
    l2 = GoalCompressor(D, L2Config(layers=2, **({"max_events": cap} if cap else {})))
    x, g = torch.randn(B, T, N, D), _gate()
    alive = (torch.rand(B, T, N) > 0.2).float()
    capacity = cap or T
    step1, step2 = _step_through(l1, l2, x, g, alive, capacity)
    assert torch.allclose(step1, l1(x, g, alive), atol=ATOL)
    assert torch.allclose(step2, l2(x.mean(2), g), atol=ATOL)
    if cap:  # the cap binds: reading every event gives something else
        free = EventTransformer(D, L1Config(layers=2))
        free.load_state_dict(l1.state_dict())
        assert not torch.allclose(free(x, g, alive)[0, 11:], step1[0, 11:], atol=ATOL)


def test_event_transformer_with_no_events():
    l1 = EventTransformer(D, L1Config(layers=2))
    x = torch.randn(B, T, N, D)
    none = l1(x, torch.zeros(B, T))
    assert torch.isfinite(none).all()
    l2 = GoalCompressor(D, L2Config())
    one, _ = _step_through(l1, l2, x[:, :1], torch.zeros(B, 1), None, 4)
    assert torch.isfinite(one).all() and torch.allclose(one, none[:, :1], atol=ATOL)


def test_dead_objects_are_not_keys():
    l1 = EventTransformer(D, L1Config())
    x, g = torch.randn(B, T, N, D), _gate()
    alive = torch.ones(B, T, N)
    alive[:, :, 0] = 0.0
    y = x.clone()
    y[:, :, 0] = torch.randn(B, T, D)
    assert torch.allclose(l1(y, g, alive)[:, :, 1:], l1(x, g, alive)[:, :, 1:], atol=ATOL)


def test_gate_gradient_reaches_the_detector_through_the_transformer():
    det, l1 = EventDetector(N * D, L1Config()), EventTransformer(D, L1Config(layers=2))
    x = torch.randn(B, T, N, D)
    out = det(x.flatten(2))
    assert 0 < out.gate.sum() < B * T
    l1(x, out.gate).pow(2).mean().backward()
    assert det.threshold_logit.grad.abs() > 0
    _assert_all_grads(l1)
    for name in ("proj.weight", "head.2.weight"):
        assert det.get_parameter(name).grad.abs().sum() > 0


# ---------------------------------------------------------------- goal compressor

def test_goal_compressor_causal_forward_last_and_no_events():
    cfg = L2Config(layers=2)
    l2 = GoalCompressor(D, cfg)
    x, g = torch.randn(B, T, N, D), _gate()
    full = l2(x, g)
    assert full.shape == (B, T, cfg.n_summary, cfg.d_model)
    for t in (0, 4, 12):
        y, h = x.clone(), g.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:])
        h[:, t + 1:] = 1.0 - h[:, t + 1:]
        assert torch.allclose(l2(y, h)[:, :t + 1], full[:, :t + 1], atol=ATOL)
    # sample 0 has no event before step 2: its summaries there are the same learned context
    assert torch.allclose(full[0, 0], full[0, 1], atol=ATOL)
    none = l2(x, torch.zeros(B, T))
    assert torch.isfinite(none).all() and torch.allclose(none[:, 0], none[:, -1], atol=ATOL)


def test_goal_compressor_goal_conditioning_and_gradients():
    l2 = GoalCompressor(D, L2Config(), d_goal=5)
    x, goal = torch.randn(B, T, N, D), torch.randn(B, 5)
    g = _gate().requires_grad_()
    s = l2(x, g, goal)
    assert not torch.allclose(s, l2(x, g, torch.randn(B, 5)))
    l2.to_slot(s).pow(2).mean().backward()
    assert l2.to_slot(s).shape == (B, T, D)
    _assert_all_grads(l2)
    assert g.grad[_gate().bool()].abs().min() > 0  # every event's gate gets gradient
    with pytest.raises(ValueError, match="d_goal"):
        GoalCompressor(D, L2Config())(x, _gate(), goal)


# ---------------------------------------------------------------- relation GNN

def test_chunked_gnn_equals_dense_values_and_gradients():
    n = 40
    dense = RelationGNN(D, GNNConfig(rounds=2))
    chunked = RelationGNN(D, GNNConfig(rounds=2, chunk_size=16))
    chunked.load_state_dict(dense.state_dict())
    x = torch.randn(B, n, D)
    alive = (torch.rand(B, n) > 0.3).float()
    gate = torch.rand(B, n, n)
    outs = []
    for model in (dense, chunked):
        xi = x.clone().requires_grad_()
        y, edges = model(xi, alive, gate, return_edges=True)
        (y.pow(2).sum() + edges.sum()).backward()
        outs.append((y, edges, xi.grad, [p.grad for p in model.parameters()]))
    (y0, e0, gx0, gp0), (y1, e1, gx1, gp1) = outs
    assert torch.allclose(y0, y1, atol=1e-5) and torch.allclose(e0, e1, atol=1e-5)
    assert torch.allclose(gx0, gx1, atol=1e-5)
    for a, b in zip(gp0, gp1):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-5)
    assert torch.count_nonzero(torch.diagonal(e0, dim1=1, dim2=2)) == 0
    _assert_all_grads(dense)


def test_gnn_dead_sender_and_edge_gate():
    gnn = RelationGNN(D, GNNConfig(rounds=1))
    x = torch.randn(B, N, D)
    alive = torch.ones(B, N)
    alive[:, 2] = 0.0
    y = x.clone()
    y[:, 2] = torch.randn(B, D) * 3
    others = [i for i in range(N) if i != 2]
    assert torch.allclose(gnn(y, alive)[:, others], gnn(x, alive)[:, others], atol=ATOL)
    assert not torch.allclose(gnn(y, torch.ones(B, N))[:, others], gnn(x, torch.ones(B, N))[:, others])
    # a zero gate cuts every message: each receiver is then independent of the other slots
    cut = torch.zeros(N, N)
    assert torch.allclose(gnn(y, torch.ones(B, N), cut)[:, others], gnn(x, torch.ones(B, N), cut)[:, others],
                          atol=ATOL)


def test_gnn_is_permutation_equivariant():
    gnn = RelationGNN(D, GNNConfig(rounds=2, chunk_size=3))
    x, alive = torch.randn(B, N, D), torch.rand(B, N)
    perm = torch.randperm(N)
    y, e = gnn(x, alive, return_edges=True)
    yp, ep = gnn(x[:, perm], alive[:, perm], return_edges=True)
    assert torch.allclose(yp, y[:, perm], atol=1e-5)
    assert torch.allclose(ep, e[:, perm][:, :, perm], atol=1e-5)


def test_blocks_under_bf16_autocast():
    l1, l2 = EventTransformer(D, L1Config(layers=2)), GoalCompressor(D, L2Config())
    gnn = RelationGNN(D, GNNConfig(chunk_size=3))
    x, g = torch.randn(B, T, N, D), _gate()
    ref = l1(x, g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, s, z = l1(x, g), l2(x, g), gnn(x[:, 0], torch.ones(B, N))
        (y.float().sum() + s.float().sum() + z.float().sum()).backward()
    assert all(torch.isfinite(t).all() for t in (y, s, z))
    assert (y.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_goal_compressor_pools_alive_objects():
    l2 = GoalCompressor(D, L2Config())
    x, g = torch.randn(B, T, N, D), _gate()
    alive = torch.ones(B, T, N)
    alive[:, :, 3] = 0.0
    pooled = x[:, :, [i for i in range(N) if i != 3]].mean(2)  # (B, T, D)
    assert torch.allclose(l2(x, g, alive=alive), l2(pooled, g), atol=ATOL)


# ---- odd tensors: public functions on non-contiguous and empty inputs (issue 31's neighbours) ---------------

def _nc(*shape: int) -> torch.Tensor:
    """A non-contiguous tensor of ``shape`` (stored with its dims reversed)."""
    return torch.randn(*reversed(shape)).permute(*reversed(range(len(shape))))


def _odd_cases():
    from hclsm.nn.attention import inverted_attention_weights
    from hclsm.nn.causal import acyclicity, pair_geometry
    from hclsm.nn.matching import pairwise_cost, permute, sinkhorn, sinkhorn_match
    from hclsm.nn.memory import cosine, hopfield_weights, scene_center

    perm = torch.tensor([[2, 0, 1], [1, 2, 0]])
    return {  # name: (function, non-contiguous args, empty-size args, expected empty shape)
        "pairwise_cost": (pairwise_cost, (_nc(2, 3, 4), _nc(2, 3, 4)), (torch.randn(2, 0, 4), torch.randn(2, 0, 4)),
                          (2, 0, 0)),
        "sinkhorn": (sinkhorn, (_nc(2, 3, 3).abs(),), (torch.rand(0, 3, 3),), (0, 3, 3)),
        "sinkhorn_match": (sinkhorn_match, (_nc(2, 3, 4), _nc(2, 3, 4)), (torch.randn(2, 0, 4), torch.randn(2, 0, 4)),
                           (2, 0)),
        "permute": (permute, (_nc(2, 3, 4), perm), (torch.randn(0, 3, 4), torch.zeros(0, 3, dtype=torch.long)),
                    (0, 3, 4)),
        "inverted_attention_weights": (inverted_attention_weights, (_nc(2, 3, 5),), (torch.randn(2, 3, 0),),
                                       (2, 3, 0)),
        "cosine": (cosine, (_nc(2, 3, 4), _nc(2, 5, 4)), (torch.randn(2, 0, 4), torch.randn(2, 0, 4)), (2, 0, 0)),
        "scene_center": (scene_center, (_nc(2, 4, 6), torch.ones(2, 4)), (torch.randn(2, 0, 6), torch.zeros(2, 0)),
                         (2, 1, 6)),
        "hopfield_weights": (hopfield_weights, (_nc(2, 3, 5), 2.0, torch.ones(2, 3, 5, dtype=torch.bool)),
                             (torch.randn(2, 3, 0), 2.0, torch.zeros(2, 3, 0, dtype=torch.bool)), (2, 3, 0)),
        "pair_geometry": (pair_geometry, (_nc(2, 3, 4, 6), _nc(2, 3, 4, 6), 2),
                          (torch.randn(2, 3, 0, 6), torch.randn(2, 3, 0, 6), 2), (2, 3, 0, 0, 6)),
        "acyclicity": (acyclicity, (_nc(2, 3, 3).abs(),), (torch.rand(2, 0, 0),), (2,)),
    }


@pytest.mark.parametrize("name", ["pairwise_cost", "sinkhorn", "sinkhorn_match", "permute", "inverted_attention_weights",
                                  "cosine", "scene_center", "hopfield_weights", "pair_geometry", "acyclicity"])
def test_public_functions_on_odd_tensors(name):
    """Non-contiguous inputs give what their contiguous copies give; empty sizes give empty (or zero) results of
    the documented shape, never an error."""
    fn, args, empty, empty_shape = _odd_cases()[name]
    contiguous = [a.contiguous() if torch.is_tensor(a) else a for a in args]
    got, want = fn(*args), fn(*contiguous)
    assert torch.equal(got, want) if not got.is_floating_point() else torch.allclose(got, want, atol=1e-6)
    out = fn(*empty)
    assert tuple(out.shape) == empty_shape
    assert not out.is_floating_point() or torch.isfinite(out).all()


@pytest.mark.parametrize("chunk_size", [0, 2])
def test_relation_gnn_with_no_slots_and_strided_slots(chunk_size):
    gnn = RelationGNN(8, GNNConfig(d_edge=8, rounds=1, chunk_size=chunk_size))
    out = gnn(torch.randn(2, 0, 8, requires_grad=True), torch.ones(2, 0))
    assert out.shape == (2, 0, 8)
    x = _nc(2, 5, 8)
    assert torch.allclose(gnn(x, torch.ones(2, 5)), gnn(x.contiguous(), torch.ones(2, 5)), atol=1e-6)
