"""SlotSSM benchmarks on our physics scenes (reduced CPU scale); the shared helpers are in ``hclsm.bench.slotssm``.

* ``video-prediction``: physics scenes rendered at 32 px; next-frame prediction with teacher forcing on
  20-frame clips; on held-out episodes 10 context frames then a 20-frame autoregressive rollout: per-pixel
  MSE (and summed over a frame's pixels) per step, beside copying the last context frame.
* ``ocl``: physics scenes (64 px, 3-6 balls) at 32 px; OC-SlotSSM and the SAVi-style baseline (matched
  parameter counts) train by reconstruction on 6-frame clips for the same budget; video-level and
  per-frame FG-ARI and Hungarian mIoU of the alpha masks on held-out 8-frame clips.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch


from hclsm.bench import BenchResult, register
from hclsm.bench.slotssm import LABELS, machine_facts, bench_threads, train_for
from hclsm.config.data import PhysicsDataConfig
from hclsm.config.model import DecoderConfig
from hclsm.data.physics import PhysicsSource, generate_physics_dataset
from hclsm.metrics import fg_ari, miou_hungarian
from hclsm.models.slot_baselines import SAVi, match_width, n_params
from hclsm.models.slot_tasks import VideoPredictor
from hclsm.models.slotssm import OCSlotSSM, OCSlotSSMConfig, resize_video

# ---- video prediction -----------------------------------------------------------------------------

CONTEXT, ROLLOUT, TRAIN_CLIP = 10, 20, 20


def load_physics(root: Path, episodes: range, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """video (N, T, 3, size, size) float in [0, 1] (area-resized) and masks (N, T, size, size) (nearest)."""
    source = PhysicsSource(root)
    eps = [source.load_episode(i) for i in episodes]
    video = torch.from_numpy(np.stack([e["video"] for e in eps])).permute(0, 1, 4, 2, 3).float() / 255
    mask = torch.from_numpy(np.stack([e["mask"] for e in eps]).astype(np.int64))
    if video.shape[-1] != size:
        video = resize_video(video, size)
        step = mask.shape[-1] // size
        mask = mask[..., step // 2::step, step // 2::step]
    return video, mask


@register("video-prediction")
def bench_video_prediction(quick: bool, seed: int) -> BenchResult:
    kinds = ("slotssm", "single_ssm") if quick else ("slotssm", "single_ssm", "slot_transformer", "slot_rnn")
    seconds = 12.0 if quick else 90.0
    n_train, n_val = (32, 8) if quick else (300, 48)
    d, batch, size = (16, 8, 32) if quick else (32, 16, 32)
    rows, metrics, curves = [], {}, {}
    with bench_threads(), tempfile.TemporaryDirectory(prefix="hclsm-bench-vp-") as tmp:
        machine = machine_facts()
        root = Path(tmp) / "physics"
        generate_physics_dataset(root, PhysicsDataConfig(episodes=n_train + n_val, frames=CONTEXT + ROLLOUT,
                                                         image_size=size, counterfactual=False, seed=seed),
                                 progress=not quick)
        video, _ = load_physics(root, range(n_train), size)
        val, _ = load_physics(root, range(n_train, n_train + n_val), size)
        torch.manual_seed(seed)
        reference = n_params(VideoPredictor("slotssm", size=size, d_model=d))
        truth = val[:, CONTEXT:]
        copy = ((val[:, CONTEXT - 1:CONTEXT] - truth) ** 2).mean((0, 2, 3, 4))  # (ROLLOUT,)
        for kind in kinds:
            w = d if kind == "slotssm" else match_width(lambda w, k=kind: VideoPredictor(k, size=size, d_model=w),
                                                        reference)
            torch.manual_seed(seed)
            model = VideoPredictor(kind, size=size, d_model=w)

            def loss_fn(gen: torch.Generator, model=model):
                idx = torch.randint(0, len(video), (batch,), generator=gen)
                t0 = int(torch.randint(0, video.shape[1] - TRAIN_CLIP + 1, (1,), generator=gen))
                return model.losses(video[idx, t0:t0 + TRAIN_CLIP])["frame"]

            info = train_for(model, loss_fn, seconds, 1e-3, seed, f"video {kind}", not quick)
            roll = torch.cat([model.rollout(val[i:i + 16, :CONTEXT], ROLLOUT) for i in range(0, len(val), 16)])
            per_step = ((roll - truth) ** 2).mean((0, 2, 3, 4))  # (ROLLOUT,)
            curves[kind] = per_step
            mse = float(per_step.mean())
            rows.append({"model": LABELS[kind], "params": n_params(model), "width": w, "steps": info["steps"],
                         "train_loss": info["final_loss"], "mse_20": mse, "mse_20_sum": mse * 3 * size * size,
                         "mse_step1": float(per_step[0]), "mse_step10": float(per_step[9]),
                         "mse_step20": float(per_step[-1])})
            metrics[f"{kind}_mse"] = mse
        rows.append({"model": "copy last context frame", "mse_20": float(copy.mean()),
                     "mse_20_sum": float(copy.mean()) * 3 * size * size, "mse_step1": float(copy[0]),
                     "mse_step20": float(copy[-1])})
        metrics["copy_last_mse"] = float(copy.mean())
        metrics["slotssm_beats_single_ssm"] = metrics["slotssm_mse"] < metrics["single_ssm_mse"]
        curves["copy_last"] = copy
        metrics["per_step_mse"] = {k: [round(float(v), 6) for v in c] for k, c in curves.items()}
    config = {"image_size": size, "context": CONTEXT, "rollout": ROLLOUT, "train_clip": TRAIN_CLIP,
              "train_episodes": n_train, "val_episodes": n_val, "seconds_per_model": seconds, "batch": batch,
              "d_model_slotssm": d, "slots": 6, "layers": 2, **machine}
    title = (f"video-prediction: physics scenes at {size} px, {CONTEXT} context frames -> {ROLLOUT}-frame "
             f"autoregressive rollout, {seconds:g} s of training per model (parameters matched); MSE per pixel "
             f"(mse_20_sum: summed over a frame's 3x{size}x{size} values)")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


# ---- object-centric learning ------------------------------------------------------------------------

def _oc_config(d: int, quick: bool) -> OCSlotSSMConfig:
    return OCSlotSSMConfig(image_size=32, patch_size=2, d_model=d, num_slots=7, layers=2, heads=4, cnn_layers=3,
                           decoder=DecoderConfig(hidden=32 if not quick else 16, layers=3, kernel=1, grid_size=8,
                                                 resolution=32, relative_positions=False))


@torch.no_grad()
def segmentation_scores(model: torch.nn.Module, video: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    preds = torch.cat([model(video[i:i + 16]).masks for i in range(0, len(video), 16)])  # (N, T, R, R)
    return {"fg_ari": fg_ari(mask, preds), "fg_ari_frame": fg_ari(mask, preds, per_frame=True),
            "miou": miou_hungarian(mask, preds)}


@register("ocl")
def bench_ocl(quick: bool, seed: int) -> BenchResult:
    seconds = 15.0 if quick else 200.0
    n_train, n_val = (24, 8) if quick else (300, 48)
    d, batch, clip = (16, 8, 4) if quick else (32, 16, 6)
    rows, metrics = [], {}
    with bench_threads(), tempfile.TemporaryDirectory(prefix="hclsm-bench-ocl-") as tmp:
        machine = machine_facts()
        root = Path(tmp) / "physics"
        generate_physics_dataset(root, PhysicsDataConfig(episodes=n_train + n_val, frames=16, image_size=64,
                                                         counterfactual=False, seed=seed), progress=not quick)
        video, _ = load_physics(root, range(n_train), 32)
        val, val_mask = load_physics(root, range(n_train, n_train + n_val), 32)
        val, val_mask = val[:, :8], val_mask[:, :8]
        cfg = _oc_config(d, quick)
        torch.manual_seed(seed)
        reference = n_params(OCSlotSSM(cfg))
        w = match_width(lambda w: SAVi(_oc_config(w, quick)), reference)
        for name, make in (("OC-SlotSSM", lambda: OCSlotSSM(cfg)), ("SAVi-style", lambda: SAVi(_oc_config(w, quick)))):
            torch.manual_seed(seed)
            model = make()

            def loss_fn(gen: torch.Generator, model=model):
                idx = torch.randint(0, len(video), (batch,), generator=gen)
                t0 = int(torch.randint(0, video.shape[1] - clip + 1, (1,), generator=gen))
                return model(video[idx, t0:t0 + clip]).losses["recon"]

            info = train_for(model, loss_fn, seconds, 1e-3, seed, f"ocl {name}", not quick)
            s = segmentation_scores(model, val, val_mask)
            rows.append({"model": name, "params": n_params(model), "width": model.cfg.d_model, "steps": info["steps"],
                         "recon_mse": info["final_loss"], "fg_ari": s["fg_ari"], "fg_ari_frame": s["fg_ari_frame"],
                         "miou": s["miou"]})
            key = "oc_slotssm" if name == "OC-SlotSSM" else "savi"
            metrics |= {f"{key}_{k}": v for k, v in s.items()} | {f"{key}_recon_mse": info["final_loss"]}
        metrics["oc_slotssm_ahead_fg_ari"] = metrics["oc_slotssm_fg_ari"] > metrics["savi_fg_ari"]
        metrics["oc_slotssm_ahead_miou"] = metrics["oc_slotssm_miou"] > metrics["savi_miou"]
    config = {"image_size": 32, "source_size": 64, "slots": 7, "train_clip": clip, "eval_clip": 8, "batch": batch,
              "seconds_per_model": seconds, "train_episodes": n_train, "val_episodes": n_val, **machine}
    title = (f"ocl: physics scenes (3-6 balls) at 32 px, OC-SlotSSM vs a SAVi-style model with matched parameters, "
             f"{seconds:g} s of reconstruction training each; FG-ARI (video-level and per frame) and mIoU of the "
             f"alpha masks on {n_val} held-out 8-frame clips")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
