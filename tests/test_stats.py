"""Bootstrap intervals and McNemar's test: coverage, width, agreement with scikit-learn and scipy."""

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from carclf.core.stats import (
    METRICS,
    bootstrap_ci,
    bootstrap_diff_ci,
    holm,
    mcnemar,
    metric_from_counts,
    seed_mean_metric,
)


def _noisy(n, n_classes=4, error_rate=0.3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    pred = y.copy()
    wrong = rng.random(n) < error_rate
    pred[wrong] = (y[wrong] + rng.integers(1, n_classes, wrong.sum())) % n_classes
    return y, pred


SKLEARN = {
    "accuracy": accuracy_score,
    "precision_macro": lambda y, p: precision_score(y, p, average="macro", zero_division=0),
    "recall_macro": lambda y, p: recall_score(y, p, average="macro", zero_division=0),
    "f1_macro": lambda y, p: f1_score(y, p, average="macro", zero_division=0),
}


@pytest.mark.parametrize("metric", METRICS)
def test_metrics_match_sklearn_including_missing_classes(metric):
    y, pred = _noisy(60, n_classes=5, error_rate=0.4, seed=3)
    pred[pred == 4] = 0  # class 4 never predicted: precision undefined there
    y[y == 3] = 2  # class 3 only ever predicted, never true
    assert seed_mean_metric(y, pred, metric, n_classes=5) == pytest.approx(SKLEARN[metric](y, pred))


def test_seed_mean_averages_per_seed_metrics():
    y, p0 = _noisy(50, seed=1)
    _, p1 = _noisy(50, seed=2)
    p1 = np.where(np.arange(50) < 25, y, p1)
    expected = (accuracy_score(y, p0) + accuracy_score(y, p1)) / 2
    assert seed_mean_metric(y, [p0, p1], "accuracy") == pytest.approx(expected)


@pytest.mark.parametrize("metric", ["accuracy", "f1_macro"])
def test_bootstrap_interval_contains_estimate_and_narrows_with_more_images(metric):
    y_small, p_small = _noisy(60, seed=0)
    y_big, p_big = _noisy(2000, seed=0)
    small = bootstrap_ci(y_small, p_small, metric, n_boot=500, seed=1)
    big = bootstrap_ci(y_big, p_big, metric, n_boot=500, seed=1)
    for r in (small, big):
        assert r.low <= r.estimate <= r.high
        assert r.low < r.high
    assert (big.high - big.low) < 0.5 * (small.high - small.low)  # width ~ 1/sqrt(n): ~5.8x narrower


def test_bootstrap_is_reproducible_and_level_controls_width():
    y, p = _noisy(200, seed=5)
    a = bootstrap_ci(y, p, "accuracy", n_boot=400, seed=7)
    assert a == bootstrap_ci(y, p, "accuracy", n_boot=400, seed=7)
    wide = bootstrap_ci(y, p, "accuracy", n_boot=400, seed=7, level=0.99)
    assert (wide.high - wide.low) > (a.high - a.low)


def test_bootstrap_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="predictions for"):
        bootstrap_ci([0, 1, 1], [0, 1], "accuracy")


def test_perfect_predictions_give_a_degenerate_interval_at_one():
    y = np.arange(40) % 4
    r = bootstrap_ci(y, [y, y], "f1_macro", n_boot=200)
    assert (r.low, r.estimate, r.high) == (1.0, 1.0, 1.0)


def test_paired_difference_of_identical_models_is_exactly_zero():
    y, p = _noisy(120, seed=6)
    r = bootstrap_diff_ci(y, [p, p], p, "f1_macro", n_boot=200)
    assert (r.low, r.estimate, r.high) == (0.0, 0.0, 0.0)


def test_paired_difference_is_the_difference_and_narrower_than_unpaired_intervals():
    y, base = _noisy(300, error_rate=0.4, seed=8)
    better = base.copy()
    fixed = np.flatnonzero(base != y)[:30]  # the same model, right on 30 more images
    better[fixed] = y[fixed]
    r = bootstrap_diff_ci(y, better, base, "accuracy", n_boot=500, seed=3)
    assert r.estimate == pytest.approx(30 / 300)
    assert 0 < r.low < r.estimate < r.high
    a, b = bootstrap_ci(y, better, n_boot=500, seed=3), bootstrap_ci(y, base, n_boot=500, seed=3)
    # shared errors cancel: the difference's interval is narrower than either model's own (an unpaired
    # difference of independent estimates would be about 1.4 times wider than them)
    assert (r.high - r.low) < min(a.high - a.low, b.high - b.low)
    assert bootstrap_diff_ci(y, base, better, "accuracy", n_boot=500, seed=3).high < 0  # the other way round


def test_mcnemar_identical_predictions_p_is_one():
    y, p = _noisy(100, seed=2)
    r = mcnemar(y, p, p.copy())
    assert (r.a_only, r.b_only, r.p_value, r.p_mid) == (0, 0, 1.0, 1.0)


def test_mcnemar_very_different_models_small_p():
    y, weak = _noisy(200, error_rate=0.6, seed=4)
    strong = y.copy()
    r = mcnemar(y, strong, weak)
    assert r.b_only == 0 and r.a_only == int(np.sum(weak != y))
    assert r.p_value < 1e-6 and r.p_mid <= r.p_value


def test_mcnemar_matches_two_sided_binomial_test():
    from scipy.stats import binomtest

    y = np.zeros(30, dtype=int)
    a = np.r_[np.zeros(20), np.ones(10)].astype(int)  # wrong on the last 10
    b = np.r_[np.ones(3), np.zeros(27)].astype(int)  # wrong on the first 3
    r = mcnemar(y, a, b)
    assert (r.a_only, r.b_only) == (3, 10)
    assert r.p_value == pytest.approx(binomtest(3, 13, 0.5).pvalue)


def test_holm_is_monotone_and_at_least_raw():
    raw = [0.01, 0.04, 0.03, 0.5]
    adj = holm(raw)
    assert adj == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert all(a >= r for a, r in zip(adj, raw))


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        metric_from_counts(np.eye(2, dtype=int), "auc")
