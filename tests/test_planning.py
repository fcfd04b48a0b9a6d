"""Planning: CEM / MPPI on known costs, the batched slot-matching cost, the PushT closed loop and ``hclsm plan``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hclsm.config import load_config, save_config
from hclsm.config.data import PushTDataConfig
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.pusht import generate_pusht_dataset, make_env
from hclsm.models import build_model
from hclsm.demo import evaluate as demo_eval
from hclsm.demo.report import _planning_section
from hclsm.planning import CEM, MPPI, PlannerConfig, SlotSet, WorldModelCost, matched_slot_cost
from hclsm.planning.env_loop import (
    GOAL_OFFSET,
    angle_error,
    goal_reached,
    make_goal,
    make_tasks,
    physics_step,
    run_episode,
    set_sim_state,
    sim_state,
)
from hclsm.train import save_checkpoint
from helpers import assert_user_error, run

LOW, HIGH = -torch.ones(2), torch.ones(2)


# ---- planners on a known cost ---------------------------------------------------------------------

@pytest.mark.parametrize("planner", [CEM, MPPI])
def test_planners_find_the_optimum_of_a_quadratic_cost(planner):
    target = torch.tensor([[0.5, -0.3], [-0.7, 0.2], [0.1, 0.9], [0.0, -0.5]])  # (H, A), inside the box
    calls = []

    def cost(a):  # (N, H, A) -> (N,)
        calls.append(a.shape[0])
        return (a - target).pow(2).sum((1, 2))

    cfg = PlannerConfig(horizon=4, samples=64, iterations=12, elites=8, init_std=0.5)
    plan = planner(cfg, LOW, HIGH, seed=0).plan(cost, torch.zeros(4, 2))
    assert (plan - target).abs().max() < 0.05
    assert calls == [64] * 12  # one batched call per iteration, every candidate in it


@pytest.mark.parametrize("planner", [CEM, MPPI])
def test_planners_respect_the_action_box(planner):
    target = torch.full((3, 2), 3.0)  # outside the box: the best feasible plan is its corner
    plan = planner(PlannerConfig(horizon=3, samples=64, iterations=20, elites=8, init_std=0.5), LOW, HIGH).plan(
        lambda a: (a - target).pow(2).sum((1, 2)), torch.zeros(3, 2))
    assert plan.max() <= 1.0 and plan.min() >= -1.0
    assert (plan - 1.0).abs().max() < 0.1


def test_warm_start_shifts_the_previous_plan_and_std_stays_clamped():
    cfg = PlannerConfig(horizon=4, samples=16, iterations=3, elites=4, min_std=0.2, max_std=0.4)
    p = CEM(cfg, LOW, HIGH)
    seen = []

    def cost(a):
        seen.append(a.clone())
        return a.pow(2).sum((1, 2))  # optimum 0: the elites shrink, so the std would collapse without the clamp

    first = p.plan(cost, torch.zeros(4, 2))
    warm = p.initial_mean(torch.zeros(4, 2), executed=1)
    assert torch.equal(warm[:3], first[1:]) and torch.equal(warm[3], first[3])
    last = seen[-1][1:]  # candidates of the last iteration (candidate 0 is the mean)
    spread = last.std(0)
    assert spread.min() > 0.1  # min_std 0.2 keeps exploring even though the cost pulls everything to 0
    p.reset()
    assert torch.equal(p.initial_mean(torch.ones(4, 2), executed=1), torch.ones(4, 2))


# ---- the slot cost ---------------------------------------------------------------------------------

def _slot_set(k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return SlotSet(torch.randn(k, d, generator=g), torch.rand(k, 2, generator=g) * 2 - 1,
                   torch.tensor([True, True, True, False]))


def test_matched_slot_cost_ignores_slot_order_and_grows_with_distance():
    goal = _slot_set()
    perm = torch.tensor([0, 2, 1, 3])  # objects 1 and 2 swapped: the same set
    pred_slots = torch.stack([goal.slots[perm], goal.slots[perm], goal.slots[perm]])  # (3, K, d)
    pred_pos = torch.stack([goal.positions[perm], goal.positions[perm] + 0.2, goal.positions[perm] + 0.5])
    cost = matched_slot_cost(pred_slots, pred_pos, goal.alive, goal)
    assert cost[0] < 1e-3 and cost[0] < cost[1] < cost[2]
    # a dead slot (index 3) never counts, wherever it is
    pred_pos[0, 3] = 5.0
    assert matched_slot_cost(pred_slots[:1], pred_pos[:1], goal.alive, goal)[0] < 1e-3


class ToyModel:
    """Known dynamics: every alive object moves by 0.01 x the action each step; slot content unchanged."""

    class cfg:
        d_action = 2

    def __init__(self):
        self.calls = 0

    def predict_ahead(self, slots, positions, gate, horizon, action, shared_context=False):
        self.calls += 1
        c = slots.shape[1]
        pos = positions[:, -1]  # (N, K, 2)
        out = []
        for t in range(c - 1, c - 1 + horizon):
            pos = pos + 0.01 * action[:, t, None, :] * gate[:, -1, :, None]
            out.append(pos)
        return slots[:, -1:].expand(-1, horizon, -1, -1), torch.stack(out, 1), None


def _context(k=3, d=8, c=2):
    g = torch.Generator().manual_seed(1)
    slots = torch.randn(1, c, k, d, generator=g)
    positions = torch.zeros(1, c, k, 2)
    alive = torch.tensor([True, True, False]).expand(1, c, k)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.slots, ctx.positions, ctx.alive = slots, positions, alive
    return ctx


@pytest.mark.parametrize("planner", [CEM, MPPI])
def test_planners_reach_the_goal_through_a_known_dynamics_model(planner):
    ctx = _context()
    goal = SlotSet(ctx.slots[0, -1], torch.tensor([[0.0, 0.0], [0.3, -0.2], [0.0, 0.0]]),
                   torch.tensor([True, True, False]), has_background=True)
    model = ToyModel()
    cost = WorldModelCost(model, ctx, torch.zeros(1, 2), goal, proprio_weight=0.0)
    box = torch.full((2,), 20.0)
    cfg = PlannerConfig(horizon=3, samples=64, iterations=10, elites=8, init_std=0.3)
    plan = planner(cfg, -box, box).plan(cost, torch.zeros(3, 2))
    _, pos = cost.rollout(plan[None])
    assert (pos[0, -1, 1] - goal.positions[1]).abs().max() < 0.03  # the object ends on its goal
    assert model.calls == cfg.iterations + 1  # one batched rollout per iteration (+ the check above)


class ToyPush:
    """PushT in miniature: slot 1 is the agent, which goes to each action (an absolute target, as in PushT); slot 2
    is the block, which moves with the agent's step when the agent starts that step within ``REACH`` of it."""

    REACH = 0.3

    class cfg:
        d_action = 2

    def predict_ahead(self, slots, positions, gate, horizon, action, shared_context=False):
        c = slots.shape[1]
        pos = positions[:, -1].clone()  # (N, K, 2)
        out = []
        for t in range(c - 1, c - 1 + horizon):
            agent, block = pos[:, 1], pos[:, 2]
            near = (agent - block).norm(dim=-1, keepdim=True) < self.REACH
            pos = torch.stack([pos[:, 0], action[:, t], torch.where(near, block + action[:, t] - agent, block)], 1)
            out.append(pos)
        return slots[:, -1:].expand(-1, horizon, -1, -1), torch.stack(out, 1), None


