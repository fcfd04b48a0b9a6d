"""Physics scenes: simulator, renderer, counterfactual twins, dataset writer and reader."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hclsm import keys
from hclsm.config.data import ClipConfig, PhysicsDataConfig
from hclsm.data import physics, physics_sim
from hclsm.data.clips import ClipDataset
from hclsm.data.physics import PhysicsSource, generate_physics_dataset, simulate_episode
from hclsm.errors import DataError

SMALL = dict(episodes=4, frames=16, image_size=64, min_objects=3, max_objects=6, seed=3)
TIME_ARRAYS = ("video", "mask", "positions", "velocities", "contacts", "events")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phys") / "ds"
    summary = generate_physics_dataset(root, PhysicsDataConfig(**SMALL), progress=False)
    return root, summary


@pytest.fixture(scope="module")
def episodes():
    """Factual episodes and twins straight from the generator (more than the dataset holds)."""
    cfg = PhysicsDataConfig(episodes=24, frames=24, image_size=64, max_objects=8, seed=11)
    return [simulate_episode(cfg, i) for i in range(cfg.episodes)]


def _covered_by_later(ep, t, k, point):
    """Whether a ball drawn after k covers the pixel centre ``point`` at frame t."""
    later = ep["positions"][t, k + 1:]  # (K - k - 1, 2)
    d = np.linalg.norm(later - point, axis=1)
    return bool(np.any(d <= ep["radii"][k + 1:]))


def test_masks_match_positions(episodes):
    checked_centroids = 0
    for factual, _ in episodes:
        size = factual["mask"].shape[-1]
        rows, cols = np.mgrid[0:size, 0:size] + 0.5
        for t in range(0, len(factual["positions"]), 5):
            for k, (x, y) in enumerate(factual["positions"][t]):
                r = factual["radii"][k]
                col, row = int(x), int(y)
                if not _covered_by_later(factual, t, k, np.array([col + 0.5, row + 0.5])):
                    assert factual["mask"][t, row, col] == k + 1
                inside = r <= x <= size - r and r <= y <= size - r
                others = np.linalg.norm(factual["positions"][t, k + 1:] - (x, y), axis=1)
                if inside and np.all(others >= factual["radii"][k + 1:] + r):
                    sel = factual["mask"][t] == k + 1
                    assert abs(cols[sel].mean() - x) < 1.0 and abs(rows[sel].mean() - y) < 1.0
                    assert abs(sel.sum() - np.pi * r * r) < 2 * np.pi * r  # a whole disc is drawn
                    checked_centroids += 1
    assert checked_centroids > 100


def test_colours_follow_mask_exactly(episodes):
    for factual, twin in episodes:
        for ep in (factual, twin):
            lut = np.concatenate([physics_sim.BACKGROUND[None], ep["colours"]])  # (K + 1, 3)
            np.testing.assert_array_equal(ep["video"], lut[ep["mask"]])
        palette = {tuple(c) for c in physics_sim.PALETTE.tolist()}
        assert all(tuple(c) in palette for c in factual["colours"].tolist())
        assert len({tuple(c) for c in factual["colours"].tolist()}) == len(factual["colours"])
        assert len(np.unique(factual["radii"])) == len(factual["radii"])


def test_graph_is_union_of_symmetric_springs_and_acyclic_follow(episodes):
    n_follow = 0
    for factual, _ in episodes:
        springs, follow, graph = factual["springs"], factual["follow"], factual["graph"]
        k = len(graph)
        np.testing.assert_array_equal(springs, springs.T)
        assert not springs.diagonal().any() and not follow.diagonal().any()
        assert np.linalg.matrix_power(follow.astype(np.int64), k).sum() == 0  # nilpotent = acyclic
        assert graph.dtype == np.float32
        np.testing.assert_array_equal(graph, (springs | follow).astype(np.float32))
        n_follow += int(follow.sum())
    assert n_follow > 0


def test_counterfactual_twin_matches_before_and_differs_after(episodes):
    kinds = set()
    propagated = 0
    for factual, twin in episodes:
        t, k, kind = int(twin["intervention_step"]), int(twin["intervention_object"]), str(twin["intervention_kind"])
        kinds.add(kind)
        for name in TIME_ARRAYS:
            np.testing.assert_array_equal(twin[name][:t], factual[name][:t], err_msg=name)
            assert not np.array_equal(twin[name], factual[name]) or name in ("contacts", "events")
        for name in ("radii", "colours", "springs", "follow", "graph"):
            np.testing.assert_array_equal(twin[name], factual[name])
        if kind == "remove":
            assert np.isnan(twin["positions"][t:, k]).all() and np.isnan(twin["velocities"][t:, k]).all()
            assert not (twin["mask"][t:] == k + 1).any()
            assert not twin["contacts"][t:, k].any()
            continue
        if kind == "displace":
            np.testing.assert_allclose(twin["positions"][t, k], twin["intervention_vector"], atol=1e-4)
            assert not np.array_equal(twin["positions"][t, k], factual["positions"][t, k])
        else:
            np.testing.assert_array_equal(twin["positions"][t, k], factual["positions"][t, k])
            assert not np.array_equal(twin["velocities"][t, k], factual["velocities"][t, k])
        later = np.any(twin["positions"][t + 1:, k] != factual["positions"][t + 1:, k], axis=-1)
        assert later.all()  # the intervened object is elsewhere at every later frame
        if factual["graph"][k].any():
            others = np.delete(np.arange(len(factual["radii"])), k)
            assert np.any(twin["positions"][t + 1:, others] != factual["positions"][t + 1:, others])
            propagated += 1
    assert kinds == set(physics_sim.INTERVENTIONS)
    assert propagated > 0


def test_speeds_bounded_and_collisions_common():
    cfg = PhysicsDataConfig(episodes=20, frames=32, max_objects=10, seed=5)
    collided = 0
    for i in range(cfg.episodes):
        for ep in simulate_episode(cfg, i):
            alive = ~np.isnan(ep["positions"][..., 0])  # (T, K)
            speed = np.linalg.norm(ep["velocities"], axis=-1)[alive]
            assert speed.max() < 0.85 * physics_sim.MAX_SPEED  # the safety cap is never what bounds them
            pos, r = ep["positions"][alive], np.broadcast_to(ep["radii"], alive.shape)[alive]
            assert np.all(pos >= r[:, None] - 1e-3) and np.all(pos <= cfg.image_size - r[:, None] + 1e-3)
        collided += int(ep["events"].any())
    assert collided >= 12


def test_contacts_coincide_with_touching_balls(episodes):
    n_contacts = 0
    for factual, twin in episodes:
        for ep in (factual, twin):
            c, r = ep["contacts"], ep["radii"].astype(np.float64)
            np.testing.assert_array_equal(c, c.transpose(0, 2, 1))
            assert not c[:, np.arange(len(r)), np.arange(len(r))].any()
            np.testing.assert_array_equal(ep["events"], c.any(axis=(1, 2)))
            pos, vel = ep["positions"].astype(np.float64), ep["velocities"].astype(np.float64)
            dist = np.linalg.norm(pos[:, :, None] - pos[:, None], axis=-1)  # (T, K, K)
            speed = np.linalg.norm(vel, axis=-1)  # (T, K)
            pair_speed = speed[:, :, None] + speed[:, None]  # (T, K, K)
            pair_speed = np.maximum(pair_speed, np.concatenate([pair_speed[:1], pair_speed[:-1]]))
            touch = r[:, None] + r[None]  # (K, K)
            # A contact happened during the frame: since then the pair separated by at most one frame
            # of motion at the speeds of the frame's start and end.
            assert np.all(dist[c] <= (touch + pair_speed)[c])
            deep = (dist < touch - 0.05) & ~np.eye(len(r), dtype=bool)
            assert np.all(c[deep])
            n_contacts += int(c.sum())
    assert n_contacts > 0


def test_follow_force_is_one_way_and_springs_two_way():
    def scene(springs, follow):
        rest = np.full((2, 2), 20.0)
        return physics_sim.Scene(64, np.array([4.0, 5.0]), physics_sim.PALETTE[:2], springs, rest, follow)

    off = np.zeros((2, 2), dtype=bool)
    leader_pulls = np.array([[False, True], [False, False]])  # 0 -> 1
    state = physics_sim.State(np.array([[20.0, 20.0], [45.0, 30.0]]), np.zeros((2, 2)), np.ones(2, dtype=bool))
    follow = scene(off, leader_pulls)
    base = physics_sim.accelerations(follow, state)
    assert np.all(base[0] == 0) and np.linalg.norm(base[1]) > 0
    moved_leader = state.copy()
    moved_leader.pos[0] += (5.0, -3.0)
    assert not np.allclose(physics_sim.accelerations(follow, moved_leader)[1], base[1])
    moved_follower = state.copy()
    moved_follower.pos[1] += (-6.0, 4.0)
    moved_follower.vel[1] += (1.0, 1.0)
    assert np.all(physics_sim.accelerations(follow, moved_follower)[0] == 0)
    spring = physics_sim.accelerations(scene(~np.eye(2, dtype=bool), off), state)
    mass = follow.mass
    np.testing.assert_allclose(spring[0] * mass[0], -spring[1] * mass[1])  # equal and opposite forces
    assert np.linalg.norm(spring[0]) > 0
    state.alive[0] = False
    assert np.all(physics_sim.accelerations(follow, state) == 0)  # removed objects exert nothing


def test_follow_strength_scales_the_follow_force_and_its_clip():
    off = np.zeros((2, 2), dtype=bool)
    lead = np.array([[False, True], [False, False]])  # 0 -> 1

    def pull(strength, gap):
        scene = physics_sim.Scene(64, np.array([4.0, 5.0]), physics_sim.PALETTE[:2], off, np.zeros((2, 2)), lead,
                                  strength)
        state = physics_sim.State(np.array([[20.0, 20.0], [20.0 + gap, 20.0]]), np.zeros((2, 2)),
                                  np.ones(2, dtype=bool))
        return physics_sim.accelerations(scene, state)[1]

    near, far = 14.0, 60.0  # 1 px beyond the stand-off (under the clip) and far beyond it (clipped)
    np.testing.assert_allclose(pull(3.0, near), 3.0 * pull(1.0, near))
    assert np.linalg.norm(pull(1.0, far)) == pytest.approx(physics_sim.FOLLOW_MAX)
    assert np.linalg.norm(pull(3.0, far)) == pytest.approx(3.0 * physics_sim.FOLLOW_MAX)
    default = simulate_episode(PhysicsDataConfig(**SMALL), 0)[0]
    same = simulate_episode(PhysicsDataConfig(**SMALL, follow_strength=1.0), 0)[0]
    strong = simulate_episode(PhysicsDataConfig(**{**SMALL, "follow_prob": 1.0}, follow_strength=3.0), 0)[0]
    weak = simulate_episode(PhysicsDataConfig(**{**SMALL, "follow_prob": 1.0}), 0)[0]
    np.testing.assert_array_equal(default["positions"], same["positions"])
    assert not np.allclose(strong["positions"], weak["positions"])


def test_background_colour_fills_the_empty_pixels_and_is_recorded(tmp_path):
    cfg = PhysicsDataConfig(**{**SMALL, "episodes": 1}, background=(200, 180, 10))
    factual, twin = simulate_episode(cfg, 0)
    for ep in (factual, twin):
        empty = ep["mask"] == 0
        assert empty.any() and np.all(ep["video"][empty] == (200, 180, 10))
        assert not np.any(np.all(ep["video"][~empty] == (200, 180, 10), axis=-1))  # balls keep their colours
    default = simulate_episode(PhysicsDataConfig(**{**SMALL, "episodes": 1}), 0)[0]
    np.testing.assert_array_equal(default["mask"], factual["mask"])  # the same scene, only repainted
    generate_physics_dataset(tmp_path / "ds", cfg, progress=False)
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["background"] == [200, 180, 10]


def test_deterministic_and_order_independent(dataset, tmp_path):
    root, _ = dataset
    other = tmp_path / "two"
    generate_physics_dataset(other, PhysicsDataConfig(**{**SMALL, "episodes": 2}), progress=False)
    full, part = PhysicsSource(root), PhysicsSource(other)
    for i in range(2):
        for cf in (False, True):
            a, b = full.load_episode(i, cf), part.load_episode(i, cf)
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    a, b = simulate_episode(PhysicsDataConfig(**SMALL), 3), simulate_episode(PhysicsDataConfig(**SMALL), 3)
    for name in a[0]:
        np.testing.assert_array_equal(a[0][name], b[0][name])
    c = simulate_episode(PhysicsDataConfig(**{**SMALL, "seed": 4}), 3)
    assert not np.array_equal(a[0]["positions"], c[0]["positions"])


def test_dataset_layout_and_summary(dataset):
    root, summary = dataset
    meta = json.loads((root / "meta.json").read_text())
    assert meta["format"] == "hclsm-physics" and meta["version"] == 1
    assert meta["config"]["frames"] == 16 and meta["max_objects"] == 6 and len(meta["palette"]) >= 10
    assert sorted(p.name for p in (root / "episodes").iterdir()) == [f"episode_{i:06d}.npz" for i in range(4)]
    assert len(list((root / "counterfactual").iterdir())) == 4
    assert summary["episodes"] == 4 and summary["frames"] == 16
    assert 0.0 <= summary["collision_fraction"] <= 1.0 and summary["mean_edges"] >= 0
    assert sum(summary["interventions"].values()) == 4


def test_reader_clips_through_clip_dataset(dataset):
    root, _ = dataset
    source = PhysicsSource(root)
    assert source.name == str(root) and source.episode_lengths == [16] * 4 and source.max_objects == 6
    clips = ClipDataset(source, ClipConfig(length=8))
    assert len(clips) == 4 * 9
    item = clips[12]
    episode, frames = int(item[keys.EPISODE]), item[keys.FRAMES].numpy()
    raw = source.load_episode(episode)
    k = len(raw["radii"])
    assert item[keys.VIDEO].shape == (8, 3, 64, 64) and item[keys.VIDEO].dtype == torch.float32
    torch.testing.assert_close(item[keys.VIDEO], torch.tensor(raw["video"][frames]).permute(0, 3, 1, 2) / 255.0)
    assert item[keys.MASK].dtype == torch.int64 and item[keys.MASK].shape == (8, 64, 64)
    assert torch.equal(item[keys.MASK], torch.from_numpy(raw["mask"][frames].astype(np.int64)))
    for key in (keys.POSITIONS, keys.VELOCITIES):
        assert item[key].shape == (8, 6, 2) and item[key].dtype == torch.float32
        assert torch.equal(item[key][:, :k], torch.from_numpy(raw[key][frames]))
        assert torch.all(item[key][:, k:] == 0)
    assert item[keys.OBJECTS].dtype == torch.bool and item[keys.OBJECTS].tolist() == [True] * k + [False] * (6 - k)
    assert item[keys.EVENTS].dtype == torch.bool and item[keys.EVENTS].shape == (8,)
    assert item[keys.GRAPH].shape == (6, 6) and item[keys.GRAPH].dtype == torch.float32
    assert torch.equal(item[keys.GRAPH][:k, :k], torch.tensor(raw["graph"]))
    assert item[keys.GRAPH][k:].sum() == 0 and item[keys.GRAPH][:, k:].sum() == 0
    batch = next(iter(torch.utils.data.DataLoader(clips, batch_size=3)))
    assert batch[keys.VIDEO].shape == (3, 8, 3, 64, 64) and batch[keys.GRAPH].shape == (3, 6, 6)


def test_reader_twins(dataset):
    root, _ = dataset
    twin = PhysicsSource(root).load_episode(1, counterfactual=True)
    assert twin["intervention_kind"] in physics_sim.INTERVENTIONS
    assert isinstance(twin["intervention_step"], int) and isinstance(twin["intervention_object"], int)
    clip = PhysicsSource(root, counterfactual=True).load_clip(1, np.arange(16))
    assert torch.equal(clip[keys.MASK], torch.from_numpy(twin["mask"].astype(np.int64)))


def test_missing_and_corrupt_data_raise_data_error(dataset, tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        PhysicsSource(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and "hclsm data physics" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="missing meta.json"):
        PhysicsSource(tmp_path / "empty")
    (tmp_path / "meta.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="not an hclsm physics dataset"):
        PhysicsSource(tmp_path)
    root, _ = dataset
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text((root / "meta.json").read_text())
    (broken / "episodes").mkdir()
    good = (root / "episodes" / "episode_000000.npz").read_bytes()
    (broken / "episodes" / "episode_000000.npz").write_bytes(good[: len(good) // 2])
    (broken / "episodes" / "episode_000001.npz").write_bytes(b"not a zip file at all")
    source = PhysicsSource(broken)
    for i in range(3):  # truncated, garbage, missing
        with pytest.raises(DataError) as err:
            source.load_clip(i, np.arange(8))
        assert str(broken / "episodes" / f"episode_{i:06d}.npz") in str(err.value)


def test_generator_failure_leaves_nothing(tmp_path, monkeypatch):
    real = physics.simulate_episode

    def failing(cfg, index):
        if index == 2:
            raise RuntimeError("boom")
        return real(cfg, index)

    monkeypatch.setattr(physics, "simulate_episode", failing)
    with pytest.raises(RuntimeError, match="boom"):
        generate_physics_dataset(tmp_path / "out", PhysicsDataConfig(**SMALL), progress=False)
    assert list(tmp_path.iterdir()) == []
