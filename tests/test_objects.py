"""Object layers: encoders, slot attention with existence/birth/death, the SBD decoder, Sinkhorn matching."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hclsm.assets import pretrained_decomposer
from hclsm.config import load_config
from hclsm.errors import ConfigError
from hclsm.eval.objects import true_counts
from hclsm.metrics import hungarian_match
from hclsm.models import build_model
from hclsm.models.objects import ObjectDecomposer
from hclsm.nn.decoders import SpatialBroadcastDecoder
from hclsm.nn.matching import pairwise_cost, permute, sinkhorn, sinkhorn_match
from hclsm.nn.slots import BirthSeeder, hard_concrete

from helpers import SMALL


def small_cfg(*extra: str):
    return load_config("tiny", overrides=[*SMALL, *extra])


@pytest.mark.parametrize("extra", [(), ("model.perception.encoder=vit", "model.perception.patch_size=4",
                                        "model.perception.heads=2", "model.perception.layers=1",
                                        "model.decoder.grid_size=8", "model.decoder.resolution=8",
                                        "model.decoder.target=features", "model.decoder.relative_positions=false",
                                        "model.decoder.kernel=3"),
                                   ("model.slots.dynamic=false", "model.slots.spatial_prior=false",
                                    "model.slots.background=false"),
                                   ("model.decoder.fourier_octaves=3", "model.decoder.static_background=true",
                                    "model.decoder.foreground_weight=30", "model.decoder.upsample=transposed")])
def test_every_trainable_parameter_gets_a_gradient_in_a_stage1_step(extra):
    torch.manual_seed(0)
    # a low birth threshold: on random frames the untrained slots leave residuals under the default, and the birth
    # seeder only gets its gradient when some residual forms a seed
    cfg = small_cfg(*extra, "model.slots.birth_threshold=0.001")
    model = build_model(cfg.model).train()
    video = torch.rand(8, 4, 3, 32, 32)
    out = model({"video": video}, progress=0.6, stage=1)  # past existence_start: gates and prior are on
    assert set(out.losses) == {"sbd", "diversity", "existence", "object_area"}
    if not cfg.model.slots.dynamic:  # fixed slots: no existence head, every slot alive on every frame
        assert model.objects.existence is None and out.objects.alive.all()
    sum(out.losses.values()).backward()
    # stage 1 trains the object layers (the dynamics join in stage 2: tests/test_dynamics.py)
    missing = [n for n, p in model.objects.named_parameters()
               if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(p.grad is None for p in model.dynamics.parameters())
    if cfg.model.decoder.target == "features":  # the EMA target encoder is not trained by gradient
        assert all(not p.requires_grad for p in model.objects.target_encoder.parameters())


def test_alpha_sums_to_one_over_alive_slots_and_dead_slots_draw_nothing():
    torch.manual_seed(0)
    cfg = small_cfg()
    dec = SpatialBroadcastDecoder(16, 3, cfg.model.decoder)
    slots, pos = torch.randn(2, 5, 16), torch.rand(2, 5, 2) * 2 - 1
    alive = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 1]], dtype=torch.float32)
    recon, content, alphas = dec(slots, pos, alive)
    assert alphas.shape == (2, 5, 16, 16) and recon.shape == (2, 3, 16, 16)
    torch.testing.assert_close(alphas.sum(1), torch.ones(2, 16, 16))
    assert (alphas[alive == 0] == 0).all() and (alphas[alive == 1] > 0).all()
    torch.testing.assert_close(recon, (alphas[:, :, None] * content).sum(1))


class _Clips:
    """A stand-in for ``MemoryClips``: its median frame."""

    def __init__(self, frame: torch.Tensor):
        self.frame = frame

    def median_frame(self) -> torch.Tensor:
        return self.frame


def test_the_background_layer_paints_the_static_scene_and_the_loss_weighs_what_moves():
    """With ``static_background`` the background slot paints the training frames' median (plus its constant):
    an empty scene is reconstructed exactly by the background alone; ``foreground_weight`` scales the error of
    pixels away from that scene up, relative to the rest, keeping the mean weight 1."""
    torch.manual_seed(0)
    cfg = small_cfg("model.decoder.static_background=true", "model.decoder.foreground_weight=30")
    net = ObjectDecomposer(cfg.model)
    scene = torch.rand(3, 32, 32)  # e.g. a textured floor with a goal marking
    net.prepare(_Clips(scene))
    static = torch.nn.functional.interpolate(scene[None], size=(16, 16), mode="area")[0]
    torch.testing.assert_close(net.decoder.static, static)
    assert "decoder.static" in net.state_dict()  # saved with the weights
    with torch.no_grad():
        net.decoder.background.weight.zero_()
        net.decoder.background.bias.zero_()
        content, _ = net.decoder.decode(torch.randn(2, 5, 16), torch.zeros(2, 5, 2))
    torch.testing.assert_close(content[:, 0], static.expand(2, -1, -1, -1))
    # the loss: an error on a pixel that differs from the scene weighs more than the same error elsewhere
    target = static.expand(2, 3, -1, -1, -1).clone()  # (B, T, C, R, R)
    target[:, :, :, 4, 4] += 0.5  # an object pixel
    on, off = target.clone(), target.clone()
    on[:, :, :, 4, 4] += 0.1
    off[:, :, :, 10, 10] += 0.1
    assert net.reconstruction_loss(on, target) > 5 * net.reconstruction_loss(off, target)
    plain = ObjectDecomposer(small_cfg().model)  # no static scene: the plain MSE, and nothing extra saved
    torch.testing.assert_close(plain.reconstruction_loss(on, target), (on - target).pow(2).mean())
    assert "decoder.static" not in plain.state_dict()


def test_object_content_is_bounded_like_the_pixels_it_draws():
    """With pixel targets the object slots' content is in [0, 1] (so a half-transparent object cannot brighten itself
    to make up for the background showing through); the background layer's is not squashed."""
    torch.manual_seed(0)
    net = ObjectDecomposer(small_cfg().model)
    with torch.no_grad():
        for p in net.decoder.parameters():
            p.mul_(50)  # large raw outputs
        content, _ = net.decoder.decode(torch.randn(2, 5, 16), torch.rand(2, 5, 2) * 2 - 1)
    assert content[:, 1:].min() >= 0 and content[:, 1:].max() <= 1
    assert content[:, 0].abs().max() > 1  # the background is a plain linear map
    free = ObjectDecomposer(small_cfg("model.decoder.bounded_content=false").model)
    assert not free.decoder.bounded


