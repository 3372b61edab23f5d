"""The budget across families: one Optuna search per family, and which family gets each next trial.

    searcher = budget_search(spec, points=warm.points, sweep="quickstart")   # a Ray Tune Searcher
    tune.TuneConfig(search_alg=searcher, num_samples=spec.num_samples, ...)

The order, in one sentence per step:
1. Defaults: each family's default configuration first (sweeps.defaults), marked `"baseline": True`,
   cheapest first by the plan's estimates (sweeps.plan; the sweep file's order without them).
2. Warm start: then the warm-start points (`--warm-start`), in their order, each from its family's search.
3. Even start: then every family is brought to EVEN_START trials (its default and warm starts count).
4. Budget: then each trial goes to the family with the fewest trials among those still improving, a
   family being stalled when its best (on the first objective) rose by no more than STALL_DELTA over its
   last STALL_AFTER finished trials (a failure counts as no gain); when every family has stalled, the
   family with the best result so far. Ties go to the better best (or the fewer trials), then to the
   sweep file's order.

Decisions use the trials finished so far: with several trials running at once, a trial still running
counts as given to its family but not yet as a gain or a stall. `num_samples` bounds the suggestions.
Each decision is a line of `budget.jsonl` on the sweep's parent run (trial number, family, phase, reason,
every family's trials, finished trials, best and whether it has stalled); a decision that changes the
plan is also printed. The searcher holds no MLflow client: it finds the driver's through the sweep's
name (sweeps.progress), so it pickles for `--resume`, and `save`/`restore` carry its whole state.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher

from sweeps.defaults import BASELINE, DefaultTrial, default_trial
from sweeps.plan import estimated_order
from sweeps.search import family_searcher
from sweeps.spec import SweepSpec

log = logging.getLogger(__name__)

EVEN_START = 2  # trials per family, its default included, before results steer the budget
STALL_AFTER = 2  # a family whose best did not move over its last 2 finished trials ...
STALL_DELTA = 0.005  # ... by more than this (on a validation metric in [0, 1]) has stalled
BUDGET_FILE = "budget.jsonl"


# ---------------------------------------------------------------------- the policy (pure)


def best_of(values: list[float | None], mode: str) -> float | None:
    done = [v for v in values if v is not None]
    if not done:
        return None
    return max(done) if mode == "max" else min(done)


def gain(values: list[float | None], mode: str, after: int = STALL_AFTER) -> float | None:
    """How much the family's best moved over its last `after` finished trials (None: too few to say)."""
    if len(values) <= after:
        return None
    before, now = best_of(values[:-after], mode), best_of(values, mode)
    if now is None:
        return 0.0
    if before is None:
        return math.inf
    return now - before if mode == "max" else before - now


def is_stalled(values: list[float | None], mode: str, after: int = STALL_AFTER, delta: float = STALL_DELTA) -> bool:
    moved = gain(values, mode, after)
    return moved is not None and moved <= delta


@dataclass
class Family:
    started: int = 0
    values: list[float | None] = field(default_factory=list)  # the first objective per finished trial; None: no value


@dataclass(frozen=True)
class Decision:
    family: str
    phase: str  # default, warm_start, even_start, budget
    reason: str


class BudgetPolicy:
    """Which family gets the next trial, from each family's trials so far (see the module docstring)."""

    def __init__(self, families: list[str], mode: str, planned: list[tuple[str, str]] = (), *,
                 even_start: int = EVEN_START, after: int = STALL_AFTER, delta: float = STALL_DELTA):
        self.order, self.mode = list(families), mode
        self.planned = list(planned)  # (phase, family): the defaults and warm starts, in order
        self.even_start, self.after, self.delta = even_start, after, delta
        self.families = {key: Family() for key in self.order}

    def best(self, key: str) -> float | None:
        return best_of(self.families[key].values, self.mode)

    def stalled(self) -> list[str]:
        return [k for k in self.order if is_stalled(self.families[k].values, self.mode, self.after, self.delta)]

    def next(self) -> Decision:
        if self.planned:
            phase, key = self.planned.pop(0)
            what = "its default configuration" if phase == "default" else "a warm-start point"
            return Decision(key, phase, what)
        behind = [k for k in self.order if self.families[k].started < self.even_start]
        if behind:
            return Decision(self._first(behind), "even_start", f"even start: {self.even_start} trials per family")
        stalled = self.stalled()
        moving = [k for k in self.order if k not in stalled]
        if moving:
            why = "fewest trials among the families still improving"
            if stalled:
                why += f" (stalled: {', '.join(stalled)})"
            return Decision(self._first(moving), "budget", why)
        return Decision(self.leader(), "budget", "every family has stalled: the best so far")

    def _rank(self, k: str) -> float:
        """Better best first (a family without a value last)."""
        best = self.best(k)
        return (-best if self.mode == "max" else best) if best is not None else math.inf

    def _first(self, keys: list[str]) -> str:
        """Fewest trials, then the better best, then the sweep file's order."""
        return min(keys, key=lambda k: (self.families[k].started, self._rank(k), self.order.index(k)))

    def leader(self) -> str:
        """The better best, then fewest trials, then the sweep file's order."""
        return min(self.order, key=lambda k: (self._rank(k), self.families[k].started, self.order.index(k)))

    def started(self, key: str) -> None:
        self.families[key].started += 1

    def finished(self, key: str, value: float | None) -> None:
        self.families[key].values.append(value)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        stalled = set(self.stalled())
        return {k: {"trials": f.started, "finished": len(f.values), "best": self.best(k), "stalled": k in stalled}
                for k, f in self.families.items()}


