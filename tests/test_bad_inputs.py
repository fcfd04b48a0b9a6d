"""The bad-input corpus: what a user can get wrong, and the one-line error each mistake must give.

Every case damages a small dataset, config or checkpoint the way a user (or a bad disk, or a hostile
file) could, then checks the project rule: a non-zero exit (2) with exactly one ``error:`` line on
stderr that names the problem and the fix, no traceback, and no output left behind (``hclsm train``
creates no run directory, nor even its ``--out`` root). Checkpoint cases call ``load_checkpoint`` and
check the same one-line ``HclsmError`` there, then go through ``hclsm train --resume``, the command
line's checkpoint loader.

Cases already covered elsewhere are not repeated: bad paths and unreadable JSON metadata for both
readers (test_cli.py, test_lerobot.py), library-level corrupt parquet / mp4 / mask files
(test_lerobot.py::test_bad_datasets_raise_one_clear_error, test_cli.py::test_lerobot_reader_corrupt_files),
``train.lr=-1`` and unknown keys for ``hclsm train`` (test_cli.py::test_not_built_commands_report_config_errors_first),
per-type / per-value config validation (test_config.py) and strict loading into a toy model
(test_train.py::test_strict_load_names_missing_and_unexpected_keys). Here they go through ``hclsm train``.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hclsm import cli, keys
from hclsm.config import ClipConfig, load_config
from hclsm.data import memory
from hclsm.data.clips import ClipDataset
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.memory import MemoryClips
from hclsm.data.physics import PhysicsSource
from hclsm.data.video import decode_frames, encode_video
from hclsm.errors import DataError, HclsmError
from hclsm.models import build_model
from hclsm.train import CheckpointError, load_checkpoint, save_checkpoint

from helpers import SMALL, assert_user_error, run

# a 2-step stage-1 run of the small model on 3-frame clips: under a second when the data is fine
TRAIN = ["--model", "hclsm", "--stage", "1", "--steps", "2", "--name", "r", "--quiet", "--train.warmup_steps=0",
         "--train.batch_size=2", "--data.clip.length=3", *[f"--{o}" for o in SMALL]]
VIDEO_FILE = "videos/observation.image/chunk-000/file-000.mp4"
DATA_FILE = "data/chunk-000/file-000.parquet"
EPISODES_FILE = "meta/episodes/chunk-000/file-000.parquet"
MASK_FILE = "extras/mask/episode_000001.npz"
EPISODE_FILE = "episodes/episode_000001.npz"


def _generate(out: Path, *argv: str) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main([*argv, "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def pusht_ds(tmp_path_factory) -> Path:
    """2 PushT episodes of 12 frames (96 px), LeRobot v3, from `hclsm data pusht`."""
    return _generate(tmp_path_factory.mktemp("bad-pusht") / "pusht", "data", "pusht", "--episodes", "2",
                     "--max-steps", "12")


@pytest.fixture(scope="module")
def physics_ds(tmp_path_factory) -> Path:
    """3 physics episodes of 8 frames (64 px), from `hclsm data physics`."""
    return _generate(tmp_path_factory.mktemp("bad-physics") / "physics", "data", "physics", "--episodes", "3",
                     "--frames", "8")


def copy_of(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(src, dst)
    return dst


def train_refused(capsys, tmp_path: Path, data: Path, *needles: str, extra: tuple[str, ...] = ()) -> str:
    """`hclsm train` on ``data`` exits 2 with one error line naming every needle and leaves nothing behind."""
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", *TRAIN, *extra)
    line = assert_user_error(code, err, *needles)
    assert stdout == ""
    assert not (tmp_path / "runs").exists(), "a refused run left a run directory behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return line


def rewrite_npz(path: Path, **changes) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    np.savez_compressed(path, **arrays)


def edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class Payload:
    """Unpickling this creates ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


# ---- control: the undamaged datasets train, so each refusal below is the damage's doing ----------

