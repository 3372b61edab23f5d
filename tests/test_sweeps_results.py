"""Sweeps, the results table: one row per Tune trial, the MLflow run that represents it, its status and figures."""

from types import SimpleNamespace

import pandas as pd
import pytest

from sweeps.run.results import _show, results_table
from sweeps.search.spec import validate_sweep_spec

SPEC = {"base": {"data": {"image_size": 32}},
        "models": {"simple_cnn": {"space": {"epochs": 2}},
                   "svm_linear": {"model": "svm", "space": {"kernel": "linear"}}}}


def _trial(trial_id: str, config: dict, status: str = "TERMINATED", last_result: dict | None = None):
    """The part of a Tune Trial the table reads."""
    return SimpleNamespace(trial_id=trial_id, config=config, status=status, last_result=last_result or {})


def _run(run_id: str, trial_id: str, status: str, start: int, metrics: dict, tags: dict | None = None):
    """The part of an MLflow Run the table reads."""
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id, status=status, start_time=start),
                           data=SimpleNamespace(tags={"carclf.trial_id": trial_id, **(tags or {})}, metrics=metrics))


def test_one_row_per_trial_from_the_run_that_represents_it():
    spec = validate_sweep_spec(SPEC)
    # as the search space samples them: the model entry, then '<entry>.<field>' (constants included)
    cnn = {"model": "simple_cnn", "simple_cnn.lr": 0.01, "simple_cnn.epochs": 2}
    default = {"model": "simple_cnn", "simple_cnn.lr": 0.001, "simple_cnn.epochs": 2, "baseline": True}
    svm = {"model": "svm_linear", "svm_linear.kernel": "linear", "svm_linear.C": 2.0}
    trials = [_trial("t1", cnn), _trial("t2", svm), _trial("t3", cnn),
              _trial("t4", svm, status="ERROR", last_result={"val_f1_macro": 0.95}), _trial("t0", default)]
    runs = [_run("r1a", "t1", "FAILED", 1, {"val_f1_macro": 0.99}, {"carclf.error": "RuntimeError: boom"}),
            _run("r1b", "t1", "FINISHED", 2, {"val_f1_macro": 0.6, "test_f1_macro": 0.5, "epochs_run": 2.0}),
            _run("r2", "t2", "FINISHED", 3, {"val_f1_macro": 0.8, "test_f1_macro": 0.7}),
            _run("r3", "t3", "KILLED", 4, {"val_f1_macro": 0.3}, {"carclf.stopped_early": "by Tune after epoch 1"}),
            _run("r0", "t0", "FINISHED", 0, {"val_f1_macro": 0.1})]
    table = results_table(spec, trials, runs)

    assert table["trial_id"].tolist() == ["t2", "t1", "t3", "t0", "t4"]  # best validation first, no figure last
    rows = table.set_index("trial_id")
    # A retried trial is represented by its finished attempt, not by the failed one's higher figure.
    assert rows.loc["t1", "mlflow_run_id"] == "r1b" and rows.loc["t1", "attempts"] == 2
    assert rows.loc["t1", "status"] == "completed" and rows.loc["t1", "val_f1_macro"] == 0.6
    assert rows.loc["t1", "epochs_run"] == 2.0 and rows.loc["t1", "error"] == ""
    assert rows.loc["t3", "status"] == "stopped_early" and rows.loc["t3", "val_f1_macro"] == 0.3
    # A trial that failed without a run keeps no figure, whatever it last reported to Tune.
    assert rows.loc["t4", "status"] == "failed" and pd.isna(rows.loc["t4", "val_f1_macro"])
    assert rows.loc["t4", "mlflow_run_id"] == "" and rows.loc["t4", "attempts"] == 0
    # Each row holds its own model's parameters, resolved from the sweep file.
    assert rows.loc["t2", "model_name"] == "svm" and rows.loc["t2", "kernel"] == "linear" and rows.loc["t2", "C"] == 2.0
    assert rows.loc["t1", "lr"] == 0.01 and rows.loc["t1", "epochs"] == 2
    assert pd.isna(rows.loc["t2", "lr"]) and pd.isna(rows.loc["t1", "C"])
    assert "gamma" not in table.columns  # a linear kernel has none
    # the family's default configuration is marked, and only it
    assert table.loc[table["baseline"], "trial_id"].tolist() == ["t0"] and rows.loc["t0", "lr"] == 0.001


def test_a_stopped_trials_row_shows_the_last_figure_it_reported():
    spec = validate_sweep_spec(SPEC)
    cnn = {"model": "simple_cnn", "simple_cnn.lr": 0.01, "simple_cnn.epochs": 2}
    stopped = {"carclf.stopped_early": "after epoch 3"}
    trials = [_trial("t1", cnn), _trial("t2", cnn, last_result={"val_f1_macro": 0.41, "training_iteration": 3})]
    # stopped before its final evaluation: the run has only the per-epoch figures (epoch_val_*)
    runs = [_run("r1", "t1", "KILLED", 1, {"epoch_val_f1_macro": 0.55, "epoch_val_accuracy": 0.6}, stopped),
            _run("r2", "t2", "KILLED", 2, {}, stopped)]
    rows = results_table(spec, trials, runs).set_index("trial_id")
    assert rows.loc["t1", "status"] == "stopped_early"
    assert rows.loc["t1", "val_f1_macro"] == 0.55 and rows.loc["t1", "val_accuracy"] == 0.6
    assert rows.loc["t2", "val_f1_macro"] == 0.41  # nothing in MLflow: Tune's last result