# ---------------------------------------------------------------------- the Tune searcher


class FamilyBudgetSearch(Searcher):
    """A Ray Tune Searcher holding one Optuna search per family; BudgetPolicy picks the family of each trial.

    Each family's search (OptunaSearch, or ParetoSearch for two objectives) covers that family's space
    only. Default trials bypass the samplers and are told to their family's study once finished (when
    their values lie inside its space); warm-start points are enqueued in their family's study.
    """

    def __init__(self, spec: SweepSpec, points=(), sweep: str | None = None, **policy):
        metric = spec.objective_names if spec.multi_objective else spec.metric
        mode = spec.objective_modes if spec.multi_objective else spec.mode
        super().__init__(metric=metric, mode=mode)
        self.spec, self.sweep, self.first = spec, sweep, spec.metric
        self.num_samples = spec.num_samples
        self.defaults: dict[str, DefaultTrial] = {key: default_trial(spec, key) for key in spec.models}
        warm = _route(spec, points, self.defaults)
        self.searchers = {key: family_searcher(spec, key, i, [p for k, p in warm if k == key])
                          for i, key in enumerate(spec.models)}
        planned = [("default", k) for k in estimated_order(sweep, list(spec.models))] + \
            [("warm_start", k) for k, _ in warm]
        self.policy = BudgetPolicy(list(spec.models), spec.mode, planned, **policy)
        self.trials: dict[str, dict[str, Any]] = {}  # trial_id -> number, family, phase
        self.done: set[str] = set()
        self.decisions: list[dict[str, Any]] = []
        self._said: tuple | None = None  # the plan as last printed

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return False  # the space, metric and mode come from the sweep file

    def suggest(self, trial_id: str) -> dict | str | None:
        if len(self.trials) >= self.num_samples:
            return Searcher.FINISHED
        decision = self.policy.next()
        key = decision.family
        if decision.phase == "default":
            config = dict(self.defaults[key].config)
        else:
            config = self.searchers[key].suggest(trial_id)
        self.trials[trial_id] = {"number": len(self.trials) + 1, "family": key, "phase": decision.phase}
        self.policy.started(key)
        self._record(trial_id, decision)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        info = self.trials.get(trial_id)
        if info is not None and info["phase"] != "default" and trial_id not in self.done:
            self.searchers[info["family"]].on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        info = self.trials.get(trial_id)
        if info is None or trial_id in self.done:
            log.warning("budget: completion of unknown or already finished trial %s ignored", trial_id)
            return
        self.done.add(trial_id)
        key = info["family"]
        if info["phase"] == "default":
            self._tell_default(key, result, error)
        else:
            self.searchers[key].on_trial_complete(trial_id, result=result, error=error)
        value = (result or {}).get(self.first)
        finite = not error and isinstance(value, (int, float)) and math.isfinite(value)
        self.policy.finished(key, float(value) if finite else None)

    def _tell_default(self, key: str, result: dict | None, error: bool) -> None:
        """The default trial's outcome as a trial of its family's Optuna study (if its values fit the space)."""
        import optuna

        from sweeps.studies import space_distributions

        default = self.defaults[key]
        if not default.in_space:
            return
        names = self.metric if isinstance(self.metric, list) else [self.metric]
        values = [(result or {}).get(n) for n in names]
        ok = not error and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        state = optuna.trial.TrialState
        distributions = space_distributions(self.spec, key)
        trial = optuna.trial.create_trial(
            state=state.COMPLETE if ok else (state.FAIL if error else state.PRUNED),
            values=[float(v) for v in values] if ok else None, params=default.point,
            distributions={n: distributions[n] for n in default.point}, user_attrs={BASELINE: True})
        self.searchers[key]._ot_study.add_trial(trial)

    # ------------------------------------------------------------------ the record

    def _record(self, trial_id: str, decision: Decision) -> None:
        info = self.trials[trial_id]
        entry = {"trial": info["number"], "trial_id": trial_id, "family": decision.family, "phase": decision.phase,
                 "reason": decision.reason, "families": self.policy.snapshot()}
        self.decisions.append(entry)
        for line in self._news(decision):
            print(line, flush=True)  # as the progress lines: the sweep's own output
        self._publish()

    def _news(self, decision: Decision) -> list[str]:
        """Lines for what this decision changes in the plan (nothing when it follows the plan already said)."""
        stalled = tuple(self.policy.stalled()) if decision.phase == "budget" else ()
        leader = self.policy.leader() if len(stalled) == len(self.policy.order) else None
        plan = (decision.phase, stalled, leader)
        lines = [f"budget: {_plan_line(decision, stalled, self.policy)}"] if plan != self._said else []
        self._said = plan
        outside = self.defaults[decision.family].outside if decision.phase == "default" else []
        if outside:
            lines.append(f"budget: {decision.family}'s default lies outside its searched space ({', '.join(outside)}): "
                         "it runs anyway as the baseline; the family's search does not learn from it")
        return lines

    def _publish(self) -> None:
        """Every decision so far as budget.jsonl on the parent run (the whole file again: artifacts do not append)."""
        from sweeps.progress import active_driver

        driver = active_driver(self.sweep) if self.sweep else None
        if driver is None:
            return
        text = "".join(json.dumps(d, default=str) + "\n" for d in self.decisions)
        try:
            driver.client.log_text(driver.parent_run_id, text, BUDGET_FILE)
        except Exception as e:  # noqa: BLE001 - the sweep goes on; the next decision writes the file again
            log.warning("could not log %s to the parent run: %s", BUDGET_FILE, e)

    # ------------------------------------------------------------------ --resume

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(self.__dict__.copy(), fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            self.__dict__.update(pickle.load(fh))


def _plan_line(decision: Decision, stalled: tuple, policy: BudgetPolicy) -> str:
    if decision.phase == "default":
        return f"each family's default configuration first, the baseline tuning has to beat: {', '.join(policy.order)}"
    if decision.phase == "warm_start":
        return "warm-start points next, each from its family's search"
    if decision.phase == "even_start":
        return f"an even start: {policy.even_start} trials per family before results steer the budget"
    if not stalled:
        return (f"trials go to the families still improving (best up by more than {policy.delta:g} over their "
                f"last {policy.after} finished trials), fewest trials first; all are improving")
    if len(stalled) == len(policy.order):
        return (f"every family has stalled (no gain above {policy.delta:g} over its last {policy.after} finished "
                f"trials): trials go to the best so far, {policy.leader()}")
    bests = ", ".join(f"{k} (best {_fmt(policy.best(k))})" for k in stalled)
    moving = ", ".join(k for k in policy.order if k not in stalled)
    return (f"stalled, no gain above {policy.delta:g} over their last {policy.after} finished trials: {bests}; "
            f"they get trials only after {moving}")


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _route(spec: SweepSpec, points, defaults: dict[str, DefaultTrial]) -> list[tuple[str, dict]]:
    """Warm-start points (Optuna params; `model` names the family when there are several) as (family, params).

    A point that is exactly its family's default is dropped: the default runs first anyway.
    """
    only = next(iter(spec.models)) if len(spec.models) == 1 else None
    out = []
    for point in points:
        key = point.get("model", only)
        if key not in spec.models:
            log.warning("warm-start point %s names no family of this sweep; skipped", point)
            continue
        params = {n: v for n, v in point.items() if n != "model"}
        if params == defaults[key].point and defaults[key].in_space:
            print(f"budget: a warm-start point of {key} is its default configuration: it runs once", flush=True)
            continue
        out.append((key, params))
    return out


def budget_search(spec: SweepSpec, points=(), sweep: str | None = None) -> FamilyBudgetSearch:
    """The sweep's searcher: defaults first, then `points` (warm starts), then the budget across families."""
    return FamilyBudgetSearch(spec, points=points, sweep=sweep)
