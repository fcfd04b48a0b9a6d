"""Optional Weights & Biases logging (``train.wandb=true``), run offline: no account, no network."""
from __future__ import annotations

import sys

import pytest

from helpers import SMALL, assert_user_error, run

TRAIN = ["--steps", "2", "--quiet", "--set", "train.warmup_steps=0", "--set", "train.batch_size=2",
         "--set", "data.clip.length=3", "--set", "train.log_every=1", *[f"--{o}" for o in SMALL]]


def test_an_offline_wandb_run_writes_its_files(data, tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path, "--name", "r", *TRAIN,
                       "--set", "train.wandb=true", "--set", "train.wandb_project=hclsm-test")
    assert code == 0, err
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (tmp_path / "r" / "wandb_id").read_text().strip()
    (records,) = runs[0].glob(f"run-{run_id}.wandb")  # the run's id is kept with the hclsm run (for --resume)
    logged = records.read_bytes()
    # the config, and the same scalars as log.jsonl and TensorBoard under their slash-joined paths
    assert b"hclsm-test" in logged and b"losses/sbd" in logged and b"grad_norm" in logged
    assert (tmp_path / "r" / "log.jsonl").is_file() and (tmp_path / "r" / "tb").is_dir()


def test_asking_for_wandb_without_the_extra_is_one_line_and_writes_nothing(data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the extra were not installed
    code, _, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", "--name", "r", *TRAIN,
                       "--set", "train.wandb=true")
    assert_user_error(code, err, "train.wandb", "pip install 'hclsm[wandb]'")
    assert not (tmp_path / "runs").exists()
