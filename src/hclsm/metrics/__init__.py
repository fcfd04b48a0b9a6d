"""Evaluation metrics shared by the benchmarks: segmentation (FG-ARI, mIoU), graph recovery (SHD, edge accuracy)
and event detection (precision / recall / F1 with a tolerance). Conventions are stated in each module's docstring.
"""
from __future__ import annotations

from hclsm.metrics.events import event_prf, prf_from_counts
from hclsm.metrics.graphs import binarize_adjacency, edge_accuracy, edge_auc, edge_precision_recall_f1, is_dag, shd
from hclsm.metrics.segmentation import (
    ari,
    fg_ari,
    fg_ari_per_frame,
    fg_ari_video,
    hungarian_match,
    match_slots_to_objects,
    miou_hungarian,
    to_numpy,
)

__all__ = [
    "ari", "fg_ari", "fg_ari_video", "fg_ari_per_frame", "miou_hungarian", "hungarian_match",
    "match_slots_to_objects", "to_numpy",
    "shd", "edge_accuracy", "edge_precision_recall_f1", "edge_auc", "is_dag", "binarize_adjacency",
    "event_prf", "prf_from_counts",
]