@pytest.mark.parametrize("which", ["pusht", "physics"])
def test_undamaged_copies_train(capsys, tmp_path, pusht_ds, physics_ds, which):
    data = copy_of(pusht_ds if which == "pusht" else physics_ds, tmp_path)
    code, stdout, err = run(capsys, "train", "--data", data, "--out", tmp_path / "runs", *TRAIN)
    assert code == 0, err
    assert (tmp_path / "runs" / "r" / "summary.json").is_file() and "2 steps" in stdout


# ---- 1. corrupt / truncated files ---------------------------------------------------------------

REMAKE = "re-create it with `hclsm data pusht --out DIR`"
REDECODE = ["cannot decode video", "corrupt or truncated, re-create the dataset"]
LEROBOT_DAMAGE = {
    "data-parquet-truncated": (DATA_FILE, lambda p: truncate(p), ["cannot read parquet", "corrupt", REMAKE]),
    "episodes-parquet-truncated": (EPISODES_FILE, lambda p: truncate(p, 0.2), ["cannot read parquet", REMAKE]),
    "mp4-truncated": (VIDEO_FILE, lambda p: truncate(p), REDECODE),
    "mp4-empty": (VIDEO_FILE, lambda p: p.write_bytes(b""), REDECODE),
    "mp4-not-a-video": (VIDEO_FILE, lambda p: p.write_bytes(bytes(range(256)) * 40), REDECODE),
    "mask-truncated": (MASK_FILE, lambda p: truncate(p), ["cannot read", "BadZipFile", "corrupt", REMAKE]),
    "mask-not-an-npz": (MASK_FILE, lambda p: p.write_bytes(b"hello"), ["not an .npz archive", REMAKE]),
    "mask-without-its-array": (MASK_FILE, lambda p: np.savez(p, other=np.zeros(3)),
                               ["no array 'mask'", "other", REMAKE]),
}


@pytest.mark.parametrize("case", list(LEROBOT_DAMAGE))
def test_train_on_corrupt_lerobot_file(capsys, tmp_path, pusht_ds, case):
    rel, damage, needles = LEROBOT_DAMAGE[case]
    ds = copy_of(pusht_ds, tmp_path)
    damage(ds / rel)
    train_refused(capsys, tmp_path, ds, str(ds / rel), *needles)


PHYSICS_DAMAGE = {
    "truncated": (lambda p: truncate(p), ["corrupt physics episode", "BadZipFile"]),
    "cut-to-64-bytes": (lambda p: truncate(p, 64 / p.stat().st_size), ["corrupt physics episode"]),
    "empty": (lambda p: p.write_bytes(b""), ["corrupt physics episode", "empty"]),
    "not-an-npz": (lambda p: p.write_bytes(b"hello, not numpy"), ["not an .npz (zip) archive"]),
    "missing": (lambda p: p.unlink(), ["episode file is missing"]),
    "missing-arrays": (lambda p: np.savez(p, video=np.zeros((8, 64, 64, 3), np.uint8)), ["missing arrays", "mask"]),
}


@pytest.mark.parametrize("case", list(PHYSICS_DAMAGE))
def test_train_on_corrupt_physics_episode(capsys, tmp_path, physics_ds, case):
    damage, needles = PHYSICS_DAMAGE[case]
    ds = copy_of(physics_ds, tmp_path)
    damage(ds / EPISODE_FILE)
    train_refused(capsys, tmp_path, ds, str(ds / EPISODE_FILE), *needles,
                  f"hclsm data physics --out {ds} --overwrite")


@pytest.mark.parametrize("where", ["physics-episode", "lerobot-mask"])
def test_pickled_npz_is_refused_without_running_it(capsys, tmp_path, pusht_ds, physics_ds, where):
    """An npz whose array is a pickled object: the reader refuses it and never unpickles it."""
    marker = tmp_path.parent / f"{tmp_path.name}-ran"
    payload = np.array([Payload(marker)], dtype=object)
    pickle.loads(pickle.dumps(payload))  # the payload is live: unpickling it does create the marker ...
    assert marker.exists()
    marker.unlink()
    if where == "physics-episode":
        ds, rel = copy_of(physics_ds, tmp_path), EPISODE_FILE
        rewrite_npz(ds / rel, video=payload)
    else:
        ds, rel = copy_of(pusht_ds, tmp_path), MASK_FILE
        np.savez(ds / rel, mask=payload)
    train_refused(capsys, tmp_path, ds, str(ds / rel), "Object arrays cannot be loaded")
    assert not marker.exists(), "the reader unpickled the file"  # ... and the reader never did