def test_the_agent_cue_pins_the_first_object_slot_where_the_agent_is_and_keeps_it_alive():
    """``model.slots.cue_scale``: the first object slot's position is the agent's (from the state's xy), on every
    frame, and it stays alive; the cue comes from the batch (``agent_cue``), a model with a cue refuses to run without
    one, and a dataset without states is named."""
    from hclsm.errors import DataError
    from hclsm.models.objects import agent_cue

    torch.manual_seed(0)
    cfg = small_cfg("model.slots.cue_scale=512")
    model = build_model(cfg.model).eval()
    state = torch.rand(2, 4, 2) * 512  # the agent's xy on PushT's 512-px canvas
    batch = {"video": torch.rand(2, 4, 3, 32, 32), "state": state}
    cue = agent_cue(batch, cfg.model)
    torch.testing.assert_close(cue, state / 256 - 1)
    with torch.no_grad():
        out = model.objects(batch["video"], cue=cue)
    torch.testing.assert_close(out.positions[:, :, 1], cue)
    assert out.alive[:, :, :2].all()  # the background and the agent's slot
    with pytest.raises(ValueError, match="cue"):
        model.objects(batch["video"])
    with pytest.raises(DataError, match="no state"):
        agent_cue({"video": batch["video"]}, cfg.model)
    assert agent_cue(batch, small_cfg().model) is None
    model.train()
    losses = model(batch, progress=0.7, stage=2).losses  # training reads the cue from the batch
    assert torch.isfinite(sum(losses.values()))


def test_model_output_shapes_counts_and_background_is_always_alive():
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    with torch.no_grad():
        out = model({"video": torch.rand(3, 5, 3, 32, 32)}).objects
    assert out.slots.shape == (3, 5, 5, 16) and out.alphas.shape == (3, 5, 5, 16, 16)
    assert out.alive[..., 0].all() and out.count.shape == (3, 5)
    torch.testing.assert_close(out.count, out.alive[..., 1:].sum(-1))
    seg = out.segmentation(32)
    assert seg.shape == (3, 5, 32, 32) and seg.min() >= 0 and seg.max() < 5


