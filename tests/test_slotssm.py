"""SlotSSM, OC-SlotSSM and the paper's baselines: symmetry, slot independence, inverted attention,
causality in time, step == forward, gradients to every parameter, parameter matching."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hclsm.models.slot_baselines import SAVi, SlotTransformer, match_width, n_params
from hclsm.models.slot_tasks import BACKBONES, BlinkingClassifier, VideoPredictor, build_backbone
from hclsm.models.slotssm import OCSlotSSM, OCSlotSSMConfig, SlotSSM, SlotSSMConfig
from hclsm.nn.attention import MultiHeadAttention, inverted_attention_weights

D = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread is fastest, and it does not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_oc(**levers) -> OCSlotSSMConfig:
    """A small OC-SlotSSM / SAVi config; ``levers`` (spatial_prior, background, carry_positions, ...) switch on the
    object layer's levers, with the slot-relative decoder the OCL bench uses."""
    from hclsm.config.model import DecoderConfig

    relative = bool(levers.get("spatial_prior"))
    return OCSlotSSMConfig(image_size=16, patch_size=2, d_model=D, num_slots=3, layers=2, cnn_layers=2,
                           decoder=DecoderConfig(hidden=8, layers=2, kernel=1, grid_size=8, resolution=16,
                                                 relative_positions=relative,
                                                 upsample="subpixel" if relative else "transposed"), **levers)


LEVERS = [{}, {"spatial_prior": True, "sharpness_init": 3.0},
          {"spatial_prior": True, "carry_positions": True}, {"spatial_prior": True, "background": True}]


def test_slot_permutation_equivariance():
    """Permuting the input slots permutes the output slots (SSM weights shared, mixer is attention)."""
    torch.manual_seed(0)
    model = SlotSSM(SlotSSMConfig(d_in=D, d_model=D, slots=(5, 5), heads=2), encode_inputs=False).eval()
    slots = torch.randn(2, 6, 5, D)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out, out_perm = model(slots), model(slots[:, :, perm])
    torch.testing.assert_close(out_perm, out[:, :, perm], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])  # the slots do differ (not a trivial symmetry)


def test_ssm_step_is_independent_per_slot_and_the_mixer_couples_them():
    torch.manual_seed(0)
    model = SlotSSM(SlotSSMConfig(d_in=D, d_model=D, slots=(4,), heads=2), encode_inputs=False).eval()
    layer = model.layers[0]
    slots = torch.randn(2, 7, 4, D)
    changed = slots.clone()
    changed[:, :, 1] += torch.randn(2, 7, D)  # change slot 1's whole input history
    h, h2 = layer.ssm_forward(slots), layer.ssm_forward(changed)
    others = [0, 2, 3]
    torch.testing.assert_close(h2[:, :, others], h[:, :, others], atol=0, rtol=0)  # bit-identical
    assert (h2[:, :, 1] - h[:, :, 1]).abs().max() > 1e-3
    # the recurrent states of the step path: slot j's state ignores slot i's inputs
    s1, s2 = model.init_state(2), model.init_state(2)
    for t in range(7):
        _, s1 = model.step(slots[:, t], s1)
        _, s2 = model.step(changed[:, t], s2)
    h_state1, h_state2 = s1[0][1].view(2, 4, -1, 16), s2[0][1].view(2, 4, -1, 16)  # (B, K, d_inner, N)
    torch.testing.assert_close(h_state2[:, others], h_state1[:, others], atol=0, rtol=0)
    assert (h_state2[:, 1] - h_state1[:, 1]).abs().max() > 1e-4
    # after the mixer the slots do interact
    out, out2 = model(slots), model(changed)
    assert (out2[:, :, others] - out[:, :, others]).abs().max() > 1e-4


