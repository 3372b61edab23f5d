"""The SVM head: gamma relative to the data's scale, saturation (every larger C gives the same model)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from carclf.config import SVMConfig, validate_run_config
from carclf.core.errors import ConfigError
from carclf.models.networks import build_model
from carclf.models.svm import CALIBRATION_TAG, SATURATED_TAG, fit_svm, scaled_gamma
from carclf.shipped.car_classifier import SVM_TRUSTED_TYPES


def _data(shift: float, n_per_class: int = 20, dim: int = 16, seed: int = 0):
    """Three Gaussian classes `shift` apart per feature (far apart: separable; close: overlapping), float32."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    return (rng.normal(size=(len(y), dim)) + shift * y[:, None]).astype(np.float32), y


def _svm(**kw) -> SVMConfig:
    return SVMConfig(backbone="mobilenet_v2", **kw)


def _sklearn_scale_pipeline(C: float) -> Pipeline:
    svc = SVC(C=C, kernel="rbf", gamma="scale", random_state=0)
    return Pipeline([("scale", StandardScaler()),
                     ("svc", CalibratedClassifierCV(svc, method="sigmoid", cv=3, ensemble=False))])


def test_gamma_factor_one_is_sklearns_scale():
    X, y = _data(0.8)
    test = _data(0.8, seed=1)[0]
    pipeline, fit = fit_svm(_svm(C=2.0, gamma_factor=1.0), X, y)
    reference = _sklearn_scale_pipeline(2.0).fit(X, y)
    assert np.array_equal(pipeline.predict(test), reference.predict(test))
    assert np.array_equal(pipeline.predict_proba(test), reference.predict_proba(test))
    assert fit.gamma == pytest.approx(1.0 / (X.shape[1] * StandardScaler().fit_transform(X).astype(np.float64).var()))


def test_gamma_factor_multiplies_the_scale_gamma_of_each_fit():
    X, y = _data(0.8)
    scaled = StandardScaler().fit_transform(X)
    pipeline, fit = fit_svm(_svm(C=2.0, gamma_factor=4.0), X, y)
    assert fit.gamma == pytest.approx(4.0 * scaled_gamma(scaled))
    final = pipeline.named_steps["svc"].calibrated_classifiers_[0].estimator
    assert final.gamma == pytest.approx(fit.gamma)  # saved with the number it used: it predicts without carclf
    same = _sklearn_scale_pipeline(2.0).fit(X, y)
    assert not np.allclose(pipeline.predict_proba(X), same.predict_proba(X))


def test_a_fitted_svm_holds_only_types_the_model_loader_trusts():
    import skops.io

    X, y = _data(0.8)
    pipeline, _ = fit_svm(_svm(C=2.0, gamma_factor=3.0), X, y)
    step = pipeline.named_steps["svc"]
    assert type(step.estimator) is SVC and type(step.calibrated_classifiers_[0].estimator) is SVC
    assert step.estimator.gamma == step.calibrated_classifiers_[0].estimator.gamma != "scale"  # a refit keeps it
    untrusted = set(skops.io.get_untrusted_types(data=skops.io.dumps(pipeline))) - set(SVM_TRUSTED_TYPES)
    assert not untrusted


def test_a_numeric_gamma_with_a_gamma_factor_is_refused_naming_both():
    with pytest.raises(ConfigError) as caught:
        validate_run_config({"model": {"name": "svm"}, "svm": {"gamma": 0.01, "gamma_factor": 2.0}})
    assert "svm.gamma=0.01" in str(caught.value) and "svm.gamma_factor=2.0" in str(caught.value)
    assert validate_run_config({"svm": {"gamma": 0.01}}).svm.gamma_factor == 1.0  # a numeric gamma alone still works
    with pytest.raises(ConfigError, match="gamma_factor"):
        validate_run_config({"svm": {"gamma_factor": 0}})
    with pytest.raises(ConfigError, match="svm.gamma_factor"):
        build_model("svm", num_classes=3, gamma=0.1, gamma_factor=2.0)


def test_a_saturated_svm_is_the_same_model_for_every_larger_c():
    X, y = _data(3.0)  # well separated: no slack needed
    test = _data(3.0, seed=1)[0] + np.random.default_rng(2).normal(scale=2.0, size=(60, 16)).astype(np.float32)
    pipeline, fit = fit_svm(_svm(C=1000.0), X, y)
    assert fit.saturated_at is not None and 0 < fit.saturated_at < 1000.0
    assert fit.tags()[SATURATED_TAG] == repr(fit.saturated_at)
    assert fit.bound_ratio == pytest.approx(fit.saturated_at / 1000.0)
    far, far_fit = fit_svm(_svm(C=1e5), X, y)
    assert far_fit.saturated_at == fit.saturated_at
    assert np.array_equal(far.predict_proba(test), pipeline.predict_proba(test))
    # Just above the threshold: the same optimum, reached within the solver's stopping tolerance.
    near, near_fit = fit_svm(_svm(C=fit.saturated_at * 1.01), X, y)
    assert near_fit.saturated_at == pytest.approx(fit.saturated_at, rel=1e-2)
    assert np.array_equal(near.predict(test), pipeline.predict(test))
    assert np.allclose(near.predict_proba(test), pipeline.predict_proba(test), atol=1e-3)
    # Below the threshold the box binds: a support vector sits at its bound and the model changes.
    low, low_fit = fit_svm(_svm(C=fit.saturated_at / 4), X, y)
    assert low_fit.saturated_at is None and low_fit.bound_ratio == pytest.approx(1.0)
    assert not np.array_equal(low.predict_proba(test), pipeline.predict_proba(test))


