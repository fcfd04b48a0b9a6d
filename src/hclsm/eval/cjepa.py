"""Counterfactual questions on the physics scenes' twins, answered by rolling a slot predictor forward.

A stand-in for CLEVRER's counterfactual VQA, scored against re-simulation. For each held-out twin
(one object displaced, pushed or removed at frame t):

1. **Slots.** The frozen object model reads the whole twin video (``encode_episodes``); the predictor's
   history is the twin's slots on frames L-T_h+1 .. L with L = t + 1 (so a push has moved its ball once),
   and it predicts frames L+1 .. L+H.
2. **Which slot is which object.** On frame L each alive slot's attention centroid is matched to the
   objects present (Hungarian); pairs farther apart than ``MATCH_PX`` are unmatched, and an object without
   a slot gets no question.
3. **Reading positions.** A ``PositionProbe`` (an MLP slot -> (x, y)) trained on *factual* training
   slots only reads every predicted slot's position.
4. **Questions.** *Where*: "after the intervention, is object k within ``POSITION_TOL_PX`` of where it is
   at step L+h?" for h in ``HORIZONS``, answered right when the read position is that close to the
   twin's. *Collide*: "do objects k and j touch during L+1 .. L+H?", true when the simulator reports a
   contact; predicted when their read positions come within ``COLLIDE_PX`` of touching (the sum of radii)
   on some frame. Each type is **balanced** against the shortcut of answering what happened in the
   factual episode: as many questions whose answer the intervention changed as unchanged ones, so that
   shortcut scores exactly 50 %; collide questions also have as many "yes" as "no" answers among each
   (so "never" and "always" score 50 % too). ``accuracy`` is the mean of the two types' accuracies.

Brackets (``factual_answers``, ``baseline_reads``): ``factual`` (the shortcut, 50 % by construction), ``copy_last`` (the
history's last slots frozen), ``constant_velocity`` (read positions extrapolated from the last two
history frames) and ``encoder_truth`` (the object model's own slots of the twin's true future: the
ceiling the probe and the encoder allow).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from hclsm.data.physics import PhysicsSource
from hclsm.data.slots import SlotSequences
from hclsm.errors import DataError
from hclsm.eval.counterfactual import model_frames
from hclsm.metrics.segmentation import match_slots_to_objects
from hclsm.utils.interrupt import interrupt_point

MATCH_PX = 6.0  # a slot's centroid within this many pixels of an object's centre shows that object
POSITION_TOL_PX = 4.0  # a "where" answer is right within this distance (about a ball's radius)
COLLIDE_PX = 1.0  # read positions this close to touching count as a collision (frames are sampled; not tuned)
HORIZONS = (3, 6)  # "where" questions at these steps after the last history frame


@torch.no_grad()
def encode_episodes(net: nn.Module, source: PhysicsSource, episodes: list[int], counterfactual: bool = False,
                    batch: int = 16, device: str | torch.device = "cpu", progress: bool = False
                    ) -> tuple[SlotSequences, np.ndarray]:
    """The object states of whole episodes (or their twins) from a frozen ``ObjectDecomposer``: sequences
    (E, T, S, D + 2) with alive flags, and the slots' attention centroids (E, T, S, 2) in the data's pixels.

    A state is the slot vector followed by its position (x, y) in [-1, 1]: the object model keeps an
    object's position beside its slot vector (slot attention with explicit positions; the decoder draws
    each slot at its position), so the vector alone holds little of where the object is."""
    net = net.to(device).eval()
    size = net.cfg.perception.image_size
    data_size = float(source.meta["image_size"])
    slots, alive, centres = [], [], []
    for i in tqdm(range(0, len(episodes), batch), desc="encode slots", disable=not progress, leave=False):
        interrupt_point()
        video = torch.cat([model_frames(source.load_episode(e, counterfactual)["video"], size)
                           for e in episodes[i:i + batch]]).to(device)
        out = net(video)
        first = 1 if out.has_background else 0
        slots.append(torch.cat([out.slots, out.positions], -1)[:, :, first:].float().cpu())
        alive.append(out.alive[:, :, first:].cpu())
        centres.append(((out.positions[:, :, first:].float().cpu() + 1.0) * 0.5 * data_size).numpy())
    return SlotSequences(torch.cat(slots), torch.cat(alive)), np.concatenate(centres)


def match_frame(centres: np.ndarray, alive: np.ndarray, truth: np.ndarray) -> dict[int, int]:
    """{object: slot} on one frame: alive slots' centroids (S, 2) against present objects (K, 2; NaN = absent)."""
    slots, objects = np.flatnonzero(alive), np.flatnonzero(np.isfinite(truth).all(-1))
    if len(slots) == 0 or len(objects) == 0:
        return {}
    oi, si = match_slots_to_objects(centres[slots], truth[objects])
    return {int(objects[o]): int(slots[s]) for o, s in zip(oi, si)
            if np.linalg.norm(centres[slots[s]] - truth[objects[o]]) <= MATCH_PX}


