"""Report, retests: seeds vary and the split does not, a failed seed is recorded, the test split's hash."""

import numpy as np
import pandas as pd
import pytest
from report_samples import CLASSES, sample_info

from carclf.config import RunConfig
from carclf.report.retest import FamilyRetest


def test_test_split_hash_ignores_paths_and_other_splits_but_not_labels():
    from carclf.report.retest import manifest_test_hash

    m = pd.DataFrame({"path": ["/a/1.jpg", "/a/2.jpg", "/a/3.jpg"], "sha256": ["s1", "s2", "s3"],
                      "class": ["bus", "van", "bus"], "split": ["test", "test", "train"]})
    moved = m.assign(path=m["path"].str.replace("/a/", "/elsewhere/"))[::-1]
    assert manifest_test_hash(moved) == manifest_test_hash(m)
    assert manifest_test_hash(m.assign(split=["test", "test", "test"])) != manifest_test_hash(m)
    assert manifest_test_hash(m.assign(**{"class": ["van", "van", "bus"]})) != manifest_test_hash(m)


def test_a_failed_retest_seed_is_recorded_and_the_others_go_on(monkeypatch, tmp_path):
    from types import SimpleNamespace

    import carclf.report.retest as report
    from carclf.core.errors import DataError

    def fake_run(cfg, **kw):
        if cfg.seed == 1:
            raise DataError("images vanished")
        y = np.array([0, 1, 2, 0])
        return SimpleNamespace(run_id=f"run-{cfg.seed}", config=cfg, y_test=y, pred_test=y, test_metrics={},
                               val_metrics={}, train_seconds=1.0, infer_seconds_per_image=0.1, n_params=1,
                               size_mb=0.1, classes=CLASSES)

    monkeypatch.setattr(report, "run_experiment", fake_run)
    monkeypatch.setattr(report, "run_test_hash", lambda client, run_id: "h")
    cfg = RunConfig(model={"name": "simple_cnn"})
    fam = FamilyRetest("simple_cnn", "trial", "t", 0.5, cfg)
    configs = report.seed_configs(cfg, 3, uri="sqlite:///x.db", experiment="carclf", model="simple_cnn")
    assert [c.seed for c in configs] == [0, 1, 2] and {c.split.seed for c in configs} == {cfg.split.seed}
    report.retest_family(fam, configs, client=None, report_run_id="r", info=sample_info(tmp_path))
    assert [r.run_id for r in fam.runs] == ["run-0", "run-2"] and fam.representative.run_id == "run-0"
    assert fam.errors == ["seed 1: DataError: images vanished"]


def test_torch_threads_sets_and_restores_the_thread_count():
    import torch

    from carclf.report.retest import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.slow
def test_a_retest_with_the_trials_seed_reproduces_the_trial_on_cpu(tracked, tmp_path):
    """The network trial trains as a one-CPU Ray trial does (one torch thread, augmented oversampling); the
    report's first retest, the trial's seed, must repeat its training curve and validation figure exactly,
    though the report's own process may use more threads."""
    import torch
    from mlflow.tracking import MlflowClient

    from carclf.config import validate_run_config
    from carclf.data.demo import make_demo
    from carclf.experiment import run_experiment
    from carclf.report.retest import retest_family, seed_configs, torch_threads, trial_threads

    make_demo(tmp_path / "demo", n_images=150, size=64, seed=0)
    cfg = validate_run_config({
        "data": {"path": str(tmp_path / "demo"), "image_size": 48, "min_images": 2},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "balance": {"mode": "both"}, "augment": {"strength": 0.5},
        "model": {"name": "simple_cnn", "weights": "none"}, "seed": 3,
        "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "device": "cpu", "amp": False, "num_workers": 0},
        "tracking": {"uri": tracked, "experiment": "carclf"}})
    with torch_threads(1):
        trial = run_experiment(cfg, tags={"carclf.role": "trial"}, log_model=False)
    client = MlflowClient(tracked)
    assert trial_threads(client, trial.run_id) == 1
    report = client.create_run(client.get_run(trial.run_id).info.experiment_id).info.run_id
    family = FamilyRetest("simple_cnn", trial.run_id, "t0", trial.val_metrics["f1_macro"], cfg,
                          threads=trial_threads(client, trial.run_id))
    configs = seed_configs(cfg, 1, uri=tracked, experiment="carclf", model="simple_cnn")
    with torch_threads(max(2, torch.get_num_threads())):  # the report's process: every core
        retest_family(family, configs, client=client, report_run_id=report, info=sample_info(tmp_path))
    [retest] = family.runs
    curve = {r: [m.value for m in sorted(client.get_metric_history(r, "epoch_train_loss"), key=lambda m: m.step)]
             for r in (trial.run_id, retest.run_id)}
    assert curve[retest.run_id] == curve[trial.run_id] and len(curve[trial.run_id]) == 3
    assert retest.val_metrics["f1_macro"] == trial.val_metrics["f1_macro"]


