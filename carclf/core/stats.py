"""Uncertainty and significance for test-set comparisons: bootstrap intervals and McNemar's test.

    lo, hi = bootstrap_ci(y_true, [pred_seed0, pred_seed1], "f1_macro").interval
    lo, hi = bootstrap_diff_ci(y_true, pred_tuned, pred_default, "accuracy").interval   # paired difference
    mcnemar(y_true, pred_a, pred_b).p_value

Pure numpy/scipy. Metrics here are computed from confusion counts so that thousands of
bootstrap resamples stay fast; they agree with scikit-learn's macro averages (classes present
in the true or predicted labels, 0 where a ratio is undefined).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats as sps

METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def _counts(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    flat = np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes)


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.zeros_like(num, dtype=float)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metric_from_counts(counts: np.ndarray, name: str) -> float:
    """One of METRICS from a confusion matrix (rows: true, columns: predicted)."""
    tp = np.diag(counts).astype(float)
    total = counts.sum()
    if name == "accuracy":
        return float(tp.sum() / total) if total else 0.0
    pred_n, true_n = counts.sum(axis=0), counts.sum(axis=1)
    present = (pred_n + true_n) > 0  # scikit-learn's default label set: seen in y_true or y_pred
    precision, recall = _safe_div(tp, pred_n), _safe_div(tp, true_n)
    if name == "precision_macro":
        per_class = precision
    elif name == "recall_macro":
        per_class = recall
    elif name == "f1_macro":
        per_class = _safe_div(2 * precision * recall, precision + recall)
    else:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)}")
    return float(per_class[present].mean()) if present.any() else 0.0


def _as_pred_matrix(y_true: np.ndarray, preds) -> np.ndarray:
    """Predictions as [n_seeds, n_images]; one 1-D array is one seed."""
    mat = np.atleast_2d(np.asarray(preds, dtype=np.int64))
    if mat.shape[1] != len(y_true):
        raise ValueError(f"{mat.shape[1]} predictions for {len(y_true)} labels")
    return mat


def seed_mean_metric(y_true, preds, name: str, n_classes: int | None = None) -> float:
    """The metric of each seed's predictions on the same images, averaged over seeds."""
    y = np.asarray(y_true, dtype=np.int64)
    mat = _as_pred_matrix(y, preds)
    k = n_classes or int(max(y.max(initial=0), mat.max(initial=0)) + 1)
    return float(np.mean([metric_from_counts(_counts(y, p, k), name) for p in mat]))


@dataclass(frozen=True)
class BootstrapResult:
    estimate: float  # the metric on the full test set (mean over seeds)
    low: float
    high: float
    n_boot: int
    level: float

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high


def bootstrap_ci(y_true, preds, metric: str = "accuracy", *, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0, n_classes: int | None = None) -> BootstrapResult:
    """Percentile bootstrap interval over test images for a metric averaged over seeds.

    `preds` is one prediction array or one per seed, all on the same images. Each resample
    draws test images with replacement and applies the same draw to every seed (paired), so
    the interval reflects the finite test set, with seed-to-seed noise averaged out.
    """
    y = np.asarray(y_true, dtype=np.int64)
    if y.size == 0:
        raise ValueError("bootstrap_ci needs at least one test image")
    mat = _as_pred_matrix(y, preds)
    k = n_classes or int(max(y.max(), mat.max()) + 1)
    estimate = seed_mean_metric(y, mat, metric, k)
    draws = _resampled(y, [mat], metric, k, n_boot, seed)[:, 0]
    return _percentile(estimate, draws, n_boot, level)


def bootstrap_diff_ci(y_true, preds_a, preds_b, metric: str = "accuracy", *, n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0, n_classes: int | None = None) -> BootstrapResult:
    """Percentile bootstrap interval of metric(A) - metric(B) on the same test images, each averaged over its seeds.

    Paired: every resample draws the same images for A and B (and for every seed of each), so what the two
    models share (easy and hard images) cancels out and the interval is that of the difference.
    """
    y = np.asarray(y_true, dtype=np.int64)
    if y.size == 0:
        raise ValueError("bootstrap_diff_ci needs at least one test image")
    a, b = _as_pred_matrix(y, preds_a), _as_pred_matrix(y, preds_b)
    k = n_classes or int(max(y.max(), a.max(), b.max()) + 1)
    estimate = seed_mean_metric(y, a, metric, k) - seed_mean_metric(y, b, metric, k)
    draws = _resampled(y, [a, b], metric, k, n_boot, seed)
    return _percentile(estimate, draws[:, 0] - draws[:, 1], n_boot, level)


def _resampled(y: np.ndarray, mats: list[np.ndarray], metric: str, k: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, len(mats)]: each prediction matrix's seed-mean metric on the same resamples of the test images."""
    rng = np.random.default_rng(seed)
    draws = np.empty((n_boot, len(mats)))
    for b in range(n_boot):
        idx = rng.integers(0, y.size, y.size)
        draws[b] = [np.mean([metric_from_counts(_counts(y[idx], p[idx], k), metric) for p in mat]) for mat in mats]
    return draws


def _percentile(estimate: float, draws: np.ndarray, n_boot: int, level: float) -> BootstrapResult:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return BootstrapResult(float(estimate), float(low), float(high), n_boot, level)


@dataclass(frozen=True)
class McNemarResult:
    a_only: int  # images model A gets right and B wrong
    b_only: int  # images B gets right and A wrong
    p_value: float  # exact two-sided binomial test on the discordant pairs
    p_mid: float  # mid-p variant: less conservative, still close to nominal size


def mcnemar(y_true, pred_a, pred_b) -> McNemarResult:
    """McNemar's exact test: do two classifiers err on the same test images at different rates?"""
    y = np.asarray(y_true)
    a, b = np.asarray(pred_a), np.asarray(pred_b)
    if not (len(y) == len(a) == len(b)):
        raise ValueError(f"McNemar needs predictions on the same images: {len(y)}, {len(a)}, {len(b)}")
    right_a, right_b = a == y, b == y
    n01, n10 = int(np.sum(right_a & ~right_b)), int(np.sum(~right_a & right_b))
    n = n01 + n10
    if n == 0:
        return McNemarResult(n01, n10, 1.0, 1.0)
    low = min(n01, n10)
    p_exact = min(1.0, 2.0 * float(sps.binom.cdf(low, n, 0.5)))
    p_mid = min(1.0, p_exact - float(sps.binom.pmf(low, n, 0.5)))
    return McNemarResult(n01, n10, p_exact, p_mid)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over all pairwise tests)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()

