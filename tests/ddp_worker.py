"""Run by ``tests/test_scale.py`` under ``torchrun`` (or alone): train the small real model with an EMA
target encoder for a few steps and write *this rank's* final weights to ``OUT/rank{RANK}.safetensors``,
so the test can compare the ranks with each other and with a single process."""
from __future__ import annotations

import os
import sys

from safetensors.torch import save_file

from hclsm.config import load_config
from hclsm.train import train
from tests.helpers import SMALL

data, out = sys.argv[1], sys.argv[2]
cfg = load_config("tiny", overrides=[*SMALL, "model.decoder.target=features", "model.decoder.resolution=16",
                                     "model.decoder.grid_size=16", "model.slots.query_noise=0",
                                     "model.slots.existence_start=1.0", "train.steps=3", "train.warmup_steps=1",
                                     "train.batch_size=4", "train.val_fraction=0", "train.device=cpu",
                                     "train.stage1_fraction=1.0", "data.clip.length=3"])
result = train(cfg, data, run_dir=os.path.join(out, "run"), progress=False)
state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
save_file(state, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.safetensors"))
