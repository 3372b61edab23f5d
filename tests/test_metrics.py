"""Tests for carclf/core/metrics.py: hand-computed examples and invariants that tie the numbers together."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

from carclf.core.metrics import (
    classification_metrics,
    confusion,
    most_confused_pairs,
    per_class_report,
    roc_auc_ovr_macro,
)

CLASSES = ["bus", "sedan", "van"]
# hand-checked: bus 2/3 right, sedan 2/2 right, van 1/3 right
Y_TRUE = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y_PRED = np.array([0, 0, 1, 1, 1, 2, 0, 1])


def test_confusion_counts_by_hand():
    counts, normalised = confusion(Y_TRUE, Y_PRED, 3)
    np.testing.assert_array_equal(counts, [[2, 1, 0], [0, 2, 0], [1, 1, 1]])
    np.testing.assert_array_equal(counts.sum(axis=1), np.bincount(Y_TRUE, minlength=3))
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0)
    np.testing.assert_allclose(normalised[2], [1 / 3, 1 / 3, 1 / 3])


def test_per_class_report_by_hand():
    report = per_class_report(Y_TRUE, Y_PRED, CLASSES)
    assert list(report.columns) == ["class", "precision", "recall", "f1", "support"]
    assert report["class"].tolist() == CLASSES
    np.testing.assert_allclose(report["precision"], [2 / 3, 2 / 4, 1 / 1])
    np.testing.assert_allclose(report["recall"], [2 / 3, 2 / 2, 1 / 3])
    np.testing.assert_allclose(report["f1"], [2 / 3, 2 / 3, 0.5])
    assert report["support"].tolist() == [3, 2, 3]


def test_metrics_by_hand_and_macro_is_the_mean_of_per_class():
    m = classification_metrics(Y_TRUE, Y_PRED, n_classes=3)
    report = per_class_report(Y_TRUE, Y_PRED, CLASSES)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 1 / 3) / 3)
    assert m["f1_macro"] == pytest.approx(report["f1"].mean())
    assert m["precision_macro"] == pytest.approx(report["precision"].mean())
    weights = report["support"] / report["support"].sum()
    assert m["f1_weighted"] == pytest.approx((report["f1"] * weights).sum())
    # weighted recall is accuracy, by definition
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])
    assert "top3_accuracy" not in m and "roc_auc_ovr_macro" not in m


def test_agrees_with_scikit_learn_on_random_labels():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 6, 300)
    pred = np.where(rng.random(300) < 0.5, y, rng.integers(0, 6, 300))
    m = classification_metrics(y, pred, n_classes=6)
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert (m[f"precision_{avg}"], m[f"recall_{avg}"], m[f"f1_{avg}"]) == pytest.approx((p, r, f))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))


def test_absent_and_never_predicted_classes_are_quiet_zeros():
    # class 3 occurs nowhere; class 2 is predicted but never true
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y_true, y_pred, n_classes=4)
        report = per_class_report(y_true, y_pred, ["a", "b", "c", "d"])
    counts, normalised = confusion(y_true, y_pred, 4)
    assert normalised[2].sum() == 0 and normalised[3].sum() == 0
    assert report.loc[2, ["precision", "recall", "f1"]].tolist() == [0.0, 0.0, 0.0]
    assert report.loc[3, "support"] == 0
    # macro runs over classes seen in y_true or y_pred: a, b, c (not d)
    assert m["f1_macro"] == pytest.approx(report["f1"][:3].mean())
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)


def test_top3_accuracy_and_roc_auc_from_probabilities():
    y = np.array([0, 1, 2, 3])
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # top-1 right
            [0.4, 0.3, 0.2, 0.1],  # true class ranked 2nd
            [0.4, 0.3, 0.2, 0.1],  # 3rd
            [0.4, 0.3, 0.2, 0.1],  # 4th: a top-3 miss
        ],
        dtype=np.float32,
    )
    m = classification_metrics(y, probs.argmax(axis=1), scores=probs, n_classes=4)
    assert m["top3_accuracy"] == pytest.approx(0.75)
    assert 0.0 <= m["roc_auc_ovr_macro"] <= 1.0
    perfect = np.eye(4) * 0.9 + 0.025
    assert roc_auc_ovr_macro(y, perfect) == pytest.approx(1.0)


def test_roc_auc_is_left_out_when_undefined():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]])
    assert roc_auc_ovr_macro(y, probs) is None  # class 2 never occurs
    logits = np.array([[2.0, -1.0], [1.0, 0.5], [-1.0, 3.0], [0.0, 2.0]])
    assert "roc_auc_ovr_macro" not in classification_metrics(y, logits.argmax(1), scores=logits, n_classes=2)
    # only three classes: top-3 accuracy would always be 1
    m = classification_metrics(y, probs.argmax(1), scores=probs, n_classes=3)
    assert "top3_accuracy" not in m


def test_most_confused_pairs_sorted_and_off_diagonal():
    counts = np.array([[9, 4, 0], [1, 8, 2], [4, 0, 7]])
    pairs = most_confused_pairs(counts, CLASSES, k=3)
    assert pairs.columns.tolist() == ["true", "predicted", "count"]
    assert pairs["count"].tolist() == [4, 4, 2]
    assert list(zip(pairs["true"], pairs["predicted"]))[:2] == [("bus", "sedan"), ("van", "bus")]
    assert len(most_confused_pairs(np.diag([3, 3, 3]), CLASSES)) == 0


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="length"):
        classification_metrics([0, 1], [0], n_classes=2)
    with pytest.raises(ValueError, match="y_pred"):
        classification_metrics([0, 1], [0, 5], n_classes=2)
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], [0, 1], scores=np.ones((2, 3)), n_classes=2)
