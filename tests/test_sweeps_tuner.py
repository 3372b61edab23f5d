"""Sweeps, the Tuner's parts: resources per model, ASHA for networks only, telling an interrupted sweep."""

from types import SimpleNamespace

from sweeps.run.tuner import NetworkASHA, PerModelResources, _interrupted
from sweeps.search.spec import validate_sweep_spec


def _spec(**over):
    spec = {"base": {"data": {"image_size": 32}},
            "models": {"simple_cnn": {"space": {"epochs": 2}, "resources": {"cpu": 2, "gpu": 1}},
                       "svm": {"space": {"kernel": "linear"}, "resources": {"cpu": 1, "gpu": 0.25}}}}
    return validate_sweep_spec({**spec, **over})


def test_each_trial_asks_for_its_model_entrys_resources():
    resources = PerModelResources(_spec())
    assert resources({"model": "svm"}).bundles == [{"CPU": 1.0, "GPU": 0.25}]
    assert resources({"model": "simple_cnn"}).bundles == [{"CPU": 2.0, "GPU": 1.0}]


def test_asha_leaves_svm_trials_alone():
    asha = NetworkASHA(network_models={"simple_cnn"}, time_attr="training_iteration", metric="val_f1_macro",
                       mode="max", grace_period=1, max_t=4)
    svm = SimpleNamespace(trial_id="s1", config={"model": "svm"})
    assert asha.on_trial_result(None, svm, {"val_f1_macro": 0.0, "training_iteration": 1}) == asha.CONTINUE
    asha.on_trial_complete(None, svm, {"val_f1_macro": 0.0, "training_iteration": 1})
    assert "s1" not in asha._trial_info


def test_asha_never_stops_a_probe_trial_fixed_or_searched():
    asha = NetworkASHA(network_models={"probe", "mixed"}, finetune={"probe": "probe", "mixed": "head"},
                       time_attr="training_iteration", metric="val_f1_macro", mode="max", grace_period=1,
                       max_t=8, reduction_factor=2)
    trials = [SimpleNamespace(trial_id=f"p{i}", config={"model": "probe"}) for i in range(4)]
    trials += [SimpleNamespace(trial_id="m1", config={"model": "mixed", "mixed.finetune": "probe"})]
    heads = [SimpleNamespace(trial_id=f"h{i}", config={"model": "mixed", "mixed.finetune": "head"}) for i in range(4)]
    for t in trials + heads:
        asha.on_trial_add(None, t)
    decisions = {}
    for step in (1, 2, 4):  # a rung at each: the worst would be cut, were they not probes
        for i, t in enumerate(trials + heads):
            value = 0.9 - 0.2 * i if t in trials else 0.9 - 0.2 * heads.index(t)
            decisions.setdefault(t.trial_id, set()).add(
                asha.on_trial_result(None, t, {"val_f1_macro": value, "training_iteration": step}))
    assert all(decisions[t.trial_id] == {asha.CONTINUE} for t in trials)
    assert any(asha.STOP in decisions[t.trial_id] for t in heads)  # the same figures stop a head trial


def test_a_sweep_short_of_trials_within_its_budget_was_interrupted():
    spec = _spec(num_samples=3, time_budget_s=60)
    done = [SimpleNamespace(status="TERMINATED"), SimpleNamespace(status="ERROR")]
    assert _interrupted(spec, done, fit_seconds=10)  # 2 of 3 with time left: Ctrl-C
    assert not _interrupted(spec, done, fit_seconds=61)  # the time budget ended it
    assert not _interrupted(spec, done + [SimpleNamespace(status="TERMINATED")], fit_seconds=10)
    assert _interrupted(spec, done + [SimpleNamespace(status="RUNNING")], fit_seconds=61)  # a trial never ended
    assert not _interrupted(spec, done, fit_seconds=10, converged=True)  # the search converged: it ended itself


