"""Sweeps: the sweep file is checked before anything starts; a sweep leaves one MLflow child run per trial."""

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

from carclf.config import ConfigError
from sweeps.spec import SearchSpace, load_sweep_spec, validate_sweep_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


# --------------------------------------------------------------------------- the sweep file


def _minimal(**over) -> dict:
    spec = {"base": {"data": {"image_size": 32}},
            "models": {"simple_cnn": {"space": {"epochs": 2}},
                       "svm": {"space": {"kernel": {"choices": ["linear", "rbf"]}}}}}
    spec.update(over)
    return spec


@pytest.mark.parametrize("name", ["quickstart", "toyota", "model10"])
def test_shipped_sweeps_are_valid(name):
    spec = load_sweep_spec(SWEEPS / f"{name}.yaml")
    assert spec.metric == "val_f1_macro" and spec.mode == "max"
    assert len(spec.models) >= 3


def test_toyota_packs_small_trials_on_one_gpu():
    spec = load_sweep_spec(SWEEPS / "toyota.yaml")
    assert {spec.model_name(k) for k in spec.models} == {"vgg16", "alexnet", "simple_cnn", "svm"}
    assert spec.models["vgg16"].resources.gpu == 1
    assert 0 < spec.models["svm_rbf"].resources.gpu < 1


@pytest.mark.parametrize("change, field", [
    ({"num_sample": 3}, "num_sample"),
    ({"metric": "val_loss"}, "metric"),
    ({"max_concurrent_trials": 0}, "max_concurrent_trials"),
    ({"models": {}}, "models"),
    ({"models": {"resnet99": {}}}, "models.resnet99"),
    ({"models": {"svm": {"space": {"lr": 0.1}}}}, "models.svm.space.lr"),
    ({"models": {"simple_cnn": {"space": {"C": 1.0}}}}, "models.simple_cnn.space.C"),
    ({"models": {"simple_cnn": {"space": {"lr": {"low": 0.1, "high": 0.01}}}}}, "models.simple_cnn.space.lr"),
    ({"models": {"simple_cnn": {"space": {"batch_size": {"choices": [8, 0]}}}}}, "models.simple_cnn.space.batch_size"),
    ({"models": {"simple_cnn": {"resources": {"gpu": 1.5}}}}, "models.simple_cnn.resources.gpu"),
    ({"base": {"train": {"lr": -1}}}, "base.train.lr"),
    ({"space": {"augment_strength": {"choices": [0.5, 2.0]}}}, "space.augment_strength"),
    ({"scheduler": {"grace_period": 0}}, "scheduler.grace_period"),
])
def test_bad_sweep_files_are_rejected_naming_the_field(tmp_path, change, field):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_minimal(**change)))
    with pytest.raises(ConfigError) as e:
        load_sweep_spec(path)
    assert field in str(e.value)


def test_missing_sweep_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_sweep_spec(tmp_path / "nope.yaml")


class _Trial:
    """The part of optuna.Trial a define-by-run space uses, drawing from a seeded generator."""

    def __init__(self, seed):
        import random

        self.rng, self.params = random.Random(seed), {}

    def suggest_categorical(self, name, choices):
        return self.params.setdefault(name, self.rng.choice(choices))

    def suggest_float(self, name, low, high, log=False):
        return self.params.setdefault(name, self.rng.uniform(low, high))

    def suggest_int(self, name, low, high, step=1, log=False):
        return self.params.setdefault(name, self.rng.randrange(low, high + 1, step))


def test_space_is_conditional_on_the_model():
    spec = validate_sweep_spec(_minimal(models={
        "cnn": {"model": "simple_cnn", "space": {"lr": {"low": 1e-4, "high": 1e-2, "log": True}, "epochs": 3}},
        "svm": {"space": {"kernel": {"choices": ["linear", "rbf"]},
                          "gamma": {"low": 1e-3, "high": 1.0, "log": True}}}},
        space={"augment_strength": {"choices": [0.0, 0.5]}}))
    space = SearchSpace(spec)
    seen = collections.Counter()
    for seed in range(40):
        trial = _Trial(seed)
        params = space(trial)
        cfg = spec.run_config(params)
        key = params["model"]
        names = {n.split(".", 1)[1] for n in params if n != "model"}
        if key == "cnn":
            assert names == {"lr", "epochs", "augment_strength"}
            assert cfg.model.name == "simple_cnn" and cfg.train.lr == params["cnn.lr"] and cfg.train.epochs == 3
        else:
            kernel = params["svm.kernel"]
            assert names == ({"kernel", "C", "augment_strength"} | ({"gamma"} if kernel == "rbf" else set()))
            assert cfg.svm.kernel == kernel and cfg.svm.C == params["svm.C"]
        assert cfg.augment.strength == params[f"{key}.augment_strength"]
        seen[(key, params.get("svm.kernel"))] += 1
    assert len(seen) == 3  # cnn, linear SVM, RBF SVM all drawn