def _manifest(per_class=(12, 6, 3)) -> pd.DataFrame:
    """A split manifest with imbalanced training classes and one test image per class."""
    rows = []
    for label, n in enumerate(per_class):
        shas = [f"{label}-{i:03d}" for i in range(n)] + [f"test-{label}"]
        rows += [{"path": f"/d/c{label}/{sha}.jpg", "sha256": sha, "class": f"c{label}", "label": label,
                  "split": "test" if sha.startswith("test") else "train"} for sha in shas]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("settings, deterministic", [
    ({}, True),  # SVC on unaugmented features of a weights file: the seed changes nothing
    ({"svm": {"linear_impl": "liblinear", "kernel": "linear"}}, False),  # LinearSVC shuffles by random_state
    ({"model": {"name": "simple_cnn"}}, False),  # a network draws its weights and batches from the seed
    ({"svm": {"backbone_weights": "none"}}, False),  # a random-init backbone is seeded
    ({"balance": {"mode": "both"}}, False),  # balancing draws rows by seed
    ({"augment": {"strength": 0.5}, "svm": {"augment_copies": 2}}, False),  # augmented passes
    ({"augment": {"strength": 0.5}}, True),  # augmentation on, but no row is augmented
])
def test_only_training_that_no_seed_changes_is_deterministic(tmp_path, settings, deterministic):
    from carclf.config import deep_merge
    from carclf.report.retest import deterministic_training

    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"weights")  # the cache key needs its hash only
    base = {"model": {"name": "svm"}, "balance": {"mode": "none"}, "augment": {"strength": 0.0},
            "svm": {"backbone": "mobilenet_v2", "backbone_weights": str(weights)}}
    cfg = RunConfig.model_validate(deep_merge(base, settings))
    reason = deterministic_training(cfg, _manifest(), [0, 1, 2])
    assert bool(reason) == deterministic
    assert deterministic_training(cfg, _manifest(), [0]) == ""  # one seed: nothing to spare


def test_a_missing_backbone_file_is_not_called_deterministic(tmp_path):
    from carclf.report.retest import deterministic_training

    cfg = RunConfig.model_validate({"model": {"name": "svm"}, "balance": {"mode": "none"}, "augment": {"strength": 0},
                                    "svm": {"backbone": "mobilenet_v2",
                                            "backbone_weights": str(tmp_path / "gone.pth")}})
    assert deterministic_training(cfg, _manifest(), [0, 1]) == ""


@pytest.mark.slow
def test_the_reports_test_features_are_extracted_on_every_core_while_the_seed_keeps_the_trials_threads(
        tracked, tmp_path, demo_dir, monkeypatch, extractions):
    """A one-CPU trial's SVM: the report extracts its test split with the report's (the driver's) threads, then
    retrains the trial's seed on the trial's one thread, reading those features."""
    from mlflow.tracking import MlflowClient

    import carclf.training.prefetch as prefetch
    from carclf.config import validate_run_config
    from carclf.core.threads import torch_threads
    from carclf.experiment import THREADS_TAG, run_experiment
    from carclf.report.retest import retest_trial
    from carclf.report.selection import SweepInfo

    cfg = validate_run_config({
        "data": {"path": str(demo_dir), "image_size": 32, "min_images": 2},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "model": {"name": "svm"},
        "svm": {"backbone": "simple_cnn", "backbone_weights": "none", "kernel": "linear"},
        "train": {"device": "cpu", "amp": False, "num_workers": 0}, "tracking": {"uri": tracked, "experiment": "carclf"}})
    with torch_threads(1):
        trial = run_experiment(cfg, tags={"carclf.role": "trial"}, evaluate_test=False, log_model=False)
    assert [(s, t) for _, s, t in extractions] == [("train", 1), ("val", 1)]  # the trial's own, on its thread
    extractions.clear()
    monkeypatch.setattr(prefetch, "machine_threads", lambda: 3)  # the report's machine: three cores
    client = MlflowClient(tracked)
    report = client.create_run(client.get_run(trial.run_id).info.experiment_id).info.run_id
    info = SweepInfo("s", tmp_path, "parent", "carclf", tracked, "val_f1_macro", "max")
    row = {"run_id": trial.run_id, "model": "svm_linear", "trial_id": "t0", "val_f1_macro": 0.5}
    family = retest_trial(client, info, row, seeds=1, report_run_id=report, experiment="carclf")
    assert extractions == [("simple_cnn", "test", 3)]  # train and validation came from the trial's cache entries
    [retest] = family.runs
    assert client.get_run(retest.run_id).data.tags[THREADS_TAG] == "1"
