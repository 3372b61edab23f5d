"""The budget across families: each family's default configuration first, then the trials go to the
families still improving; every decision logged; the searcher survives --resume."""

from __future__ import annotations

import json
import pickle
from types import SimpleNamespace

import pytest
from test_sweeps_runner import ray_local  # noqa: F401 - fixture

from sweeps.run.budget import BUDGET_FILE, BudgetPolicy, FamilyBudgetSearch, budget_search, is_stalled
from sweeps.run.progress import sweep_progress
from sweeps.search.defaults import default_config, default_trial
from sweeps.search.spec import validate_sweep_spec

BASE = {"data": {"image_size": 32}, "svm": {"backbone": "simple_cnn", "backbone_weights": "none"}}


def _spec(models: dict, **over):
    return validate_sweep_spec({"base": BASE, "models": models, **over})


def _two_svms(**over):
    c = {"low": 0.01, "high": 100.0, "log": True}
    gamma = {"low": 1e-4, "high": 1.0, "log": True, "scale": True}
    return _spec({"flat": {"model": "svm", "space": {"kernel": "linear", "C": c}},
                  "moving": {"model": "svm", "space": {"kernel": "rbf", "C": c, "gamma": gamma}}}, **over)


class _Client:
    """Stands in for the driver's MlflowClient: keeps what is logged to the parent run; cannot be pickled."""

    def __init__(self):
        self.files: dict[str, str] = {}

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.files[f"{run_id}/{name}"] = text

    def __reduce__(self):
        raise TypeError("an MLflow client must not be part of the searcher's state")


def _drive(searcher, score, n: int, lag: int = 1, configs: list | None = None) -> list[dict]:
    """Ask for trials until `n` were asked in all (`configs`: those asked before), telling each result `lag`
    suggestions later (lag 2: two trials run at once)."""
    configs = [] if configs is None else configs
    running = []
    for i in range(len(configs), n):
        config = searcher.suggest(f"t{i}")
        while config is None and running:  # every family stalled: the search waits for a running trial
            trial_id, done = running.pop(0)
            searcher.on_trial_complete(trial_id, {"val_f1_macro": score(done, configs)})
            config = searcher.suggest(f"t{i}")
        configs.append(config)
        if config == searcher.FINISHED:
            break
        running.append((f"t{i}", config))
        if len(running) >= lag:
            trial_id, done = running.pop(0)
            searcher.on_trial_complete(trial_id, {"val_f1_macro": score(done, configs)})
    for trial_id, done in running:
        searcher.on_trial_complete(trial_id, {"val_f1_macro": score(done, configs)})
    return configs


def _flat_and_moving(config, configs):
    """`flat` always scores 0.6; `moving` gains 0.03 with each of its trials."""
    if config["model"] == "flat":
        return 0.6
    return 0.5 + 0.03 * sum(c["model"] == "moving" for c in configs[:configs.index(config) + 1])


# ---------------------------------------------------------------------- the policy


def test_a_family_has_stalled_when_its_best_did_not_move_over_its_last_finished_trials():
    assert not is_stalled([0.5, 0.5], "max", after=2)  # too few trials to say
    assert is_stalled([0.5, 0.5, 0.503], "max", after=2, delta=0.005)
    assert not is_stalled([0.5, 0.4, 0.6], "max", after=2, delta=0.005)
    assert is_stalled([0.5, None, None], "max", after=2)  # failures are no gain
    assert not is_stalled([None, 0.1, None], "max", after=2)  # a first value is a gain
    assert is_stalled([0.3, 0.31, 0.3], "min", after=2) and not is_stalled([0.3, 0.2, 0.3], "min", after=2)


def test_the_policy_plans_defaults_then_warm_starts_then_gives_the_least_spent_family_its_cover():
    policy = BudgetPolicy(["a", "b", "c"], "max", [("default", "a"), ("default", "b"), ("default", "c"),
                                                   ("warm_start", "b")], cover={"a": 2, "b": 3, "c": 2})
    order = []
    for _ in range(8):
        decision = policy.next()
        policy.started(decision.family)
        order.append((decision.phase, decision.family))
    assert order == [("default", "a"), ("default", "b"), ("default", "c"), ("warm_start", "b"),
                     ("cover", "a"), ("cover", "c"), ("cover", "b"), ("budget", "a")]


