"""Run by ``tests/test_scale.py`` under ``torchrun`` (or alone): train the small real model with an EMA
target encoder for a few steps (``python tests/ddp_worker.py DATA OUT [ddp|fsdp]``) and write *this
rank's* final weights to ``OUT/rank{RANK}.safetensors``, so the test can compare the ranks with each
other and with a single process (``python tests/ddp_worker.py DATA OUT [ddp|fsdp] [OVERRIDE ...]``). Under FSDP a rank holds only shards: the run's checkpoints (gathered
by rank 0) are what is compared. Further arguments are config overrides (``train.accumulate=2``)."""
from __future__ import annotations

import os
import sys

from safetensors.torch import save_file

from hclsm.config import load_config
from hclsm.train import train
from tests.helpers import SMALL

data, out = sys.argv[1], sys.argv[2]
parallel = sys.argv[3] if len(sys.argv) > 3 else "ddp"
cfg = load_config("tiny", overrides=[*SMALL, "model.decoder.target=features", "model.decoder.resolution=16",
                                     "model.decoder.grid_size=16", "model.slots.query_noise=0",
                                     "model.slots.existence_start=1.0", "train.steps=3", "train.warmup_steps=1",
                                     "train.batch_size=4", "train.val_fraction=0", "train.device=cpu",
                                     "train.stage1_fraction=1.0", "data.clip.length=3", "train.ckpt_every=1",
                                     f"train.parallel={parallel}", *sys.argv[4:]])
result = train(cfg, data, run_dir=os.path.join(out, "run"), progress=False)
if parallel == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.exit(0)
state = {k: v.detach().contiguous().clone() for k, v in result.model.state_dict().items()}
save_file(state, os.path.join(out, f"rank{os.environ.get('RANK', '0')}.safetensors"))
