"""Fixtures shared by several test modules."""
from __future__ import annotations

from pathlib import Path

import pytest

from hclsm.config import PhysicsDataConfig
from hclsm.data.physics import generate_physics_dataset


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A tiny generated physics dataset (4 episodes x 8 frames at 32 px, up to 4 balls), made once;
    tests only read it."""
    out = tmp_path_factory.mktemp("tiny-physics") / "physics"
    generate_physics_dataset(out, PhysicsDataConfig(episodes=4, frames=8, image_size=32, max_objects=4),
                             progress=False)
    return out