def test_planning_with_the_proprioception_term_off_still_moves_the_block():
    g = torch.Generator().manual_seed(0)
    slots = torch.randn(1, 2, 3, 8, generator=g)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.slots, ctx.alive = slots, torch.ones(1, 2, 3, dtype=torch.bool)
    ctx.positions = torch.tensor([[0.0, 0.0], [-0.5, 0.0], [0.0, 0.0]]).expand(1, 2, 3, 2)  # agent left of the block
    # the goal frame: the block pushed 0.3 to the right, the agent just behind it; the proprioception target (far
    # away) is switched off, so only the predicted slots can guide the plan
    goal = SlotSet(slots[0, -1], torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.3, 0.0]]), torch.ones(3, dtype=torch.bool))
    cost = WorldModelCost(ToyPush(), ctx, torch.zeros(1, 2), goal, goal_action=torch.tensor([0.0, 0.5]),
                          proprio_weight=0.0)
    cfg = PlannerConfig(horizon=4, samples=200, iterations=15, elites=20, init_std=0.5)
    plan = CEM(cfg, -torch.ones(2), torch.ones(2), seed=0).plan(cost, torch.full((4, 2), -0.5))
    _, pos = cost.rollout(plan[None])
    start_gap = (ctx.positions[0, -1, 2] - goal.positions[2]).norm()
    end_gap = (pos[0, -1, 2] - goal.positions[2]).norm()
    assert end_gap < 0.3 * start_gap, (start_gap, end_gap)  # the block was pushed most of the way to its goal


