"""Sweeps with Ray (slow): a sweep leaves one MLflow child run per trial, retries failures, resumes after a kill."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


def _sweep_file(path: Path, data_dir: Path, **over) -> Path:
    spec = {
        "base": {"data": {"path": str(data_dir), "image_size": 32, "min_images": 2},
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2},
                 "balance": {"mode": "none"}, "augment": {"strength": 0.0},
                 "train": {"device": "cpu", "num_workers": 0, "batch_size": 16, "amp": False},
                 "model": {"weights": "none"},
                 "svm": {"backbone": "simple_cnn", "backbone_weights": "none"},
                 "tracking": {"experiment": "sweeps"}},  # log_model on: trials still log none
        "models": {"simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 2}},
                   "svm_linear": {"model": "svm", "space": {"kernel": "linear"}},
                   "svm_rbf": {"model": "svm", "space": {"kernel": "rbf"}}},
        "num_samples": 6, "max_concurrent_trials": 2, "n_startup_trials": 6,
        "scheduler": {"grace_period": 2}, "seeds": {"sampler": 7, "run": 0}, "max_failures": 1,
    }
    spec.update(over)
    path.write_text(yaml.safe_dump(spec))
    return path


def _children(uri: str, parent: str, deleted: bool = False):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    view = ViewType.ALL if deleted else ViewType.ACTIVE_ONLY
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'", run_view_type=view)


@pytest.mark.slow
def test_sweep_logs_a_parent_and_one_child_per_trial(tmp_path, tracked, demo_dir, ray_local, run_artifacts):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from sweeps.run.runner import run_sweep

    table = run_sweep(_sweep_file(tmp_path / "s.yaml", demo_dir), name="six", tracking_uri=tracked)
    out = tmp_path / "results" / "six"
    state = json.loads((out / "sweep.json").read_text())
    assert state["tracking_uri"] == tracked and state["metric"] == "val_f1_macro"
    client = MlflowClient(tracked)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["carclf.role"] == "sweep" and parent.data.tags["carclf.sweep"] == "six"
    assert table.attrs["ended_by"] == parent.data.tags["carclf.sweep_ended_by"] == "num_samples"

    runs = _children(tracked, parent.info.run_id)
    assert len(runs) == 6
    assert len({r.data.tags["carclf.trial_id"] for r in runs}) == 6
    assert len({r.data.tags["carclf.sweep_model"] for r in runs}) == 3
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["carclf.role"] == "trial" and r.data.tags["carclf.sweep"] == "six"
        # A lean trial: validation only (selection never sees the test split) and no model logged.
        assert "val_f1_macro" in r.data.metrics and not any(k.startswith("test_") for k in r.data.metrics)
        logged = run_artifacts(r.info.run_id)
        assert "confusion_val.json" in logged and "confusion_test.json" not in logged
        assert len(client.search_logged_models([r.info.experiment_id],
                                                f"source_run_id = '{r.info.run_id}'")) == 0
        assert r.data.params["data.cache_dir"] == os.environ["CARCLF_CACHE_DIR"]

    # The table on disk is the returned one and agrees with MLflow, trial by trial.
    saved = pd.read_parquet(out / "results.parquet")
    assert len(saved) == len(table) == 6 and (out / "results.csv").is_file()
    by_run = {r.info.run_id: r for r in runs}
    assert set(saved["mlflow_run_id"]) == set(by_run)
    for row in saved.itertuples():
        run = by_run[row.mlflow_run_id]
        assert run.data.tags["carclf.trial_id"] == row.trial_id
        assert row.val_f1_macro == pytest.approx(run.data.metrics["val_f1_macro"])
        assert row.status == "completed"
    assert not [c for c in saved.columns if c.startswith("test_")]
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(saved["val_f1_macro"].max())
    assert {"results.csv", "results.parquet", "sweep.yaml", "search_space.json"} <= run_artifacts(parent.info.run_id)

    # One decode cache and one feature cache for the whole sweep: later SVM trials read features.
    svm = [r for r in runs if r.data.tags["carclf.model"] == "svm"]
    assert sum(r.data.metrics.get("feature_cache_hits", 0) for r in svm) > 0


@pytest.mark.slow
def test_four_concurrent_trials_log_through_the_server(tmp_path, tracked, demo_dir, ray_local):
    from sweeps.run.runner import run_sweep

    # Networks only: SVM trials sharing a feature key would (rightly) wait for the first to fill the cache.
    models = {"simple_cnn": {"resources": {"cpu": 0.5}, "space": {"epochs": 2}},
              "cnn_fast": {"model": "simple_cnn", "resources": {"cpu": 0.5},
                           "space": {"epochs": 2, "lr": {"choices": [0.005, 0.01]}}}}
    path = _sweep_file(tmp_path / "s.yaml", demo_dir, models=models, num_samples=4, max_concurrent_trials=4)
    table = run_sweep(path, name="four", tracking_uri=tracked)
    runs = _children(tracked, table.attrs["parent_run_id"])
    assert len(runs) == 4
    assert all(r.info.status == "FINISHED" and "carclf.error" not in r.data.tags for r in runs)
    # Trials logged over HTTP to the sweep's server, not to the sqlite file.
    assert all(r.data.params["tracking.uri"].startswith("http://127.0.0.1:") for r in runs)
    # All four ran at the same time.
    spans = [(r.info.start_time, r.info.end_time) for r in runs]
    assert max(s for s, _ in spans) < min(e for _, e in spans)


@pytest.mark.slow
def test_failing_trial_is_retried_then_failed_while_the_sweep_completes(tmp_path, tracked, demo_dir, ray_local):
    from sweeps.run.runner import run_sweep

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a state dict")
    models = {"svm_ok": {"model": "svm", "space": {"kernel": "linear"}},
              "svm_broken": {"model": "svm", "config": {"svm": {"backbone_weights": str(broken)}},
                             "space": {"kernel": "linear"}}}
    path = _sweep_file(tmp_path / "s.yaml", demo_dir, models=models, num_samples=4, max_failures=1)
    table = run_sweep(path, name="faults", tracking_uri=tracked)
    runs = _children(tracked, table.attrs["parent_run_id"])
    by_trial = collections.defaultdict(list)
    for r in runs:
        by_trial[r.data.tags["carclf.trial_id"]].append(r)
    rows = table.set_index("trial_id")
    assert len(rows) == 4
    broken_trials = rows.index[rows["model"] == "svm_broken"]
    assert len(broken_trials) >= 1 and len(broken_trials) < 4
    for tid in broken_trials:
        attempts = by_trial[tid]
        assert len(attempts) == 2  # the first try and one retry
        assert all(r.info.status == "FAILED" and "broken.pt" in r.data.tags["carclf.error"] for r in attempts)
        assert rows.loc[tid, "status"] == "failed" and rows.loc[tid, "attempts"] == 2
    for tid in rows.index[rows["model"] == "svm_ok"]:
        assert [r.info.status for r in by_trial[tid]] == ["FINISHED"]
        assert rows.loc[tid, "status"] == "completed"


@pytest.mark.slow
def test_killed_sweep_resumes_with_every_trial_once(tmp_path, demo_dir):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    path = _sweep_file(tmp_path / "s.yaml", demo_dir, num_samples=6)
    env = dict(os.environ, CARCLF_PROJECT_ROOT=str(tmp_path), CARCLF_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "carclf.cli", "sweep", str(path), "--name", "killed", "--tracking-uri", uri]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    finished, output = [], []
    try:
        for line in proc.stdout:
            output.append(line)
            if line.startswith("[") and "->" in line:
                finished.append(line[1:line.index("]")])
                if len(finished) == 2:
                    break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, mid-sweep
        proc.wait()
    assert len(finished) == 2, "".join(output[-40:])
    state = json.loads((tmp_path / "results" / "killed" / "sweep.json").read_text())
    before = {r.info.run_id for r in _children(uri, state["parent_run_id"]) if r.info.status == "FINISHED"}

    done = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((tmp_path / "results" / "killed" / "sweep.json").read_text()) == state

    runs = _children(uri, state["parent_run_id"])
    counts = collections.Counter(r.data.tags["carclf.trial_id"] for r in runs)
    assert len(counts) == 6 and set(counts.values()) == {1}
    assert all(r.info.status == "FINISHED" for r in runs)
    # Finished trials were kept, not trained again.
    assert before & {r.info.run_id for r in runs}
    import pandas as pd

    table = pd.read_csv(tmp_path / "results" / "killed" / "results.csv")
    assert sorted(table["trial_id"]) == sorted(counts)
    assert set(table["mlflow_run_id"]) == {r.info.run_id for r in runs}


@pytest.mark.slow
def test_two_objective_sweep_with_a_searched_backbone_then_a_warm_start(tmp_path, tracked, demo_dir, ray_local,
                                                                      run_artifacts):
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from sweeps.run.runner import run_sweep

    models = {"svm": {"space": {"kernel": "linear", "C": {"low": 0.01, "high": 1.0, "log": True},
                                "backbone": {"choices": ["simple_cnn", "mobilenet_v2"]}}},
              "simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 2}}}
    path = _sweep_file(tmp_path / "mo.yaml", demo_dir, models=models, num_samples=8, n_startup_trials=8,
                       metric=["val_f1_macro", "infer_ms_per_img"], mode=["max", "min"],
                       scheduler={"grace_period": 1})
    table = run_sweep(path, name="mo", tracking_uri=tracked)
    parent = table.attrs["parent_run_id"]
    runs = _children(tracked, parent)
    assert len({r.data.tags["carclf.trial_id"] for r in runs}) == 8
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert all(r.data.metrics["infer_ms_per_img"] > 0 for r in finished)

    # the analysis ran at the end and sits on the parent run; its front is non-dominated
    analysis_files = {p for p in run_artifacts(parent) if p.startswith("analysis/")}
    assert {"analysis/summary.json", "analysis/pareto.csv", "analysis/pareto.png",
            "analysis/svm/history.png"} <= analysis_files
    pareto = pd.read_csv(tmp_path / "results" / "mo" / "analysis" / "pareto.csv")
    assert set(pareto["run_id"]) == {r.info.run_id for r in finished}
    from test_sweeps_analysis import check_front

    check_front(pareto, [("val_f1_macro", "max"), ("infer_ms_per_img", "min")])

    # each backbone's features were extracted once and read from the cache by the others: its train split's
    # when the driver ranked the backbones, its validation split's by at most one trial (a trial recorded as
    # equivalent to an earlier one trained nothing and read nothing)
    svm = [r for r in finished
           if r.data.tags["carclf.sweep_model"] == "svm" and "carclf.equivalent_to" not in r.data.tags]
    for backbone in {r.data.params["svm.backbone"] for r in svm}:
        hits = [r.data.metrics["feature_cache_hits"] for r in svm if r.data.params["svm.backbone"] == backbone]
        assert 0 not in hits and sum(h < 2 for h in hits) <= 1, (backbone, hits)

    # a wider C range, warm-started from the sweep above: after each family's default configuration, its
    # first trials are that sweep's best per family (a best that is the new default runs once, as the default)
    models["svm"]["space"]["C"] = {"low": 1e-3, "high": 100.0, "log": True}
    wider = _sweep_file(tmp_path / "wide.yaml", demo_dir, models=models, num_samples=4, n_startup_trials=4,
                        metric=["val_f1_macro", "infer_ms_per_img"], mode=["max", "min"],
                        scheduler={"grace_period": 1})
    warm = run_sweep(wider, name="wide", tracking_uri=tracked, warm_start="mo", top=1)
    client = MlflowClient(tracked)
    start = json.loads(Path(client.download_artifacts(warm.attrs["parent_run_id"], "warm_start.json",
                                                      str(tmp_path))).read_text())
    assert sorted(s["family"] for s in start["sources"]) == ["simple_cnn", "svm"]
    decisions = [json.loads(line) for line in Path(client.download_artifacts(
        warm.attrs["parent_run_id"], "budget.jsonl", str(tmp_path))).read_text().splitlines()]
    from sweeps.search.defaults import default_trial
    from sweeps.search.spec import load_sweep_spec

    spec = load_sweep_spec(wider)
    # each family's default configuration first (cheapest first, by the plan's estimate), then the warm starts
    assert sorted((d["phase"], d["family"]) for d in decisions[:2]) == sorted(("default", key) for key in spec.models)
    fresh = [(p, s) for p, s in zip(start["points"], start["sources"])
             if {k: v for k, v in p.items() if k != "model"} != default_trial(spec, p["model"]).point]
    warm_trials = [d for d in decisions if d["phase"] == "warm_start"]
    assert [d["trial"] for d in warm_trials] == list(range(3, 3 + len(fresh)))
    runs = {r.data.tags["carclf.trial_id"]: r for r in _children(tracked, warm.attrs["parent_run_id"])}
    for decision, (point, source) in zip(warm_trials, fresh, strict=True):
        run, earlier = runs[decision["trial_id"]], client.get_run(source["run_id"])
        assert run.data.tags["carclf.sweep_model"] == decision["family"] == point["model"] == source["family"]
        assert "carclf.baseline" not in run.data.tags
        keys = ["svm.C", "svm.backbone"] if point["model"] == "svm" else ["train.lr"]
        assert {k: run.data.params[k] for k in keys} == {k: earlier.data.params[k] for k in keys}


@pytest.mark.slow
def test_two_svm_families_on_one_backbone_read_features_the_driver_extracted_once(tmp_path, tracked, demo_dir,
                                                                                   ray_local):
    from sweeps.run.runner import run_sweep

    models = {"svm_linear": {"model": "svm", "space": {"kernel": "linear"}},
              "svm_rbf": {"model": "svm", "space": {"kernel": "rbf"}}}
    path = _sweep_file(tmp_path / "s.yaml", demo_dir, models=models, num_samples=4, n_startup_trials=4)
    table = run_sweep(path, name="features-first", tracking_uri=tracked)
    trained = [r for r in _children(tracked, table.attrs["parent_run_id"]) if "feature_cache_hits" in r.data.metrics]
    assert len(trained) >= 2 and {r.data.tags["carclf.sweep_model"] for r in trained} == {"svm_linear", "svm_rbf"}
    assert all(r.data.metrics["feature_cache_hits"] == 2 for r in trained)  # train and val: no trial extracted
    entries = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "features").glob("*.parquet"))
    assert entries == ["train", "val"]  # one extraction per split, by the driver