# ---- 2. wrong image sizes and channel counts ----------------------------------------------------

def pusht_lengths(ds: Path) -> list[int]:
    return pq.read_table(ds / EPISODES_FILE).to_pydict()["length"]


def _all_frames(ds: Path) -> np.ndarray:
    """Every frame of the (single) video file, (N, H, W, 3); PushT runs at 10 fps."""
    return decode_frames(ds / VIDEO_FILE, np.arange(sum(pusht_lengths(ds))) / 10)


PHYSICS_SHAPES = {
    "grayscale": (lambda z: {"video": z["video"][..., 0]}, ["(8, 64, 64)", "3 dimensions", "(T, H, W, 3) RGB"]),
    "two-channels": (lambda z: {"video": z["video"][..., :2]}, ["(8, 64, 64, 2)", "2 channels", "RGB"]),
    "four-channels": (lambda z: {"video": np.concatenate([z["video"], z["video"][..., :1]], -1)}, ["4 channels"]),
    "size-not-meta": (lambda z: {"video": z["video"][:, :32, :48], "mask": z["mask"][:, :32, :48]},
                      ["32x48", "meta.json says 64x64"]),
    "fewer-frames": (lambda z: {k: z[k][:4] for k in ("video", "mask", "positions", "velocities", "events")},
                     ["video has 4 frames but meta.json says 8"]),
    "mask-size": (lambda z: {"mask": z["mask"][:, :32]}, ["mask is uint8 (8, 32, 64)", "(8, 64, 64)"]),
    "float-frames": (lambda z: {"video": z["video"].astype(np.float32) / 255}, ["video is float32", "uint8"]),
}


@pytest.mark.parametrize("case", list(PHYSICS_SHAPES))
def test_train_on_physics_episode_of_wrong_shape(capsys, tmp_path, physics_ds, case):
    change, needles = PHYSICS_SHAPES[case]
    ds = copy_of(physics_ds, tmp_path)
    with np.load(ds / EPISODE_FILE) as z:
        rewrite_npz(ds / EPISODE_FILE, **change(z))
    train_refused(capsys, tmp_path, ds, str(ds / EPISODE_FILE), *needles, "regenerate it with")


def test_train_on_physics_meta_with_other_frame_count(capsys, tmp_path, physics_ds):
    ds = copy_of(physics_ds, tmp_path)
    edit_json(ds / "meta.json", frames=20)  # the episodes hold 8
    train_refused(capsys, tmp_path, ds, "episode_000000.npz", "video has 8 frames but meta.json says 20")


def test_train_on_lerobot_meta_with_other_frame_size(capsys, tmp_path, pusht_ds):
    ds = copy_of(pusht_ds, tmp_path)
    info = json.loads((ds / "meta/info.json").read_text())
    info["features"]["observation.image"]["shape"] = [64, 64, 3]  # the video is 96 x 96
    (ds / "meta/info.json").write_text(json.dumps(info))
    train_refused(capsys, tmp_path, ds, str(ds / VIDEO_FILE), "96x96 frames", "meta/info.json says 64x64")


def test_train_on_lerobot_video_of_other_size(capsys, tmp_path, pusht_ds):
    ds = copy_of(pusht_ds, tmp_path)
    frames = _all_frames(ds)
    encode_video(ds / VIDEO_FILE, np.ascontiguousarray(frames[:, :48, :64]), fps=10)
    train_refused(capsys, tmp_path, ds, str(ds / VIDEO_FILE), "48x64 frames", "meta/info.json says 96x96")


def test_train_on_lerobot_mask_of_other_shape(capsys, tmp_path, pusht_ds):
    ds = copy_of(pusht_ds, tmp_path)
    with np.load(ds / MASK_FILE) as z:
        np.savez_compressed(ds / MASK_FILE, mask=z["mask"][:5])  # 5 of the episode's frames
    train_refused(capsys, tmp_path, ds, str(ds / MASK_FILE), "mask has shape (5, 96, 96)",
                  f"episode 1 has {pusht_lengths(ds)[1]} frames of 96x96")


