"""``hclsm demo``: the main job, end to end on CPU.

1. **Data.** PushT episodes from the real gym-pusht simulator (``cfg.data.pusht``; the command starts their env seeds
   at ``hclsm.assets.PUSHT_FRESH_SEED``, ``DEMO_DEFAULTS``, so the shipped object layers never saw them), written as a
   LeRobot v3 dataset in ``data/pusht/``, with a picture of frames and ground-truth masks.
2. **HCLSM, both stages** (``hclsm.train.train_two_stages``), counted in steps (``--steps S1 S2``, default
   ``DEFAULT_STEPS``), so a loaded machine trains the same model as a quiet one. Stage 1 starts from the PushT
   object layers shipped in the package (``hclsm.assets``, ``SHIPPED``: thousands of steps that two cores cannot
   give in a demo) and continues them on the demo's data, or from scratch with ``--from-scratch``: stage 1 (the object layers:
   perception, slot attention with existence / birth / death, the spatial broadcast decoder) on
   ``TRAIN_CLIP``-frame clips, then stage 2 (the hierarchical dynamics with JEPA prediction and the event
   detector, on top of the stage-1 losses) on ``data.clip.length``-frame clips. The runs (config, logs,
   TensorBoard, checkpoint, summary) are ``train/stage1/`` and ``train/stage2/``.
3. **Evaluation on held-out episodes** (``hclsm.demo.evaluate``; the training loop's own split, ``train.val_fraction`` and
   ``train.seed``). Objects, on the ``data.clip.length``-frame clips: agent and block IoU against the
   simulator's masks, FG-ARI and mIoU, how peaked the alpha masks are, the SBD and diversity losses beside
   the seed's indicators (< 0.01, < 0.15), and the number of alive slots against the number of visible
   objects. Dynamics, on up to ``DYNAMICS_CLIPS`` clips of ``EVENT_CLIP`` frames: the stage-2 prediction
   losses in eval mode (JEPA beside the seed's 0.008-0.01), rollouts against the copy-last baselines
   (frames and slots), and the event detector against the contact onsets (events per 16-frame clip beside
   the seed's 2-3; precision / recall / F1). The same model untrained (step 0, same initialisation) is
   the baseline.
4. **Report.** ``report.md`` with the metrics, pictures (slot masks over frames for two held-out clips,
   segmentation against ground truth, alpha heat maps, alive slots per frame, a rollout against the true
   frames, the event timeline with the contact onsets, the PCA of slot trajectories) and a plain
   statement of which stages ran; ``metrics.json`` has every number.
5. **Planning.** MPPI with the trained model and random actions from ``evaluate.PLAN_EPISODES`` held-out start
   states in the real PushT simulator (the ``hclsm plan`` protocol with a cheaper planner; ``plan/`` holds a GIF
   of each policy's first episode); skipped, with the reason in the report, when no held-out episode is long
   enough for a goal.

Everything is written into a temporary directory renamed to ``OUT/NAME`` at the end
(``atomic_output_dir``): a failure or Ctrl-C leaves no half-written run, and an earlier run of the
same name is replaced only by a complete one.
"""
from __future__ import annotations

import dataclasses
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from hclsm import keys
from hclsm.assets import PUSHT_FRESH_SEED
from hclsm.config import PUSHT_RECIPE, Config, save_config
from hclsm.config.model import INT64_MAX, show
from hclsm.data.lerobot_read import LeRobotSource
from hclsm.data.pusht import generate_pusht_dataset
from hclsm.demo.evaluate import (
    DYNAMICS_CLIPS,
    demo_planning,
    draw_figures,
    dynamics_clips,
    dynamics_metrics,
    heldout_clips,
    heldout_metrics,
    rollout_split,
    spread_batches,
)
from hclsm.demo.report import SEED_DIVERSITY, SEED_EVENTS, SEED_JEPA, SEED_SBD, render_report
from hclsm.errors import HclsmError
from hclsm.models import build_model
from hclsm.train import TrainResult, train_two_stages
from hclsm.train.data import run_split
from hclsm.train.loop import seed_everything
from hclsm.utils.atomic import atomic_output_dir, atomic_write_text
from hclsm.utils.jsonsafe import finite_or_none
from hclsm.viz import (
    frame_strip,
    overlay,
    save_png,
    to_uint8_frames,
)

