"""Report, selection: the sweep folder, the trial runs, and the best trial per family by validation only."""

import json

import numpy as np
import pandas as pd
import pytest
from report_samples import sample_trials

from carclf.config import RunConfig
from carclf.core.errors import SweepError
from carclf.report.selection import chosen_configuration, resolve_sweep, select_best, unfinished


def test_select_best_uses_validation_not_test_and_only_finished_trials():
    best = select_best(sample_trials(), "val_f1_macro", "max").set_index("model")
    assert sorted(best.index) == ["simple_cnn", "svm"]  # alexnet never finished
    assert best.loc["svm", "run_id"] == "b"  # best validation, worst test
    assert best.loc["simple_cnn", "run_id"] == "d"  # the failed trial's 0.99 does not count


def test_select_best_min_mode_and_ties_go_to_the_earlier_trial():
    t = sample_trials().assign(val_loss=[0.3, 0.3, 0.1, 0.9, np.nan, np.nan])
    best = select_best(t, "val_loss", "min").set_index("model")
    assert best.loc["svm", "run_id"] == "a"  # tie at 0.3: started first


def test_select_best_refuses_a_test_metric():
    with pytest.raises(SweepError, match="test figure"):
        select_best(sample_trials(), "test_f1_macro", "max")


def test_unfinished_lists_failed_running_and_killed_trials():
    left = unfinished(sample_trials(), "val_f1_macro")
    assert left["run_id"].tolist() == ["c", "e", "f"]
    assert "boom" in left.set_index("run_id").loc["c", "error"]


def test_a_retried_trial_keeps_its_finished_attempt():
    from carclf.report.selection import _one_attempt_per_trial

    t = pd.DataFrame([
        {"run_id": "r1", "trial_id": "t1", "status": "FAILED", "start_time": 1},
        {"run_id": "r2", "trial_id": "t1", "status": "FINISHED", "start_time": 2},
        {"run_id": "r3", "trial_id": "t2", "status": "FAILED", "start_time": 3},
        {"run_id": "r4", "trial_id": "t2", "status": "FAILED", "start_time": 4},
        {"run_id": "r5", "trial_id": "t3", "status": "STOPPED_EARLY", "start_time": 5},
    ])
    assert _one_attempt_per_trial(t)["run_id"].tolist() == ["r2", "r4", "r5"]


def test_resolve_sweep_by_name_and_by_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    folder = tmp_path / "results" / "quick"
    folder.mkdir(parents=True)
    meta = {"name": "quick", "parent_run_id": "p1", "experiment": "carclf", "tracking_uri": "sqlite:///x.db",
            "storage_path": str(folder / "ray"), "metric": "val_f1_macro", "mode": "max"}
    (folder / "sweep.json").write_text(json.dumps(meta))
    by_name, by_path = resolve_sweep("quick"), resolve_sweep(str(folder))
    assert by_name == by_path
    assert by_name.report_dir == folder.resolve() / "report"


def test_resolve_sweep_missing_names_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    with pytest.raises(SweepError, match="no sweep 'nope'.*carclf sweep"):
        resolve_sweep("nope")


def test_a_sweep_name_cannot_reach_outside_results(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "elsewhere").mkdir(parents=True)  # results/../elsewhere holds a sweep.json
    (project / "elsewhere" / "sweep.json").write_text(json.dumps({"name": "x"}))
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(project))
    monkeypatch.chdir(tmp_path)  # where '../elsewhere' is no folder: the argument is taken as a name
    with pytest.raises(SweepError, match="no sweep '../elsewhere'.*is not allowed"):
        resolve_sweep("../elsewhere")


def test_resolve_sweep_rejects_incomplete_sweep_json(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "x", "metric": "val_f1_macro"}))
    with pytest.raises(SweepError, match="lacks parent_run_id, tracking_uri, mode"):
        resolve_sweep(str(tmp_path))


def test_trial_config_falls_back_to_params_when_config_yaml_is_missing(tmp_path):
    from mlflow.tracking import MlflowClient

    from carclf.report.selection import trial_config
    from carclf.tracking.runs import flatten

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("carclf", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    cfg = RunConfig(model={"name": "svm"}, svm={"C": 3.5, "gamma": 0.01}, data={"classes": ["bus", "van"]},
                    train={"lr": 0.02}, seed=7)
    for key, value in flatten(cfg.to_dict()).items():  # as tracking.log_params logs them: str(value)
        client.log_param(run_id, key, str(value))
    assert trial_config(client, run_id) == cfg


@pytest.mark.parametrize("config, shown, hidden", [
    ({"model": {"name": "svm"}, "svm": {"kernel": "linear"}}, ["kernel=linear", "C="], ["gamma=", "gamma_factor="]),
    ({"model": {"name": "svm"}, "svm": {"kernel": "rbf", "gamma_factor": 4.0}}, ["kernel=rbf", "gamma_factor=4"], []),
    ({"model": {"name": "svm"}, "svm": {"kernel": "rbf", "gamma": 0.01}}, ["kernel=rbf", "gamma=0.01"], []),
    ({"model": {"name": "simple_cnn", "weights": "none"}}, ["weights=none", "lr="], ["finetune="]),
    ({"model": {"name": "mobilenet_v2", "weights": "imagenet", "finetune": "full"}}, ["finetune=full"], []),
    ({"model": {"name": "alexnet", "weights": "none"}}, ["finetune=head"], []),  # head only still freezes it
    ({"balance": {"mode": "none"}}, ["balance=none"], ["samples_per_class="]),
    ({"balance": {"mode": "both"}}, ["samples_per_class=median"], []),
])
def test_chosen_configuration_shows_only_what_the_family_uses(config, shown, hidden):
    text = chosen_configuration(RunConfig(**config))
    for part in shown:
        assert part in text, (part, text)
    for part in hidden:
        assert part not in text, (part, text)
