"""Report, the tuning gain end to end: a tiny sweep with default-configuration trials, reported twice.

Families: svm_rbf (its default trial crippled by a tiny C, so tuning pays; deterministic, retested
once), svm_linear (LinearSVC, whose solver shuffles by seed: two seeds; its only trial is its default,
so the default was the best) and svm_wide (no default trial, as in sweeps made before defaults ran).
The sweep side tags default trials itself; here finished trial runs are tagged as it tags them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from tiny_sweep import EXPERIMENT, config, make_sweep

EDGE = [{"family": "svm_rbf", "param": "C", "best": 9.7, "low": 0.1, "high": 10.0, "log": True, "edge": "upper",
         "suggested": {"low": 0.1, "high": 1000.0},
         "message": "svm_rbf: the best C (9.7) lies at the upper edge of its range [0.1, 10]; try [0.1, 1000]"}]


@dataclass
class GainSweep:
    root: Path
    uri: str
    trial_ids: list  # trial run ids in the order they ran
    first: object  # the first report's ReportResult
    first_page: str  # its report.html (the second report writes over it)
    extracted_first: list  # splits whose features the first report extracted
    extracted_second: list
    second_out: str  # what `carclf report` printed the second time
    second_dir: Path


@pytest.fixture(scope="module")
def gain_sweep(tmp_path_factory) -> GainSweep:
    from mlflow.tracking import MlflowClient

    import carclf.training.features as features
    from carclf.data.demo import make_demo
    from carclf.report import build_report, cli_report

    root = tmp_path_factory.mktemp("gain_sweep")
    data_dir, cache = root / "demo", root / "cache"
    make_demo(data_dir, n_images=300, size=64, seed=0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    svm = {"name": "svm"}
    trials = [("svm_rbf", config(data_dir, uri, cache, model=svm, svm={"C": 1e-4, "gamma": 1e-6})),  # its default
              ("svm_rbf", config(data_dir, uri, cache, model=svm, svm={"C": 10.0})),
              ("svm_linear", config(data_dir, uri, cache, model=svm,
                                    svm={"kernel": "linear", "linear_impl": "liblinear", "C": 1.0})),  # its default
              ("svm_wide", config(data_dir, uri, cache, model=svm, svm={"C": 3.0}))]
    extracted: list[str] = []
    real_extract = features._extract_split
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARCLF_PROJECT_ROOT", str(root))
        mp.setenv("CARCLF_CACHE_DIR", str(cache))
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        trial_ids = list(make_sweep("gains", trials, root=root, uri=uri))
        assert len(trial_ids) == len(trials)
        client = MlflowClient(uri)
        for i in (0, 2):
            client.set_tag(trial_ids[i], "carclf.baseline", "true")
        mp.setattr(features, "_extract_split", lambda b, cfg, data, split, **kw:
                   extracted.append(split) or real_extract(b, cfg, data, split, **kw))
        first = build_report("gains", seeds=2, n_boot=300)
        extracted_first = list(extracted)
        first_page = first.files["html"].read_text()
        extracted.clear()
        parent = json.loads((root / "results" / "gains" / "sweep.json").read_text())["parent_run_id"]
        edge_file = root / "edge_warnings.json"
        edge_file.write_text(json.dumps(EDGE))
        client.log_artifact(parent, str(edge_file))
        with _stdout() as out:
            cli_report(argparse.Namespace(sweep="gains", seeds=2, out=None))
    return GainSweep(root, uri, trial_ids, first, first_page, extracted_first, list(extracted), out.getvalue(),
                     root / "results" / "gains" / "report")


class _stdout:
    def __enter__(self):
        import contextlib
        import io

        self.buffer = io.StringIO()
        self.redirect = contextlib.redirect_stdout(self.buffer)
        self.redirect.__enter__()
        return self.buffer

    def __exit__(self, *exc):
        self.redirect.__exit__(*exc)


def _client(sweep: GainSweep):
    from mlflow.tracking import MlflowClient

    return MlflowClient(sweep.uri)


def _children(sweep: GainSweep, report_run_id: str) -> list:
    client = _client(sweep)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{report_run_id}'", max_results=100)


@pytest.mark.slow
def test_the_default_trial_is_retested_and_the_gain_shown_with_its_interval(gain_sweep):
    report, client = gain_sweep.first, _client(gain_sweep)
    gain = report.gain.set_index("family")
    rbf = gain.loc["svm_rbf"]
    assert rbf["default_trial_run_id"] == gain_sweep.trial_ids[0] and rbf["best_trial_run_id"] == gain_sweep.trial_ids[1]
    assert rbf["verdict"] == "gain" and 0 < rbf["test_accuracy_gain_low"] <= rbf["test_accuracy_gain"]
    assert rbf["mcnemar_p"] < 0.05
    # the gain is the difference of the two retests' test accuracies, on the same test images
    pair = next(p for p in report.pairs if p.model == "svm_rbf")
    y = pair.best.runs[0].y_true
    assert np.array_equal(pair.default.runs[0].y_true, y)
    assert rbf["test_accuracy_gain"] == pytest.approx(np.mean(pair.best.preds == y) - np.mean(pair.default.preds == y))
    assert rbf["sentence"].startswith(f"svm_rbf: tuning gained {rbf['test_accuracy_gain']:+.3f} "
                                      f"[{rbf['test_accuracy_gain_low']:+.3f}, {rbf['test_accuracy_gain_high']:+.3f}]"
                                      " accuracy")
    # the default's retest: role retest_default, a child of the report run, from the default trial
    defaults = [r for r in _children(gain_sweep, report.report_run_id)
                if r.data.tags["carclf.role"] == "retest_default"]
    assert [r.data.tags["carclf.source_trial_run_id"] for r in defaults] == [gain_sweep.trial_ids[0]]
    assert defaults[0].data.tags["carclf.sweep_model"] == "svm_rbf"
    assert defaults[0].data.metrics["test_accuracy"] == pytest.approx(rbf["test_accuracy_default"])
    # svm_linear's best is its default: one retest serves both; svm_wide has no default trial
    assert gain.loc["svm_linear", "verdict"] == "default was best"
    assert "the default was the best configuration" in gain.loc["svm_linear", "sentence"]
    assert gain.loc["svm_wide", "verdict"] == "no default"
    assert "no default-configuration trial" in gain.loc["svm_wide", "sentence"]
    # overall: the winner against the best default across families
    assert gain.loc["overall", "tuned"] == report.winner["model"]
    # logged: the gain table as an artifact and its figures as metrics of the report run
    run = client.get_run(report.report_run_id)
    assert run.data.metrics["svm_rbf.tuning_gain_accuracy"] == pytest.approx(rbf["test_accuracy_gain"])
    assert run.data.metrics["svm_rbf.tuning_gain_accuracy_low"] == pytest.approx(rbf["test_accuracy_gain_low"])
    assert "report/tuning_gain.csv" in [f.path for f in client.list_artifacts(report.report_run_id, "report")]
    assert rbf["sentence"] in run.data.tags["mlflow.note.content"]


@pytest.mark.slow
def test_the_page_and_the_console_say_whether_tuning_helped(gain_sweep):
    import html

    page = (gain_sweep.second_dir / "report.html").read_text()
    summary = json.loads((gain_sweep.second_dir / "report.json").read_text())
    sentences = [row["sentence"] for row in summary["tuning_gain"]]
    assert len(sentences) == 4  # three families and the overall row
    printed = " ".join(gain_sweep.second_out.split())  # wrapped to the terminal
    for sentence in sentences:
        assert html.escape(sentence) in page and sentence in printed
    assert "svm_rbf: tuning gained +" in printed


@pytest.mark.slow
def test_promote_takes_the_best_retests_never_the_defaults(gain_sweep):
    from carclf.report.selection import resolve_sweep
    from carclf.serving.promote import latest_report_run, representative_runs

    client = _client(gain_sweep)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARCLF_PROJECT_ROOT", str(gain_sweep.root))
        report_run = latest_report_run(client, resolve_sweep("gains"))
    chosen = representative_runs(client, report_run)
    assert {r.data.tags["carclf.role"] for r in chosen} == {"retest"}
    sources = {r.data.tags["carclf.sweep_model"]: r.data.tags["carclf.source_trial_run_id"] for r in chosen}
    assert sources["svm_rbf"] == gain_sweep.trial_ids[1]  # the tuned trial, not its default (also representative)


@pytest.mark.slow
def test_a_deterministic_family_is_retested_once_and_others_with_every_seed(gain_sweep):
    from carclf.experiment import run_experiment

    families = {f.model: f for f in gain_sweep.first.families}
    rbf, linear = families["svm_rbf"], families["svm_linear"]
    assert len(rbf.runs) == 1 and rbf.deterministic
    assert len(linear.runs) == 2 and not linear.deterministic  # LinearSVC's solver shuffles by seed
    pair = next(p for p in gain_sweep.first.pairs if p.model == "svm_rbf")
    assert len(pair.default.runs) == 1  # the default follows the same policy
    table = gain_sweep.first.table.set_index("model")
    assert table.loc["svm_rbf", "seeds"] == 1 and table.loc["svm_linear", "seeds"] == 2
    page = (gain_sweep.second_dir / "report.html").read_text()
    assert "deterministic: retested once" in page
    # the claim holds: another seed trains the same model
    other = rbf.config.model_copy(update={"seed": rbf.config.seed + 1,
                                          "tracking": rbf.config.tracking.model_copy(update={"uri": gain_sweep.uri})})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARCLF_CACHE_DIR", str(gain_sweep.root / "cache"))
        again = run_experiment(other, evaluate_test=True, log_model=False)
    assert np.array_equal(again.pred_test, rbf.runs[0].pred)


@pytest.mark.slow
def test_the_report_reuses_the_sweeps_features_and_a_second_report_extracts_none(gain_sweep):
    # the trials never read the test split: the first report extracts it, once, for every family and seed;
    # the second seed of svm_linear reads the train features the trials left (the seed is not in their key)
    assert gain_sweep.extracted_first == ["test"]
    assert gain_sweep.extracted_second == []


@pytest.mark.slow
def test_edge_warnings_appear_when_the_parent_run_has_them(gain_sweep):
    import html

    assert gain_sweep.first.edge_warnings == []  # no artifact yet: no section
    assert "Search ranges to widen" not in gain_sweep.first_page
    summary = json.loads((gain_sweep.second_dir / "report.json").read_text())
    assert summary["edge_warnings"] == EDGE
    page = (gain_sweep.second_dir / "report.html").read_text()
    assert "Search ranges to widen" in page and html.escape(EDGE[0]["message"]) in page
    assert "0.1 to 1e+03 (log)" in page  # the suggested range
    assert f"warning: search range: {EDGE[0]['message']}" in " ".join(gain_sweep.second_out.split())
