"""One family's Optuna search (sweeps.run.budget decides which family runs next): its space, sampler, objectives.

    searcher = family_searcher(spec, "svm_rbf", index=1, points=[{"svm_rbf.C": 3.0}])
    # an OptunaSearch over svm_rbf's parameters only, or for two objectives a ParetoSearch:
    searcher = ParetoSearch(space=FamilySpace(spec, "svm_rbf"), metric=["val_f1_macro", "infer_ms_per_img"],
                            mode=["max", "min"], sampler=optuna.samplers.TPESampler(seed=0), points_to_evaluate=points)

Points to evaluate are enqueued in the family's Optuna study in the order given (`Study.enqueue_trial`):
the family's first sampled trials are exactly those configurations, the sampler takes over after them.

Cover, then model: after the warm-start points come the family's cover points (`cover_points`), the first
points of a scrambled Sobol sequence over its space (Optuna's QMCSampler, log ranges on their log scale),
so TPE models a space whose every region was tried once instead of a few random draws that may leave
whole decades of C or gamma unseen. Their number is `cover_size`: 2**d for d searched parameters, at least
4 and at most COVER_MAX. The first 2**m points of a base-2 Sobol sequence are a (t, m, d)-net: in two
dimensions its first 4 points fall one into each quadrant of the (log) box, in three its first 8 one into
each octant. A sweep's `n_startup_trials`, when set, split over its families, raises the cover when larger.
"""

from __future__ import annotations

import math
import warnings

import optuna
from ray.tune.search.optuna import OptunaSearch

from sweeps.search.spec import SearchSpace, SweepSpec
from sweeps.search.studies import space_distributions

OPTUNA_STARTUP_TRIALS = 10  # TPESampler's own n_startup_trials
COVER_MIN = 4  # a 1-D range in quarters (1.5 decades each of a 6-decade C), a 2-D box in quadrants
COVER_MAX = 8  # the octants of a 3-D box; a full orthant cover of 4+ dimensions would spend a small sweep's trials


class FamilySpace(SearchSpace):
    """The define-by-run space of one family: its parameters only; the family is not an Optuna parameter."""

    def __init__(self, spec: SweepSpec, key: str):
        super().__init__(spec)
        self.keys = [key]


def startup_trials(spec: SweepSpec) -> int:
    """Random trials of each family's sampler: the sweep's n_startup_trials split over its families."""
    total = spec.n_startup_trials if spec.n_startup_trials is not None else OPTUNA_STARTUP_TRIALS
    return max(1, math.ceil(total / len(spec.models)))


def cover_size(spec: SweepSpec, key: str) -> int:
    """How many cover points family `key` draws before TPE models its space (0: it searches nothing)."""

    dims = len([n for n in space_distributions(spec, key) if n != "model"])
    if not dims:
        return 0
    share = startup_trials(spec) if spec.n_startup_trials is not None else 0
    return max(min(max(COVER_MIN, 2 ** dims), COVER_MAX), share)


def cover_points(spec: SweepSpec, key: str, n: int, seed: int) -> list[dict]:
    """The first `n` points of a scrambled Sobol sequence over family `key`'s space, as Optuna params.

    Drawn by Optuna's QMCSampler in a study of their own, whose first trial is a placeholder that fixes
    the search space: QMCSampler takes its space from a study's first trial, and would draw that first
    trial at random.
    """

    space = {n_: d for n_, d in space_distributions(spec, key).items() if n_ != "model"}
    if not space or n <= 0:
        return []
    _quiet_optuna()
    study = optuna.create_study(sampler=optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed))
    anchor = {name: d.to_external_repr(d.to_internal_repr(_any_value(d))) for name, d in space.items()}
    study.add_trial(optuna.trial.create_trial(params=anchor, distributions=space, value=0.0))
    points = []
    for _ in range(n):
        trial = study.ask(space)
        points.append(dict(trial.params))
        study.tell(trial, 0.0)
    return points


def _any_value(distribution):
    """A value inside `distribution` (the placeholder trial's; never evaluated)."""
    choices = getattr(distribution, "choices", None)
    return choices[0] if choices is not None else distribution.low


def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # `group` (conditional spaces sampled per group) and QMCSampler are marked experimental; they are what
    # these spaces need.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def family_searcher(spec: SweepSpec, key: str, index: int, points=()) -> OptunaSearch:
    """The Optuna search of family `key` (the `index`-th of the sweep: its sampler's seed is the sweep's + index).

    Its first points: `points` (warm starts), then its cover points; then TPE.
    """

    _quiet_optuna()
    seed = spec.seeds.sampler + index
    sampler = optuna.samplers.TPESampler(seed=seed, group=True, multivariate=True,
                                         n_startup_trials=startup_trials(spec))
    first = list(points) + cover_points(spec, key, cover_size(spec, key), seed)
    kw = {"space": FamilySpace(spec, key), "sampler": sampler, "points_to_evaluate": first or None}
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
