"""Event detection metrics: precision / recall / F1 with a tolerance window.

Conventions
-----------
* Events are given either as time series or as index lists:
  - a numpy array or torch tensor of shape (T,) or (B, T): bool or 0/1 values, nonzero = an event at that step;
  - a Python list / tuple of integer time steps (one sequence), or a list / tuple of such lists (a batch).
  Arrays are always read as time series and lists always as indices, so ``[0, 1, 1]`` means events at steps 0, 1, 1.
  True and predicted events may use different forms, but must have the same batch size (and the same T when both
  are time series).
* A predicted event at step p is a true positive when it is matched to a true event at step q with
  |p - q| <= tolerance, the matching being one-to-one (one prediction cannot claim two true events, nor two
  predictions one true event) and of maximum size. It is found exactly by a greedy sweep: predictions in time order
  each take the earliest unmatched true event inside their window (optimal for windows of equal width on a line).
* precision = TP / n_pred, recall = TP / n_true, F1 = 2 P R / (P + R), micro-averaged: TP, n_pred and n_true are
  summed over the batch first.
* Empty cases (:func:`prf_from_counts`): a ratio whose denominator is 0 is 1.0 when there are neither true nor
  predicted items (nothing to find and nothing claimed: a perfect score), otherwise 0.0. So no true and no predicted
  events -> P = R = F1 = 1; predictions but no true events -> P = R = F1 = 0; true events but no predictions ->
  P = R = F1 = 0. F1 is 0 when P + R = 0.
"""
from __future__ import annotations

import numpy as np

from hclsm.metrics.segmentation import to_numpy

__all__ = ["event_prf", "prf_from_counts"]


def prf_from_counts(tp: int, n_pred: int, n_true: int) -> dict:
    """Precision / recall / F1 from counts, with the empty-case conventions of the module docstring.

    Returns {"precision", "recall", "f1"} as floats and {"tp", "n_pred", "n_true"} as ints.
    """
    tp, n_pred, n_true = int(tp), int(n_pred), int(n_true)
    if not 0 <= tp <= min(n_pred, n_true):
        raise ValueError(f"need 0 <= tp <= min(n_pred, n_true), got tp={tp}, n_pred={n_pred}, n_true={n_true}")
    both_empty = n_pred == 0 and n_true == 0
    precision = tp / n_pred if n_pred else float(both_empty)
    recall = tp / n_true if n_true else float(both_empty)
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": float(precision), "recall": float(recall), "f1": float(f1),
            "tp": tp, "n_pred": n_pred, "n_true": n_true}


def _sequences(events, name: str) -> tuple[list[np.ndarray], int | None]:
    """Return (list of per-sequence int64 index arrays, T or None for index lists)."""
    if isinstance(events, (list, tuple)):
        if all(np.ndim(e) == 0 for e in events):   # flat list (possibly empty): one sequence
            events = [events]
        out = []
        for seq in events:
            idx = to_numpy(seq)
            if idx.ndim != 1 and idx.size:
                raise ValueError(f"{name}: each index list must be 1-D, got shape {idx.shape}")
            if idx.size and not np.issubdtype(idx.dtype, np.integer):
                raise ValueError(f"{name}: index lists must hold integer time steps, got dtype {idx.dtype}; "
                                 "pass boolean time series as an array or tensor")
            out.append(idx.reshape(-1).astype(np.int64))
        return out, None
    series = to_numpy(events)
    if series.ndim == 1:
        series = series[None]
    if series.ndim != 2:
        raise ValueError(f"{name}: time series must have shape (T,) or (B, T), got {series.shape}")
    if series.dtype != np.bool_ and not np.isin(series, (0, 1)).all():
        raise ValueError(f"{name}: time series must be bool or 0/1 (threshold scores first)")
    return [np.flatnonzero(row).astype(np.int64) for row in series], series.shape[1]


def _count_matches(true_idx: np.ndarray, pred_idx: np.ndarray, tolerance: float) -> int:
    """Size of a maximum one-to-one matching with |p - q| <= tolerance (greedy sweep, exact in 1-D)."""
    true_idx, pred_idx = np.sort(true_idx), np.sort(pred_idx)
    i, tp = 0, 0
    for p in pred_idx:
        while i < len(true_idx) and true_idx[i] < p - tolerance:   # too early for p and every later prediction
            i += 1
        if i < len(true_idx) and true_idx[i] <= p + tolerance:
            tp += 1
            i += 1
    return tp


def event_prf(true_events, pred_events, tolerance: float = 1) -> dict:
    """Event precision / recall / F1 with a ±``tolerance``-step window, micro-averaged over the batch.

    true_events, pred_events: (T,) / (B, T) bool series or index lists (see the module docstring).
    Returns {"precision", "recall", "f1": float, "tp", "n_pred", "n_true": int}.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    true_seqs, t_len = _sequences(true_events, "true_events")
    pred_seqs, p_len = _sequences(pred_events, "pred_events")
    if len(true_seqs) != len(pred_seqs):
        raise ValueError(f"true_events and pred_events have different batch sizes: {len(true_seqs)} and "
                         f"{len(pred_seqs)}")
    if t_len is not None and p_len is not None and t_len != p_len:
        raise ValueError(f"true_events and pred_events have different lengths T: {t_len} and {p_len}")
    tp = sum(_count_matches(t, p, tolerance) for t, p in zip(true_seqs, pred_seqs))
    return prf_from_counts(tp, sum(len(p) for p in pred_seqs), sum(len(t) for t in true_seqs))