def test_grayscale_video_is_served_as_rgb(tmp_path, pusht_ds):
    """Not an error: a grayscale-encoded LeRobot video is decoded to RGB (three equal channels)."""
    import av
    from fractions import Fraction

    ds = copy_of(pusht_ds, tmp_path)
    gray = _all_frames(ds)[..., 0]
    with av.open(str(ds / VIDEO_FILE), mode="w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 96, "gray"
        for i, frame in enumerate(gray):
            f = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="gray")
            f.pts, f.time_base = i, Fraction(1, 10)
            for packet in stream.encode(f):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = LeRobotSource(ds).load_clip(1, np.arange(3))[keys.VIDEO]
    assert video.shape == (3, 3, 96, 96)
    assert torch.equal(video[:, 0], video[:, 1]) and torch.equal(video[:, 1], video[:, 2])


def test_model_channels_other_than_the_rgb_data(capsys, tmp_path, physics_ds):
    line = train_refused(capsys, tmp_path, physics_ds, "model.perception.channels", "must be 3", "RGB",
                         extra=("--model.perception.channels=1",))
    assert "got 1" in line


# ---- 3. NaN / Inf frames --------------------------------------------------------------------------

def test_physics_npz_with_nan_frames(capsys, tmp_path, physics_ds):
    """The physics format stores uint8 frames, so float frames (the only ones that can hold a NaN) are refused."""
    ds = copy_of(physics_ds, tmp_path)
    with np.load(ds / EPISODE_FILE) as z:
        video = z["video"].astype(np.float32) / 255
    video[2, 10, 10, 0] = np.nan
    rewrite_npz(ds / EPISODE_FILE, video=video)
    train_refused(capsys, tmp_path, ds, str(ds / EPISODE_FILE), "video is float32", "uint8")


@pytest.mark.parametrize("value, needles", [
    (float("nan"), ["frames hold NaN values (frames [2])"]),
    (float("inf"), ["frames hold Inf values (frames [2])"]),
    (-float("inf"), ["frames hold Inf values (frames [2])"]),
    (2.0, ["frame values span", "2", "expected [0, 1]"]),
], ids=["nan", "inf", "-inf", "out-of-range"])
def test_reader_serving_bad_frames(capsys, tmp_path, monkeypatch, physics_ds, value, needles):
    """A reader (or a user's own EpisodeSource) that serves NaN / Inf / out-of-range frames: refused when the
    data is loaded into memory, before any step, instead of training on garbage (uint8 has no NaN)."""
    real = PhysicsSource.load_clip

    def poisoned(self, episode, frames):
        out = real(self, episode, frames)
        out[keys.VIDEO][2, 1, 5, 5] = value
        return out

    monkeypatch.setattr(PhysicsSource, "load_clip", poisoned)
    line = train_refused(capsys, tmp_path, physics_ds, str(physics_ds), "episode", *needles)
    assert "corrupt" in line


def test_frames_are_checked_once_on_load_not_per_batch(monkeypatch, physics_ds):
    calls = []
    real = memory._check_frames
    monkeypatch.setattr(memory, "_check_frames", lambda name, e, n, video: calls.append(e) or real(name, e, n, video))
    clips = MemoryClips(PhysicsSource(physics_ds), ClipConfig(length=3), progress=False)
    assert sorted(calls) == [0, 1, 2]
    for _ in range(5):
        clips.sample(4, torch.Generator().manual_seed(0))
    list(clips.batches(4))
    assert sorted(calls) == [0, 1, 2]


# ---- 4. empty datasets ----------------------------------------------------------------------------

def test_physics_dataset_with_zero_episodes(capsys, tmp_path, physics_ds):
    ds = copy_of(physics_ds, tmp_path)
    edit_json(ds / "meta.json", episodes=0)
    train_refused(capsys, tmp_path, ds, str(ds), "is empty", "0 episodes", "--episodes N")


