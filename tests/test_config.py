"""Config system: presets, YAML overlays, dotted overrides, strict keys/types/values, save/load round trip."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from hclsm.config import (
    PRESETS,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    SlotConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    diff_from_preset,
    get_preset,
    load_config,
    save_config,
)


def write_yaml(tmp_path, doc, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return p


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name", PRESETS)
def test_presets_build_validate_and_record_their_name(name):
    cfg = get_preset(name)
    assert isinstance(cfg, Config) and cfg.preset == name
    # rebuilding through the loader re-runs every __post_init__ on the preset's values
    assert config_from_dict(Config, {}, base=cfg) == cfg
    assert get_preset(name) is not get_preset(name)  # fresh objects: mutating one never leaks


def test_tiny_is_the_default_and_cpu_sized():
    cfg = get_preset("tiny")
    assert cfg == Config() == load_config()
    m, t = cfg.model, cfg.train
    assert m.perception.encoder == "cnn" and m.perception.image_size == 64 and m.perception.d_world == 64
    assert (m.slots.num_slots, m.slots.d_slot, m.slots.iterations) == (7, 64, 3)
    assert m.dynamics.l1.d_model <= 64 and m.dynamics.l2.d_model <= 64 and m.dynamics.l0.blocks == 1
    assert not m.causal.enabled and get_preset("small").model.causal.enabled  # tiny: off, as the seed's tiny
    assert t.precision == "fp32" and t.batch_size == 16 and t.steps <= 5000
    assert t.loss.sbd_stage1 == 5.0 and t.loss.sbd_stage2 == 1.0 and t.loss.diversity == 0.1


def test_small_matches_the_seed_and_reference_table():
    cfg = get_preset("small")
    p, s, d = cfg.model.perception, cfg.model.slots, cfg.model.dynamics
    assert (p.encoder, p.image_size, p.patch_size, p.d_model, p.layers, p.heads, p.d_world) == \
        ("vit", 224, 16, 512, 12, 8, 384)
    assert (s.d_slot, s.num_slots, s.iterations) == (192, 32, 5)
    assert (cfg.model.gnn.d_edge, cfg.model.gnn.rounds) == (96, 2)
    assert (d.l0.d_state, d.l0.blocks) == (48, 3)
    assert (d.l1.d_model, d.l1.layers, d.l1.heads) == (384, 3, 6)
    assert (d.l2.d_model, d.l2.layers, d.l2.heads) == (512, 3, 8)
    assert (cfg.model.memory.size, cfg.model.memory.d_memory) == (5000, 192)
    assert cfg.model.decoder.target == "features" and cfg.model.decoder.grid_size == p.grid_size == 14
    t = cfg.train
    assert (t.batch_size, t.lr, t.warmup_steps, t.steps, t.precision) == (4, 1.5e-4, 2000, 50_000, "bf16")
    assert t.stage1_steps == 20_000 and t.stage_at(19_999) == 1 and t.stage_at(20_000) == 2
    assert cfg.data.clip.length == 16


def test_base_and_large_sizes():
    b, lg = get_preset("base").model, get_preset("large").model
    assert (b.perception.d_world, b.slots.num_slots, b.dynamics.l2.d_model, b.memory.size) == (768, 64, 768, 10_000)
    assert (lg.perception.layers, lg.slots.d_slot, lg.gnn.rounds, lg.dynamics.l0.blocks) == (32, 384, 3, 6)


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError, match=r"'smal'.*did you mean 'small'.*tiny, small, base, large"):
        get_preset("smal")
    with pytest.raises(ConfigError, match="valid presets"):
        load_config("huge")


# ---------------------------------------------------------------- YAML overlay and overrides

def test_yaml_overlays_only_given_keys(tmp_path):
    y = write_yaml(tmp_path, {"model": {"slots": {"num_slots": 8}}})
    cfg = load_config("small", yaml_path=y)
    ref = get_preset("small")
    assert cfg.model.slots.num_slots == 8
    assert cfg.model.perception.d_world == 384 and cfg.model.slots.d_slot == 192 and cfg.train.lr == 1.5e-4
    assert diff_from_preset(cfg) == {"model": {"slots": {"num_slots": 8}}}
    assert dataclasses.replace(cfg.model, slots=ref.model.slots) == ref.model


def test_yaml_preset_key_selects_base_and_argument_wins(tmp_path):
    y = write_yaml(tmp_path, "preset: small\ntrain:\n  lr: 3e-4   # PyYAML reads this as a string\nmodel:\n")
    cfg = load_config(yaml_path=y)
    assert cfg.preset == "small" and cfg.model.perception.d_world == 384 and cfg.train.lr == 3e-4
    assert load_config("tiny", yaml_path=y).model.perception.d_world == 64
    assert load_config("tiny", yaml_path=y, overrides=["preset=base"]).model.perception.d_world == 768


def test_overrides_of_each_type():
    cfg = load_config(overrides=[
        "model.slots.num_slots=8", "train.lr=3e-4", "train.grad_clip=2", "model.causal.enabled=true",
        "train.precision=bf16", "data.pusht.codec=av1", "data.physics.spring_prob=0.5",
        "train.run_name=001", "--train.seed=7",
    ])
    assert cfg.model.slots.num_slots == 8
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.grad_clip, float) and cfg.train.grad_clip == 2.0
    assert cfg.model.causal.enabled is True and cfg.train.precision == "bf16"
    assert cfg.data.pusht.codec == "av1" and cfg.data.physics.spring_prob == 0.5
    assert cfg.train.run_name == "001" and cfg.train.seed == 7  # a str field keeps the typed text
    assert load_config(overrides=["train.run_name=x", "train.run_name=null"]).train.run_name is None


def test_overrides_are_applied_together():
    # neither change alone is valid (heads must divide d_model); together they are
    cfg = load_config(overrides=["model.perception.d_model=90", "model.perception.heads=5"])
    assert (cfg.model.perception.d_model, cfg.model.perception.heads) == (90, 5)


def test_precedence_preset_yaml_overrides(tmp_path):
    y = write_yaml(tmp_path, {"preset": "small", "train": {"lr": 2e-4, "batch_size": 2}})
    cfg = load_config(yaml_path=y, overrides=["train.lr=5e-5"])
    assert cfg.train.lr == 5e-5  # override beats yaml
    assert cfg.train.batch_size == 2  # yaml beats preset
    assert cfg.train.warmup_steps == 2000  # preset kept


# ---------------------------------------------------------------- strictness: keys, types, values

@pytest.mark.parametrize("override, bad, valid", [
    ("bogus=1", "bogus", "preset, model, train, data"),
    ("model.slot.num_slots=8", "model.slot", "slots"),
    ("model.slots.num_slot=8", "model.slots.num_slot", "num_slots, d_slot"),
    ("data.pusht.episode=3", "data.pusht.episode", "episodes"),
])
def test_unknown_override_key(override, bad, valid):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    msg = str(e.value)
    assert bad in msg and "unknown key" in msg and valid in msg


def test_unknown_yaml_keys_name_file_key_and_suggestion(tmp_path):
    y = write_yaml(tmp_path, {"model": {"dynamics": {"l1": {"head": 4}}}})
    with pytest.raises(ConfigError) as e:
        load_config(yaml_path=y)
    msg = str(e.value)
    assert str(y) in msg and "model.dynamics.l1.head" in msg and "did you mean 'heads'" in msg
    assert "event_threshold_init" in msg
    with pytest.raises(ConfigError, match=r"trian: unknown key.*preset, model, train, data"):
        load_config(yaml_path=write_yaml(tmp_path, {"trian": {}}, "b.yaml"))


@pytest.mark.parametrize("override, key, expected", [
    ("model.slots.num_slots=abc", "model.slots.num_slots", "int"),
    ("model.slots.num_slots=true", "model.slots.num_slots", "int"),  # bool is not an int
    ("model.slots.num_slots=8.0", "model.slots.num_slots", "int"),
    ("train.lr=[1, 2]", "train.lr", "float"),
    ("model.causal.enabled=1", "model.causal.enabled", "bool"),
    ("train.precision=16", "train.precision", None),  # str field: "16" stays text, then fails the enum
    ("model.slots=3", "model.slots", "mapping"),
])
def test_wrong_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert key in str(e.value)
    if expected:
        assert f"expected {expected}" in str(e.value) or f"expected a {expected}" in str(e.value)


def test_wrong_type_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.batch_size: expected int, got '16'"):
        load_config(yaml_path=write_yaml(tmp_path, {"train": {"batch_size": "16"}}))


@pytest.mark.parametrize("override, key", [
    ("train.lr=-1e-3", "train.lr"),
    ("model.perception.heads=5", "model.perception.heads"),
    ("model.dynamics.l1.heads=7", "model.dynamics.l1.heads"),
    ("model.perception.encoder=resnet", "model.perception.encoder"),
    ("model.decoder.target=depth", "model.decoder.target"),
    ("train.precision=fp16", "train.precision"),
    ("model.slots.alive_threshold=1.5", "model.slots.alive_threshold"),
    ("model.slots.num_slots=0", "model.slots.num_slots"),
    ("data.pusht.codec=vp9", "data.pusht.codec"),
    ("data.physics.follow_prob=-0.1", "data.physics.follow_prob"),
    ("data.physics.follow_strength=0", "data.physics.follow_strength"),
    ("data.physics.background=[1,2]", "data.physics.background"),
    ("data.physics.background=[0,0,256]", "data.physics.background"),
    ("model.dynamics.l1.event_threshold_init=1.0", "model.dynamics.l1.event_threshold_init"),
    ("train.stage=3", "train.stage"),
    ("train.run_name=a/b", "train.run_name"),
    ("model.name=vae", "model.name"),
    ("data.clip.length=64", "data.clip.length"),  # longer than the temporal embedding
])
def test_invalid_value_names_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert str(e.value).startswith(key + ":")


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match=r"model\.slots\.num_slots: must be >= 1, got 0"):
        SlotConfig(num_slots=0)
    with pytest.raises(ConfigError, match="train.lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(ConfigError, match="model.name"):
        ModelConfig(name="nope")


@pytest.mark.parametrize("bad", ["train.lr", "train.lr 3e-4", "=3", "train..lr=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(overrides=[bad])


def test_bad_yaml_files(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml.*not found"):
        load_config(yaml_path=missing)
    with pytest.raises(ConfigError, match=r"list\.yaml.*mapping.*list"):
        load_config(yaml_path=write_yaml(tmp_path, "- 1\n- 2\n", "list.yaml"))
    with pytest.raises(ConfigError, match=r"broken\.yaml.*invalid YAML"):
        load_config(yaml_path=write_yaml(tmp_path, "model: {slots: [\n", "broken.yaml"))
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(yaml_path=tmp_path)
    assert load_config(yaml_path=write_yaml(tmp_path, "", "empty.yaml")) == get_preset("tiny")


# ---------------------------------------------------------------- dicts and round trips

def test_config_from_dict_overlays_an_instance():
    base = get_preset("base")
    cfg = config_from_dict(Config, {"train": {"steps": 10_000}}, base=base)
    assert cfg.train.steps == 10_000 and cfg.model == base.model and cfg.preset == "base"
    data = config_from_dict(DataConfig, {"clip": {"length": 4}}, path="data")
    assert data.clip.length == 4 and data.pusht == DataConfig().pusht
    with pytest.raises(ConfigError, match=r"data\.clip\.lenght: unknown key"):
        config_from_dict(DataConfig, {"clip": {"lenght": 4}}, path="data")


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_save_load_round_trip(tmp_path, name):
    cfg = load_config(name, overrides=["train.lr=1e-8", "train.run_name=exp1", "model.causal.enabled=true",
                                       "data.pusht.codec=av1"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(yaml_path=path)
    assert again == cfg and again.preset == name
    assert config_to_dict(again) == yaml.safe_load(path.read_text())
    assert not list((tmp_path / "run").glob(".*tmp*"))  # atomic write left no temp file


def test_the_slot_world_models_take_their_sizes_from_their_own_section():
    from hclsm.models import build_model

    cfg = load_config("tiny", overrides=["model.name=slotssm", "model.slot_world.layers=3", "model.slot_world.heads=2",
                                         "model.slot_world.patch=8"])
    net = build_model(cfg.model).net
    assert len(net.backbone.layers) == 3 and net.patch == 8
    with pytest.raises(ConfigError, match=r"model\.slot_world\.heads: must divide model\.slots\.d_slot \(64\), got 3"):
        load_config("tiny", overrides=["model.name=oc_slotssm", "model.slot_world.heads=3"])
    with pytest.raises(ConfigError, match=r"model\.slot_world\.patch: must divide model\.perception\.image_size"):
        load_config("tiny", overrides=["model.name=slotssm", "model.slot_world.patch=5"])
