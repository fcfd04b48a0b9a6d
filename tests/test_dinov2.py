"""A frozen pretrained DINOv2 as the perception encoder (``model.perception.encoder=dinov2``).

The backbone here is DINOv2's architecture at a tiny size with random weights, saved with transformers'
``save_pretrained`` to a temporary directory: nothing is downloaded."""
from __future__ import annotations

import sys

import pytest
import torch

from hclsm.config import load_config
from hclsm.errors import ConfigError
from hclsm.models import build_model
from hclsm.train.optim import build_optimizer

from helpers import SMALL, assert_user_error, run

transformers = pytest.importorskip("transformers")

# 56 px frames on DINOv2's 14 px patches: a 4 x 4 token grid, which the feature-target decoder draws at
DINO = ["model.perception.encoder=dinov2", "model.perception.patch_size=14", "model.perception.image_size=56",
        "model.decoder.target=features", "model.decoder.grid_size=4", "model.decoder.resolution=4"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """A randomly initialised DINOv2 (hidden 32, 2 layers, 14 px patches) saved as a user would save the real one."""
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=14, image_size=28)
    out = tmp_path_factory.mktemp("dinov2") / "dinov2-tiny"
    transformers.Dinov2Model(config).save_pretrained(out)
    return str(out)


def dino_cfg(weights: str, *extra: str):
    return load_config("tiny", overrides=[*SMALL, *DINO, f"model.perception.weights={weights}", *extra])


def test_the_slots_read_the_frozen_backbones_features_and_the_decoder_reconstructs_them(weights):
    model = build_model(dino_cfg(weights).model).train()
    encoder = model.objects.encoder
    backbone = encoder.backbone
    assert not backbone.training  # frozen: eval mode, whatever mode the model is in
    assert all(not p.requires_grad for p in backbone.parameters())
    assert model.objects.target_encoder is None  # the backbone's features are the target: no EMA copy
    assert model.target_objects.encoder.backbone is backbone  # HCLSM's EMA target shares it instead of copying
    video = torch.rand(2, 3, 3, 56, 56)
    out = model({"video": video}, progress=0.6, stage=1)
    # the target is the backbone's own patch features of the ImageNet-normalised frames, on the 4 x 4 grid
    frames = (video.flatten(0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        reference = transformers.Dinov2Model.from_pretrained(weights, local_files_only=True).eval()
        patches = reference(pixel_values=frames).last_hidden_state[:, 1:]  # (B*T, 16, 32)
    expected = patches.transpose(1, 2).reshape(2, 3, 32, 4, 4)
    torch.testing.assert_close(out.objects.target, expected)
    assert out.objects.recon.shape == (2, 3, 32, 4, 4) and out.objects.slots.shape[:2] == (2, 3)


@pytest.mark.parametrize("stage", [1, 2])
def test_every_trainable_parameter_gets_a_gradient_and_the_backbone_none_nor_a_place_in_the_optimizer(weights, stage):
    cfg = dino_cfg(weights)
    model = build_model(cfg.model).train()
    backbone = model.objects.encoder.backbone
    before = {n: p.clone() for n, p in backbone.named_parameters()}
    optimizer = build_optimizer(model, cfg.train)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in backbone.parameters())
    assert id(model.objects.encoder.out[1].weight) in in_optimizer  # the projection trains
    batch = {"video": torch.rand(4, 4, 3, 56, 56), "action": torch.rand(4, 4, 2)}
    for _ in range(2):
        optimizer.zero_grad()
        out = model(batch, progress=0.6, stage=stage)
        sum(out.losses.values()).backward()
        optimizer.step()
        model.update_target(0.9)
    part = model.objects if stage == 1 else model  # stage 1 trains the object layers only
    missing = [n for n, p in part.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(p.grad is None for p in backbone.parameters())
    assert all(torch.equal(p, before[n]) for n, p in backbone.named_parameters())


def test_hclsm_train_with_a_locally_saved_backbone(weights, data, tmp_path, capsys):
    code, out, err = run(capsys, "train", "--data", data, "--out", tmp_path, "--name", "r", "--steps", "2", "--quiet",
                         "--set", "train.warmup_steps=0", "--set", "train.batch_size=2", "--set", "data.clip.length=3",
                         "--set", "train.stage1_fraction=0.5", *[f"--{o}" for o in SMALL], *[f"--{o}" for o in DINO],
                         "--set", f"model.perception.weights={weights}")
    assert code == 0, err
    assert "2 steps" in out
    from hclsm.runs import Run

    trained = Run(tmp_path / "r").load_model()  # from its checkpoint
    saved = transformers.Dinov2Model.from_pretrained(weights, local_files_only=True)
    # a step of each stage later, the backbone in the checkpoint is the one that was saved, weight for weight
    assert all(torch.equal(p, q) for p, q in zip(trained.objects.encoder.backbone.parameters(), saved.parameters()))


@pytest.mark.parametrize("extra, needles", [
    (["model.perception.patch_size=4"], ["model.perception.patch_size: must be 14", "patch_size=14"]),
    (["model.perception.image_size=64"], ["model.perception.image_size: must be a multiple of dinov2's patch (14)"]),
    (["model.decoder.resolution=8"], ["model.decoder.resolution: must equal the perception grid (4", "resolution=4"]),
    (["model.perception.weights=null"], ["model.perception.weights:", "save_pretrained"]),
])
def test_sizes_and_weights_are_checked_when_the_config_is_built(weights, extra, needles):
    with pytest.raises(ConfigError) as e:
        dino_cfg(weights, *extra)
    assert all(n in str(e.value) for n in needles), str(e.value)
    with pytest.raises(ConfigError, match="only a pretrained encoder"):
        load_config("tiny", overrides=[*SMALL, f"model.perception.weights={weights}"])


def test_weights_that_are_not_there_or_not_dinov2_are_one_line_errors(weights, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="cannot load a DINOv2 backbone from .*dinov2-small"):
        build_model(dino_cfg(str(tmp_path / "missing")).model)
    with pytest.raises(ConfigError, match="cannot load a DINOv2 backbone from 'facebook/dinov2-small' without "
                                          "downloading"):  # a hub id not in the cache is not fetched
        build_model(dino_cfg("facebook/dinov2-small").model)
    transformers.ViTModel(transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                 intermediate_size=64, patch_size=14, image_size=28)
                          ).save_pretrained(tmp_path / "vit")
    with pytest.raises(ConfigError, match="holds a 'vit' model, not DINOv2"):
        build_model(dino_cfg(str(tmp_path / "vit")).model)
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the extra were not installed
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", "--steps", "1", "--quiet",
                       "--set", "train.warmup_steps=0", *[f"--{o}" for o in SMALL], *[f"--{o}" for o in DINO],
                       "--set", f"model.perception.weights={weights}")
    assert_user_error(code, err, "pip install 'hclsm[pretrained]'")