def test_a_sweep_without_trials_gives_an_empty_table():
    assert results_table(validate_sweep_spec(SPEC), [], []).empty


class _Client:
    """The MlflowClient calls _reconcile makes, over a dict of runs."""

    def __init__(self, runs):
        self.runs = {r.info.run_id: r for r in runs}
        self.deleted = []

    def search_runs(self, *a, **kw):
        return list(self.runs.values())

    def set_tag(self, run_id, key, value):
        self.runs[run_id].data.tags[key] = value

    def set_terminated(self, run_id, status):
        self.runs[run_id].info.status = status

    def get_run(self, run_id):
        return self.runs[run_id]

    def delete_run(self, run_id):
        self.deleted.append(self.runs.pop(run_id).info.run_id)


def test_after_a_resume_finished_work_of_lost_trials_is_kept_and_unfinished_runs_closed_or_removed():
    from sweeps.run.results import ORPHAN_TAG, _reconcile

    runs = [_run("r1", "t1", "RUNNING", 1, {}), _run("r2", "t2", "FINISHED", 2, {"val_f1_macro": 0.6}),
            _run("lost_done", "gone1", "FINISHED", 3, {"val_f1_macro": 0.9}),
            _run("lost_half", "gone2", "RUNNING", 4, {})]
    client = _Client(runs)
    kept = _reconcile(client, "exp", "parent", [_trial("t1", {}), _trial("t2", {})])
    assert [r.info.run_id for r in kept] == ["r1", "r2"]
    assert client.runs["r1"].info.status == "KILLED" and "left unfinished" in client.runs["r1"].data.tags["carclf.error"]
    assert client.deleted == ["lost_half"]
    assert client.runs["lost_done"].info.status == "FINISHED" and ORPHAN_TAG in client.runs["lost_done"].data.tags


def test_without_trials_from_tune_no_run_is_deleted():
    from sweeps.run.results import _reconcile

    client = _Client([_run("r1", "t1", "KILLED", 1, {})])
    assert _reconcile(client, "exp", "parent", []) == [] and client.deleted == []


def _a_wide_table():
    spec = validate_sweep_spec({**SPEC, "models": {**SPEC["models"], "simple_cnn": {
        "config": {"model": {"weights": "none"}}, "space": {"epochs": 2}}}})
    trials, runs = [], []
    for i in range(6):
        svm = {"model": "svm_linear", "svm_linear.kernel": "linear", "svm_linear.C": 10.0 ** (i - 3)}
        cnn = {"model": "simple_cnn", "simple_cnn.lr": 0.001 * (i + 1), "simple_cnn.epochs": 2}
        trials += [_trial(f"s{i}", {**svm, "baseline": i == 0}), _trial(f"c{i}", cnn)]
        runs += [_run(f"rs{i}", f"s{i}", "FINISHED", i, {"val_f1_macro": 0.5 + i / 20, "test_f1_macro": 0.4,
                                                         "test_accuracy": 0.45}),
                 _run(f"rc{i}", f"c{i}", "FINISHED", i, {"val_f1_macro": 0.3, "test_f1_macro": 0.2,
                                                         "test_accuracy": 0.25})]
    return results_table(spec, trials, runs)


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_terminal_table_fits_the_terminal_and_says_shared_settings_once(width):
    table = _a_wide_table()
    text = _show(table, "val_f1_macro", width=width)
    assert max(len(line) for line in text.splitlines()) <= width, text
    # every trial is there, with what varies between trials; what every trial shares is said once
    for trial_id in table["trial_id"]:
        assert sum(line.startswith(trial_id) for line in text.splitlines()) == 1
    shared = text[text.index("same in every trial that uses it:"):]
    assert "epochs=2" in shared and "kernel=linear" in shared and "image_size=32" in shared
    assert "epochs=2" not in text[:text.index("same in every trial")]
    assert "C=0.001" in text and "lr=0.006" in text
    # the family's default configuration is marked as such
    assert [line.startswith("s0") for line in text.splitlines() if "(default)" in line] == [True]
    # a network trained from scratch has no finetune setting to show; the CSV keeps every column
    assert "finetune" not in text and "finetune" not in table.columns


def test_results_files_follow_the_umask(tmp_path):
    import os
    from types import SimpleNamespace as NS

    from sweeps.run.driver import _write_text
    from sweeps.run.results import _save_results

    client = NS(log_artifact=lambda *a: None, log_batch=lambda *a, **k: None)
    old = os.umask(0o022)
    try:
        _save_results(_a_wide_table(), tmp_path, client, "parent")
        _write_text(tmp_path / "sweep.json", "{}\n")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"results.parquet": 0o644, "results.csv": 0o644, "sweep.json": 0o644}
