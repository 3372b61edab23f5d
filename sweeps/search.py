"""One family's Optuna search (sweeps.budget decides which family runs next): its space, sampler, objectives.

    searcher = family_searcher(spec, "svm_rbf", index=1, points=[{"svm_rbf.C": 3.0}])
    # an OptunaSearch over svm_rbf's parameters only, or for two objectives a ParetoSearch:
    searcher = ParetoSearch(space=FamilySpace(spec, "svm_rbf"), metric=["val_f1_macro", "infer_ms_per_img"],
                            mode=["max", "min"], sampler=optuna.samplers.TPESampler(seed=0), points_to_evaluate=points)

Points to evaluate are enqueued in the family's Optuna study in the order given (`Study.enqueue_trial`):
the family's first sampled trials are exactly those configurations, the sampler takes over after them.
The sweep's `n_startup_trials` (Optuna's default, 10, if unset) is split evenly over the families:
each family's TPE sampler draws at random for its share, then models its own space.
"""

from __future__ import annotations

import math

from ray.tune.search.optuna import OptunaSearch

from sweeps.spec import SearchSpace, SweepSpec

OPTUNA_STARTUP_TRIALS = 10  # TPESampler's own n_startup_trials


class FamilySpace(SearchSpace):
    """The define-by-run space of one family: its parameters only; the family is not an Optuna parameter."""

    def __init__(self, spec: SweepSpec, key: str):
        super().__init__(spec)
        self.keys = [key]


def startup_trials(spec: SweepSpec) -> int:
    """Random trials of each family's sampler: the sweep's n_startup_trials split over its families."""
    total = spec.n_startup_trials if spec.n_startup_trials is not None else OPTUNA_STARTUP_TRIALS
    return max(1, math.ceil(total / len(spec.models)))


def family_searcher(spec: SweepSpec, key: str, index: int, points=()) -> OptunaSearch:
    """The Optuna search of family `key` (the `index`-th of the sweep: its sampler's seed is the sweep's + index)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `group` (conditional spaces sampled per group) is marked experimental; it is what this space needs.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    sampler = optuna.samplers.TPESampler(seed=spec.seeds.sampler + index, group=True, multivariate=True,
                                         n_startup_trials=startup_trials(spec))
    kw = {"space": FamilySpace(spec, key), "sampler": sampler, "points_to_evaluate": list(points) or None}
    if not spec.multi_objective:
        return OptunaSearch(metric=spec.metric, mode=spec.mode, **kw)
    # TPESampler handles several objectives (MOTPE); the study's directions follow the modes.
    return ParetoSearch(metric=spec.objective_names, mode=spec.objective_modes, **kw)


class ParetoSearch(OptunaSearch):
    """OptunaSearch over several objectives that tells Optuna a trial without a finite value for every
    objective as PRUNED: a network stopped by ASHA ends on an epoch's result, which has no model size.

    (OptunaSearch would tell it COMPLETE with a NaN, which Optuna records as a failed trial.)
    """

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if result and not error and isinstance(self.metric, list):
            values = [result.get(m) for m in self.metric]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                result = None  # OptunaSearch tells a trial that ended without a result as PRUNED
        super().on_trial_complete(trial_id, result, error)
