"""Sweep analysis: importance, history and the Pareto front come out of a tiny sweep and agree with MLflow."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from spec_sweep import BACKBONES, finished_values, load_json, pareto_sweep, pareto_uri  # noqa: F401 - fixtures

from sweeps.analysis.explain import ANALYSIS_DIR, analyze, analyze_sweep
from sweeps.search.spec import validate_sweep_spec
from sweeps.search.studies import SweepTrial, space_distributions, space_point


def _dominates(a, b, modes) -> bool:
    """a is at least as good as b on every objective and better on one."""
    better = [(x > y) if m == "max" else (x < y) for x, y, m in zip(a, b, modes)]
    no_worse = [(x >= y) if m == "max" else (x <= y) for x, y, m in zip(a, b, modes)]
    return all(no_worse) and any(better)


def check_front(pareto: pd.DataFrame, objectives) -> None:
    """No front point is dominated by any trial; every other trial is dominated by a front point."""
    names, modes = [n for n, _ in objectives], [m for _, m in objectives]
    points = pareto[names].to_numpy()
    front = pareto["on_front"].to_numpy(dtype=bool)
    assert front.any()
    for i in range(len(points)):
        dominated = any(_dominates(points[j], points[i], modes) for j in range(len(points)) if j != i)
        assert dominated != front[i], pareto.iloc[i].to_dict()


@pytest.mark.slow
def test_importance_and_history_agree_with_the_trials_in_mlflow(pareto_sweep, pareto_uri, run_artifacts, monkeypatch):
    monkeypatch.setattr("sweeps.analysis.explain.MIN_IMPORTANCE_TRIALS", 2)  # a tiny sweep: rank its few trials anyway
    analysis = analyze_sweep(pareto_sweep.name)
    values = finished_values(pareto_uri, pareto_sweep.parent_run_id, "val_f1_macro")
    runs = MlflowClient(pareto_uri).search_runs(
        [MlflowClient(pareto_uri).get_run(pareto_sweep.parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{pareto_sweep.parent_run_id}'")
    family_of = {r.info.run_id: r.data.tags["carclf.sweep_model"] for r in runs}
    for key, family in analysis.families.items():
        mine = {rid: v for rid, v in values.items() if family_of[rid] == key}
        history = family.history
        # every finished trial of the family once, with MLflow's value, in the order the trials started
        assert sorted(history["run_id"]) == sorted(mine)
        assert history["value"].tolist() == pytest.approx([mine[r] for r in history["run_id"]])
        assert list(history["number"]) == list(range(len(history)))
        best = history["best_so_far"].to_numpy()
        assert np.all(np.diff(best) >= 0) and best[-1] == pytest.approx(max(mine.values()))
        by_time = history.sort_values("minutes")["best_by_time"].to_numpy()
        assert np.all(np.diff(by_time) >= 0) and by_time[-1] == pytest.approx(max(mine.values()))
        assert family.best["value"] == pytest.approx(max(mine.values()))
        assert mine[family.best["run_id"]] == pytest.approx(max(mine.values()))
        # importance over exactly the parameters the family searched, summing to 1
        searched = set(space_distributions(pareto_sweep.spec, key)) - {"model"}
        assert set(family.importance["param"]) <= searched and len(family.importance) >= 1
        assert family.importance["importance"].sum() == pytest.approx(1.0)
        assert {"history", "importance", "parallel", "slice"} <= set(family.figures)
    svm = analysis.families["svm"]
    assert {"svm.C", "svm.backbone", "svm.kernel"} <= set(svm.importance["param"])
    assert set(svm.choices.loc[svm.choices["param"] == "svm.backbone", "choice"]) <= set(BACKBONES)
    # the trial left RUNNING is named as left out, not analysed
    assert any("did not finish" in n for n in svm.notes)
    assert pareto_sweep.running_run_id not in set(svm.history["run_id"])

    # the same files locally (results/<name>/analysis) and on the parent run
    summary = load_json(analysis_folder() / "summary.json")
    assert summary["families"]["svm"]["best"]["run_id"] == svm.best["run_id"]
    logged = run_artifacts(pareto_sweep.parent_run_id)
    for key, family in summary["families"].items():
        for rel in [*family["figures"].values(), *family["tables"].values()]:
            assert f"{ANALYSIS_DIR}/{rel}" in logged and (analysis_folder() / rel).is_file()
    assert {f"{ANALYSIS_DIR}/summary.json", f"{ANALYSIS_DIR}/pareto.csv", f"{ANALYSIS_DIR}/pareto.png"} <= logged
    # the edge-of-range warnings (sweeps.analysis.edges) of the same trials, beside the analysis and on the parent run
    assert "edge_warnings.json" in logged
    assert load_json(analysis_folder().parent / "edge_warnings.json") == analysis.edges


def analysis_folder():
    from carclf.core import paths

    return paths.results_root() / "pareto" / ANALYSIS_DIR


@pytest.mark.slow
def test_a_two_objective_sweep_has_a_non_dominated_front(pareto_sweep, pareto_uri):
    analysis = analyze_sweep(pareto_sweep.name)
    assert analysis.pareto_objectives == [("val_f1_macro", "max"), ("infer_ms_per_img", "min")]
    pareto = analysis.pareto
    finished = finished_values(pareto_uri, pareto_sweep.parent_run_id, "infer_ms_per_img")
    assert set(pareto["run_id"]) == set(finished)  # every finished trial of every family
    assert pareto.set_index("run_id")["infer_ms_per_img"].to_dict() == pytest.approx(finished)
    check_front(pareto, analysis.pareto_objectives)
    assert set(pareto["family"]) == {"svm", "simple_cnn"}


@pytest.mark.slow
def test_a_searched_backbone_is_extracted_once_and_shared(pareto_sweep, pareto_uri):
    runs = MlflowClient(pareto_uri).search_runs(
        [MlflowClient(pareto_uri).get_run(pareto_sweep.parent_run_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{pareto_sweep.parent_run_id}' and tags.`carclf.sweep_model` = 'svm' "
        "and attributes.status = 'FINISHED'")
    chosen = {r.data.params["svm.backbone"] for r in runs}
    per_backbone = {b: sum(r.data.params["svm.backbone"] == b for r in runs) for b in chosen}
    assert chosen == set(BACKBONES) and max(per_backbone.values()) >= 2, per_backbone  # the premise: shared
    # each backbone's features were extracted once; every later trial read the cache
    assert dict(pareto_sweep.extractions) == {b: 1 for b in BACKBONES}
    for b in BACKBONES:
        hits = sorted(r.data.metrics["feature_cache_hits"] for r in runs if r.data.params["svm.backbone"] == b)
        assert hits == [0] + [3] * (len(hits) - 1)


def _trial(i, family, value, latency, **params):
    now = int(time.time() * 1000)
    return SweepTrial(run_id=f"r{i}", trial_id=f"t{i}", family=family, status="FINISHED", start_ms=now + i,
                      end_ms=now + i + 10, metrics={"val_f1_macro": value, "infer_ms_per_img": latency},
                      params={k.replace("_", ".", 1): str(v) for k, v in params.items()})


def test_a_single_objective_sweep_draws_its_front_against_inference_time(monkeypatch):
    monkeypatch.setattr("sweeps.analysis.explain.MIN_IMPORTANCE_TRIALS", 2)
    spec = validate_sweep_spec({"base": {"data": {"image_size": 32}},
                                "models": {"svm": {"space": {"kernel": "linear"}}, "simple_cnn": {}}})
    trials = [_trial(0, "svm", 0.5, 2.0, svm_C=1.0), _trial(1, "svm", 0.7, 3.0, svm_C=10.0),
              _trial(2, "simple_cnn", 0.6, 1.0, train_lr=0.001), _trial(3, "simple_cnn", 0.4, 5.0, train_lr=0.01)]
    analysis = analyze(spec, trials, "single")
    assert analysis.pareto_objectives == [("val_f1_macro", "max"), ("infer_ms_per_img", "min")]
    assert sorted(analysis.pareto.loc[analysis.pareto["on_front"], "run_id"]) == ["r1", "r2"]
    check_front(analysis.pareto, analysis.pareto_objectives)
    assert analysis.families["svm"].best["run_id"] == "r1"
    assert list(analysis.families["svm"].importance["param"]) == ["svm.C"]


def test_too_few_trials_give_a_reason_not_an_importance():
    spec = validate_sweep_spec({"base": {"data": {"image_size": 32}}, "models": {"svm": {"space": {"kernel": "rbf"}}}})
    analysis = analyze(spec, [_trial(0, "svm", 0.5, 2.0, svm_C=1.0, svm_gamma=0.1)], "one")
    family = analysis.families["svm"]
    assert family.importance.empty and any("too few trials (1) to rank parameters" in n for n in family.notes)
    assert family.history["best_so_far"].tolist() == [0.5]


def test_importance_is_withheld_below_the_threshold_and_given_from_it_in_every_view():
    from sweeps.analysis.explain import MIN_IMPORTANCE_TRIALS, _show

    spec = validate_sweep_spec({"base": {"data": {"image_size": 32}},
                                "models": {"svm": {"space": {"kernel": "linear", "C": {"low": 0.01, "high": 100.0,
                                                                                          "log": True}}}}})
    rng = np.random.default_rng(0)
    cs = 10 ** rng.uniform(-2, 2, MIN_IMPORTANCE_TRIALS)
    trials = [_trial(i, "svm", 0.5 + 0.1 * np.log10(c), 2.0, svm_C=c) for i, c in enumerate(cs)]
    few = analyze(spec, trials[:MIN_IMPORTANCE_TRIALS - 1], "few")
    family = few.families["svm"]
    said = f"too few trials ({MIN_IMPORTANCE_TRIALS - 1}) to rank parameters"
    assert family.importance.empty and "importance" not in family.figures
    assert said in _show(few) and "importance (PED-ANOVA)" not in _show(few)  # carclf analyze's lines
    assert any(said in n for n in few.summary()["families"]["svm"]["notes"])  # what the parent run and report read
    enough = analyze(spec, trials, "enough")
    assert list(enough.families["svm"].importance["param"]) == ["svm.C"]
    assert "importance (PED-ANOVA): C 1.00" in _show(enough)


def test_space_point_gives_back_what_the_space_drew():
    """space_point inverts SearchSpace: the params a study drew come back from the configuration they made."""
    import optuna

    spec = validate_sweep_spec({"base": {"data": {"image_size": 32}}, "models": {
        "svm": {"space": {"kernel": {"choices": ["linear", "rbf"]}, "backbone": {"choices": BACKBONES},
                          "gamma": {"low": 1e-4, "high": 1.0, "log": True, "scale": True}}},
        "simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "batch_size": {"choices": [8, 16]}}}},
        "space": {"samples_per_class": {"choices": [None, 20]}}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        params = spec.space_fn()(trial)
        cfg = spec.run_config(params).to_dict()
        point = space_point(spec, params["model"], lambda dotted: cfg[dotted.split(".")[0]][dotted.split(".")[1]])
        assert point == trial.params
        distributions = space_distributions(spec, params["model"])
        assert set(point) <= set(distributions)
        assert all(distributions[n]._contains(distributions[n].to_internal_repr(v)) for n, v in point.items())
        study.tell(trial, 0.0)
