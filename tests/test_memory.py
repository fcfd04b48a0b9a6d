"""Layer 5: the episodic Hopfield memory (capacity, novelty, least-recently-used replacement, retrieval, causality)
and EWC (a real Fisher, the penalty, ``hclsm train --continual`` and its exact resume).

The memory inside the dynamics (past blind to the future, ``step`` equals ``forward``, a gradient for every
parameter) is checked with the other dynamics variants in test_dynamics.py (the ``memory`` cases of ``CAUSAL``).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from hclsm import keys
from hclsm.config import MemoryConfig, PhysicsDataConfig, load_config, save_config
from hclsm.data.physics import generate_physics_dataset
from hclsm.errors import HclsmError
from hclsm.models import build_model
from hclsm.nn.memory import HopfieldMemory
from hclsm.train import latest_checkpoint, read_log, train
from hclsm.train import loop as train_loop
from hclsm.train.checkpoint import read_checkpoint_tensors
from hclsm.train.continual import EWC_FILE, task_train_clips, train_continual
from hclsm.train.ewc import EWC, consolidate, estimate_fisher, fisher_agreement
from hclsm.train.rehearsal import ReplayBuffer, replayed_count
from helpers import SMALL, assert_user_error, run


def test_normalised_online_ewc_over_three_tasks(data):
    """Each task's Fisher is divided by its own mean (so lambda means the same for any loss scale), older tasks
    fade by train.ewc_decay, and two halves of the samples agree on the parameters' ranking."""
    cfg = model_cfg("train.ewc_samples=4")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    clips = task_train_clips(cfg, data)
    whole, first, second = estimate_fisher(model, clips, cfg.train, stage=2, halves=True)
    for n in whole:  # the halves average to the whole
        torch.testing.assert_close((first[n] + second[n]) / 2, whole[n], rtol=1e-5, atol=1e-12)
    assert 0.3 < fisher_agreement(first, second) <= 1.0 and fisher_agreement(first, first) == pytest.approx(1.0)
    scaled = {n: 1000.0 * f for n, f in whole.items()}  # the same task with a loss 1000x larger ...
    a, b = consolidate(None, model, whole), consolidate(None, model, scaled)
    assert all(torch.allclose(a.fisher[n], b.fisher[n], rtol=1e-5) for n in whole)  # ... gets the same penalty
    assert a.stats()["fisher_mean"] == pytest.approx(1.0, rel=1e-4)
    assert b.scale == pytest.approx(1000 * a.scale, rel=1e-4)
    st = a.stats()
    assert 0 <= st["fisher_p50"] <= st["fisher_p90"] <= st["fisher_p99"] <= st["fisher_max"]
    assert 0.01 <= st["fisher_top1_share"] <= 1.0
    three = consolidate(consolidate(a, model, scaled, decay=0.5), model, whole, decay=0.5)  # F3 + .5 F2 + .25 F1
    assert three.tasks == 3
    assert all(torch.allclose(three.fisher[n], 1.75 * a.fisher[n], rtol=1e-5) for n in whole)
    back = EWC.from_tensors(three.tensors())
    assert back.scale == pytest.approx(three.scale) and back.tasks == 3


def test_the_replay_buffer_keeps_its_bound_and_splits_it_evenly_over_tasks(data, data_b):
    cfg = model_cfg()
    a, b = task_train_clips(cfg, data), task_train_clips(cfg, data_b)
    buf = ReplayBuffer(capacity=7, seed=0)
    buf.add_task(a)
    assert len(buf) == 7 and buf.counts == [7]
    kept_a = buf.stored[keys.VIDEO][:3].clone()
    buf.add_task(b)
    buf.add_task(a)
    assert buf.counts == [3, 2, 2] and len(buf) == 7  # 7 // 3, the first task keeps the remainder
    assert torch.equal(buf.stored[keys.VIDEO][:3], kept_a)  # an earlier task keeps a prefix of its draw
    assert buf.stored[keys.VIDEO].dtype == torch.uint8
    assert 0 < buf.nbytes <= buf.bound_bytes
    one = a.get([0])
    assert buf.bound_bytes == 7 * one[keys.VIDEO][0].numel()  # uint8 frames; no actions in these scenes
    assert set(buf.stored) == {keys.VIDEO}  # ground truth (masks, positions: one ball or four) is not kept
    g = torch.Generator().manual_seed(0)
    mixed = buf.mix(a.get([0, 1, 2]), 2, g)
    assert mixed[keys.VIDEO].shape[0] == 5 and mixed[keys.VIDEO].dtype == torch.float32
    assert torch.equal(mixed[keys.VIDEO][:3], a.get([0, 1, 2])[keys.VIDEO])
    stored = buf.stored[keys.VIDEO].float() / 255
    for clip in mixed[keys.VIDEO][3:]:  # every replayed clip is one the buffer holds
        assert any(torch.equal(clip, s) for s in stored)
    assert replayed_count(8, 0.5) == 4 and replayed_count(2, 0.9) == 1 and replayed_count(4, 0.01) == 1
    longer = task_train_clips(model_cfg("data.clip.length=4"), data)
    with pytest.raises(HclsmError, match="same fields and shapes"):
        buf.add_task(longer)
    with pytest.raises(HclsmError, match="rehearsal_clips=0"):
        buf.check_batch(longer.get([0]))


