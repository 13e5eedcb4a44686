"""Detection metrics at sample level (``frame``: one image or frame; ``clip`` for methods that
score clips) and video level (mean of a video's sample scores): AUC, AP, EER, accuracy.

AUC, AP and the ROC come from scikit-learn; EER is read off scikit-learn's ROC curve by linear
interpolation where the false-positive rate crosses the false-negative rate.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve


def eer(labels, scores) -> float:
    """Equal error rate: the error at the threshold where FPR equals FNR (= 1 - TPR)."""
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return math.nan
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    diff = fpr - fnr  # increases from -1 (at fpr=0, fnr=1) to +1
    i = int(np.argmax(diff >= 0))
    if diff[i] == 0 or i == 0:
        return float(fpr[i])
    # interpolate between point i-1 (diff<0) and i (diff>=0)
    t = -diff[i - 1] / (diff[i] - diff[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def binary_metrics(labels, scores, threshold: float = 0.5) -> dict:
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=float)
    both = len(np.unique(labels)) == 2
    return {
        "auc": float(roc_auc_score(labels, scores)) if both else math.nan,
        "ap": float(average_precision_score(labels, scores)) if both else math.nan,
        "eer": eer(labels, scores),
        "acc": float(np.mean((scores >= threshold).astype(int) == labels)),
        "n": int(len(labels)),
    }


def video_level(labels, scores, vids):
    """Average the scores of each video id; a video's label is its frames' (majority) label."""
    vids = np.asarray(vids)
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=float)
    uniq, inv = np.unique(vids, return_inverse=True)
    vs = np.bincount(inv, weights=scores) / np.bincount(inv)
    vl = (np.bincount(inv, weights=labels) / np.bincount(inv) >= 0.5).astype(int)
    return vl, vs, uniq


def detection_metrics(labels, scores, vids=None, threshold: float = 0.5, level: str = "frame") -> dict:
    """``{level: {...}, "video": {...}}`` where ``level`` names what one score is for (``frame``
    or ``clip``); without ``vids`` each sample is its own video."""
    out = {level: binary_metrics(labels, scores, threshold)}
    if vids is None:
        out["video"] = dict(out[level])
    else:
        vl, vs, _ = video_level(labels, scores, vids)
        out["video"] = binary_metrics(vl, vs, threshold)
    return out
