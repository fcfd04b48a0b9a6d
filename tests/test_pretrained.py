"""``save_pretrained`` / ``from_pretrained``: a model in the hub's layout (config.json + model.safetensors)."""
from __future__ import annotations

import json

import pytest
import torch

from hclsm.config import load_config
from hclsm.errors import HclsmError
from hclsm.models import build_model, from_pretrained
from hclsm.models.hclsm import HCLSM
from hclsm.models.flat import FlatSSM

from helpers import SMALL


@pytest.mark.parametrize("name", ["hclsm", "flat_ssm", "slotssm", "oc_slotssm"])
def test_a_saved_model_loads_with_identical_outputs_and_no_network(tmp_path, name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[f"model.name={name}", *SMALL, "model.decoder.static_background=true"])
    model = build_model(cfg.model).eval()
    if name == "hclsm":  # a data-set statistic kept in a buffer travels with the weights
        model.objects.decoder.static.uniform_()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model"]["name"] == name
    loaded = from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and not loaded.training
    batch = {"video": torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
             "action": torch.rand(2, 3, 2, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(batch, stage=2).losses
        torch.manual_seed(3)
        b = loaded(batch, stage=2).losses
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_class_method_checks_the_kind_and_bad_directories_are_named(tmp_path):
    torch.manual_seed(0)
    model = build_model(load_config("tiny", overrides=SMALL).model)
    model.save_pretrained(tmp_path / "m", dtype=torch.float16)
    assert isinstance(HCLSM.from_pretrained(tmp_path / "m"), HCLSM)
    with pytest.raises(HclsmError, match="holds a HCLSM, not a FlatSSM"):
        FlatSSM.from_pretrained(tmp_path / "m")
    with pytest.raises(HclsmError, match="no model.safetensors"):
        (tmp_path / "m" / "model.safetensors").unlink()
        from_pretrained(tmp_path / "m")
    other = build_model(load_config("tiny", overrides=[*SMALL, "model.slots.num_slots=5"]).model)
    other.save_pretrained(tmp_path / "o")
    (tmp_path / "m" / "model.safetensors").write_bytes((tmp_path / "o" / "model.safetensors").read_bytes())
    with pytest.raises(HclsmError, match="does not fit the model"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(HclsmError, match="not a directory|could not fetch"):  # a hub id: offline, not fetched
        from_pretrained(tmp_path / "nothing-here")


def test_hclsm_export_writes_a_run_in_the_hub_layout(capsys, data, tmp_path):
    from helpers import assert_user_error, run

    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path, "--name", "r", "--steps", "2", "--quiet",
                       "--set", "train.warmup_steps=0", "--set", "train.batch_size=2", "--set", "data.clip.length=3",
                       *[f"--{o}" for o in SMALL])
    assert code == 0, err
    code, out, err = run(capsys, "export", tmp_path / "r", tmp_path / "hub")
    assert code == 0, err
    assert "exported HCLSM" in out and "step_0000002" in out
    from hclsm.runs import Run

    trained, exported = Run(tmp_path / "r").load_model(), from_pretrained(tmp_path / "hub")
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), exported.state_dict().values()))
    code, _, err = run(capsys, "export", tmp_path / "r", tmp_path / "hub")  # not into a directory with files
    assert_user_error(code, err, "not an empty directory")
    code, _, err = run(capsys, "export", tmp_path / "nope", tmp_path / "hub2")
    assert_user_error(code, err, "does not exist")
