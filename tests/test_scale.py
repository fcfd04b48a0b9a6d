"""Resuming a run exactly, and data-parallel training under torchrun (gloo on the CPU)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hclsm.bench.scale import free_port
from hclsm.config import load_config
from hclsm.errors import ConfigError, HclsmError
from hclsm.models import build_model
from hclsm.train import latest_checkpoint, list_checkpoints, read_log, train
from hclsm.train import loop as train_loop
from hclsm.train.distributed import Dist, setup
from tests.helpers import SMALL, assert_user_error, run


def small_cfg(*extra: str):
    # the real model with its noise on (slot queries, stochastic existence gates from step 4): resuming
    # must restore the RNG streams, not only the weights
    return load_config("tiny", overrides=[*SMALL, "train.steps=9", "train.batch_size=4", "train.warmup_steps=2",
                                          "train.ckpt_every=3", "train.eval_every=0", "train.log_every=1",
                                          "train.stage1_fraction=1.0", "train.val_fraction=0", "train.device=cpu",
                                          "data.clip.length=3", *extra])


def test_resume_after_an_interruption_ends_bit_identical(tmp_path, data, monkeypatch):
    cfg = small_cfg()
    whole = train(cfg, data, run_dir=tmp_path / "whole", progress=False)

    real_step, calls = train_loop.train_step, []

    def dies_on_the_seventh(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # killed between the checkpoint of step 6 and step 9
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "train_step", dies_on_the_seventh)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data, run_dir=tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_loop, "train_step", real_step)
    assert latest_checkpoint(tmp_path / "cut").name == "step_0000006"
    (tmp_path / "cut" / "checkpoints" / ".step_0000009.tmp-x").mkdir()  # a checkpoint the kill cut short
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # and a log line it cut in half

    resumed = train(cfg, data, run_dir=tmp_path / "cut", progress=False, resume=True)
    assert resumed.steps == whole.steps == 9
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    for name in ("model.safetensors", "optimizer.safetensors"):
        x, y = (load_file(latest_checkpoint(r) / name) for r in (tmp_path / "whole", tmp_path / "cut"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    log = read_log(tmp_path / "cut" / "log.jsonl")
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, 10))  # the killed run's line for step 7 is gone, each step logged once
    assert [r["step"] for r in log if r.get("event") == "resumed"] == [6]
    assert not [p for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["resumed_from"].endswith("step_0000006")


def test_resume_needs_a_checkpoint(tmp_path, data):
    with pytest.raises(HclsmError, match="does not exist; pass the OUT/NAME directory"):
        train(small_cfg(), data, run_dir=tmp_path / "nothing", progress=False, resume=True)


def test_cli_resume_refuses_changes_and_non_runs(tmp_path, capsys, data):
    code, out, err = run(capsys, "train", "--data", data, "--steps", "3", "--out", tmp_path, "--name", "r", "--quiet",
                         "--stage", "1", *(f"--{o}" for o in SMALL), "--train.warmup_steps=1",
                         "--train.ckpt_every=1", "--data.clip.length=3")
    assert code == 0, err
    assert_user_error(*run(capsys, "train", "--resume", tmp_path / "r", "--steps", "9")[::2], "--steps", "own config")
    assert_user_error(*run(capsys, "train", "--resume", tmp_path / "r", "--train.lr=1")[::2], "--train.lr=1")
    assert_user_error(*run(capsys, "train", "--resume", tmp_path)[::2], "not a run directory")
    assert_user_error(*run(capsys, "train", "--out", tmp_path)[::2], "--data DIR", "--resume RUN")
    code, out, err = run(capsys, "train", "--resume", tmp_path / "r", "--quiet")  # its data is in its checkpoint
    assert code == 0 and "3 steps" in out, err


def test_ranks_take_contiguous_equal_shares_of_the_global_batch():
    shares = [Dist(rank=r, world=4).share(12) for r in range(4)]
    assert [list(range(12))[s] for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert Dist().share(5) == slice(0, 5) and Dist().mean(torch.ones(2)).tolist() == [1.0, 1.0]


def test_a_global_batch_that_does_not_split_is_a_config_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="train.batch_size: the global batch \\(5\\) must split evenly over 2"):
        setup(torch.device("cpu"), 5)
    with pytest.raises(ConfigError, match="over 2 processes x 2 micro-batches; use a multiple of 4"):
        setup(torch.device("cpu"), 6, accumulate=2)


def test_torchrun_two_ranks_match_one_process(tmp_path, data):
    """2 gloo ranks with half the batch each end where one process with the whole batch does."""
    args = ["train", "--data", str(data), "--steps", "3", "--out", str(tmp_path), "--quiet", "--stage", "1",
            *(f"--{o}" for o in SMALL), "--train.warmup_steps=1", "--train.batch_size=4", "--data.clip.length=3",
            "--model.slots.query_noise=0", "--model.slots.existence_start=1.0", "--train.val_fraction=0"]
    root = Path(__file__).resolve().parents[1]
    one = subprocess.run([sys.executable, "-m", "hclsm", *args, "--name", "one"], capture_output=True, text=True,
                         cwd=root)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), "-m", "hclsm", *args, "--name", "two"], capture_output=True, text=True, cwd=root)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("run: ") == 1  # rank 0 reports, rank 1 stays quiet
    a, b = (load_file(latest_checkpoint(tmp_path / n) / "model.safetensors") for n in ("one", "two"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5
    train_loop.seed_everything(0)  # the weights the runs started from: 3 steps moved them far more than 1e-5
    init = build_model(load_config("tiny", overrides=SMALL).model).state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 1e-3
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3


def ddp_worker(data: Path) -> tuple[list[str], dict[str, str]]:
    """The command line of ``tests/ddp_worker.py`` on ``data`` and the environment it runs in."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return [str(root / "tests" / "ddp_worker.py"), str(data)], env


