"""Promote: one registered model per family, the alias moves only to a better model on the same test split."""

import argparse
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from tiny_sweep import sweeps, uri, write_sweep_json  # noqa: F401 - fixtures

from carclf.core.errors import SweepError
from carclf.serving.promote import cli_promote, comparison, decide, matching_test_metric, promote


def _rep_f1(report, model="svm_rbf") -> float:
    fam = next(f for f in report.families if f.model == model)
    return fam.representative.test_metrics["f1_macro"]


@pytest.mark.slow
def test_promote_sets_alias_refuses_worse_model_and_force_moves_it(sweeps, uri, capsys):
    client = MlflowClient(uri, registry_uri=uri)
    assert _rep_f1(sweeps.bad) < _rep_f1(sweeps.good)  # the fixture's premise

    first = {o.name: o for o in promote("good")}
    assert set(first) == {"carclf-svm_rbf", "carclf-simple_cnn", "carclf-best"}
    assert all(o.moved and o.registered_new and o.reason == "first holder" for o in first.values())
    champion = client.get_model_version_by_alias("carclf-svm_rbf", "champion")
    good_rep = next(f for f in sweeps.good.families if f.model == "svm_rbf").representative
    assert champion.run_id == good_rep.run_id
    assert float(champion.tags["carclf.test_f1_macro"]) == pytest.approx(_rep_f1(sweeps.good))
    assert float(champion.tags["carclf.size_mb"]) > 0 and float(champion.tags["carclf.infer_ms_per_img"]) > 0
    assert champion.tags["carclf.test_manifest_hash"] == good_rep.test_hash
    chosen = next(f for f in sweeps.good.families if f.model == "svm_rbf").config
    assert champion.tags["carclf.sweep"] == "good"
    assert f"C={chosen.svm.C:.3g}," in champion.tags["carclf.configuration"]
    assert "backbone_weights=mobilenet_v2-b0353104.pth" in champion.tags["carclf.configuration"]

    cli_promote(argparse.Namespace(sweep="bad", model=None, alias="champion", force=False))
    out = capsys.readouterr().out
    assert f"{_rep_f1(sweeps.bad):.4f}" in out and f"{_rep_f1(sweeps.good):.4f}" in out  # both figures
    assert "@champion kept" in out and "not better" in out
    assert client.get_model_version_by_alias("carclf-svm_rbf", "champion").version == champion.version
    assert len(client.search_model_versions("name = 'carclf-svm_rbf'")) == 2  # registered, not promoted

    forced = {o.name: o for o in promote("bad", force=True)}["carclf-svm_rbf"]
    assert forced.moved and not forced.registered_new  # the version from the refused attempt is reused
    assert str(client.get_model_version_by_alias("carclf-svm_rbf", "champion").version) == forced.version
    assert forced.version != str(champion.version)


