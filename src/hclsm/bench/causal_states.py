"""``hclsm bench causal-states``: the causal graph learned from **true states** (the NRI setting), on the scenes of
``hclsm bench causal``.

Training scenes (``TRAIN_EPISODES``, the bench's seed) and held-out test scenes (``GRAPH_TEST_EPISODES``, seed +
1000) are generated with ``hclsm.data.physics.generate_physics_dataset`` exactly as ``bench causal``'s (5 balls,
follow DAG with probability 0.3 per pair, follow forces 10x, no springs, 32 frames). An ``EpisodeGraph``
(``hclsm.nn.graph_inference``) trains on the balls' positions, velocities and radii for ``STEPS`` steps
(``hclsm.eval.causal_states.train_episode_graph``); then each test episode's graph is inferred from its 32 frames
twice: by the encoder alone (``encoder_*``) and refined on the episode's own velocity changes (``learned_*``, the
bench's answer; ``EpisodeGraph.refine``). Beside them: the empty graph and the simulator's follow law fitted on
the same true states (``hclsm.eval.causal.follow_law_graph``, an upper reference that knows the functional form).
``learned_edge_auc`` ranks the logits over all ordered pairs; ``learned_h_*`` is the NOTEARS h of the edge
probabilities. Targets: SHD <= 0.5, AUC >= 0.95, final h <= 1e-4.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from hclsm.bench import BenchResult, register
from hclsm.bench.causal import FOLLOW_STRENGTH, GRAPH_TEST_EPISODES, causal_scenes
from hclsm.bench.dynamics import _machine
from hclsm.config.model import EpisodeGraphConfig
from hclsm.data.physics import PhysicsSource, generate_physics_dataset
from hclsm.eval.causal import follow_law_graph, graph_scores
from hclsm.eval.causal_states import (POSITION_DIMS, STATE_DIM, TARGET_DIM, infer_graphs, load_states,
                                      train_episode_graph)
from hclsm.metrics.graphs import edge_auc
from hclsm.nn.causal import acyclicity
from hclsm.nn.graph_inference import EpisodeGraph

TRAIN_EPISODES, TRAIN_EPISODES_QUICK = 1000, 64
STEPS, STEPS_QUICK = 3000, 120  # training steps of 16 episodes each
BATCH, LR = 16, 1e-3


def run_causal_states(quick: bool, seed: int, strength: float = FOLLOW_STRENGTH, steps: int | None = None,
                      cfg: EpisodeGraphConfig | None = None) -> BenchResult:
    """The bench at any follow strength / step count / layer config (the registered bench: the defaults)."""
    steps = (STEPS_QUICK if quick else STEPS) if steps is None else steps
    cfg = EpisodeGraphConfig(refine_steps=60) if cfg is None and quick else cfg or EpisodeGraphConfig()
    train_cfg = causal_scenes(TRAIN_EPISODES_QUICK if quick else TRAIN_EPISODES, seed, strength)
    test_cfg = causal_scenes(6 if quick else GRAPH_TEST_EPISODES, seed + 1000, strength)
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-states-") as tmp:
        for name, data in (("train", train_cfg), ("test", test_cfg)):
            generate_physics_dataset(Path(tmp) / name, data, progress=False)
        train, test = load_states(Path(tmp) / "train"), load_states(Path(tmp) / "test")
        source = PhysicsSource(Path(tmp) / "test")
        law = np.stack([follow_law_graph(source.load_episode(e), test_cfg.image_size, strength)
                        for e in range(test_cfg.episodes)])
    torch.manual_seed(seed)
    model = EpisodeGraph(STATE_DIM, POSITION_DIMS, TARGET_DIM, cfg)
    info = train_episode_graph(model, train, steps, batch=BATCH, lr=LR, seed=seed)
    encoder, learned = infer_graphs(model, test, refine=cfg.refine_steps > 0)
    true = test.graph
    rows, metrics = [], {}

    def add(name: str, key: str, logits: np.ndarray | None, pred: np.ndarray) -> None:
        s = graph_scores(true, pred)
        metrics.update({f"{key}_{k}": v for k, v in s.items()})
        row = {"graph": name, "shd": s["shd"], "edge acc": s["edge_accuracy"], "precision": s["precision"],
               "recall": s["recall"], "edges": s["edges_pred"]}
        if logits is not None:
            prob = torch.sigmoid(torch.from_numpy(logits))
            h = acyclicity(prob * (1 - torch.eye(prob.shape[-1]))).numpy()  # (E,)
            metrics.update({f"{key}_edge_auc": edge_auc(true, logits), f"{key}_h_mean": float(h.mean()),
                            f"{key}_h_max": float(h.max())})
            row.update({"auc": metrics[f"{key}_edge_auc"], "h(probs)": float(h.mean())})
        rows.append(row)

    add("learned graph, refined on each episode's history", "learned", learned, learned > 0)
    add("the encoder's graph alone (amortised)", "encoder", encoder, encoder > 0)
    add("empty graph", "empty", None, np.zeros_like(true))
    add("the simulator's follow law fitted on the true states (upper reference)", "law", None, law)
    metrics.update({"shd": metrics["learned_shd"], "edge_accuracy": metrics["learned_edge_accuracy"],
                    "edge_auc": metrics["learned_edge_auc"], "h": metrics["learned_h_mean"], **info})
    config = {"objects": true.shape[1], "follow_strength": strength, "train_episodes": train_cfg.episodes,
              "test_episodes": test_cfg.episodes, "test_seed": test_cfg.seed, "steps": steps, "batch": BATCH,
              "lr": LR, "minutes": info["minutes"], "layer": {k: v for k, v in vars(cfg).items()}, **_machine()}
    title = (f"causal-states: the follow DAG of {test_cfg.episodes} held-out {true.shape[1]}-ball scenes learned from "
             f"true states (follow strength {strength:g}x; target SHD <= 0.5, AUC >= 0.95, h <= 1e-4); {steps} steps "
             f"({info['minutes']:.1f} min) on {train_cfg.episodes} training scenes")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)


@register("causal-states")
def bench_causal_states(quick: bool, seed: int) -> BenchResult:
    return run_causal_states(quick, seed)
