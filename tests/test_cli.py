"""The ``hclsm`` command line, end to end.

Most cases call ``hclsm.cli.main(argv)`` in-process (fast); a few run the installed console script in
a subprocess to prove that a user's mistake ends with exit 2, one ``error:`` line on stderr and no
traceback. The project rule checked throughout: bad input a user can cause (paths, configs, corrupt
or wrong-shaped data) gives a one-line error naming the problem and the fix, a non-zero exit, no
traceback and no half-written output (neither the ``--out`` directory nor hidden ``.NAME.tmp-*`` /
``.NAME.old-*`` directories next to it).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from faults import console_script
from hclsm import cli
from hclsm.bench import BenchResult
from hclsm.data import physics as physics_mod
from hclsm.data import pusht as pusht_mod
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.physics import PhysicsSource
from hclsm.errors import DataError

from helpers import assert_user_error, run

PUSHT = ["--episodes", "2", "--max-steps", "12", "--quiet"]
PHYSICS = ["--episodes", "3", "--frames", "8", "--quiet"]
FRACTIONS = re.compile(r"episodes with agent-block contact: (\d+)%; block moved > 20 px: (\d+)%; both: (\d+)%")


# ---- helpers --------------------------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    """Hidden temporary directories that atomic writers leave behind when they fail to clean up."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name))


