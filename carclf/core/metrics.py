"""Classification metrics as pure functions of label and score arrays: one dict per evaluation.

    m = classification_metrics(y_true, y_pred, scores=probs, n_classes=10)
    m["f1_macro"], m["top3_accuracy"], m["roc_auc_ovr_macro"]

Everything derives from one confusion matrix, so the numbers agree with each other.
Zero divisions give 0 without warnings. Macro averages run over the classes that
occur in y_true or y_pred (scikit-learn's default), so a class absent from a small
split does not count as a zero; weighted averages weight by true support.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score


def _labels(y, n_classes: int, name: str) -> np.ndarray:
    arr = np.asarray(y).astype(np.int64, copy=False).ravel()
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{name} holds labels outside 0..{n_classes - 1}")
    return arr


def _checked(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, n_classes, "y_true"), _labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    if t.size == 0:
        raise ValueError("no samples to score")
    return t, p


def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros_like(num, dtype=float), where=den > 0)


def confusion(y_true, y_pred, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [true, predicted], counts divided by row sums; rows of absent classes are zeros)."""
    t, p = _checked(y_true, y_pred, n_classes)
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    return counts, _divide(counts.astype(float), counts.sum(axis=1, keepdims=True).astype(float))


def _per_class(counts: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(counts).astype(float)
    support, predicted = counts.sum(axis=1), counts.sum(axis=0)
    precision, recall = _divide(tp, predicted.astype(float)), _divide(tp, support.astype(float))
    f1 = _divide(2 * precision * recall, precision + recall)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}


def per_class_report(y_true, y_pred, classes) -> pd.DataFrame:
    """One row per class (all of them, absent ones included): class, precision, recall, f1, support."""
    counts, _ = confusion(y_true, y_pred, len(classes))
    stats = _per_class(counts)
    return pd.DataFrame(
        {
            "class": list(classes),
            "precision": stats["precision"],
            "recall": stats["recall"],
            "f1": stats["f1"],
            "support": stats["support"].astype(int),
        }
    )


def classification_metrics(y_true, y_pred, *, scores=None, n_classes: int) -> dict[str, float]:
    """accuracy, balanced_accuracy, {precision,recall,f1}_{macro,weighted}; top3_accuracy when scores are
    given and n_classes > 3; roc_auc_ovr_macro when scores are probabilities and every class occurs."""
    t, p = _checked(y_true, y_pred, n_classes)
    counts, _ = confusion(t, p, n_classes)
    stats = _per_class(counts)
    active = (stats["support"] > 0) | (stats["predicted"] > 0)
    in_true = stats["support"] > 0
    weights = stats["support"] / stats["support"].sum()
    out = {
        "accuracy": float(np.trace(counts) / counts.sum()),
        "balanced_accuracy": float(stats["recall"][in_true].mean()),
    }
    for key in ("precision", "recall", "f1"):
        out[f"{key}_macro"] = float(stats[key][active].mean())
        out[f"{key}_weighted"] = float((stats[key] * weights).sum())
    if scores is not None:
        out.update(_score_metrics(t, _scores(scores, t.size, n_classes)))
    return out


def _scores(scores, n_samples: int, n_classes: int) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n_samples, n_classes):
        raise ValueError(f"scores must have shape ({n_samples}, {n_classes}), got {s.shape}")
    return s


def _score_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    n_classes = scores.shape[1]
    out: dict[str, float] = {}
    if n_classes > 3:
        top3 = np.argsort(-scores, axis=1, kind="stable")[:, :3]
        out["top3_accuracy"] = float((top3 == y_true[:, None]).any(axis=1).mean())
    auc = roc_auc_ovr_macro(y_true, scores)
    if auc is not None:
        out["roc_auc_ovr_macro"] = auc
    return out


def roc_auc_ovr_macro(y_true, probs) -> float | None:
    """Macro one-vs-rest ROC-AUC, or None where undefined (not probabilities, or a class never occurs)."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    n_classes = p.shape[1]
    rows = p.sum(axis=1)
    if (p < 0).any() or not np.allclose(rows, 1.0, atol=1e-3) or len(np.unique(y)) < n_classes:
        return None
    p = p / rows[:, None]  # float32 softmax rows miss 1 by more than scikit-learn's tolerance
    if n_classes == 2:
        return float(roc_auc_score(y, p[:, 1]))
    return float(roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(n_classes)))


def most_confused_pairs(counts, classes, k: int = 5) -> pd.DataFrame:
    """The k largest off-diagonal cells of a confusion matrix: true, predicted, count (count > 0 only)."""
    c = np.asarray(counts)
    true_idx, pred_idx = np.nonzero((c > 0) & ~np.eye(len(c), dtype=bool))
    values = c[true_idx, pred_idx]
    order = np.argsort(-values, kind="stable")[:k]  # stable: ties keep row-major order
    return pd.DataFrame(
        {
            "true": [classes[i] for i in true_idx[order]],
            "predicted": [classes[j] for j in pred_idx[order]],
            "count": values[order].astype(int),
        }
    )