def memory(size: int = 4, threshold: float = 0.9, d: int = 16) -> HopfieldMemory:
    torch.manual_seed(0)
    return HopfieldMemory(d, MemoryConfig(enabled=True, size=size, d_memory=8, write_threshold=threshold))


def basis(*i: int, d: int = 16) -> torch.Tensor:
    """Orthogonal states e_i as one step's states of one sequence: (1, len(i), d)."""
    return torch.eye(d)[list(i)][None]


def stored(state) -> list[int]:
    """Which basis vectors the memory of sequence 0 holds."""
    return sorted(int(p.argmax()) for p, v in zip(state.patterns[0], state.valid[0]) if v)


# ---- the memory ---------------------------------------------------------------------------------------

def test_capacity_is_never_exceeded_and_the_newest_states_are_kept():
    mem = memory(size=5)
    g = torch.Generator().manual_seed(0)
    state = mem.init_state(2)
    for t in range(8):  # 3 novel states per step, 24 in all, into 5 rows
        x = torch.randn(2, 3, 16, generator=g)
        _, state = mem.step(x, torch.ones(2, 3), state)
        assert state.patterns.shape[1] <= 5 and state.owner.shape[1] <= 5
        assert state.count.tolist() == [min(3 * (t + 1), 5)] * 2
    assert all(any(torch.equal(p, s) for p in state.patterns[b]) for b in range(2) for s in x[b])


def test_a_repeated_state_is_not_written_again():
    mem = memory(size=8)
    x = basis(0)
    state = mem.write(x, torch.ones(1, 1), mem.init_state(1))
    state = mem.write(3 * x, torch.ones(1, 1), state)  # the same direction (cosine 1)
    state = mem.write(x + 0.05 * basis(1), torch.ones(1, 1), state)  # a near repeat (cosine 0.999)
    assert state.count.tolist() == [1]
    state = mem.write(torch.cat([basis(2), basis(2)], 1), torch.ones(1, 2), state)  # two equal states of one step
    assert stored(state) == [0, 2]
    state = mem.write(basis(3), torch.zeros(1, 1), state)  # a dead object writes nothing
    assert stored(state) == [0, 2]


def test_a_full_memory_replaces_the_least_recently_used_entry():
    mem = memory(size=3)
    state = mem.init_state(1)
    for i in range(3):  # a at step 0, b at 1, c at 2: full
        state = mem.write(basis(i), torch.ones(1, 1), state)
    row_a = int(state.patterns[0, :, 0].argmax())
    used = torch.zeros(1, 3, dtype=torch.bool)
    used[0, row_a] = True
    state = mem.write(basis(0), torch.ones(1, 1), state, used)  # step 3 read a (and a is no news)
    assert stored(state) == [0, 1, 2]
    state = mem.write(basis(3), torch.ones(1, 1), state)  # d replaces b: the oldest write, never used since
    assert stored(state) == [0, 2, 3] and state.patterns.shape[1] == 3


def test_hopfield_recall_retrieves_stored_patterns_from_noisy_queries():
    mem = memory(size=64, threshold=0.95, d=32)
    g = torch.Generator().manual_seed(1)
    patterns = torch.randn(1, 40, 32, generator=g)
    state = mem.write(patterns, torch.ones(1, 40), mem.init_state(1))
    assert state.count.tolist() == [40]  # random states are all novel
    noisy = patterns + 0.5 * torch.randn(patterns.shape, generator=g)  # noise at half the patterns' scale
    retrieved, w = mem.recall(noisy, state, beta=16.0)
    order = state.patterns[0] @ patterns[0].T  # stored row -> pattern index
    row_of = order.argmax(0)
    assert torch.equal(w[0].argmax(-1), row_of)  # top-1 retrieval is the pattern every query came from
    assert F.cosine_similarity(retrieved[0], patterns[0], dim=-1).min() > 0.9
    assert F.cosine_similarity(noisy[0], patterns[0], dim=-1).mean() < 0.95  # the queries were noisy


