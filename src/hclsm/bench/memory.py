"""``hclsm bench memory``: continual learning (forgetting of task A after task B) with plain training, EWC,
rehearsal and both, and the Hopfield memory's retrieval of stored states.

* **Two scene families** from the physics generator (32 px): A = ``FAMILY_A`` (five or six balls, half the
  pairs joined by springs, on the default dark background), B = ``FAMILY_B`` (one free ball on a light grey
  background). Training on B moves the object layers to another background and a scene with one object, which
  costs A's reconstructions. (With B on A's own background, one ball is a scene the A model already draws well,
  and the plain run hardly forgot A at all at one seed of two: the ratio of two tiny increases is noise.)
* **Training.** The tiny HCLSM with its memory on (``model.memory.enabled``) trains on A (both stages,
  ``train_two_stages``, ``A_STEPS``), then on B (stage 2, as ``hclsm train --continual`` runs a later task)
  four times from the same A weights with the same seed and ``B_STEPS`` steps (``METHODS``): **plain**; **ewc**
  (the normalised diagonal Fisher of A's training loss on ``EWC_SAMPLES`` A training clips, weight
  ``EWC_LAMBDA``); **rehearsal** (``REPLAY_CLIPS`` A training clips kept, half of every batch replayed from them,
  ``hclsm.train.rehearsal``); **both**. A step costs the same in every method (replay replaces half the batch), and
  every phase is counted in steps, so the result is the same whatever the machine's load.
* **Forgetting**: A's held-out loss after A and after B (eval mode). Primary: the loss's pixel terms ``RECON``
  (reconstruction, decoded next frame, open-loop rollout), scored against the frames themselves. Per method:
  A's increase / plain's (``ratio_<method>``, target <= 0.5) and B's pixel-loss reduction / plain's
  (``b_gain_<method>``, target >= 0.8). Also the whole stage-2 loss as trained (EWC term excluded; its ``jepa``
  term is scored against each model's own EMA target, so it is not comparable across models).
* **The method** is chosen on a separate seed (``SELECTION_SEED``) by a rule fixed before any run: among the
  methods whose B gain ratio is >= 0.8, the one with the smallest A ratio. ``CHOSEN`` is the rule's pick there;
  every seed reports both the rule's pick at that seed (``selected``) and whether ``CHOSEN`` meets the targets.
* **The Fisher**: its spectrum (quantiles, top 1 %'s share of the total), its raw scale, and the rank agreement
  of the estimates from two disjoint halves of the samples (Spearman; near 1: enough samples).
* **Retrieval**: the memory of the EWC model's rollouts over held-out A clips (what its write policy stored);
  every stored state is queried with Gaussian noise of ``NOISE`` times the stored states' RMS spread about their
  mean, and the one-step Hopfield update
  (``HopfieldMemory.recall``, beta = ``model.memory.beta``) is scored: top-1 = the retrieved vector's nearest
  stored state (cosine relative to the stored states' mean, as recall weighs them) is the one queried. Also reported: the share of candidate states the novelty policy wrote.

Trained runs go to a temporary directory, or to ``HCLSM_BENCH_KEEP`` when that names a directory.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import torch
from torch.nn import functional as F

from hclsm import keys
from hclsm.bench import BenchResult, register
from hclsm.bench.dynamics import _machine
from hclsm.bench.objects import val_clips
from hclsm.config import Config, load_config
from hclsm.config.data import PhysicsDataConfig
from hclsm.config.train import LossWeights
from hclsm.data.memory import MemoryClips
from hclsm.data.physics import generate_physics_dataset
from hclsm.models import build_model
from hclsm.nn.memory import MemoryState
from hclsm.train import train, train_two_stages, weighted_loss
from hclsm.train.continual import task_config, task_train_clips
from hclsm.train.ewc import consolidate, estimate_fisher, fisher_agreement
from hclsm.train.rehearsal import ReplayBuffer

FAMILY_A = {"min_objects": 5, "max_objects": 6, "spring_prob": 0.5, "follow_prob": 0.0}
FAMILY_B = {"min_objects": 1, "max_objects": 1, "spring_prob": 0.0, "follow_prob": 0.0, "background": (210, 210, 210)}
IMAGE, FRAMES, CLIP = 32, 16, 8  # frame side, frames per episode, frames per stage-2 training / held-out clip
NOISE = 0.5  # query noise of the retrieval test, relative to the RMS spread of the stored states about their mean
A_STEPS = (600, 150)  # A's stage-1 and stage-2 steps (~2 + 4 min on one quiet core)
B_STEPS = 300  # steps on B, the same for every method (long enough that plain training measurably forgets A)
EWC_LAMBDA = 700.0  # train.loss.ewc on the normalised Fisher (its library default; hclsm.config.train)
EWC_SAMPLES = 128  # A training clips of the Fisher estimate (train.ewc_samples)
REPLAY_CLIPS, REPLAY_FRACTION = 256, 0.5  # train.rehearsal_clips / rehearsal_fraction
METHODS = {"plain": (False, False), "ewc": (True, False), "rehearsal": (False, True), "both": (True, True)}
SELECTION_SEED = 2  # the seed the method is chosen on (not a bench seed)
B_GAIN_MIN, RATIO_MAX = 0.8, 0.5  # the targets: B still learned, A's forgetting at most half of plain training's
# the rule's pick on SELECTION_SEED: rehearsal (A ratio 0.011 with B gain 0.997; ewc 0.487 / 0.726, both
# 0.005 / 0.412; benchmarks/results/memory-seed2.json)
CHOSEN: str | None = "rehearsal"
RECON = ("sbd", "frame", "rollout")  # the pixel terms of the loss: A's reconstruction and its predicted frames


def _config(seed: int, *extra: str) -> Config:
    return load_config("tiny", overrides=[
        f"model.perception.image_size={IMAGE}", "model.memory.enabled=true", "model.slots.dynamic=false",
        "train.threads=1", "train.batch_size=8", f"train.ewc_samples={EWC_SAMPLES}",
        "train.eval_every=0", "train.ckpt_every=0", f"train.seed={seed}", f"data.clip.length={CLIP}",
        f"train.loss.ewc={EWC_LAMBDA}", f"train.rehearsal_clips={REPLAY_CLIPS}",
        f"train.rehearsal_fraction={REPLAY_FRACTION}", *extra])


@torch.no_grad()
def heldout_losses(model: torch.nn.Module, clips: MemoryClips, weights: LossWeights, seed: int = 0
                   ) -> dict[str, float]:
    """The stage-2 training loss (``loss``, weighted) and its terms on ``clips``, in eval mode, mean over clips."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for batch in clips.batches(16):
            out = model(batch, progress=1.0, stage=2)
            b = batch[keys.VIDEO].shape[0]
            terms = {"loss": weighted_loss(out.losses, weights, 2), **out.losses}
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * b
            n += b
    model.train()
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def retrieval(model: torch.nn.Module, clips: MemoryClips, noise: float = NOISE, seed: int = 0) -> dict[str, float]:
    """Store the held-out clips' object states by running the dynamics step by step (each clip's own memory), then
    query every stored state with noise and score the Hopfield recall (see the module doc)."""
    model.eval()
    memory = model.dynamics.memory
    g = torch.Generator().manual_seed(seed)
    hits = total = written = candidates = 0
    cos = []
    for batch in clips.batches(16):
        video = batch[keys.VIDEO]
        obj = model.objects(video)
        b, t, k, _ = obj.slots.shape
        state = model.dynamics.init_state(b, k)
        action = video.new_zeros(b, t, model.cfg.d_action) if model.cfg.d_action > 0 else None
        for i in range(t):
            _, _, _, state = model.dynamics.step(obj.slots[:, i], obj.positions[:, i], obj.gate[:, i],
                                                 None if action is None else action[:, i], state)
        mem = state.memory
        candidates += int((obj.gate > 0.5).sum())
        written += int(mem.count.sum())  # a clip's K * T candidates fit in model.memory.size: nothing replaced
        for j in range(b):
            stored = mem.patterns[j][mem.valid[j]].float()  # (n, d)
            if len(stored) < 2:
                continue
            c = stored.mean(0)  # similarities relative to the stored states' mean, as recall weighs them
            spread = (stored - c).pow(2).mean().sqrt()
            query = stored + noise * spread * torch.randn(stored.shape, generator=g)
            n = len(stored)
            zeros = torch.zeros(1, n, dtype=torch.long)
            out, _ = memory.recall(query[None], MemoryState(stored[None], zeros, torch.ones(1, n, dtype=torch.bool),
                                                            zeros, zeros))
            nearest = F.normalize(out[0] - c, dim=-1) @ F.normalize(stored - c, dim=-1).T  # (n, n)
            hits += int((nearest.argmax(-1) == torch.arange(n)).sum())
            total += n
            cos.append(F.cosine_similarity(out[0] - c, stored - c, dim=-1))
    model.train()
    return {"retrieval_top1": hits / max(total, 1), "retrieval_cos": float(torch.cat(cos).mean()) if cos else None,
            "stored_states": total, "written_share": written / max(candidates, 1)}


