"""Benchmarks of the SlotSSM paper at a reduced CPU scale: ``blinking`` and ``slotssm-latency`` here,
``video-prediction`` and ``ocl`` (on our physics scenes) in ``hclsm.bench.slotssm_scenes``; shared here: the
thread choice on a busy machine, machine facts and the training loop (``train_steps``: a budget counted in
optimizer steps, the same model whatever the machine's load).

* ``blinking``: Blinking Color Balls (``hclsm.data.blinking``; 16x16 images, 3 balls). Earliest Color
  with 5 context frames patchified to 80 (4x4 patches) steps, Most Frequent Color with 10
  frames at 1280 (2x1) steps (``--quick``: 80 only). SlotSSM, the single-state SSM, SlotTransformer and
  SlotRNN (parameter counts matched to SlotSSM's) train for the same number of steps per length with
  pixel-wise 7-way cross-entropy, plus the same cross-entropy averaged over the target's ball pixels only
  (at this tiny budget plain cross-entropy stays at "all background", 80 % of the pixels); the error is the pixel error on the target's ball pixels (and the share of balls whose
  majority-predicted colour is wrong), on held-out episodes, beside always predicting white balls at
  the true positions. Two diagnostics split the paper's two challenges (appendix B.3): ``ball_recall``
  (ball pixels predicted as some ball: positions) and ``masked_color_error`` (the colour decided among
  the ball classes at the true ball pixels: memory of the colour history), beside its chance level
  (every ball the most frequent target colour). A probe times one training step (batch 8) of SlotSSM
  and SlotTransformer at every length 80 ... 2560 and reports where SlotTransformer's attention runs out of memory: it
  materialises a (B, heads, T*K, T*K) score matrix, counted 3x for the backward, against half of this
  machine's memory (estimated, not allocated: allocating it would take the machine down).
* ``slotssm-latency``: inference latency of one step (batch 6, as in the paper) of SlotSSM and
  SlotTransformer after 80 ... 2560 steps, running ``step`` along one sequence (median of the 32 steps
  ending at each length, after a warm-up).
"""
from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from hclsm.bench import BenchResult, register
from hclsm.data.blinking import BACKGROUND, WHITE, BlinkingConfig, make_blinking, patchify
from hclsm.models.slot_baselines import SlotTransformer, match_width, n_params
from hclsm.models.slot_tasks import BlinkingClassifier, build_backbone

LABELS = {"slotssm": "SlotSSM", "single_ssm": "single-state SSM", "slot_transformer": "SlotTransformer",
          "slot_rnn": "SlotRNN"}


@contextlib.contextmanager
def bench_threads() -> Iterator[int]:
    """Threads for the benchmark's torch ops, the previous setting restored after: ``HCLSM_BENCH_THREADS``
    when set; else all CPUs, or 1 when the machine is already busy (1-minute load >= CPUs), because
    these small ops run several times slower on threads that fight other processes for the cores."""
    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = hasattr(os, "getloadavg") and os.getloadavg()[0] >= cpus
    torch.set_num_threads(int(os.environ.get("HCLSM_BENCH_THREADS", 1 if busy else cpus)))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def machine_facts() -> dict:
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    return {"machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_avg_1min": load}


def lr_scale(step: int, steps: int, warmup: int, min_lr_ratio: float) -> float:
    """Learning-rate factor of optimizer step ``step`` (0-based) of ``steps``: linear warmup over ``warmup`` steps,
    then a cosine from 1 down to ``min_lr_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(steps - 1 - warmup, 1)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))


def train_steps(model: torch.nn.Module, loss_fn: Callable[[torch.Generator], torch.Tensor], steps: int, lr: float,
                seed: int, desc: str, progress: bool, warmup: int = 100, min_lr_ratio: float = 0.01,
                weight_decay: float = 0.1) -> dict:
    """``steps`` optimizer steps (a budget counted in steps: a loaded machine trains the same model, only slower):
    AdamW (weight decay on matrices only, as in the paper) with ``warmup`` linear warmup steps, then a cosine decay
    to ``min_lr_ratio * lr`` (the object layer's schedule, ``hclsm.train``), gradient clipping at 1; a progress bar
    in steps. ``loss_fn(generator)`` draws a batch and returns its loss. Returns steps, seconds and the mean loss of
    the last 10 steps."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start, recent = time.perf_counter(), []
    warmup = max(1, min(warmup, steps // 10))
    for step in tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False):
        for g in opt.param_groups:
            g["lr"] = lr * lr_scale(step, steps, warmup, min_lr_ratio)
        loss = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-10:]
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start, "final_loss": float(np.mean(recent))}