def test_an_empty_memory_reads_exactly_zero_and_a_step_reads_only_earlier_steps():
    mem = memory(size=16)
    g = torch.Generator().manual_seed(2)
    h = torch.randn(2, 6, 3, 16, generator=g)
    alive = torch.ones(2, 6, 3)
    out = mem(h, alive)
    assert torch.equal(out[:, 0], h[:, 0])  # nothing written yet
    assert not torch.allclose(out[:, 1:], h[:, 1:])  # later steps read something
    h2 = h.clone()
    h2[:, 3:] += 3 * torch.randn(h2[:, 3:].shape, generator=g)
    out2 = mem(h2, alive)
    assert torch.equal(out2[:, :3], out[:, :3])  # the past is blind to the future
    h3 = h.clone()
    h3[:, 0] += 3 * torch.randn(h3[:, 0].shape, generator=g)
    assert not torch.allclose(mem(h3, alive)[:, 4], out[:, 4])  # ... but the future reads the past


def test_with_a_causal_graph_an_object_reads_only_its_own_and_its_parents_entries():
    mem = memory(size=16)
    state = mem.write(basis(0, 1, 2), torch.ones(1, 3), mem.init_state(1))  # objects 0, 1, 2 write one each
    adjacency = torch.zeros(1, 3, 3)
    adjacency[0, 2, 0] = 1  # 2 reads 0
    _, w = mem.read(torch.randn(1, 3, 16), state, adjacency)
    owner = state.owner[0]
    reads = [sorted(int(owner[j]) for j in range(w.shape[-1]) if w[0, i, j] > 0) for i in range(3)]
    assert reads == [[0], [1], [0, 2]]


# ---- EWC --------------------------------------------------------------------------------------------

def model_cfg(*extra: str):
    return load_config("tiny", overrides=[*SMALL, "model.memory.enabled=true", "model.memory.size=8",
                                          "data.clip.length=3", "train.ewc_samples=3", "train.val_fraction=0", "train.threads=1",
                                          *extra])


def test_the_fisher_is_real_and_the_penalty_is_zero_only_at_the_anchor(data):
    cfg = model_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    clips = task_train_clips(cfg, data)
    fisher = estimate_fisher(model, clips, cfg.train, stage=2)
    again = estimate_fisher(model, clips, cfg.train, stage=2)
    assert all(torch.equal(fisher[n], again[n]) for n in fisher)  # a function of weights, clips and seed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(fisher) == trainable
    nonzero = {n for n, f in fisher.items() if f.sum() > 0 and torch.isfinite(f).all()}
    # most parameters matter to 3-frame clips (not all: no actions in these scenes, no events yet for L1 / L2)
    assert len(nonzero) > 0.6 * len(fisher)
    assert {"objects.decoder.net.6.weight", "dynamics.head.3.weight", "dynamics.memory.value.weight",
            "dynamics.memory.out.weight"} <= nonzero
    ewc = consolidate(None, model, fisher, normalize=False)
    assert ewc.penalty(model).item() == 0.0
    name, p = next((n, p) for n, p in model.named_parameters() if n.startswith("dynamics.memory.query"))
    with torch.no_grad():
        p.add_(0.1)
    expected = 0.5 * (fisher[name] * 0.01).sum()
    torch.testing.assert_close(ewc.penalty(model), expected, rtol=1e-4, atol=0)
    (grad,) = torch.autograd.grad(ewc.penalty(model), [p])
    torch.testing.assert_close(grad, fisher[name] * 0.1, rtol=1e-4, atol=1e-12)  # pulled back to the anchor
    twice = consolidate(ewc, model, fisher, normalize=False)  # online EWC: Fisher summed, anchors moved
    assert twice.tasks == 2 and torch.equal(twice.fisher[name], 2 * fisher[name]) and twice.penalty(model).item() == 0
    back = EWC.from_tensors(twice.tensors())
    assert back.tasks == 2 and all(torch.equal(back.fisher[n], twice.fisher[n]) for n in fisher)


@pytest.fixture(scope="module")
def data_b(tmp_path_factory):
    """Task B: other scenes than ``data`` (more balls, all joined by springs)."""
    out = tmp_path_factory.mktemp("physics-b") / "physics"
    generate_physics_dataset(out, PhysicsDataConfig(episodes=4, frames=8, image_size=32, min_objects=4, max_objects=4,
                                                    spring_prob=1.0, follow_prob=0.0, seed=5), progress=False)
    return out


def continual_cfg(tmp_path, name: str):
    return model_cfg("train.steps=6", "train.batch_size=2", "train.warmup_steps=2", "train.ckpt_every=3",
                     "train.eval_every=0", "train.log_every=1", "train.stage1_fraction=0.5", "train.device=cpu",
                     "train.rehearsal_clips=3", f"train.out_dir={tmp_path}", f"train.run_name={name}")


