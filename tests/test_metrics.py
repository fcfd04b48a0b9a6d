"""Tests of hclsm.metrics: segmentation (cross-checked with scikit-learn), graphs and events."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, roc_auc_score

from hclsm.metrics import (
    ari,
    edge_accuracy,
    edge_auc,
    edge_precision_recall_f1,
    event_prf,
    fg_ari,
    fg_ari_per_frame,
    fg_ari_video,
    hungarian_match,
    is_dag,
    match_slots_to_objects,
    miou_hungarian,
    prf_from_counts,
    shd,
)


def _random_masks(rng, shape, n_obj=4, n_slots=6, agree=0.7):
    """True ids 0..n_obj (0 = background); predictions that agree with a relabelling of the truth with prob agree."""
    true = rng.integers(0, n_obj + 1, size=shape)
    relabel = rng.permutation(n_slots)[: n_obj + 1]
    pred = np.where(rng.random(shape) < agree, relabel[true], rng.integers(0, n_slots, size=shape))
    return true, pred


SHAPES = [(2, 3, 8, 8), (1, 5, 6, 7), (3, 2, 4, 4), (4, 6, 5)]


# ---------------------------------------------------------------- FG-ARI / ARI

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fg_ari_video_matches_sklearn(shape, seed):
    rng = np.random.default_rng(seed)
    true, pred = _random_masks(rng, shape)
    t, p = (true, pred) if len(shape) == 4 else (true[None], pred[None])
    expected = []
    for b in range(t.shape[0]):
        fg = t[b] != 0
        expected.append(adjusted_rand_score(t[b][fg], p[b][fg]))
    per = fg_ari(true, pred, return_per_sample=True)
    np.testing.assert_allclose(per, expected, rtol=0, atol=1e-10)
    assert fg_ari_video(true, pred) == pytest.approx(np.mean(expected), abs=1e-10)
    assert 0.0 < fg_ari(true, pred) < 1.0


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fg_ari_per_frame_matches_sklearn(shape, seed):
    rng = np.random.default_rng(seed + 10)
    true, pred = _random_masks(rng, shape)
    t, p = (true, pred) if len(shape) == 4 else (true[None], pred[None])
    t = t.copy()
    t[0, 0] = 0  # a frame without foreground is left out of the per-frame average
    per_video = []
    for b in range(t.shape[0]):
        frames = [adjusted_rand_score(t[b, i][t[b, i] != 0], p[b, i][t[b, i] != 0])
                  for i in range(t.shape[1]) if (t[b, i] != 0).any()]
        per_video.append(np.mean(frames))
    np.testing.assert_allclose(fg_ari(t, p, per_frame=True, return_per_sample=True), per_video, atol=1e-10)
    assert fg_ari_per_frame(t, p) == pytest.approx(np.mean(per_video), abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ari_all_pixels_matches_sklearn(seed):
    rng = np.random.default_rng(seed + 20)
    true, pred = _random_masks(rng, (2, 3, 6, 6))
    expected = [adjusted_rand_score(true[b].ravel(), pred[b].ravel()) for b in range(2)]
    np.testing.assert_allclose(ari(true, pred, return_per_sample=True), expected, atol=1e-10)
    frames = [[adjusted_rand_score(true[b, i].ravel(), pred[b, i].ravel()) for i in range(3)] for b in range(2)]
    assert ari(true, pred, per_frame=True) == pytest.approx(np.mean(frames), abs=1e-10)


def test_fg_ari_invariant_to_pred_permutation_and_accepts_torch():
    rng = np.random.default_rng(3)
    true, pred = _random_masks(rng, (2, 4, 8, 8))
    perm = rng.permutation(100)
    base = fg_ari(true, pred)
    assert fg_ari(true, perm[pred]) == pytest.approx(base, abs=1e-12)
    assert fg_ari(torch.from_numpy(true), torch.from_numpy(perm[pred])) == pytest.approx(base, abs=1e-12)
    assert fg_ari(true, pred, per_frame=True) == pytest.approx(fg_ari(true, perm[pred], per_frame=True), abs=1e-12)


def test_fg_ari_perfect_split_and_background_ignored():
    true = np.zeros((1, 2, 4, 4), dtype=np.int64)
    true[0, :, :2, :2], true[0, :, 2:, 2:] = 1, 2
    pred = np.where(true == 1, 7, np.where(true == 2, 3, 5))
    assert fg_ari(true, pred) == 1.0
    assert fg_ari(true, pred, per_frame=True) == 1.0
    # background pixels predicted as anything do not matter
    pred_bg = pred.copy()
    pred_bg[true == 0] = 7
    assert fg_ari(true, pred_bg) == 1.0
    assert ari(true, pred_bg) < 1.0
    # splitting every object in half
    split = pred.copy()
    split[0, :, 0, :2], split[0, :, 2, 2:] = 11, 12
    assert fg_ari(true, split) < 1.0
    expected = adjusted_rand_score(true[true != 0], split[true != 0])
    assert fg_ari(true, split) == pytest.approx(expected, abs=1e-12)


def test_identity_swap_hurts_video_level_only():
    true = np.zeros((3, 4, 4), dtype=np.int64)
    true[:, :, :2], true[:, :, 2:] = 1, 2
    pred = true.copy()
    pred[1] = 3 - true[1]  # slots swap objects in frame 1
    assert fg_ari_per_frame(true, pred) == 1.0
    video = fg_ari_video(true, pred)
    assert video < 0.5
    assert video == pytest.approx(adjusted_rand_score(true.ravel(), pred.ravel()), abs=1e-12)


def test_fg_ari_edge_cases():
    # one true object and one predicted segment: zero denominator -> 1.0
    true = np.ones((2, 3, 3), dtype=np.int64)
    assert fg_ari(true, np.full_like(true, 4)) == 1.0
    # a single foreground pixel -> 1.0
    single = np.zeros((1, 3, 3), dtype=np.int64)
    single[0, 1, 1] = 2
    assert fg_ari(single, np.arange(9).reshape(1, 3, 3)) == 1.0
    # a video without foreground is NaN per sample and excluded from the mean
    true_b = np.zeros((2, 2, 3, 3), dtype=np.int64)
    true_b[0, :, :, :1], true_b[0, :, :, 1:] = 1, 2
    pred_b = true_b.copy()
    pred_b[0, :, 0, 1] = 1
    per = fg_ari(true_b, pred_b, return_per_sample=True)
    assert np.isnan(per[1]) and per[0] < 1.0
    assert fg_ari(true_b, pred_b) == pytest.approx(per[0])
    assert np.isnan(fg_ari(np.zeros((2, 3, 3), dtype=np.int64), np.zeros((2, 3, 3), dtype=np.int64)))


def test_segmentation_shape_errors():
    with pytest.raises(ValueError, match="same shape"):
        fg_ari(np.zeros((2, 3, 3), dtype=int), np.zeros((2, 3, 4), dtype=int))
    with pytest.raises(ValueError, match="argmax"):
        fg_ari(np.zeros((1, 2, 5, 3, 3), dtype=int), np.zeros((1, 2, 5, 3, 3), dtype=int))
    with pytest.raises(ValueError, match="integer ids"):
        miou_hungarian(np.zeros((2, 3, 3), dtype=int), np.zeros((2, 3, 3)))


# ---------------------------------------------------------------- mIoU and matching

def _brute_miou(t, p, ignore_background=True):
    t, p = t.ravel(), p.ravel()
    objs = [o for o in np.unique(t) if not (ignore_background and o == 0)]
    segs = list(np.unique(p))
    iou = {(o, s): ((t == o) & (p == s)).sum() / ((t == o) | (p == s)).sum() for o in objs for s in segs}
    best = 0.0
    for choice in itertools.permutations(segs + [None] * len(objs), len(objs)):
        best = max(best, sum(iou[o, s] for o, s in zip(objs, choice) if s is not None))
    return best / len(objs)


def test_miou_perfect_under_permutation_and_hand_case():
    rng = np.random.default_rng(4)
    true = rng.integers(0, 5, size=(2, 3, 6, 6))
    perm = rng.permutation(50)
    assert miou_hungarian(true, perm[true]) == 1.0
    assert miou_hungarian(torch.from_numpy(true), torch.from_numpy(perm[true]), per_frame=True) == 1.0
    # hand case, one frame: object 1 = 4 px, object 2 = 2 px, background 2 px
    true = np.array([[[1, 1, 1, 1], [2, 2, 0, 0]]])
    pred = np.array([[[5, 5, 5, 9], [9, 9, 9, 9]]])
    # IoU(1,5)=3/4, IoU(1,9)=1/8, IoU(2,5)=0, IoU(2,9)=2/5 -> best 3/4 + 2/5
    assert miou_hungarian(true, pred) == pytest.approx((0.75 + 0.4) / 2)
    # background as an object: IoU(0,9) = 2/5 competes with object 2 for segment 9
    assert miou_hungarian(true, pred, ignore_background=False) == pytest.approx((0.75 + 0.4 + 0) / 3)


def test_miou_extra_segment_and_missing_object():
    true = np.zeros((1, 2, 4, 4), dtype=np.int64)
    true[0, :, :2, :2], true[0, :, 2:, 2:], true[0, :, :2, 2:] = 1, 2, 3
    extra = true.copy()
    extra[0, :, 2:, :2] = 8  # an extra predicted segment on the background
    assert miou_hungarian(true, extra) == 1.0
    missing = true.copy()
    missing[missing == 3] = 0  # object 3 merged into the background segment
    # objects 1, 2 perfect; object 3 (8 px) gets the background segment (16 px): IoU = 8 / 16
    assert miou_hungarian(true, missing) == pytest.approx((1 + 1 + 8 / 16) / 3)
    fewer_slots = np.where(true == 1, 1, 2)  # only two segments for three objects: one object gets 0
    assert miou_hungarian(true, fewer_slots) == pytest.approx(_brute_miou(true, fewer_slots))
    assert miou_hungarian(true, fewer_slots) == pytest.approx((1 + 8 / 24 + 0) / 3)  # segment 2 has 24 px


@pytest.mark.parametrize("seed", range(6))
def test_miou_matches_brute_force(seed):
    rng = np.random.default_rng(seed + 30)
    true, pred = _random_masks(rng, (2, 2, 4, 4), n_obj=3, n_slots=4, agree=0.6)
    expected = [_brute_miou(true[b], pred[b]) for b in range(2)]
    np.testing.assert_allclose(miou_hungarian(true, pred, return_per_sample=True), expected, atol=1e-12)
    frames = [np.mean([_brute_miou(true[b, i], pred[b, i]) for i in range(2)]) for b in range(2)]
    assert miou_hungarian(true, pred, per_frame=True) == pytest.approx(np.mean(frames), abs=1e-12)
    expected_bg = np.mean([_brute_miou(true[b], pred[b], ignore_background=False) for b in range(2)])
    assert miou_hungarian(true, pred, ignore_background=False) == pytest.approx(expected_bg, abs=1e-12)


def test_hungarian_match_and_slot_matching():
    rows, cols = hungarian_match(np.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0]]))
    assert rows.tolist() == [0, 1] and cols.tolist() == [1, 0]
    rows, cols = hungarian_match(np.array([[0.9, 0.1], [0.8, 0.7]]), maximize=True)
    assert cols.tolist() == [0, 1]
    slots = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    objs = torch.tensor([[8.5, 0.5], [0.2, -0.1]])
    obj_idx, slot_idx = match_slots_to_objects(slots, objs)
    assert obj_idx.tolist() == [0, 1] and slot_idx.tolist() == [2, 0]
    with pytest.raises(ValueError):
        hungarian_match(np.zeros(3))
    with pytest.raises(ValueError):
        match_slots_to_objects(np.zeros((3, 2)), np.zeros((2, 3)))


# ---------------------------------------------------------------- graphs

TRUE = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])  # 0 -> 1 -> 2


def test_shd_and_accuracy_hand_cases():
    missing = np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])
    extra = TRUE + np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0]])
    reversed_ = np.array([[0, 0, 0], [1, 0, 1], [0, 0, 0]])
    for pred in (missing, extra):
        assert shd(TRUE, pred) == 1.0 and shd(TRUE, pred, reversal_counts_double=True) == 1.0
        assert edge_accuracy(TRUE, pred) == pytest.approx(5 / 6)
    assert shd(TRUE, reversed_) == 1.0
    assert shd(TRUE, reversed_, reversal_counts_double=True) == 2.0
    assert edge_accuracy(TRUE, reversed_) == pytest.approx(4 / 6)
    assert shd(TRUE, TRUE) == 0.0 and edge_accuracy(TRUE, TRUE) == 1.0
    empty, full = np.zeros((3, 3)), np.ones((3, 3))  # diagonal of `full` is ignored
    assert shd(empty, full) == 3.0 and shd(empty, full, reversal_counts_double=True) == 6.0
    assert edge_accuracy(empty, full) == 0.0
    # probabilities are thresholded; batch -> mean; torch accepted
    probs = torch.tensor([[0.1, 0.9, 0.2], [0.3, 0.0, 0.4], [0.0, 0.0, 0.0]])
    assert shd(TRUE, probs) == 1.0 and shd(TRUE, probs, threshold=0.35) == 0.0
    batch_true, batch_pred = np.stack([TRUE, TRUE]), np.stack([TRUE, reversed_])
    assert shd(batch_true, batch_pred) == 0.5
    np.testing.assert_array_equal(shd(batch_true, batch_pred, return_per_sample=True), [0.0, 1.0])
    assert edge_accuracy(batch_true, batch_pred) == pytest.approx((1 + 4 / 6) / 2)


def test_edge_prf_and_errors():
    pred = np.array([[0, 0, 1], [0, 0, 1], [0, 0, 0]])  # 0->2 (fp), 1->2 (tp); 0->1 missed
    out = edge_precision_recall_f1(TRUE, pred)
    assert (out["tp"], out["n_pred"], out["n_true"]) == (1, 2, 2)
    assert out["precision"] == 0.5 and out["recall"] == 0.5 and out["f1"] == 0.5
    assert edge_precision_recall_f1(np.zeros((3, 3)), np.eye(3))["f1"] == 1.0  # diagonal ignored, both empty
    with pytest.raises(ValueError, match="same shape"):
        shd(np.zeros((3, 3)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="valid"):
        shd(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), valid=np.ones((2, 4), bool))


def test_edge_auc_matches_sklearn_and_reads_rankings_under_any_threshold():
    rng = np.random.default_rng(0)
    true = rng.random((40, 4, 4)) < 0.3
    scores = np.round(rng.normal(size=(40, 4, 4)) + 1.5 * true, 1)  # rounded: ties between the classes
    off = ~np.eye(4, dtype=bool)[None].repeat(40, 0)
    assert edge_auc(true, scores) == pytest.approx(roc_auc_score(true[off], scores[off]))
    assert edge_auc(TRUE, 5.0 * TRUE - 10.0) == 1.0  # perfect ranking, though every score is below 0
    assert edge_auc(TRUE, -TRUE.astype(float)) == 0.0 and edge_auc(TRUE, np.zeros((3, 3))) == 0.5
    valid = np.array([True, True, False])  # only 0 <-> 1 scored: one edge, one non-edge
    assert edge_auc(TRUE, np.array([[0, 1, 0], [2, 0, 0], [0, 0, 0]]), valid=valid) == 0.0
    assert np.isnan(edge_auc(np.zeros((3, 3)), np.ones((3, 3))))
    with pytest.raises(ValueError, match="shape"):
        edge_auc(TRUE, np.zeros((4, 4)))


def test_valid_mask_excludes_padding():
    pad_true = np.zeros((2, 4, 4))
    pad_true[:, :3, :3] = TRUE
    pad_pred = pad_true.copy()
    pad_pred[:, 3, :] = 1  # garbage edges from / to the padded object 3
    pad_pred[:, :, 3] = 1
    pad_pred[1, :3, :3] = np.array([[0, 0, 0], [1, 0, 1], [0, 0, 0]])  # sample 1: reversed edge
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(shd(pad_true, pad_pred, valid=valid, return_per_sample=True), [0.0, 1.0])
    assert edge_accuracy(pad_true, pad_pred, valid=valid) == pytest.approx((1 + 4 / 6) / 2)
    assert shd(pad_true, pad_pred) > 1.0  # without the mask the padding counts
    assert edge_precision_recall_f1(pad_true, pad_pred, valid=valid)["tp"] == 3
    # a sample with < 2 valid objects has no pairs: accuracy NaN, excluded from the mean
    valid1 = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool)
    acc = edge_accuracy(pad_true, pad_pred, valid=valid1, return_per_sample=True)
    assert acc[0] == 1.0 and np.isnan(acc[1])
    assert edge_accuracy(pad_true, pad_pred, valid=valid1) == 1.0


def test_is_dag():
    cycle = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])
    assert is_dag(TRUE) is True and is_dag(cycle) is False
    assert is_dag(TRUE + np.eye(3, dtype=int)) is True  # self-loops are ignored
    assert is_dag(np.array([[0, 1], [1, 0]])) is False
    np.testing.assert_array_equal(is_dag(np.stack([TRUE, cycle, np.zeros((3, 3), int)])), [True, False, True])
    # the cycle passes through node 2; dropping it as padding makes the graph acyclic
    assert is_dag(cycle, valid=np.array([1, 1, 0], bool)) is True


# ---------------------------------------------------------------- events

def test_event_prf_hits_and_tolerance():
    true = np.zeros(20, dtype=bool)
    true[[3, 10, 15]] = True
    out = event_prf(true, true.copy(), tolerance=0)
    assert (out["precision"], out["recall"], out["f1"], out["tp"]) == (1.0, 1.0, 1.0, 3)
    pred = np.zeros(20, dtype=bool)
    pred[[4, 10, 17]] = True  # 4: off by one; 17: off by two
    out = event_prf(true, pred, tolerance=1)
    assert (out["tp"], out["n_pred"], out["n_true"]) == (2, 3, 3)
    assert out["precision"] == pytest.approx(2 / 3) and out["f1"] == pytest.approx(2 / 3)
    assert event_prf(true, pred, tolerance=0)["tp"] == 1
    assert event_prf(true, pred, tolerance=2)["tp"] == 3
    # index lists and torch tensors give the same answer
    assert event_prf([3, 10, 15], [4, 10, 17])["tp"] == 2
    assert event_prf(torch.from_numpy(true), [4, 10, 17])["tp"] == 2


def test_event_one_to_one_matching():
    one = event_prf([5, 7], [6], tolerance=1)  # one prediction cannot match two true events
    assert (one["tp"], one["precision"], one["recall"]) == (1, 1.0, 0.5)
    two = event_prf([6], [5, 7], tolerance=1)  # nor two predictions one true event
    assert (two["tp"], two["precision"], two["recall"]) == (1, 0.5, 1.0)
    # a greedy "closest first" would pair 2 with 3 and leave 4 unmatched; the optimum matches both
    assert event_prf([1, 3], [2, 4], tolerance=1)["tp"] == 2
    assert event_prf([2, 4], [1, 3], tolerance=1)["tp"] == 2


@pytest.mark.parametrize("seed", range(5))
def test_event_matching_is_maximum(seed):
    rng = np.random.default_rng(seed + 40)
    for _ in range(20):
        true = rng.integers(0, 30, size=rng.integers(0, 10))
        pred = rng.integers(0, 30, size=rng.integers(0, 10))
        tol = int(rng.integers(0, 4))
        ok = np.abs(pred[:, None] - true[None, :]) <= tol
        best = 0
        if ok.size:
            rows, cols = linear_sum_assignment(ok.astype(float), maximize=True)
            best = int(ok[rows, cols].sum())
        assert event_prf([true.tolist()], [pred.tolist()], tolerance=tol)["tp"] == best


def test_event_empty_cases_and_batch():
    empty = np.zeros(10, dtype=bool)
    assert event_prf(empty, empty) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "n_pred": 0,
                                       "n_true": 0}
    assert event_prf([], [3])["f1"] == 0.0 and event_prf([], [3])["precision"] == 0.0
    assert event_prf([3], [])["recall"] == 0.0 and event_prf([3], [])["f1"] == 0.0
    # micro-average over the batch: counts are summed before the ratios
    true = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=np.int64)
    pred = np.array([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=np.int64)
    out = event_prf(true, pred, tolerance=0)
    assert (out["tp"], out["n_pred"], out["n_true"]) == (1, 3, 1)
    assert out["precision"] == pytest.approx(1 / 3) and out["recall"] == 1.0
    assert event_prf([[0], []], [[0], [2, 3]], tolerance=0) == out
    assert prf_from_counts(2, 4, 2)["f1"] == pytest.approx(2 * 0.5 * 1 / 1.5)
    with pytest.raises(ValueError, match="batch sizes"):
        event_prf(np.zeros((2, 5)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="lengths"):
        event_prf(np.zeros(5), np.zeros(6))
    with pytest.raises(ValueError, match="0/1"):
        event_prf(np.full(5, 0.3), np.zeros(5))
    with pytest.raises(ValueError, match="tolerance"):
        event_prf([1], [1], tolerance=-1)
