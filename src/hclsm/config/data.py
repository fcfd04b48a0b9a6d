"""Configs of the data generators and of clip sampling.

Each dataclass validates its own values in ``__post_init__`` and raises ``ConfigError`` naming the
field and the valid range, so a bad value fails at load time, not deep inside a generator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hclsm.config.model import check_max, check_min, check_seed
from hclsm.errors import ConfigError

VIDEO_CODECS = ("h264", "av1")
MAX_EPISODES = 1_000_000  # episode files are numbered with six digits (episode_000000)
MAX_EPISODE_FRAMES = 10_000  # an episode's frames (and masks) are held in memory until it is written
_EPISODES_WHY = "episode files are numbered with six digits"
_FRAMES_WHY = "an episode's frames are held in memory until it is written"


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {msg}")


@dataclass
class PushTDataConfig:
    """PushT episodes driven through the real gym-pusht simulator by a scripted, noisy pusher."""

    episodes: int = 50  # number of episodes to record
    max_steps: int = 100  # frames per episode (stops earlier when the task succeeds)
    image_size: int = 96  # rendered observation.image side (lerobot/pusht uses 96)
    action_noise: float = 6.0  # std (simulator px) of Gaussian noise added to each scripted action
    seed: int = 0  # episode i resets the env with seed + i
    codec: str = "h264"  # mp4 codec for observation.image: h264 (libx264) or av1 (SVT-AV1, as lerobot)

    def __post_init__(self) -> None:
        p = "data.pusht"
        check_max(self, p, MAX_EPISODES, _EPISODES_WHY, "episodes")
        check_min(self, p, 1, "episodes")
        check_max(self, p, MAX_EPISODE_FRAMES, _FRAMES_WHY, "max_steps")
        check_min(self, p, 2, "max_steps")
        check_min(self, p, 0.0, "action_noise")
        check_seed(self, p)
        _check(16 <= self.image_size <= 512 and self.image_size % 2 == 0, "data.pusht.image_size",
               f"must be an even number in [16, 512], got {self.image_size}")
        _check(self.codec in VIDEO_CODECS, "data.pusht.codec", f"must be one of {VIDEO_CODECS}, got {self.codec!r}")


@dataclass
class PhysicsDataConfig:
    """2-D ball scenes with collisions, springs and one-way follow forces, plus counterfactual twins."""

    episodes: int = 200  # number of factual episodes
    frames: int = 32  # frames per episode
    image_size: int = 64  # rendered frame side in pixels
    min_objects: int = 3  # objects per episode drawn uniformly from [min_objects, max_objects]
    max_objects: int = 6
    spring_prob: float = 0.2  # probability that an (unordered) pair is joined by a spring
    follow_prob: float = 0.3  # probability of each edge i -> j (i < j in a random order) of the follow DAG
    follow_strength: float = 1.0  # multiplies the follow forces' gain and their acceleration clip
    background: tuple[int, ...] = (40, 40, 40)  # RGB (0-255) of the empty frame (default dark grey)
    substeps: int = 10  # physics integration steps per rendered frame
    counterfactual: bool = True  # also store one intervened twin per episode
    seed: int = 0

    def __post_init__(self) -> None:
        p = "data.physics"
        check_max(self, p, MAX_EPISODES, _EPISODES_WHY, "episodes")
        check_min(self, p, 1, "episodes")
        check_max(self, p, MAX_EPISODE_FRAMES, _FRAMES_WHY, "frames")
        check_min(self, p, 2, "frames")
        check_max(self, p, 1000, "physics integration steps per rendered frame; 10 is already smooth", "substeps")
        check_min(self, p, 1, "substeps")
        check_seed(self, p)
        _check(16 <= self.image_size <= 256, "data.physics.image_size", f"must be in [16, 256], got {self.image_size}")
        _check(1 <= self.min_objects <= 10, "data.physics.min_objects", f"must be in [1, 10], got {self.min_objects}")
        _check(self.min_objects <= self.max_objects <= 10, "data.physics.max_objects",
               f"must be in [min_objects={self.min_objects}, 10], got {self.max_objects}")
        for name in ("spring_prob", "follow_prob"):
            prob = getattr(self, name)
            _check(0.0 <= prob <= 1.0, f"data.physics.{name}", f"must be a probability in [0, 1], got {prob}")
        _check(isinstance(self.follow_strength, (int, float)) and 0.0 < self.follow_strength <= 10.0,
               "data.physics.follow_strength", f"must be a number in (0, 10], got {self.follow_strength!r}")
        bg = self.background
        _check(isinstance(bg, (list, tuple)) and len(bg) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in bg),
               "data.physics.background", f"must be three integers in [0, 255] (RGB), got {bg!r}")
        self.background = tuple(bg)


@dataclass
class ClipConfig:
    """How training/eval clips are cut from episodes (windows never cross an episode boundary)."""

    length: int = 8  # frames per clip (T)
    frame_skip: int = 1  # take every k-th frame
    stride: int = 1  # step between consecutive window starts
    seed: int = 0  # shuffling seed

    def __post_init__(self) -> None:
        check_min(self, "data.clip", 1, "length", "frame_skip", "stride")
        check_seed(self, "data.clip")


@dataclass
class DataConfig:
    """The generators' configs, clip sampling, and where a run keeps its decoded frames.

    A run's clips come from memory (every episode decoded once, ``hclsm.data.memory.MemoryClips``) or are streamed
    (decoded when a batch needs them, ``hclsm.data.streaming.StreamingClips``); both give the same batches, so the
    choice changes speed and memory, never the run. ``streaming: auto`` streams when the decoded frames of the
    run's episodes (train and held-out) would take more than ``memory_mb``."""

    pusht: PushTDataConfig = field(default_factory=PushTDataConfig)
    physics: PhysicsDataConfig = field(default_factory=PhysicsDataConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    streaming: bool | str = "auto"  # auto, true (always stream) or false (always in memory)
    memory_mb: float = 8192.0  # MiB of decoded frames above which auto streams; also what a streaming split may cache
    cache_episodes: int = 16  # decoded episodes a streaming split keeps (least recently used dropped first)

    def __post_init__(self) -> None:
        _check(self.streaming in (True, False, "auto"), "data.streaming",
               f"must be auto, true or false, got {self.streaming!r}")
        _check(isinstance(self.memory_mb, (int, float)) and not isinstance(self.memory_mb, bool)
               and 0 < self.memory_mb < float("inf"), "data.memory_mb",
               f"must be a number of MiB > 0, got {self.memory_mb!r}")
        _check(isinstance(self.cache_episodes, int) and self.cache_episodes >= 1, "data.cache_episodes",
               f"must be an integer >= 1, got {self.cache_episodes!r}")
