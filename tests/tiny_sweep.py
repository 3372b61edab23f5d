"""A tiny sweep made without Ray, for the report, promote and predict tests.

It has what `carclf sweep` leaves behind (spec, issue 4): `results/<name>/sweep.json`, a parent
MLflow run tagged carclf.role=sweep and one child run per trial made by run_experiment with the
runner's trial tags and settings (no test split, no model), one of them FAILED. Two sweeps share the data, split and database: 'good'
(model entry svm_rbf: an SVM on real MobileNetV2 features with two settings; simple_cnn; a failing
alexnet) and 'bad' (svm_rbf crippled by a tiny C).
Both are reported once per test process; each test then works on its own copy of the database,
so registry changes in one test never leak into another.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import use_tracking_uri

EXPERIMENT = "carclf"
IMAGE_SIZE = 64


@dataclass
class TinySweeps:
    root: Path  # project root of the original (results/, mlflow.db)
    cache: Path
    data_dir: Path
    good: object  # carclf.report.ReportResult
    bad: object
    finals: dict  # sweep name -> {trial run_id: final val macro-F1 from run_experiment} (finished trials)


_BUILT: dict[str, TinySweeps] = {}


def config(data_dir: Path, uri: str, cache: Path, **sections):
    from carclf.config import deep_merge, validate_run_config
    from carclf.models.zoo import mobilenet_v2_weights_file

    base = {
        "data": {"path": str(data_dir), "image_size": IMAGE_SIZE, "min_images": 2, "cache_dir": str(cache)},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0},
        "balance": {"mode": "none"},
        "augment": {"strength": 0.0},
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "device": "cpu", "amp": False, "num_workers": 0},
        "svm": {"backbone": "mobilenet_v2", "backbone_weights": str(mobilenet_v2_weights_file()), "kernel": "rbf"},
        "model": {"weights": "none"},
        "tracking": {"uri": uri, "experiment": EXPERIMENT},
    }
    return validate_run_config(deep_merge(base, sections), "test config")


def make_sweep(name: str, trials: list[tuple[str, object]], *, root: Path, uri: str) -> dict:
    """Parent run + one trial run per (model entry, config), tagged as the sweep runner tags them.

    A failing config yields a FAILED run. Returns {run_id: final validation macro-F1 (None if failed)}
    as run_experiment computed it, for checking what the report reads back from MLflow.
    """
    from carclf.experiment import run_experiment
    from carclf.tracking import runs as tracking

    finals = {}
    with tracking.start_run(experiment=EXPERIMENT, run_name=name, uri=uri,
                            tags={"carclf.sweep": name, "carclf.role": "sweep"}) as parent:
        parent_id = parent.info.run_id
        for i, (label, cfg) in enumerate(trials):
            tags = {"carclf.sweep": name, "carclf.role": "trial", "carclf.trial_id": f"{name}_{i:05d}",
                    "carclf.sweep_model": label}
            try:
                # As the runner's trials: validation only, no model (the report retests and logs models).
                result = run_experiment(cfg, parent_run_id=parent_id, tags=tags, evaluate_test=False, log_model=False)
                finals[result.run_id] = result.val_metrics["f1_macro"]
            except Exception:  # noqa: BLE001 - a failed trial is part of the fixture
                pass
    write_sweep_json(root, name, parent_id, uri)
    return finals


def write_sweep_json(root: Path, name: str, parent_id: str, uri: str) -> None:
    folder = root / "results" / name
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"name": name, "parent_run_id": parent_id, "experiment": EXPERIMENT, "tracking_uri": uri,
            "storage_path": str(folder / "ray"), "metric": "val_f1_macro", "mode": "max"}
    (folder / "sweep.json").write_text(json.dumps(meta))


def _build(root: Path) -> TinySweeps:
    from carclf.data.demo import make_demo
    from carclf.report import build_report

    data_dir, cache = root / "demo", root / "cache"
    make_demo(data_dir, n_images=150, size=IMAGE_SIZE, seed=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    svm = {"name": "svm"}
    good = [("svm_rbf", config(data_dir, uri, cache, model=svm, svm={"C": 10.0})),
            ("svm_rbf", config(data_dir, uri, cache, model=svm, svm={"C": 0.05})),
            # networks train at 32 px (a few seconds); the image size does not change the test split
            ("simple_cnn", config(data_dir, uri, cache, model={"name": "simple_cnn"}, data={"image_size": 32},
                                  train={"epochs": 2})),
            ("alexnet", config(root / "missing", uri, cache, model={"name": "alexnet"}))]  # fails: no such folder
    bad = [("svm_rbf", config(data_dir, uri, cache, model=svm, svm={"C": 1e-4, "gamma": 1e-6}))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARCLF_PROJECT_ROOT", str(root))
        mp.setenv("CARCLF_CACHE_DIR", str(cache))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        finals = {"good": make_sweep("good", good, root=root, uri=uri),
                  "bad": make_sweep("bad", bad, root=root, uri=uri)}
        good_report = build_report("good", seeds=2, n_boot=200)
        bad_report = build_report("bad", seeds=1, n_boot=200)
    return TinySweeps(root, cache, data_dir, good_report, bad_report, finals)


def tiny_sweeps(tmp_path_factory) -> TinySweeps:
    """Built once per test process (the slow part: 5 trials and 6 retests)."""
    if "built" not in _BUILT:
        _BUILT["built"] = _build(tmp_path_factory.mktemp("tiny_sweeps"))
    return _BUILT["built"]


def split_paths(client, run_id: str, split: str = "test") -> list[str]:
    """The images of one split in the order the run's evaluation saw them (its manifest's rows)."""
    import tempfile

    import pandas as pd

    from carclf.report import MANIFEST_ARTIFACT

    with tempfile.TemporaryDirectory() as tmp:
        manifest = pd.read_parquet(client.download_artifacts(run_id, MANIFEST_ARTIFACT, tmp))
    return manifest.loc[manifest["split"] == split, "path"].tolist()


def clone(sweeps: TinySweeps, dest: Path, monkeypatch) -> str:
    """A private copy of the database and sweep folders under `dest`; env points there. Returns the URI.

    Artifacts stay where they are (runs record absolute locations); only registry and run state is copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(sweeps.root / "mlflow.db", dest / "mlflow.db")
    uri = f"sqlite:///{dest / 'mlflow.db'}"
    for name in ("good", "bad"):
        meta = json.loads((sweeps.root / "results" / name / "sweep.json").read_text())
        write_sweep_json(dest, name, meta["parent_run_id"], uri)
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(dest))
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(sweeps.cache))
    use_tracking_uri(uri, monkeypatch)  # set_tracking_uri calls made while the sweeps were built are forgotten
    return uri


# Fixtures for the test modules that import them (`from tiny_sweep import sweeps, uri`).


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory) -> TinySweeps:
    return tiny_sweeps(tmp_path_factory)


@pytest.fixture
def uri(sweeps, tmp_path, monkeypatch) -> str:
    """This test's private copy of the sweeps' database; CARCLF_PROJECT_ROOT and MLFLOW_TRACKING_URI point there."""
    return clone(sweeps, tmp_path / "project", monkeypatch)