def test_continual_training_resumes_bit_identical(tmp_path, data, data_b, monkeypatch, capsys):
    whole = train_continual(continual_cfg(tmp_path, "whole"), [data, data_b], progress=False)
    run_dir = whole.run_dir
    assert [r.steps for r in whole.tasks] == [6, 6]
    log_b = read_log(run_dir / "task2" / "log.jsonl")
    assert all("ewc" in r["losses"] for r in log_b if "loss" in r)  # task B trains under the penalty
    assert any(r["losses"]["ewc"] > 0 for r in log_b if "loss" in r)  # ... which B's steps make non-zero
    assert "ewc" not in next(r for r in read_log(run_dir / "task1" / "log.jsonl") if "loss" in r)["losses"]
    ewc_a = EWC.load(run_dir / "task1" / EWC_FILE)
    assert ewc_a.tasks == 1 and ewc_a.stats()["fisher_nonzero"] > 0.5
    saved = EWC.from_tensors(read_checkpoint_tensors(latest_checkpoint(run_dir / "task2")))
    assert saved is not None and all(torch.equal(saved.fisher[n], ewc_a.fisher[n]) for n in ewc_a.fisher)
    assert whole.ewc.tasks == 2
    summaries = [json.loads((run_dir / f"task{i}" / "summary.json").read_text()) for i in (1, 2)]
    assert [s["replayed_clips"] for s in summaries] == [0, 3]  # task B replays 3 kept clips of task A
    assert len(whole.replay) == 3 and whole.replay.counts == [3]

    real_step, calls = train_loop.train_step, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 11:  # killed in task B, after its checkpoint of step 3
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_loop, "train_step", dies)
    save_config(continual_cfg(tmp_path, "cut"), tmp_path / "cut.yaml")
    code, _, err = run(capsys, "train", "--continual", "--data", data, "--data", data_b, "--quiet", "--config",
                       tmp_path / "cut.yaml")
    assert code == 130, err
    monkeypatch.setattr(train_loop, "train_step", real_step)
    cut = tmp_path / "cut"
    assert latest_checkpoint(cut / "task2").name == "step_0000003" and not (cut / "task2" / EWC_FILE).exists()
    code, out, err = run(capsys, "train", "--resume", cut, "--quiet")
    assert code == 0, err
    assert "task 1:" in out and "finished before the resume" in out and "EWC after 2 tasks" in out
    assert "rehearsal: 3 clips" in out
    a, b = load_file(latest_checkpoint(run_dir / "task2") / "model.safetensors"), \
        load_file(latest_checkpoint(cut / "task2") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    fa, fb = load_file(run_dir / "task2" / EWC_FILE), load_file(cut / "task2" / EWC_FILE)
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    assert [r["step"] for r in read_log(cut / "task2" / "log.jsonl") if r.get("event") == "resumed"] == [3]
    assert json.loads((cut / "continual.json").read_text())["data"] == [str(data.resolve()), str(data_b.resolve())]


def test_continual_cli_refuses_bad_datasets_in_one_line_before_training(tmp_path, data, capsys):
    base = ["train", "--out", tmp_path, "--name", "r", "--quiet", "--steps", "2", "--set", "train.warmup_steps=1"]
    assert_user_error(*run(capsys, *base, "--continual", "--data", data, "--data", tmp_path / "missing")[::2],
                      str(tmp_path / "missing"), "hclsm data physics")
    assert not (tmp_path / "r").exists()
    assert_user_error(*run(capsys, *base, "--continual", "--data", data)[::2], "at least two datasets", "--data B")
    assert_user_error(*run(capsys, *base, "--data", data, "--data", data)[::2], "--continual")


def test_a_training_step_under_ewc_is_pulled_back_to_the_anchor(tmp_path, data):
    """The same steps from the same start: with a large EWC weight the parameters end nearer the anchor."""
    cfg = model_cfg("train.steps=8", "train.batch_size=2", "train.warmup_steps=0", "train.stage=2",
                    "train.eval_every=0", "train.ckpt_every=0", "train.device=cpu", "train.loss.ewc=1e6",
                    "train.lr=1e-2")
    torch.manual_seed(0)
    start = build_model(cfg.model)
    fisher = estimate_fisher(start, task_train_clips(cfg, data), cfg.train, stage=2)
    ewc = consolidate(None, start, fisher)
    drift = {}
    for name, e in (("free", None), ("ewc", ewc)):
        model = build_model(cfg.model)
        model.load_state_dict(start.state_dict())
        r = train(cfg, data, run_dir=tmp_path / name, progress=False,
                  model=model, ewc=e)
        drift[name] = ewc.penalty(r.model).item()
    assert 0 <= drift["ewc"] < 0.5 * drift["free"]