DEFAULT_STEPS = (300, 100)  # (stage-1, stage-2) training steps when --steps is not given
SHIPPED = "pusht_objects_tiny"  # the shipped object layers stage 1 starts from (hclsm.assets)
SHIPPED_STEPS, SHIPPED_COMMAND = 8000, "HCLSM_BENCH_KEEP=DIR hclsm bench objects-pusht"  # how they were trained
# the demo's settings under the user's: PushT's recipe, and episodes the shipped object layers never saw (training or
# held-out), so its held-out figures measure them on new episodes
DEMO_DEFAULTS = (*PUSHT_RECIPE, f"data.pusht.seed={PUSHT_FRESH_SEED}")
TRAIN_CLIP = 4  # frames per stage-1 training clip (at most data.clip.length); stage 2 uses data.clip.length


def check_run_name(name: str) -> None:
    """A run name is one plain directory name (it is replaced on every run, so never a path)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise HclsmError(f"--name {name!r} is not a plain directory name; use e.g. --name demo "
                         f"(the run directory OUT/NAME is replaced on every run)")


def demo_steps(steps: tuple[int, int] | None = None) -> tuple[int, int]:
    """The (stage-1, stage-2) training steps: ``steps``, else ``DEFAULT_STEPS``."""
    if steps is None:
        return DEFAULT_STEPS
    if len(steps) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= INT64_MAX
                                  for n in steps):
        raise HclsmError(f"--steps needs two positive step counts below 2^63 (stage 1, stage 2), e.g. --steps 300 "
                         f"100; got {' '.join(map(show, steps))}")
    return int(steps[0]), int(steps[1])


def demo_config(cfg: Config) -> Config:
    """``cfg`` checked for the demo.

    Raises ``HclsmError`` when nothing can be held out for evaluation (fewer than two episodes, or
    ``train.val_fraction`` = 0), for a model other than HCLSM, or when stage 2 has nothing to predict
    (``data.clip.length`` < 2).
    """
    if cfg.data.pusht.episodes < 2 or cfg.train.val_fraction <= 0:
        raise HclsmError(f"the demo evaluates on held-out episodes: it needs data.pusht.episodes >= 2 (got "
                         f"{cfg.data.pusht.episodes}) and train.val_fraction > 0 (got {cfg.train.val_fraction})")
    if cfg.model.name != "hclsm":
        raise HclsmError(f"the demo trains HCLSM: model.name must be 'hclsm', got {cfg.model.name!r}")
    if cfg.data.clip.length < 2:
        raise HclsmError(f"the demo's stage 2 predicts the next frame: data.clip.length must be >= 2, got "
                         f"{cfg.data.clip.length}")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, stage=1))


# ---- the demo -----------------------------------------------------------------------------------

def _relocate_paths(summary_path: Path, old: Path, new: Path) -> None:
    """Rewrite paths under ``old`` (the temporary directory) to ``new`` in a training run's summary."""
    s = json.loads(summary_path.read_text())
    for k, v in s.items():
        if isinstance(v, str) and v.startswith(str(old)):
            s[k] = str(new) + v[len(str(old)):]
    atomic_write_text(summary_path, json.dumps(s, indent=2) + "\n")


def _run_facts(result: TrainResult, clip_length: int) -> dict[str, object]:
    """What the report says about one training run on clips of ``clip_length`` frames."""
    return {"steps": result.steps, "seconds": result.seconds, "stopped": result.stopped, "skipped": result.skipped,
            "final_losses": result.losses, "clip_length": clip_length}


def _shipped_start(cfg: Config) -> torch.nn.Module:
    """The model stage 1 starts from: built as ``train`` would build it, with the shipped object layers."""
    from hclsm.assets import load_object_layers

    seed_everything(cfg.train.seed)
    model = build_model(cfg.model)
    load_object_layers(model, SHIPPED)  # HclsmError naming the field when the config does not fit them
    return model