@pytest.fixture(scope="module")
def tiny_hclsm():
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["model.perception.image_size=32", "model.slots.num_slots=4"])
    return build_model(cfg.model).eval()


def test_batched_rollout_equals_per_candidate_rollouts_and_candidates_differ(tiny_hclsm):
    model = tiny_hclsm
    video = torch.rand(1, 3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = model.objects(video)
        goal_out = model.objects(video[:, -1:])
    goal = SlotSet(goal_out.slots[0, 0], goal_out.positions[0, 0], goal_out.alive[0, 0])
    cost = WorldModelCost(model, ctx, torch.full((2, 2), 256.0), goal, torch.tensor([100.0, 100.0]), 256.0)
    actions = torch.rand(4, 3, 2, generator=torch.Generator().manual_seed(1)) * 512  # (N, H, A)
    slots, pos = cost.rollout(actions)
    for i in range(4):
        s_i, p_i = cost.rollout(actions[i:i + 1])
        torch.testing.assert_close(slots[i:i + 1], s_i, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pos[i:i + 1], p_i, rtol=1e-4, atol=1e-5)
    assert (slots[0] - slots[1]).abs().max() > 1e-4  # different actions, different futures
    c = cost(actions)
    assert c.shape == (4,) and torch.isfinite(c).all() and len(set(c.tolist())) == 4


@pytest.mark.parametrize("overrides", [(), ("model.causal.enabled=true", "model.memory.enabled=true")])
def test_a_shared_context_runs_once_and_predicts_the_same(overrides):
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["model.perception.image_size=32", "model.slots.num_slots=4", *overrides])
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = model.objects(torch.rand(1, 3, 3, 32, 32, generator=g))
    n, c, h = 5, 3, 4
    slots, pos, gate = (x.expand(n, *x.shape[1:]) for x in (ctx.slots, ctx.positions, ctx.gate))
    actions = torch.cat([torch.rand(1, c - 1, 2, generator=g).expand(n, -1, -1),
                         torch.rand(n, h, 2, generator=g)], dim=1) * 512  # shared past, different futures
    with torch.no_grad():
        full = model.predict_ahead(slots, pos, gate, h, actions)
        shared = model.predict_ahead(slots, pos, gate, h, actions, shared_context=True)
    for a, b in zip(full, shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (full[1][0] - full[1][1]).abs().max() > 0  # the candidates' futures differ


@pytest.mark.parametrize("overrides", [(), ("model.causal.enabled=true", "model.memory.enabled=true")])
def test_the_cost_rolls_out_only_the_live_slots_and_scores_the_same(overrides):
    """Slots dead on every context frame reach no other slot, so the cost leaves them out of its rollout: the
    costs equal those of rolling out every slot."""
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=["model.perception.image_size=32", "model.slots.num_slots=5", *overrides])
    model = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ctx = model.objects(torch.rand(1, 3, 3, 32, 32, generator=g))
        goal_out = model.objects(torch.rand(1, 1, 3, 32, 32, generator=g))
    ctx.alive[:, :, 2] = ctx.alive[:, :, 4] = False  # two slots dead throughout, one alive on one frame only
    ctx.alive[:, :, 1:2] = torch.tensor([True, False, False])[None, :, None]
    ctx.alive[:, :, [0, 3, 5]] = True
    goal = SlotSet(goal_out.slots[0, 0], goal_out.positions[0, 0], torch.ones(6, dtype=torch.bool))
    cost = WorldModelCost(model, ctx, torch.rand(2, 2, generator=g), goal, proprio_weight=0.0)
    assert cost.slots.shape[1] == 4  # background, slots 1, 3 and 5
    actions = torch.rand(6, 4, 2, generator=g)
    with torch.no_grad():
        steps = torch.cat([cost.past[None].expand(6, -1, -1), actions], 1)
        every = model.predict_ahead(ctx.slots.expand(6, -1, -1, -1), ctx.positions.expand(6, -1, -1, -1),
                                    ctx.alive.float().expand(6, -1, -1), 4, steps)
        want = matched_slot_cost(every[0][:, -1], every[1][:, -1], ctx.alive[0, -1], goal)
    torch.testing.assert_close(cost(actions), want, rtol=1e-4, atol=1e-5)