def test_physics_dataset_without_episode_files(capsys, tmp_path, physics_ds):
    ds = copy_of(physics_ds, tmp_path)
    for f in (ds / "episodes").iterdir():
        f.unlink()
    train_refused(capsys, tmp_path, ds, "episode file is missing", "hclsm data physics --out")


@pytest.mark.parametrize("key, value, needles", [
    ("episodes", -3, ["episodes must be an integer >= 0, got -3"]),
    ("frames", "eight", ["frames must be an integer >= 1, got 'eight'"]),
    ("max_objects", None, ["max_objects must be an integer >= 0, got None"]),
    ("counterfactual", "yes", ["counterfactual must be true or false"]),
])
def test_physics_meta_with_nonsense_values(capsys, tmp_path, physics_ds, key, value, needles):
    ds = copy_of(physics_ds, tmp_path)
    edit_json(ds / "meta.json", **{key: value})
    train_refused(capsys, tmp_path, ds, str(ds / "meta.json"), *needles)


def test_lerobot_dataset_with_zero_episodes(capsys, tmp_path, pusht_ds):
    ds = copy_of(pusht_ds, tmp_path)
    table = pq.read_table(ds / EPISODES_FILE)
    pq.write_table(table.slice(0, 0), ds / EPISODES_FILE)
    train_refused(capsys, tmp_path, ds, f"{ds} has no episodes", "hclsm data pusht --out")


def test_lerobot_meta_episode_lengths_disagree_with_data(capsys, tmp_path, pusht_ds):
    ds = copy_of(pusht_ds, tmp_path)
    cols = pq.read_table(ds / EPISODES_FILE).to_pydict()
    n = cols["length"][0]
    cols["length"][0] = 0  # data/ still holds its frames
    pq.write_table(pa.table(cols, schema=pq.read_schema(ds / EPISODES_FILE)), ds / EPISODES_FILE)
    train_refused(capsys, tmp_path, ds, "meta/episodes: episodes [0] have no frames", "corrupt")
    cols["length"][0] = n - 1  # one frame fewer than data/ holds
    pq.write_table(pa.table(cols, schema=pq.read_schema(ds / EPISODES_FILE)), ds / EPISODES_FILE)
    train_refused(capsys, tmp_path, ds, f"episode 0 has {n} frames in data/ but meta/episodes says {n - 1}")


@pytest.mark.parametrize("which", ["physics", "pusht"])
def test_episodes_shorter_than_one_clip(capsys, tmp_path, pusht_ds, physics_ds, which):
    data = physics_ds if which == "physics" else pusht_ds
    longest = 8 if which == "physics" else max(pusht_lengths(pusht_ds))
    train_refused(capsys, tmp_path, data, str(data), f"needs {longest + 1} frames",
                  f"longest chosen episode has {longest}", "lower data.clip.length",
                  extra=(f"--data.clip.length={longest + 1}",))


class _EmptySource:
    name = "empty-source"
    episode_lengths: list[int] = []

    def load_clip(self, episode, frames):  # pragma: no cover - never called
        raise AssertionError("nothing to load")


@pytest.mark.parametrize("reader", [MemoryClips, ClipDataset])
def test_clip_readers_on_a_source_without_episodes(reader):
    with pytest.raises(DataError) as exc:
        reader(_EmptySource(), ClipConfig(length=2))
    assert str(exc.value).startswith("empty-source: the dataset has no episodes") and "hclsm data" in str(exc.value)


def test_memory_clips_on_an_empty_split(physics_ds):
    with pytest.raises(DataError, match="no episodes chosen"):
        MemoryClips(PhysicsSource(physics_ds), ClipConfig(length=2), episodes=[], progress=False)


# ---- 5. absurd config values ----------------------------------------------------------------------

