"""The flat (no-slot) SSM baseline: gradients, causality, rollout, step == forward, parameter matching."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hclsm import keys
from hclsm.config import DecoderConfig, L0Config, DynamicsConfig, ModelConfig, PerceptionConfig, SlotConfig, TrainConfig
from hclsm.config.train import LOSS_NAMES
from hclsm.models import build_model
from hclsm.models.flat import FlatSSM, flat_config_matching, flat_parameter_count
from hclsm.train.step import train_step

T = 5


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(name="flat_ssm", d_action=2,
                perception=PerceptionConfig(image_size=32, patch_size=4, d_model=8, layers=2, heads=2, d_world=16),
                slots=SlotConfig(num_slots=4, d_slot=16, mlp_hidden=16),
                decoder=DecoderConfig(hidden=8, grid_size=8, resolution=16),
                dynamics=DynamicsConfig(l0=L0Config(d_state=4)))
    base.update(kw)
    return ModelConfig(**base)


def make_batch(b: int = 2, t: int = T, actions: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {keys.VIDEO: torch.rand(b, t, 3, 32, 32, generator=g)}
    if actions:
        batch[keys.ACTION] = torch.randn(b, t, 2, generator=g)
    return batch


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def model() -> FlatSSM:
    torch.manual_seed(0)
    return FlatSSM(tiny_cfg()).eval()


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = build_model(tiny_cfg())
    assert isinstance(net, FlatSSM)
    out = net(make_batch(), progress=0.3, stage=2)
    assert set(out.losses) <= set(LOSS_NAMES) and set(out.losses) == {"frame", "jepa"}
    sum(out.losses.values()).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_forward_is_causal(model):
    batch = make_batch()
    t = 2
    changed = {k: v.clone() for k, v in batch.items()}
    changed[keys.VIDEO][:, t + 1:] = torch.rand_like(changed[keys.VIDEO][:, t + 1:])
    changed[keys.ACTION][:, t + 1:] += 5.0
    with torch.no_grad():
        a, b = model(batch), model(changed)
    for field in ("latents", "predicted", "recon", "predicted_frames"):  # step t reads frames <= t only
        x, y = getattr(a, field), getattr(b, field)
        torch.testing.assert_close(x[:, :t + 1], y[:, :t + 1], rtol=0, atol=1e-6, msg=field)
        assert not torch.allclose(x[:, t + 1:], y[:, t + 1:]), field


def test_step_matches_forward(model):
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
    for c in range(1, T + 1):  # a one-frame rollout from c context frames = forward's prediction at step c - 1
        r = model.rollout(batch[keys.VIDEO][:, :c], 1, batch[keys.ACTION][:, :c])
        torch.testing.assert_close(r.latents[:, 0], out.predicted[:, c - 1], rtol=1e-4, atol=1e-5)
        if c < T:
            torch.testing.assert_close(r.frames[:, 0], out.predicted_frames[:, c - 1], rtol=1e-4, atol=1e-5)


def test_a_shared_context_runs_once_and_predicts_the_same(model):
    """Planning candidates share their context and its actions: run once and shared, it predicts what running it
    for every candidate does; and the planning cost (``LatentCost``) scores the candidates from it."""
    from hclsm.planning.cost import LatentCost

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z = model.encode(make_batch()[keys.VIDEO][:1, :3]).expand(4, -1, -1)  # (4, 3, d)
        actions = torch.cat([torch.randn(1, 2, 2, generator=g).expand(4, -1, -1), torch.randn(4, 5, 2, generator=g)], 1)
        every = model.predict_latents(z, 5, actions)
        shared = model.predict_latents(z, 5, actions, shared_context=True)
        torch.testing.assert_close(shared, every, rtol=1e-5, atol=1e-6)
        assert (every[0] - every[1]).abs().max() > 1e-4  # different futures
        goal = torch.randn(16, generator=g)
        cost = LatentCost(model, z[:1], actions[0, :2], goal, proprio_weight=0.0)(actions[:, 2:])
        torch.testing.assert_close(cost, (every[:, -1] - goal).pow(2).mean(-1))


def test_rollout_shapes_and_actions(model):
    video = make_batch()[keys.VIDEO][:, :3]
    r = model.rollout(video, 4, torch.randn(2, 6, 2))
    assert r.frames.shape == (2, 4, 3, 16, 16) and r.latents.shape == (2, 4, 16)
    assert model.rollout(video, 2).frames.shape == (2, 2, 3, 16, 16)  # no actions: zero actions
    with pytest.raises(ValueError, match="6 steps"):
        model.rollout(video, 4, torch.randn(2, 5, 2))


def test_trains_without_actions():
    torch.manual_seed(0)
    net = FlatSSM(tiny_cfg())
    result = train_step(net, torch.optim.AdamW(net.parameters(), lr=1e-3), make_batch(actions=False),
                        cfg=TrainConfig(), stage=1, progress=0.0)
    assert result.skipped is None and set(result.losses) == {"frame", "jepa"}


@pytest.mark.parametrize("cfg", [
    tiny_cfg(),
    tiny_cfg(d_action=0, decoder=DecoderConfig(hidden=12, grid_size=7, resolution=28)),
    tiny_cfg(perception=PerceptionConfig(encoder="vit", image_size=32, patch_size=8, d_model=8, layers=1, heads=2,
                                         d_world=16),
             dynamics=DynamicsConfig(l0=L0Config(d_state=3, blocks=2, d_conv=3, expand=3))),
], ids=["cnn", "no-action-odd-resolution", "vit"])
def test_parameter_count_formula(cfg):
    assert flat_parameter_count(cfg) == n_params(FlatSSM(cfg))


def test_parameter_matching():
    cfg = tiny_cfg()
    base = n_params(FlatSSM(cfg))
    for target in (2 * base, 5 * base):
        matched = flat_config_matching(replace(cfg, name="hclsm"), target)
        assert matched.name == "flat_ssm" and matched.perception == cfg.perception
        assert abs(n_params(build_model(matched)) - target) <= 0.15 * target
    with pytest.raises(ValueError, match="within 15%"):
        flat_config_matching(cfg, base // 10)  # smaller than the encoder and convolutions alone


def test_hclsm_train_cli_trains_the_flat_ssm_without_object_metrics(data, tmp_path, capsys):
    """``hclsm train --model flat_ssm``: the object metrics (FG-ARI of slot masks) do not apply to it, so
    the run has no evaluation function and ends with a checkpoint."""
    from hclsm import cli

    from helpers import SMALL

    args = ["train", "--data", str(data), "--model", "flat_ssm", "--steps", "2", "--name", "f",
            "--out", str(tmp_path / "runs"), "--quiet", "--train.batch_size=2", "--data.clip.length=3",
            "--train.warmup_steps=1", *(f"--{o}" for o in SMALL)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "final losses:" in out and "frame" in out and "val:" not in out
    assert list((tmp_path / "runs" / "f" / "checkpoints").glob("step_*/model.safetensors"))
