"""Graph-recovery metrics for interaction / causal graphs between objects (NOTEARS and NRI conventions).

Conventions
-----------
* An adjacency is (K, K), or (B, K, K) for a batch; entry [i, j] is the directed edge i -> j (row = source,
  column = target). numpy arrays or torch tensors.
* Scores are binarised as ``|a| > threshold`` (default 0.5), so bool, 0/1, probabilities and signed weights (NOTEARS
  thresholds |W|) all work. Already-binary inputs are unaffected by any threshold in [0, 1).
* The diagonal (self-loops) is ignored everywhere, including by :func:`is_dag`.
* ``valid``: optional (K,) or (B, K) bool object mask; padded objects (False) are dropped, so only ordered pairs
  (i, j), i != j, with both objects valid are scored.
* Structural Hamming distance: additions + deletions + reversals. By default each unordered pair {i, j} whose
  edges differ counts 1, so a reversed edge counts 1 (not 2), as in NOTEARS' ``count_accuracy``; with
  ``reversal_counts_double=True`` every differing ordered entry counts 1, so a reversal counts 2.
* Batch reduction: :func:`shd` and :func:`edge_accuracy` average the per-sample values (a sample without any valid
  pair has accuracy NaN and is excluded); :func:`edge_precision_recall_f1` is micro-averaged (counts summed over the
  batch, empty-case conventions of :func:`hclsm.metrics.events.prf_from_counts`). Unbatched inputs give the
  sample's own value. ``return_per_sample=True`` gives the (B,) array instead of the mean.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import rankdata

from hclsm.metrics.events import prf_from_counts
from hclsm.metrics.segmentation import _nanmean, to_numpy

__all__ = ["shd", "edge_accuracy", "edge_precision_recall_f1", "edge_auc", "is_dag", "binarize_adjacency"]


def binarize_adjacency(adj, threshold: float = 0.5) -> np.ndarray:
    """Return the bool adjacency ``|adj| > threshold`` with the same shape (diagonal left as is)."""
    a = to_numpy(adj)
    return a if a.dtype == np.bool_ else np.abs(a.astype(np.float64)) > threshold


def _pair_mask(n_b: int, k: int, valid) -> np.ndarray:
    """(B, K, K) bool: off-diagonal ordered pairs whose both objects are valid."""
    mask = np.broadcast_to(~np.eye(k, dtype=bool), (n_b, k, k))
    if valid is None:
        return mask.copy()
    v = to_numpy(valid).astype(bool)
    if v.ndim == 1:
        v = v[None]
    if v.shape != (n_b, k):
        raise ValueError(f"valid must have shape ({n_b}, {k}) (or ({k},) unbatched), got {to_numpy(valid).shape}")
    return mask & v[:, :, None] & v[:, None, :]


def _prepare(adj_list, threshold: float, valid) -> tuple[list[np.ndarray], np.ndarray, bool]:
    """Binarise, check shapes, add a batch axis; returns ([(B, K, K) bool, ...], pair mask, batched)."""
    mats = [binarize_adjacency(a, threshold) for a in adj_list]
    shape = mats[0].shape
    if any(m.shape != shape for m in mats):
        raise ValueError(f"adjacencies must have the same shape, got {[m.shape for m in mats]}")
    if len(shape) not in (2, 3) or shape[-1] != shape[-2]:
        raise ValueError(f"adjacency must be (K, K) or (B, K, K), got {shape}")
    batched = len(shape) == 3
    mats = [m if batched else m[None] for m in mats]
    return mats, _pair_mask(mats[0].shape[0], shape[-1], valid), batched


def _reduce(per_sample: np.ndarray, batched: bool, return_per_sample: bool):
    if return_per_sample:
        return per_sample
    return float(_nanmean(per_sample)) if batched else float(per_sample[0])


def shd(true_adj, pred_adj, threshold: float = 0.5, reversal_counts_double: bool = False, valid=None,
        return_per_sample: bool = False):
    """Structural Hamming distance (additions + deletions + reversals) between (B,) K x K graphs.

    A reversed edge counts 1 by default, 2 with ``reversal_counts_double``. Returns a float (batch mean, or the
    single value when unbatched) or the (B,) array if ``return_per_sample``.
    """
    (t, p), pairs, batched = _prepare([true_adj, pred_adj], threshold, valid)
    diff = (t != p) & pairs                                                # (B, K, K)
    if reversal_counts_double:
        per = diff.sum(axis=(1, 2))
    else:
        per = np.triu(diff | diff.transpose(0, 2, 1), k=1).sum(axis=(1, 2))
    return _reduce(per.astype(np.float64), batched, return_per_sample)


def edge_accuracy(true_adj, pred_adj, threshold: float = 0.5, valid=None, return_per_sample: bool = False):
    """Fraction of valid off-diagonal ordered pairs (i, j) whose edge / no-edge is predicted correctly."""
    (t, p), pairs, batched = _prepare([true_adj, pred_adj], threshold, valid)
    n_pairs = pairs.sum(axis=(1, 2)).astype(np.float64)
    correct = ((t == p) & pairs).sum(axis=(1, 2)).astype(np.float64)
    per = np.divide(correct, n_pairs, out=np.full(len(n_pairs), np.nan), where=n_pairs > 0)
    return _reduce(per, batched, return_per_sample)


def edge_precision_recall_f1(true_adj, pred_adj, threshold: float = 0.5, valid=None) -> dict:
    """Directed-edge precision / recall / F1, micro-averaged over the batch.

    Returns {"precision", "recall", "f1": float, "tp", "n_pred", "n_true": int}; a reversed edge is both a false
    positive and a false negative.
    """
    (t, p), pairs, _ = _prepare([true_adj, pred_adj], threshold, valid)
    return prf_from_counts((t & p & pairs).sum(), (p & pairs).sum(), (t & pairs).sum())


def edge_auc(true_adj, scores, valid=None) -> float:
    """ROC AUC of real-valued edge ``scores`` (logits or probabilities, same shape as ``true_adj``) for the true
    edges against the non-edges, pooled over the valid ordered pairs of the batch: the chance that a random true
    edge outscores a random non-edge (ties count 1/2). 0.5 = no signal; NaN when either class is empty. It reads the
    ranking under any threshold, so it shows a signal that a thresholded graph may hide."""
    (t,), pairs, _ = _prepare([true_adj], 0.5, valid)
    s = to_numpy(scores).astype(np.float64)
    s = s if s.ndim == 3 else s[None]
    if s.shape != t.shape:
        raise ValueError(f"scores must have the graph's shape {t.shape}, got {s.shape}")
    pos, neg = s[t & pairs], s[~t & pairs]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))  # ties get their average rank (Mann-Whitney U)
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def is_dag(adj, threshold: float = 0.5, valid=None):
    """True if the (binarised, diagonal-free, padding-free) graph has no directed cycle.

    (K, K) -> bool; (B, K, K) -> (B,) bool array. Kahn's algorithm: repeatedly remove nodes without incoming edges;
    the graph is acyclic iff every node gets removed.
    """
    (a,), pairs, batched = _prepare([adj], threshold, valid)
    a = a & pairs                                                          # (B, K, K)
    n_b, k, _ = a.shape
    remaining = np.ones((n_b, k), dtype=bool)                              # padded nodes have no edges left
    for _ in range(k):
        alive = a & remaining[:, :, None] & remaining[:, None, :]
        sources = remaining & ~alive.any(axis=1)                           # in-degree 0 among remaining nodes
        if not sources.any():
            break
        remaining = remaining & ~sources
    acyclic = ~remaining.any(axis=1)
    return acyclic if batched else bool(acyclic[0])