def _families(root: Path, quick: bool, seed: int) -> dict[str, PhysicsDataConfig]:
    out = {}
    for name, family, offset in (("A", FAMILY_A, 0), ("B", FAMILY_B, 500)):
        cfg = PhysicsDataConfig(episodes=16 if quick else 120, frames=FRAMES, image_size=IMAGE, counterfactual=False,
                                seed=seed + offset, **family)
        generate_physics_dataset(root / name, cfg, progress=False)
        out[name] = cfg
    return out


def continual_runs(seed: int, quick: bool, methods: dict[str, tuple[bool, bool]] = METHODS, keep: Path | None = None
                   ) -> dict:
    """Train A (``A_STEPS``), then B (``B_STEPS``) from A's weights once per method (``name: (ewc, rehearsal)``);
    held-out losses of A and B before and after each, the Fisher's statistics, step counts, and the retrieval
    test on every method's model. Everything in step counts: the same training whatever the load."""
    steps_a, steps_b = ((20, 4), 6) if quick else (A_STEPS, B_STEPS)
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-memory-") as tmp:
        runs = keep or Path(tmp)
        data = _families(Path(tmp), quick, seed)
        cfg = _config(seed, *(["train.ewc_samples=4", "train.rehearsal_clips=8"] if quick else []))
        t = cfg.train
        _, s2 = train_two_stages(cfg, Path(tmp) / "A", runs / "A", steps_a, stage1_clip=4, progress=not quick)
        model_a = s2.model.cpu()
        val = {name: val_clips(Path(tmp) / name, cfg, CLIP) for name in ("A", "B")}
        weights = t.loss
        before = {name: heldout_losses(model_a, val[name], weights, seed) for name in ("A", "B")}
        a_clips = task_train_clips(cfg, Path(tmp) / "A")
        fisher, first, second = estimate_fisher(model_a, a_clips, t, stage=2, halves=True)
        ewc = consolidate(None, model_a, fisher, t.ewc_normalize, t.ewc_decay)
        replay = ReplayBuffer(t.rehearsal_clips, t.seed)
        replay.add_task(a_clips, "A")
        start = {k: v.clone() for k, v in model_a.state_dict().items()}
        after, steps, ret = {}, {}, {}
        for name, (use_ewc, use_replay) in methods.items():
            cfg_b = task_config(dataclasses.replace(cfg, train=dataclasses.replace(
                t, max_minutes=0.0, steps=steps_b, warmup_steps=5,
                loss=dataclasses.replace(t.loss, ewc=t.loss.ewc if use_ewc else 0.0))), 1)
            model = build_model(cfg.model)
            model.load_state_dict(start)
            r = train(cfg_b, Path(tmp) / "B", run_dir=runs / f"B-{name}", model=model, ewc=ewc if use_ewc else None,
                      replay=replay if use_replay else None, progress=not quick)
            model = r.model.cpu()
            after[name] = {v: heldout_losses(model, val[v], weights, seed) for v in ("A", "B")}
            steps[name] = r.steps
            ret[name] = retrieval(model, val["A"])
    return {"before": before, "after": after, "steps": steps, "retrieval": ret,
            "fisher": ewc.stats() | {"fisher_half_agreement": fisher_agreement(first, second)},
            "replay": {"clips": len(replay), "mib": replay.nbytes / 2**20, "bound_mib": replay.bound_bytes / 2**20},
            "steps_a": steps_a, "steps_b": steps_b, "a_stage2_steps": s2.steps, "episodes": data["A"].episodes,
            "cfg": cfg}