def test_object_model_is_causal_in_time():
    torch.manual_seed(0)
    model = build_model(small_cfg().model).eval()
    video = torch.rand(2, 6, 3, 32, 32)
    changed = video.clone()
    changed[:, 4:] = torch.rand_like(changed[:, 4:])  # perturb the future only
    with torch.no_grad():
        a, b = model({"video": video}).objects, model({"video": changed}).objects
    torch.testing.assert_close(a.slots[:, :4], b.slots[:, :4])
    torch.testing.assert_close(a.alphas[:, :4], b.alphas[:, :4])
    assert not torch.allclose(a.slots[:, 4:], b.slots[:, 4:])


def test_dead_slots_are_rearmed_and_births_deaths_follow_the_gate():
    torch.manual_seed(0)
    cfg = small_cfg("model.slots.min_area=0", "model.slots.birth_min_new=0",
                    "model.slots.settle_rounds=0")  # the gate alone decides here
    net = ObjectDecomposer(cfg.model).eval()
    # force slot 1 alive on frames 0-1, dead on 2-3, alive again on 4 (through the existence head's bias)
    schedule = iter([5.0, 5.0, -5.0, -5.0, 5.0])
    orig = net.existence.forward

    def fake(slots):
        logits = orig(slots).detach() * 0 + 5.0
        logits[:, 1] = next(schedule)
        return logits

    net.existence.forward = fake
    with torch.no_grad():
        out = net(torch.rand(1, 5, 3, 32, 32))
    assert out.alive[0, :, 1].tolist() == [True, True, False, False, True]
    assert out.deaths[0, :, 1].tolist() == [False, False, True, False, False]
    assert out.births[0, :, 1].tolist() == [False, False, False, False, True]
    assert (out.alphas[0, 2:4, 1] == 0).all()


def _scripted_existence(net: ObjectDecomposer, probs: dict[int, list[float]]) -> None:
    """Every object slot alive (p = 0.99) except the slots in ``probs``, whose p_alive follows their list
    frame by frame."""
    schedules, orig = {k: iter(v) for k, v in probs.items()}, net.existence.forward

    def fake(slots):
        logits = orig(slots).detach() * 0 + 5.0
        for k, schedule in schedules.items():
            logits[:, k] = torch.logit(torch.tensor(next(schedule)))
        return logits

    net.existence.forward = fake


def test_settle_rounds_give_the_first_frame_births_at_evaluation_only():
    torch.manual_seed(0)
    cfg = small_cfg("model.slots.min_area=0", "model.slots.birth_min_new=0", "model.slots.settle_rounds=2")
    net = ObjectDecomposer(cfg.model).eval()
    # slot 1 is dead after the first frame-0 round and alive from the second (its re-armed proposal) on
    _scripted_existence(net, {1: [0.01, 0.99, 0.99, 0.99, 0.99]})
    with torch.no_grad():
        out = net(torch.rand(1, 3, 3, 32, 32))
    assert out.alive[0, :, 1].tolist() == [True, True, True]  # alive on frame 0 already: settled there
    assert not out.births.any() and not out.deaths.any()  # a settled first frame has no births
    assert out.alive_logits.shape[1] == 3  # one output per frame, not per round

    calls = []
    net = ObjectDecomposer(cfg.model).train()
    orig = net.existence.forward
    net.existence.forward = lambda slots: calls.append(1) or orig(slots)
    net(torch.rand(1, 3, 3, 32, 32), progress=1.0)
    assert len(calls) == 3  # training runs one round per frame


@pytest.mark.parametrize("where,born", [("background", True), ("inside slot 1", False)])
def test_a_birth_must_take_its_pixels_from_the_background_not_from_an_alive_slot(where, born):
    torch.manual_seed(0)
    net = ObjectDecomposer(small_cfg("model.slots.min_area=0", "model.slots.settle_rounds=0").model).eval()
    _scripted_existence(net, {2: [0.01, 0.99]})  # slot 2 is a proposal on frame 1 that wants to live
    left = torch.zeros(16, 16)
    left[:, :8] = 1.0
    target = left if where == "inside slot 1" else 1 - left

    def decode(slots, positions):  # slot 1 draws the left half; slot 2 would draw `target` above everything
        content = torch.zeros(slots.shape[0], slots.shape[1], 3, 16, 16)
        logits = torch.full((slots.shape[0], slots.shape[1], 16, 16), -10.0)
        logits[:, 0] = 0.0
        logits[:, 1] = 20.0 * left - 10.0
        logits[:, 2] = 40.0 * target - 10.0
        return content, logits

    net.decoder.decode = decode
    with torch.no_grad():
        out = net(torch.rand(1, 2, 3, 32, 32))
    assert out.alive[0, :, 2].tolist() == [False, born]
    assert out.alive[0, :, 1].all()