# ---- blinking ------------------------------------------------------------------------------------

def _blinking_model(kind: str, cfg: BlinkingConfig, d: int) -> BlinkingClassifier:
    return BlinkingClassifier(kind, cfg.image_size, cfg.patch, cfg.context_frames, d_model=d, num_slots=6, layers=2,
                              heads=4, decoder_layers=2)


def attention_gigabytes(batch: int, length: int, slots: int = 6, heads: int = 4) -> float:
    """Memory (GB) of SlotTransformer's materialised causal attention scores over T*K tokens, x3 for backward."""
    return 3 * 4 * batch * heads * (length * slots) ** 2 / 1e9


def _memory_cap_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9 / 2
    except (ValueError, OSError, AttributeError):
        return 8.0


def scored_balls(data: dict, cfg: BlinkingConfig) -> Iterator[tuple[int, int, np.ndarray]]:
    """The balls scored in ``data``'s target images: (episode, target class, (H, W) bool of its visible pixels)
    for every ball that shows at least one pixel of its class."""
    c = np.arange(cfg.image_size) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    for j, target in enumerate(data["target"]):
        for (x, y), k in zip(data["positions"][j, -1], data["target_colors"][j]):
            sel = ((xx - x) ** 2 + (yy - y) ** 2 <= cfg.radius ** 2) & (target == k)
            if sel.any():
                yield j, int(k), sel


@torch.no_grad()
def blinking_errors(model: BlinkingClassifier, data: dict, cfg: BlinkingConfig, batch: int = 32) -> dict[str, float]:
    """Errors on held-out episodes, split by the paper's two challenges (appendix B.3):

    * ``error``: pixel error on the target's ball pixels; ``ball_color_error``: share of balls whose
      majority-predicted class over their visible pixels is wrong; ``pixel_error``: over all pixels.
    * position: ``ball_recall``, the share of ball pixels predicted as some ball (any class but background).
    * colour memory: ``masked_color_error``, the ball colour error with the decision taken among the six
      ball classes only (white and the five colours) at the ball's true pixels, i.e. given the positions.
    """
    wrong = fg = all_wrong = total = found = 0
    preds, colours = [], []
    for i in range(0, len(data["target"]), batch):
        logits = model(patchify(data["context"][i:i + batch], cfg.patch))  # (b, 7, H, W)
        pred = logits.argmax(1).numpy()  # (b, H, W)
        preds.append(pred)
        colours.append((logits[:, WHITE:].argmax(1) + WHITE).numpy())  # the best ball class at every pixel
        target = data["target"][i:i + batch]
        fgm = target != BACKGROUND
        wrong += int(((pred != target) & fgm).sum())
        found += int(((pred != BACKGROUND) & fgm).sum())
        fg += int(fgm.sum())
        all_wrong += int((pred != target).sum())
        total += target.size
    pred, colour = np.concatenate(preds), np.concatenate(colours)
    ball_wrong = masked_wrong = balls = 0
    for j, k, sel in scored_balls(data, cfg):
        ball_wrong += int(np.bincount(pred[j][sel], minlength=7).argmax() != k)
        masked_wrong += int(np.bincount(colour[j][sel], minlength=7).argmax() != k)
        balls += 1
    return {"error": wrong / max(fg, 1), "ball_color_error": ball_wrong / max(balls, 1),
            "pixel_error": all_wrong / max(total, 1), "ball_recall": found / max(fg, 1),
            "masked_color_error": masked_wrong / max(balls, 1)}


def visible_ball_classes(data: dict, cfg: BlinkingConfig) -> np.ndarray:
    """Target classes of the balls that show at least one pixel in their target image (those scored)."""
    return np.array([k for _, k, _ in scored_balls(data, cfg)], dtype=np.int64)


def color_chance(data: dict, cfg: BlinkingConfig) -> float:
    """``masked_color_error`` of a model that ignores the context's colours: every ball gets the most frequent
    target class of ``data``'s scored balls."""
    counts = np.bincount(visible_ball_classes(data, cfg), minlength=7)
    return float(1 - counts.max() / max(counts.sum(), 1))


def white_baseline(data: dict) -> float:
    """Ball-pixel error of predicting every ball white at its true position."""
    target = data["target"]
    fgm = target != BACKGROUND
    return float(((target != WHITE) & fgm).sum() / max(fgm.sum(), 1))


