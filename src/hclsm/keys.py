"""Batch keys: the one place their names are written.

A batch is a dict of tensors. Shapes below are for a batch (B, ...); a single clip drops the B.

======================  =========================  ===============================================
key                     shape / dtype              meaning
======================  =========================  ===============================================
``VIDEO``               (B, T, C, H, W) float32    frames in [0, 1]
``ACTION``              (B, T, A) float32          action taken at each frame (PushT: target xy)
``STATE``               (B, T, S) float32          proprioception (PushT: agent xy)
``MASK``                (B, T, H, W) int64         ground-truth object id per pixel, 0 = background
``POSITIONS``           (B, T, K, 2) float32       object centres in pixels (x, y)
``VELOCITIES``          (B, T, K, 2) float32       object velocities in pixels / frame
``OBJECTS``             (B, K) bool                which of the K object slots exist (padding = False)
``EVENTS``              (B, T) bool                a contact/collision happened during frame t
``GRAPH``               (B, K, K) float32          true interaction adjacency, [i, j] = i acts on j
``EPISODE``             (B,) int64                 episode index the clip came from
``FRAMES``              (B, T) int64               frame indices of the clip within its episode
======================  =========================  ===============================================
"""
from __future__ import annotations

VIDEO = "video"
ACTION = "action"
STATE = "state"
MASK = "mask"
POSITIONS = "positions"
VELOCITIES = "velocities"
OBJECTS = "objects"
EVENTS = "events"
GRAPH = "graph"
EPISODE = "episode_index"
FRAMES = "frame_index"

# PushT-only extras (from the simulator's ground truth).
BLOCK_POSE = "block_pose"  # (B, T, 3) x, y, angle in simulator units (pixels of the 512 canvas, rad)
CONTACT = "contact"  # (B, T) bool agent touches block during frame t
COVERAGE = "coverage"  # (B, T) float fraction of the goal region covered by the block