def test_a_stalled_family_gets_trials_only_after_the_moving_ones_and_the_search_converges_when_all_stall():
    policy = BudgetPolicy(["a", "b"], "max", cover=1, after=2)
    for key, values in {"a": [0.7, 0.7, 0.7], "b": [0.4, 0.5, 0.6]}.items():
        for v in values:
            policy.started(key)
            policy.finished(key, v)
    policy.started("b")  # b has more trials, but a has stalled
    decision = policy.next()
    assert (decision.family, decision.phase) == ("b", "budget") and "stalled: a" in decision.reason
    policy.finished("b", 0.6)
    policy.started("b")
    policy.started("b")
    policy.finished("b", 0.6)
    decision = policy.next()  # b gained nothing in its last 2 but a trial of it still runs: wait for it
    assert decision.family is None and decision.phase == "budget"
    policy.finished("b", 0.6)
    decision = policy.next()
    assert decision.family is None and decision.phase == "converged" and "every family has stalled" in decision.reason


def test_a_family_is_not_called_stalled_during_its_cover():
    policy = BudgetPolicy(["a"], "max", cover=5, after=2)
    for _ in range(4):
        policy.started("a")
        policy.finished("a", 0.7)
    assert policy.stalled() == [] and policy.next().phase == "cover"


def test_a_family_whose_trials_were_all_the_same_model_is_not_stalled():
    policy = BudgetPolicy(["svm"], "max", cover=1, after=2)
    policy.started("svm")
    policy.finished("svm", 0.7)
    for _ in range(6):  # saturated SVMs at larger C: the same model each time, copied, not trained
        policy.started("svm")
        policy.finished("svm", 0.7, repeat=True)
    assert policy.stalled() == []
    decision = policy.next()
    assert decision.family == "svm" and decision.phase == "budget"
    assert policy.snapshot()["svm"]["repeats"] == 6 and not policy.snapshot()["svm"]["stalled"]


def test_under_a_time_budget_the_family_spent_least_seconds_goes_next():
    policy = BudgetPolicy(["cheap", "dear"], "max", cover=1, by_time=True)
    for key, seconds in (("cheap", 2.0), ("dear", 60.0)):
        policy.started(key)
        policy.finished(key, 0.5, seconds=seconds)
    picks = []
    for _ in range(10):
        key = policy.next().family
        picks.append(key)
        policy.started(key)
        policy.finished(key, 0.5 + 0.01 * len(picks), seconds=2.0 if key == "cheap" else 60.0)
    assert picks == ["cheap"] * 10  # 29 cheap trials cost what one dear trial does
    assert "least seconds spent" in policy.next().reason


# ---------------------------------------------------------------------- the searcher


def test_a_moving_family_gets_more_trials_than_a_stalled_one_within_num_samples_and_each_decision_is_logged(capsys):
    spec = _two_svms(num_samples=30)
    searcher = FamilyBudgetSearch(spec, sweep="budget-test", after=2)
    client = _Client()
    with sweep_progress("budget-test", spec, client, "parent1", resumed=False):
        configs = _drive(searcher, _flat_and_moving, 30, lag=2)  # two trials at once
        assert searcher.suggest("t30") == searcher.FINISHED
    counts = {key: sum(c["model"] == key for c in configs) for key in spec.models}
    assert counts["moving"] > counts["flat"] and sum(counts.values()) == 30
    assert [c["model"] for c in configs[:2]] == ["flat", "moving"] and all(c["baseline"] for c in configs[:2])
    assert not any(c.get("baseline") for c in configs[2:])

    lines = [json.loads(line) for line in client.files[f"parent1/{BUDGET_FILE}"].splitlines()]
    assert [d["trial"] for d in lines] == list(range(1, 31))
    assert [d["family"] for d in lines] == [c["model"] for c in configs]
    assert [d["phase"] for d in lines[:4]] == ["default", "default", "cover", "cover"]
    # flat: its default and 4 cover points (one searched dimension), then 2 more to be judged stalled
    assert sum(d["phase"] == "cover" and d["family"] == "flat" for d in lines) == 4
    last = lines[-1]["families"]
    assert last["flat"]["stalled"] and last["flat"]["best"] == 0.6 and last["flat"]["cover"] == 5
    assert last["flat"]["trials"] == counts["flat"] and last["moving"]["trials"] == counts["moving"]
    # decisions use the trials finished so far: the last two were still running (given, not yet results)
    for key in spec.models:
        assert last[key]["finished"] == counts[key] - sum(c["model"] == key for c in configs[-2:])
    assert any("stalled: flat" in d["reason"] for d in lines)
    out = capsys.readouterr().out
    assert "budget: each family's default configuration first" in out
    assert "stalled, no gain above 0.005 over their last 2 finished trials: flat (best 0.6000)" in out
    assert out.count("budget: ") < 30  # a printed line per change of plan, not per trial


