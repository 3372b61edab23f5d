"""Warm start: an earlier sweep's best configurations per family are the new sweep's first trials, exactly;
parameters the new space cannot take are dropped, each with a message."""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import pytest
from spec_sweep import finished_values, pareto_sweep, pareto_uri, sweep_file  # noqa: F401 - fixtures

from carclf.core.errors import SweepError
from sweeps.search.spec import validate_sweep_spec
from sweeps.search.studies import SweepTrial
from sweeps.search.warmstart import points_from_trials, warm_start_points

BASE = {"data": {"image_size": 32}}


def _trial(i, family, value, **params):
    now = int(time.time() * 1000)
    return SweepTrial(run_id=f"r{i}", trial_id=f"t{i}", family=family, status="FINISHED", start_ms=now + i,
                      end_ms=now + i + 5, metrics={"val_f1_macro": value},
                      params={k.replace("__", "."): str(v) for k, v in params.items()})


def _earlier():
    spec = validate_sweep_spec({"base": BASE, "models": {
        "svm": {"space": {"kernel": "linear", "C": {"low": 0.01, "high": 1000.0, "log": True}}},
        "simple_cnn": {"space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}},
        "alexnet": {"config": {"data": {"image_size": 64}}, "space": {"epochs": 1}}},
        "space": {"augment_strength": {"choices": [0.0, 0.5]}}})
    trials = [_trial(0, "svm", 0.50, svm__kernel="linear", svm__C=2.0, augment__strength=0.5),
              _trial(1, "svm", 0.90, svm__kernel="linear", svm__C=500.0, augment__strength=0.0),
              _trial(2, "svm", 0.70, svm__kernel="linear", svm__C=3.0, augment__strength=0.5),
              _trial(3, "simple_cnn", 0.60, train__lr=0.003, augment__strength=0.0),
              _trial(4, "simple_cnn", 0.80, train__lr=0.02, augment__strength=0.5),
              _trial(5, "alexnet", 0.99, train__lr=0.001, augment__strength=0.0),
              SweepTrial("r6", "t6", "svm", "FAILED", 0, None, {}, {"svm.C": "1.0"})]
    return spec, trials


def _wider(**over):
    data = {"base": BASE, "models": {
        "svm": {"space": {"kernel": {"choices": ["linear", "rbf"]}, "C": {"low": 0.1, "high": 100.0, "log": True},
                          "gamma": {"low": 1e-4, "high": 1.0, "log": True}}},
        "simple_cnn": {"space": {"lr": {"low": 1e-4, "high": 1e-1, "log": True},
                                 "batch_size": {"choices": [16, 32]}}}}, "num_samples": 6}
    data.update(over)
    return validate_sweep_spec(data)


def test_the_best_configurations_per_family_become_points_with_drops_named():
    earlier, trials = _earlier()
    start = points_from_trials(_wider(), earlier, trials, top=2, metric="val_f1_macro", mode="max", source="narrow")
    # ranked within each family by the earlier metric, interleaved: every family's best first
    assert [s["trial_id"] for s in start.sources] == ["t1", "t4", "t2", "t3"]
    assert start.points == [
        {"model": "svm", "svm.kernel": "linear"},  # C=500 lies outside the new range: dropped
        {"model": "simple_cnn", "simple_cnn.lr": 0.02, "simple_cnn.batch_size": 32},
        {"model": "svm", "svm.kernel": "linear", "svm.C": 3.0},
        {"model": "simple_cnn", "simple_cnn.lr": 0.003, "simple_cnn.batch_size": 32},
    ]
    notes = "\n".join(start.notes)
    assert "narrow: svm trial t1 (val_f1_macro 0.9000): dropped C=500.0 (outside this sweep's range [0.1, 100])" in notes
    assert "augment_strength (not searched in this sweep)" in notes
    assert "family 'alexnet' is not in this sweep" in notes


def test_a_point_left_without_parameters_is_skipped_and_too_many_points_are_named():
    earlier, trials = _earlier()
    spec = _wider(models={"svm": {"space": {"kernel": "linear", "C": {"low": 0.1, "high": 100.0, "log": True}}}},
                  num_samples=1)
    start = points_from_trials(spec, earlier, trials, top=3, metric="val_f1_macro", mode="max", source="narrow")
    assert start.points == [{"svm.C": 3.0}, {"svm.C": 2.0}]  # one family: no `model` choice to fix
    notes = "\n".join(start.notes)
    assert "t1 (val_f1_macro 0.9000): skipped, none of its parameters fits" in notes
    assert "2 warm-start points but num_samples is 1" in notes


def test_the_search_runs_the_defaults_then_exactly_the_warm_start_points():
    from sweeps.run.budget import budget_search

    earlier, trials = _earlier()
    spec = _wider(num_samples=8)
    start = points_from_trials(spec, earlier, trials, top=2, metric="val_f1_macro", mode="max", source="narrow")
    searcher = budget_search(spec, start.points)
    families = len(spec.models)
    configs = [searcher.suggest(f"trial{i}") for i in range(families + len(start.points) + 1)]
    # each family's default configuration first, in the sweep file's order
    assert [(c["model"], c.get("baseline")) for c in configs[:families]] == [(k, True) for k in spec.models]
    asked = {key: 0 for key in spec.models}
    for i, point in enumerate(start.points):
        config = configs[families + i]
        assert "baseline" not in config
        family = point["model"]
        # the family's Optuna study holds the point's values; the parameters the point leaves open were sampled
        study = searcher.searchers[family]._ot_study
        drawn = study.trials[asked[family]].params
        asked[family] += 1
        assert {k: drawn[k] for k in point if k != "model"} == {k: v for k, v in point.items() if k != "model"}
        cfg = spec.run_config(config)
        source = trials[int(start.sources[i]["trial_id"][1:])]
        assert config["model"] == cfg.model.name == source.family
        if source.family == "svm":
            assert cfg.svm.kernel == "linear" and ("svm.C" not in point or cfg.svm.C == point["svm.C"])
        else:
            assert cfg.train.lr == float(source.params["train.lr"]) and cfg.train.batch_size == 32
    # then the family's cover points (sweeps.search.family), before its sampler models the space
    from sweeps.search.family import cover_points, cover_size

    after = configs[-1]["model"]
    cover = cover_points(spec, after, cover_size(spec, after), spec.seeds.sampler + list(spec.models).index(after))
    assert searcher.searchers[after]._ot_study.trials[asked[after]].system_attrs["fixed_params"] == cover[0]
    assert searcher.suggest("trial7") != searcher.FINISHED and searcher.suggest("trial8") == searcher.FINISHED


def test_warm_start_is_refused_for_a_resumed_sweep_and_top_must_be_positive():
    from sweeps.run.runner import _warm_start

    with pytest.raises(SweepError, match="resumed sweep"):
        _warm_start(SimpleNamespace(state={"parent_run_id": "x"}), "earlier", 1)
    with pytest.raises(SweepError, match="--top must be at least 1"):
        warm_start_points(_wider(), "earlier", top=0)


def test_cli_sweep_takes_warm_start_and_top():
    from carclf.cli import build_parser

    args = build_parser().parse_args(["sweep", "s.yaml", "--warm-start", "narrow", "--top", "3"])
    assert (args.warm_start, args.top) == ("narrow", 3)
    args = build_parser().parse_args(["sweep", "s.yaml"])
    assert (args.warm_start, args.top) == (None, 1)
    assert isinstance(build_parser().parse_args(["analyze", "narrow"]), argparse.Namespace)


@pytest.mark.slow
def test_warm_start_points_come_from_the_earlier_sweep_in_mlflow(pareto_sweep, pareto_uri):
    data = sweep_file(pareto_sweep.data_dir, pareto_sweep.cache, name="wider")
    data["models"]["svm"]["space"]["C"] = {"low": 1e-3, "high": 1e3, "log": True}
    data["models"]["svm"]["space"]["backbone"] = "simple_cnn"  # no longer searched
    spec = validate_sweep_spec(data)
    start = warm_start_points(spec, pareto_sweep.name, top=2)
    values = finished_values(pareto_uri, pareto_sweep.parent_run_id, "val_f1_macro")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(pareto_uri)
    for family in ("svm", "simple_cnn"):
        runs = [client.get_run(r) for r in values]
        mine = [r for r in runs if r.data.tags["carclf.sweep_model"] == family]
        # best first; a tie goes to the trial that started first
        best_two = [r.info.run_id for r in sorted(mine, key=lambda r: (-values[r.info.run_id], r.info.start_time))][:2]
        assert [s["run_id"] for s in start.sources if s["family"] == family] == best_two
    for point, source in zip(start.points, start.sources):
        run = client.get_run(source["run_id"])
        assert point["model"] == source["family"]
        if source["family"] == "svm":
            assert point["svm.C"] == pytest.approx(float(run.data.params["svm.C"]))
            assert point["svm.kernel"] == run.data.params["svm.kernel"]
    assert any("backbone (not searched in this sweep)" in n for n in start.notes)
