"""Sweeps, equivalent trials: an SVM configuration that an earlier trial already trained is not trained again."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from carclf.models.svm import SATURATED_TAG
from sweeps.run.equivalence import EQUIVALENT_TAG

FAMILY = "svm_rbf"


def _spec(data_dir, cache):
    from sweeps.search.spec import validate_sweep_spec

    return validate_sweep_spec({
        "name": "eq",
        "base": {"data": {"path": str(data_dir), "image_size": 32, "min_images": 2, "cache_dir": str(cache)},
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
                 "balance": {"mode": "none"}, "augment": {"strength": 0.0},
                 "train": {"device": "cpu", "num_workers": 0, "batch_size": 16},
                 "svm": {"backbone": "mobilenet_v2", "backbone_weights": "none"},
                 "tracking": {"experiment": "eq", "log_model": False}},
        "models": {FAMILY: {"model": "svm", "space": {"kernel": "rbf", "C": {"low": 1e-3, "high": 1e5, "log": True},
                                                      "gamma_factor": {"low": 0.5, "high": 2.0, "log": True}}},
                   "svm_other": {"model": "svm", "space": {"kernel": "rbf"}}}})


class Sweep:
    """A sweep's parent run and its trials run through sweeps.run.trial.run_trial, without Ray (Tune faked)."""

    def __init__(self, spec, uri: str, monkeypatch, experiment_fn=None):
        import sweeps.run.trial as trial
        from sweeps.run.trial import TrialContext

        self.client = MlflowClient(uri)
        from carclf.tracking.runs import ensure_experiment

        exp = ensure_experiment("eq", uri)  # artifacts beside the test's database, not in the working directory
        self.parent = self.client.create_run(exp, tags={"carclf.role": "sweep"}).info.run_id
        self.ctx = TrialContext(sweep="eq", spec=spec, overrides={"tracking": {"uri": uri, "experiment": "eq"}},
                                parent_run_id=self.parent, tracking_uri=uri, experiment_fn=experiment_fn)
        self.reports: list[dict] = []
        self.trial_id = ""
        monkeypatch.setattr(trial, "tune", SimpleNamespace(
            get_context=lambda: SimpleNamespace(get_trial_id=lambda: self.trial_id), report=self.reports.append))
        monkeypatch.setattr(trial, "ray", SimpleNamespace(
            get_runtime_context=lambda: SimpleNamespace(get_node_id=lambda: "node")))

    def run(self, trial_id: str, family: str = FAMILY, **params) -> dict:
        from sweeps.run.trial import run_trial

        self.trial_id = trial_id
        run_trial({"model": family, **{f"{family}.{k}": v for k, v in params.items()}}, self.ctx)
        return self.reports[-1]

    def run_of(self, trial_id: str):
        exp = self.client.get_run(self.parent).info.experiment_id
        (run,) = self.client.search_runs([exp], f"tags.`carclf.trial_id` = '{trial_id}'")
        return run


def _val(run) -> dict:
    return {k: v for k, v in run.data.metrics.items() if k.startswith("val_")}


def _sibling(sweep: Sweep, spec, trial_id: str, *, family=FAMILY, status="FINISHED", saturated_at=None, **params):
    """A finished trial run as a trained trial leaves it: its config's params, trial tags, validation metrics."""
    from carclf.tracking import runs as tracking
    from sweeps.run.trial import trial_config

    cfg = trial_config(sweep.ctx, {"model": family, **{f"{family}.{k}": v for k, v in params.items()}}, trial_id)
    exp = sweep.client.get_run(sweep.parent).info.experiment_id
    tags = {"mlflow.parentRunId": sweep.parent, "carclf.role": "trial", "carclf.trial_id": trial_id,
            "carclf.sweep_model": family, **({SATURATED_TAG: repr(saturated_at)} if saturated_at else {})}
    run_id = sweep.client.create_run(exp, tags=tags).info.run_id
    for k, v in tracking.param_texts(tracking.config_params(cfg)).items():
        sweep.client.log_param(run_id, k, v)
    sweep.client.log_metric(run_id, "val_f1_macro", 0.625)
    sweep.client.log_metric(run_id, "val_accuracy", 0.75)
    sweep.client.set_terminated(run_id, status=status)
    return run_id


def _no_training(cfg, **kw):
    raise AssertionError(f"trained C={cfg.svm.C} gamma_factor={cfg.svm.gamma_factor}, an equivalent configuration")