def test_inverted_attention_normalises_over_queries():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 9)  # (N, h, Q, L)
    w = inverted_attention_weights(logits)
    # each query takes a weighted mean over the inputs
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4), atol=1e-5, rtol=0)
    # the softmax is over the queries: shifting one input's logits for every query changes nothing ...
    shifted = logits.clone()
    shifted[..., 5] += 3.0
    torch.testing.assert_close(inverted_attention_weights(shifted), w, atol=1e-6, rtol=1e-5)
    # ... and it equals softmax over dim Q renormalised over L
    a = logits.softmax(dim=-2)
    torch.testing.assert_close(w, a / a.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    # queries compete: an input claimed strongly by query 0 is (almost) lost to the others
    claim = logits.clone()
    claim[..., 0, 2] = 30.0
    wc = inverted_attention_weights(claim)
    assert wc[..., 1:, 2].max() < 1e-6 and wc[..., 0, 2].min() > w[..., 0, 2].min()
    # the module uses it: its weights sum to 1 over inputs, and the softmax over queries is visible
    att = MultiHeadAttention(8, 1, inverted=True)
    x, ctx = torch.randn(2, 4, 8), torch.randn(2, 9, 8)
    wm = att.weights(x, ctx)
    torch.testing.assert_close(wm.sum(-1), torch.ones(2, 1, 4), atol=1e-5, rtol=0)
    regular = MultiHeadAttention(8, 1).weights(x, ctx)
    torch.testing.assert_close(regular.sum(-1), torch.ones(2, 1, 4), atol=1e-5, rtol=0)
    assert not torch.allclose(wm, regular, atol=1e-3)


@pytest.mark.parametrize("kind", BACKBONES)
def test_backbone_is_causal_in_time_and_step_matches_forward(kind):
    torch.manual_seed(0)
    model = build_backbone(kind, d_in=D, d_model=D, num_slots=3, layers=2, heads=2, encoder_layers=1).eval()
    x = torch.randn(2, 8, 5, D)
    y = model(x)
    future = x.clone()
    future[:, 5:] = torch.randn(2, 3, 5, D) * 3
    y2 = model(future)
    torch.testing.assert_close(y2[:, :5], y[:, :5], atol=1e-6, rtol=1e-6)  # the past is blind to the future
    assert (y2[:, 5:] - y[:, 5:]).abs().max() > 1e-3
    state, steps = model.init_state(2), []
    for t in range(8):
        o, state = model.step(x[:, t], state)
        steps.append(o)
    torch.testing.assert_close(torch.stack(steps, 1), y, atol=1e-5, rtol=1e-4)


def test_slot_count_can_change_between_layers():
    torch.manual_seed(0)
    model = SlotSSM(SlotSSMConfig(d_in=D, d_model=D, slots=(4, 2, 2), heads=2, encoder_layers=1))
    assert model.layers[1].encoder is not None and model.layers[2].encoder is None
    x = torch.randn(2, 5, 6, D)
    y = model(x)
    assert y.shape == (2, 5, 2, D)
    state, last = model.init_state(2), None
    for t in range(5):
        last, state = model.step(x[:, t], state)
    torch.testing.assert_close(last, y[:, -1], atol=1e-5, rtol=1e-4)


def _assert_all_grads(model: torch.nn.Module, loss: torch.Tensor) -> None:
    model.zero_grad()
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().max() == 0)]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("kind", BACKBONES)
def test_every_parameter_gets_a_gradient_in_both_tasks(kind):
    torch.manual_seed(0)
    vp = VideoPredictor(kind, size=8, patch=4, d_model=D, num_slots=3, layers=2, heads=2, decoder_layers=1)
    _assert_all_grads(vp, vp.losses(torch.rand(2, 4, 3, 8, 8))["frame"])
    clf = BlinkingClassifier(kind, 8, (4, 2), frames=2, d_model=D, num_slots=3, layers=1, heads=2, decoder_layers=1)
    patches = torch.rand(2, 2 * clf.per_frame, 4, 2, 3)
    target = torch.randint(0, 7, (2, 8, 8))
    _assert_all_grads(clf, torch.nn.functional.cross_entropy(clf(patches), target))


@pytest.mark.parametrize("levers", LEVERS)
@pytest.mark.parametrize("cls", [OCSlotSSM, SAVi])
def test_object_centric_models_train_every_parameter_and_are_causal(cls, levers):
    if cls is SAVi and levers.get("carry_positions"):
        pytest.skip("slot attention always carries its slots and positions from frame to frame")
    torch.manual_seed(0)
    model = cls(small_oc(**levers))
    video = torch.rand(2, 4, 3, 16, 16)
    out = model(video)
    assert out.recon.shape == (2, 4, 3, 16, 16) and out.masks.shape == (2, 4, 16, 16)
    torch.testing.assert_close(out.alphas.sum(2), torch.ones(2, 4, 16, 16), atol=1e-5, rtol=0)
    _assert_all_grads(model, out.losses["recon"])
    model.eval()
    with torch.no_grad():
        a = model(video).slots
        changed = video.clone()
        changed[:, 2:] = torch.rand(2, 2, 3, 16, 16)
        b = model(changed).slots
    torch.testing.assert_close(b[:, :2], a[:, :2], atol=1e-6, rtol=1e-6)
    assert (b[:, 2:] - a[:, 2:]).abs().max() > 1e-4