# ---- the PushT loop --------------------------------------------------------------------------------

def test_success_criterion_on_hand_made_states():
    goal = np.array([100.0, 100.0, 300.0, 300.0, 0.1])
    assert goal_reached(goal + [10, 0, 0, 10, 0], goal)  # ||.|| = 14.1 px
    assert not goal_reached(goal + [15, 0, 0, 15, 0], goal)  # 21.2 px over the 4-vector, though each is 15
    s = goal.copy()
    s[4] = 2 * np.pi - 0.2  # wraps: 0.3 rad from 0.1, under pi / 9 = 0.349
    assert goal_reached(s, goal) and angle_error(s[4], goal[4]) == pytest.approx(0.3)
    s[4] = 0.1 + np.pi / 9 + 0.01
    assert not goal_reached(s, goal)


@pytest.fixture(scope="module")
def pusht_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-pusht") / "pusht"
    generate_pusht_dataset(root, PushTDataConfig(episodes=2, max_steps=35, seed=3), progress=False)
    return root


@pytest.fixture(scope="module")
def env():
    e = make_env(96)
    yield e
    e.close()


class Replay:
    name = "replay"

    def __init__(self, task):
        self.task = task

    def reset(self, env, goal):
        self.i = 0

    def act(self, env, frames, actions, proprio):
        self.i += 1
        return self.task.actions[self.i - 1:self.i]


def test_start_state_is_exact_and_the_replayed_goal_is_reachable(pusht_data, env):
    tasks = make_tasks(LeRobotSource(pusht_data), [0, 1], 2, seed=0)
    for task in tasks:
        assert task.actions.shape == (GOAL_OFFSET, 2)
        set_sim_state(env, task.start)
        s = sim_state(env.unwrapped)
        np.testing.assert_allclose(s[:4], task.start[:4], atol=1e-6)
        assert angle_error(s[4], task.start[4]) < 1e-6
        goal = make_goal(env, task)
        r = run_episode(env, task, goal, Replay(task), budget=GOAL_OFFSET)
        assert r.success and r.final_distance < 1e-6  # the simulator is deterministic


def test_physics_step_matches_the_env_step(env):
    other = make_env(96)
    start = np.array([200.0, 300.0, 250.0, 260.0, 0.7])
    set_sim_state(env, start)
    set_sim_state(other, start)
    for a in np.random.default_rng(0).uniform(100, 400, size=(15, 2)):
        env.unwrapped.step(a)
        physics_step(other.unwrapped, a)
    np.testing.assert_array_equal(sim_state(env.unwrapped), sim_state(other.unwrapped))
    other.close()


class Hold:
    name = "hold"

    def reset(self, env, goal):
        self.calls = 0

    def act(self, env, frames, actions, proprio):
        self.calls += 1
        return np.asarray(env.unwrapped.agent.position)[None].repeat(2, 0)


def test_the_loop_ends_when_the_env_terminates(pusht_data, env):
    task = make_tasks(LeRobotSource(pusht_data), [0], 1, seed=0)[0]
    goal = make_goal(env, task)
    task.start = np.array([100.0, 100.0, 256.0, 256.0, np.pi / 4])  # the block on the env's own target: covered
    policy = Hold()
    r = run_episode(env, task, goal, policy, budget=10)
    assert r.covered and r.steps == 1 and policy.calls == 1
    task.start = np.array([100.0, 100.0, 380.0, 120.0, 0.0])  # far from the target: runs the whole budget
    r = run_episode(env, task, goal, policy, budget=7)
    assert not r.covered and r.steps == 7 and policy.calls == 4  # two actions per call


# ---- hclsm plan ------------------------------------------------------------------------------------

def _saved_run(root, pusht_data, *overrides):
    cfg = load_config("tiny", overrides=["model.perception.image_size=32", "model.slots.num_slots=4", *overrides])
    torch.manual_seed(0)
    save_config(cfg, root / "config.yaml")
    save_checkpoint(root, 1, build_model(cfg.model), None, {"data_root": str(pusht_data)}, stage=2)
    return root