def test_a_trial_at_or_above_a_siblings_saturation_is_not_trained(tracked_db, tmp_path, monkeypatch):
    spec = _spec(tmp_path / "data", tmp_path / "cache")
    sweep = Sweep(spec, tracked_db, monkeypatch, experiment_fn=_no_training)
    earlier = _sibling(sweep, spec, "t1", C=100.0, gamma_factor=1.0, saturated_at=2.5)
    row = sweep.run("t2", C=2.5, gamma_factor=1.0)
    run = sweep.run_of("t2")
    assert run.info.status == "FINISHED" and run.data.tags[EQUIVALENT_TAG] == earlier
    assert _val(run) == {"val_f1_macro": 0.625, "val_accuracy": 0.75}
    assert run.data.params["svm.C"] == "2.5" and run.data.tags["carclf.sweep_model"] == FAMILY
    assert "saturated" in run.data.tags["mlflow.note.content"]
    assert row["val_f1_macro"] == 0.625 and row["mlflow_run_id"] == run.info.run_id and row["equivalent"] == 1
    sweep.run("t3", C=100.0, gamma_factor=1.0)  # identical to t1
    assert sweep.run_of("t3").data.tags[EQUIVALENT_TAG] == earlier  # t2 is a copy: t1 is the run that trained


@pytest.mark.parametrize("why, sibling, trial", [
    ("below the saturation", {"saturated_at": 2.5, "C": 100.0}, {"C": 2.0}),
    ("not saturated", {"C": 1.0}, {"C": 3.0}),
    ("another gamma factor", {"saturated_at": 2.5, "C": 100.0, "gamma_factor": 2.0}, {"C": 200.0}),
    ("another family", {"saturated_at": 2.5, "C": 100.0, "family": "svm_other"}, {"C": 200.0}),
    ("a failed run", {"saturated_at": 2.5, "C": 100.0, "status": "FAILED"}, {"C": 200.0}),
])
def test_a_trial_that_may_train_another_model_is_trained(why, sibling, trial, tracked_db, tmp_path, monkeypatch):
    trained = []

    def fake_experiment(cfg, **kw):
        trained.append(cfg.svm.C)
        return SimpleNamespace(run_id="x", val_metrics={"f1_macro": 0.5}, test_metrics={}, size_mb=1.0)

    spec = _spec(tmp_path / "data", tmp_path / "cache")
    sweep = Sweep(spec, tracked_db, monkeypatch, experiment_fn=fake_experiment)
    _sibling(sweep, spec, "t1", **{"gamma_factor": 1.0, **sibling})
    row = sweep.run("t2", **{"gamma_factor": 1.0, **trial})
    assert trained == [trial["C"]], why
    assert "equivalent" not in row


@pytest.mark.slow
def test_in_a_real_sweep_a_saturated_svm_is_trained_once_and_a_retest_gets_the_same_model(
        demo_dir, tracked_db, tmp_path, monkeypatch, run_artifacts):
    import carclf.experiment
    from carclf.experiment import run_experiment
    from sweeps.run.trial import trial_config

    fits = []
    real_fit = carclf.experiment.fit_svm
    monkeypatch.setattr(carclf.experiment, "fit_svm", lambda svm, *a, **kw: fits.append(svm.C) or real_fit(svm, *a, **kw))
    spec = _spec(demo_dir, tmp_path / "cache")
    sweep = Sweep(spec, tracked_db, monkeypatch)
    first = sweep.run("t1", C=1000.0, gamma_factor=1.0)
    trained = sweep.run_of("t1")
    saturated_at = float(trained.data.tags[SATURATED_TAG])  # an RBF kernel separates these few images
    assert 0 < saturated_at < 1000.0 and trained.data.metrics["svm_gamma"] > 0
    second = sweep.run("t2", C=50_000.0, gamma_factor=1.0)
    copy = sweep.run_of("t2")
    assert fits == [1000.0]  # not fitted again
    assert copy.data.tags[EQUIVALENT_TAG] == trained.info.run_id and _val(copy) == _val(trained)
    assert second["val_f1_macro"] == first["val_f1_macro"]
    assert "data/manifest.parquet" in run_artifacts(copy.info.run_id)  # what the report reads from a best trial
    # Outside a sweep nothing is skipped, and training C=50,000 really gives the same model.
    retest = run_experiment(trial_config(sweep.ctx, {"model": FAMILY, f"{FAMILY}.C": 50_000.0}, "retest"),
                            evaluate_test=False, log_model=False)
    assert fits == [1000.0, 50_000.0]
    assert {k: retest.val_metrics[k[len("val_"):]] for k in _val(trained)} == pytest.approx(_val(trained))
