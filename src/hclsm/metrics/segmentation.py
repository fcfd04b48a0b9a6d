"""Segmentation metrics for object-centric models: FG-ARI, ARI and Hungarian-matched mIoU.

Conventions
-----------
* Masks are integer id maps of shape (B, T, H, W), or (T, H, W) which is treated as B = 1; numpy arrays or
  torch tensors. True id 0 is background. Predicted ids are hard slot assignments (e.g. ``alpha.argmax(slot_dim)``)
  whose values are only labels: any permutation of the predicted ids gives the same scores.
* The pixels are the points being clustered.
* FG-ARI comes in two named variants:
  - video-level (``per_frame=False``, :func:`fg_ari_video`): one point set per video over all (t, h, w), so a slot
    that changes object between frames is penalised (SAVi / OCLF convention);
  - per-frame (``per_frame=True``, :func:`fg_ari_per_frame`): the ARI of each frame, averaged over the frames with at
    least one foreground pixel (SlotFormer convention).
* An ARI whose denominator is 0 (one true cluster and one predicted cluster, all singletons on both sides, or fewer
  than two points) is 1.0, as in SAVi / OCLF and scikit-learn.
* A video (or frame) with no foreground pixels has no FG-ARI: it is NaN in per-sample outputs and excluded from the
  means; a mean is NaN only when every element is NaN. mIoU treats a video / frame without true objects the same way.
* Arithmetic is float64. Batch means come back as Python floats, ``return_per_sample=True`` gives a float64 array
  of shape (B,). Shape or dtype mistakes are programmer errors and raise ``ValueError``.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["to_numpy", "fg_ari", "fg_ari_video", "fg_ari_per_frame", "ari", "miou_hungarian",
           "hungarian_match", "match_slots_to_objects"]


def to_numpy(x) -> np.ndarray:
    """Return ``x`` (numpy array, torch tensor, list, scalar) as a numpy array; float tensors become float64."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _nanmean(x: np.ndarray, axis=None):
    """Mean ignoring NaN; NaN (without a RuntimeWarning) where everything is NaN."""
    ok = ~np.isnan(x)
    count = ok.sum(axis=axis)
    total = np.where(ok, x, 0.0).sum(axis=axis)
    return np.divide(total, count, out=np.full(np.shape(total), np.nan), where=count > 0)


def _reduce(per_sample: np.ndarray, return_per_sample: bool):
    return per_sample if return_per_sample else float(_nanmean(per_sample))


def _id_maps(true_mask, pred_mask) -> tuple[np.ndarray, np.ndarray]:
    """Validate two id maps and return them as int64 arrays of shape (B, T, P), P = H * W."""
    t, p = to_numpy(true_mask), to_numpy(pred_mask)
    if t.shape != p.shape:
        raise ValueError(f"true_mask and pred_mask must have the same shape, got {t.shape} and {p.shape}")
    if t.ndim == 3:
        t, p = t[None], p[None]
    if t.ndim != 4:
        raise ValueError(f"expected id maps of shape (B, T, H, W) or (T, H, W), got {t.shape}; soft masks "
                         "(..., S, H, W) must be turned into ids first, e.g. with argmax over the slot axis")
    for name, a in (("true_mask", t), ("pred_mask", p)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
            raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype} (use argmax for soft masks)")
    b, n_t = t.shape[:2]
    return t.reshape(b, n_t, -1).astype(np.int64), p.reshape(b, n_t, -1).astype(np.int64)


