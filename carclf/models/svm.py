"""The SVM head: StandardScaler and a calibrated SVC (or LinearSVC), gamma relative to the data, saturation;
or, with `svm.kernel: logistic`, a multinomial logistic regression whose cost grows gently with classes.

    pipeline, fit = fit_svm(cfg.svm, X_train, y_train, seed=0)
    fit.gamma            # the RBF gamma the SVC used: svm.gamma_factor / (n_features * X.var())
    fit.saturated_at     # every C >= this gives the same model (None: C still matters)
    fit.calibration      # how its probabilities were made, e.g. 'sigmoid, 3-fold cross-validation'
    fit.seconds          # the fit's wall time

Probabilities, per head (`svm.calibration` for the SVMs):
- `cv` (the default): CalibratedClassifierCV, sigmoid, on cross-validated decision values: the SVM is
  fitted once per fold and once on all the data (four fits with three folds).
- `holdout`: the SVM is fitted once, on the training split less a stratified CALIBRATION_HOLDOUT share,
  and one temperature is fitted on the held-out share's decision values (CalibratedClassifierCV on a
  FrozenEstimator, method 'temperature': softmax(decision / T), Guo et al., "On Calibration of Modern
  Neural Networks", ICML 2017): one fit on fewer samples instead of four. A temperature keeps the SVM's
  own ranking of the classes; per-class sigmoids fitted on a few held-out samples a class do not (on 40
  classes with 6 held-out samples each they cost 0.1 of accuracy). An RBF SVC's multi-class scores are
  mostly one-vs-one votes, so its tempered probabilities are coarse and underconfident; LinearSVC's
  margins temper well.
- `kernel: logistic`: the model's own softmax; a multinomial logistic regression minimises the log-loss,
  so no extra fit calibrates it. One fit of `n_iter * n * d * classes` work: where one-vs-rest or
  one-vs-one SVMs multiply their fits by the classes, it does not.

`build_model("svm", ...)` (carclf.models.networks) builds the same pipeline through `svm_pipeline`.

Gamma. With `svm.gamma: scale` the RBF gamma is `svm.gamma_factor / (n_features * X.var())` of the
(standardised) features each SVC is fitted on; factor 1.0 is scikit-learn's 'scale'. A factor
searched on a log range around 1 stays on the data's own scale, where a raw gamma range wastes trials
on kernels that are nearly constant or nearly a delta.

Saturation: why an SVC whose dual coefficients stay inside the box is the same model for any
larger C. SVC solves, per pair of classes, the dual problem

    max_a  sum_i a_i - 1/2 sum_ij a_i a_j y_i y_j K(x_i, x_j)   s.t.  0 <= a_i <= C w_i,  sum_i y_i a_i = 0

(w_i the class weight of sample i). C does not appear in the objective: it only bounds the box. The
problem is a concave quadratic program, so any feasible point satisfying the KKT conditions is
optimal. Let a* be the optimum at C = c with every a*_i < c w_i: no support vector is bounded (the
training set is separated in kernel space without slack). The upper bounds are then inactive and
their multipliers zero, so a* is feasible and satisfies the KKT conditions of the problem for every
C' >= m = max_i a*_i / w_i, hence optimal there too. The fitted SVC (support vectors, dual
coefficients y_i a*_i, intercept) is a function of a*, so every C' >= m gives the same model, up to
the solver's stopping tolerance. The calibrated pipeline fits one SVC per calibration fold and one
on all the data, and the calibration is fitted on their decision values: it is unchanged when every
one of those SVCs is saturated, and m is then the largest over them. LinearSVC minimises the squared
hinge loss (no box), so it never saturates.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC, LinearSVC

from carclf.core.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SVM_CALIBRATION_FOLDS = 3  # cross-validation folds of the probability calibration
# SVMConfig fields that describe the feature extraction, not the classifier: accepted and ignored here
SVM_FEATURE_FIELDS = ("backbone", "backbone_weights", "features", "augment_copies")
CALIBRATION_HOLDOUT = 0.2  # share of the training split held out to calibrate with svm.calibration 'holdout'
# lbfgs iterations of the logistic head: standardised CNN features converge in a few hundred (tol 1e-4)
LOGISTIC_MAX_ITER = 500
CALIBRATION_TAG = "carclf.svm_calibration"  # how the head's probabilities were made (see the module docstring)
SATURATED_TAG = "carclf.svm_saturated_at"  # on a run whose SVM is the same for every C at or above this value
# A dual coefficient this close to its bound counts as bounded: libsvm clips a bounded one to exactly C.
_BOUND_TOLERANCE = 1e-6


def calibration_folds(labels, folds: int = SVM_CALIBRATION_FOLDS) -> int:
    """Folds for calibrating on `labels`: `folds`, or fewer when the smallest class has fewer samples.

    Every fold needs each class, so a class of two training images allows two folds; a class of one
    allows none, which raises.
    """
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    smallest = int(counts.min())
    if smallest < 2:
        raise DataError(f"class {values[counts.argmin()]} has a single training sample; the SVM's probability "
                          "calibration needs at least 2 per class (raise data.min_images or oversample with "
                          "balance.mode)")
    if smallest < folds:
        log.warning("calibrating SVM probabilities with %d folds instead of %d: the smallest class (label %s) "
                    "has %d training samples", smallest, folds, values[counts.argmin()], smallest)
    return min(folds, smallest)


class _CalibrationFoldsFitToData(CalibratedClassifierCV):
    """CalibratedClassifierCV whose fit lowers `cv` to what the smallest class allows (calibration_folds).

    Fitting turns it into a plain CalibratedClassifierCV with the folds it used, and its unfitted
    `estimator` into the plain scikit-learn estimator, so a fitted (and saved) model holds scikit-learn
    types only: loading it needs no carclf class and trusts nothing new.
    """

    def fit(self, X, y, sample_weight=None, **fit_params):
        self.cv = calibration_folds(y, self.cv)
        self.__class__ = CalibratedClassifierCV
        self.fit(X, y, sample_weight=sample_weight, **fit_params)
        if isinstance(self.estimator, _ScaledGammaSVC):  # with the gamma the final SVC used: a refit keeps it
            self.estimator = self.estimator.plain(self.calibrated_classifiers_[0].estimator.gamma)
        return self


def scaled_gamma(X, factor: float = 1.0) -> float:
    """`factor` times scikit-learn's 'scale' gamma of `X`: factor / (n_features * X.var()), factor if X is constant."""
    X = np.asarray(X, dtype=np.float64)  # SVC computes the variance on float64 data
    variance = X.var()
    return float(factor / (X.shape[1] * variance)) if variance != 0 else float(factor)