def test_the_search_ends_when_every_family_has_stalled_and_tells_the_driver(capsys):
    spec = _two_svms(num_samples=200)
    searcher = FamilyBudgetSearch(spec, sweep="flat-test", after=2)
    client = _Client()
    with sweep_progress("flat-test", spec, client, "parent1", resumed=False) as driver:
        configs = _drive(searcher, lambda config, configs: 0.6, 200)
        assert "converged" in (driver.converged or "")
    asked = [c for c in configs if isinstance(c, dict)]
    assert len(asked) < 40 and configs[len(asked)] == searcher.FINISHED
    lines = [json.loads(line) for line in client.files[f"parent1/{BUDGET_FILE}"].splitlines()]
    assert lines[-1]["phase"] == "converged" and all(f["stalled"] for f in lines[-1]["families"].values())
    assert "the search has converged" in capsys.readouterr().out


def test_under_one_time_budget_a_cheap_family_gets_more_trials_than_an_expensive_one():
    models = {"cheap": {"model": "svm", "space": {"kernel": "linear", "C": {"low": 0.01, "high": 100.0, "log": True}}},
              "dear": {"model": "svm", "space": {"kernel": "linear", "C": {"low": 0.01, "high": 100.0, "log": True}}}}
    spec = _spec(models, num_samples=500, time_budget_s=600)
    searcher = budget_search(spec)
    seconds = {"cheap": 2.0, "dear": 40.0}
    clock, counts, i = 0.0, {"cheap": 0, "dear": 0}, 0
    while clock < spec.time_budget_s:  # one trial at a time: the sweep's wall time is the trials' sum
        config = searcher.suggest(f"t{i}")
        key = config["model"]
        counts[key] += 1
        clock += seconds[key]
        # both keep improving, so neither stalls: only cost decides
        searcher.on_trial_complete(f"t{i}", {"val_f1_macro": 0.5 + 0.01 * i, "time_total_s": seconds[key]})
        i += 1
    assert counts["cheap"] >= 5 * counts["dear"] and counts["dear"] >= 5  # the dear one had its cover
    assert i < spec.num_samples  # num_samples only bounds: the time was spent first
    budget_line = next(d for d in searcher.decisions if d["phase"] == "budget")
    assert "least seconds spent" in budget_line["reason"] and budget_line["families"]["dear"]["mean_s"] == 40.0


def test_a_saturated_svm_sends_its_familys_search_below_the_saturation_point(capsys):
    spec = _spec({"lin": {"model": "svm", "space": {"kernel": "linear", "C": {"low": 1e-4, "high": 100.0, "log": True}}}},
                 num_samples=40)
    searcher = FamilyBudgetSearch(spec, after=2)
    saturated_at = 0.5  # every C from 0.5 on is one model
    asked = []
    for i in range(7):  # all score 0.7: the search converges after these (its cover and 2 more)
        config = searcher.suggest(f"t{i}")
        asked.append(config["lin.C"])
        repeat = sum(c >= saturated_at for c in asked[:-1]) > 0 and config["lin.C"] >= saturated_at
        result = {"val_f1_macro": 0.7}
        if config["lin.C"] >= saturated_at:
            result.update(saturated_at=saturated_at, equivalent=int(repeat))
        searcher.on_trial_complete(f"t{i}", result)
    # the first saturated trial (the default, C=1) queued a point below it; it came right after the cover
    assert 1e-4 < asked[5] < saturated_at
    assert "its search tries C=" in capsys.readouterr().out


