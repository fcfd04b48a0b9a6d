"""Fixtures shared by several test modules."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hclsm.config import PhysicsDataConfig
from hclsm.data.physics import generate_physics_dataset


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, whatever ran before it: a test that draws unseeded
    random inputs sees the same ones in any order or selection of tests."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A tiny generated physics dataset (4 episodes x 8 frames at 32 px, up to 4 balls), made once;
    tests only read it."""
    out = tmp_path_factory.mktemp("tiny-physics") / "physics"
    generate_physics_dataset(out, PhysicsDataConfig(episodes=4, frames=8, image_size=32, max_objects=4),
                             progress=False)
    return out
