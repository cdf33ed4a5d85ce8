"""Classification metrics from a confusion matrix: accuracy, macro F1 (the competition metric), per-class F1.

Numpy only (no jax, no torch) so the Flax and PyTorch trainers report identical numbers.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; row = true class, column = predicted class."""
    labels = np.asarray(labels, dtype=np.int64).ravel()
    preds = np.asarray(preds, dtype=np.int64).ravel()
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds must have the same length, got {labels.shape} and {preds.shape}")
    for name, arr in (("labels", labels), ("preds", preds)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got range [{arr.min()}, {arr.max()}]")
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 of each class; 0 where the class is neither present nor predicted (sklearn's zero_division=0)."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def summarize(cm: np.ndarray, loss_sum: float, class_names: list[str] | None = None) -> dict:
    """Accuracy, mean loss, macro F1, per-class F1 and the matrix as a JSON-ready dict."""
    cm = np.asarray(cm)
    n = int(cm.sum())
    f1 = per_class_f1(cm)
    # sklearn's f1_score(average="macro"): the mean over classes that occur in the labels or the predictions.
    seen = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    names = class_names or [str(i) for i in range(cm.shape[0])]
    return {
        "loss": float(loss_sum) / max(n, 1),
        "accuracy": float(np.trace(cm)) / max(n, 1),
        "macro_f1": float(f1[seen].mean()) if seen.any() else 0.0,
        "per_class_f1": {name: float(v) for name, v in zip(names, f1, strict=True)},
        "confusion_matrix": cm.astype(int).tolist(),
        "count": n,
    }