def test_the_searcher_saved_mid_sweep_and_restored_goes_on_exactly_as_without_the_interruption(tmp_path):
    spec = _two_svms(num_samples=10)
    whole, first = budget_search(spec, sweep="s"), budget_search(spec, sweep="s")
    expected = _drive(whole, _flat_and_moving, 10)
    before = _drive(first, _flat_and_moving, 5)
    with sweep_progress("s", spec, _Client(), "parent", resumed=False):
        pickle.dumps(first)  # as Tune pickles it, while the driver's client is registered
        first.save(str(tmp_path / "searcher.pkl"))
    resumed = budget_search(spec, sweep="s")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.decisions == first.decisions and len(resumed.trials) == 5
    assert _drive(resumed, _flat_and_moving, 10, configs=list(before)) == expected
    assert resumed.decisions == whole.decisions
    assert resumed.suggest("t10") == resumed.FINISHED


def test_the_default_trial_is_told_to_its_familys_study_only_when_it_lies_inside_the_space(capsys):
    import optuna

    spec = _spec({"inside": {"model": "svm", "space": {"kernel": "linear", "C": {"low": 0.1, "high": 10.0}}},
                  "outside": {"model": "svm", "space": {"kernel": "linear", "C": {"low": 10.0, "high": 1000.0}}}})
    searcher = budget_search(spec)
    configs = [searcher.suggest(t) for t in ("d1", "d2")]
    assert [c["baseline"] for c in configs] == [True, True]
    assert spec.run_config(configs[1]).svm.C == 1.0  # runs anyway, outside the range
    out = capsys.readouterr().out
    assert "outside's default lies outside its searched space (C=1.0 (outside range [10, 1000]))" in out
    for trial_id in ("d1", "d2"):
        searcher.on_trial_complete(trial_id, {"val_f1_macro": 0.7})
    def ran(key):  # the study's trials, less the cover points queued in it (WAITING)
        return [t for t in searcher.searchers[key]._ot_study.trials if t.state != optuna.trial.TrialState.WAITING]

    (told,) = ran("inside")
    assert told.state == optuna.trial.TrialState.COMPLETE and told.params == {"inside.C": 1.0}
    assert told.value == 0.7 and told.user_attrs == {"baseline": True}
    assert ran("outside") == []
    # the family's search goes on without errors from either
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"val_f1_macro": 0.5})
        assert 0.1 <= config.get("inside.C", 1.0) <= 10.0 and 10.0 <= config.get("outside.C", 10.0) <= 1000.0


# ---------------------------------------------------------------------- the default configuration


def test_the_default_is_the_familys_configuration_with_scikit_learns_svm_defaults_where_searched():
    spec = _spec({
        "rbf": {"model": "svm", "space": {"kernel": "rbf", "C": {"low": 1.0, "high": 1000.0, "log": True},
                                          "gamma": {"low": 1e-5, "high": 1e-2, "log": True, "scale": True}}},
        "set_c": {"model": "svm", "config": {"svm": {"C": 10.0}}, "space": {"kernel": "linear"}},
        "cnn": {"model": "simple_cnn", "config": {"train": {"lr": 0.003}},
                "space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 2,
                          "batch_size": {"choices": [8, 16]}}}},
        space={"augment_strength": {"choices": [0.0, 0.3]}})
    rbf = default_trial(spec, "rbf")
    cfg = spec.run_config(rbf.config)
    assert (cfg.svm.C, cfg.svm.gamma, cfg.svm.kernel) == (1.0, "scale", "rbf")
    assert rbf.config["baseline"] is True and rbf.config["model"] == "rbf"
    assert rbf.point == {"rbf.C": 1.0, "rbf.gamma_scale": True}
    # augment.strength is RunConfig's default, 0.5, outside the shared choices: named, run anyway
    assert cfg.augment.strength == 0.5 and rbf.outside == ["augment_strength=0.5 (outside choices [0.0, 0.3])"]
    assert spec.run_config(default_trial(spec, "set_c").config).svm.C == 10.0  # the family's config sets C
    cnn_trial = default_trial(spec, "cnn")
    cnn = spec.run_config(cnn_trial.config)
    # lr from its config, epochs its constant, batch size RunConfig's default (outside the choices)
    assert (cnn.train.lr, cnn.train.epochs, cnn.train.batch_size) == (0.003, 2, 32)
    assert "batch_size=32 (outside choices [8, 16])" in cnn_trial.outside and "cnn.batch_size" not in cnn_trial.point
    assert cnn == default_config(spec, "cnn")


def test_the_default_gamma_factor_is_one_when_the_family_searches_it():
    spec = _spec({"rbf": {"model": "svm", "space": {"kernel": "rbf",
                                                    "gamma_factor": {"low": 0.1, "high": 10.0, "log": True}}}})
    cfg = spec.run_config(default_trial(spec, "rbf").config)
    assert (cfg.svm.gamma, cfg.svm.gamma_factor, cfg.svm.C) == ("scale", 1.0, 1.0)


