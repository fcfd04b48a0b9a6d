"""``hclsm bench cjepa``: does hiding objects in training (C-JEPA) make a slot predictor answer counterfactual
questions better, and what do the CTT losses add on a real graph?

Slots come from the frozen object model shipped with hclsm (``hclsm.assets``, objects_tiny: FG-ARI 0.92
on these scenes); each object's state is its slot vector and position. Training: every 10-frame window
(4 read, 6 predicted; the position weighs as much as the slot vector in the losses; a hidden object's
first two frames stay visible, ``visible`` = 2, chosen on a development question set of test seed 1010)
of 300 factual physics episodes (seed 0, 3-6 balls, 64 px). Questions: the twins of 600 fresh episodes, answered by
rolling each predictor forward from the intervened history and reading positions with a probe trained on
factual slots only (``hclsm.eval.cjepa``).

``--seed S`` draws the test scenes with seed 1000 + S (a fresh question set per S) and trains every row
with seeds S, S + 1, S + 2; mean ± std over those. Rows:
no masking (|M| = 0, the plain slot predictor), C-JEPA with |M| = 1, 2, 4, and C-JEPA (|M| = 2) + CTT
on the attention graph and on the learned graph (the predictor's attention gated by a causal graph).
|M| = 2 for the CTT rows was fixed before any run (the CTT fork's setting), not picked on results. The
learned graph's l1 weight is ``CJEPAConfig``'s 0.001: the video model's 0.01 left no edge on the development
histories. With ``position_dims`` = 2 the learned graph also reads each pair's geometry (relative position and
velocity, distance, approach rate; ``hclsm.nn.causal``): on the development questions, CTT on the learned graph
scored 0.649 ± 0.004 with it and 0.642 ± 0.008 without (|M| = 2 alone: 0.635 ± 0.007; predictor seeds 0-2).
Each row's graph (the learned one, else the attention graph) is also scored on the question histories against
the simulator's springs and follow forces (``hclsm.eval.cjepa.graph_scores``) and against the pairs that touch
in the predicted frames.
Brackets: the factual shortcut (50 % by construction), the last history frame frozen, constant
velocity, and the object model's own slots of the true future (the ceiling of probe and encoder).

Runs on the GPU when there is one (``config.device``).
"""
from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from hclsm.assets import pretrained_decomposer
from hclsm.bench import BenchResult, register
from hclsm.config.cjepa import CJEPAConfig, CTTConfig
from hclsm.config.data import PhysicsDataConfig
from hclsm.data.physics import PhysicsSource, generate_physics_dataset
from hclsm.data.slots import SlotSequences
from hclsm.eval.cjepa import (
    PositionProbe, QuestionSet, answer, baseline_reads, build_questions, encode_episodes, factual_answers, fit_probe,
    graph_scores, read_positions,
)
from hclsm.models.cjepa import attention_graph, learned_graph
from hclsm.train.cjepa import train_cjepa

CTT = CTTConfig(inv_weight=0.2, suf_weight=0.1)  # the CTT fork's weights; start after a third of the epochs