class PositionProbe(nn.Module):
    """An MLP from a slot vector to its object's (x, y), in units of the frame side."""

    def __init__(self, slot_dim: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(slot_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2))
        self.register_buffer("mean", torch.zeros(slot_dim))
        self.register_buffer("std", torch.ones(slot_dim))
        self.register_buffer("size", torch.ones(()))

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        """(..., D) slots -> (..., 2) positions in pixels."""
        return self.net((slots - self.mean) / self.std) * self.size


def fit_probe(seqs: SlotSequences, centres: np.ndarray, positions: list[np.ndarray], image_size: int,
              steps: int = 3000, seed: int = 0) -> tuple[PositionProbe, float]:
    """Train a ``PositionProbe`` on every matched (slot, object) pair of factual sequences (``positions``:
    per sequence the true (T, K, 2) centres). Returns it and its mean error in pixels on a random 10 % of
    the pairs (held out)."""
    xs, ys = [], []
    for e, truth in enumerate(positions):
        for t in range(seqs.frames):
            for obj, slot in match_frame(centres[e, t], seqs.alive[e, t].numpy(), truth[t]).items():
                xs.append(seqs.slots[e, t, slot])
                ys.append(truth[t, obj])
    if len(xs) < 20:
        raise ValueError(f"too few matched slots to train a position probe ({len(xs)})")
    x, y = torch.stack(xs), torch.as_tensor(np.stack(ys), dtype=torch.float32) / image_size
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    split = int(0.9 * len(x))
    tr, te = perm[:split], perm[split:]
    torch.manual_seed(seed)
    probe = PositionProbe(x.shape[-1])
    probe.mean.copy_(x[tr].mean(0))
    probe.std.copy_(x[tr].std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = tr[torch.randint(len(tr), (256,), generator=gen)]
        loss = (probe(x[idx]) - y[idx]).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    probe.size.fill_(float(image_size))
    probe.eval()
    with torch.no_grad():
        err = float((probe(x[te]) - y[te] * image_size).norm(dim=-1).mean())
    return probe, err


@dataclass
class Question:
    twin: int  # index into the question set's histories
    kind: str  # where | collide
    objects: tuple[int, ...]  # (k,) or (k, j), object ids
    slots: tuple[int, ...]  # the slots showing them on frame L
    step: int  # where: frames after L (1-based); collide: 0
    truth: np.ndarray | bool  # where: the twin's (x, y); collide: the simulator's answer
    factual: np.ndarray | bool  # the same in the factual episode
    changed: bool  # whether the intervention changed the answer
    radii: tuple[float, ...] = ()


@dataclass
class QuestionSet:
    history: SlotSequences  # (N, T_h, S, D): the twins' slots up to frame L
    future: SlotSequences  # (N, H, S, D): the encoder's slots of the twins' true frames L+1 .. L+H
    questions: list[Question]
    kinds: list[str]  # intervention kind per twin
    episodes: list[int]  # the episode of each twin
    unmatched: int  # objects with no slot on frame L (no questions about them)
    # the simulator's interaction graph in slot terms, (N, S, S) bool [receiver slot, sender slot]: the object
    # shown by the sender acts on the receiver's (spring or follow force); ``known`` marks the ordered pairs of
    # distinct slots that both show an object on frame L, the only pairs where a graph can be scored
    parents: torch.Tensor
    known: torch.Tensor
    # (N, S, S) bool, symmetric: the two slots' objects touch on frames L+1 .. L+H of the twin (collisions are
    # interactions too, but between any two balls, so they are not in the simulator's graph)
    contacts: torch.Tensor


def build_questions(twin_seqs: SlotSequences, twin_centres: np.ndarray, source: PhysicsSource, episodes: list[int],
                    history: int, horizon: int, seed: int = 0) -> QuestionSet:
    """The balanced question set over the twins of ``episodes`` (see the module docstring); ``twin_seqs`` and
    ``twin_centres`` are ``encode_episodes`` of the same episodes' twins. The factual answers come from the
    simulator."""
    hist, lasts, kinds, pool, unmatched = [], [], [], {"where": [], "collide": []}, 0
    s_max = twin_seqs.slots.shape[2]
    parents, known, touch = [], [], []
    for n, e in enumerate(episodes):
        fact, twin = source.load_episode(e), source.load_episode(e, counterfactual=True)
        last = int(twin["intervention_step"]) + 1
        if last - history + 1 < 0 or last + horizon >= twin_seqs.frames:
            continue
        objects = match_frame(twin_centres[n, last], twin_seqs.alive[n, last].numpy(), twin["positions"][last])
        present = np.isfinite(twin["positions"][last]).all(-1)
        unmatched += int(present.sum()) - len(objects)
        i = len(hist)
        hist.append(n)
        lasts.append(last)
        kinds.append(str(twin["intervention_kind"]))
        window = slice(last + 1, last + horizon + 1)
        par, kn, hit = (np.zeros((s_max, s_max), dtype=bool) for _ in range(3))
        for k, sk in objects.items():  # k acts on j: sk is a parent of sj
            for j, sj in objects.items():
                if j != k:
                    par[sj, sk], kn[sj, sk] = bool(twin["graph"][k, j]), True
                    hit[sj, sk] = bool(twin["contacts"][window, k, j].any())
        parents.append(par)
        known.append(kn)
        touch.append(hit)
        for k, s in objects.items():
            for h in HORIZONS:
                if h > horizon:
                    continue
                tp, fp = twin["positions"][last + h, k], fact["positions"][last + h, k]
                pool["where"].append(Question(i, "where", (k,), (s,), h, tp, fp,
                                              bool(np.linalg.norm(tp - fp) > POSITION_TOL_PX)))
        ids = sorted(objects)
        for a in range(len(ids)):
            for b in range(a + 1, len(ids)):
                k, j = ids[a], ids[b]
                t_hit = bool(twin["contacts"][window, k, j].any())
                f_hit = bool(fact["contacts"][window, k, j].any())
                pool["collide"].append(Question(i, "collide", (k, j), (objects[k], objects[j]), 0, t_hit, f_hit,
                                                t_hit != f_hit, (float(twin["radii"][k]), float(twin["radii"][j]))))
    rng = np.random.default_rng(seed)
    questions = []
    cells = {"where": lambda q: q.changed, "collide": lambda q: (q.changed, q.truth)}
    for kind, qs in pool.items():  # balance: every cell (changed or not; for collide, also yes or no) equally often
        groups: dict = {}
        for q in qs:
            groups.setdefault(cells[kind](q), []).append(q)
        n = min(len(g) for g in groups.values()) if len(groups) == (2 if kind == "where" else 4) else 0
        for key in sorted(groups):
            g = groups[key]
            questions += [g[i] for i in sorted(rng.choice(len(g), size=n, replace=False))]
    if not hist:
        raise DataError(f"no twin leaves {history} frames up to its intervention and {horizon} after it; "
                        "use longer episodes or a shorter cjepa.history / cjepa.future")

    def take(a: torch.Tensor, lo: int, hi: int) -> torch.Tensor:  # frames last+lo .. last+hi-1 of each kept twin
        return torch.stack([a[n, last + lo:last + hi] for n, last in zip(hist, lasts)])

    history_seqs = SlotSequences(take(twin_seqs.slots, 1 - history, 1), take(twin_seqs.alive, 1 - history, 1))
    future_seqs = SlotSequences(take(twin_seqs.slots, 1, horizon + 1), take(twin_seqs.alive, 1, horizon + 1))
    return QuestionSet(history_seqs, future_seqs, questions, kinds, [episodes[n] for n in hist], unmatched,
                       *(torch.from_numpy(np.stack(a)) for a in (parents, known, touch)))


def graph_scores(graph: torch.Tensor, qs: QuestionSet) -> dict[str, float]:
    """A predicted graph (N, S, S) bool ``[receiver, sender]`` on the question set's histories against the
    simulator's (``qs.parents``), over the pairs of slots that show objects (``qs.known``): ``graph_precision``,
    ``graph_recall``, ``graph_f1`` of its edges, its density there (``graph_density_matched``) and the
    truth's (``graph_true_density``); ``graph_contact_recall``: the share of the slots that touch in the
    predicted frames (``qs.contacts``, either direction) joined by an edge. A rate with nothing to count is NaN."""
    pred, truth, known = graph.bool().cpu() & qs.known, qs.parents & qs.known, qs.known
    hit, n_pred, n_true = float((pred & truth).sum()), float(pred.sum()), float(truth.sum())
    precision = hit / n_pred if n_pred else float("nan")
    recall = hit / n_true if n_true else float("nan")
    f1 = 2 * hit / (n_pred + n_true) if n_pred + n_true else float("nan")
    pairs = max(float(known.sum()), 1.0)
    touch = qs.contacts & known
    either = pred | pred.transpose(-1, -2)
    contact_recall = float((either & touch).sum()) / float(touch.sum()) if touch.any() else float("nan")
    return {"graph_precision": precision, "graph_recall": recall, "graph_f1": f1,
            "graph_contact_recall": contact_recall, "graph_density_matched": n_pred / pairs,
            "graph_true_density": n_true / pairs}


def answer(questions: list[Question], read: np.ndarray) -> dict[str, float]:
    """Accuracy of the read positions ``read`` (N, H, S, 2) px on the questions: ``accuracy`` over all,
    ``where_accuracy`` / ``collide_accuracy`` per type, ``where_error_px`` the mean distance on "where"."""
    right = {"where": [], "collide": []}
    err = []
    for q in questions:
        p = read[q.twin]
        if q.kind == "where":
            d = float(np.linalg.norm(p[q.step - 1, q.slots[0]] - q.truth))
            err.append(d)
            right["where"].append(d <= POSITION_TOL_PX)
        else:
            gap = np.linalg.norm(p[:, q.slots[0]] - p[:, q.slots[1]], axis=-1) - sum(q.radii)  # (H,)
            right["collide"].append(bool(gap.min() <= COLLIDE_PX) == q.truth)
    return _accuracies(right) | {"where_error_px": float(np.mean(err)) if err else float("nan")}


def _accuracies(right: dict[str, list[bool]]) -> dict[str, float]:
    """Per-type accuracies and ``accuracy``, their mean (each type weighs the same, however many questions)."""
    acc = {f"{k}_accuracy": float(np.mean(v)) if v else float("nan") for k, v in right.items()}
    return {"accuracy": float(np.mean(list(acc.values())))} | acc


def factual_answers(questions: list[Question]) -> dict[str, float]:
    """The shortcut: answer what happened in the factual episode (50 % on each balanced type)."""
    right = {"where": [], "collide": []}
    for q in questions:
        if q.kind == "where":
            right["where"].append(float(np.linalg.norm(q.factual - q.truth)) <= POSITION_TOL_PX)
        else:
            right["collide"].append(q.factual == q.truth)
    return _accuracies(right)


@torch.no_grad()
def read_positions(probe: PositionProbe, slots: torch.Tensor) -> np.ndarray:
    """(N, H, S, D) slots -> (N, H, S, 2) positions in pixels."""
    return probe(slots.float().cpu()).numpy()


@torch.no_grad()
def baseline_reads(qs: QuestionSet, probe: PositionProbe, horizon: int) -> dict[str, np.ndarray]:
    """Read positions (N, H, S, 2) of the brackets: copy_last, constant_velocity, encoder_truth."""
    last = read_positions(probe, qs.history.slots[:, -1:])  # (N, 1, S, 2)
    prev = read_positions(probe, qs.history.slots[:, -2:-1])
    steps = np.arange(1, horizon + 1, dtype=np.float32)[None, :, None, None]
    return {"copy_last": np.repeat(last, horizon, axis=1), "constant_velocity": last + steps * (last - prev),
            "encoder_truth": read_positions(probe, qs.future.slots)}
