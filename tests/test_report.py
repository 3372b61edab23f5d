"""The report: selection by validation only, tables and intervals, the self-contained HTML, and a real run."""

import json
import re

import numpy as np
import pandas as pd
import pytest

from carclf.config import RunConfig
from carclf.errors import SweepError
from carclf.report import (FamilyRetest, SeedRun, SweepInfo, comparison_table, confused_pairs_table, mcnemar_table,
                           per_class_f1_table, render_html, resolve_sweep, select_best, unfinished)
from tiny_sweep import sweeps  # noqa: F401 - fixture

# --------------------------------------------------------------------------- selection


def _trials() -> pd.DataFrame:
    # svm: trial b is best on validation, trial a best on test -> b must be picked.
    # cnn: the best-validation trial failed, another is still running without a metric.
    return pd.DataFrame([
        {"run_id": "a", "trial_id": "t1", "model": "svm", "status": "FINISHED", "start_time": 1,
         "error": "", "val_f1_macro": 0.70, "test_f1_macro": 0.95},
        {"run_id": "b", "trial_id": "t2", "model": "svm", "status": "FINISHED", "start_time": 2,
         "error": "", "val_f1_macro": 0.80, "test_f1_macro": 0.60},
        {"run_id": "c", "trial_id": "t3", "model": "simple_cnn", "status": "FAILED", "start_time": 3,
         "error": "RuntimeError: boom", "val_f1_macro": 0.99, "test_f1_macro": 0.99},
        {"run_id": "d", "trial_id": "t4", "model": "simple_cnn", "status": "FINISHED", "start_time": 4,
         "error": "", "val_f1_macro": 0.50, "test_f1_macro": 0.90},
        {"run_id": "e", "trial_id": "t5", "model": "simple_cnn", "status": "RUNNING", "start_time": 5,
         "error": "", "val_f1_macro": np.nan, "test_f1_macro": np.nan},
        {"run_id": "f", "trial_id": "t6", "model": "alexnet", "status": "KILLED", "start_time": 6,
         "error": "", "val_f1_macro": np.nan, "test_f1_macro": np.nan},
    ])


def test_select_best_uses_validation_not_test_and_only_finished_trials():
    best = select_best(_trials(), "val_f1_macro", "max").set_index("model")
    assert sorted(best.index) == ["simple_cnn", "svm"]  # alexnet never finished
    assert best.loc["svm", "run_id"] == "b"  # best validation, worst test
    assert best.loc["simple_cnn", "run_id"] == "d"  # the failed trial's 0.99 does not count


def test_select_best_min_mode_and_ties_go_to_the_earlier_trial():
    t = _trials().assign(val_loss=[0.3, 0.3, 0.1, 0.9, np.nan, np.nan])
    best = select_best(t, "val_loss", "min").set_index("model")
    assert best.loc["svm", "run_id"] == "a"  # tie at 0.3: started first


def test_select_best_refuses_a_test_metric():
    with pytest.raises(SweepError, match="test figure"):
        select_best(_trials(), "test_f1_macro", "max")


def test_unfinished_lists_failed_running_and_killed_trials():
    left = unfinished(_trials(), "val_f1_macro")
    assert left["run_id"].tolist() == ["c", "e", "f"]
    assert "boom" in left.set_index("run_id").loc["c", "error"]


def test_a_retried_trial_keeps_its_finished_attempt():
    from carclf.report import _one_attempt_per_trial

    t = pd.DataFrame([
        {"run_id": "r1", "trial_id": "t1", "status": "FAILED", "start_time": 1},
        {"run_id": "r2", "trial_id": "t1", "status": "FINISHED", "start_time": 2},
        {"run_id": "r3", "trial_id": "t2", "status": "FAILED", "start_time": 3},
        {"run_id": "r4", "trial_id": "t2", "status": "FAILED", "start_time": 4},
        {"run_id": "r5", "trial_id": "t3", "status": "STOPPED_EARLY", "start_time": 5},
    ])
    assert _one_attempt_per_trial(t)["run_id"].tolist() == ["r2", "r4", "r5"]


# --------------------------------------------------------------------------- sweep folder


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


def test_resolve_sweep_rejects_incomplete_sweep_json(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"name": "x", "metric": "val_f1_macro"}))
    with pytest.raises(SweepError, match="lacks parent_run_id, tracking_uri, mode"):
        resolve_sweep(str(tmp_path))


# --------------------------------------------------------------------------- tables and HTML


CLASSES = ["bus", "sedan", "van"]


