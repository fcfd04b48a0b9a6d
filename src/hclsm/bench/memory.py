"""``hclsm bench memory``: continual learning with EWC (forgetting of task A after task B) and the Hopfield
memory's retrieval of stored states.

* **Two scene families** from the physics generator (32 px): A = ``FAMILY_A`` (five or six balls, half the
  pairs joined by springs, on the default dark background), B = ``FAMILY_B`` (one free ball on a light grey
  background). Training on B moves the object layers to another background and a scene with one object, which
  costs A's reconstructions. (With B on A's own background, one ball is a scene the A model already draws well,
  and the plain run hardly forgot A at all at one seed of two: the ratio of two tiny increases is noise.)
* **Training.** The tiny HCLSM with its memory on (``model.memory.enabled``) trains on A (both stages,
  ``train_two_stages``, ``A_STEPS``), then on B (stage 2, as ``hclsm train --continual`` runs a later task)
  twice from the same A weights with the same seed and ``B_STEPS`` steps: once plain, once with EWC (the
  diagonal Fisher of A's training loss on ``train.ewc_samples`` A clips, weight ``LAMBDA``). Every phase is
  counted in steps, so the runs see the same batches and the result is the same whatever the machine's load.
* **Forgetting**: A's held-out loss after A and after B (eval mode), its increase with and without EWC and their
  ratio (target <= 0.5). Primary: the loss's pixel terms ``RECON`` (reconstruction, decoded next frame, open-loop
  rollout), which are scored against the frames themselves and so compare across models; also the whole
  stage-2 loss as trained (EWC term excluded), whose ``jepa`` term is scored against each model's own EMA target
  (it moves with training, so that term is not comparable across models and is reported on its own). B's
  held-out loss before and after, both ways, shows whether B was still learned under EWC
  (``b_pixel_gain_ratio``: B's pixel-loss reduction with EWC / without).
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
from hclsm.train.ewc import consolidate, estimate_fisher

FAMILY_A = {"min_objects": 5, "max_objects": 6, "spring_prob": 0.5, "follow_prob": 0.0}
FAMILY_B = {"min_objects": 1, "max_objects": 1, "spring_prob": 0.0, "follow_prob": 0.0, "background": (210, 210, 210)}
IMAGE, FRAMES, CLIP = 32, 16, 8  # frame side, frames per episode, frames per stage-2 training / held-out clip
NOISE = 0.5  # query noise of the retrieval test, relative to the RMS spread of the stored states about their mean
A_STEPS = (600, 150)  # A's stage-1 and stage-2 steps (~2 + 4 min on one quiet core)
B_STEPS = 300  # steps on B, plain and with EWC alike (long enough that plain training measurably forgets A)
# train.loss.ewc, chosen on seed 2 (not a bench seed; docs/benchmarks/history.md): the least forgetting among the lambdas whose
# B gain ratio is >= 0.5, i.e. B is still learned
LAMBDA = 1.4e9
RECON = ("sbd", "frame", "rollout")  # the pixel terms of the loss: A's reconstruction and its predicted frames


def _config(seed: int, *extra: str) -> Config:
    return load_config("tiny", overrides=[
        f"model.perception.image_size={IMAGE}", "model.memory.enabled=true", "model.slots.dynamic=false",
        "train.threads=1", "train.batch_size=8", "train.ewc_samples=16",
        "train.eval_every=0", "train.ckpt_every=0", f"train.seed={seed}",
        f"data.clip.length={CLIP}", f"train.loss.ewc={LAMBDA}", *extra])


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


def continual_runs(seed: int, quick: bool, lambdas: tuple[float, ...] = (LAMBDA,), keep: Path | None = None,
                   plain: bool = True) -> dict:
    """Train A (``A_STEPS``), then B (``B_STEPS``) from A's weights once plain (unless ``plain`` is false) and
    once per EWC weight in ``lambdas``; held-out losses of A and B before and after each, the Fisher's
    statistics, step counts, and the retrieval test on the first EWC model. Everything in step counts: the same
    training whatever the load."""
    steps_a, steps_b = ((20, 4), 6) if quick else (A_STEPS, B_STEPS)
    with tempfile.TemporaryDirectory(prefix="hclsm-bench-memory-") as tmp:
        runs = keep or Path(tmp)
        data = _families(Path(tmp), quick, seed)
        cfg = _config(seed, *(["train.ewc_samples=4"] if quick else []))
        _, s2 = train_two_stages(cfg, Path(tmp) / "A", runs / "A", steps_a, stage1_clip=4, progress=not quick)
        model_a = s2.model.cpu()
        val = {name: val_clips(Path(tmp) / name, cfg, CLIP) for name in ("A", "B")}
        weights = cfg.train.loss
        before = {name: heldout_losses(model_a, val[name], weights, seed) for name in ("A", "B")}
        fisher = estimate_fisher(model_a, task_train_clips(cfg, Path(tmp) / "A"), cfg.train, stage=2)
        ewc = consolidate(None, model_a, fisher)
        start = {k: v.clone() for k, v in model_a.state_dict().items()}
        after, steps, ret = {}, {}, None
        for lam in ((None,) if plain else ()) + tuple(lambdas):
            name = "plain" if lam is None else f"ewc {lam:g}"
            cfg_b = task_config(dataclasses.replace(cfg, train=dataclasses.replace(
                cfg.train, max_minutes=0.0, steps=steps_b, warmup_steps=5,
                loss=dataclasses.replace(cfg.train.loss, ewc=lam or 0.0))), 1)
            model = build_model(cfg.model)
            model.load_state_dict(start)
            r = train(cfg_b, Path(tmp) / "B", run_dir=runs / f"B-{name.replace(' ', '-')}", model=model,
                      ewc=None if lam is None else ewc, progress=not quick)
            model = r.model.cpu()
            after[name] = {v: heldout_losses(model, val[v], weights, seed) for v in ("A", "B")}
            steps[name] = r.steps
            if lam is not None and ret is None:
                ret = retrieval(model, val["A"])
    return {"before": before, "after": after, "steps": steps, "retrieval": ret, "fisher": ewc.stats(),
            "steps_a": steps_a, "steps_b": steps_b, "a_stage2_steps": s2.steps, "episodes": data["A"].episodes,
            "cfg": cfg}


def pixel(x: dict[str, float]) -> float:
    """The pixel terms of a loss dict (``RECON``)."""
    return sum(x[k] for k in RECON)


@register("memory")
def bench_memory(quick: bool, seed: int) -> BenchResult:
    keep = os.environ.get("HCLSM_BENCH_KEEP")
    res = continual_runs(seed, quick, (LAMBDA,), Path(keep) if keep else None)
    before, after, steps, ret, st, cfg = (res[k] for k in ("before", "after", "steps", "retrieval", "fisher", "cfg"))
    after = {"plain": after["plain"], "ewc": after[f"ewc {LAMBDA:g}"]}
    steps = {"plain": steps["plain"], "ewc": steps[f"ewc {LAMBDA:g}"]}

    def ratio(up_ewc: float, up_plain: float) -> float | None:
        return up_ewc / up_plain if up_plain > 0 else None

    a0, b0 = before["A"], before["B"]
    ap, ae, bp, be = after["plain"]["A"], after["ewc"]["A"], after["plain"]["B"], after["ewc"]["B"]
    metrics = {
        # primary: the pixel terms, scored against the frames themselves (comparable across models)
        "a_pixel_after_a": pixel(a0), "a_pixel_after_b_plain": pixel(ap), "a_pixel_after_b_ewc": pixel(ae),
        "a_pixel_increase_plain": pixel(ap) - pixel(a0), "a_pixel_increase_ewc": pixel(ae) - pixel(a0),
        "pixel_increase_ratio": ratio(pixel(ae) - pixel(a0), pixel(ap) - pixel(a0)),
        "b_pixel_before": pixel(b0), "b_pixel_after_plain": pixel(bp), "b_pixel_after_ewc": pixel(be),
        "b_pixel_gain_ratio": ((pixel(b0) - pixel(be)) / (pixel(b0) - pixel(bp)) if pixel(b0) > pixel(bp) else None),
        # the whole weighted training loss (its jepa term is scored against each model's own EMA target)
        "a_loss_after_a": a0["loss"], "a_loss_after_b_plain": ap["loss"], "a_loss_after_b_ewc": ae["loss"],
        "a_increase_plain": ap["loss"] - a0["loss"], "a_increase_ewc": ae["loss"] - a0["loss"],
        "increase_ratio": ratio(ae["loss"] - a0["loss"], ap["loss"] - a0["loss"]),
        "b_loss_before": b0["loss"], "b_loss_after_plain": bp["loss"], "b_loss_after_ewc": be["loss"],
        "a_jepa_after_a": a0["jepa"], "a_jepa_after_b_plain": ap["jepa"], "a_jepa_after_b_ewc": ae["jepa"],
        "b_jepa_before": b0["jepa"], "b_jepa_after_plain": bp["jepa"], "b_jepa_after_ewc": be["jepa"],
        **ret, "fisher_mean": st["fisher_mean"], "fisher_max": st["fisher_max"], "fisher_nonzero": st["fisher_nonzero"],
        "a_stage2_steps": res["a_stage2_steps"], "b_steps_plain": steps["plain"], "b_steps_ewc": steps["ewc"],
    }
    rows = []
    for title, a, b in (("after A", a0, b0), ("after A then B, no EWC", ap, bp),
                        (f"after A then B, EWC (lambda {LAMBDA:g})", ae, be)):
        rows.append({"model": title, "A pixel": pixel(a), "A pixel increase": pixel(a) - pixel(a0) if a is not a0 else None,
                     "A loss": a["loss"], "A jepa": a["jepa"], "B pixel": pixel(b), "B loss": b["loss"],
                     "B jepa": b["jepa"]})
    config = {"family_a": FAMILY_A, "family_b": FAMILY_B, "episodes": res["episodes"], "image_size": IMAGE,
              "clip": CLIP, "steps_a": list(res["steps_a"]), "steps_b": res["steps_b"], "ewc_lambda": LAMBDA,
              "ewc_samples": cfg.train.ewc_samples, "noise": NOISE, "memory_size": cfg.model.memory.size,
              "write_threshold": cfg.model.memory.write_threshold, "beta": cfg.model.memory.beta, "preset": "tiny",
              **_machine()}
    r = metrics["pixel_increase_ratio"]
    (s1, s2), sb = res["steps_a"], res["steps_b"]
    title = (f"memory: forgetting of scene family A after training on B ({s1} + {s2} steps, then {sb} steps); "
             f"held-out pixel terms ({' + '.join(RECON)}) and whole stage-2 loss; A's pixel increase with EWC / "
             f"without = {'n/a' if r is None else f'{r:.3g}'} (target <= 0.5); Hopfield recall of stored states "
             f"from queries with {NOISE:g}x noise: top-1 {ret['retrieval_top1']:.3g} over {ret['stored_states']} states")
    return BenchResult(metrics=metrics, config=config, rows=rows, title=title)