def test_plan_cli_bad_inputs(capsys, tmp_path, pusht_data, data):
    code, out, err = run(capsys, "plan", "--checkpoint", tmp_path / "nope")
    assert_user_error(code, err, "nope", "does not exist")
    code, out, err = run(capsys, "plan", "--checkpoint", tmp_path)
    assert_user_error(code, err, "no config.yaml")
    (tmp_path / "file").write_text("x")
    code, out, err = run(capsys, "plan", "--checkpoint", tmp_path / "file")
    assert_user_error(code, err, "is a file")
    no_actions = _saved_run(tmp_path / "physics_run", pusht_data, "model.d_action=0")
    code, out, err = run(capsys, "plan", "--checkpoint", no_actions)
    assert_user_error(code, err, "model.d_action=2", "PushT")
    good = _saved_run(tmp_path / "run", pusht_data)
    code, out, err = run(capsys, "plan", "--checkpoint", good, "--data", data)  # physics scenes, not PushT
    assert_user_error(code, err, str(data))
    code, out, err = run(capsys, "plan", "--checkpoint", good, "--samples", "0")
    assert_user_error(code, err, "samples")
    code, out, err = run(capsys, "plan", "--checkpoint", good, "--train.lr=1")
    assert_user_error(code, err, "no config overrides")


def test_plan_cli_writes_summary_and_gifs(capsys, tmp_path, pusht_data):
    good = _saved_run(tmp_path / "run", pusht_data)
    code, out, err = run(capsys, "plan", "--checkpoint", good, "--episodes", "1", "--planner", "cem", "--samples", "4",
                         "--iterations", "1", "--gifs", "1", "--baselines", "--quiet", "--out", tmp_path / "plan")
    assert code == 0, err
    assert all(name in out for name in ("cem", "random", "scripted", "oracle", "ms/step"))
    summary = json.loads((tmp_path / "plan" / "summary.json").read_text())
    assert set(summary["results"]) == {"cem", "random", "scripted", "oracle"}
    assert summary["results"]["cem"]["episodes"] == 1 and summary["results"]["cem"]["plan_ms_per_step"] > 0
    gif = Image.open(tmp_path / "plan" / "cem_000.gif")
    assert gif.n_frames > 1 and gif.size == (288, 288)


def test_a_single_context_frame_needs_no_past_actions():
    ctx = _context(c=1)
    goal = SlotSet(ctx.slots[0, -1], torch.tensor([[0.0, 0.0], [0.3, -0.2], [0.0, 0.0]]),
                   torch.tensor([True, True, False]))
    cost = WorldModelCost(ToyModel(), ctx, torch.zeros(0, 2), goal)
    assert cost(torch.zeros(5, 2, 2)).shape == (5,)
    with pytest.raises(ValueError, match="past_actions"):
        WorldModelCost(ToyModel(), ctx, torch.zeros(1, 2), goal)


# ---- the demo's planning section ---------------------------------------------------------------------

def test_demo_planning_runs_both_policies_and_the_report_shows_them(tmp_path, pusht_data, tiny_hclsm, monkeypatch):
    monkeypatch.setattr(demo_eval, "PLAN_EPISODES", 1)
    monkeypatch.setattr(demo_eval, "PLAN_SAMPLES", 4)
    monkeypatch.setattr(demo_eval, "PLAN_ITERATIONS", 1)
    source = LeRobotSource(pusht_data)
    record = demo_eval.demo_planning(tiny_hclsm, source, [0, 1], tmp_path / "plan", seed=0, progress=False, budget=10)
    assert set(record["results"]) == {"mppi", "mppi_slots_only", "random"} and record["planner"]["samples"] == 4
    assert all(r["episodes"] == 1 for r in record["results"].values()) and record["budget"] == 10
    assert record["gifs"] == ["mppi_000.gif", "mppi_slots_only_000.gif", "random_000.gif"]
    assert record["cost_weights"] == {"slot_positions": 2.0, "proprio": 1.0}
    assert all((tmp_path / "plan" / g).is_file() for g in record["gifs"])
    section = _planning_section(record)
    assert "| mppi |" in section and "| random |" in section and "![mppi_000.gif](plan/mppi_000.gif)" in section
    assert "| mppi_slots_only |" in section and "proprioception term off" in section
    short = demo_eval.demo_planning(tiny_hclsm, source, [], tmp_path / "none", seed=0, progress=False)
    assert "no held-out episode has more than 25 frames" in short["skipped"]
    assert "Skipped: no held-out episode" in _planning_section(short)