def test_one_trials_parameters_never_leak_into_the_next():
    spec = validate_sweep_spec(_minimal(base={"data": {"image_size": 32}, "augment": {"strength": 0.0}},
                                        space={"augment_strength": {"choices": [0.0, 0.3]}},
                                        models={"simple_cnn": {"space": {"epochs": 2}},
                                                "svm": {"space": {"augment_strength": 0.0}}}))
    before = spec.model_dump()
    spec.run_config({"model": "simple_cnn", "simple_cnn.augment_strength": 0.3, "simple_cnn.lr": 0.05})
    svm = spec.run_config({"model": "svm", "svm.C": 1.0, "svm.kernel": "rbf", "svm.augment_strength": 0.0})
    assert svm.augment.strength == 0.0 and svm.train.lr != 0.05
    assert spec.model_dump() == before


def test_seeded_sampler_proposes_the_same_trials():
    import optuna

    spec = load_sweep_spec(SWEEPS / "quickstart.yaml")

    def proposals(seed):
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
        out = []
        for i in range(6):
            trial = study.ask()
            out.append(SearchSpace(spec)(trial))
            study.tell(trial, float(i % 3))
        return out

    assert proposals(3) == proposals(3)
    assert proposals(3) != proposals(4)


def test_first_fill_lock_makes_the_second_trial_wait_for_the_first(tmp_path):
    import threading
    import time

    from sweeps.runner import first_fill_lock

    key = {"svm": {"backbone": "mobilenet_v2"}}
    order = []

    def trial(name, hold):
        with first_fill_lock(tmp_path, key):
            order.append(f"{name} in")
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=trial, args=("first", 0.5))
    first.start()
    time.sleep(0.1)
    trial("second", 0)
    first.join()
    assert order == ["first in", "first out", "second in", "second out"]
    assert len(list((tmp_path / "sweep-locks").glob("*.done"))) == 1


def test_first_fill_lock_is_not_marked_done_by_a_failure(tmp_path):
    from sweeps.runner import first_fill_lock

    with pytest.raises(RuntimeError):
        with first_fill_lock(tmp_path, {"k": 1}):
            raise RuntimeError("extraction failed")
    assert not list((tmp_path / "sweep-locks").glob("*.done"))


# --------------------------------------------------------------------------- sweeps with Ray (slow)


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
                 "tracking": {"experiment": "sweeps", "log_model": False}},
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

    from sweeps.runner import run_sweep

    table = run_sweep(_sweep_file(tmp_path / "s.yaml", demo_dir), name="six", tracking_uri=tracked)
    out = tmp_path / "results" / "six"
    state = json.loads((out / "sweep.json").read_text())
    assert state["tracking_uri"] == tracked and state["metric"] == "val_f1_macro"
    client = MlflowClient(tracked)
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["carclf.role"] == "sweep" and parent.data.tags["carclf.sweep"] == "six"

    runs = _children(tracked, parent.info.run_id)
    assert len(runs) == 6
    assert len({r.data.tags["carclf.trial_id"] for r in runs}) == 6
    assert len({r.data.tags["carclf.sweep_model"] for r in runs}) == 3
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["carclf.role"] == "trial" and r.data.tags["carclf.sweep"] == "six"
        assert {"val_f1_macro", "test_f1_macro"} <= set(r.data.metrics)
        assert "confusion_val.json" in run_artifacts(r.info.run_id)
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
        assert row.test_f1_macro == pytest.approx(run.data.metrics["test_f1_macro"])
        assert row.status == "completed"
    assert parent.data.metrics["best_val_f1_macro"] == pytest.approx(saved["val_f1_macro"].max())
    assert {"results.csv", "results.parquet", "sweep.yaml", "search_space.json"} <= run_artifacts(parent.info.run_id)

    # One decode cache and one feature cache for the whole sweep: later SVM trials read features.
    svm = [r for r in runs if r.data.tags["carclf.model"] == "svm"]
    assert sum(r.data.metrics.get("feature_cache_hits", 0) for r in svm) > 0


@pytest.mark.slow
def test_four_concurrent_trials_log_through_the_server(tmp_path, tracked, demo_dir, ray_local):
    from sweeps.runner import run_sweep

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
    from sweeps.runner import run_sweep

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