@pytest.mark.parametrize("min_area,alive", [(0.0, True), (0.01, False)])
def test_an_object_slot_that_draws_no_pixel_dies_by_the_area_rule(min_area, alive):
    torch.manual_seed(0)
    net = ObjectDecomposer(small_cfg(f"model.slots.min_area={min_area}", "model.slots.settle_rounds=0").model).eval()
    _scripted_existence(net, {2: [0.99] * 3})
    decode = net.decoder.decode

    def hidden(slots, positions):  # slot 2's alpha logit is far below every other slot's, slot 1's far above
        content, logits = decode(slots, positions)
        return content, torch.cat([logits[:, :1], logits[:, 1:2] + 50.0, logits[:, 2:3] - 50.0, logits[:, 3:]], dim=1)

    net.decoder.decode = hidden
    with torch.no_grad():
        out = net(torch.rand(2, 3, 3, 32, 32))
    assert out.alive[:, :, 2].eq(alive).all()
    owner = torch.nn.functional.one_hot(out.alphas.argmax(2), 5).flatten(2, 3).float().mean(2)  # (B, T, K) share
    assert (owner[..., 1:][out.object_alive] >= min_area).all() and out.count.gt(0).all()  # the living do draw
    torch.testing.assert_close(out.alphas.sum(2), torch.ones(2, 3, 16, 16))


def test_birth_seed_forms_only_where_the_residual_is_unexplained_and_goes_to_its_worst_blob():
    torch.manual_seed(0)
    seeder = BirthSeeder(8)
    coords = torch.linspace(-1, 1, 16)[:, None].expand(16, 2).contiguous()  # tokens on the diagonal
    values = torch.randn(2, 16, 8)
    residual = torch.full((2, 16), 0.01)
    residual[0, 5] = 0.4  # sample 0: one token badly reconstructed, and a weaker blob far away; sample 1: all explained
    residual[0, 14] = 0.2
    w = seeder.unexplained(residual, threshold=0.05)
    assert w[0].nonzero().flatten().tolist() == [5, 14] and (w[1] == 0).all()
    seed, centre, has = seeder(values, w, coords)
    assert has.tolist() == [True, False] and (seed[1] == 0).all()
    torch.testing.assert_close(seed[0], seeder.net(values[0, 5]), atol=1e-4, rtol=1e-4)  # the far blob is outside the window
    torch.testing.assert_close(centre[0], coords[5], atol=1e-4, rtol=1e-4)


def test_the_birth_proposal_nearest_the_unexplained_blob_moves_onto_it():
    torch.manual_seed(0)
    net = ObjectDecomposer(small_cfg("model.slots.min_area=0", "model.slots.settle_rounds=0").model).eval()
    _scripted_existence(net, {2: [0.01, 0.01], 3: [0.01, 0.01]})  # slots 2, 3 dead on frame 0: proposals on frame 1
    with torch.no_grad():
        net.slot_attention.query_pos.copy_(torch.tensor([[0.0, 0.0], [-0.8, -0.8], [0.9, 0.9], [0.8, -0.8], [-0.8, 0.8]]))
    calls = []
    orig = net.slot_attention.forward

    def spy(slots, pos, *args, **kwargs):
        calls.append(pos.clone())
        return orig(slots, pos, *args, **kwargs)

    net.slot_attention.forward = spy
    video = torch.zeros(1, 2, 3, 32, 32)
    video[:, :, :, 8:12, 4:8] = 1.0  # a white square the untrained slots cannot reconstruct, centred at (-0.625, -0.375)
    with torch.no_grad():
        net(video)
    start = calls[1][0]  # where the slots started their frame-1 iterations
    # slot 3's proposal (0.8, -0.8) is the dead one nearest the blob: it moves there; slot 2 stays at its query
    assert torch.allclose(start[3], torch.tensor([-0.625, -0.375]), atol=0.15), start
    torch.testing.assert_close(start[2], torch.tensor([0.9, 0.9]))


def test_hard_concrete_is_binary_with_a_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.zeros(1000, requires_grad=True)
    g = hard_concrete(logits)
    v = g.detach()
    assert torch.minimum(v, 1 - v).abs().max() < 1e-6 and 0.4 < v.mean().item() < 0.6  # 0/1 up to rounding
    g.sum().backward()
    assert (logits.grad > 0).all()


