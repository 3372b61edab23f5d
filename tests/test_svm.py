"""The SVM head: gamma relative to the data's scale, saturation (every larger C gives the same model)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.calibration import CalibratedClassifierCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from carclf.car_classifier import SVM_TRUSTED_TYPES
from carclf.config import SVMConfig, validate_run_config
from carclf.errors import ConfigError
from carclf.models import build_model
from carclf.svm import SATURATED_TAG, fit_svm, scaled_gamma


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
    assert fit.tags() == {SATURATED_TAG: repr(fit.saturated_at)}
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
    assert fit.saturated_at is None and fit.tags() == {} and fit.bound_ratio == pytest.approx(1.0)
    _, small_c = fit_svm(_svm(C=0.1), *_data(0.3))
    assert small_c.saturated_at is None
    _, linear = fit_svm(_svm(kernel="linear", linear_impl="liblinear", C=1000.0), *_data(3.0))
    assert linear.saturated_at is None and linear.bound_ratio is None and linear.gamma is None
    assert "svm_gamma" not in linear.metrics()
