"""The reliability corpus (issue 31): faults a user can cause or meet, through the real command line.

The promise checked throughout: every bad input or fault gives one ``error: ...`` line naming the problem and the
fix and a non-zero exit (2 for user errors, 130 for Ctrl-C), no traceback, nothing half-written, and Ctrl-C stops
any command cleanly. Cases grow by class, each with the neighbours a user could hit next:

1. signals and interrupted work: a real SIGINT inside pymunk's C callbacks and from outside, SIGKILL, a closed
   stdout; runs killed before their first checkpoint; temporaries of killed writers;
2. filesystem faults: read-only directories (chmod; as root a read-only bind mount, since root ignores
   permission bits) and a tiny full tmpfs, or an injected ``OSError`` where the machine allows neither
   (``faults.py``);
3. config bounds: integers beyond 64 bits or float range, seeds, sizes with an upper bound that says why;
4. string options: names and paths with ``#``, spaces, ``null``, ``a: b`` stay exactly what was typed;
5. data without optional columns: LeRobot datasets written by ``lerobot`` itself (no masks, no contact);
6. command-line typos: the command's own usage, a did-you-mean, no silent abbreviations.

Public library functions on odd tensors (non-contiguous, empty) are in ``test_scan.py`` and
``test_dynamics_blocks.py``. Subprocess cases are the real process (exit codes, signals); the wider neighbour
tables run in-process through ``hclsm.cli.main`` (the same code, faster).
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from hclsm import cli
from hclsm.config import PhysicsDataConfig, load_config
from hclsm.data.physics import generate_physics_dataset
from hclsm.errors import ConfigError
from hclsm.utils.atomic import atomic_output_dir, atomic_write_text, remove_stale

from faults import (assert_one_line_error, full_fs, hclsm, leftovers, read_only, start)
from helpers import SMALL, assert_user_error, run

FIXTURES = Path(__file__).parent / "fixtures" / "lerobot_v30"
# a 2-step stage-1 run of the small model on 3-frame clips: about a second once torch is imported
TRAIN = ["--model", "hclsm", "--stage", "1", "--steps", "2", "--quiet", "--train.batch_size=2", "--data.clip.length=3",
         *[f"--{o}" for o in SMALL]]
BIG = 10**400  # beyond float range
B64 = 2**63  # one beyond int64

# a hook for `python -c`: the real SIGINT, sent by the process to itself from inside pymunk's debug-draw callback
# (called from the simulator's C code through cffi while gym-pusht renders a frame), on its CALL-th call
SIGINT_IN_PYMUNK_CALLBACK = """
import os, signal, sys
import gym_pusht.envs.pymunk_override as _pu  # the DrawOptions gym-pusht renders with
_real, _calls = _pu.DrawOptions.draw_polygon, [0]
def _draw_polygon(self, *args, **kwargs):
    _calls[0] += 1
    if _calls[0] == CALL:
        os.kill(os.getpid(), signal.SIGINT)
        sum(range(1000))  # bytecodes still inside the callback: Python runs its SIGINT handler here
    return _real(self, *args, **kwargs)
