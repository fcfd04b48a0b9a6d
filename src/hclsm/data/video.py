"""MP4 video read/write with PyAV.

Frames are uint8 (T, H, W, 3) RGB. Presentation timestamps are ``frame_number / fps`` exactly
(time base 1/fps), which is how LeRobot v3 addresses a frame inside a file that concatenates many
episodes: ``from_timestamp + timestamp``.

``decode_frames`` seeks once to the first requested timestamp and decodes forward until the last, so
a clip costs one decode pass, not one seek per frame.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from hclsm.errors import DataError

# codec name in config -> (PyAV encoder, encoder options). Small GOPs keep seeking cheap.
_ENCODERS = {
    "h264": ("libx264", {"crf": "12", "preset": "veryfast", "g": "10", "bf": "0"}),
    "av1": ("libsvtav1", {"crf": "20", "g": "10", "preset": "10"}),
}


def encode_video(path: str | os.PathLike, frames: np.ndarray, fps: int, codec: str = "h264") -> None:
    """Encode uint8 RGB frames (T, H, W, 3) to an mp4 at ``fps`` with yuv420p pixels."""
    frames = np.ascontiguousarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"encode_video expects uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    encoder, options = _ENCODERS[codec]
    os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints a banner to stderr at level >= 2
    _, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(encoder, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_frames(path: str | os.PathLike, timestamps: np.ndarray, tolerance_s: float = 1e-4) -> np.ndarray:
    """Decode the frames at ``timestamps`` (seconds, any order) from an mp4; returns (N, H, W, 3) uint8.

    One seek to the earliest timestamp, then a forward decode to the latest. Raises ``DataError`` if
    the file is missing/corrupt or a timestamp has no frame within ``tolerance_s``.
    """
    path = Path(path)
    ts = np.asarray(timestamps, dtype=np.float64)
    if not path.is_file():
        raise DataError(f"video file {path} is missing; re-create the dataset or check the path")
    want = np.unique(ts)
    found: dict[float, np.ndarray] = {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            tb = float(stream.time_base)
            container.seek(int(want[0] / tb), stream=stream, backward=True, any_frame=False)
            j = 0  # next wanted timestamp
            for frame in container.decode(stream):
                t = frame.pts * tb
                while j < len(want) and want[j] < t - tolerance_s:
                    j += 1  # skipped past it: no frame close enough
                if j < len(want) and abs(t - want[j]) <= tolerance_s:
                    found[want[j]] = frame.to_ndarray(format="rgb24")
                    j += 1
                if j >= len(want) or t > want[-1] + tolerance_s:
                    break
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise DataError(f"cannot decode video {path} ({e.__class__.__name__}: {e}); the file is corrupt or "
                        f"truncated, re-create the dataset") from None
    missing = [t for t in want if t not in found]
    if missing:
        raise DataError(f"video {path} has no frame at t={missing[0]:.4f}s (asked {len(missing)} missing of "
                        f"{len(want)}); the file is truncated or does not match meta/episodes, re-create it")
    return np.stack([found[t] for t in ts])


def probe_video(path: str | os.PathLike) -> dict:
    """Basic facts of a video file: frames, fps, width, height, codec (for checks and info.json)."""
    try:
        with av.open(str(path)) as container:
            s = container.streams.video[0]
            return {"frames": s.frames, "fps": float(s.average_rate or 0), "width": s.codec_context.width,
                    "height": s.codec_context.height, "codec": s.codec_context.name}
    except (av.error.FFmpegError, OSError) as e:
        raise DataError(f"cannot open video {path} ({e}); the file is corrupt, re-create the dataset") from None
