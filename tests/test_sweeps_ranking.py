"""Ranking a sweep's searched backbones before its trials: scores on the parent run, the best k kept in the search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from carclf.core.errors import ConfigError, DataError, SweepError
from carclf.report.backbones import BACKBONE_SCORES
from sweeps.run.ranking import check_searched_backbones, metric_name, rank_sweep_backbones, searched_backbones
from sweeps.search.spec import validate_sweep_spec


class RecordingClient:
    def __init__(self):
        self.dicts, self.metrics = {}, {}

    def log_dict(self, run_id, data, name):
        self.dicts[(run_id, name)] = data

    def log_metric(self, run_id, key, value):
        self.metrics[(run_id, key)] = value

    def set_terminated(self, run_id, status):
        self.ended = (run_id, status)


def sweep(demo_dir, tmp_path, backbone, rank=None, weights="imagenet"):
    data = {"base": {"data": {"path": str(demo_dir), "image_size": 32, "min_images": 2,
                              "cache_dir": str(tmp_path / "cache")},
                     "balance": {"mode": "none"}, "augment": {"strength": 0.0}, "train": {"batch_size": 16},
                     "svm": {"backbone": "simple_cnn", "backbone_weights": weights}},
            "models": {"svm": {"space": {"kernel": "linear", "backbone": backbone}},
                       "simple_cnn": {"space": {"epochs": 1}}}}
    if rank is not None:
        data["rank_backbones"] = rank
    return validate_sweep_spec(data)


def overrides(demo_dir, tmp_path):
    return {"data": {"path": str(demo_dir), "cache_dir": str(tmp_path / "cache")}}


@pytest.mark.slow
def test_scores_every_choice_on_the_parent_run_and_keeps_the_best(demo_dir, tmp_path):
    spec = sweep(demo_dir, tmp_path, {"choices": ["simple_cnn", "mobilenet_v2"]}, rank={"keep": 1})
    client = RecordingClient()
    ranked = rank_sweep_backbones(spec, overrides(demo_dir, tmp_path), client=client, parent="p1")

    logged = client.dicts[("p1", BACKBONE_SCORES)]
    [family] = logged["families"]
    scores = family["scores"]
    assert family["family"] == "svm" and sorted(s["backbone"] for s in scores) == ["mobilenet_v2", "simple_cnn"]
    assert scores[0]["logme"] >= scores[1]["logme"] and family["kept"] == [scores[0]["backbone"]]
    assert {k: v for (_, k), v in client.metrics.items()} == {f"logme/svm/{s['backbone']}": s["logme"] for s in scores}
    assert ranked.model_space("svm").backbone == scores[0]["backbone"]  # one left: a constant
    assert searched_backbones(ranked) == {} and ranked.models["simple_cnn"] == spec.models["simple_cnn"]
    assert ranked.space_fn().params["svm"]["backbone"] == scores[0]["backbone"]


def test_a_sweep_without_searched_backbones_or_with_scoring_off_is_left_alone(demo_dir, tmp_path):
    client = RecordingClient()
    for spec in (sweep(demo_dir, tmp_path, "mobilenet_v2"),
                 sweep(demo_dir, tmp_path, {"choices": ["simple_cnn", "mobilenet_v2"]}, rank={"score": False})):
        assert rank_sweep_backbones(spec, overrides(demo_dir, tmp_path), client=client, parent="p") is spec
    assert client.dicts == {} and client.metrics == {}


def test_a_ranking_that_fails_ends_the_parent_run_failed(tmp_path, demo_dir):
    spec = sweep(demo_dir, tmp_path, {"choices": ["simple_cnn", "mobilenet_v2"]})
    client = RecordingClient()
    with pytest.raises(DataError, match="gone"):
        rank_sweep_backbones(spec, {"data": {"path": str(tmp_path / "gone"), "cache_dir": str(tmp_path)}},
                             client=client, parent="p")
    assert client.ended == ("p", "FAILED") and client.dicts == {}


def test_keep_needs_scores_and_at_least_one(demo_dir, tmp_path):
    with pytest.raises(ConfigError, match="keep"):
        sweep(demo_dir, tmp_path, {"choices": ["simple_cnn", "mobilenet_v2"]}, rank={"score": False, "keep": 1})
    with pytest.raises(ConfigError, match="keep"):
        sweep(demo_dir, tmp_path, {"choices": ["simple_cnn", "mobilenet_v2"]}, rank={"keep": 0})


def test_a_searched_backbone_without_its_weights_is_refused_before_ray(demo_dir, tmp_path):
    spec = sweep(demo_dir, tmp_path, {"choices": ["mobilenet_v2", "resnet18"]}, weights=str(tmp_path / "gone.pth"))
    with pytest.raises(SweepError, match=r"models\.svm\.space\.backbone: 'mobilenet_v2'.*gone\.pth"):
        check_searched_backbones(spec)


def test_metric_names_keep_what_mlflow_accepts():
    assert metric_name("svm", "timm/convnext_tiny.fb_in22k") == "logme/svm/timm/convnext_tiny.fb_in22k"
    assert metric_name("svm", "mobilenet_v2+resnet18") == "logme/svm/mobilenet_v2_resnet18"


@pytest.mark.slow
def test_a_sweep_ranks_its_backbones_searches_the_kept_one_and_the_report_joins_them(tmp_path, tracked, demo_dir):
    import ray
    import yaml
    from mlflow.tracking import MlflowClient

    from carclf.report.backbones import backbone_ranking
    from carclf.report.selection import resolve_sweep, trial_runs
    from sweeps.run.runner import run_sweep

    spec = {"base": {"data": {"path": str(demo_dir), "image_size": 32, "min_images": 2},
                     "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "balance": {"mode": "none"},
                     "augment": {"strength": 0.0}, "train": {"device": "cpu", "num_workers": 0, "batch_size": 16},
                     "svm": {"backbone": "simple_cnn", "backbone_weights": "imagenet"},
                     "tracking": {"experiment": "ranked"}},
            "models": {"svm": {"space": {"kernel": "linear", "C": {"low": 0.1, "high": 10.0, "log": True},
                                         "backbone": {"choices": ["simple_cnn", "mobilenet_v2", "resnet18"]}},
                               "config": {"svm": {"backbone_weights": "none"}}}},
            "rank_backbones": {"keep": 1}, "num_samples": 3, "max_concurrent_trials": 1, "n_startup_trials": 3}
    path = tmp_path / "ranked.yaml"
    path.write_text(yaml.safe_dump(spec))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        table = run_sweep(path, name="ranked", tracking_uri=tracked)
    finally:
        ray.shutdown()
    client = MlflowClient(tracked)
    parent = table.attrs["parent_run_id"]
    local = Path(client.download_artifacts(parent, BACKBONE_SCORES, str(tmp_path)))
    [family] = json.loads(local.read_text())["families"]
    best = family["kept"][0]
    assert family["scores"][0]["backbone"] == best and len(family["scores"]) == 3
    assert set(client.get_run(parent).data.metrics) >= {f"logme/svm/{b}" for b in ("simple_cnn", "mobilenet_v2",
                                                                                     "resnet18")}
    info = resolve_sweep(tmp_path / "results" / "ranked")
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent}' and tags.`carclf.role` = 'trial'")
    searched = {r.data.params["svm.backbone"] for r in runs if "carclf.baseline" not in r.data.tags}
    assert searched <= {best}  # the default trial keeps the base's backbone; every other trial the kept one

    ranking = backbone_ranking(client, info, trial_runs(client, info))
    assert list(ranking.table["backbone"]) == [s["backbone"] for s in family["scores"]]
    assert ranking.table.set_index("backbone").loc[best, "trials"] >= 1