def rows(epochs: int) -> list[tuple[str, str, dict]]:
    """(key, label, config overrides) of every trained row."""
    ctt = replace(CTT, start_epoch=epochs // 3)
    return [("no_mask", "no masking (|M|=0)", {"masked": 0}),
            ("m1", "C-JEPA |M|=1", {"masked": 1}),
            ("m2", "C-JEPA |M|=2", {"masked": 2}),
            ("m4", "C-JEPA |M|=4", {"masked": 4}),
            ("ctt_attention", "C-JEPA |M|=2 + CTT (attention graph)", {"masked": 2, "ctt": ctt}),
            ("ctt_learned", "C-JEPA |M|=2 + CTT (learned graph)",
             {"masked": 2, "graph_gate": True, "ctt": replace(ctt, graph="learned")})]


# table columns of the trained rows (every figure is also in the metrics, with its std): the graph columns are
# the graph the row's CTT losses read (or would: the attention graph for the rows without CTT), its density over
# training and on the test histories, the share of its test edges the simulator's graph has (chance = the true
# density) and the share of the pairs that touch in the predicted frames it joins (chance = its test density)
COLUMNS = {"accuracy": "accuracy", "where_accuracy": "where", "collide_accuracy": "collide",
           "where_error_px": "where err px", "graph_density": "density (train)",
           "graph_density_matched": "density (test)", "graph_precision": "precision vs sim",
           "graph_contact_recall": "contact recall"}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


@dataclass
class Prepared:
    """What every row shares: the training slots, the question set, the probe."""

    train: SlotSequences
    questions: QuestionSet
    probe: PositionProbe
    probe_error_px: float
    seconds: float


def prepare(n_train: int, n_test: int, base: CJEPAConfig, device: str, progress: bool, probe_steps: int = 3000,
            test_seed: int = 1000) -> Prepared:
    """Generate the training and test scenes, encode them with the frozen object model, fit the probe on
    factual training slots and build the balanced questions on the test twins."""
    t0 = time.perf_counter()
    net = pretrained_decomposer("objects_tiny")
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-cjepa-") as tmp:
        train_root, test_root = Path(tmp) / "train", Path(tmp) / "test"
        generate_physics_dataset(train_root, PhysicsDataConfig(episodes=n_train, seed=0, counterfactual=False),
                                 progress=progress)
        generate_physics_dataset(test_root, PhysicsDataConfig(episodes=n_test, seed=test_seed), progress=progress)
        train_src, test_src = PhysicsSource(train_root), PhysicsSource(test_root, counterfactual=True)
        train_seqs, train_centres = encode_episodes(net, train_src, list(range(n_train)), device=device,
                                                    progress=progress)
        twin_seqs, twin_centres = encode_episodes(net, test_src, list(range(n_test)), counterfactual=True,
                                                  device=device, progress=progress)
        positions = [train_src.load_episode(e)["positions"] for e in range(n_train)]
        size = int(train_src.meta["image_size"])
        probe, probe_err = fit_probe(train_seqs, train_centres, positions, size, steps=probe_steps, seed=0)
        qs = build_questions(twin_seqs, twin_centres, test_src, list(range(n_test)), base.history, base.future)
    return Prepared(train_seqs, qs, probe, probe_err, time.perf_counter() - t0)


def score(prep: Prepared, cfg: CJEPAConfig, device: str, progress: bool) -> dict[str, float]:
    """Train one predictor, answer the questions with it and score the graph its CTT losses read (the learned
    one with ``graph_gate``, else the attention graph) on the question histories against the simulator's."""
    run = train_cjepa(prep.train, cfg, device=device, progress=progress)
    hist = prep.questions.history
    slots, alive = hist.slots.to(device), hist.alive.to(device).bool()
    pred = run.model.rollout(slots, alive, cfg.future).cpu()
    with torch.no_grad():
        out = run.model(slots, alive)
    graph = learned_graph(out) if cfg.graph_gate else attention_graph(
        out.attention, alive[:, 0], cfg.history, cfg.ctt.attention_threshold)
    return answer(prep.questions.questions, read_positions(prep.probe, pred)) | graph_scores(graph, prep.questions) | {
        "graph_density": run.graph_density, "future_loss": run.losses["future"], "minutes": run.seconds / 60,
        "steps": run.steps}


@register("cjepa")
def bench_cjepa(quick: bool, seed: int) -> BenchResult:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n_train, n_test = (24, 60) if quick else (300, 600)
    base = (CJEPAConfig(d_model=32, depth=1, heads=2, mlp=64, epochs=1, batch_size=32, warmup_steps=10) if quick
            else CJEPAConfig(d_model=64, depth=2, heads=4, mlp=128, epochs=15))
    # the object model's state ends with its (x, y); a hidden object shows its first two frames (its velocity)
    base = replace(base, position_dims=2, visible=2)
    seeds = [seed, seed + 1] if quick else [seed, seed + 1, seed + 2]
    prep = prepare(n_train, n_test, base, device, progress=not quick, probe_steps=300 if quick else 3000,
                   test_seed=1000 + seed)
    qs, probe = prep.questions, prep.probe
    metrics: dict[str, float] = {"questions_where": sum(q.kind == "where" for q in qs.questions),
                                 "questions_collide": sum(q.kind == "collide" for q in qs.questions),
                                 "twins": len(qs.kinds), "unmatched_objects": qs.unmatched,
                                 "probe_error_px": prep.probe_error_px,
                                 "true_graph_density": graph_scores(qs.parents, qs)["graph_true_density"]}
    table = []
    shortcut = factual_answers(qs.questions)
    brackets = {"factual": shortcut} | {k: answer(qs.questions, r)
                                        for k, r in baseline_reads(qs, probe, base.future).items()}
    for name, m in brackets.items():
        metrics |= {f"{name}_{k}": v for k, v in m.items()}
        table.append({"model": f"[bracket] {name}", "accuracy": f"{m['accuracy']:.3f}",
                      "where": f"{m['where_accuracy']:.3f}", "collide": f"{m['collide_accuracy']:.3f}"})
    results: dict[str, dict[str, list[float]]] = {}
    for key, label, overrides in rows(base.epochs):
        per: dict[str, list[float]] = {}
        for s in seeds:
            for k, v in score(prep, replace(base, seed=s, **overrides), device, not quick).items():
                per.setdefault(k, []).append(v)
        results[key] = per
        row = {"model": label}
        for k in ("accuracy", "where_accuracy", "collide_accuracy", "where_error_px", "graph_density",
                  "graph_density_matched", "graph_precision", "graph_recall", "graph_contact_recall"):
            mean, std = _mean_std(per[k])
            metrics[f"{key}_{k}_mean"], metrics[f"{key}_{k}_std"] = mean, std
            if k in COLUMNS:
                row[COLUMNS[k]] = f"{mean:.3f} ± {std:.3f}" if k.endswith("accuracy") else f"{mean:.3f}"
        metrics[f"{key}_minutes_per_seed"] = float(np.mean(per["minutes"]))
        metrics[f"{key}_future_loss"] = float(np.mean(per["future_loss"]))
        row["steps"] = per["steps"][0]
        table.append(row)
        if not quick:  # a long run: say each row as it completes
            print(f"cjepa row done: {row}", file=sys.stderr, flush=True)
    for key in ("m1", "m2", "m4"):  # the acceptance: gain over no masking against the seeds' spread
        metrics[f"masking_gain_{key}"] = metrics[f"{key}_accuracy_mean"] - metrics["no_mask_accuracy_mean"]
        metrics[f"masking_noise_{key}"] = max(metrics[f"{key}_accuracy_std"], metrics["no_mask_accuracy_std"])
    for key in ("ctt_attention", "ctt_learned"):
        metrics[f"{key}_vs_m2"] = metrics[f"{key}_accuracy_mean"] - metrics["m2_accuracy_mean"]
        metrics[f"{key}_noise"] = max(metrics[f"{key}_accuracy_std"], metrics["m2_accuracy_std"])
    config = {"train_episodes": n_train, "test_episodes": n_test, "train_seed": 0, "test_seed": 1000 + seed,
              "history": base.history, "future": base.future, "visible": base.visible,
              "position_dims": base.position_dims,
              "d_model": base.d_model, "depth": base.depth,
              "epochs": base.epochs, "batch_size": base.batch_size, "lr": base.lr, "seeds": seeds,
              "ctt_inv_weight": CTT.inv_weight, "ctt_suf_weight": CTT.suf_weight,
              "ctt_start_epoch": base.epochs // 3, "learned_sparsity": base.causal.sparsity_lambda,
              "encoder": "objects_tiny", "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "cpus": os.cpu_count(), "prep_seconds": round(prep.seconds, 1)}
    title = (f"cjepa: counterfactual questions on {len(qs.kinds)} physics twins ({metrics['questions_where']} where, "
             f"{metrics['questions_collide']} collide; balanced so the factual shortcut scores 0.5; the simulator's "
             f"graph joins {metrics['true_graph_density']:.0%} of the slot pairs); "
             f"{len(seeds)} seeds per row, mean ± std; {device}")
    return BenchResult(metrics=metrics, config=config, rows=table, title=title)