BAD_TRAIN_CONFIGS = {  # train.lr=-1: test_cli.py::test_not_built_commands_report_config_errors_first
    "zero-batch": (["--train.batch_size=0"], ["train.batch_size", "must be >= 1, got 0"]),
    "steps-0": (["--steps", "0"], ["train.steps", "must be >= 1, got 0"]),
    "negative-steps": (["--steps", "-5"], ["train.steps", "got -5"]),
    "zero-lr": (["--train.lr=0"], ["train.lr", "> 0"]),
    "infinite-lr": (["--train.lr=.inf"], ["train.lr", "must be a finite number, got inf"]),
    "overflowing-lr": (["--train.lr=1e999"], ["train.lr", "finite"]),
    "nan-lr": (["--train.lr=.nan"], ["train.lr", "finite", "nan"]),
    "infinite-minutes": (["--set", "train.max_minutes=.inf"], ["train.max_minutes", "finite"]),
    "negative-minutes": (["--minutes", "-1"], ["train.max_minutes", ">= 0"]),
    # far more slots than the 32 px frames have tokens (kept at a size that would still fit in memory if the
    # check ever went away, so that this test then fails instead of exhausting the machine)
    "huge-num-slots": (["--model.slots.num_slots=1000"],
                       ["model.slots.num_slots", "<= the 256 tokens per frame", "got 1000"]),
    "negative-num-slots": (["--model.slots.num_slots=-3"], ["model.slots.num_slots", ">= 1"]),
    "zero-image-size": (["--model.perception.image_size=0"], ["model.perception.image_size", ">= 1"]),
    "zero-clip": (["--data.clip.length=0"], ["data.clip.length", ">= 1"]),
    "zero-log-every": (["--train.log_every=0"], ["train.log_every", ">= 1"]),
    "warmup-past-steps": (["--train.warmup_steps=10"], ["train.warmup_steps", "<= train.steps (2)"]),
    "val-fraction-2": (["--train.val_fraction=2"], ["train.val_fraction", "[0, 1]"]),
    "batch-a-list": (["--train.batch_size=[1, 2]"], ["train.batch_size", "expected int", "[1, 2]"]),
    "batch-a-float": (["--train.batch_size=2.5"], ["train.batch_size", "expected int", "2.5"]),
    "slots-a-word": (["--model.slots.num_slots=many"], ["model.slots.num_slots", "expected int", "'many'"]),
    "lr-a-word": (["--train.lr=fast"], ["train.lr", "expected float", "'fast'"]),
    "precision-a-number": (["--train.precision=16"], ["train.precision", "fp32", "bf16"]),
    "device-tpu": (["--train.device=tpu"], ["train.device", "auto, cpu, cuda"]),
    # a batch whose clips need ~100 GB: the first step cannot allocate it
    "huge-batch": (["--train.batch_size=8000000"], ["out of memory at step 1", "train.batch_size=8000000",
                                                     "lower them"]),
    "section-a-number": (["--model.slots=3"], ["model.slots", "mapping"]),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_CONFIGS))
def test_train_with_absurd_config(capsys, tmp_path, physics_ds, case):
    extra, needles = BAD_TRAIN_CONFIGS[case]
    train_refused(capsys, tmp_path, physics_ds, *needles, extra=tuple(extra))


def test_console_script_on_a_grayscale_dataset(tmp_path, physics_ds):
    """The real process: exit 2, one stderr line, no traceback, nothing written."""
    script = Path(sys.executable).parent / "hclsm"
    if not script.is_file():
        pytest.skip("the hclsm console script is not installed")
    ds = copy_of(physics_ds, tmp_path)
    with np.load(ds / EPISODE_FILE) as z:
        rewrite_npz(ds / EPISODE_FILE, video=z["video"][..., 0])
    r = subprocess.run([script, "train", "--data", ds, "--out", tmp_path / "runs", *TRAIN], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"error: {ds / EPISODE_FILE}: video has shape (8, 64, 64)") and r.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---- 6. checkpoints: another config, pickles ------------------------------------------------------