_recorder = threading.local()  # the fits of the pipeline being fitted in this thread (see fit_svm)


class _ScaledGammaSVC(SVC):
    """SVC whose 'scale' gamma is multiplied by `gamma_factor`, computed on the data of each fit.

    Calibration clones it for every fold; each clone's fit turns it into a plain SVC (with the numeric
    gamma it used when the factor is not 1) and, inside `fit_svm`, records how near its dual
    coefficients come to their bound.
    """

    def __init__(self, *, C=1.0, kernel="rbf", gamma="scale", gamma_factor=1.0, class_weight=None,
                 random_state=None):
        super().__init__(C=C, kernel=kernel, gamma=gamma, class_weight=class_weight, random_state=random_state)
        self.gamma_factor = gamma_factor

    def plain(self, gamma) -> SVC:
        """The same settings as a plain SVC with `gamma` (a number for a factor other than 1: it needs carclf)."""
        return SVC(C=self.C, kernel=self.kernel, gamma=gamma, class_weight=self.class_weight,
                   random_state=self.random_state)

    def fit(self, X, y, sample_weight=None):
        factor = self.__dict__.pop("gamma_factor")
        self.__class__ = SVC
        if factor != 1.0 and self.gamma == "scale" and self.kernel == "rbf":
            self.gamma = scaled_gamma(X, factor)  # 1.0 stays 'scale': exactly scikit-learn's
        self.fit(X, y, sample_weight=sample_weight)
        fits = getattr(_recorder, "fits", None)
        if fits is not None:
            fits.append(bound_ratio(self))
        return self


def bound_ratio(svc: SVC) -> float:
    """The largest |dual coefficient| / its bound (C times the class weight) of a fitted SVC.

    Below 1: no support vector is at its bound, so the SVC is saturated (see the module docstring).
    """
    if svc.dual_coef_.size == 0:
        return 0.0
    classes = np.repeat(np.arange(len(svc.n_support_)), svc.n_support_)  # support vectors come grouped by class
    bounds = svc.C * np.asarray(svc.class_weight_, dtype=np.float64)[classes]
    return float((np.abs(svc.dual_coef_) / bounds).max())