_pu.DrawOptions.draw_polygon = _draw_polygon
"""


def sigint_hook(call: int) -> str:
    return SIGINT_IN_PYMUNK_CALLBACK.replace("CALL", str(call))


def quiet_main(*argv: object) -> int:
    """``hclsm ARGV`` in-process, for fixtures (no capsys there)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> Path:
    """A finished 2-step run of the small model (in-process); tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("rel-run")
    assert quiet_main("train", "--data", data, "--out", out, "--name", "r", *TRAIN) == 0
    return out / "r"


def copy_run(trained: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs" / "r"
    shutil.copytree(trained, dst)
    return dst


@pytest.fixture(scope="module")
def physics(tmp_path_factory) -> Path:
    """3 physics episodes of 8 frames at the default 64 px (what the shipped object model encodes)."""
    out = tmp_path_factory.mktemp("rel-physics") / "physics"
    generate_physics_dataset(out, PhysicsDataConfig(episodes=3, frames=8), progress=False)
    return out


def wait_for(predicate, timeout: float = 90.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended first (exit {proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def log_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


# ---- 1. signals and interrupted work ------------------------------------------------------------------

def test_sigint_inside_a_pymunk_callback_stops_data_pusht(tmp_path):
    """Item 1: the KeyboardInterrupt used to be raised inside the cffi callback, printed and swallowed, and the
    generation went on. Now the command stops at once: exit 130, one line, nothing written."""
    t0 = time.monotonic()
    r = hclsm("data", "pusht", "--episodes", "20", "--max-steps", "40", "--out", tmp_path / "ds", "--quiet",
              python_hook=sigint_hook(60), timeout=300)
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.strip() == "interrupted", r.stderr[-3000:]
    assert r.stdout == ""
    assert list(tmp_path.iterdir()) == []
    assert time.monotonic() - t0 < 120  # not the whole 20 episodes


def test_ctrl_c_from_outside_during_data_pusht(tmp_path):
    """Item 1, the way a user does it: SIGINT from outside while episodes are being simulated."""
    p = start("data", "pusht", "--episodes", "500", "--out", tmp_path / "ds", "--quiet", cwd=tmp_path)
    wait_for(lambda: any(tmp_path.glob(".ds.tmp-*")), proc=p)
    time.sleep(1.0)  # simulating
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and err.strip() == "interrupted", err[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_sigint_inside_a_pymunk_callback_stops_bench_data(tmp_path):
    """Neighbour: a benchmark that simulates PushT (bench data, like planning) stops the same way, writing no
    --out file."""
    r = hclsm("bench", "data", "--quick", "--out", tmp_path / "r.json", python_hook=sigint_hook(30), cwd=tmp_path,
              timeout=300)
    assert r.returncode == 130 and r.stderr.strip() == "interrupted", r.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_cjepa_slots_writes_nothing(tmp_path, physics):
    """Neighbour: Ctrl-C while the shipped object model encodes a dataset (a real SIGINT, raised in Python)."""
    hook = ("import os, signal, sys\nimport hclsm.eval.cjepa as _e\n_real = _e.encode_episodes\n"
            "def _enc(*a, **k):\n    os.kill(os.getpid(), signal.SIGINT)\n    return _real(*a, **k)\n"
            "_e.encode_episodes = _enc\n")
    r = hclsm("cjepa", "slots", "--data", physics, "--out", tmp_path / "s.npz", "--quiet", python_hook=hook)
    assert r.returncode == 130 and r.stderr.strip() == "interrupted", r.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_inside_a_finalizer_still_stops_training(tmp_path, data):
    """Neighbour: a SIGINT that lands while Python runs a ``__del__`` (where an exception is printed as "Exception
    ignored" and dropped) used to leave training running; it now stops the run at the next step."""
    hook = ("import os, signal, sys\nimport hclsm.train.loop as _loop\n_real, _calls = _loop.train_step, [0]\n"
            "class _Dropped:\n    def __del__(self):\n        os.kill(os.getpid(), signal.SIGINT)\n"
            "        sum(range(1000))\n"
            "def _step(*a, **k):\n    _calls[0] += 1\n    if _calls[0] == 2:\n        _Dropped()\n"
            "    return _real(*a, **k)\n_loop.train_step = _step\n")
    r = hclsm("train", "--data", data, "--out", tmp_path / "runs", "--name", "r", *TRAIN, "--steps", "200",
              "--set", "train.log_every=1", python_hook=hook, cwd=tmp_path)
    assert r.returncode == 130 and r.stderr.strip() == "interrupted", r.stderr[-3000:]
    assert log_steps(tmp_path / "runs" / "r")[-1] < 10  # stopped at once, not after 200 steps


def test_sigint_deferred_and_interrupt_point_in_process():
    """The mechanism: inside ``sigint_deferred`` a SIGINT waits for the block's end; under ``handle_sigint`` one
    dropped by a finalizer is raised at the next ``interrupt_point``."""
    from hclsm.utils import interrupt

    # a suite started as a background job (`nohup pytest &`) inherits SIGINT ignored; the mechanism is about the
    # interactive case, so start from Python's default handler, as a terminal's process has
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _deferred_and_dropped_sigints(interrupt)
    finally:
        signal.signal(signal.SIGINT, before)


def _deferred_and_dropped_sigints(interrupt) -> None:
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt.sigint_deferred():
            signal.raise_signal(signal.SIGINT)
            ran.append("after the signal")  # still inside the block: nothing raised yet
    assert ran == ["after the signal"]

    class Dropped:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)
            ran.append("finalizer ran on")

    with interrupt.handle_sigint():
        Dropped()
        assert ran[-1] == "finalizer ran on"
        with pytest.raises(KeyboardInterrupt):
            interrupt.interrupt_point()
        interrupt.interrupt_point()  # raised once, not again
    interrupt.interrupt_point()  # outside a command: nothing pending, nothing raised
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_closed_stdout_ends_quietly(tmp_path):
    """Neighbour: `hclsm ... | head` closes stdout early: no BrokenPipeError traceback."""
    p = start("bench", "--list", cwd=tmp_path)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read()
    p.wait(timeout=120)
    assert p.returncode == 141 and err == "", err[-3000:]


KILLED = ["--steps", "20", "--set", "train.ckpt_every=0", "--set", "train.log_every=1", "--set", "train.eval_every=0"]