def snapshot(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` with its mtime and content hash, to prove a directory was not touched."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def quiet_main(*argv: str) -> tuple[int, str]:
    """``cli.main`` for fixtures (no capsys there): (exit code, stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main([str(a) for a in argv])
    return code, buf.getvalue()


# ---- shared datasets ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pusht_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-pusht") / "pusht"
    code, stdout = quiet_main("data", "pusht", "--out", out, *PUSHT)
    return out, code, stdout


@pytest.fixture(scope="module")
def physics_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-physics") / "physics"
    code, stdout = quiet_main("data", "physics", "--out", out, *PHYSICS)
    return out, code, stdout


# ---- 1. help --------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, expect", [
    ([], ["data", "train", "eval", "plan", "bench", "demo"]),
    (["data"], ["pusht", "physics"]),
    (["data", "pusht"], ["--out", "--overwrite", "--max-steps", "--codec", "--config", "--set"]),
    (["data", "physics"], ["--out", "--overwrite", "--frames", "--counterfactual", "--config", "--set"]),
    (["train"], ["--data", "--model", "--stage", "--steps", "--minutes", "--config", "--set"]),
    (["eval"], ["RUN_DIR", "--data", "--context", "--horizon", "--clips", "--out"]),
    (["plan"], ["--checkpoint", "--episodes", "--planner", "--baselines"]),
    (["bench"], ["--list", "--quick", "--out"]),
    (["demo"], ["--name", "--out", "--quiet", "--set"]),
], ids=["hclsm", "data", "data-pusht", "data-physics", "train", "eval", "plan", "bench", "demo"])
def test_help_exits_zero(capsys, argv, expect):
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--help"])
    assert exc.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith("usage: hclsm" + "".join(f" {a}" for a in argv)), out[:200]
    for word in expect:
        assert word in out, f"{word!r} missing from `hclsm {' '.join(argv)} --help`"
    assert err == ""


def test_console_script_help(tmp_path):
    r = subprocess.run([console_script(), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: hclsm")
    assert r.stderr == ""


@pytest.mark.parametrize("argv", [[], ["data"], ["nosuch"]], ids=["no-command", "no-kind", "unknown-command"])
def test_missing_or_unknown_command_is_a_usage_error(capsys, argv):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert "usage: hclsm" in err and "Traceback" not in err


# ---- 2. data generation ---------------------------------------------------------------------------

def test_data_pusht_writes_lerobot_v3(pusht_ds):
    out, code, stdout = pusht_ds
    assert code == 0
    m = re.search(r"wrote 2 PushT episodes \((\d+) frames\) to (.+) in [\d.]+ s", stdout)
    assert m and m.group(2) == str(out), stdout
    total_frames = int(m.group(1))
    assert 2 <= total_frames <= 24

    info = json.loads((out / "meta/info.json").read_text())
    assert info["codebase_version"].startswith("v3")
    assert info["total_episodes"] == 2 and info["total_frames"] == total_frames and info["fps"] == 10
    assert info["features"]["observation.image"]["dtype"] == "video"
    assert info["features"]["observation.image"]["shape"] == [96, 96, 3]
    for rel in ("meta/stats.json", "meta/tasks.parquet", "meta/episodes/chunk-000/file-000.parquet"):
        assert (out / rel).is_file(), rel

    table = pq.read_table(out / "data/chunk-000/file-000.parquet").to_pydict()
    assert len(table["index"]) == total_frames
    assert sorted(set(table["episode_index"])) == [0, 1]
    mp4 = out / "videos/observation.image/chunk-000/file-000.mp4"
    assert mp4.is_file() and mp4.read_bytes()[4:8] == b"ftyp"

    ep_index, contact = np.array(table["episode_index"]), np.array(table["gt.contact"], dtype=bool)
    for ep in (0, 1):
        with np.load(out / f"extras/mask/episode_{ep:06d}.npz") as z:
            mask = z["mask"]
        assert mask.shape == (int((ep_index == ep).sum()), 96, 96)
        assert set(np.unique(mask)) <= {0, 1, 2, 3} and {1, 3} <= set(np.unique(mask))  # agent, goal drawn

    # the printed fractions agree with the ground truth written to the dataset
    m = FRACTIONS.search(stdout)
    assert m, stdout
    contact_pct, moved_pct, both_pct = map(int, m.groups())
    expected_contact = np.mean([contact[ep_index == ep].any() for ep in (0, 1)])
    assert contact_pct == round(100 * expected_contact)
    assert both_pct <= min(contact_pct, moved_pct)
    assert leftovers(out.parent) == []

    src = LeRobotSource(out)
    assert len(src) == 2 and sum(src.episode_lengths) == total_frames


def test_data_physics_writes_meta_episodes_and_twins(physics_ds):
    out, code, stdout = physics_ds
    assert code == 0
    assert f"wrote 3 physics episodes to {out}" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "hclsm-physics" and meta["episodes"] == 3 and meta["frames"] == 8
    assert meta["counterfactual"] is True
    names = [f"episode_{i:06d}.npz" for i in range(3)]
    assert sorted(p.name for p in (out / "episodes").iterdir()) == names
    assert sorted(p.name for p in (out / "counterfactual").iterdir()) == names
    m = re.search(r"interventions: \{'displace': (\d+), 'push': (\d+), 'remove': (\d+)\}", stdout)
    assert m and sum(map(int, m.groups())) == 3, stdout

    src = PhysicsSource(out)
    assert src.episode_lengths == [8, 8, 8]
    ep = src.load_episode(0)
    assert ep["video"].shape == (8, 64, 64, 3) and ep["mask"].shape == (8, 64, 64)
    assert PhysicsSource(out, counterfactual=True).load_episode(2, counterfactual=True)["intervention_kind"] in (
        "displace", "push", "remove")
    assert leftovers(out.parent) == []


def test_data_physics_no_counterfactual(capsys, tmp_path):
    out = tmp_path / "phys"
    code, stdout, err = run(capsys, "data", "physics", "--out", out, *PHYSICS, "--no-counterfactual")
    assert code == 0, err
    assert json.loads((out / "meta.json").read_text())["counterfactual"] is False
    assert not (out / "counterfactual").exists() and len(list((out / "episodes").iterdir())) == 3
    with pytest.raises(DataError, match="no counterfactual twins"):
        PhysicsSource(out, counterfactual=True)


def test_yaml_config_then_dotted_override_then_flag(capsys, tmp_path):
    """preset < YAML < dotted override, and the dedicated flag wins over a dotted override."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  physics:\n    episodes: 1\n    frames: 5\n    max_objects: 3\n")
    out = tmp_path / "phys"
    code, stdout, err = run(capsys, "data", "physics", "--out", out, "--config", cfg, "--quiet",
                            "--data.physics.episodes=4", "--episodes", "2")
    assert code == 0, err
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["episodes"], meta["frames"], meta["max_objects"]) == (2, 5, 3)


# ---- 3. existing --out ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind, args, count", [
    ("pusht", PUSHT, lambda out: json.loads((out / "meta/info.json").read_text())["total_episodes"]),
    ("physics", PHYSICS, lambda out: json.loads((out / "meta.json").read_text())["episodes"]),
])
def test_existing_out_needs_overwrite(capsys, tmp_path, kind, args, count):
    out = tmp_path / "ds"
    assert run(capsys, "data", kind, "--out", out, *args)[0] == 0
    before = snapshot(out)
    assert count(out) == int(args[1])

    code, stdout, err = run(capsys, "data", kind, "--out", out, *args, "--episodes", "1")
    assert_user_error(code, err, "--overwrite", str(out))
    assert stdout == ""
    assert snapshot(out) == before, "a refused run touched the existing dataset"
    assert leftovers(tmp_path) == []

    code, stdout, err = run(capsys, "data", kind, "--out", out, *args, "--episodes", "1", "--overwrite")
    assert code == 0, err
    assert count(out) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no .ds.tmp-* / .ds.old-* left


def test_out_is_a_file(capsys, tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    code, _, err = run(capsys, "data", "physics", "--out", f, *PHYSICS, "--overwrite")
    assert_user_error(code, err, str(f), "not a directory")
    code, _, err = run(capsys, "data", "physics", "--out", f / "ds", *PHYSICS)
    assert_user_error(code, err, str(f))
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ---- 4. bad config values -------------------------------------------------------------------------

def _write(tmp: Path, name: str, text: str) -> Path:
    (tmp / "cfg").mkdir(exist_ok=True)
    (tmp / "cfg" / name).write_text(text)
    return tmp / "cfg" / name


BAD_CONFIGS = {
    "episodes-0": (lambda t: ["data", "pusht", "--episodes", "0"], ["data.pusht.episodes", ">= 1", "0"]),
    "unknown-dotted-key": (lambda t: ["data", "pusht", "--data.pusht.bogus=1"],
                           ["data.pusht.bogus", "unknown key", "max_steps"]),
    "wrong-type": (lambda t: ["data", "pusht", "--set", "data.pusht.max_steps=abc"],
                   ["data.pusht.max_steps", "int", "abc"]),
    "no-dots": (lambda t: ["data", "pusht", "--set", "nodots"], ["nodots", "KEY=VALUE"]),
    "dotted-without-value": (lambda t: ["data", "pusht", "--data.pusht.max_steps"],
                             ["--data.pusht.max_steps", "=VALUE"]),
    "missing-yaml": (lambda t: ["data", "pusht", "--config", t / "missing.yaml"], ["missing.yaml", "not found"]),
    "yaml-is-dir": (lambda t: ["data", "pusht", "--config", _write(t, "x", "").parent], ["cfg", "directory"]),
    "yaml-is-list": (lambda t: ["data", "pusht", "--config", _write(t, "list.yaml", "- a\n- b\n")],
                     ["list.yaml", "mapping", "list"]),
    "yaml-invalid": (lambda t: ["data", "pusht", "--config", _write(t, "bad.yaml", "data: [1, 2\n")],
                     ["bad.yaml", "invalid YAML"]),
    "yaml-unknown-key": (lambda t: ["data", "physics", "--config",
                                    _write(t, "typo.yaml", "data:\n  physics:\n    frame: 4\n")],
                         ["typo.yaml", "data.physics.frame", "frames"]),
    "min-gt-max": (lambda t: ["data", "physics", "--data.physics.min_objects=5", "--data.physics.max_objects=3"],
                   ["min_objects", "max_objects", "5", "3"]),
    "min-gt-max-flags": (lambda t: ["data", "physics", "--min-objects", "5", "--max-objects", "3"],
                         ["min_objects", "max_objects"]),
    "pusht-negative-seed": (lambda t: ["data", "pusht", "--seed", "-1"], ["data.pusht.seed", "-1"]),
    "physics-negative-seed": (lambda t: ["data", "physics", "--seed", "-1"], ["data.physics.seed", "-1"]),
    "odd-image-size": (lambda t: ["data", "pusht", "--image-size", "17"], ["data.pusht.image_size", "17"]),
    "unknown-preset": (lambda t: ["data", "pusht", "--set", "preset=nosuch"], ["nosuch", "tiny"]),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_one_line_and_writes_nothing(capsys, tmp_path, case):
    make_argv, needles = BAD_CONFIGS[case]
    argv = make_argv(tmp_path)
    out = tmp_path / "ds"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, *argv[:2], "--out", out, "--quiet", *argv[2:])
    assert_user_error(code, err, *needles)
    assert stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created, no .ds.tmp-*


def test_dotted_override_does_not_swallow_next_option(capsys, tmp_path):
    out = tmp_path / "ds"
    code, _, err = run(capsys, "data", "pusht", "--data.pusht.max_steps", "--out", out, "--quiet")
    assert_user_error(code, err, "--data.pusht.max_steps", "=VALUE")
    assert not out.exists()


def test_bad_choice_is_an_argparse_usage_error(capsys, tmp_path):
    out = tmp_path / "ds"
    code, _, err = run(capsys, "data", "pusht", "--out", out, "--codec", "vp9")
    assert code == 2
    assert "usage: hclsm data pusht" in err and "invalid choice: 'vp9'" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_bad_config_with_overwrite_keeps_existing_dataset(capsys, tmp_path, physics_ds):
    out = tmp_path / "ds"
    shutil.copytree(physics_ds[0], out)
    before = snapshot(out)
    code, _, err = run(capsys, "data", "physics", "--out", out, "--overwrite", "--frames", "1")
    assert_user_error(code, err, "data.physics.frames", ">= 2")
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_console_script_bad_config(tmp_path):
    r = subprocess.run([console_script(), "data", "physics", "--out", "ds", "--config", "missing.yaml"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: config file missing.yaml: not found")
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


# ---- 5. failed or interrupted generation leaves nothing -------------------------------------------

def _fail_on_second(monkeypatch, module, name, exc):
    real = getattr(module, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return calls


@pytest.mark.parametrize("kind, module, name, args", [
    ("pusht", pusht_mod, "record_episode", PUSHT),
    ("physics", physics_mod, "simulate_episode", PHYSICS),
])
def test_failed_generation_leaves_nothing(capsys, monkeypatch, tmp_path, kind, module, name, args):
    calls = _fail_on_second(monkeypatch, module, name, RuntimeError("boom in episode 2"))
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError, match="boom"):  # a bug, not user input: it propagates
        cli.main(["data", kind, "--out", str(out), *args])
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_interrupted_generation_exits_130_and_leaves_nothing(capsys, monkeypatch, tmp_path):
    _fail_on_second(monkeypatch, pusht_mod, "record_episode", KeyboardInterrupt())
    code, stdout, err = run(capsys, "data", "pusht", "--out", tmp_path / "ds", *PUSHT)
    assert code == 130
    assert err.strip() == "interrupted" and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_dataset(capsys, monkeypatch, tmp_path, pusht_ds):
    out = tmp_path / "ds"
    shutil.copytree(pusht_ds[0], out)
    before = snapshot(out)
    _fail_on_second(monkeypatch, pusht_mod, "record_episode", KeyboardInterrupt())
    code, _, err = run(capsys, "data", "pusht", "--out", out, *PUSHT, "--overwrite", "--seed", "7")
    assert code == 130
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---- 6. train / eval / plan -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train"])
def test_not_built_commands_report_config_errors_first(capsys, tmp_path, command):
    if command == "train":  # --data is required there; its config is checked before the data
        command = ["train", "--data", tmp_path / "missing"]
    else:
        command = [command]
    code, _, err = run(capsys, *command, "--set", "train.lr=-1")
    line = assert_user_error(code, err, "train.lr", "> 0")
    assert "not built" not in line
    code, _, err = run(capsys, *command, "--model.slots.bogus=3")
    assert_user_error(code, err, "model.slots.bogus", "unknown key")
    code, _, err = run(capsys, *command, "--config", tmp_path / "nope.yaml")
    assert_user_error(code, err, "nope.yaml", "not found")


def test_console_script_train_on_a_missing_dataset(tmp_path):
    r = subprocess.run([console_script(), "train", "--data", "nope", "--set", "train.steps=10",
                        "--set", "train.warmup_steps=1"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: dataset nope does not exist") and "hclsm data physics --out" in r.stderr
    assert list(tmp_path.iterdir()) == []


# ---- 7. bench -------------------------------------------------------------------------------------

def test_bench_list(capsys):
    code, stdout, err = run(capsys, "bench", "--list")
    assert code == 0 and err == ""
    assert "data" in stdout.split()
    assert run(capsys, "bench")[1] == stdout  # no name also lists


def test_bench_unknown_name(capsys):
    code, stdout, err = run(capsys, "bench", "nosuch")
    line = assert_user_error(code, err, "'nosuch'", "available:")
    assert "data" in line.split("available:")[1].replace(",", " ").split()
    assert stdout == ""


def test_bench_data_quick_contract(capsys, tmp_path):
    result_file = tmp_path / "results" / "data.json"
    code, stdout, err = run(capsys, "bench", "data", "--quick", "--out", result_file)
    assert code == 0, err
    lines = stdout.rstrip("\n").splitlines()
    assert len(lines) >= 4, stdout
    record = json.loads(lines[-1])
    assert set(record) == {"bench", "metrics", "config", "seconds"}
    assert record["bench"] == "data"
    assert record["seconds"] > 0 and record["config"]["quick"] is True and record["config"]["seed"] == 0
    metrics = record["metrics"]
    assert 0.0 <= metrics["pusht_contact_and_moved_fraction"] <= 1.0
    assert metrics["pusht_contact_and_moved_fraction"] <= min(metrics["pusht_contact_fraction"],
                                                              metrics["pusht_moved_fraction"])
    rates = {k: v for k, v in metrics.items() if k.endswith("_per_s")}
    assert {"pusht_episodes_per_s", "pusht_frames_per_s", "physics_episodes_per_s", "pusht_clips_per_s",
            "physics_clips_per_s"} <= set(rates)
    assert all(isinstance(v, float) and v > 0 for v in rates.values()), rates
    table = "\n".join(lines[:-1])
    assert "dataset" in table and "pusht" in table and "physics" in table
    for line in lines[:-1]:  # only the last line is JSON
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    assert json.loads(result_file.read_text()) == record
    assert sorted(p.name for p in result_file.parent.iterdir()) == ["data.json"]


@pytest.fixture
def fake_bench(monkeypatch):
    """A registered instant benchmark, so that --out handling can be tested without the real cost."""
    import hclsm.bench as bench

    monkeypatch.setitem(bench._REGISTRY, "fake", lambda quick, seed: BenchResult(
        metrics={"x": 1.0}, config={"n": 1}, rows=[{"a": 1}]))
    return "fake"


def test_bench_out_is_a_directory(capsys, tmp_path, fake_bench):
    target = tmp_path / "existing_dir"
    target.mkdir()
    code, _, err = run(capsys, "bench", fake_bench, "--out", target)
    assert_user_error(code, err, str(target))
    assert leftovers(tmp_path) == []


def test_bench_out_parent_is_a_file(capsys, tmp_path, fake_bench):
    (tmp_path / "afile").write_text("")
    code, _, err = run(capsys, "bench", fake_bench, "--out", tmp_path / "afile" / "x.json")
    assert_user_error(code, err, "afile")


def test_bench_rejects_dotted_overrides(capsys):
    code, _, err = run(capsys, "bench", "--list", "--bogus.key=1")
    assert code == 2 and "bogus.key" in err


# ---- 8. dataset readers on bad paths --------------------------------------------------------------

@pytest.mark.parametrize("reader", [LeRobotSource, PhysicsSource], ids=["lerobot", "physics"])
@pytest.mark.parametrize("where", ["missing", "empty", "file"])
def test_reader_bad_path(tmp_path, reader, where):
    path = tmp_path / "ds"
    if where == "empty":
        path.mkdir()
    elif where == "file":
        path.write_text("not a dataset")
    with pytest.raises(DataError) as exc:
        reader(path)
    msg = str(exc.value)
    assert str(path) in msg and "\n" not in msg
    assert "hclsm data" in msg  # says how to make one


def test_lerobot_reader_on_physics_dataset(physics_ds):
    with pytest.raises(DataError, match=r"not a LeRobot dataset \(missing meta/info.json\)") as exc:
        LeRobotSource(physics_ds[0])
    assert str(physics_ds[0]) in str(exc.value)


def test_physics_reader_on_pusht_dataset(pusht_ds):
    with pytest.raises(DataError, match=r"not an hclsm physics dataset \(missing meta.json\)") as exc:
        PhysicsSource(pusht_ds[0])
    assert str(pusht_ds[0]) in str(exc.value)


def test_readers_on_wrong_json_meta(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p/meta.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(DataError, match="not an hclsm physics dataset"):
        PhysicsSource(tmp_path / "p")
    (tmp_path / "l/meta").mkdir(parents=True)
    (tmp_path / "l/meta/info.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        LeRobotSource(tmp_path / "l")
    (tmp_path / "l/meta/info.json").write_text(json.dumps({"codebase_version": "v2.1", "fps": 10, "features": {}}))
    with pytest.raises(DataError, match="convert"):
        LeRobotSource(tmp_path / "l")


def test_physics_reader_meta_missing_keys(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"format": "hclsm-physics", "version": 1}))
    with pytest.raises(DataError, match="meta.json"):
        PhysicsSource(tmp_path)


def test_lerobot_reader_info_not_an_object(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta/info.json").write_text("[]")
    with pytest.raises(DataError, match="info.json"):
        LeRobotSource(tmp_path)


@pytest.mark.parametrize("damage", ["data-parquet", "video", "mask"])
def test_lerobot_reader_corrupt_files(tmp_path, pusht_ds, damage):
    root = tmp_path / "ds"
    shutil.copytree(pusht_ds[0], root)
    target = {"data-parquet": "data/chunk-000/file-000.parquet",
              "video": "videos/observation.image/chunk-000/file-000.mp4",
              "mask": "extras/mask/episode_000001.npz"}[damage]
    (root / target).write_bytes((root / target).read_bytes()[:64])
    with pytest.raises(DataError) as exc:
        LeRobotSource(root).load_clip(1, np.arange(3))
    assert str(root / target) in str(exc.value) and "\n" not in str(exc.value)


def test_lerobot_reader_sees_regenerated_masks(tmp_path):
    out = tmp_path / "ds"
    assert quiet_main("data", "pusht", "--out", out, "--episodes", "1", "--max-steps", "6", "--quiet")[0] == 0
    LeRobotSource(out).load_clip(0, np.arange(3))  # fills the cache
    assert quiet_main("data", "pusht", "--out", out, "--episodes", "1", "--max-steps", "6", "--quiet",
                      "--seed", "5", "--overwrite")[0] == 0
    with np.load(out / "extras/mask/episode_000000.npz") as z:
        on_disk = z["mask"][:3]
    served = LeRobotSource(out).load_clip(0, np.arange(3))["mask"].numpy()
    assert np.array_equal(served, on_disk)
