"""Sweeps, edge warnings: a family's best value at an end of its search range is flagged with a wider range."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

from sweeps.analysis.edges import EDGE_FILE, edge_lines, edge_warnings, read_edge_warnings, suggest, write_edge_warnings
from sweeps.search.spec import FloatRange, IntRange, validate_sweep_spec
from sweeps.search.studies import SweepTrial


def _trial(i, family, value, **params):
    now = int(time.time() * 1000)
    return SweepTrial(run_id=f"r{i}", trial_id=f"t{i}", family=family, status="FINISHED", start_ms=now + i,
                      end_ms=now + i + 10, metrics={"val_f1_macro": value},
                      params={k.replace("_", ".", 1): str(v) for k, v in params.items()})


SPEC = validate_sweep_spec({
    "base": {"data": {"image_size": 32}},
    "models": {"svm_linear": {"model": "svm", "space": {"kernel": "linear", "C": {"low": 1e-4, "high": 1.0, "log": True}}},
               "svm_rbf": {"model": "svm", "space": {"kernel": {"choices": ["linear", "rbf"]},
                                                     "C": {"low": 1e-3, "high": 1e3, "log": True},
                                                     "gamma_factor": {"low": 0.1, "high": 10.0, "log": True}}},
               "simple_cnn": {"space": {"lr": {"low": 0.001, "high": 0.011}, "epochs": {"low": 2, "high": 6}}}},
    "space": {"augment_strength": {"low": 0.0, "high": 1.0}}})


def _by_param(warnings, family):
    return {w["param"]: w for w in warnings if w["family"] == family}


def test_a_best_value_at_the_edge_is_flagged_with_a_wider_range_and_one_in_the_middle_is_not():
    trials = [_trial(0, "svm_linear", 0.70, svm_C=0.908, svm_kernel="linear", augment_strength=0.5),
              _trial(1, "svm_linear", 0.60, svm_C=0.01, svm_kernel="linear", augment_strength=0.5),
              _trial(2, "svm_rbf", 0.80, svm_C=10.0, svm_kernel="rbf", svm_gamma_factor=0.105, augment_strength=0.5),
              _trial(3, "svm_rbf", 0.90, svm_C=0.5, svm_kernel="rbf", svm_gamma_factor=1.0, augment_strength=0.5)]
    warnings = edge_warnings(SPEC, trials)
    linear = _by_param(warnings, "svm_linear")
    assert set(linear) == {"C"}  # augment_strength 0.5 is in the middle of [0, 1]
    c = linear["C"]
    assert (c["edge"], c["best"], c["low"], c["high"], c["log"]) == ("upper", 0.908, 1e-4, 1.0, True)
    assert c["suggested"] == {"low": 1e-4, "high": pytest.approx(10.0)}
    assert "svm_linear" in c["message"] and "models.svm_linear.space.C: {low: 0.0001, high: 10, log: true}" in c["message"]
    # rbf: the best trial (0.90) has C and gamma_factor well inside; the edge gamma_factor was a worse trial
    assert _by_param(warnings, "svm_rbf") == {}
    json.dumps(warnings)  # the file's content


def test_lower_edges_on_log_and_linear_ranges_respect_what_the_setting_allows():
    trials = [_trial(0, "svm_rbf", 0.9, svm_C=1.2e-3, svm_kernel="rbf", svm_gamma_factor=1.0, augment_strength=0.02),
              _trial(1, "simple_cnn", 0.8, train_lr=0.0012, train_epochs=6, augment_strength=0.99)]
    warnings = edge_warnings(SPEC, trials)
    rbf, cnn = _by_param(warnings, "svm_rbf"), _by_param(warnings, "simple_cnn")
    assert rbf["C"]["edge"] == "lower" and rbf["C"]["suggested"] == {"low": pytest.approx(1e-4), "high": 1e3}
    # lr on a linear range [0.001, 0.011]: width 0.01 would cross zero; lr > 0, so it approaches 0 instead
    assert cnn["lr"]["edge"] == "lower" and cnn["lr"]["suggested"]["low"] == pytest.approx(1e-4)
    assert 0 < cnn["lr"]["suggested"]["low"] < 0.001 and "space.lr" in cnn["lr"]["message"]
    assert cnn["epochs"]["suggested"] == {"low": 2, "high": 10}  # an integer range, extended by its width
    # augment strength 0.02 and 0.99 sit at the ends of [0, 1], which is all the setting allows: nothing to widen
    assert "augment_strength" not in rbf and "augment_strength" not in cnn


def test_a_parameter_the_best_trial_did_not_use_and_ties_across_the_range_are_not_flagged():
    # the best rbf-family trial is linear: it drew no gamma_factor; two trials tie at the top, C at both ends
    trials = [_trial(0, "svm_rbf", 0.9, svm_C=900.0, svm_kernel="linear", augment_strength=0.5),
              _trial(1, "svm_rbf", 0.9, svm_C=1.0, svm_kernel="linear", augment_strength=0.5),
              _trial(2, "svm_rbf", 0.5, svm_C=1.0, svm_kernel="rbf", svm_gamma_factor=9.9, augment_strength=0.5)]
    assert _by_param(edge_warnings(SPEC, trials), "svm_rbf") == {}
    tied_at_top = [_trial(0, "svm_rbf", 0.9, svm_C=900.0, svm_kernel="linear", augment_strength=0.5),
                   _trial(1, "svm_rbf", 0.9, svm_C=990.0, svm_kernel="linear", augment_strength=0.5)]
    assert set(_by_param(edge_warnings(SPEC, tied_at_top), "svm_rbf")) == {"C"}


def test_suggest_extends_one_end():
    log_range, linear = FloatRange(low=0.1, high=10.0, log=True), FloatRange(low=2.0, high=4.0)
    assert suggest(log_range, "upper", 9.9) == (0.1, 100.0)
    assert suggest(log_range, "lower", 0.1) == (pytest.approx(0.01), 10.0)
    assert suggest(linear, "upper", 4.0) == (2.0, 6.0) and suggest(linear, "lower", 2.0) == (0.0, 4.0)
    assert suggest(IntRange(low=1, high=8, log=True), "lower", 1) == (1, 8)  # a log integer range stays >= 1


def test_warnings_are_written_to_the_results_folder_and_the_parent_run(tracked_db, tmp_path, run_artifacts, capsys):
    from mlflow.tracking import MlflowClient

    from sweeps.run.runner import _print_edge_warnings

    client = MlflowClient(tracked_db)
    from carclf.tracking.runs import ensure_experiment

    parent = client.create_run(ensure_experiment("edges", tracked_db)).info.run_id  # artifacts beside the database
    info = SimpleNamespace(folder=tmp_path / "results" / "s", parent_run_id=parent)
    info.folder.mkdir(parents=True)
    warnings = edge_warnings(SPEC, [_trial(0, "svm_linear", 0.7, svm_C=0.95, svm_kernel="linear",
                                           augment_strength=0.5)])
    write_edge_warnings(warnings, client, info)
    assert read_edge_warnings(info.folder) == warnings and len(warnings) == 1
    assert EDGE_FILE in run_artifacts(parent)
    assert edge_lines(warnings)[1].strip() == warnings[0]["message"]
    _print_edge_warnings(info.folder)  # the end of `carclf sweep`
    assert warnings[0]["message"] in capsys.readouterr().out
    write_edge_warnings([], client, info)  # a later analysis with nothing at an edge replaces them
    assert read_edge_warnings(info.folder) == [] and edge_lines([]) == []