def svm_pipeline(*, kernel: str = "rbf", C: float = 1.0, gamma: str | float = "scale", gamma_factor: float = 1.0,
                 linear_impl: str = "svc", calibration: str = "cv", class_weight: str | None = None,
                 cv: int = SVM_CALIBRATION_FOLDS, random_state: int = 0, **feature_fields) -> Pipeline:
    """StandardScaler, then a calibrated SVC (kernel linear|rbf) or, with linear_impl='liblinear', LinearSVC;
    with kernel='logistic', a multinomial LogisticRegression.

    SVM probabilities come from CalibratedClassifierCV: with calibration='cv' sigmoids on `cv` folds (fewer
    when the smallest class is smaller: see calibration_folds), with 'holdout' a temperature on a held-out
    share of the training data (see the module docstring). scikit-learn 1.9 deprecates SVC(probability=True) in its
    favour. `gamma_factor` scales the 'scale' gamma.
    """
    unknown = set(feature_fields) - set(SVM_FEATURE_FIELDS)
    if unknown:
        raise ConfigError(f"svm: unknown settings {sorted(unknown)}; allowed: kernel, C, gamma, gamma_factor, "
                          "linear_impl, calibration")
    if kernel not in ("linear", "rbf", "logistic"):
        raise ConfigError(f"svm.kernel must be 'linear', 'rbf' or 'logistic', got {kernel!r}")
    check_gamma_factor(gamma, gamma_factor)
    if kernel == "logistic":
        head = LogisticRegression(C=C, class_weight=class_weight, max_iter=LOGISTIC_MAX_ITER,
                                  random_state=random_state)
        return Pipeline([("scale", StandardScaler()), ("logistic", head)])
    estimator = _svm_estimator(kernel=kernel, C=C, gamma=gamma, gamma_factor=gamma_factor, linear_impl=linear_impl,
                               class_weight=class_weight, random_state=random_state)
    if calibration == "cv":
        calibrated = _CalibrationFoldsFitToData(estimator, method="sigmoid", cv=cv, ensemble=False)
    elif calibration == "holdout":
        calibrated = _HoldoutCalibration(estimator, method="temperature", cv=None)
    else:
        raise ConfigError(f"svm.calibration must be 'cv' or 'holdout', got {calibration!r}")
    return Pipeline([("scale", StandardScaler()), ("svc", calibrated)])


def _svm_estimator(*, kernel, C, gamma, gamma_factor, linear_impl, class_weight, random_state):
    if linear_impl == "liblinear":
        if kernel != "linear":
            raise ConfigError("svm.linear_impl='liblinear' needs svm.kernel='linear' (LinearSVC has no rbf kernel)")
        return LinearSVC(C=C, class_weight=class_weight, random_state=random_state)
    if linear_impl == "svc":
        return _ScaledGammaSVC(kernel=kernel, C=C, gamma=gamma, gamma_factor=gamma_factor,
                               class_weight=class_weight, random_state=random_state)
    raise ConfigError(f"svm.linear_impl must be 'svc' or 'liblinear', got {linear_impl!r}")


class _HoldoutCalibration(CalibratedClassifierCV):
    """CalibratedClassifierCV that fits its SVM once, on the training data less a stratified held-out share,
    and fits its calibration (`method`) on that share's decision values.

    As `_CalibrationFoldsFitToData`, fitting leaves a plain CalibratedClassifierCV holding the fitted
    SVM itself (not scikit-learn's FrozenEstimator wrapper), so the saved model holds the same types as
    the cross-validated one.
    """

    def fit(self, X, y, sample_weight=None, **fit_params):
        X_fit, X_cal, y_fit, y_cal = train_test_split(X, y, test_size=_holdout_size(y), stratify=y,
                                                      random_state=self.estimator.random_state)
        fitted = clone(self.estimator).fit(X_fit, y_fit)
        self.__class__ = CalibratedClassifierCV
        self.estimator = FrozenEstimator(fitted)
        self.fit(X_cal, y_cal)
        self.estimator = clone(fitted)  # unfitted, with the settings it was fitted with (an SVC keeps its gamma)
        self.calibrated_classifiers_[0].estimator = fitted
        return self


def _holdout_size(labels) -> int:
    """Held-out samples for calibration: CALIBRATION_HOLDOUT of them, at least one per class, one left per class."""
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    if counts.min() < 2:
        raise DataError(f"class {values[counts.argmin()]} has a single training sample; the SVM's probability "
                        "calibration needs at least 2 per class (raise data.min_images or oversample with "
                        "balance.mode)")
    return int(max(len(values), round(CALIBRATION_HOLDOUT * counts.sum())))


