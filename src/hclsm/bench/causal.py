"""Benchmarks of HCLSM's "what if": ``counterfactual`` (interventions checked against re-simulation).

* ``counterfactual``: the tiny HCLSM trains both stages on physics scenes exactly as in ``hclsm bench
  dynamics``; then, on ``TEST_EPISODES`` freshly generated held-out scenes (another seed), every twin whose
  intervention (displace, push or remove one ball at frame t) leaves ``CONTEXT`` frames before it and
  ``HORIZON`` after is rolled out from the factual frames with the same intervention applied to the slot
  showing that ball (``hclsm.eval.counterfactual``). Reported: pixel MSE of the counterfactual rollout
  against the re-simulated twin, of the plain rollout against the factual frames, and of reusing the plain
  rollout for the twin; overall and per kind. Targets: counterfactual <= 1.5x factual, and clearly below
  reuse.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from hclsm.bench import BenchResult, register
from hclsm.bench.dynamics import _machine, trained_hclsm
from hclsm.config.data import PhysicsDataConfig
from hclsm.data.physics import generate_physics_dataset
from hclsm.eval.counterfactual import counterfactual_cases, summarise

CONTEXT, HORIZON = 6, 6  # frames read before the intervention (its frame included), frames predicted after
TEST_EPISODES = 120  # fresh held-out scenes whose twins are evaluated


@register("counterfactual")
def bench_counterfactual(quick: bool, seed: int) -> BenchResult:
    with trained_hclsm("counterfactual", quick, seed) as (_, _, data, model, info, minutes):
        with tempfile.TemporaryDirectory(prefix="hclsm-bench-twins-") as tmp:
            test = PhysicsDataConfig(episodes=12 if quick else TEST_EPISODES, frames=32, image_size=data.image_size,
                                     min_objects=data.min_objects, max_objects=data.max_objects,
                                     seed=seed + 1000, counterfactual=True)
            root = Path(tmp) / "twins"
            generate_physics_dataset(root, test, progress=False)
            cases, unmatched = counterfactual_cases(model, root, range(test.episodes), CONTEXT, HORIZON)
    s = summarise(cases, unmatched)
    rows = []
    for kind in ("all", "displace", "push", "remove"):
        p = "" if kind == "all" else f"{kind}_"
        if f"{p}n" not in s:
            continue
        rows.append({"intervention": kind, "twins": s[f"{p}n"], "factual": s[f"{p}factual_mse"],
                     "counterfactual": s[f"{p}counterfactual_mse"], "reuse factual": s[f"{p}reuse_mse"],
                     "cf / factual": s[f"{p}ratio_cf_vs_factual"], "cf / reuse": s[f"{p}ratio_cf_vs_reuse"]})
    config = {"train_episodes": data.episodes, "test_episodes": test.episodes, "test_seed": seed + 1000,
              "context": CONTEXT, "horizon": HORIZON, "minutes": minutes, "preset": "tiny", **_machine()}
    title = (f"counterfactual: {HORIZON}-frame rollouts after an intervention on held-out physics twins vs "
             f"re-simulation (pixel MSE; target cf <= 1.5x factual and clearly below reuse); "
             f"{minutes:g} min of training")
    return BenchResult(metrics={**s, **info}, config=config, rows=rows, title=title)
