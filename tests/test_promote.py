"""Promote: one registered model per family, the alias moves only to a better model on the same test split."""

import argparse
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from carclf.errors import SweepError
from carclf.promote import cli_promote, decide, promote, matching_test_metric
from tiny_sweep import sweeps, uri, write_sweep_json  # noqa: F401 - fixtures


def _rep_f1(report, model="svm_rbf") -> float:
    fam = next(f for f in report.families if f.model == model)
    return fam.representative.test_metrics["f1_macro"]


@pytest.mark.slow
def test_promote_sets_alias_refuses_worse_model_and_force_moves_it(sweeps, uri, capsys):
    client = MlflowClient(uri, registry_uri=uri)
    assert _rep_f1(sweeps.bad) < _rep_f1(sweeps.good)  # the fixture's premise

    first = {o.name: o for o in promote("good")}
    assert set(first) == {"carclf-svm_rbf", "carclf-simple_cnn"}
    assert all(o.moved and o.registered_new and o.reason == "first holder" for o in first.values())
    champion = client.get_model_version_by_alias("carclf-svm_rbf", "champion")
    good_rep = next(f for f in sweeps.good.families if f.model == "svm_rbf").representative
    assert champion.run_id == good_rep.run_id
    assert float(champion.tags["carclf.test_f1_macro"]) == pytest.approx(_rep_f1(sweeps.good))
    assert champion.tags["carclf.test_manifest_hash"] == good_rep.test_hash
    chosen = next(f for f in sweeps.good.families if f.model == "svm_rbf").config
    assert champion.tags["carclf.sweep"] == "good"
    assert f"C={chosen.svm.C:.3g}," in champion.tags["carclf.configuration"]
    assert "backbone_weights=mobilenet_v2-b0353104.pth" in champion.tags["carclf.configuration"]

    cli_promote(argparse.Namespace(sweep="bad", model=None, alias="champion", force=False))
    out = capsys.readouterr().out
    assert f"{_rep_f1(sweeps.bad):.4f}" in out and f"{_rep_f1(sweeps.good):.4f}" in out  # both figures
    assert "alias kept" in out and "not better" in out
    assert client.get_model_version_by_alias("carclf-svm_rbf", "champion").version == champion.version
    assert len(client.search_model_versions("name = 'carclf-svm_rbf'")) == 2  # registered, not promoted

    [forced] = promote("bad", force=True)
    assert forced.moved and not forced.registered_new  # the version from the refused attempt is reused
    assert str(client.get_model_version_by_alias("carclf-svm_rbf", "champion").version) == forced.version
    assert forced.version != str(champion.version)


@pytest.mark.slow
def test_promote_again_reuses_the_version_and_only_one_family(sweeps, uri):
    promote("good", model="svm_rbf")
    [again] = promote("good", model="svm_rbf", alias="champion")
    assert not again.registered_new and not again.moved and again.reason == "already the holder"
    client = MlflowClient(uri, registry_uri=uri)
    assert len(client.search_model_versions("name = 'carclf-svm_rbf'")) == 1
    assert client.search_registered_models("name = 'carclf-simple_cnn'") == []


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