def _kill_before_first_checkpoint(tmp_path: Path, data: Path, sig: int) -> Path:
    """Start a 20-step run that checkpoints only at its end; kill it with ``sig`` once it has logged a step."""
    run_dir = tmp_path / "runs" / "r"
    p = start("train", "--data", data, "--out", tmp_path / "runs", "--name", "r", *TRAIN, *KILLED, cwd=tmp_path)
    wait_for(lambda: (run_dir / "log.jsonl").is_file() and log_steps(run_dir), proc=p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if sig == signal.SIGINT:
        assert p.returncode == 130 and err.strip() == "interrupted", err[-3000:]
    else:
        assert p.returncode == -signal.SIGKILL
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "checkpoints" / "step_0000020").exists()
    return run_dir


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["sigkill", "sigint"])
def test_run_killed_before_its_first_checkpoint_resumes(capsys, tmp_path, data, sig):
    """Item 2: such a run could be neither resumed ("its checkpoint does not name its dataset") nor re-run (its
    name taken). Now the re-run says to resume, and --resume starts it again from step 0 with its own config and
    dataset, ending exactly as a run never interrupted."""
    run_dir = _kill_before_first_checkpoint(tmp_path, data, sig)
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", "--name", "r", *TRAIN)
    assert_user_error(code, err, "stopped before its first checkpoint", f"hclsm train --resume {run_dir}")
    code, out, err = run(capsys, "train", "--resume", run_dir, "--quiet")
    assert code == 0, err
    assert "20 steps" in out
    assert log_steps(run_dir) == list(range(1, 21))  # the killed run's lines are gone, none twice
    if sig == signal.SIGKILL:  # the same weights as a run never interrupted
        code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", "--name", "whole", *TRAIN,
                           *KILLED)
        assert code == 0, err
        weights = [(d / "checkpoints/step_0000020/model.safetensors").read_bytes()
                   for d in (run_dir, run_dir.parent / "whole")]
        assert weights[0] == weights[1]


