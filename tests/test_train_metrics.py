"""Metrics against an independent per-class count in plain Python (the definition of F1)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from train.run import confusion_matrix, per_class_f1, summarize


def reference_macro_f1(labels: list[int], preds: list[int]) -> tuple[float, dict[int, float]]:
    """sklearn's f1_score(average='macro') definition: mean F1 over classes present in labels or preds."""
    classes = sorted(set(labels) | set(preds))
    f1s = {}
    for c in classes:
        tp = sum(1 for y, p in zip(labels, preds, strict=True) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, preds, strict=True) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, preds, strict=True) if y == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s[c] = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return sum(f1s.values()) / len(f1s), f1s


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_macro_f1_and_accuracy_match_the_definition(data):
    n_classes = data.draw(st.integers(2, 18))
    n = data.draw(st.integers(1, 60))
    labels = data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n))
    preds = data.draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n))
    cm = confusion_matrix(np.array(labels), np.array(preds), n_classes)
    got = summarize(cm, loss_sum=1.5 * n)
    want_macro, want_per_class = reference_macro_f1(labels, preds)
    assert got["macro_f1"] == pytest.approx(want_macro, abs=1e-12)
    assert got["accuracy"] == pytest.approx(sum(y == p for y, p in zip(labels, preds, strict=True)) / n)
    assert got["loss"] == pytest.approx(1.5)
    f1 = per_class_f1(cm)
    for c, v in want_per_class.items():
        assert f1[c] == pytest.approx(v, abs=1e-12)
    for y, p in zip(labels, preds, strict=True):
        assert cm[y, p] > 0
    assert cm.sum() == n


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