def test_oc_slotssm_uses_inverted_attention_and_learns_to_reconstruct():
    torch.manual_seed(0)
    model = OCSlotSSM(small_oc())
    assert all(layer.attn.inverted for layer in model.layers)
    video = torch.zeros(4, 2, 3, 16, 16)
    video[:, :, 0, 2:7, 2:7] = 1.0  # a red square and a blue one
    video[:, :, 2, 9:14, 8:13] = 1.0
    constant = ((video - video.mean((0, 1, 3, 4), keepdim=True)) ** 2).mean().item()  # best flat-colour image
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(video).losses["recon"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.75 * constant


def test_oc_slotssm_spatial_prior_gives_each_token_to_the_nearest_slot():
    """With a narrow spatial prior the inverted attention (softmax over the slots) hands every token to the slot
    whose position is nearest (a Voronoi split of the frame around the learned positions), whatever the content;
    with a broad one the content decides."""
    torch.manual_seed(0)
    model = OCSlotSSM(small_oc(spatial_prior=True, sigma_init=0.05)).eval()
    tokens = model.encoder(torch.rand(2, 3, 3, 16, 16))  # (B, T, M, d)
    pos = model.query_pos.expand(2, 3, -1, -1)
    nearest = (model.coords[None] - model.query_pos[:, None]).norm(dim=-1).argmin(0)  # (M,)
    layer = model.layers[0]

    def agreement() -> float:
        with torch.no_grad():
            _, w = layer.forward_oc(model.cls.expand(2, 3, -1, -1), tokens, model._prior(pos), torch.ones(1))
        return float((w.argmax(2) == nearest).float().mean())  # w (B, T, K, M): the slot each token went to

    assert agreement() > 0.95
    model.log_sigma.data.fill_(np.log(50.0))
    assert agreement() < 0.8


def test_train_steps_counts_steps_and_decays_the_learning_rate():
    from hclsm.bench.slotssm import train_steps

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    calls = []

    def loss_fn(gen):
        calls.append(1)
        idx = torch.randint(0, 64, (16,), generator=gen)
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx])

    first = torch.nn.functional.mse_loss(model(x), y).item()
    info = train_steps(model, loss_fn, 300, 0.05, 0, "t", False, warmup=10)
    assert info["steps"] == 300 and len(calls) == 300
    assert info["final_loss"] < 0.01 * first
    assert not model.training


def test_lr_scale_warms_up_then_decays_by_cosine_to_the_floor():
    from hclsm.bench.slotssm import lr_scale

    scales = [lr_scale(i, 100, 10, 0.01) for i in range(100)]
    assert scales[0] == pytest.approx(0.1) and scales[9] == pytest.approx(1.0)
    assert scales[10] == pytest.approx(1.0) and scales[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(scales[10:], scales[11:]))  # never rises after the warmup
    assert scales[10 + 45] == pytest.approx(0.505, abs=0.02)  # the cosine's midpoint


def test_video_rollout_feeds_back_its_predictions():
    torch.manual_seed(0)
    vp = VideoPredictor("slotssm", size=8, patch=4, d_model=D, num_slots=3, layers=1, heads=2, decoder_layers=1).eval()
    context = torch.rand(2, 3, 3, 8, 8)
    roll = vp.rollout(context, 4)
    assert roll.shape == (2, 4, 3, 8, 8)
    # the first predicted frame is the teacher-forced prediction after the context
    torch.testing.assert_close(roll[:, 0], vp(context)[:, -1], atol=1e-5, rtol=1e-4)
    # the second one reads the first prediction: teacher forcing on [context, roll[0]] gives it
    torch.testing.assert_close(roll[:, 1], vp(torch.cat([context, roll[:, :1]], 1))[:, -1], atol=1e-5, rtol=1e-4)


def test_match_width_matches_parameter_counts():
    target = n_params(build_backbone("slotssm", 32, 32, 6, 2, 4))
    for kind in ("single_ssm", "slot_transformer", "slot_rnn"):
        w = match_width(lambda w: build_backbone(kind, 32, w, 6, 2, 4), target, multiple=4)
        got = n_params(build_backbone(kind, 32, w, 6, 2, 4))
        assert abs(got - target) / target < 0.1, (kind, w, got, target)