def run_demo(cfg: Config, name: str = "demo", out_root: str | Path = "runs", progress: bool = True,
             steps: tuple[int, int] | None = None, from_scratch: bool = False) -> Path:
    """Run the demo into ``out_root/name`` (replaced if it exists); returns the report path.

    ``steps`` = (stage-1, stage-2) training steps (see ``demo_steps``); ``from_scratch``: stage 1 starts from a
    new model instead of the shipped object layers (``SHIPPED``). Raises ``HclsmError`` for a bad name, step counts
    or config (one the shipped layers do not fit, without ``from_scratch``) before anything is written.

    ``metrics.json``: ``trained`` / ``untrained`` (object and dynamics metrics, ``heldout_metrics`` and
    ``dynamics_metrics``), ``train`` (the planned steps, the parameter count and stage 1's run: steps, seconds,
    why it stopped, skipped steps, final losses; ``train.stage2`` the same for stage 2), ``dynamics`` (the
    held-out dynamics clips: how many, their length, rollout context and horizon), ``planning``
    (``evaluate.demo_planning``: results per policy, or why it was skipped), the figures' contents,
    the seed's indicators, timings and the machine.
    """
    check_run_name(name)  # before anything is generated or replaced
    steps = demo_steps(steps)
    cfg = demo_config(cfg)
    start_model = None if from_scratch else _shipped_start(cfg)
    start = ({"from": "scratch"} if from_scratch else
             {"from": SHIPPED, "steps": SHIPPED_STEPS, "command": SHIPPED_COMMAND})
    final = Path(out_root) / name
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with atomic_output_dir(final, overwrite=True) as run:
        # 1. data
        data_dir = run / "data" / "pusht"
        summary = generate_pusht_dataset(data_dir, cfg.data.pusht, progress=progress)
        source = LeRobotSource(data_dir)
        rows = []
        for ep in range(min(3, len(source))):
            n = source.episode_lengths[ep]
            clip = source.load_clip(ep, np.linspace(0, n - 1, 8).round().astype(int))
            frames = to_uint8_frames(clip[keys.VIDEO])
            rows += [frames, overlay(frames, clip[keys.MASK].numpy())]
        save_png(frame_strip(rows), run / "pusht_frames_and_masks.png")
        save_config(cfg, run / "config.yaml")
        (run / "data_summary.json").write_text(json.dumps(summary, indent=2))
        seconds["data"] = time.perf_counter() - t0

        # 2. the baseline (the same model untrained: train() seeds and builds it identically), then both stages
        t = time.perf_counter()
        _, val_eps = run_split(len(source), cfg)
        clips = heldout_clips(source, cfg, val_eps)
        dyn_clips = dynamics_clips(source, cfg, val_eps)
        dyn_batches = spread_batches(dyn_clips, DYNAMICS_CLIPS)
        seed_everything(cfg.train.seed)
        baseline = build_model(cfg.model)
        untrained = heldout_metrics(baseline, clips) | dynamics_metrics(baseline, dyn_batches)
        seconds["baseline"] = time.perf_counter() - t
        t = time.perf_counter()
        stage1, stage2 = train_two_stages(cfg, data_dir, run / "train", steps, stage1_clip=TRAIN_CLIP,
                                          progress=progress, model=start_model)
        for result in (stage1, stage2):
            _relocate_paths(result.run_dir / "summary.json", run, final)
        seconds["train"] = time.perf_counter() - t  # both stages, with their data loading

        # 3. evaluation and pictures
        t = time.perf_counter()
        model = stage2.model.cpu().eval()
        trained = heldout_metrics(model, clips) | dynamics_metrics(model, dyn_batches)
        shown = draw_figures(model, source, cfg, val_eps, clips, dyn_clips, run)
        seconds["evaluation"] = time.perf_counter() - t
        t = time.perf_counter()
        planning = demo_planning(model, source, val_eps, run / "plan", cfg.train.seed, progress)
        seconds["planning"] = time.perf_counter() - t
        seconds["total"] = time.perf_counter() - t0

        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        length = dyn_clips.clip.length
        context, horizon = rollout_split(length)
        record = {"start": start, "trained": trained, "untrained": untrained,
                  "train": {"planned_steps": list(steps), "parameters": n_params, **_run_facts(stage1, min(TRAIN_CLIP, cfg.data.clip.length)),
                            "stage2": _run_facts(stage2, cfg.data.clip.length)},
                  "val_episodes": val_eps, "clips": len(clips), "eval_clip_length": cfg.data.clip.length,
                  "dynamics": {"clips": sum(len(b[keys.VIDEO]) for b in dyn_batches), "of_clips": len(dyn_clips),
                               "clip_length": length, "context": context, "horizon": horizon},
                  "figures": shown, "planning": planning, "seconds": seconds,
                  "indicators": {"sbd": SEED_SBD, "diversity": SEED_DIVERSITY, "jepa": list(SEED_JEPA),
                                 "events_per_16_frames": list(SEED_EVENTS)},
                  "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}}
        (run / "metrics.json").write_text(json.dumps(finite_or_none(record), indent=2, allow_nan=False) + "\n")
        (run / "report.md").write_text(render_report(cfg, summary, record))
    return final / "report.md"
