"""LogME: how well a backbone's frozen features suit a labelled task, before any head is trained on them.

    score = logme(features, labels)        # higher: a linear head on these features should transfer better

You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning",
ICML 2021. Each class's one-hot column y is modelled as y = F w + noise, with a Gaussian prior
w ~ N(0, 1/alpha I) and noise ~ N(0, 1/beta). The evidence p(y | F, alpha, beta) has a closed form;
alpha and beta are set to maximise it by the paper's fixed-point iteration (its Algorithm 1), which
works on the singular values of F, computed once for every class. The score is the log
evidence divided by the number of samples, averaged over the classes.

Pure numpy: no training, no gradient, one eigendecomposition of the smaller Gram matrix of the features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The fixed point moves alpha and beta by less than this (relative) when it has converged; the paper's
# iteration typically settles within a few dozen steps.
TOLERANCE = 1e-5
MAX_ITERATIONS = 200
# alpha and beta are kept within these bounds: a class the features cannot explain sends alpha (and a class
# they fit exactly sends beta) toward infinity, where the evidence has already reached its limit.
_TINY, _HUGE = 1e-150, 1e150


@dataclass(frozen=True)
class _Spectrum:
    """What the evidence needs of F, for every class at once: F = U diag(s) V^T."""

    sigma2: np.ndarray  # [k] squared singular values, k = min(n, D)
    z: np.ndarray  # [k, C] U^T y for each class column y
    outside: np.ndarray  # [C] |y|^2 - |U^T y|^2: the part of y no weight vector can fit
    n: int
    dim: int


def _spectrum(features: np.ndarray, targets: np.ndarray) -> _Spectrum:
    """F's singular values and U^T y from the smaller Gram matrix (F F^T or F^T F), as the paper advises.

    An eigendecomposition of the min(n, D)-sided Gram matrix is several times faster than an SVD of F.
    Directions with (numerically) zero singular value are dropped: they count as beyond F's rank.
    """
    f = np.asarray(features, dtype=np.float64)
    n, dim = f.shape
    gram = f @ f.T if n <= dim else f.T @ f
    sigma2, vectors = np.linalg.eigh(gram)
    keep = sigma2 > max(float(sigma2.max(initial=0.0)), 0.0) * max(n, dim) * np.finfo(np.float64).eps
    sigma2, vectors = sigma2[keep], vectors[:, keep]
    # n <= D: the eigenvectors are U itself; otherwise they are V, and U^T y = diag(1/s) V^T F^T y.
    z = vectors.T @ targets if n <= dim else (vectors.T @ (f.T @ targets)) / np.sqrt(sigma2)[:, None]
    outside = np.maximum((targets ** 2).sum(0) - (z ** 2).sum(0), 0.0)
    return _Spectrum(sigma2=sigma2, z=z, outside=outside, n=n, dim=dim)


def _posterior_terms(sp: _Spectrum, ratio: float, col: int) -> tuple[float, float, float]:
    """gamma (the effective number of parameters), |m|^2 and |F m - y|^2 at the posterior mean m.

    They depend on alpha and beta only through alpha / beta (`ratio`): written so, no power of beta
    overflows when features fit a class almost exactly (beta, the noise precision, then grows large).
    """
    shrink = ratio + sp.sigma2
    z2 = sp.z[:, col] ** 2
    gamma = float((sp.sigma2 / shrink).sum())
    m2 = float((sp.sigma2 * z2 / shrink ** 2).sum())
    residual = float(((ratio / shrink) ** 2 * z2).sum() + sp.outside[col])
    return gamma, m2, residual


def _fixed_point(sp: _Spectrum, col: int) -> tuple[float, float]:
    """alpha, beta maximising the evidence of class column `col` (Algorithm 1 of the paper)."""
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        gamma, m2, residual = _posterior_terms(sp, alpha / beta, col)
        new_alpha = float(np.clip(gamma / max(m2, _TINY ** 2), _TINY, _HUGE))
        new_beta = float(np.clip(max(sp.n - gamma, _TINY) / max(residual, _TINY ** 2), _TINY, _HUGE))
        done = abs(new_alpha - alpha) <= TOLERANCE * alpha and abs(new_beta - beta) <= TOLERANCE * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return alpha, beta


def _log_evidence(sp: _Spectrum, alpha: float, beta: float, col: int) -> float:
    """log p(y | F, alpha, beta), the paper's closed form (its Equation 2)."""
    _, m2, residual = _posterior_terms(sp, alpha / beta, col)
    # log|alpha I + beta F^T F| over all D dimensions: the D - k beyond F's rank contribute log(alpha) each.
    log_det = float(np.log(alpha + beta * sp.sigma2).sum()) + (sp.dim - len(sp.sigma2)) * np.log(alpha)
    return float(sp.n / 2 * np.log(beta) + sp.dim / 2 * np.log(alpha) - sp.n / 2 * np.log(2 * np.pi)
                 - beta / 2 * residual - alpha / 2 * m2 - log_det / 2)


def one_hot(labels: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    """[n] integer labels -> [n, C] float64 one-hot targets (C: the largest label + 1 unless given)."""
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
    out = np.zeros((len(labels), n_classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of `features` [n, D] for integer class `labels` [n]: mean over classes of log evidence / n.

    Classes absent from `labels` are left out (their all-zero column says nothing about the features).
    A row repeated exactly (a duplicate image, an unaugmented oversampled copy) counts once: with as
    many features as samples, a repeat lets the evidence grow without bound as the noise goes to zero.
    """
    features = np.asarray(features)
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels):
        raise ValueError(f"features must be [n, D] with one label per row; got {features.shape} and {labels.shape}")
    _, first = np.unique(features, axis=0, return_index=True)
    features, labels = features[np.sort(first)], labels[np.sort(first)]
    present = np.unique(labels)
    if len(present) < 2:
        raise ValueError("LogME needs at least two classes among the labels")
    targets = one_hot(np.searchsorted(present, labels), len(present))
    sp = _spectrum(features, targets)
    scores = [_log_evidence(sp, *_fixed_point(sp, c), c) / sp.n for c in range(targets.shape[1])]
    return float(np.mean(scores))