def test_a_warm_start_point_that_is_the_default_runs_once(capsys):
    spec = _two_svms(num_samples=6)
    searcher = budget_search(spec, points=[{"model": "flat", "flat.C": 1.0}, {"model": "flat", "flat.C": 3.0}])
    configs = [searcher.suggest(f"t{i}") for i in range(3)]
    assert [c["model"] for c in configs] == ["flat", "moving", "flat"] and configs[2]["flat.C"] == 3.0
    assert "a warm-start point of flat is its default configuration: it runs once" in capsys.readouterr().out


def test_a_trial_of_the_default_configuration_is_tagged_baseline(monkeypatch):
    import sweeps.run.trial as trial_mod

    seen = []

    def experiment(cfg, *, tags, **kw):
        seen.append(tags)
        return SimpleNamespace(val_metrics={"f1_macro": 0.5}, test_metrics={}, size_mb=1.0, run_id="r",
                               infer_ms_per_img=0.1)

    monkeypatch.setattr(trial_mod.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(trial_mod.tune, "report", lambda *a, **k: None)
    monkeypatch.setattr(trial_mod.ray, "get_runtime_context", lambda: SimpleNamespace(get_node_id=lambda: "n"))
    monkeypatch.setattr(trial_mod, "close_dead_attempts", lambda *a: None)
    monkeypatch.setattr(trial_mod, "_mlflow_client", lambda uri: None)
    monkeypatch.setattr(trial_mod, "equivalent_trial", lambda *a: None)  # no earlier trial to match
    spec = _two_svms()
    ctx = trial_mod.TrialContext(sweep="s", spec=spec, overrides={}, parent_run_id="p", tracking_uri="x",
                                 experiment_fn=experiment)
    default = default_trial(spec, "flat").config
    trial_mod.run_trial(default, ctx)
    trial_mod.run_trial({"model": "flat", "flat.kernel": "linear", "flat.C": 2.0}, ctx)
    assert seen[0][trial_mod.BASELINE_TAG] == "true" and trial_mod.BASELINE_TAG not in seen[1]


# ---------------------------------------------------------------------- a real sweep (Ray, slow)


@pytest.mark.slow
def test_each_familys_first_trial_in_a_sweep_is_its_default_tagged_baseline(tmp_path, tracked, demo_dir, ray_local):
    from mlflow.tracking import MlflowClient
    from test_sweeps_runner import _children, _sweep_file

    from sweeps.run.runner import run_sweep

    models = {"svm_linear": {"model": "svm", "space": {"kernel": "linear"}},
              "svm_rbf": {"model": "svm", "space": {"kernel": "rbf", "gamma": {"low": 1e-4, "high": 1.0, "log": True,
                                                                               "scale": True}}}}
    path = _sweep_file(tmp_path / "s.yaml", demo_dir, models=models, num_samples=4, n_startup_trials=2)
    table = run_sweep(path, name="baseline", tracking_uri=tracked)
    parent = table.attrs["parent_run_id"]
    client = MlflowClient(tracked)
    local = client.download_artifacts(parent, BUDGET_FILE, str(tmp_path))
    decisions = [json.loads(line) for line in open(local).read().splitlines()]
    assert [d["trial"] for d in decisions] == [1, 2, 3, 4]
    assert [(d["family"], d["phase"]) for d in decisions[:2]] == [("svm_linear", "default"), ("svm_rbf", "default")]
    runs = {r.data.tags["carclf.trial_id"]: r for r in _children(tracked, parent)}
    assert sorted(runs) == sorted(d["trial_id"] for d in decisions)
    baseline = {t for t, r in runs.items() if r.data.tags.get("carclf.baseline") == "true"}
    assert baseline == {d["trial_id"] for d in decisions[:2]}  # the first trial of each family, and no other
    for d in decisions[:2]:
        run = runs[d["trial_id"]]
        assert run.data.tags["carclf.sweep_model"] == d["family"] and run.info.status == "FINISHED"
        assert float(run.data.params["svm.C"]) == 1.0 and run.data.params["svm.gamma"] == "scale"
    assert {d["family"] for d in decisions[2:]} == {"svm_linear", "svm_rbf"}  # the even start