def test_an_svm_that_needs_slack_is_not_saturated_and_linearsvc_is_not_judged():
    X, y = _data(0.3, dim=2)  # overlapping classes in the plane: no line separates them
    _, fit = fit_svm(_svm(kernel="linear", C=1000.0), X, y)
    assert fit.saturated_at is None and SATURATED_TAG not in fit.tags() and fit.bound_ratio == pytest.approx(1.0)
    _, small_c = fit_svm(_svm(C=0.1), *_data(0.3))
    assert small_c.saturated_at is None
    _, linear = fit_svm(_svm(kernel="linear", linear_impl="liblinear", C=1000.0), *_data(3.0))
    assert linear.saturated_at is None and linear.bound_ratio is None and linear.gamma is None
    assert "svm_gamma" not in linear.metrics()


# ---------------------------------------------------------------------- heads for many classes, their calibration


def _many(n_classes: int = 40, n_per_class: int = 30, dim: int = 32, noise_seed: int = 0):
    """`n_classes` Gaussian classes around fixed random means, overlapping: heads reach about 0.7 accuracy."""
    means = np.random.default_rng(0).normal(size=(n_classes, dim))
    y = np.tile(np.arange(n_classes), n_per_class)
    noise = np.random.default_rng(100 + noise_seed).normal(scale=1.6, size=(len(y), dim))
    return (means[y] + noise).astype(np.float32), y


@pytest.mark.parametrize("settings", [{"kernel": "logistic"},
                                      {"kernel": "rbf", "calibration": "holdout"},
                                      {"kernel": "linear", "linear_impl": "liblinear", "calibration": "holdout"}],
                         ids=["logistic", "rbf-holdout", "linearsvc-holdout"])
def test_scalable_heads_give_probabilities_that_sum_to_one_and_are_reliable_on_held_out_data(settings):
    X, y = _many()
    X_test, y_test = _many(n_per_class=20, noise_seed=1)  # the same classes, fresh samples
    pipeline, fit = fit_svm(_svm(**settings), X, y)
    probs = pipeline.predict_proba(X_test)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    confidence, hit = probs.max(1), pipeline.classes_[probs.argmax(1)] == y_test
    assert 0.5 < hit.mean() < 0.95  # neither hopeless nor trivial: the reliability check means something
    # Reliable: as confident as right on average (an RBF SVC's one-vs-one vote scores stay underconfident, within
    # 0.2), and the more confident half of the predictions is the more accurate one (by more than the ~0.03
    # standard error of the difference between two halves of 400 predictions).
    assert abs(confidence.mean() - hit.mean()) < 0.2
    surer = confidence >= np.median(confidence)
    assert hit[surer].mean() > hit[~surer].mean() + 0.03
    assert fit.calibration and fit.seconds > 0 and fit.tags()[CALIBRATION_TAG] == fit.calibration
    assert fit.metrics()["fit_s"] == fit.seconds


def test_holdout_calibration_keeps_the_accuracy_of_cross_validated_calibration():
    X, y = _many()
    X_test, y_test = _many(n_per_class=20, noise_seed=1)
    accuracy = {}
    for calibration in ("cv", "holdout"):
        pipeline, _ = fit_svm(_svm(kernel="rbf", calibration=calibration), X, y)
        accuracy[calibration] = (pipeline.predict(X_test) == y_test).mean()
    assert accuracy["holdout"] >= accuracy["cv"] - 0.03


def test_holdout_calibration_fits_the_svm_once_where_cross_validation_fits_it_per_fold_and_once_more():
    X, y = _many(n_classes=10)
    _, cv = fit_svm(_svm(kernel="rbf", C=1e6, calibration="cv"), X, y)
    pipeline, held = fit_svm(_svm(kernel="rbf", C=1e6, calibration="holdout"), X, y)
    step = pipeline.named_steps["svc"]
    assert type(step) is CalibratedClassifierCV and type(step.calibrated_classifiers_[0].estimator) is SVC
    assert held.calibration.startswith("temperature, fitted on a held-out") and "3-fold" in cv.calibration
    # one SVC, fitted on the rows not held out for the calibration
    assert step.calibrated_classifiers_[0].estimator.shape_fit_[0] == len(y) - round(0.2 * len(y))
    import skops.io

    assert not set(skops.io.get_untrusted_types(data=skops.io.dumps(pipeline))) - set(SVM_TRUSTED_TYPES)


def test_the_logistic_kernel_is_a_multinomial_logistic_regression_saved_with_trusted_types_only():
    from sklearn.linear_model import LogisticRegression

    cfg = validate_run_config({"model": {"name": "svm"}, "svm": {"backbone": "mobilenet_v2", "kernel": "logistic"}})
    pipeline = build_model("svm", num_classes=5, kernel=cfg.svm.kernel, C=cfg.svm.C)
    assert isinstance(pipeline.steps[-1][1], LogisticRegression)
    import skops.io

    fitted, _ = fit_svm(cfg.svm, *_many(n_classes=5))
    assert not set(skops.io.get_untrusted_types(data=skops.io.dumps(fitted))) - set(SVM_TRUSTED_TYPES)
    with pytest.raises(ConfigError, match="'linear', 'rbf' or 'logistic'"):
        build_model("svm", num_classes=5, kernel="poly")
