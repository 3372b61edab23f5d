"""A tiny sweep run from a sweep file without Ray, for the analysis, warm-start and report tests.

It leaves what `carclf sweep` leaves: `results/<name>/sweep.json` and `sweep.yaml`, a parent run
(with the sweep file as its `sweep.yaml` artifact) and one child run per trial with the runner's
tags. The trials are what the real search proposes: the sweep's searcher (sweeps.run.budget: each
family's default configuration first, then one seeded Optuna TPE search per family) suggests each
trial, sweeps.run.trial.trial_config builds its RunConfig, carclf.experiment.run_experiment runs it, and
the searcher is told its objectives. Built once per test process; `clone` gives a test its own copy
of the database.

The sweep 'pareto': an SVM family searching kernel, C, gamma and its backbone (two random-init
backbones at 32 px) and a one-epoch simple CNN, on two objectives (validation macro-F1 and
inference time). One trial run is left RUNNING, as in a sweep that is still going.
"""

from __future__ import annotations

import collections
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import use_tracking_uri
from tiny_sweep import EXPERIMENT, write_sweep_json

NAME = "pareto"
BACKBONES = ["simple_cnn", "mobilenet_v2"]


def sweep_file(data_dir: Path, cache: Path, **over) -> dict:
    spec = {
        "name": NAME,
        "base": {"data": {"path": str(data_dir), "image_size": 32, "min_images": 2, "cache_dir": str(cache)},
                 "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
                 "balance": {"mode": "none"}, "augment": {"strength": 0.0},
                 "train": {"device": "cpu", "num_workers": 0, "batch_size": 16, "amp": False, "epochs": 1},
                 "model": {"weights": "none"}, "svm": {"backbone": BACKBONES[0], "backbone_weights": "none"},
                 "tracking": {"experiment": EXPERIMENT, "log_model": False}},
        "models": {"svm": {"space": {"kernel": {"choices": ["linear", "rbf"]},
                                     "C": {"low": 0.01, "high": 100.0, "log": True},
                                     "gamma": {"low": 1.0e-4, "high": 1.0, "log": True},
                                     "backbone": {"choices": BACKBONES}}},
                   "simple_cnn": {"space": {"lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True}}}},
        "metric": ["val_f1_macro", "infer_ms_per_img"], "mode": ["max", "min"],
        "num_samples": 10, "n_startup_trials": 4, "seeds": {"sampler": 0, "run": 0},
    }
    spec.update(over)
    return spec


@dataclass
class SpecSweep:
    root: Path  # project root of the original (results/, mlflow.db)
    cache: Path
    data_dir: Path
    name: str
    parent_run_id: str
    spec: object  # sweeps.search.spec.SweepSpec
    drawn: dict  # trial run_id -> the params the search drew
    extractions: collections.Counter  # backbone -> how many times its features were extracted (any splits at once)
    running_run_id: str


_BUILT: dict[str, SpecSweep] = {}


def run_spec_sweep(data: dict, *, root: Path, uri: str):
    """Parent run + one trial per `num_samples`, each suggested by the searcher of the sweep file `data`.
    Returns (parent run id, {run_id: suggested params})."""
    from carclf.experiment import run_experiment
    from carclf.tracking import runs as tracking
    from sweeps.run.budget import budget_search
    from sweeps.run.records import BASELINE_TAG
    from sweeps.run.trial import TrialContext, trial_config
    from sweeps.search.spec import validate_sweep_spec

    spec = validate_sweep_spec(data)
    text = yaml.safe_dump(data, sort_keys=False)
    searcher = budget_search(spec)
    drawn = {}
    with tracking.start_run(experiment=EXPERIMENT, run_name=spec.name, uri=uri,
                            tags={"carclf.sweep": spec.name, "carclf.role": "sweep"}) as parent:
        parent_id = parent.info.run_id
        import mlflow

        mlflow.log_text(text, "sweep.yaml")
        ctx = TrialContext(sweep=spec.name, spec=spec, overrides={"tracking": {"uri": uri, "experiment": EXPERIMENT}},
                           parent_run_id=parent_id, tracking_uri=uri)
        for i in range(spec.num_samples):
            trial_id = f"{spec.name}_{i:05d}"
            params = searcher.suggest(trial_id)
            cfg = trial_config(ctx, params, trial_id)
            tags = {"carclf.sweep": spec.name, "carclf.role": "trial", "carclf.trial_id": trial_id,
                    "carclf.sweep_model": params["model"]}
            if params.get("baseline"):
                tags[BASELINE_TAG] = "true"
            result = run_experiment(cfg, parent_run_id=parent_id, tags=tags, log_model=False)
            searcher.on_trial_complete(trial_id, {"val_f1_macro": result.val_metrics["f1_macro"],
                                                  "infer_ms_per_img": result.infer_ms_per_img,
                                                  "size_mb": result.size_mb})
            drawn[result.run_id] = params
    folder = root / "results" / spec.name
    write_sweep_json(root, spec.name, parent_id, uri)
    (folder / "sweep.yaml").write_text(text)
    return parent_id, drawn


def _build(root: Path, data_dir: Path) -> SpecSweep:
    from mlflow.tracking import MlflowClient

    import carclf.training.features as features
    from sweeps.search.spec import validate_sweep_spec

    cache = root / "cache"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    data = sweep_file(data_dir, cache)
    extractions: collections.Counter = collections.Counter()
    extract = features._extract_missing

    def counting(cfg, data, missing, *args, **kw):
        # a backbone is also built to time the whole classifier (carclf.training.timing); only extractions count here
        if missing:
            extractions[cfg.svm.backbone] += 1
        return extract(cfg, data, missing, *args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARCLF_PROJECT_ROOT", str(root))
        mp.setenv("CARCLF_CACHE_DIR", str(cache))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(features, "_extract_missing", counting)
        parent_id, drawn = run_spec_sweep(data, root=root, uri=uri)
    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    running = client.create_run(exp, run_name="still-running", tags={
        "mlflow.parentRunId": parent_id, "carclf.sweep": NAME, "carclf.role": "trial",
        "carclf.trial_id": f"{NAME}_running", "carclf.sweep_model": "svm"})
    return SpecSweep(root, cache, data_dir, NAME, parent_id, validate_sweep_spec(data), drawn, extractions,
                     running.info.run_id)


def spec_sweep(tmp_path_factory, data_dir: Path) -> SpecSweep:
    if "built" not in _BUILT:
        _BUILT["built"] = _build(tmp_path_factory.mktemp("spec_sweep"), data_dir)
    return _BUILT["built"]


def clone(sweep: SpecSweep, dest: Path, monkeypatch) -> str:
    """A private copy of the database and the sweep folder under `dest`; env points there. Returns the URI."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sweep.root / "mlflow.db", dest / "mlflow.db")
    uri = f"sqlite:///{dest / 'mlflow.db'}"
    write_sweep_json(dest, sweep.name, sweep.parent_run_id, uri)
    shutil.copy2(sweep.root / "results" / sweep.name / "sweep.yaml", dest / "results" / sweep.name / "sweep.yaml")
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(dest))
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(sweep.cache))
    use_tracking_uri(uri, monkeypatch)  # set_tracking_uri calls made while the sweep was built are forgotten
    return uri


@pytest.fixture(scope="module")
def pareto_sweep(tmp_path_factory, demo_dir) -> SpecSweep:
    return spec_sweep(tmp_path_factory, demo_dir)


@pytest.fixture
def pareto_uri(pareto_sweep, tmp_path, monkeypatch) -> str:
    """This test's private copy of the sweep's database; CARCLF_PROJECT_ROOT and MLFLOW_TRACKING_URI point there."""
    return clone(pareto_sweep, tmp_path / "project", monkeypatch)


def finished_values(uri: str, parent_run_id: str, metric: str) -> dict[str, float]:
    """run_id -> `metric` of every FINISHED trial run of the sweep, as MLflow holds it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`carclf.role` = 'trial'")
    return {r.info.run_id: r.data.metrics[metric] for r in runs if r.info.status == "FINISHED"}


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())