@pytest.mark.parametrize("damage", ["truncated", "empty", "a-list"])
def test_resume_names_a_damaged_state_json(capsys, tmp_path, data, trained, damage):
    """Item 2: a damaged state.json was reported as "its checkpoint does not name its dataset; pass --data DIR"."""
    run_dir = copy_run(trained, tmp_path)
    state = run_dir / "checkpoints/step_0000002/state.json"
    text = state.read_text()
    state.write_text({"truncated": text[: len(text) // 3], "empty": "", "a-list": "[1, 2]"}[damage])
    needles = (f"its newest checkpoint {state.parent} is damaged", "state.json",
               "remove that checkpoint directory to resume from the one before it")
    if damage == "truncated":  # the real process once
        assert_one_line_error(hclsm("train", "--resume", run_dir, cwd=tmp_path), *needles)
    for extra in ((), ("--data", str(data))):  # with or without --data: the checkpoint is what is wrong
        code, _, err = run(capsys, "train", "--resume", run_dir, *extra)
        assert_user_error(code, err, *needles)


@pytest.mark.parametrize("what", ["missing", "empty-dir", "a-file"])
def test_resume_of_something_that_is_not_a_run(capsys, tmp_path, what):
    target = tmp_path / "x"
    if what == "empty-dir":
        target.mkdir()
    elif what == "a-file":
        target.write_text("")
    code, _, err = run(capsys, "train", "--resume", target)
    assert_user_error(code, err, str(target), "not a run directory")


def test_continual_task_killed_before_its_first_checkpoint_resumes(capsys, tmp_path, data):
    """Neighbour: a continual run whose second task died before its first checkpoint (what a kill leaves:
    config.yaml, run.json, a log) resumes that task from step 0 with the first task's EWC state."""
    base = ["train", "--continual", "--data", data, "--data", data, "--out", tmp_path, "--name", "c", *TRAIN,
            "--set", "train.ewc_samples=2", "--set", "train.val_fraction=0"]
    code, _, err = run(capsys, *base)
    assert code == 0, err
    task2 = tmp_path / "c" / "task2"
    for name in ("checkpoints", "summary.json", "ewc.safetensors"):
        p = task2 / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    code, out, err = run(capsys, "train", "--resume", tmp_path / "c", "--quiet")
    assert code == 0, err
    assert "task 1" in out and "finished before the resume" in out and "2 steps" in out
    assert (task2 / "checkpoints" / "step_0000002").is_dir() and (task2 / "ewc.safetensors").is_file()


@pytest.mark.parametrize("kind", ["physics", "pusht"])
def test_sigkilled_generator_leaves_a_temporary_the_next_one_removes(tmp_path, kind):
    """Item 3: a SIGKILLed `hclsm data` left .NAME.tmp-* behind for ever; the next writer of NAME removes it."""
    p = start("data", kind, "--episodes", "100000", "--out", tmp_path / "ds", "--quiet", cwd=tmp_path)
    wait_for(lambda: any(tmp_path.glob(".ds.tmp-*")), proc=p)
    time.sleep(0.5)
    p.kill()
    p.communicate(timeout=30)
    assert [q.name.startswith(".ds.tmp-") for q in tmp_path.iterdir()] == [True]
    small = ["--episodes", "2", "--frames", "4"] if kind == "physics" else ["--episodes", "1", "--max-steps", "4"]
    r = hclsm("data", kind, "--out", tmp_path / "ds", "--quiet", *small, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [q.name for q in tmp_path.iterdir()] == ["ds"]


def test_stale_temporaries_are_removed_but_a_live_writers_are_kept(tmp_path):
    """The mechanism under item 3: a writer's temporary is locked while it works; only unlocked ones go."""
    (tmp_path / ".out.tmp-dead").mkdir()
    (tmp_path / ".out.tmp-dead" / "half").write_text("x")
    with atomic_output_dir(tmp_path / "out") as live:  # this writer's own temporary, locked
        assert not (tmp_path / ".out.tmp-dead").exists()
        assert remove_stale(tmp_path, "out") == [] and live.is_dir()
        (live / "f").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_moved_aside_by_a_killed_overwrite_comes_back(tmp_path):
    """Neighbour: --overwrite killed between its two renames left the old output in .NAME.old-*/NAME and no
    NAME; the next writer puts it back before deciding anything."""
    old = tmp_path / ".ds.old-x" / "ds"
    old.mkdir(parents=True)
    (old / "meta.json").write_text("old")
    (tmp_path / ".ds.tmp-y").mkdir()  # the killed writer's complete new output, never renamed
    with pytest.raises(Exception, match="already exists"):
        with atomic_output_dir(tmp_path / "ds"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"] and (tmp_path / "ds/meta.json").read_text() == "old"


def test_stale_temporary_files_of_atomic_write_text_are_removed(tmp_path):
    (tmp_path / ".summary.json.tmp-abc").write_text("{half")
    atomic_write_text(tmp_path / "summary.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


# ---- 2. filesystem faults -----------------------------------------------------------------------------

def _ro(errno_name: str, under: Path, how: str | None) -> dict | None:
    """The injection to use when the machine could not make the fault real."""
    return None if how is not None else {"errno": errno_name, "under": under}


def test_train_into_a_read_only_out(tmp_path, data):
    """Item 4: `run_dir.mkdir` in the loop raised PermissionError / OSError with a traceback."""
    out = tmp_path / "ro"
    out.mkdir()
    with read_only(out) as how:
        r = hclsm("train", "--data", data, "--out", out / "runs", "--name", "r", *TRAIN, cwd=tmp_path,
                  inject=_ro("EROFS", out, how))
        line = assert_one_line_error(r, "cannot write", "choose a writable --out (train.out_dir)")
    assert "Read-only file system" in line or "Permission denied" in line
    assert list(out.iterdir()) == []


def test_resume_in_a_read_only_run_directory(tmp_path, trained):
    """Item 4: `atomic_write_text` in repair_for_resume raised a traceback."""
    run_dir = copy_run(trained, tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with read_only(run_dir) as how:
        r = hclsm("train", "--resume", run_dir, "--quiet", cwd=tmp_path, inject=_ro("EROFS", run_dir, how))
        assert_one_line_error(r, f"cannot write {run_dir}", "make it writable")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_cjepa_slots_into_a_read_only_directory(tmp_path, physics):
    """Item 4: `hclsm cjepa slots` raised a traceback (after encoding everything)."""
    out = tmp_path / "ro"
    out.mkdir()
    with read_only(out) as how:
        r = hclsm("cjepa", "slots", "--data", physics, "--out", out / "s.npz", "--quiet", cwd=tmp_path,
                  inject=_ro("EROFS", out, how))
        assert_one_line_error(r, "cannot write", "choose a writable --out")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["data-physics", "cjepa-train", "eval"])
def test_other_writers_into_a_read_only_directory(capsys, tmp_path, data, trained, command):
    """Neighbours: the other commands that write (in-process; a real read-only mount where possible)."""
    out = tmp_path / "ro"
    out.mkdir()
    if command == "cjepa-train":
        from hclsm.data.slots import SlotSequences, save_slot_file
        import torch
        save_slot_file(tmp_path / "s.npz", SlotSequences(torch.randn(4, 12, 3, 6), torch.ones(4, 12, 3, dtype=torch.bool)))
        argv = ["cjepa", "train", "--slots", tmp_path / "s.npz", "--out", out / "run", "--quiet", "--set",
                "cjepa.epochs=1", "--set", "cjepa.d_model=16", "--set", "cjepa.heads=2"]
    elif command == "eval":
        argv = ["eval", trained, "--data", data, "--out", out / "ev", "--context", "2", "--horizon", "2", "--quiet"]
    else:
        argv = ["data", "physics", "--episodes", "2", "--frames", "4", "--out", out / "ds", "--quiet"]
    with read_only(out) as how:
        if how is None:
            pytest.skip("neither chmod nor a read-only mount stops writes here (the subprocess cases inject)")
        code, stdout, err = run(capsys, *argv)
        assert_user_error(code, err, str(out), "writable --out")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "data-physics", "eval", "cjepa-train"])
def test_out_under_a_file(capsys, tmp_path, data, trained, command):
    """Neighbour: an --out whose parent is a file (NotADirectoryError from train's mkdir was a traceback)."""
    (tmp_path / "afile").write_text("keep")
    out = tmp_path / "afile" / "x"
    argv = {"train": ["train", "--data", data, "--out", out, *TRAIN],
            "data-physics": ["data", "physics", "--episodes", "1", "--out", out, "--quiet"],
            "eval": ["eval", trained, "--data", data, "--out", out, "--context", "2", "--horizon", "2", "--quiet"],
            "cjepa-train": ["cjepa", "train", "--slots", tmp_path / "s.npz", "--out", out]}[command]
    if command == "cjepa-train":
        from hclsm.data.slots import SlotSequences, save_slot_file
        import torch
        save_slot_file(tmp_path / "s.npz", SlotSequences(torch.randn(2, 12, 3, 6), torch.ones(2, 12, 3, dtype=torch.bool)))
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, f"{tmp_path / 'afile'} is a file, not a directory")
    assert (tmp_path / "afile").read_text() == "keep" and leftovers(tmp_path) == []


def test_data_pusht_on_a_full_disk(tmp_path):
    """Item 5: ENOSPC while writing the dataset was an `OSError: [Errno 28]` traceback."""
    disk = tmp_path / "disk"
    with full_fs(disk, "16k") as how:
        r = hclsm("data", "pusht", "--episodes", "2", "--max-steps", "12", "--out", disk / "ds", "--quiet",
                  cwd=tmp_path, inject=None if how else {"errno": "ENOSPC", "under": disk})
        line = assert_one_line_error(r, "No space left on device", "free some space there or choose another --out")
        assert str(disk / "ds") in line or str(disk) in line
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("command", ["data-physics", "train", "cjepa-slots"])
def test_other_writers_on_a_full_disk(capsys, tmp_path, data, physics, command):
    """Neighbours: a full disk under the other writers; train's checkpoint does not fit (config and log do)."""
    disk = tmp_path / "disk"
    with full_fs(disk, "48k" if command == "train" else "16k") as how:
        if how is None:
            pytest.skip("no tmpfs here (the subprocess case injects ENOSPC)")
        if command == "train":
            argv = ["train", "--data", data, "--out", disk, "--name", "r", *TRAIN]
        elif command == "cjepa-slots":
            argv = ["cjepa", "slots", "--data", physics, "--out", disk / "s.npz", "--quiet"]
        else:
            argv = ["data", "physics", "--episodes", "20", "--out", disk / "ds", "--quiet"]
        code, _, err = run(capsys, *argv)
        assert_user_error(code, err, "No space left on device", "free some space there")
        assert leftovers(disk) == []
        if command != "train":
            assert list(disk.iterdir()) == []


@pytest.mark.parametrize("where", ["missing-parents", "a-directory", "under-a-file"])
def test_cjepa_slots_out_paths(tmp_path, physics, where):
    """Item 6: --out in a missing directory or pointing at a directory were FileNotFoundError / IsADirectoryError
    tracebacks (after the encoding), and a failure could leave .X.tmp.npz behind."""
    out = {"missing-parents": tmp_path / "a" / "b" / "s.npz", "a-directory": tmp_path / "adir",
           "under-a-file": tmp_path / "afile" / "s.npz"}[where]
    if where == "a-directory":
        out.mkdir()
    if where == "under-a-file":
        (tmp_path / "afile").write_text("")
    r = hclsm("cjepa", "slots", "--data", physics, "--out", out, "--quiet", cwd=tmp_path)
    if where == "missing-parents":
        assert r.returncode == 0, r.stderr[-3000:]
        with np.load(out) as z:
            assert z["slots"].shape[:2] == (3, 8)
    elif where == "a-directory":
        assert_one_line_error(r, f"--out {out} is a directory", "give a file path such as")
    else:
        assert_one_line_error(r, f"{tmp_path / 'afile'} is a file, not a directory")
    assert leftovers(tmp_path) == []


# ---- 3. config bounds -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command, override, needles", [
    ("train", f"train.seed={2**32}", ["train.seed", "[0, 4294967295]", "32-bit"]),
    ("train", f"train.steps={BIG}", ["train.steps", "64-bit", "a 401-digit number"]),
    ("train", f"model.slots.num_slots={BIG}", ["model.slots.num_slots", "64-bit", "a 401-digit number"]),
    ("train", f"train.threads={B64}", ["train.threads", "<= 1024", "a 19-digit number"]),
    ("train", "train.batch_size=1000000000000", ["train.batch_size", "<= 16777216", "held in memory at once"]),
    ("physics", f"data.physics.episodes={10**32}", ["data.physics.episodes", "<= 1000000", "six digits"]),
], ids=["seed-2^32", "steps-400-digits", "num-slots-400-digits", "threads-2^63", "batch-10^12", "episodes-1e32"])
def test_config_values_beyond_their_range(tmp_path, data, command, override, needles):
    """Item 7: each was a traceback (NumPy's seed check, check_min's float overflow, set_num_threads, the batch
    allocation, tqdm's len)."""
    if command == "train":
        r = hclsm("train", "--data", data, "--out", tmp_path / "runs", "--set", override, "--quiet", cwd=tmp_path)
    else:
        r = hclsm("data", "physics", "--out", tmp_path / "ds", "--set", override, "--quiet", cwd=tmp_path)
    line = assert_one_line_error(r, *needles)
    assert len(line) < 400  # a 400-digit number is described, not printed
    assert list(tmp_path.iterdir()) == []


BOUNDS = {  # neighbours: every kind of field a user can push past what can work
    "train.threads=2000": ["train.threads", "<= 1024"],
    "train.num_workers=5000": ["train.num_workers", "<= 1024"],
    f"train.log_every={B64}": ["train.log_every", "64-bit"],
    f"train.ckpt_every={BIG}": ["train.ckpt_every", "64-bit"],
    "train.lr=1e300": ["train.lr", "<= 10.0"],
    "train.max_minutes=1e308": ["train.max_minutes", "<= 1000000.0", "two years"],
    "train.seed=-1": ["train.seed", "[0, 4294967295]"],
    f"train.stage={BIG}": ["train.stage", "must be 1 or 2", "<a 401-digit number>"],
    "data.clip.seed=4294967296": ["data.clip.seed", "32-bit"],
    f"data.clip.length={B64}": ["data.clip.length", "64-bit"],
    "data.physics.seed=4294967296": ["data.physics.seed", "32-bit"],
    "data.pusht.max_steps=100000": ["data.pusht.max_steps", "<= 10000", "held in memory"],
    "data.physics.substeps=100000": ["data.physics.substeps", "<= 1000"],
    "model.perception.image_size=4096": ["model.perception.image_size", "<= 2048"],
    "model.slots.iterations=1000000000": ["model.slots.iterations", "<= 100"],
    f"model.perception.d_model={BIG}": ["model.perception.d_model", "64-bit"],
    f"model.gnn.chunk_size={B64}": ["model.gnn.chunk_size", "64-bit"],
    f"model.d_action={B64}": ["model.d_action", "64-bit"],
    f"model.memory.size={-B64 - 1}": ["model.memory.size", ">= 1"],
    "model.slots.alive_threshold=1e400": ["model.slots.alive_threshold", "finite"],
}


@pytest.mark.parametrize("override", list(BOUNDS))
def test_config_bounds_neighbours(capsys, tmp_path, data, override):
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", "--set", override, "--quiet")
    assert_user_error(code, err, *BOUNDS[override])
    assert list(tmp_path.iterdir()) == []


def test_a_model_too_wide_for_memory_is_one_line(capsys, tmp_path, data):
    """Neighbour: widths within 64 bits whose weights cannot be allocated (here ~33 TB)."""
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", *TRAIN[:-len(SMALL)],
                       "--set", "model.perception.d_model=1000000")
    assert_user_error(code, err, "the model does not fit in this machine's memory", "lower its widths")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, needles", [
    (["bench", "scan", "--quick", "--seed", str(2**32)], ["--seed must be in [0, 4294967295]"]),
    (["plan", "--checkpoint", "nope", "--episodes", str(BIG)], ["--episodes must be in [1, 100000]", "401-digit"]),
    (["plan", "--checkpoint", "nope", "--samples", "0"], ["--samples must be in [1, 65536]"]),
    (["plan", "--checkpoint", "nope", "--seed", "-1"], ["--seed must be in [0, 4294967295]"]),
    (["eval", "nope", "--data", "nope", "--horizon", str(B64)], ["--horizon must be in [1, 9223372036854775807]"]),
    (["demo", "--steps", str(B64), "1"], ["--steps needs two positive step counts below 2^63"]),
    (["data", "pusht", "--out", "x", "--seed", str(2**32)], ["data.pusht.seed", "32-bit"]),
    (["cjepa", "train", "--slots", "x.npz", "--out", "r", "--set", "cjepa.seed=-1"], ["cjepa.seed", "32-bit"]),
    (["cjepa", "train", "--slots", "x.npz", "--out", "r", "--set", "cjepa.lr=1e300"], ["cjepa.lr", "<= 10.0"]),
    (["cjepa", "train", "--slots", "x.npz", "--out", "r", "--set", f"cjepa.epochs={BIG}"], ["cjepa.epochs", "64-bit"]),
])
def test_command_option_bounds(capsys, tmp_path, monkeypatch, argv, needles):
    """Neighbours: integer options that no config field checks (bench, plan, eval, demo) and the cjepa config."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert_user_error(code, err, *needles)
    assert list(tmp_path.iterdir()) == []


# ---- 4. string options ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, out", [("exp #2", "runs #2"), ("null", "a: b")], ids=["hash", "null-colon"])
def test_name_and_out_stay_the_strings_typed(tmp_path, data, name, out):
    """Item 8: --name "exp #2" wrote run `exp`, --out "runs #2" wrote to `runs`, --name null gave the default name,
    --out "a: b" a confusing dict error. They are plain strings, never YAML."""
    r = hclsm("train", "--data", data, "--out", out, "--name", name, *TRAIN, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out]
    assert [p.name for p in (tmp_path / out).iterdir()] == [name]


@pytest.mark.parametrize("option, value", [("--name", "001"), ("--name", "'quoted'"), ("--name", "~"),
                                           ("--name", "[a, b]"), ("--out", "{x: 1}"), ("--out", "yes")])
def test_more_strings_that_look_like_yaml(capsys, tmp_path, data, monkeypatch, option, value):
    """Neighbours: digits, quotes, ~, flow lists and mappings, YAML booleans: all names as typed."""
    monkeypatch.chdir(tmp_path)
    argv = {"--name": value, "--out": "runs"} if option == "--name" else {"--name": "r", "--out": value}
    code, _, err = run(capsys, "train", "--data", data, "--out", argv["--out"], "--name", argv["--name"], *TRAIN)
    assert code == 0, err
    assert [p.name for p in (tmp_path / argv["--out"]).iterdir()] == [argv["--name"]]


@pytest.mark.parametrize("override, expect", [("train.run_name=exp #2", "exp #2"), ("train.run_name='a #b'", "a #b"),
                                              ("train.out_dir=runs #3", "runs #3"), ("train.run_name=null", None)])
def test_string_overrides_keep_the_text(override, expect):
    """Neighbour: the same through --set (a str field takes the text as typed; quotes and null still mean what
    they say)."""
    t = load_config("tiny", overrides=[override]).train
    assert (t.run_name if "run_name" in override else t.out_dir) == expect


def test_paths_with_spaces_and_hashes(capsys, tmp_path, data):
    """Neighbours: --data, --out, the eval RUN_DIR, cjepa --data / --out with `#` and spaces."""
    ds = tmp_path / "my data #1"
    shutil.copytree(data, ds)
    code, _, err = run(capsys, "train", "--data", ds, "--out", tmp_path / "runs # x", "--name", "r 1", *TRAIN)
    assert code == 0, err
    run_dir = tmp_path / "runs # x" / "r 1"
    assert json.loads((run_dir / "run.json").read_text())["data_root"] == str(ds.resolve())
    code, out, err = run(capsys, "eval", run_dir, "--data", ds, "--context", "2", "--horizon", "2", "--clips", "1",
                         "--out", tmp_path / "eval #1", "--quiet")
    assert code == 0, err
    assert (tmp_path / "eval #1" / "metrics.json").is_file()
    code, _, err = run(capsys, "train", "--resume", run_dir, "--quiet")  # the dataset path comes back exact
    assert code == 0, err


# ---- 5. the default warmup follows the step count -----------------------------------------------------------

def test_a_smoke_run_of_one_step(tmp_path, data):
    """Item 9: `hclsm train --steps 1` was refused with train.warmup_steps: must be <= train.steps, and that
    config error hid a missing dataset."""
    r = hclsm("train", "--data", data, "--out", tmp_path / "runs", "--name", "r", "--steps", "1", "--quiet",
              *[f"--{o}" for o in SMALL], "--train.batch_size=2", "--data.clip.length=3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 steps" in r.stdout
    assert "warmup_steps: 1\n" in (tmp_path / "runs/r/config.yaml").read_text()
    r = hclsm("train", "--data", tmp_path / "missing", "--steps", "1", cwd=tmp_path)
    assert_one_line_error(r, f"dataset {tmp_path / 'missing'} does not exist")


def test_warmup_follows_steps_unless_the_user_set_it(tmp_path):
    assert load_config("tiny").train.warmup_steps == 100  # the preset's, unchanged where it fits
    assert load_config("tiny", overrides=["train.steps=30"]).train.warmup_steps == 30
    assert load_config("tiny", values={"train.steps": 7}).train.warmup_steps == 7
    assert load_config("small", overrides=["train.steps=500"]).train.warmup_steps == 500  # the preset's 2000, capped
    with pytest.raises(ConfigError, match=r"train\.warmup_steps: must be <= train\.steps \(30\), got 50"):
        load_config("tiny", overrides=["train.steps=30", "train.warmup_steps=50"])  # set by the user: refused
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  warmup_steps: 50\n")
    with pytest.raises(ConfigError, match="warmup_steps"):
        load_config("tiny", yaml_file, overrides=["train.steps=30"])


# ---- 6. data without optional columns: datasets written by lerobot itself -----------------------------------

@pytest.mark.parametrize("name", ["pusht_probe", "probe_split", "probe_h264"])
def test_train_and_eval_on_datasets_written_by_lerobot(capsys, tmp_path, name):
    """Item 10 and the acceptance run: the default model (HCLSM, small widths) trains both stages on a mask-free
    LeRobot dataset, evaluates what it can and says what it skipped (it crashed with KeyError: 'mask' in the
    final evaluation, leaving no checkpoint); `hclsm eval` then runs on it too. The real process for the first
    dataset, in-process for the other two."""
    data = FIXTURES / name
    train = ["train", "--data", data, "--out", tmp_path, "--name", "r", "--steps", "2", "--quiet",
             *[f"--{o}" for o in SMALL], "--train.batch_size=2", "--data.clip.length=3", "--data.clip.stride=8"]
    evaluate = ["eval", tmp_path / "r", "--data", data, "--context", "2", "--horizon", "3", "--clips", "1", "--quiet"]
    if name == "pusht_probe":
        r = hclsm(*train, cwd=tmp_path, timeout=300)
        code, err = r.returncode, r.stderr
    else:
        code, _, err = run(capsys, *train)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "has no ground-truth object masks" in err and "fg_ari" in err
    summary = json.loads((tmp_path / "r/summary.json").read_text())
    assert summary["checkpoint"] and summary["steps"] == 2
    assert set(summary["val"]) == {"alive_slots", "births", "deaths", "clips"} and summary["val"]["clips"] > 0
    if name == "pusht_probe":
        r = hclsm(*evaluate, cwd=tmp_path, timeout=300)
        code, out, err = r.returncode, r.stdout, r.stderr
    else:
        code, out, err = run(capsys, *evaluate)
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "precision, recall and F1 are skipped" in out
    metrics = json.loads((tmp_path / "r/eval/metrics.json").read_text())
    assert metrics["rollout"]["clips"] > 0 and np.isfinite(metrics["rollout"]["frame_mse"])


@pytest.mark.parametrize("model", ["hclsm", "flat_ssm", "oc_slotssm"])
def test_a_lerobot_dataset_without_actions_or_states(capsys, tmp_path, model):
    """Neighbour: a camera-only LeRobot dataset (no action, no observation.state columns): every model trains
    (zero actions) and HCLSM's evaluation runs."""
    ds = tmp_path / "camera-only"
    shutil.copytree(FIXTURES / "probe_h264", ds)
    table = ds / "data/chunk-000/file-000.parquet"
    pq.write_table(pq.read_table(table).drop(["action", "observation.state"]), table)
    info = json.loads((ds / "meta/info.json").read_text())
    for key in ("action", "observation.state"):
        info["features"].pop(key)
    (ds / "meta/info.json").write_text(json.dumps(info))
    code, out, err = run(capsys, "train", "--data", ds, "--out", tmp_path, "--name", "r", "--model", model, "--steps",
                         "2", "--quiet", *[f"--{o}" for o in SMALL], "--train.batch_size=2", "--data.clip.length=3",
                         "--data.clip.stride=8")
    assert code == 0 and "Traceback" not in err, err[-3000:]
    assert "2 steps" in out
    if model == "hclsm":
        code, out, err = run(capsys, "eval", tmp_path / "r", "--data", ds, "--context", "2", "--horizon", "2",
                             "--clips", "1", "--quiet")
        assert code == 0, err
        assert np.isfinite(json.loads((tmp_path / "r/eval/metrics.json").read_text())["rollout"]["frame_mse"])