@pytest.mark.slow
def test_promote_again_reuses_the_version_and_only_one_family(sweeps, uri):
    promote("good", model="svm_rbf")
    again = {o.name: o for o in promote("good", model="svm_rbf", alias="champion")}["carclf-svm_rbf"]
    assert not again.registered_new and not again.moved and again.reason == "already the holder"
    client = MlflowClient(uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'carclf-svm_rbf'")) == 1
    assert client.search_registered_models("name = 'carclf-simple_cnn'") == []


@pytest.mark.slow
def test_lean_trials_hold_no_model_or_test_figure_yet_the_report_retests_and_promote_registers(sweeps, uri):
    """Sweep trials (as the runner runs them) skip the test split and the model; the report's retests have both."""
    import mlflow

    client = MlflowClient(uri, registry_uri=uri)

    def logged_models(run_id):
        exp = client.get_run(run_id).info.experiment_id
        return client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")

    for run_id in sweeps.finals["good"]:
        trial = client.get_run(run_id)
        assert trial.data.tags["carclf.role"] == "trial"
        assert not any(k.startswith("test_") for k in trial.data.metrics)
        assert len(logged_models(run_id)) == 0
    retests = {f.model: f.representative.run_id for f in sweeps.good.families}
    assert all(len(logged_models(run_id)) == 1 for run_id in retests.values())
    for outcome in promote("good"):
        version = client.get_model_version_by_alias(outcome.name, "champion")
        family = outcome.family or outcome.name.removeprefix("carclf-")  # carclf-best: the winner's family
        assert version.run_id == retests[family] and version.run_id not in sweeps.finals["good"]
        assert "test_f1_macro" in client.get_run(version.run_id).data.metrics
        assert mlflow.models.get_model_info(f"models:/{outcome.name}@champion").metadata["classes"]


def test_promote_marks_the_report_winner_as_carclf_best_and_prints_each_outcome_once(sweeps, uri, capsys, caplog):
    import logging

    client = MlflowClient(uri, registry_uri=uri)
    winner = sweeps.good.winner["model"]
    caplog.set_level(logging.INFO)
    cli_promote(argparse.Namespace(sweep="good", model=None, alias="champion", force=False))
    captured = capsys.readouterr()
    best = client.get_model_version_by_alias("carclf-best", "champion")
    family = client.get_model_version_by_alias(f"carclf-{winner}", "champion")
    assert best.run_id == family.run_id and best.tags["carclf.family"] == winner
    assert [str(v.version) for v in client.search_model_versions("name = 'carclf-best'")] == ["1"]  # the winner only
    for name in ("carclf-svm_rbf", "carclf-simple_cnn", "carclf-best"):
        lines = captured.out.splitlines()
        assert sum(line.startswith(f"{name} v1") for line in lines) == 1, name  # once: not also as a log line
    assert f"carclf-best v1 = the report's winner, {winner}:" in captured.out
    assert not [r for r in caplog.records if r.name.startswith("carclf") and r.levelno >= logging.INFO]
    assert "Successfully registered" not in captured.err  # nor MLflow's own lines
    # the registered model's own figure and the report's mean over seeds, each labelled
    own = _rep_f1(sweeps.good, "simple_cnn")
    mean = sweeps.good.table.set_index("model").loc["simple_cnn", "test_f1_macro"]
    seed = sweeps.good.families[[f.model for f in sweeps.good.families].index("simple_cnn")].representative.seed
    assert (f"carclf-simple_cnn v1: test_f1_macro {own:.4f} (this version, the retest with seed {seed}; the report's "
            f"mean over 2 seeds {mean:.4f})") in captured.out
    # a deterministic family is retested once: no mean over seeds to show beside its own figure
    assert f"carclf-svm_rbf v1: test_f1_macro {_rep_f1(sweeps.good):.4f} (this version, the retest with seed 0);" \
        in captured.out

    # A later report whose winner is worse on the same test images does not take carclf-best.
    outcomes = {o.name: o for o in promote("bad")}
    assert not outcomes["carclf-best"].moved and outcomes["carclf-best"].family == "svm_rbf"
    assert client.get_model_version_by_alias("carclf-best", "champion").version == best.version


def test_report_winner_from_the_tag_or_from_the_report_metrics():
    from report_samples import sample_info

    from carclf.serving.promote import report_winner

    def run(tags, metrics):
        return SimpleNamespace(data=SimpleNamespace(tags=tags, metrics=metrics))

    info = sample_info(".")
    assert report_winner(run({"carclf.winner": "svm"}, {}), info) == "svm"
    metrics = {"svm.test_f1_macro": 0.7, "cnn.test_f1_macro": 0.8, "cnn.test_accuracy": 0.1}
    assert report_winner(run({}, metrics), info) == "cnn"  # reports made before the tag
    assert report_winner(run({}, {}), info) is None


@pytest.mark.slow
def test_promote_unknown_family_names_the_retested_ones(sweeps, uri):
    with pytest.raises(SweepError, match="'vgg16' is not in report run .*retested: simple_cnn, svm_rbf"):
        promote("good", model="vgg16")


@pytest.mark.slow
def test_promote_before_report_says_to_run_report(sweeps, uri, tmp_path):
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("carclf")
    parent = client.create_run(exp.experiment_id, tags={"carclf.role": "sweep", "carclf.sweep": "fresh"})
    client.set_terminated(parent.info.run_id)
    write_sweep_json(tmp_path / "project", "fresh", parent.info.run_id, uri)
    with pytest.raises(SweepError, match=r"no finished report: run `carclf report fresh` first"):
        promote("fresh")


def _version(version, f1, manifest="h1"):
    return SimpleNamespace(version=version, tags={"carclf.test_f1_macro": repr(f1), "carclf.test_manifest_hash": manifest})


@pytest.mark.parametrize("new, old, force, mode, moved, why", [
    (_version("2", 0.9), None, False, "max", True, "first holder"),
    (_version("2", 0.9), _version("1", 0.8), False, "max", True, "better"),
    (_version("2", 0.8), _version("1", 0.8), False, "max", False, "not better"),  # a tie does not move it
    (_version("2", 0.7), _version("1", 0.8), False, "max", False, "not better"),
    (_version("2", 0.7), _version("1", 0.8), True, "max", True, "--force"),
    (_version("2", 0.7), _version("1", 0.8), False, "min", True, "better"),
    (_version("2", 0.99), _version("1", 0.5, manifest="h2"), False, "max", False, "different test split"),
    (_version("1", 0.9), _version("1", 0.9), True, "max", False, "already the holder"),
])
def test_decide(new, old, force, mode, moved, why):
    move, reason = decide(new, old, metric="test_f1_macro", mode=mode, force=force)
    assert move is moved and why in reason


def test_test_metric_for_maps_validation_to_test():
    assert matching_test_metric("val_f1_macro") == "test_f1_macro"
    assert matching_test_metric("val_accuracy") == "test_accuracy"


def test_reserved_alias_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    with pytest.raises(SweepError, match="reserved"):
        promote("any", alias="v3")


def test_promote_compares_by_the_first_objective_unless_told_otherwise(tmp_path):
    from carclf.report.selection import SweepInfo

    info = SweepInfo(name="s", folder=tmp_path, parent_run_id="p", experiment="carclf", tracking_uri="sqlite://",
                     metric="val_f1_macro", mode="max")
    assert comparison(info, None) == ("test_f1_macro", "max")
    assert comparison(info, "test_accuracy") == ("test_accuracy", "max")
    assert comparison(info, "infer_ms_per_img") == ("infer_ms_per_img", "min")  # a cost: lower is better
    assert comparison(info, "size_mb") == ("size_mb", "min")
    with pytest.raises(SweepError, match="--metric 'val_loss': versions carry"):
        comparison(info, "val_loss")
    faster = SimpleNamespace(version="2", tags={"carclf.infer_ms_per_img": "1.5", "carclf.test_manifest_hash": "h"})
    slower = SimpleNamespace(version="1", tags={"carclf.infer_ms_per_img": "4.0", "carclf.test_manifest_hash": "h"})
    assert decide(faster, slower, metric="infer_ms_per_img", mode="min", force=False)[0]
    assert not decide(slower, faster, metric="infer_ms_per_img", mode="min", force=False)[0]