def test_slot_transformer_step_cost_grows_with_its_cache():
    model = SlotTransformer(D, D, num_slots=2, layers=1, heads=2, encoder_layers=1)
    state = model.init_state(1)
    for _ in range(3):
        _, state = model.step(torch.randn(1, 4, D), state)
    k, v = state["cache"][0]
    assert k.shape == v.shape == (1, 2, 6, D // 2)  # (B, heads, t*K, d_h): attention cost grows with t


@pytest.mark.parametrize("name", ["slotssm", "oc_slotssm"])
def test_hclsm_train_and_info_build_the_slot_models(capsys, tmp_path, data, name):
    import json

    from hclsm import cli

    code = cli.main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--name", "r", "--quiet",
                     "--steps", "2", "--model", name, "--set", "train.warmup_steps=1", "--train.batch_size=2",
                     "--data.clip.length=4", "--train.threads=1", "--model.perception.image_size=16", "--model.slots.d_slot=16",
                     "--model.decoder.grid_size=8", "--model.decoder.resolution=16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["model"] == name
    assert cli.main(["info", "--model", name]) == 0
    assert "SlotSSM" in capsys.readouterr().out


def test_benchmark_figures_are_drawn_from_json_records(tmp_path):
    import json

    from PIL import Image

    from hclsm.viz.slotssm import figures_from_files

    lengths = [80, 160, 320]
    latency = {"bench": "slotssm-latency", "config": {"lengths": lengths},
               "metrics": {f"{k}_ms_{n}": float(n) / 80 for k in ("slotssm", "slot_transformer") for n in lengths}}
    video = {"bench": "video-prediction", "metrics": {"per_step_mse": {"slotssm": [0.1, 0.2], "copy_last": [0.2, 0.3]}}}
    files = []
    for i, rec in enumerate((latency, video)):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text("table\n" + json.dumps(rec) + "\n")
    paths = figures_from_files(files, tmp_path / "figs")
    assert [p.name for p in paths] == ["slotssm_latency.png", "slotssm_video_prediction.png"]
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (320, 560, 3) and (img != 255).any(axis=-1).mean() > 0.01  # something is drawn


def test_video_predictor_trains_on_pixel_bce_and_reports_mse():
    torch.manual_seed(0)
    vp = VideoPredictor("slotssm", size=8, patch=4, d_model=D, num_slots=3, layers=1, heads=2, decoder_layers=1)
    video = torch.rand(2, 4, 3, 8, 8)
    out = vp.losses(video)
    logits = vp.logits(video[:, :-1])
    torch.testing.assert_close(torch.sigmoid(logits), vp(video[:, :-1]))
    torch.testing.assert_close(out["frame"], torch.nn.functional.binary_cross_entropy_with_logits(logits, video[:, 1:]))
    torch.testing.assert_close(out["mse"], torch.nn.functional.mse_loss(torch.sigmoid(logits), video[:, 1:]))
    assert not out["mse"].requires_grad and out["frame"].requires_grad


def test_open_loop_loss_scores_the_differentiable_rollout():
    torch.manual_seed(0)
    vp = VideoPredictor("slotssm", size=8, patch=4, d_model=D, num_slots=3, layers=1, heads=2, decoder_layers=1)
    video = torch.rand(2, 6, 3, 8, 8)
    out = vp.losses(video, open_loop=2)
    roll = vp.rollout_logits(video[:, :4], 2)
    torch.testing.assert_close(out["open_loop"],
                               torch.nn.functional.binary_cross_entropy_with_logits(roll, video[:, 4:]))
    torch.testing.assert_close(torch.sigmoid(roll.detach()), vp.rollout(video[:, :4], 2))
    assert "open_loop" not in vp.losses(video)
    # the second open-loop frame's loss reaches back through the fed-back first prediction: its gradient on the
    # context differs from the one with that prediction detached (teacher forcing on it)
    context = video[:, :4].clone().requires_grad_(True)
    through, = torch.autograd.grad(vp.rollout_logits(context, 2)[:, 1].sum(), context)
    first = torch.sigmoid(vp.rollout_logits(context, 1)).detach()
    second = vp.logits(torch.cat([context, first], 1))[:, -1]
    torch.testing.assert_close(second, roll[:, 1], atol=1e-5, rtol=1e-4)
    detached, = torch.autograd.grad(second.sum(), context)
    assert (through - detached).abs().max() > 1e-6


def test_ssim_is_one_for_identical_frames_and_penalises_blur():
    from hclsm.bench.slotssm_scenes import ssim

    torch.manual_seed(0)
    frames = torch.zeros(4, 3, 32, 32)
    for i, (y, x) in enumerate([(4, 4), (4, 20), (20, 4), (20, 20)]):  # a bright square per frame, one per quadrant
        frames[i, :, y:y + 8, x:x + 8] = 1.0
    torch.testing.assert_close(ssim(frames, frames), torch.ones(4))
    mean = frames.mean(0, keepdim=True).expand_as(frames)  # the blurry average of the four
    shifted = frames.roll(1, dims=-1)  # sharp, one pixel off
    assert (ssim(mean, frames) < ssim(shifted, frames)).all()
    assert (ssim(mean, frames) < 0.9).all()
    assert ssim(torch.rand(2, 5, 3, 16, 16), torch.rand(2, 5, 3, 16, 16)).shape == (2, 5)