def test_a_lerobot_v21_dataset_names_the_real_converter(tmp_path):
    """Item 11: the refusal named `lerobot.scripts.convert_dataset_v21_to_v30`, which lerobot 0.4 does not have."""
    ds = tmp_path / "old"
    shutil.copytree(FIXTURES / "probe_h264", ds)
    info = json.loads((ds / "meta/info.json").read_text())
    (ds / "meta/info.json").write_text(json.dumps(info | {"codebase_version": "v2.1"}))
    r = hclsm("train", "--data", ds, "--out", tmp_path / "runs", cwd=tmp_path)
    assert_one_line_error(r, "LeRobot v2.1 dataset", "python -m lerobot.datasets.v30.convert_dataset_v21_to_v30",
                          f"--repo-id=OWNER/NAME --root={ds}")
    assert "lerobot.scripts" not in r.stderr


# ---- 7. command-line typos ----------------------------------------------------------------------------------

def test_typos_get_the_commands_usage_and_a_suggestion(tmp_path):
    """Item 13: `hclsm train --minuts 1` printed the top-level usage; `--ep 2` was taken as --episodes; unknown
    bench names got no suggestion."""
    r = hclsm("train", "--minuts", "1", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("usage: hclsm train ")
    assert "hclsm train: error: unrecognized arguments: --minuts 1 (did you mean --minutes?)" in r.stderr
    r = hclsm("data", "pusht", "--ep", "2", "--out", tmp_path / "ds", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("usage: hclsm data pusht ")
    assert "unrecognized arguments: --ep 2 (did you mean --episodes?)" in r.stderr
    r = hclsm("bench", "scann", cwd=tmp_path)
    assert_one_line_error(r, "unknown benchmark 'scann' (did you mean 'scan'?)", "available:")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, usage, hint", [
    (["eval", "r", "--data", "d", "--hor", "3", "--cont", "2"], "hclsm eval", "--horizon for --hor, --context for --cont"),
    (["cjepa", "slots", "--data", "d", "--out", "s.npz", "--counterfactul"], "hclsm cjepa slots", "--counterfactual"),
    (["demo", "--step", "1", "1"], "hclsm demo", "--steps"),
    (["plan", "--checkpoint", "r", "--plan", "cem"], "hclsm plan", "--planner"),
    (["bench", "scan", "--quik"], "hclsm bench", "--quick"),
    (["data", "physics", "--out", "x", "--frame", "4"], "hclsm data physics", "--frames"),
])
def test_typo_neighbours(capsys, tmp_path, monkeypatch, argv, usage, hint):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith(f"usage: {usage} ") and f"(did you mean {hint}?)" in err, err
    assert list(tmp_path.iterdir()) == []
