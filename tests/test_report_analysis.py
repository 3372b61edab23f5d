"""Report, the sweep's analysis: every figure of the stored analysis is in the one HTML file, and the Pareto
front marks the retested choices."""

from __future__ import annotations

import pandas as pd
import pytest
from spec_sweep import pareto_sweep, pareto_uri  # noqa: F401 - fixtures

from carclf.report.analysis import StoredAnalysis, analysis_section, pareto_figure, pareto_table
from carclf.report.render import data_uri
from carclf.report.selection import SweepInfo


def _info(tmp_path) -> SweepInfo:
    return SweepInfo(name="s", folder=tmp_path, parent_run_id="p", experiment="carclf", tracking_uri="sqlite://",
                     metric="val_f1_macro", mode="max")


def test_without_an_analysis_the_report_says_how_to_make_one(tmp_path):
    html, figures = analysis_section(None, [], _info(tmp_path))
    assert "carclf analyze s" in html and figures == {}


def test_the_pareto_front_marks_the_retested_trials(tmp_path):
    from types import SimpleNamespace

    table = pd.DataFrame({"run_id": ["a", "b", "c", "d"], "trial_id": ["1", "2", "3", "4"],
                          "family": ["svm", "svm", "cnn", "cnn"], "val_f1_macro": [0.9, 0.5, 0.7, 0.6],
                          "infer_ms_per_img": [9.0, 1.0, 2.0, 8.0], "on_front": [True, True, True, False]})
    stored = StoredAnalysis(summary={"pareto": {"objectives": [["val_f1_macro", "max"], ["infer_ms_per_img", "min"]],
                                                "table": "pareto.csv"}, "families": {}},
                            tables={"pareto.csv": table})
    retested = [SimpleNamespace(trial_run_id="a", runs=[1], model="svm"),
                SimpleNamespace(trial_run_id="d", runs=[1], model="cnn"),
                SimpleNamespace(trial_run_id="b", runs=[], model="failed retest")]
    html, figures = analysis_section(stored, retested, _info(tmp_path))
    assert figures["pareto"] == pareto_figure(stored, retested) and data_uri(figures["pareto"]) in html
    shown = pareto_table(stored, retested).set_index("trial_id")
    # the front, plus the retested trial off the front; ordered by inference time
    assert list(shown.index) == ["2", "3", "4", "1"]
    assert shown["retested"].to_dict() == {"2": False, "3": False, "4": True, "1": True}
    assert shown["on_front"].to_dict() == {"2": True, "3": True, "4": False, "1": True}
    assert "Pareto front: val_f1_macro (max) against infer_ms_per_img (min)" in html


@pytest.mark.slow
def test_the_report_holds_every_figure_of_the_sweep_analysis(pareto_sweep, pareto_uri, monkeypatch):
    monkeypatch.setattr("sweeps.analysis.explain.MIN_IMPORTANCE_TRIALS", 2)  # a tiny sweep: rank its few trials anyway
    from carclf.core import paths
    from carclf.report import REPORT_FILES, build_report
    from sweeps.analysis.explain import ANALYSIS_DIR, analyze_sweep

    analysis = analyze_sweep(pareto_sweep.name)
    result = build_report(pareto_sweep.name, seeds=1, n_boot=50)
    page = result.files["html"].read_text()
    folder = paths.results_root() / pareto_sweep.name / ANALYSIS_DIR
    figures = [folder / rel for f in analysis.summary()["families"].values() for rel in f["figures"].values()]
    assert len(figures) == 8  # importance, history, parallel and slice for both families
    for path in figures:
        assert data_uri(path.read_bytes()) in page, path
    # the Pareto front, drawn by the report with its retested choices ringed, in the page and beside it
    pareto = result.out_dir / REPORT_FILES["pareto"]
    assert result.files["pareto"] == pareto and data_uri(pareto.read_bytes()) in page
    assert "retested" in page and "How the search went" in page
    for family in ("svm", "simple_cnn"):
        assert f"<h3>{family}</h3>" in page
    # which backbone won: the chosen configuration and each backbone's trials
    svm = next(f for f in result.families if f.model == "svm")
    assert f"backbone={svm.config.svm.backbone}" in page and "svm.backbone" in page
    choices = analysis.families["svm"].choices
    winner = choices[choices["param"] == "svm.backbone"].iloc[0]
    assert winner["best"] == choices.loc[choices["param"] == "svm.backbone", "best"].max()
    assert f"Backbone that won: <b>{winner['choice']}</b>" in page
    assert "src='http" not in page and 'src="http' not in page  # still one self-contained file
