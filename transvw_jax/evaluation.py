"""Downstream metrics: Dice / IoU per class for segmentation, ROC AUC for classification.

Conventions (stated because papers differ):
- A class absent from both prediction and ground truth scores Dice = IoU = 1 (nothing to
  find, nothing found); absent from one of them, 0.
- AUC is the Mann-Whitney statistic: the probability that a random positive scores above a
  random negative, ties counting one half. It is undefined (NaN) without both classes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dice_iou(prediction: np.ndarray, target: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Per-class Dice and IoU of two integer label maps of one shape: {"dice": (C,), "iou": (C,)}."""
    prediction, target = np.asarray(prediction), np.asarray(target)
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ in shape")
    dice, iou = np.zeros(num_classes), np.zeros(num_classes)
    for c in range(num_classes):
        p, t = prediction == c, target == c
        inter = np.count_nonzero(p & t)
        total = np.count_nonzero(p) + np.count_nonzero(t)
        union = total - inter
        dice[c] = 1.0 if total == 0 else 2.0 * inter / total
        iou[c] = 1.0 if union == 0 else inter / union
    return {"dice": dice, "iou": iou}


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of binary `labels` (0/1) ranked by `scores` (ties = 1/2)."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be equal 1D shapes")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("roc_auc needs binary labels (0 or 1)")
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