def pixel(x: dict[str, float]) -> float:
    """The pixel terms of a loss dict (``RECON``)."""
    return sum(x[k] for k in RECON)


def select(ratio: dict[str, float | None], gain: dict[str, float | None]) -> str | None:
    """The rule (fixed before any run): among the methods other than plain whose B gain ratio is >= ``B_GAIN_MIN``,
    the one with the smallest A ratio; None when none qualifies."""
    ok = [m for m in ratio if m != "plain" and ratio[m] is not None and gain[m] is not None and gain[m] >= B_GAIN_MIN]
    return min(ok, key=lambda m: ratio[m]) if ok else None


@register("memory")
def bench_memory(quick: bool, seed: int) -> BenchResult:
    keep = os.environ.get("HCLSM_BENCH_KEEP")
    res = continual_runs(seed, quick, METHODS, Path(keep) if keep else None)
    before, after, steps, ret, st, cfg = (res[k] for k in ("before", "after", "steps", "retrieval", "fisher", "cfg"))
    a0, b0 = before["A"], before["B"]
    up = {m: pixel(after[m]["A"]) - pixel(a0) for m in METHODS}  # A's forgetting
    down = {m: pixel(b0) - pixel(after[m]["B"]) for m in METHODS}  # B's learning
    ratio = {m: up[m] / up["plain"] if up["plain"] > 0 else None for m in METHODS}
    gain = {m: down[m] / down["plain"] if down["plain"] > 0 else None for m in METHODS}
    selected = select(ratio, gain)
    chosen = CHOSEN
    met = (chosen is not None and ratio[chosen] is not None and ratio[chosen] <= RATIO_MAX
           and gain[chosen] is not None and gain[chosen] >= B_GAIN_MIN)
    metrics: dict = {"chosen": chosen, "chosen_met": met if chosen is not None else None,
                     "chosen_ratio": ratio[chosen] if chosen else None, "chosen_b_gain": gain[chosen] if chosen else None,
                     "selected": selected, "a_pixel_after_a": pixel(a0), "b_pixel_before": pixel(b0)}
    for m in METHODS:
        metrics |= {f"a_pixel_after_b_{m}": pixel(after[m]["A"]), f"a_pixel_increase_{m}": up[m],
                    f"ratio_{m}": ratio[m], f"b_pixel_after_{m}": pixel(after[m]["B"]), f"b_gain_{m}": gain[m],
                    f"a_loss_after_b_{m}": after[m]["A"]["loss"], f"b_loss_after_{m}": after[m]["B"]["loss"],
                    f"retrieval_top1_{m}": ret[m]["retrieval_top1"], f"b_steps_{m}": steps[m]}
    metrics |= {"a_loss_after_a": a0["loss"], "b_loss_before": b0["loss"], "stored_states": ret["plain"]["stored_states"],
                "written_share": ret["plain"]["written_share"],
                **{k: st[k] for k in ("fisher_scale", "fisher_max", "fisher_nonzero", "fisher_p50", "fisher_p90",
                                      "fisher_p99", "fisher_top1_share", "fisher_half_agreement")},
                "replay_clips": res["replay"]["clips"], "replay_mib": res["replay"]["mib"],
                "replay_bound_mib": res["replay"]["bound_mib"], "a_stage2_steps": res["a_stage2_steps"]}
    rows = [{"model": "after A", "A pixel": pixel(a0), "A increase / plain": None, "B pixel": pixel(b0),
             "B gain / plain": None, "A loss": a0["loss"], "B loss": b0["loss"], "recall top-1": None}]
    for m in METHODS:
        rows.append({"model": f"then B: {m}", "A pixel": pixel(after[m]["A"]), "A increase / plain": ratio[m],
                     "B pixel": pixel(after[m]["B"]), "B gain / plain": gain[m], "A loss": after[m]["A"]["loss"],
                     "B loss": after[m]["B"]["loss"], "recall top-1": ret[m]["retrieval_top1"]})
    t = cfg.train
    config = {"family_a": FAMILY_A, "family_b": FAMILY_B, "episodes": res["episodes"], "image_size": IMAGE,
              "clip": CLIP, "steps_a": list(res["steps_a"]), "steps_b": res["steps_b"], "ewc_lambda": t.loss.ewc,
              "ewc_samples": t.ewc_samples, "ewc_normalize": t.ewc_normalize, "rehearsal_clips": t.rehearsal_clips,
              "rehearsal_fraction": t.rehearsal_fraction, "selection_seed": SELECTION_SEED,
              "rule": f"among ewc / rehearsal / both with B gain >= {B_GAIN_MIN}, the smallest A ratio",
              "noise": NOISE, "memory_size": cfg.model.memory.size, "write_threshold": cfg.model.memory.write_threshold,
              "beta": cfg.model.memory.beta, "preset": "tiny", **_machine()}
    (s1, s2), sb = res["steps_a"], res["steps_b"]

    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3g}"

    title = (f"memory: forgetting of scene family A after training on B ({s1} + {s2} steps, then {sb} steps per "
             f"method); A's held-out pixel-loss increase / plain's: " +
             ", ".join(f"{m} {f(ratio[m])} (B gain {f(gain[m])})" for m in METHODS if m != "plain") +
             f"; chosen on seed {SELECTION_SEED}: {chosen or 'not yet'}, rule's pick here: {selected}; target A ratio "
             f"<= {RATIO_MAX} with B gain >= {B_GAIN_MIN}; Fisher half-sample agreement "
             f"{st['fisher_half_agreement']:.3f}; Hopfield recall top-1 {ret['plain']['retrieval_top1']:.3g}")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
