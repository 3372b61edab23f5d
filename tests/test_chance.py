"""The majority-class rate of the test split: the floor a family has to beat, warned about in report and promote."""

import argparse

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from tiny_sweep import split_paths, sweeps, uri  # noqa: F401 - fixtures

from carclf.report.chance import below_majority, majority_from_labels, majority_rate
from carclf.serving.promote import cli_promote


def test_majority_rate_is_always_answering_the_most_frequent_class():
    rate = majority_rate([0, 1, 1, 2, 1], ["bus", "sedan", "van"])
    assert (rate.rate, rate.label, rate.n) == (0.6, "sedan", 5)
    assert majority_from_labels(["van", "bus", "van", "van"]).label == "van"


def test_only_families_at_or_below_the_rate_are_warned_about():
    rate = majority_rate([0, 0, 1, 2, 3], ["a", "b", "c", "d"])  # 0.4
    warned = below_majority({"chance": 0.4, "worse": 0.2, "better": 0.41, "no figure": float("nan")}, rate)
    assert [w.split(":")[0] for w in warned] == ["chance", "worse"]
    assert "majority-class rate of the test split (0.400, what always answering 'a' scores on its 5 images)" in warned[0]


def _rate(sweeps, uri, family):
    rep = next(f for f in sweeps.good.families if f.model == family).representative
    return rep, majority_rate(rep.y_true, rep.classes)


@pytest.mark.slow
def test_report_warns_for_each_family_whose_mean_accuracy_does_not_beat_the_rate(sweeps, uri):
    report = sweeps.good
    _, rate = _rate(sweeps, uri, "svm_rbf")
    expected = {m for m, acc in zip(report.table["model"], report.table["test_accuracy"]) if acc <= rate.rate}
    assert {w.split(":")[0] for w in report.below_majority} == expected
    html = report.files["html"].read_text(encoding="utf-8")
    assert all(f"Warning: {w.split(' (')[0]}" in html for w in report.below_majority)
    run = MlflowClient(uri).get_run(report.report_run_id)
    assert run.data.metrics["test_majority_class_rate"] == pytest.approx(rate.rate)


@pytest.mark.slow
def test_promote_prints_the_winner_first_a_summary_and_the_families_below_the_rate(sweeps, uri, capsys):
    cli_promote(argparse.Namespace(sweep="good", model=None, alias="champion", force=False))
    out = capsys.readouterr().out
    winner = sweeps.good.winner["model"]
    outcome_lines = [line for line in out.splitlines() if line.startswith("carclf-")]
    assert outcome_lines[0].startswith(f"carclf-best v1 = the report's winner, {winner}:")
    assert outcome_lines[1].startswith(f"carclf-{winner} v1:")
    assert ("summary: 3 versions of 2 families (3 new, 0 registered before); @champion moved to carclf-best v1, "
            f"carclf-{winner} v1") in out
    assert f"models:/carclf-best@champion = v1, {winner}: this report's winner" in out
    for family in ("svm_rbf", "simple_cnn"):
        rep, rate = _rate(sweeps, uri, family)
        manifest_rate = np.mean(np.asarray(rep.y_true) == np.bincount(rep.y_true).argmax())
        assert rate.rate == pytest.approx(manifest_rate)
        below = rep.test_metrics["accuracy"] <= rate.rate
        assert (f"warning: {family}: test accuracy (this version) {rep.test_metrics['accuracy']:.3f} does not beat"
                in out) is below


@pytest.mark.slow
def test_a_registered_version_says_whose_figures_it_carries(sweeps, uri):
    from carclf.serving.promote import promote

    promote("good", model="simple_cnn")
    version = MlflowClient(uri).get_model_version_by_alias("carclf-simple_cnn", "champion")
    family = next(f for f in sweeps.good.families if f.model == "simple_cnn")
    trial = MlflowClient(uri).get_run(family.trial_run_id).data.tags["carclf.trial_id"]
    rep, mean = family.representative, sweeps.good.table.set_index("model").loc["simple_cnn"]
    tags = version.tags
    assert (tags["carclf.family"], tags["carclf.sweep"], tags["carclf.trial_id"]) == ("simple_cnn", "good", trial)
    assert tags["carclf.retest_seed"] == str(rep.seed) and tags["carclf.retest_seeds"] == "2"
    assert float(tags["carclf.test_accuracy"]) == pytest.approx(rep.test_metrics["accuracy"])
    assert float(tags["carclf.test_accuracy_seed_mean"]) == pytest.approx(mean["test_accuracy"])
    text = version.description
    assert f"Family simple_cnn of sweep good, trial {trial}" in text
    assert f"retest with seed {rep.seed}" in text
    assert f"its own test figures: accuracy {rep.test_metrics['accuracy']:.4f}" in text
    assert f"The report's mean over its 2 seeds: accuracy {mean['test_accuracy']:.4f}" in text