def test_true_counts_counts_visible_ids():
    mask = torch.zeros(1, 2, 4, 4, dtype=torch.long)
    mask[0, 0, 0, 0], mask[0, 0, 1, 1], mask[0, 1, 2, 2] = 1, 3, 3
    assert true_counts(mask).tolist() == [[2, 1]]


def test_sinkhorn_plan_has_uniform_marginals_and_matches_hungarian_on_clear_cases():
    torch.manual_seed(0)
    b, n = 16, 7
    a = torch.randn(b, n, 5) * 3
    perm_true = torch.stack([torch.randperm(n) for _ in range(b)])
    bset = torch.empty_like(a)
    bset.scatter_(1, perm_true[..., None].expand(-1, -1, 5), a + 0.05 * torch.randn_like(a))  # b[perm[i]] ~ a[i]
    plan = sinkhorn(pairwise_cost(a, bset))
    torch.testing.assert_close(plan.sum(2), torch.full((b, n), 1 / n), atol=1e-4, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((b, n), 1 / n), atol=1e-4, rtol=0)
    perm = sinkhorn_match(a, bset)
    for i in range(b):
        assert sorted(perm[i].tolist()) == list(range(n))  # a permutation
        rows, cols = hungarian_match(pairwise_cost(a, bset)[i].numpy())
        assert perm[i].tolist() == cols[np.argsort(rows)].tolist() == perm_true[i].tolist()
    torch.testing.assert_close(permute(bset, perm), a, atol=0.5, rtol=0)


def test_sinkhorn_match_is_a_permutation_even_on_ties():
    a = torch.zeros(3, 4, 2)
    perm = sinkhorn_match(a, a.clone())
    for row in perm.tolist():
        assert sorted(row) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="equal shape"):
        sinkhorn_match(torch.zeros(1, 3, 2), torch.zeros(1, 4, 2))


@pytest.mark.parametrize("override,key", [
    ("model.decoder.resolution=24", "model.decoder.resolution"),
    ("model.decoder.kernel=2", "model.decoder.kernel"),
    ("model.perception.patch_size=3", "model.perception.patch_size"),
    ("model.slots.birth_min_new=1.5", "model.slots.birth_min_new"),
    ("model.slots.settle_rounds=-1", "model.slots.settle_rounds"),
    ("model.slots.min_area=1.5", "model.slots.min_area"),
])
def test_bad_object_configs_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny", overrides=[override])


def test_permutations_helper_roundtrip():
    x = torch.arange(12.0).reshape(1, 4, 3)
    for p in itertools.permutations(range(4)):
        perm = torch.tensor([p])
        assert permute(x, perm)[0, :, 0].tolist() == [x[0, j, 0].item() for j in p]


def trained_decomposer() -> ObjectDecomposer:
    """The tiny HCLSM's object layers as trained by ``hclsm bench objects`` (``hclsm.assets``, objects_tiny)."""
    return pretrained_decomposer("objects_tiny")


