"""HCLSM's hierarchical dynamics and stage 2: gradients reach every parameter, the past is blind to the
future at every level, ``step`` equals ``forward``, targets are aligned, rollouts have the right shape."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from hclsm.config import load_config
from hclsm.errors import ConfigError
from hclsm.models import build_model
from hclsm.models.dynamics import HierarchicalDynamics
from hclsm.models.hclsm import align_targets

from helpers import SMALL


def small_cfg(*extra: str):
    return load_config("tiny", overrides=[*SMALL, "model.dynamics.l1.d_model=16", "model.dynamics.l2.d_model=16",
                                          "model.gnn.d_edge=8", *extra])


def dynamics_inputs(b: int = 2, t: int = 9, k: int = 5, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randn(b, t, k, d, generator=g)
    # a jump at step 4 so the event detector has something to fire on
    slots[:, 4:] += 3 * torch.randn(b, 1, k, d, generator=g)
    positions = torch.rand(b, t, k, 2, generator=g) * 2 - 1
    alive = torch.ones(b, t, k)
    alive[0, :, 3] = 0
    action = torch.randn(b, t, 2, generator=g)
    return slots, positions, alive, action


MEMORY = ("model.memory.enabled=true", "model.memory.size=6")  # small: it fills and replaces entries in a clip
# the episode graph (hclsm.nn.graph_inference) with a contact channel that some pairs of the random positions reach
EPISODE = ("model.causal.enabled=true", "model.causal.inference=episode", "model.causal.episode.d_hidden=8",
           "model.causal.episode.contact_reach=8")
CAUSAL = {"off": (), "causal graph": ("model.causal.enabled=true",), "memory": MEMORY,
          "causal graph + memory": ("model.causal.enabled=true", *MEMORY), "causal graph (episode)": EPISODE,
          "relative geometry": ("model.gnn.relative_geometry=true",)}


@pytest.mark.parametrize("causal", CAUSAL)
def test_every_trainable_parameter_gets_a_gradient_in_a_stage2_step(causal):
    torch.manual_seed(0)
    # a low birth threshold: the untrained slots' residuals on random frames must form seeds for the birth seeder
    model = build_model(small_cfg(*CAUSAL[causal], "model.slots.birth_threshold=0.001").model).train()
    batch = {"video": torch.rand(4, 6, 3, 32, 32), "action": torch.randn(4, 6, 2)}
    out = model(batch, progress=0.8, stage=2)
    assert {"sbd", "diversity", "existence", "object_area", "jepa", "obj", "frame", "event", "rollout"} <= set(out.losses)
    assert ({"causal", "acyclicity"} <= set(out.losses)) == ("causal graph" in causal)
    assert all(torch.isfinite(v) for v in out.losses.values())
    sum(out.losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"parameters without gradient: {missing}"
    # the EMA target object layers are not trained by gradient
    assert all(not p.requires_grad for p in model.target_objects.parameters())


def test_the_event_threshold_learns_from_the_stage2_loss():
    torch.manual_seed(1)
    model = build_model(small_cfg().model).train()
    batch = {"video": torch.rand(2, 6, 3, 32, 32)}
    det = model.dynamics.detector
    with torch.no_grad():  # put the threshold at the median logit so some steps fire and some do not
        det.threshold_logit.fill_(model(batch, progress=0.8, stage=2).dynamics.events.logit.median())
    out = model(batch, progress=0.8, stage=2)
    assert 0 < out.dynamics.events.gate.sum() < out.dynamics.events.gate.numel()
    out.losses["jepa"].backward(retain_graph=True)  # the prediction loss alone reaches the threshold
    assert det.threshold_logit.grad is not None and det.threshold_logit.grad.abs() > 0


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("t_cut", [0, 3, 6])
def test_dynamics_past_is_blind_to_the_future(t_cut, causal):
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(small_cfg(*CAUSAL[causal]).model).eval()
    slots, positions, alive, action = dynamics_inputs()
    ref = dyn(slots, positions, alive, action)
    s2, p2, a2, act2 = slots.clone(), positions.clone(), alive.clone(), action.clone()
    s2[:, t_cut + 1:] += 5 * torch.randn_like(s2[:, t_cut + 1:])
    p2[:, t_cut + 1:] = -p2[:, t_cut + 1:]
    a2[:, t_cut + 1:] = 1 - a2[:, t_cut + 1:]
    act2[:, t_cut + 1:] += 3.0
    new = dyn(s2, p2, a2, act2)
    past = slice(0, t_cut + 1)
    torch.testing.assert_close(new.slots[:, past], ref.slots[:, past], atol=1e-6, rtol=0)
    torch.testing.assert_close(new.positions[:, past], ref.positions[:, past], atol=1e-6, rtol=0)
    torch.testing.assert_close(new.events.prob[:, past], ref.events.prob[:, past], atol=1e-6, rtol=0)
    assert torch.equal(new.events.gate[:, past], ref.events.gate[:, past])
    assert not torch.allclose(new.slots[:, t_cut + 1:], ref.slots[:, t_cut + 1:])  # the future does change
    if "causal graph" in causal:
        assert torch.equal(new.graph.adjacency[:, past], ref.graph.adjacency[:, past])


@pytest.mark.parametrize("causal", CAUSAL)
def test_step_equals_forward(causal):
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(small_cfg(*CAUSAL[causal]).model).eval()
    slots, positions, alive, action = dynamics_inputs()
    with torch.no_grad():  # a threshold at the median logit: some steps fire, so L1/L2 have events to read
        dyn.detector.threshold_logit.fill_(dyn(slots, positions, alive, action).events.logit.median())
    ref = dyn(slots, positions, alive, action)
    b, t, k, _ = slots.shape
    state = dyn.init_state(b, k)
    for i in range(t):
        s, p, gate, state = dyn.step(slots[:, i], positions[:, i], alive[:, i], action[:, i], state)
        torch.testing.assert_close(s, ref.slots[:, i], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(p, ref.positions[:, i], atol=2e-5, rtol=1e-5)
        assert torch.equal(gate, ref.events.gate[:, i])
    assert 0 < ref.events.gate.sum() < ref.events.gate.numel()
    if "causal graph" in causal:  # a graph with some edges and some gaps, and objects with events at different steps
        adj, own = ref.graph.adjacency, ref.object_events.gate
        assert 0 < adj.sum() < (alive.sum(-1) * (alive.sum(-1) - 1)).sum()
        assert 0 < own.sum() < own.numel() and not torch.equal(own, ref.events.gate.repeat_interleave(k, 0))


@pytest.mark.parametrize("causal", CAUSAL)
def test_a_context_run_as_one_sequence_continues_step_by_step_exactly(causal):
    """``forward(..., return_state=True)`` on the first c steps, then ``step`` on the rest, equals ``forward`` on
    the whole sequence (what rollouts and the open-loop loss use); in training too (the graph's noise carries)."""
    # with the episode graph's weights drawn, seed 0's event detector fires at every step of the dead slot of clip 0
    # (a dead slot's events count in the scene's), so no threshold has both clips fire some steps but not all
    torch.manual_seed(1 if causal == "causal graph (episode)" else 0)
    dyn = HierarchicalDynamics(small_cfg("model.dynamics.l1.max_events=2", "model.dynamics.l2.max_events=3",
                                         *CAUSAL[causal]).model)
    slots, positions, alive, action = dynamics_inputs(t=12)
    with torch.no_grad():  # a threshold between the two middle logits: some steps fire, more than max_events of them
        dyn.detector.threshold_logit.fill_(dyn(slots, positions, alive, action).events.logit.quantile(0.5))
    for training in (False, True):
        dyn.train(training)
        torch.manual_seed(1)
        ref = dyn(slots, positions, alive, action)
        assert ref.events.gate.sum(1).min() > 3  # the event caps bind
        for c in (1, 5):
            torch.manual_seed(1)
            _, state = dyn(slots[:, :c], positions[:, :c], alive[:, :c], action[:, :c], return_state=True)
            for i in range(c, slots.shape[1]):
                s, p, gate, state = dyn.step(slots[:, i], positions[:, i], alive[:, i], action[:, i], state)
                torch.testing.assert_close(s, ref.slots[:, i], atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(p, ref.positions[:, i], atol=2e-5, rtol=1e-5)
                assert torch.equal(gate, ref.events.gate[:, i])


@pytest.mark.parametrize("causal", CAUSAL)
def test_a_rollout_step_costs_the_same_whatever_the_history(causal):
    """O(1) per step: after 60 steps the state holds exactly the tensors it held after 25 (shapes), so a step's
    work does not grow with the history (the event memory grows to its capacity, 4 here, then stays)."""
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(small_cfg("model.dynamics.l1.max_events=4", "model.dynamics.l2.max_events=3",
                                         *CAUSAL[causal]).model).eval()
    slots, positions, alive, action = dynamics_inputs(t=60)
    with torch.no_grad():
        dyn.detector.threshold_logit.fill_(dyn(slots, positions, alive, action).events.logit.quantile(0.5))

    def shapes(state) -> list[tuple[int, ...]]:
        out = []
        for f in dataclasses.fields(state):
            v = getattr(state, f.name)
            if isinstance(v, torch.Tensor):
                out.append(tuple(v.shape))
            elif isinstance(v, (list, tuple)):
                out += [tuple(x.shape) for pair in v for x in pair]
            elif dataclasses.is_dataclass(v):
                out += shapes(v)
        return out

    state, seen = dyn.init_state(2, 5), {}
    with torch.no_grad():
        for i in range(60):
            _, _, _, state = dyn.step(slots[:, i], positions[:, i], alive[:, i], action[:, i], state)
            if i + 1 in (25, 60):
                seen[i + 1] = shapes(state)
    assert state.t == 60 and state.events.valid.shape[1] == 4 and state.events.valid.sum() > 0
    assert seen[25] == seen[60]


def test_actions_are_required_and_change_the_prediction():
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(small_cfg().model).eval()
    slots, positions, alive, action = dynamics_inputs()
    with pytest.raises(ValueError, match="action"):
        dyn(slots, positions, alive, None)
    a = dyn(slots, positions, alive, action).slots
    b = dyn(slots, positions, alive, action + 1).slots
    assert not torch.allclose(a, b)
    unconditioned = HierarchicalDynamics(small_cfg("model.d_action=0").model)
    assert unconditioned.action is None and unconditioned(slots, positions, alive).slots.shape == slots.shape


def test_actions_in_pixels_are_read_in_unit_range_with_action_scale():
    """PushT's actions are the agent's target in [0, 512] px: with model.action_scale = 512 the dynamics read
    them in [-1, 1] (as the positions), so their embedding is the size of a raw [-1, 1] action's, not ~250x it;
    planning passes pixel actions and gets the same reading."""
    torch.manual_seed(0)
    scaled = HierarchicalDynamics(small_cfg("model.action_scale=512").model).eval()
    raw = HierarchicalDynamics(small_cfg().model).eval()
    raw.load_state_dict(scaled.state_dict())  # the same weights: only the reading differs
    slots, positions, alive, action = dynamics_inputs()
    px = (action.clamp(-1, 1) + 1) / 2 * 512  # the same actions in simulator pixels
    assert torch.allclose(scaled(slots, positions, alive, px).slots, raw(slots, positions, alive, action.clamp(-1, 1)).slots,
                          atol=1e-5)
    emb = scaled.action(torch.tensor([[0.0, 512.0]]))
    assert torch.allclose(emb, raw.action(torch.tensor([[-1.0, 1.0]])), atol=1e-6)
    assert raw.action(torch.tensor([[256.0, 256.0]])).norm() > 50 * scaled.action(torch.tensor([[256.0, 256.0]])).norm()


def test_the_background_slot_is_carried_unchanged_and_objects_are_predicted():
    """Slot 0 is the scene: its predicted slot and position are its input's (in forward and in step), while the
    object slots get the head's prediction; without a background slot every slot is predicted."""
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(small_cfg().model).eval()
    assert dyn.background
    slots, positions, alive, action = dynamics_inputs()
    out = dyn(slots, positions, alive, action)
    assert torch.equal(out.slots[:, :, 0], slots[:, :, 0]) and torch.equal(out.positions[:, :, 0], positions[:, :, 0])
    assert not torch.allclose(out.slots[:, :, 1:], slots[:, :, 1:])
    s, p, _, _ = dyn.step(slots[:, 0], positions[:, 0], alive[:, 0], action[:, 0], dyn.init_state(2, 5, slots.device,
                                                                                                 slots.dtype))
    assert torch.equal(s[:, 0], slots[:, 0, 0]) and torch.equal(p[:, 0], positions[:, 0, 0])
    no_bg = HierarchicalDynamics(small_cfg("model.slots.background=false").model).eval()
    assert not torch.allclose(no_bg(slots, positions, alive, action).slots[:, :, 0], slots[:, :, 0])


def test_align_targets_undoes_a_permutation_of_the_object_slots():
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    with torch.no_grad():
        online = model.objects(torch.rand(2, 3, 3, 32, 32))
    perm = torch.tensor([0, 3, 1, 4, 2])  # the background (0) stays, the object slots are shuffled
    alive = online.alive.clone()
    alive[:, :, 2] = False
    target = type(online)(**{**online.__dict__, "slots": online.slots[:, :, perm] + 1e-3,
                             "positions": online.positions[:, :, perm], "alive": alive[:, :, perm]})
    slots, target_alive = align_targets(online, target)
    torch.testing.assert_close(slots, online.slots + 1e-3)
    assert torch.equal(target_alive, alive)


@pytest.mark.parametrize("prior", [1.0, 0.0, 0.5])
def test_the_head_starts_at_the_velocity_prior(prior):
    """With the head's output zeroed, an object's next position is the current one moved by velocity_prior x its
    velocity (the change since the step before; zero on the first step) and the slot is unchanged; the background
    (slot 0) stays put."""
    torch.manual_seed(0)
    dyn = HierarchicalDynamics(small_cfg(f"model.dynamics.velocity_prior={prior}").model).eval()
    with torch.no_grad():
        dyn.head[-1].weight.zero_()
        dyn.head[-1].bias.zero_()
    slots, positions, alive, action = dynamics_inputs()
    out = dyn(slots, positions, alive, action)
    velocity = positions[:, 1:] - positions[:, :-1]
    velocity[:, :, 0] = 0  # the background slot is carried unchanged
    torch.testing.assert_close(out.positions[:, 1:], positions[:, 1:] + prior * velocity)
    torch.testing.assert_close(out.positions[:, 0], positions[:, 0])
    torch.testing.assert_close(out.slots, slots)


@pytest.mark.parametrize(("frames", "has_loss"), [(6, True), (9, True), (4, False)])
def test_open_loop_loss_runs_on_clips_long_enough(frames, has_loss):
    """``rollout`` (context 3 + at least two steps fed predictions; a window of at most 3 + 5 frames) is a
    stage-2 loss; it reads only the given frames' slots: the later frames enter through its pixel targets alone."""
    torch.manual_seed(0)
    model = build_model(small_cfg("model.dynamics.rollout_context=3").model).train()
    out = model({"video": torch.rand(2, frames, 3, 32, 32)}, progress=0.8, stage=2)
    assert ("rollout" in out.losses) == has_loss
    if has_loss:
        o = out.objects
        with torch.no_grad():
            torch.manual_seed(1)  # the same random choice of decoded frames for both calls
            base = model.open_loop_loss(o, None, 3, 3)
            later = o.slots.clone()
            later[:, 3:] += 1.0
            moved = o.positions.clone()
            moved[:, 3:] += 0.5
            torch.manual_seed(1)
            changed = model.open_loop_loss(type(o)(**{**o.__dict__, "slots": later, "positions": moved}), None, 3, 3)
        torch.testing.assert_close(changed, base)  # slots and positions after the context are never read
        o.slots.retain_grad()
        out.losses["rollout"].backward()
        assert o.slots.grad is None  # the given slots are detached: it trains the dynamics and the decoder


def test_rollout_predicts_decoded_frames_from_context_and_actions():
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    video, action = torch.rand(2, 4, 3, 32, 32), torch.randn(2, 4 + 5 - 1, 2)
    roll = model.rollout(video, horizon=5, action=action)
    k = model.objects.num_slots
    assert roll.frames.shape == (2, 5, 3, 16, 16) and roll.slots.shape == (2, 5, k, 16)
    assert roll.positions.shape == (2, 5, k, 2) and roll.events.shape == (2, 8)
    assert torch.isfinite(roll.frames).all()
    # the first predicted step equals the forward pass over the context (step == forward, end to end)
    with torch.no_grad():
        ctx = roll.context
        dyn = model.dynamics(ctx.slots, ctx.positions, ctx.alive.float(), action[:, :4])
    torch.testing.assert_close(roll.slots[:, 0], dyn.slots[:, -1], atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="actions for 8 steps"):
        model.rollout(video, horizon=5, action=action[:, :6])


def test_train_two_stages_runs_stage1_on_short_clips_then_stage2_from_that_model(data, tmp_path):
    from hclsm.train import train_two_stages
    from hclsm.train.stages import stage_configs

    cfg = small_cfg("train.steps=2", "train.warmup_steps=0", "train.batch_size=2", "train.log_every=1",
                    "data.clip.length=6")
    s1_cfg, s2_cfg = stage_configs(cfg, (7, 3), stage1_clip=4)
    assert (s1_cfg.data.clip.length, s2_cfg.data.clip.length) == (4, 6)
    assert (s1_cfg.train.steps, s2_cfg.train.steps, s1_cfg.train.max_minutes, s2_cfg.train.max_minutes) == (7, 3, 0, 0)
    assert (s1_cfg.train.stage, s2_cfg.train.stage) == (1, 2)
    assert (s1_cfg.train.progress_start, s2_cfg.train.progress_start) == (0.0, 1.0)  # schedules ran in stage 1
    s1, s2 = train_two_stages(cfg, data, tmp_path / "run", (2, 2), progress=False)
    assert s1.model is s2.model and s1.steps == s2.steps == 2
    assert "jepa" not in s1.losses and {"jepa", "obj", "event"} <= set(s2.losses)
    assert (tmp_path / "run" / "stage1" / "summary.json").exists()
    assert (tmp_path / "run" / "stage2" / "summary.json").exists()
    with pytest.raises(ConfigError, match="at least one step"):
        stage_configs(cfg, (5, 0))


def test_chunked_encoder_and_decoder_passes_equal_one_pass(monkeypatch):
    """Long clips go through the encoder and the decoded-prediction losses in checkpointed chunks
    (``hclsm.nn.chunks``); the losses and every gradient equal those of a single pass."""
    import hclsm.models.hclsm as hclsm_mod
    import hclsm.models.objects as objects_mod

    model = build_model(small_cfg().model).train()
    batch = {"video": torch.rand(2, 7, 3, 32, 32), "action": torch.randn(2, 7, 2)}

    def losses_and_grads():
        model.zero_grad()
        torch.manual_seed(3)
        losses = model(batch, progress=0.8, stage=2).losses
        sum(losses.values()).backward()
        return ({k: v.detach() for k, v in losses.items()},
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    one_losses, one_grads = losses_and_grads()
    monkeypatch.setattr(objects_mod, "ENCODE_FRAMES", 4)  # 2 frames of each of the 2 clips per pass
    monkeypatch.setattr(hclsm_mod, "DECODE_CHUNK", 5)
    chunk_losses, chunk_grads = losses_and_grads()
    torch.testing.assert_close(chunk_losses, one_losses, rtol=1e-5, atol=1e-6)
    assert chunk_grads.keys() == one_grads.keys()
    for name in one_grads:
        torch.testing.assert_close(chunk_grads[name], one_grads[name], rtol=1e-4, atol=1e-6, msg=name)
