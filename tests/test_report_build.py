"""Report, the whole: a real (tiny) sweep retested and compared, its files and MLflow run, and what it leaves out."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from report_samples import sample_family, sample_info, sample_trials
from tiny_sweep import sweeps  # noqa: F401 - fixture

from carclf.core.errors import SweepError
from carclf.report.selection import select_best


def _client(sweeps):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{sweeps.root / 'mlflow.db'}")


def _test_manifest(client, run_id) -> pd.DataFrame:
    import tempfile

    from carclf.report.retest import MANIFEST_ARTIFACT

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
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["class_frequency.png", "confusion_simple_cnn.png", "confusion_svm_rbf.png", "metrics.png"]
    assert len(re.findall(r"src='data:image/png;base64,", page)) == len(pngs)
    assert "simple_cnn" in page and "Left out of the comparison" in page and "FAILED" in page
    assert "<h2>Images per class and split</h2>" in page  # the class-frequency chart
    split_counts = pd.read_csv(out / "split_counts.csv").set_index("class")
    test = _test_manifest(client, report.families[0].runs[0].run_id)["class"].value_counts()
    assert split_counts["test"].to_dict() == test.to_dict()
    assert {"train balanced: simple_cnn", "train balanced: svm_rbf"} <= set(split_counts.columns)
    run = client.get_run(report.report_run_id)
    parent_id = json.loads((sweeps.root / "results" / "good" / "sweep.json").read_text())["parent_run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.tags["carclf.role"] == "report" and run.data.tags["carclf.sweep"] == "good"
    assert run.data.tags["carclf.sweep_parent_run_id"] == parent_id
    assert "mlflow.parentRunId" not in run.data.tags  # not a child: a resumed sweep would take it for a trial
    logged = {a.path for a in client.list_artifacts(report.report_run_id, "report")}
    assert {"report/report.html", "report/comparison.parquet", "report/metrics.png",
            "report/class_frequency.png"} <= logged


@pytest.mark.slow
def test_report_names_the_winner_on_the_page_in_the_summary_and_on_its_run(sweeps):
    client, report = _client(sweeps), sweeps.good
    out = sweeps.root / "results" / "good" / "report"
    table = report.table.set_index("model")
    best = table["val_f1_macro_retest"].idxmax()  # the selection metric on validation, mean over the retests' seeds
    assert report.winner["model"] == best and report.winner["runner_up"] in table.index
    assert report.winner["chosen_by"] == "val_f1_macro_retest"
    assert report.winner["value"] == pytest.approx(table.loc[best, "test_f1_macro"])  # the outcome
    page = (out / "report.html").read_text()
    assert f"Winner, chosen on validation: {best} (val_f1_macro_retest" in page
    assert "val_f1_macro retests (chose the winner)" in page
    assert ("Their test difference is significant" in page) == report.winner["significant"]
    assert json.loads((out / "report.json").read_text())["winner"]["model"] == best
    run = client.get_run(report.report_run_id)
    assert run.data.tags["carclf.winner"] == best
    assert run.data.tags["mlflow.note.content"].startswith("Winner, chosen on validation:")
    parent = client.get_run(report.info.parent_run_id)  # the sweep's own best, for the same reason
    assert parent.data.tags["carclf.best_model"] == best


@pytest.mark.slow
def test_report_files_follow_the_umask_like_any_file_the_user_creates(sweeps, tmp_path, monkeypatch):
    import os

    from carclf.report.build import write_outputs

    old = os.umask(0o027)
    try:
        files = write_outputs(tmp_path / "r", {"table_csv": sweeps.good.table, "html": "<html></html>",
                                               "confusion_svm_rbf": b"png"})
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in files.values()} == {
        "comparison.csv": 0o640, "report.html": 0o640, "confusion_svm_rbf.png": 0o640}
    assert not [p for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_problems_name_an_interrupted_sweep_failed_and_unretested_models_and_early_stops_are_remarks(tmp_path):
    from carclf.report.build import _problems, _remarks

    trials = sample_trials().assign(status=["FINISHED", "FINISHED", "FAILED", "FINISHED", "RUNNING", "STOPPED_EARLY"])
    best = select_best(trials, "val_f1_macro", "max")
    broken = sample_family("svm", 0.1, seeds=1)
    broken.errors.append("seed 1: DataError: gone")
    notes = _problems(sample_info(tmp_path), trials, best, [broken], parent_status="KILLED")
    text = "\n".join(notes)
    assert "parent run is KILLED" in text and "interrupted" in text
    assert "2 of 6 trials did not finish with val_f1_macro (1 FAILED, 1 RUNNING)" in text
    assert "alexnet: no finished trial, not retested" in text and "svm: retest failed (seed 1: DataError: gone)" in text
    assert "stopped early" not in text  # the scheduler doing its job is no problem ...
    [remark] = _remarks(sample_info(tmp_path), trials)  # ... it is said in neutral words
    assert remark.startswith("Stopped early by the scheduler: 1 of 6 trials")
    assert _remarks(sample_info(tmp_path), trials[trials["status"] != "STOPPED_EARLY"]) == []


def _one_trial_sweep(tmp_path, monkeypatch, name: str):
    """(client, experiment id, trial run id) of a sweep recorded with one svm trial run, still open."""
    from mlflow.tracking import MlflowClient
    from tiny_sweep import write_sweep_json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    client = MlflowClient(uri)
    exp = client.create_experiment("carclf", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, tags={"carclf.role": "sweep", "carclf.sweep": name}).info.run_id
    trial = client.create_run(exp, tags={"carclf.role": "trial", "carclf.sweep": name, "mlflow.parentRunId": parent,
                                         "carclf.trial_id": "t0", "carclf.model": "svm"}).info.run_id
    write_sweep_json(tmp_path, name, parent, uri)
    return client, exp, trial


def test_report_on_a_sweep_without_finished_trials_says_so(tmp_path, monkeypatch):
    from carclf.report.build import build_report

    client, _, failed = _one_trial_sweep(tmp_path, monkeypatch, "empty")
    client.set_terminated(failed, "FAILED")
    with pytest.raises(SweepError, match=r"sweep 'empty': no finished trial with val_f1_macro \(1 trial runs found\)"):
        build_report("empty", seeds=1)


@pytest.mark.parametrize("out", ["/proc/carclf_report", "/proc/version"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_any_retest(tmp_path, monkeypatch, out):
    from carclf.core.errors import DataError
    from carclf.report.build import build_report

    client, exp, trial = _one_trial_sweep(tmp_path, monkeypatch, "one")
    client.log_metric(trial, "val_f1_macro", 0.5)
    client.set_terminated(trial, "FINISHED")
    with pytest.raises(DataError, match=f"cannot write --out {out}"):
        build_report("one", seeds=1, out=out)
    roles = [r.data.tags.get("carclf.role") for r in client.search_runs([exp])]
    assert sorted(roles) == ["sweep", "trial"]  # no report run was started