def one_and_two_ranks(tmp_path: Path, data: Path, one: list[str], two: list[str]) -> tuple[dict, dict, dict]:
    """The worker in one process (arguments ``one``, into tmp_path/one) and under torchrun on 2 ranks
    (``two``, into tmp_path/two): rank 0's, rank 1's and the single process's final weights."""
    worker, env = ddp_worker(data)
    single = subprocess.run([sys.executable, *worker, str(tmp_path / "one"), *one], capture_output=True, text=True,
                            env=env)
    ranks = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(free_port()), *worker, str(tmp_path / "two"), *two], capture_output=True, text=True,
                           env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    r0, r1 = (load_file(tmp_path / "two" / f"rank{r}.safetensors") for r in (0, 1))
    return r0, r1, load_file(tmp_path / "one" / "rank0.safetensors")


def test_every_rank_ends_with_the_same_weights_and_ema_target(tmp_path, data):
    """Under DDP every rank applies the same averaged gradient and the same EMA update, so the ranks'
    weights (the EMA target encoder included) are bit-identical; and bit-identical to one process that
    computes as the ranks do (their halves of the batch as two micro-batches, one thread)."""
    r0, r1, single = one_and_two_ranks(tmp_path, data, ["ddp", "train.accumulate=2", "train.threads=1"], [])
    ema = [k for k in r0 if ".target_encoder." in k]
    assert ema and r0.keys() == r1.keys() == single.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], r1[k])][:5]
    assert all(torch.equal(r0[k], single[k]) for k in r0), [k for k in r0 if not torch.equal(r0[k], single[k])][:5]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["rank0.safetensors", "rank1.safetensors", "run"]


def test_micro_batches_under_ddp_sync_once_and_train_like_one_process(tmp_path, data):
    """train.accumulate=2 on 2 ranks (gradients synchronised after the second micro-batch only): the ranks end
    bit-identical, and within float summation order of one process running the 4 micro-batches itself."""
    r0, r1, single = one_and_two_ranks(tmp_path, data, ["ddp", "train.accumulate=4", "train.threads=1"],
                                       ["ddp", "train.accumulate=2"])
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    diff = max(float((r0[k] - single[k]).abs().max()) for k in r0)
    assert diff <= 1e-4, diff  # measured 2.9e-6: ((a + b) / 2 + (c + d) / 2) / 2 vs a / 4 + b / 4 + c / 4 + d / 4


def test_fsdp_shards_train_like_one_process_and_resume_exactly(tmp_path, data):
    """train.parallel=fsdp: 2 ranks holding shards end within 1e-5 of one process (rank 0's gathered
    checkpoint, the EMA target encoder included), and a run resumed from an earlier checkpoint ends
    bit-identical to the uninterrupted one."""
    worker, env = ddp_worker(data)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    one = subprocess.run([sys.executable, *worker, str(tmp_path / "one")], capture_output=True, text=True, env=env)
    two = subprocess.run([*launch, *worker, str(tmp_path / "two"), "fsdp"], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    final = latest_checkpoint(tmp_path / "two" / "run")
    a, b = load_file(tmp_path / "one" / "rank0.safetensors"), load_file(final / "model.safetensors")
    assert a.keys() == b.keys() and any(".target_encoder." in k for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5

    cut = tmp_path / "cut"  # the same run, as if killed after the checkpoint of step 1
    shutil.copytree(tmp_path / "two" / "run", cut)
    for later in list_checkpoints(cut)[1:]:
        shutil.rmtree(later)
    (cut / "summary.json").unlink()
    again = subprocess.run([*launch, "-m", "hclsm", "train", "--resume", str(cut), "--quiet"], capture_output=True,
                           text=True, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("model.safetensors", "optimizer.safetensors"):
        x, y = load_file(final / name), load_file(latest_checkpoint(cut) / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