def _dense_ids(x: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel arbitrary integer ids to 0..K-1; returns (relabelled (N,), K)."""
    ids, inv = np.unique(x, return_inverse=True)
    return inv.reshape(-1).astype(np.int64), len(ids)


def _comb2(n: np.ndarray) -> np.ndarray:
    return n * (n - 1) / 2.0


def _pair_sum(key: np.ndarray, divisor: int, n_groups: int) -> np.ndarray:
    """Sum of C(count, 2) over distinct keys, per group (group = key // divisor); (n_groups,)."""
    keys, counts = np.unique(key, return_counts=True)
    return np.bincount(keys // divisor, weights=_comb2(counts.astype(np.float64)), minlength=n_groups)


def _ari_groups(group: np.ndarray, t: np.ndarray, p: np.ndarray, n_groups: int) -> np.ndarray:
    """ARI of each group of points; group, t, p: (N,) ints. Returns (n_groups,), NaN for empty groups.

    Contingency-table formula: ARI = (sum_ij C(n_ij,2) - E) / ((a + b)/2 - E), a = sum_i C(a_i,2),
    b = sum_j C(b_j,2), E = a b / C(n,2). Only the non-empty cells are ever formed (sparse, memory O(N)).
    """
    out = np.full(n_groups, np.nan)
    if len(group) == 0:
        return out
    t, kt = _dense_ids(t)
    p, kp = _dense_ids(p)
    index = _pair_sum((group * kt + t) * kp + p, kt * kp, n_groups)
    a = _pair_sum(group * kt + t, kt, n_groups)
    b = _pair_sum(group * kp + p, kp, n_groups)
    n = np.bincount(group, minlength=n_groups).astype(np.float64)
    total = _comb2(n)
    # The denominator is 0 exactly in these cases (a, b, total are exact integers in float64).
    degenerate = (total == 0) | ((a == total) & (b == total)) | ((a == 0) & (b == 0))
    expected = np.divide(a * b, total, out=np.zeros(n_groups), where=total > 0)
    denom = np.where(degenerate, 1.0, (a + b) / 2.0 - expected)
    ari_ = np.where(degenerate, 1.0, (index - expected) / denom)
    out[n > 0] = ari_[n > 0]
    return out


def _ari_metric(t: np.ndarray, p: np.ndarray, keep: np.ndarray, per_frame: bool) -> np.ndarray:
    """Per-video ARI of (B, T, P) id maps over the points where ``keep``; (B,), NaN where undefined."""
    n_b, n_t, _ = t.shape
    n_groups = n_b * n_t if per_frame else n_b
    group = np.arange(n_groups).reshape(n_b, n_t if per_frame else 1, 1)
    group = np.broadcast_to(group, t.shape)[keep]
    scores = _ari_groups(group, t[keep], p[keep], n_groups)
    return _nanmean(scores.reshape(n_b, n_t), axis=1) if per_frame else scores


def fg_ari(true_mask, pred_mask, per_frame: bool = False, return_per_sample: bool = False):
    """Foreground-adjusted Rand index: ARI over the pixels whose true id is not 0.

    true_mask, pred_mask: (B, T, H, W) or (T, H, W) integer ids. ``per_frame=False`` is the video-level variant,
    ``per_frame=True`` the per-frame one (see the module docstring). Returns the mean over videos with foreground
    (float), or the (B,) per-video array (NaN for videos without foreground) if ``return_per_sample``.
    """
    t, p = _id_maps(true_mask, pred_mask)
    return _reduce(_ari_metric(t, p, t != 0, per_frame), return_per_sample)


def fg_ari_video(true_mask, pred_mask, return_per_sample: bool = False):
    """Video-level FG-ARI (SAVi / OCLF): one point set per video over all frames."""
    return fg_ari(true_mask, pred_mask, per_frame=False, return_per_sample=return_per_sample)


def fg_ari_per_frame(true_mask, pred_mask, return_per_sample: bool = False):
    """Per-frame FG-ARI (SlotFormer): ARI per frame, averaged over frames with foreground."""
    return fg_ari(true_mask, pred_mask, per_frame=True, return_per_sample=return_per_sample)


def ari(true_mask, pred_mask, per_frame: bool = False, return_per_sample: bool = False):
    """Adjusted Rand index over all pixels, background included; same shapes and options as :func:`fg_ari`."""
    t, p = _id_maps(true_mask, pred_mask)
    return _reduce(_ari_metric(t, p, np.ones(t.shape, dtype=bool), per_frame), return_per_sample)


def _miou_one(t: np.ndarray, p: np.ndarray, ignore_background: bool) -> float:
    """Hungarian mIoU of one point set; t, p: (N,) ids. NaN if there is no true object."""
    t_ids, t_inv = np.unique(t, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    kt, kp = len(t_ids), len(p_ids)
    inter = np.bincount(t_inv.reshape(-1) * kp + p_inv.reshape(-1), minlength=kt * kp)
    inter = inter.reshape(kt, kp).astype(np.float64)                      # (Kt, Kp)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = inter / union                                                     # union >= 1: every id occurs
    if ignore_background:
        iou = iou[t_ids != 0]
    if iou.shape[0] == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum() / iou.shape[0])                    # unmatched true objects add 0


def miou_hungarian(true_mask, pred_mask, ignore_background: bool = True, per_frame: bool = False,
                   return_per_sample: bool = False):
    """Mean IoU of true objects with their optimally assigned predicted segments.

    Per video (or per frame if ``per_frame``, then averaged over frames with a true object): IoU between every true
    object (ids present, 0 excluded if ``ignore_background``) and every predicted segment, computed over all pixels;
    one-to-one assignment maximising the total IoU; unmatched true objects score 0; mean over true objects. Extra
    predicted segments cost nothing. Returns the batch mean (float) or the (B,) array if ``return_per_sample``.
    """
    t, p = _id_maps(true_mask, pred_mask)
    n_b, n_t, _ = t.shape
    scores = np.full(n_b, np.nan)
    for b in range(n_b):
        if per_frame:
            frames = np.array([_miou_one(t[b, i], p[b, i], ignore_background) for i in range(n_t)])
            scores[b] = _nanmean(frames)
        else:
            scores[b] = _miou_one(t[b].reshape(-1), p[b].reshape(-1), ignore_background)
    return _reduce(scores, return_per_sample)


def hungarian_match(cost, maximize: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one assignment for an (N, M) cost matrix; returns (row_ind, col_ind), min(N, M) pairs each,
    rows in increasing order. ``maximize=True`` for scores such as IoU. Infinite entries are forbidden pairs."""
    c = to_numpy(cost).astype(np.float64)
    if c.ndim != 2:
        raise ValueError(f"cost must be a 2-D (N, M) matrix, got shape {c.shape}")
    rows, cols = linear_sum_assignment(c, maximize=maximize)
    return rows.astype(np.int64), cols.astype(np.int64)


def match_slots_to_objects(slot_xy, obj_xy) -> tuple[np.ndarray, np.ndarray]:
    """Match slots to objects by position, minimising the total Euclidean distance.

    slot_xy: (S, D), obj_xy: (K, D) positions (D = 2 for xy). Returns (obj_idx, slot_idx), min(S, K) pairs each,
    sorted by object index; when K > S the objects missing from ``obj_idx`` got no slot.
    """
    s, o = to_numpy(slot_xy).astype(np.float64), to_numpy(obj_xy).astype(np.float64)
    if s.ndim != 2 or o.ndim != 2 or s.shape[1] != o.shape[1]:
        raise ValueError(f"slot_xy and obj_xy must be (S, D) and (K, D) with the same D, got {s.shape} and {o.shape}")
    dist = np.linalg.norm(o[:, None, :] - s[None, :, :], axis=-1)          # (K, S)
    return hungarian_match(dist)