def _step_seconds(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.train()
    start = time.perf_counter()
    F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


# optimizer steps per model at each length (every model the same): about the minutes the earlier wall-clock budget
# gave (55 s per model at 80 and at 1280 steps); no model learns the colour memory at this scale (BENCHMARKS.md)
BLINKING_STEPS = {80: 300, 1280: 30}


@register("blinking")
def bench_blinking(quick: bool, seed: int) -> BenchResult:
    settings = [("earliest", 5, (4, 4), 20)] if quick else [("earliest", 5, (4, 4), BLINKING_STEPS[80]),
                                                           ("most_frequent", 10, (2, 1), BLINKING_STEPS[1280])]
    kinds = ("slotssm", "single_ssm", "slot_transformer", "slot_rnn")
    d, batch, n_train, n_eval = (16, 8, 256, 64) if quick else (32, 16, 4000, 256)
    cap = _memory_cap_gb()
    rows, metrics, widths = [], {}, {}
    progress = not quick
    with bench_threads():
        machine = machine_facts()
        for rule, frames, patch, steps in settings:
            cfg = BlinkingConfig(rule=rule, context_frames=frames, patch=patch, seed=seed)
            length = cfg.sequence_length
            train = make_blinking(cfg, n_train, progress=progress)
            test = make_blinking(cfg, n_eval, start=n_train)
            context, target = torch.from_numpy(train["context"]), torch.from_numpy(train["target"]).long()
            base, chance = white_baseline(test), color_chance(test, cfg)
            torch.manual_seed(seed)
            reference = n_params(_blinking_model("slotssm", cfg, d))
            for kind in kinds:
                if kind == "slot_transformer" and attention_gigabytes(batch, length) > cap:
                    rows.append({"length": length, "rule": rule, "model": LABELS[kind],
                                 "status": f"out of memory ({attention_gigabytes(batch, length):.0f} GB > {cap:.0f})"})
                    metrics[f"{kind}_error_{length}"] = None
                    continue
                w = d if kind == "slotssm" else match_width(lambda w, k=kind: _blinking_model(k, cfg, w), reference)
                widths[kind] = w
                torch.manual_seed(seed)
                model = _blinking_model(kind, cfg, w)

                def loss_fn(gen: torch.Generator, model=model, cfg=cfg, context=context, target=target):
                    idx = torch.randint(0, len(context), (batch,), generator=gen)
                    logits, y = model(patchify(context[idx], cfg.patch)), target[idx]
                    pixel = F.cross_entropy(logits, y, reduction="none")  # (b, H, W)
                    balls = (y != BACKGROUND).float()
                    return pixel.mean() + (pixel * balls).sum() / balls.sum().clamp_min(1)

                info = train_steps(model, loss_fn, steps, 1e-3, seed, f"blinking {kind} L={length}", progress,
                                   warmup=20)
                err = blinking_errors(model, test, cfg)
                rows.append({"length": length, "rule": rule, "model": LABELS[kind], "params": n_params(model),
                             "width": w, "steps": info["steps"], "minutes": round(info["seconds"] / 60, 2),
                             "error": err["error"],
                             "ball_color_error": err["ball_color_error"], "pixel_error": err["pixel_error"],
                             "ball_recall": err["ball_recall"], "masked_color_error": err["masked_color_error"],
                             "status": "ok"})
                for key in ("error", "ball_color_error", "pixel_error", "ball_recall", "masked_color_error"):
                    metrics[f"{kind}_{key}_{length}"] = err[key]
            white_colour = float(np.mean(visible_ball_classes(test, cfg) != WHITE))
            rows.append({"length": length, "rule": rule, "model": "white balls at the true positions", "error": base,
                         "ball_color_error": white_colour, "ball_recall": 1.0, "masked_color_error": white_colour})
            rows.append({"length": length, "rule": rule, "model": "most frequent colour (chance)",
                         "masked_color_error": chance})
            metrics[f"white_baseline_{length}"] = base
            metrics[f"white_ball_color_error_{length}"] = white_colour
            metrics[f"color_chance_{length}"] = chance
        longest = max(BlinkingConfig(context_frames=f, patch=p).sequence_length for _, f, p, _ in settings)
        rivals = [metrics.get(f"{k}_error_{longest}") for k in kinds[1:]]
        metrics["longest_length"] = longest
        metrics["slotssm_best_at_longest"] = all(r is None or metrics[f"slotssm_error_{longest}"] <= r for r in rivals)

        # probe: one training step (batch 8) of SlotSSM and SlotTransformer at every length of the paper
        probe_lengths = [(5, (4, 4)), (5, (4, 2))] if quick else [(5, (4, 4)), (5, (4, 2)), (5, (2, 2)), (5, (2, 1)),
                                                                   (10, (2, 1)), (10, (1, 1))]
        probe = {}
        for frames, patch in probe_lengths:
            cfg = BlinkingConfig(context_frames=frames, patch=patch, seed=seed)
            length = cfg.sequence_length
            data = make_blinking(cfg, 8)
            x, y = patchify(data["context"], patch), torch.from_numpy(data["target"]).long()
            for kind in ("slotssm", "slot_transformer"):
                gb = attention_gigabytes(8, length) if kind == "slot_transformer" else 0.0
                if gb > cap:
                    probe[(kind, length)] = f"OOM ({gb:.0f} GB)"
                    continue
                torch.manual_seed(seed)
                probe[(kind, length)] = _step_seconds(_blinking_model(kind, cfg, widths.get(kind, d)), x, y)
        for length in sorted({k[1] for k in probe}):
            row = {"length": length, "rule": "probe: s per train step (batch 8)"}
            for kind in ("slotssm", "slot_transformer"):
                row[LABELS[kind]] = probe[(kind, length)]
                if isinstance(probe[(kind, length)], float):
                    metrics[f"{kind}_step_s_{length}"] = probe[(kind, length)]
            rows.append(row)
        fails = [length for (kind, length), v in probe.items() if kind == "slot_transformer" and isinstance(v, str)]
        metrics["slot_transformer_oom_length"] = min(fails) if fails else None
    config = {"image_size": 16, "balls": 3, "d_model_slotssm": d, "slots": 6, "layers": 2, "batch": batch,
              "train_episodes": n_train, "eval_episodes": n_eval, "memory_cap_gb": round(cap, 1),
              "steps_per_model": {BlinkingConfig(context_frames=f, patch=p).sequence_length: n
                                  for _, f, p, n in settings}, "widths": widths, **machine}
    title = (f"blinking: Blinking Color Balls (16 px, 3 balls), {n_train} training episodes per length, the same "
             f"number of optimizer steps per model; error = pixel error on the target's balls (held-out {n_eval})")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


# ---- latency -----------------------------------------------------------------------------------

@torch.no_grad()
def step_latencies(model: torch.nn.Module, lengths: list[int], batch: int, tokens: int, d_in: int, window: int,
                   progress: bool, desc: str) -> dict[int, float]:
    """Median seconds of the ``window`` steps ending at each length, along one sequence of max(lengths) steps
    (after a discarded warm-up sequence of ``2 * window`` steps: allocator and first-call costs)."""
    model.eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, d_in, generator=gen)
    state = model.init_state(batch)
    for _ in range(2 * window):
        _, state = model.step(x, state)
    state = model.init_state(batch)
    times, out = [], {}
    for t in tqdm(range(1, max(lengths) + 1), desc=desc, unit="step", disable=not progress, leave=False):
        start = time.perf_counter()
        _, state = model.step(x, state)
        times.append(time.perf_counter() - start)
        if t in lengths:
            out[t] = float(np.median(times[-window:]))
    return out