def check_gamma_factor(gamma, gamma_factor: float) -> None:
    """The factor scales the 'scale' gamma only: with a numeric svm.gamma it must stay 1.0."""
    if not gamma_factor > 0:
        raise ConfigError(f"svm.gamma_factor must be a positive number, got {gamma_factor!r}")
    problem = gamma_factor_problem(gamma, gamma_factor)
    if problem:
        raise ConfigError(problem)


@dataclass(frozen=True)
class SVMFit:
    """What fitting the SVM head tells beyond its predictions."""

    C: float
    gamma: float | None  # the RBF gamma of the SVC fitted on all the data (None: not an RBF SVC)
    bound_ratio: float | None  # the largest dual coefficient / its bound over every SVC fitted (None: LinearSVC)
    saturated_at: float | None  # the smallest C giving the same model, when C no longer matters; else None
    calibration: str = ""  # how the probabilities were made, e.g. "sigmoid, 3-fold cross-validation"
    seconds: float = 0.0  # the whole fit, calibration included

    def tags(self) -> dict[str, str]:
        tags = {CALIBRATION_TAG: self.calibration} if self.calibration else {}
        return tags if self.saturated_at is None else {**tags, SATURATED_TAG: repr(self.saturated_at)}

    def metrics(self) -> dict[str, float]:
        out = {"svm_gamma": self.gamma, "svm_bound_ratio": self.bound_ratio, "fit_s": self.seconds}
        return {k: v for k, v in out.items() if v is not None}


@contextlib.contextmanager
def _recording() -> Iterator[list[float]]:
    fits: list[float] = []
    _recorder.fits = fits
    try:
        yield fits
    finally:
        _recorder.fits = None


def describe_calibration(step) -> str:
    """How the fitted head `step` (the pipeline's last step) makes its probabilities, in words for a tag."""
    if isinstance(step, LogisticRegression):
        return "softmax of the multinomial logistic regression (no calibration fit)"
    if isinstance(step.calibrated_classifiers_[0].estimator, FrozenEstimator) or not isinstance(step.cv, int):
        return f"{step.method}, fitted on a held-out {CALIBRATION_HOLDOUT:g} of the training split"
    return f"{step.method}, {step.cv}-fold cross-validation"


def fit_svm(svm_cfg, X, y, *, seed: int = 0) -> tuple[Pipeline, SVMFit]:
    """Build the SVM head from `svm_cfg` (carclf.config.SVMConfig), fit it on (X, y), say how it fitted."""
    kw: dict[str, Any] = svm_cfg.model_dump(include={"kernel", "C", "gamma", "gamma_factor", "linear_impl",
                                                     "calibration"})
    pipeline = svm_pipeline(random_state=seed, **kw)
    t0 = time.perf_counter()
    with _recording() as ratios:
        pipeline.fit(X, y)
    seconds = time.perf_counter() - t0
    step = pipeline.steps[-1][1]
    how = {"C": svm_cfg.C, "calibration": describe_calibration(step), "seconds": seconds}
    final = None if isinstance(step, LogisticRegression) else step.calibrated_classifiers_[0].estimator
    if not isinstance(final, SVC):
        return pipeline, SVMFit(gamma=None, bound_ratio=None, saturated_at=None, **how)
    worst = max(ratios) if ratios else float("inf")
    # every SVC fitted (each calibration fold's and the final one) must be saturated; a fit not seen is unknown
    fits = step.cv + 1 if isinstance(step.cv, int) else 1
    saturated = len(ratios) == fits and worst < 1.0 - _BOUND_TOLERANCE
    return pipeline, SVMFit(gamma=float(final._gamma) if final.kernel == "rbf" else None,
                            bound_ratio=worst if ratios else None,
                            saturated_at=worst * svm_cfg.C if saturated else None, **how)


def gamma_factor_problem(gamma, gamma_factor: float) -> str | None:
    """What is wrong with this gamma and gamma_factor together (None: nothing): the factor scales 'scale' only."""
    if gamma != "scale" and gamma_factor != 1.0:
        return (f"svm.gamma={gamma!r} and svm.gamma_factor={gamma_factor!r}: the factor scales svm.gamma 'scale' "
                "(1 / (n_features * X.var())); set svm.gamma to 'scale' to use the factor, or leave "
                "svm.gamma_factor at 1.0 with a numeric svm.gamma")
    return None
