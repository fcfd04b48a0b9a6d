"""Datasets larger than memory: ``StreamingClips`` serves the batches ``MemoryClips`` serves, decoding on demand."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hclsm.config import load_config
from hclsm.config.data import ClipConfig
from hclsm.data.lerobot_write import LeRobotV3Writer
from hclsm.data.memory import MemoryClips, open_dataset
from hclsm.data.streaming import StreamingClips, decoded_bytes
from hclsm.errors import ConfigError
from hclsm.train import train

from helpers import SMALL


@pytest.fixture(scope="module")
def lerobot(tmp_path_factory):
    """A small LeRobot v3 dataset (h264 mp4, 36 px, with ground-truth masks): 3 episodes, 2 to a file."""
    root = tmp_path_factory.mktemp("lr") / "ds"
    rng = np.random.default_rng(0)
    features = {"observation.state": {"dtype": "float32", "shape": [2], "names": None},
                "action": {"dtype": "float32", "shape": [2], "names": None}}
    writer = LeRobotV3Writer(root, fps=10, features=features, video_keys={"observation.image": (36, 36)},
                             episodes_per_file=2)
    for ep, n in enumerate([7, 10, 6]):
        video = np.full((n, 36, 36, 3), 30, np.uint8)
        for t in range(n):
            video[t, 3 * t % 30:3 * t % 30 + 6, 4 + 8 * ep:10 + 8 * ep] = (220, 190, 50)
        writer.add_episode({"observation.state": rng.normal(size=(n, 2)).astype(np.float32),
                            "action": rng.normal(size=(n, 2)).astype(np.float32)},
                           {"observation.image": video}, task="push",
                           extras={"mask": (video[..., 0] > 128).astype(np.uint8)})
    writer.finalize()
    return root


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("which, size, clip", [
    ("physics", None, ClipConfig(length=3)),
    ("physics", 20, ClipConfig(length=3, frame_skip=2, stride=3)),  # resized on load: the same rounding in both
    ("lerobot", 28, ClipConfig(length=4, stride=2)),  # mp4 decoding: the same frames in both
])
def test_streaming_and_memory_serve_equal_batches(request, which, size, clip):
    root = request.getfixturevalue("data" if which == "physics" else "lerobot")
    source = open_dataset(root, cache_size=0)
    episodes = [0, 2] if which == "lerobot" else [1, 2, 3]
    memory = MemoryClips(source, clip, episodes, size, progress=False)
    streaming = StreamingClips(source, clip, episodes, size, cache_episodes=1)  # every episode change decodes afresh
    assert np.array_equal(memory.windows, streaming.windows) and len(memory) == len(streaming)
    assert (streaming.episodes, streaming.clip, streaming.image_size) == (memory.episodes, clip, size)
    _equal(memory.get(torch.arange(len(memory))), streaming.get(torch.arange(len(streaming))))
    for a, b in zip(memory.batches(3), streaming.batches(3)):
        _equal(a, b)
    _equal(memory.sample(5, torch.Generator().manual_seed(1)), streaming.sample(5, torch.Generator().manual_seed(1)))
    _equal(memory[-1], streaming[-1])
    assert memory.get([0])["video"].shape[-1] == (size or 32)
    for max_frames in (2000, 7):  # every frame, and an even draw of a few
        assert torch.equal(memory.median_frame(max_frames), streaming.median_frame(max_frames))


def test_the_cache_keeps_the_most_recent_episodes_within_its_bounds(data):
    source = open_dataset(data, cache_size=0)
    one = StreamingClips(source, ClipConfig(length=3), [0], cache_episodes=1).nbytes  # one decoded episode
    clips = StreamingClips(source, ClipConfig(length=3), cache_episodes=3, cache_bytes=2 * one)
    seen = []
    for _ in clips.batches(4):
        seen.append(clips.nbytes)
    assert max(seen) <= 2 * one  # the byte bound binds before the count
    assert list(clips._cache) == [2, 3] and clips.nbytes == 2 * one  # the walk in order leaves the last two
    clips.get([0])  # episode 0 again: decoded afresh, the least recent (2) dropped
    assert list(clips._cache) == [3, 0]


def test_a_run_streams_a_dataset_larger_than_its_memory_cap_and_trains_as_in_memory(data, tmp_path, monkeypatch):
    overrides = [*SMALL, "train.steps=2", "train.warmup_steps=0", "train.batch_size=2", "data.clip.length=3",
                 "train.stage1_fraction=1.0", "train.log_every=1", "train.eval_every=0"]
    cap_mb = 0.05  # MiB: the 4 episodes' decoded frames take 4 x 8 x 3 x 32 x 32 bytes = 0.094 MiB
    source = open_dataset(data)
    assert decoded_bytes(source, range(4), 32) > cap_mb * 2 ** 20
    held = []
    get = StreamingClips.get

    def watched(self, indices):
        out = get(self, indices)
        held.append(self.nbytes)
        return out

    monkeypatch.setattr(StreamingClips, "get", watched)
    runs = {}
    for name, extra in (("streamed", [f"data.memory_mb={cap_mb}"]), ("memory", ["data.streaming=false"])):
        cfg = load_config("tiny", overrides=[*overrides, *extra])
        runs[name] = train(cfg, data, run_dir=tmp_path / name, progress=False)
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["streamed"] == (name == "streamed") and summary["steps"] == 2
    assert held and max(held) <= cap_mb * 2 ** 20  # what the streaming store held stayed under the cap
    # the same batches, so the same run, weight for weight
    a, b = runs["streamed"].model.state_dict(), runs["memory"].model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("override, needle", [("data.streaming=sometimes", "data.streaming: must be auto, true or "
                                                                            "false"),
                                              ("data.memory_mb=0", "data.memory_mb: must be a number of MiB > 0"),
                                              ("data.cache_episodes=0", "data.cache_episodes: must be an integer >= 1")])
def test_bad_streaming_settings_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config("tiny", overrides=[override])
    assert load_config("tiny", overrides=["data.streaming=true"]).data.streaming is True
