"""LogME: the evidence it maximises, the invariances it should have, and that features carrying the label score higher."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from carclf.training.logme import _fixed_point, _log_evidence, _spectrum, logme, one_hot


def labelled_features(n=90, dim=12, classes=3, signal=2.0, seed=0):
    """Noise features; with signal > 0 the first `classes` columns move with the one-hot label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = rng.normal(size=(n, dim))
    features[:, :classes] += signal * one_hot(labels, classes)
    return features, labels


@pytest.mark.parametrize("n, dim", [(40, 6), (6, 40), (20, 20)])  # both Gram sides and the square case
def test_closed_form_is_the_gaussian_marginal_likelihood_at_its_maximum(n, dim):
    features, labels = labelled_features(n, dim, seed=n)
    sp = _spectrum(features, one_hot(labels))
    alpha, beta = _fixed_point(sp, 1)
    y = one_hot(labels)[:, 1]

    def direct(a, b):  # y ~ N(0, F F^T / alpha + I / beta) once w is integrated out
        return multivariate_normal(np.zeros(n), features @ features.T / a + np.eye(n) / b).logpdf(y)

    assert _log_evidence(sp, alpha, beta, 1) == pytest.approx(direct(alpha, beta), rel=1e-8)
    for da, db in [(0.7, 1.0), (1.4, 1.0), (1.0, 0.7), (1.0, 1.4)]:
        assert direct(alpha * da, beta * db) <= direct(alpha, beta) + 1e-12  # equal where alpha is at its limit


def test_features_that_carry_the_label_score_above_noise():
    informative = logme(*labelled_features(signal=2.0))
    weak = logme(*labelled_features(signal=0.5))
    noise = logme(*labelled_features(signal=0.0))
    assert informative > weak > noise


def test_invariant_to_scale_rotation_row_order_class_names_empty_columns_and_repeated_rows():
    features, labels = labelled_features()
    base = logme(features, labels)
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(features.shape[1],) * 2))
    order = rng.permutation(len(labels))
    renamed = np.array([7, 2, 5])[labels]  # other label values, absent ones in between
    padded = np.hstack([features, np.zeros((len(labels), 4))])
    repeated = np.vstack([features, features[:5]]), np.concatenate([labels, labels[:5]])
    for variant in (logme(features * 1e-6, labels), logme(features * 1e4, labels), logme(features @ rotation, labels),
                    logme(features[order], labels[order]), logme(features, renamed), logme(padded, labels), logme(*repeated)):
        assert variant == pytest.approx(base, abs=1e-6)


def test_more_dimensions_than_samples_with_repeats_and_tiny_float32_scales_give_a_finite_score():
    features, labels = labelled_features(n=30, dim=200)  # an exact fit exists
    features, labels = np.vstack([features, features[:3]]), np.concatenate([labels, labels[:3]])
    assert np.isfinite(logme((features * 1e-9).astype(np.float32), labels))


@pytest.mark.parametrize("features, labels, message", [
    (np.zeros((4, 3)), np.array([0, 1, 0]), "one label per row"),
    (np.zeros(4), np.array([0, 1, 0, 1]), "one label per row"),
    (np.ones((4, 3)), np.zeros(4, dtype=int), "two classes"),
])
def test_bad_input_is_refused(features, labels, message):
    with pytest.raises(ValueError, match=message):
        logme(features, labels)