def _family(model: str, error_rate: float, seeds: int = 3, n: int = 90) -> FamilyRetest:
    y = np.arange(n) % 3
    fam = FamilyRetest(model=model, trial_run_id=f"trial-{model}", trial_id="t", val_metric=0.8,
                       config=RunConfig(model={"name": "svm" if model == "svm" else "simple_cnn"}))
    for s in range(seeds):
        rng = np.random.default_rng(100 * s + len(model))
        pred = y.copy()
        wrong = rng.random(n) < error_rate
        pred[wrong] = (y[wrong] + 1) % 3
        fam.runs.append(SeedRun(run_id=f"{model}-{s}", seed=s, y_true=y, pred=pred, test_metrics={},
                                val_metrics={}, train_seconds=2.0 + s, infer_seconds_per_image=0.001,
                                n_params=1000, size_mb=0.5, classes=CLASSES, test_hash="h"))
    return fam


def test_comparison_table_means_intervals_and_cost_columns():
    fams = [_family("svm", 0.1), _family("simple_cnn", 0.4)]
    table = comparison_table(fams, "val_f1_macro", n_boot=300).set_index("model")
    for model, fam in zip(["svm", "simple_cnn"], fams):
        accs = [np.mean(r.pred == r.y_true) for r in fam.runs]
        row = table.loc[model]
        assert row["test_accuracy"] == pytest.approx(np.mean(accs))
        assert row["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
        for m in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            assert row[f"test_{m}_ci_low"] <= row[f"test_{m}"] <= row[f"test_{m}_ci_high"]
        assert row["train_seconds"] == pytest.approx(3.0) and row["infer_ms_per_image"] == pytest.approx(1.0)
        assert row["representative_run_id"] == f"{model}-0" and row["seeds"] == 3
    assert "kernel=" in table.loc["svm", "configuration"] and "lr=" in table.loc["simple_cnn", "configuration"]


def test_mcnemar_table_flags_a_real_difference_and_not_a_null_one():
    fams = [_family("svm", 0.05, n=300), _family("simple_cnn", 0.5, n=300), _family("resnet18", 0.05, n=300)]
    fams[2].runs[0].pred = fams[0].runs[0].pred.copy()  # identical representative predictions
    table = mcnemar_table(fams).set_index(["model_a", "model_b"])
    assert table.loc[("svm", "simple_cnn"), "p_holm"] < 1e-6 and table.loc[("svm", "simple_cnn"), "significant"]
    assert table.loc[("svm", "resnet18"), "p_value"] == 1.0 and not table.loc[("svm", "resnet18"), "significant"]
    assert (table["p_holm"] >= table["p_value"]).all()


def test_per_class_and_confused_pairs_tables():
    fams = [_family("svm", 0.2), _family("simple_cnn", 0.4)]
    per_class = per_class_f1_table(fams)
    assert per_class["class"].tolist() == CLASSES and per_class["support"].tolist() == [30, 30, 30]
    assert (per_class["svm"] > per_class["simple_cnn"]).all()
    pairs = confused_pairs_table(fams, k=2)
    # errors are always true -> true+1: bus->sedan, sedan->van, van->bus
    assert set(zip(pairs["true"], pairs["predicted"])) <= {("bus", "sedan"), ("sedan", "van"), ("van", "bus")}
    assert pairs.groupby("model").size().to_dict() == {"simple_cnn": 2, "svm": 2}


def test_html_is_self_contained_and_holds_table_and_every_figure(tmp_path):
    fams = [_family("svm", 0.1), _family("simple_cnn", 0.3)]
    table = comparison_table(fams, "val_f1_macro", n_boot=100)
    info = SweepInfo("quick", tmp_path, "parent", "carclf", "sqlite:///x.db", "val_f1_macro", "max")
    png = b"\x89PNG\r\n\x1a\nfake"
    page = render_html(info=info, table=table, mcnemar=mcnemar_table(fams), per_class=per_class_f1_table(fams),
                       confused=confused_pairs_table(fams), not_finished=unfinished(_trials(), "val_f1_macro"),
                       problems=["alexnet: no finished trial, not retested"],
                       figures_png={"bars": png, "confusion": png},
                       notes={"created": "now", "seeds": 3, "n_test": 90, "test_hash": "abc", "n_boot": 100})
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,", page)) == 2
    assert not re.search(r"(src|href)=['\"](https?:|//|/)", page)  # nothing fetched from anywhere
    assert page.count("<table") == 6 and "alexnet: no finished trial" in page and "RuntimeError: boom" in page
    assert f"{table.loc[0, 'test_accuracy']:.3f}" in page


# --------------------------------------------------------------------------- a real (tiny) sweep


def _client(sweeps):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{sweeps.root / 'mlflow.db'}")


def _test_manifest(client, run_id) -> pd.DataFrame:
    import tempfile

    from carclf.report import MANIFEST_ARTIFACT

    with tempfile.TemporaryDirectory() as tmp:
        manifest = pd.read_parquet(client.download_artifacts(run_id, MANIFEST_ARTIFACT, tmp))
    return manifest[manifest["split"] == "test"].reset_index(drop=True)


@pytest.mark.slow
def test_report_retests_the_best_validation_trial_per_model(sweeps):
    client, report = _client(sweeps), sweeps.good
    finals = sweeps.finals["good"]  # final val macro-F1 per finished trial, as run_experiment computed it
    trials = [client.get_run(r) for r in finals]
    for fam in report.families:
        mine = [t.info.run_id for t in trials if t.data.tags["carclf.sweep_model"] == fam.model]
        best = max(mine, key=finals.get)
        assert fam.trial_run_id == best
        assert fam.val_metric == pytest.approx(finals[best])
        trial_cfg = fam.config
        for i, run in enumerate(fam.runs):
            retest = client.get_run(run.run_id)
            assert retest.data.tags["mlflow.parentRunId"] == report.report_run_id
            assert retest.data.tags["carclf.role"] == "retest" and retest.data.tags["carclf.sweep_model"] == fam.model
            assert retest.data.tags["carclf.model"] == trial_cfg.model.name  # svm_rbf's model is svm
            assert retest.data.tags["carclf.representative"] == ("true" if i == 0 else "false")
            assert int(retest.data.params["seed"]) == trial_cfg.seed + i  # seeds vary ...
            assert retest.data.params["split.seed"] == str(trial_cfg.split.seed)  # ... the split does not
    assert sorted(f.model for f in report.families) == ["simple_cnn", "svm_rbf"]
    assert any("alexnet: no finished trial" in p for p in report.problems)


@pytest.mark.slow
def test_report_figures_come_from_the_test_split_only(sweeps):
    client, report = _client(sweeps), sweeps.good
    table = report.table.set_index("model")
    for fam in report.families:
        accuracies = []
        for run in fam.runs:
            test = _test_manifest(client, run.run_id)
            assert np.array_equal(run.y_true, test["label"].to_numpy())  # exactly the test images, in order
            logged = client.get_run(run.run_id).data.metrics
            assert logged["test_accuracy"] == pytest.approx(np.mean(run.pred == run.y_true))
            accuracies.append(logged["test_accuracy"])
        assert table.loc[fam.model, "test_accuracy"] == pytest.approx(np.mean(accuracies))
        assert table.loc[fam.model, "val_f1_macro"] == fam.val_metric  # the trial's validation figure
    hashes = {r.test_hash for f in report.families for r in f.runs}
    assert len(hashes) == 1


@pytest.mark.slow
def test_report_files_html_and_mlflow_run(sweeps):
    client, report = _client(sweeps), sweeps.good
    out = sweeps.root / "results" / "good" / "report"
    assert report.out_dir == out
    table = pd.read_parquet(out / "comparison.parquet")
    assert table["model"].tolist() == ["simple_cnn", "svm_rbf"]
    for column in ("configuration", "val_f1_macro", "test_accuracy_ci_low", "test_f1_macro_ci_high",
                   "test_precision_macro", "test_recall_macro", "train_seconds", "infer_ms_per_image",
                   "n_params", "size_mb"):
        assert table[column].notna().all(), column
    pd.testing.assert_frame_equal(pd.read_csv(out / "comparison.csv")[["model"]], table[["model"]])
    page = (out / "report.html").read_text()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(pngs)
    assert "simple_cnn" in page and "Left out of the comparison" in page and "FAILED" in page
    run = client.get_run(report.report_run_id)
    parent_id = json.loads((sweeps.root / "results" / "good" / "sweep.json").read_text())["parent_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["carclf.role"] == "report" and run.data.tags["carclf.sweep"] == "good"
    assert run.data.tags["carclf.sweep_parent_run_id"] == parent_id
    assert "mlflow.parentRunId" not in run.data.tags  # not a child: a resumed sweep would take it for a trial
    logged = {a.path for a in client.list_artifacts(report.report_run_id, "report")}
    assert {"report/report.html", "report/comparison.parquet", "report/metrics.png"} <= logged


def test_test_split_hash_ignores_paths_and_other_splits_but_not_labels():
    from carclf.report import manifest_test_hash

    m = pd.DataFrame({"path": ["/a/1.jpg", "/a/2.jpg", "/a/3.jpg"], "sha256": ["s1", "s2", "s3"],
                      "class": ["bus", "van", "bus"], "split": ["test", "test", "train"]})
    moved = m.assign(path=m["path"].str.replace("/a/", "/elsewhere/"))[::-1]
    assert manifest_test_hash(moved) == manifest_test_hash(m)
    assert manifest_test_hash(m.assign(split=["test", "test", "test"])) != manifest_test_hash(m)
    assert manifest_test_hash(m.assign(**{"class": ["van", "van", "bus"]})) != manifest_test_hash(m)


# --------------------------------------------------------------------------- partial and interrupted sweeps


def _info(tmp_path):
    return SweepInfo("quick", tmp_path, "parent", "carclf", "sqlite:///x.db", "val_f1_macro", "max")


def test_problems_name_an_interrupted_sweep_stopped_failed_and_unretested_models(tmp_path):
    from carclf.report import _problems

    trials = _trials().assign(status=["FINISHED", "FINISHED", "FAILED", "FINISHED", "RUNNING", "STOPPED_EARLY"])
    best = select_best(trials, "val_f1_macro", "max")
    broken = _family("svm", 0.1, seeds=1)
    broken.errors.append("seed 1: DataError: gone")
    notes = _problems(_info(tmp_path), trials, best, [broken], parent_status="KILLED")
    text = "\n".join(notes)
    assert "parent run is KILLED" in text and "interrupted" in text
    assert "1 of 6 trials were stopped early" in text
    assert "2 of 6 trials did not finish with val_f1_macro (1 FAILED, 1 RUNNING)" in text
    assert "alexnet: no finished trial, not retested" in text and "svm: retest failed (seed 1: DataError: gone)" in text


def test_a_failed_retest_seed_is_recorded_and_the_others_go_on(monkeypatch, tmp_path):
    import carclf.experiment
    import carclf.report as report
    from types import SimpleNamespace

    from carclf.errors import DataError

    def fake_run(cfg, **kw):
        if cfg.seed == 1:
            raise DataError("images vanished")
        y = np.array([0, 1, 2, 0])
        return SimpleNamespace(run_id=f"run-{cfg.seed}", config=cfg, y_test=y, pred_test=y, test_metrics={},
                               val_metrics={}, train_seconds=1.0, infer_seconds_per_image=0.1, n_params=1,
                               size_mb=0.1, classes=CLASSES)

    monkeypatch.setattr(carclf.experiment, "run_experiment", fake_run)
    monkeypatch.setattr(report, "run_test_hash", lambda client, run_id: "h")
    cfg = RunConfig(model={"name": "simple_cnn"})
    fam = FamilyRetest("simple_cnn", "trial", "t", 0.5, cfg)
    configs = report.seed_configs(cfg, 3, uri="sqlite:///x.db", experiment="carclf", model="simple_cnn")
    assert [c.seed for c in configs] == [0, 1, 2] and {c.split.seed for c in configs} == {cfg.split.seed}
    report.retest_family(fam, configs, client=None, report_run_id="r", info=_info(tmp_path))
    assert [r.run_id for r in fam.runs] == ["run-0", "run-2"] and fam.representative.run_id == "run-0"
    assert fam.errors == ["seed 1: DataError: images vanished"]


def test_report_on_a_sweep_without_finished_trials_says_so(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from carclf.report import build_report
    from tiny_sweep import write_sweep_json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    client = MlflowClient(uri)
    exp = client.create_experiment("carclf", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"carclf.role": "sweep", "carclf.sweep": "empty"}).info.run_id
    failed = client.create_run(exp, tags={"carclf.role": "trial", "carclf.sweep": "empty", "mlflow.parentRunId": parent,
                                          "carclf.trial_id": "t0", "carclf.model": "svm"}).info.run_id
    client.set_terminated(failed, "FAILED")
    write_sweep_json(tmp_path, "empty", parent, uri)
    with pytest.raises(SweepError, match=r"sweep 'empty': no finished trial with val_f1_macro \(1 trial runs found\)"):
        build_report("empty", seeds=1)


def test_trial_config_falls_back_to_params_when_config_yaml_is_missing(tmp_path):
    from mlflow.tracking import MlflowClient

    from carclf.config import flatten
    from carclf.report import trial_config

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("carclf", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(exp).info.run_id
    cfg = RunConfig(model={"name": "svm"}, svm={"C": 3.5, "gamma": 0.01}, data={"classes": ["bus", "van"]},
                    train={"lr": 0.02}, seed=7)
    for key, value in flatten(cfg.to_dict()).items():  # as tracking.log_params logs them: str(value)
        client.log_param(run_id, key, str(value))
    assert trial_config(client, run_id) == cfg
