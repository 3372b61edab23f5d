"""The MLflow UI side: model-training experiments, a saved view per sweep, early stops explained, links that work."""

import json

import pytest
from mlflow.tracking import MlflowClient

from carclf.tracking import browse
from carclf.tracking import runs as tracking


def test_a_new_experiment_is_a_model_training_one_and_says_what_made_it(tracked):
    exp_id = tracking.ensure_experiment("made", tracked, created_by="carclf sweep quickstart")
    tags = MlflowClient(tracked).get_experiment(exp_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["carclf.created_by"] == "carclf sweep quickstart" and tags["carclf.version"]


def test_an_older_experiment_is_marked_and_a_kind_set_by_hand_stays(tracked):
    client = MlflowClient(tracked)
    old = client.create_experiment("old")
    mine = client.create_experiment("mine", tags={"mlflow.experimentKind": "genai_development"})
    browse.mark_experiment(client, old)
    browse.mark_experiment(client, mine)
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(mine).tags["mlflow.experimentKind"] == "genai_development"
    browse.mark_experiment(client, "no-such-experiment")  # warns, never raises


def test_the_sweep_view_lists_its_trials_best_first_with_family_metric_and_early_stops(tracked):
    client = MlflowClient(tracked)
    exp = client.create_experiment("carclf")
    parent = client.create_run(exp, tags={"carclf.sweep": "quick", "carclf.role": "sweep"}).info.run_id
    trials = {}
    for name, value in (("low", 0.2), ("high", 0.9), ("mid", 0.5)):
        run = client.create_run(exp, tags={"carclf.sweep": "quick", "carclf.role": "trial",
                                           "mlflow.parentRunId": parent, "carclf.sweep_model": "svm_rbf"})
        client.log_metric(run.info.run_id, "val_f1_macro", value)
        trials[name] = run.info.run_id
    client.create_run(exp, tags={"carclf.sweep": "other", "carclf.role": "trial"})  # another sweep's trial

    vid = browse.save_sweep_view(client, exp, "quick", "val_f1_macro", "max", ["svm.C", "svm.gamma_factor"])
    envelope = json.loads(client.get_experiment(exp).tags[f"mlflow.sharedViewState.{vid}"])
    assert envelope["name"] == "sweep quick: trials by val_f1_macro" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"] == ["tags.`carclf.sweep_model`", "metrics.`val_f1_macro`", "params.`svm.C`",
                                        "params.`svm.gamma_factor`", "tags.`carclf.baseline`",
                                        "tags.`carclf.stopped_early`"]
    assert all(state["columnWidths"][c] > 10 * len("carclf.") for c in state["selectedColumns"] if c.startswith("tags."))
    # the view's filter and order, as the UI sends them to the server: this sweep's trials, best first
    order = f"{state['orderByKey']} {'ASC' if state['orderByAsc'] else 'DESC'}"
    found = client.search_runs([exp], filter_string=state["searchFilter"], order_by=[order])
    assert [r.info.run_id for r in found] == [trials["high"], trials["mid"], trials["low"]]


def test_a_trial_stopped_by_the_scheduler_says_why_on_its_run(tracked):
    from sweeps.run.records import STOPPED_TAG
    from sweeps.run.trial import _mark_stopped

    client = MlflowClient(tracked)
    run = client.create_run(client.create_experiment("carclf")).info.run_id
    client.set_tag(run, "carclf.error", "SystemExit")
    _mark_stopped(client, run, epochs=2)
    got = client.get_run(run)
    assert got.info.status == "KILLED"  # honest: MLflow's status for a run ended from outside
    assert got.data.tags[STOPPED_TAG] == "after epoch 2 (scheduler or time budget)"
    note = got.data.tags["mlflow.note.content"]
    assert "Stopped early after epoch 2" in note and "not an error" in note and "carclf.error" not in got.data.tags


@pytest.mark.parametrize("uri, start", [
    ("sqlite:////tmp/p/mlflow.db", "http://127.0.0.1:5000/#/experiments/3/runs/abc?"),
    ("http://admin:secret@mlflow.example.org:5000/", "http://mlflow.example.org:5000/#/experiments/3/runs/abc?"),
])
def test_links_open_the_model_training_workflow_where_the_runs_are(uri, start):
    url = browse.ui_url(uri, browse.ui_path("3", run_id="abc"))
    assert url.startswith(start) and url.endswith("workflowType=machine_learning") and "secret" not in url
    assert ("carclf ui" in browse.ui_heading(uri)) == uri.startswith("sqlite")
    view = browse.ui_path("3", view_id=browse.view_id("my sweep"))
    assert view == "/#/experiments/3/runs?viewStateShareKey=carclf-sweep-my_sweep&workflowType=machine_learning"


def test_carclf_ui_prints_the_model_training_link_and_one_per_sweep(tracked, tmp_path, monkeypatch, capsys):
    from tiny_sweep import write_sweep_json

    client = MlflowClient(tracked)
    exp = client.create_experiment("carclf")
    parent = client.create_run(exp).info.run_id
    write_sweep_json(tmp_path, "quick", parent, tracked)
    write_sweep_json(tmp_path, "elsewhere", parent, "sqlite:////other/mlflow.db")  # another store: not listed
    from test_tracking import _fake_ui, _FakeServer, _free_port

    _fake_ui(monkeypatch, capsys)
    port = _free_port()
    tracking.cli_ui(type("Args", (), {"backend_store_uri": tracked, "port": port})())
    out = _FakeServer.last.printed_before_start + capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in out
    assert (f"sweep quick: http://127.0.0.1:{port}/#/experiments/{exp}/runs?viewStateShareKey=carclf-sweep-quick"
            "&workflowType=machine_learning") in out
    assert "elsewhere" not in out


def test_the_view_shows_every_parameter_some_family_searches(tmp_path):
    import yaml

    from sweeps.search.spec import load_sweep_spec
    from sweeps.search.studies import searched_fields

    spec = {"base": {"data": {"path": str(tmp_path)}},
            "models": {"cnn": {"model": "simple_cnn", "space": {"lr": {"low": 1e-3, "high": 1e-2}, "epochs": 2}},
                       "rbf": {"model": "svm", "space": {"kernel": "rbf", "C": {"low": 0.1, "high": 10.0, "log": True},
                                                         "gamma_factor": {"low": 0.1, "high": 10.0, "log": True}}}},
            "space": {"augment_strength": {"choices": [0.0, 0.3]}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    # constants (epochs 2, kernel rbf) are the same in every trial: no column for them
    assert searched_fields(load_sweep_spec(path)) == ["augment.strength", "svm.C", "svm.gamma_factor", "train.lr"]