def _model(*extra: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(load_config("tiny", overrides=[*SMALL, *extra]).model)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = _model()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), 3, model, torch.optim.AdamW(model.parameters()))


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("overrides, needles", [
    (["model.slots.num_slots=5"], ["shape mismatches (checkpoint vs model)", "objects.slot_attention.queries (5, 16) vs (6, 16)"]),
    (["model.decoder.layers=4"], ["missing keys: objects.decoder.net.8.bias, objects.decoder.net.8.weight"]),
    (["model.slots.background=false"], ["unexpected keys: objects.decoder.background.bias, objects.decoder.background.weight"]),
    (["model.perception.encoder=vit"], ["missing keys: objects.encoder.blocks", "(104 in all)",
                                         "unexpected keys: objects.encoder.convs", "(24 in all)"]),  # online + EMA copy
], ids=["num-slots", "decoder-layers", "no-background", "vit-encoder"])
def test_checkpoint_from_another_config(checkpoint, overrides, needles):
    other = _model(*overrides, seed=1)  # other values too: a partial load would show
    before = _params(other)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(checkpoint, other, torch.optim.AdamW(other.parameters()))
    msg = str(exc.value)
    assert isinstance(exc.value, HclsmError) and "\n" not in msg
    assert msg.startswith(f"checkpoint {checkpoint} does not fit this model")
    assert "made with another config: build the model from the run's config.yaml" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused checkpoint was partly loaded"


@pytest.mark.parametrize("file, how", [
    ("model.safetensors", "torch.save"),
    ("model.safetensors", "legacy-torch.save"),
    ("model.safetensors", "pickle"),
    ("optimizer.safetensors", "torch.save"),
])
def test_checkpoint_holding_a_pickle_never_runs_it(tmp_path, checkpoint, file, how):
    ckpt = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    marker = tmp_path / "ran"
    evil = {"objects.slot_attention.queries": Payload(marker)}
    target = ckpt / file
    if how == "pickle":
        target.write_bytes(pickle.dumps(evil, protocol=4))
    else:
        torch.save(evil, target, _use_new_zipfile_serialization=how == "torch.save")
    raw = target.read_bytes()  # the payload is live: a pickle loader would run it ...
    pickle.loads(raw) if how == "pickle" else torch.load(io.BytesIO(raw), weights_only=False)
    assert marker.exists()
    marker.unlink()

    model = _model(seed=1)  # other values than the checkpoint's: a partial load would show
    before = _params(model)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt, model, torch.optim.AdamW(model.parameters()))
    msg = str(exc.value)
    assert not marker.exists(), "loading the checkpoint ran code from it"  # ... load_checkpoint never does
    assert "\n" not in msg and msg.startswith(f"{target} is a pickle (torch.save) file, not safetensors")
    assert "never unpickles" in msg and "use a checkpoint written by hclsm" in msg
    if file == "model.safetensors":
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_state_json_holding_a_pickle(tmp_path, checkpoint):
    ckpt = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, ckpt)
    marker = tmp_path / "ran"
    (ckpt / "state.json").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(ckpt, _model())
    assert not marker.exists()
    assert str(exc.value).startswith(f"{ckpt / 'state.json'}: cannot read") and "\n" not in str(exc.value)


@pytest.mark.parametrize("damage", ["pickle", "other-config"])
def test_resume_from_a_bad_checkpoint_is_one_line_and_changes_nothing(capsys, tmp_path, physics_ds, damage):
    """`hclsm train --resume` is the command line's checkpoint loader: the same refusals, through the CLI,
    and the run directory is left exactly as it was."""
    code, _, err = run(capsys, "train", "--data", physics_ds, "--out", tmp_path / "runs", *TRAIN)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "r"
    ckpt = next((run_dir / "checkpoints").iterdir())
    marker = tmp_path / "ran"
    if damage == "pickle":
        torch.save({"objects.slot_attention.queries": Payload(marker)}, ckpt / "model.safetensors")
        needles = ["is a pickle (torch.save) file, not safetensors", "never unpickles"]
    else:  # the run's config edited afterwards: its checkpoint no longer fits the model it describes
        cfg = run_dir / "config.yaml"
        cfg.write_text(cfg.read_text().replace("num_slots: 4", "num_slots: 3"))
        needles = ["does not fit this model", "objects.slot_attention.queries (5, 16) vs (4, 16)"]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, stdout, err = run(capsys, "train", "--resume", run_dir, "--quiet")
    assert_user_error(code, err, *needles)
    assert stdout == "" and not marker.exists()
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