def test_two_objectives_make_a_multi_objective_search_per_family_that_prunes_a_trial_without_both():
    import optuna

    from sweeps.run.budget import FamilyBudgetSearch, budget_search
    from sweeps.search.family import ParetoSearch

    spec = _spec(metric=["val_f1_macro", "size_mb"], mode=["max", "min"])
    searcher = budget_search(spec)
    assert isinstance(searcher, FamilyBudgetSearch) and searcher.metric == ["val_f1_macro", "size_mb"]
    assert all(isinstance(s, ParetoSearch) for s in searcher.searchers.values())
    for trial_id in ("default_cnn", "default_svm", "done", "stopped"):
        searcher.suggest(trial_id)
    # the cover gives each family a trial after its default, the least spent first: one per family here
    assert {searcher.trials[t]["family"] for t in ("done", "stopped")} == {"simple_cnn", "svm"}
    searcher.on_trial_complete("done", {"val_f1_macro": 0.8, "size_mb": 3.5})
    # a network stopped by ASHA ends on an epoch's result: no model size yet
    searcher.on_trial_complete("stopped", {"val_f1_macro": 0.4, "size_mb": float("nan")})
    states = {}
    for trial_id in ("done", "stopped"):
        study = searcher.searchers[searcher.trials[trial_id]["family"]]._ot_study
        assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
        (trial,) = [t for t in study.trials if t.state != optuna.trial.TrialState.WAITING]  # less queued cover points
        states[trial_id] = trial
    assert states["done"].state == optuna.trial.TrialState.COMPLETE and states["done"].values == [0.8, 3.5]
    assert states["stopped"].state == optuna.trial.TrialState.PRUNED


def test_one_objective_keeps_a_single_objective_search_per_family_without_a_model_parameter():
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from sweeps.run.budget import budget_search
    from sweeps.search.family import ParetoSearch

    searcher = budget_search(_spec())
    assert searcher.metric == "val_f1_macro" and searcher.mode == "max"
    for key, family in searcher.searchers.items():
        assert type(family) is OptunaSearch and not isinstance(family, ParetoSearch)
        assert family._ot_study.direction == optuna.study.StudyDirection.MAXIMIZE
    for i in range(4):
        config = searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"val_f1_macro": 0.5})
        key = config["model"]
        # the family is the Tune config's `model`; Optuna draws only the family's own parameters
        study_params = [t.params for t in searcher.searchers[key]._ot_study.trials]
        assert all("model" not in p and all(n.startswith(f"{key}.") for n in p) for p in study_params)


def test_a_sweep_its_budget_ended_is_finished_however_long_this_run_of_it_took():
    spec = _spec(num_samples=3, time_budget_s=60)
    done = [SimpleNamespace(status="TERMINATED")]
    # A resumed sweep whose budget was already spent ends at once: not an interruption.
    assert not _interrupted(spec, done, fit_seconds=0.1, budget_spent=True)
    assert _interrupted(spec, done + [SimpleNamespace(status="PENDING")], fit_seconds=0.1, budget_spent=True)


def test_asha_lets_a_default_configuration_run_its_epochs_even_beyond_the_searched_range():
    from sweeps.run.budget import budget_search
    from sweeps.run.tuner import _max_epochs

    spec = _spec(models={"simple_cnn": {"space": {"epochs": {"low": 2, "high": 4}}}})  # RunConfig's default: 10
    assert spec.max_epochs() == 4 and _max_epochs(spec, budget_search(spec)) == 10
    assert _max_epochs(_spec(), budget_search(_spec())) == 2  # the default inside: the range's end


def test_tunes_last_status_table_is_not_printed_before_carclfs_own():
    from sweeps.run.tuner import _StatusWhileRunning

    reporter = _StatusWhileRunning(metric_columns=["val_f1_macro"], max_report_frequency=0)
    assert reporter.should_report([], done=False)  # while trials run, Tune's table as before
    assert not reporter.should_report([], done=True)  # at the end: carclf's results table only