def render_clip(positions: np.ndarray, radii=(5.0, 6.0, 4.5), colours=(0, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Balls at ``positions`` (T, K, 2) px on the physics scenes' 64 px canvas (NaN = not there):
    video (1, T, 3, 64, 64) and mask (T, 64, 64)."""
    from hclsm.data.physics_sim import PALETTE, Scene, render

    k = positions.shape[1]
    scene = Scene(image_size=64, radii=np.array(radii[:k]), colours=PALETTE[list(colours[:k])],
                  springs=np.zeros((k, k), bool), rest=np.zeros((k, k)), follow=np.zeros((k, k), bool))
    video, mask = render(scene, positions)
    return torch.from_numpy(video).permute(0, 3, 1, 2).float()[None] / 255, torch.from_numpy(mask.astype(np.int64))


def _moving_balls(frames: int = 8) -> np.ndarray:
    t = np.arange(frames, dtype=np.float64)[:, None]
    return np.stack([np.hstack([14 + 1.5 * t, 16 + 0 * t]), np.hstack([48 - 1.5 * t, 44 + 0 * t]),
                     np.hstack([20 + 0 * t, 48 - t])], axis=1)  # (T, 3, 2)


def _owner(out, mask: torch.Tensor, obj: int) -> torch.Tensor:
    """(T,) the slot that covers most of object ``obj``'s pixels on each frame."""
    seg = out.segmentation(mask.shape[-1])[0]  # (T, H, W)
    return torch.stack([torch.bincount(seg[i][mask[i] == obj], minlength=out.alphas.shape[2]).argmax()
                        for i in range(mask.shape[0])])


def test_trained_slots_keep_their_object_across_frames():
    net = trained_decomposer()
    video, mask = render_clip(_moving_balls())
    with torch.no_grad():
        out = net(video)
    owners = [_owner(out, mask, obj) for obj in (1, 2, 3)]
    assert len({int(o[0]) for o in owners}) == 3  # three objects, three different slots
    for own in owners:
        assert (own == own[0]).all(), own.tolist()  # ... and each keeps its slot on every frame


def test_trained_model_death_when_an_object_disappears_and_birth_when_it_appears():
    net = trained_decomposer()
    pos = _moving_balls()
    pos[4:, 2] = np.nan  # the third ball is gone from frame 4 on
    video, mask = render_clip(pos)
    with torch.no_grad():
        gone, appears = net(video), net(video.flip(1))
    assert gone.count[0, :4].tolist() == [3] * 4 and gone.count[0, 4:].tolist() == [2] * 4, gone.count.tolist()
    assert gone.deaths[0, 4:6].any() and not gone.deaths[0, :4].any()  # death fires when it leaves
    assert appears.count[0, :4].tolist() == [2] * 4 and appears.count[0, 4:].tolist() == [3] * 4, appears.count.tolist()
    assert appears.births[0, 4:6].any() and not appears.births[0, 1:4].any()  # birth fires when it appears


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_stage1_training_step_of_the_real_model_is_finite_and_updates_weights(precision):
    from hclsm.train.step import train_step
    from hclsm.train.optim import build_optimizer

    torch.manual_seed(0)
    cfg = small_cfg(f"train.precision={precision}", "model.decoder.target=features", "model.decoder.resolution=16",
                    "model.decoder.grid_size=16")
    model = build_model(cfg.model).train()
    opt = build_optimizer(model, cfg.train)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    target_before = [p.detach().clone() for p in model.objects.target_encoder.parameters()]
    res = train_step(model, opt, {"video": torch.rand(4, 3, 3, 32, 32)}, cfg=cfg.train, stage=1, progress=0.7)
    assert res.skipped is None and np.isfinite(res.loss) and set(res.losses) == {"sbd", "diversity", "existence", "object_area"}
    # every object-layer parameter the step reached moved (the birth seeder is only reached when a slot
    # died: whether one does in one random step depends on the draw; tests above cover its gradient)
    trained = [(n, p) for n, p in model.objects.named_parameters() if p.grad is not None and p.grad.any()]
    assert len(trained) >= len(list(model.objects.encoder.parameters()))
    assert all(not torch.equal(before[f"objects.{n}"], p) for n, p in trained)
    assert all(torch.equal(before[f"dynamics.{n}"], p) for n, p in model.dynamics.named_parameters())  # stage 2's
    # the EMA target encoder moved towards the online encoder, but only by (1 - tau)
    moved = [not torch.equal(a, b) for a, b in zip(target_before, model.objects.target_encoder.parameters())]
    assert any(moved)


def test_hclsm_train_stage1_cli_end_to_end_with_the_real_model(tmp_path, capsys):
    import json

    from hclsm import cli
    from hclsm.config.data import PhysicsDataConfig
    from hclsm.data.physics import generate_physics_dataset

    data = tmp_path / "physics"
    generate_physics_dataset(data, PhysicsDataConfig(episodes=4, frames=8, image_size=32, max_objects=4),
                             progress=False)
    args = ["train", "--data", str(data), "--model", "hclsm", "--stage", "1", "--steps", "3", "--name", "r",
            "--out", str(tmp_path / "runs"), "--quiet", "--train.batch_size=2", "--data.clip.length=3",
            "--train.warmup_steps=1", "--train.val_fraction=0.25", *(f"--{o}" for o in SMALL)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "val: fg_ari" in out and "count_clip_ok" in out
    run = tmp_path / "runs" / "r"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["skipped_steps"] == 0 and 0 <= summary["val"]["fg_ari"] <= 1
    assert summary["final_losses"].keys() >= {"sbd", "diversity", "existence", "object_area"}
    assert list((run / "checkpoints").glob("step_*/model.safetensors"))
    # --stage 1: the whole run stayed in stage 1
    assert all(r.get("stage", 1) == 1 for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()))