@register("slotssm-latency")
def bench_latency(quick: bool, seed: int) -> BenchResult:
    lengths = [80, 160, 320, 640] if quick else [80, 160, 320, 640, 1280, 2560]
    batch, d, tokens, window = 6, 64, 4, 32
    rows, metrics, lat = [], {}, {}
    with bench_threads():
        machine = machine_facts()
        torch.manual_seed(seed)
        models = {"slotssm": build_backbone("slotssm", d, d, 6, 2, 4)}
        models["slot_transformer"] = SlotTransformer(d, match_width(lambda w: SlotTransformer(d, w, 6, 2, 4),
                                                                    n_params(models["slotssm"])), 6, 2, 4)
        for kind, model in models.items():
            lat[kind] = step_latencies(model, lengths, batch, tokens, d, window, not quick, f"latency {kind}")
        for length in lengths:
            rows.append({"length": length, **{f"{LABELS[k]} ms/step": 1000 * lat[k][length] for k in models}})
        for kind in models:
            metrics |= {f"{kind}_ms_{n}": 1000 * lat[kind][n] for n in lengths}
            metrics[f"{kind}_growth"] = lat[kind][lengths[-1]] / lat[kind][lengths[0]]
        metrics["slotssm_flat_within_20pct"] = bool(abs(metrics["slotssm_growth"] - 1) <= 0.2)
        metrics["params"] = {k: n_params(m) for k, m in models.items()}
    config = {"batch": batch, "d_model": d, "slots": 6, "layers": 2, "tokens_per_step": tokens, "window": window,
              "lengths": lengths, **machine}
    title = (f"slotssm-latency: inference ms per step (batch {batch}, median of the {window} steps ending at each "
             f"length) along one sequence; SlotSSM's recurrent state vs SlotTransformer's growing cache")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)

