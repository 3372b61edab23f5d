"""Build and run the Tuner: Optuna search, ASHA for networks, resources per model, resume, the Ray session.

    start, end = fit(spec, name, storage, ctx, address, restore=False)   # Tuner.fit() in a Ray session

The search is sweeps.run.budget's searcher: each family's default configuration first, then the
warm-start points, then one seeded Optuna TPE search per family with the trials going to the
families still improving. The scheduler is ASHA over network trials only (an SVM reports once);
each trial asks for its model entry's resources (fractional GPUs pack small trials).
`restore=True` continues the Tune experiment saved under the storage path (searcher included).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator

from ray import tune
from ray.tune.execution.placement_groups import PlacementGroupFactory
from ray.tune.schedulers import ASHAScheduler

from carclf.config import validate_run_config
from carclf.core.errors import SweepError
from sweeps.run.budget import budget_search
from sweeps.run.progress import SweepBudget, SweepProgress
from sweeps.run.session import ray_session
from sweeps.run.trial import FinishRunOnStop, TrialContext, run_trial
from sweeps.run.watchdog import bound_http_retries
from sweeps.search.spec import SweepSpec


class PerModelResources:
    """Resources of a trial from its sampled model (e.g. 0.25 GPU for an SVM, 1 for VGG16)."""

    def __init__(self, spec: SweepSpec):
        self.bundles = {key: entry.resources.as_ray() for key, entry in spec.models.items()}

    def __call__(self, config: dict):
        return PlacementGroupFactory([self.bundles[config["model"]]])


def make_trainable(ctx: TrialContext):
    def carclf_trial(config):
        bound_http_retries()  # a dead tracking server fails the trial in about a minute instead of hanging it
        run_trial(config, ctx)

    carclf_trial.__mixins__ = (FinishRunOnStop,)
    return tune.with_resources(carclf_trial, PerModelResources(ctx.spec))


class NetworkASHA(ASHAScheduler):
    """ASHA for network trials only: an SVM reports once, at the end, and never competes on a rung.

    Nor does a probe (`model.finetune: probe`): its epochs run on cached features in milliseconds, so
    stopping one saves nothing and loses its result. `finetune` maps each family to its finetune mode
    when not searched; a searched one is read from the trial's config.
    """

    def __init__(self, *, network_models: set[str], finetune: dict[str, str] | None = None, **kw):
        super().__init__(**kw)
        self.network_models = set(network_models)
        self.finetune = dict(finetune or {})

    def _is_network(self, trial) -> bool:
        key = trial.config.get("model")
        if key not in self.network_models:
            return False
        return trial.config.get(f"{key}.finetune", self.finetune.get(key)) != "probe"

    def on_trial_result(self, tune_controller, trial, result):
        if not self._is_network(trial):
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result):
        if not self._is_network(trial):
            self._trial_info.pop(trial.trial_id, None)
            return
        super().on_trial_complete(tune_controller, trial, result)


def _tuner(spec: SweepSpec, name: str, storage: str, trainable, callback, restore: bool, points=()):
    exp_path = f"{storage.rstrip('/')}/{name}"
    if restore:
        if not tune.Tuner.can_restore(exp_path):
            raise SweepError(f"cannot resume {name!r}: no Ray Tune state at {exp_path}")
        return tune.Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    searcher = budget_search(spec, points, sweep=name)
    scheduler = None  # ASHA follows the first objective (spec.metric) when there are several
    networks = {k for k in spec.models if spec.is_network(k)}
    if spec.scheduler is not None and networks:
        s = spec.scheduler
        scheduler = NetworkASHA(network_models=networks, finetune=_finetune(spec, networks),
                                time_attr="training_iteration", metric=spec.metric,
                                mode=spec.mode,
                                grace_period=s.grace_period, reduction_factor=s.reduction_factor,
                                max_t=s.max_t or _max_epochs(spec, searcher))
    # reuse_actors: a trial's process (torch and carclf imported) serves the next trial of the same size.
    tune_config = tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=spec.num_samples,
                                  max_concurrent_trials=spec.max_concurrent_trials, reuse_actors=True)
    # Not sorted by the metric: a trial the time budget ended before it reported has none, and
    # Tune's sort then fails on None (the results table is sorted instead).
    reporter = _StatusWhileRunning(metric_columns=[*spec.objective_names, "training_iteration"], parameter_columns=["model"],
                                max_report_frequency=30, metric=spec.metric, mode=spec.mode)
    # The time budget as a stopper that tells the driver it ran out (Tune's time_budget_s does not).
    budget = SweepBudget(name, spec.time_budget_s) if spec.time_budget_s else None
    run_config = tune.RunConfig(name=name, storage_path=storage, callbacks=[callback], verbose=1,
                                progress_reporter=reporter, stop=budget,
                                failure_config=tune.FailureConfig(max_failures=spec.max_failures))
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


class _StatusWhileRunning(tune.CLIReporter):
    """Tune's status table while trials run, but not its last one: carclf's own results table follows the sweep."""

    def should_report(self, trials, done: bool = False) -> bool:
        return not done and super().should_report(trials, done)


def _finetune(spec: SweepSpec, networks: set[str]) -> dict[str, str]:
    """Each network family's finetune mode before search (the base's and its own config's)."""

    return {k: validate_run_config(spec.base_config(k)).model.finetune for k in networks}


def _max_epochs(spec: SweepSpec, searcher) -> int:
    """ASHA's max_t: the most epochs a network trial runs, the families' default configurations included
    (a default may lie outside its family's epochs range, and ASHA would cut it at the range's end)."""
    defaults = [spec.run_config(d.config).train.epochs for k, d in searcher.defaults.items() if spec.is_network(k)]
    return max([spec.max_epochs(), *defaults])


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables for the driver while Tune runs, restored afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_ray_session = ray_session  # the name this module used before the session moved to sweeps.run.session


def _interrupted(spec: SweepSpec, trials: list, fit_seconds: float, budget_spent: bool = False,
                 converged: bool = False) -> bool:
    """Ctrl-C ends Tuner.fit() normally: a sweep short of trials within its time budget was interrupted,
    unless its search converged.

    `budget_spent`: the budget's stopper said it ran out (over all runs of a resumed sweep).
    """
    if any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return True
    budget_spent = budget_spent or (spec.time_budget_s is not None and fit_seconds >= spec.time_budget_s)
    return len(trials) < spec.num_samples and not budget_spent and not converged


def fit(spec: SweepSpec, name: str, storage: str, ctx: TrialContext, address: str | None,
        restore: bool, points=()) -> tuple[float, float]:
    """Tuner.fit() for the sweep in a Ray session; returns when fitting started and ended (perf_counter).

    `points`: warm-start configurations (Optuna param dicts, `model` naming the family) the search
    evaluates after each family's default configuration, in order.
    """
    with _ray_session(address):
        tuner = _tuner(spec, name, storage, make_trainable(ctx), SweepProgress(name), restore=restore, points=points)
        fit_start = time.perf_counter()
        # The compact status table (legacy reporter) instead of a config and result table per trial.
        # Tune saves its state every 10 s or more by default; a killed driver then loses finished
        # trials that --resume has to redo.
        with _env(RAY_AIR_NEW_OUTPUT="0",
                  TUNE_GLOBAL_CHECKPOINT_S=os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "3")):
            tuner.fit()
        return fit_start, time.perf_counter()
