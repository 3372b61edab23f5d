"""The budget across families: one Optuna search per family, and which family gets each next trial.

    searcher = budget_search(spec, points=warm.points, sweep="quickstart")   # a Ray Tune Searcher
    tune.TuneConfig(search_alg=searcher, num_samples=spec.num_samples, ...)

The order, in one sentence per step:
1. Defaults: each family's default configuration first (sweeps.search.defaults), marked `"baseline": True`,
   cheapest first by the plan's estimates (sweeps.search.plan; the sweep file's order without them).
2. Warm start: then the warm-start points (`--warm-start`), in their order, each from its family's search.
3. Cover: a family's next trials are its cover points (sweeps.search.family: a Sobol sequence over its space);
   it is never called stalled before it has finished them (its default and warm starts count) and
   STALL_AFTER trials more, so the trials that judge it are its model-guided search's.
4. Budget: then each trial goes to the family that has spent least among those still improving, a
   family being stalled when its best (on the first objective) rose by no more than STALL_DELTA over its
   last STALL_AFTER finished trials that trained a model of their own (a failure counts as no gain; a
   trial that repeated an earlier trial's model, such as a saturated SVM at a larger C, counts neither
   way: a family whose trials were all one model has not been searched, so it is not stalled). Ties go
   to a family still in its cover, then the fewer trials, the better best, the sweep file's order.
5. Convergence: when every family has stalled and no trial is running, the search is over: the sweep
   ends, saying so, before its time budget or `num_samples` would end it.

What a family has spent is counted in the sweep's own unit: seconds when the sweep has a time budget
(`time_budget_s`; each finished trial's measured wall time, a running trial at its family's mean so
far), so a family whose trials take seconds gets many more trials than one whose trials take minutes;
trials when it has none. `num_samples` bounds the suggestions either way.

An SVM trial whose model is saturated (every C at or above some value gives the same model, carclf.models.svm)
sends its family's search below that value: the point with the same other settings and C halfway (on
the log scale) between the range's low end and the saturation point is queued in its study.

Decisions use the trials finished so far: with several trials running at once, a trial still running
counts as given to its family but not yet as a gain or a stall. Each decision is a line of
`budget.jsonl` on the sweep's parent run (trial number, family, phase, reason, every family's trials,
finished trials, repeats, seconds spent, mean seconds per trial, best and whether it has stalled); a
decision that changes the plan is also printed. The searcher holds no MLflow client: it finds the
driver's through the sweep's name (sweeps.run.progress), so it pickles for `--resume`, and `save`/`restore`
carry its whole state.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import optuna
from ray.tune.search import Searcher

from sweeps.run.progress import active_driver
from sweeps.search.defaults import BASELINE, DefaultTrial, default_trial
from sweeps.search.family import cover_size, family_searcher
from sweeps.search.plan import estimated_order
from sweeps.search.spec import SweepSpec
from sweeps.search.studies import space_distributions

log = logging.getLogger(__name__)

STALL_AFTER = 3  # a family whose best did not move over its last 3 finished trials of their own model ...
STALL_DELTA = 0.005  # ... by more than this (on a validation metric in [0, 1]) has stalled
BUDGET_FILE = "budget.jsonl"
CONVERGED = "converged"  # the phase of the decision that ends the search


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
    cover: int = 0  # trials before its results may call it stalled: its default, warm starts and cover points
    started: int = 0
    values: list[float | None] = field(default_factory=list)  # the first objective per finished trial; None: no value
    repeats: int = 0  # finished trials that repeated an earlier trial's model (not in `values`)
    seconds: list[float] = field(default_factory=list)  # measured wall time per finished trial

    @property
    def running(self) -> int:
        return self.started - len(self.values) - self.repeats


@dataclass(frozen=True)
class Decision:
    family: str | None  # None: the search has converged (or waits for running trials to say whether it has)
    phase: str  # default, warm_start, cover, budget, converged
    reason: str


class BudgetPolicy:
    """Which family gets the next trial, from each family's trials so far (see the module docstring).

    `cover`: per family (or for all) the trials it gets before it can be called stalled.
    `by_time`: spend is measured in seconds (a sweep with a time budget), else in trials.
    """

    def __init__(self, families: list[str], mode: str, planned: list[tuple[str, str]] = (), *,
                 cover: dict[str, int] | int = 1, after: int = STALL_AFTER, delta: float = STALL_DELTA,
                 by_time: bool = False):
        self.order, self.mode = list(families), mode
        self.planned = list(planned)  # (phase, family): the defaults and warm starts, in order
        self.after, self.delta, self.by_time = after, delta, by_time
        covers = cover if isinstance(cover, dict) else {k: cover for k in self.order}
        self.families = {key: Family(cover=covers.get(key, 1)) for key in self.order}

    def best(self, key: str) -> float | None:
        return best_of(self.families[key].values, self.mode)

    def covering(self, key: str) -> bool:
        return self.families[key].started < self.families[key].cover

    def _judged(self, key: str) -> bool:
        """Whether `key` has finished enough trials to be called stalled: its cover and `after` trials past it
        (so the trials that decide are the search's own, not only the cover's)."""
        f = self.families[key]
        return len(f.values) + f.repeats >= f.cover + self.after

    def stalled(self) -> list[str]:
        return [k for k in self.order if self._judged(k)
                and is_stalled(self.families[k].values, self.mode, self.after, self.delta)]

    def next(self) -> Decision:
        if self.planned:
            phase, key = self.planned.pop(0)
            what = "its default configuration" if phase == "default" else "a warm-start point"
            return Decision(key, phase, what)
        stalled = self.stalled()
        moving = [k for k in self.order if k not in stalled]
        if not moving:
            if any(f.running for f in self.families.values()):
                return Decision(None, "budget", "every family has stalled: waiting for the running trials")
            return Decision(None, CONVERGED, f"every family has stalled (no gain above {self.delta:g} over its last "
                                             f"{self.after} finished trials): the search has converged")
        key = self._first(moving)
        unit = "seconds" if self.by_time else "trials"
        why = f"least {unit} spent among the families still improving"
        if stalled:
            why += f" (stalled: {', '.join(stalled)})"
        if self.covering(key):
            return Decision(key, "cover", f"a cover point of its space; {why}")
        return Decision(key, "budget", why)

    def cost(self, key: str) -> float:
        """Seconds a trial of `key` takes: its mean so far, else the mean over every family's trials, else 1."""
        own = self.families[key].seconds
        if own:
            return sum(own) / len(own)
        every = [s for f in self.families.values() for s in f.seconds]
        return sum(every) / len(every) if every else 1.0

    def spent(self, key: str) -> float:
        """What `key` has used of the budget: seconds (running trials at the family's cost) or trials."""
        f = self.families[key]
        if not self.by_time:
            return float(f.started)
        return sum(f.seconds) + (f.started - len(f.seconds)) * self.cost(key)

    def _rank(self, k: str) -> float:
        """Better best first (a family without a value last)."""
        best = self.best(k)
        return (-best if self.mode == "max" else best) if best is not None else math.inf

    def _first(self, keys: list[str]) -> str:
        """Least spent, then one still in its cover, then fewest trials, the better best, the sweep file's order."""
        return min(keys, key=lambda k: (self.spent(k), not self.covering(k), self.families[k].started, self._rank(k),
                                        self.order.index(k)))

    def started(self, key: str) -> None:
        self.families[key].started += 1

    def finished(self, key: str, value: float | None, seconds: float | None = None, repeat: bool = False) -> None:
        """A finished trial: its value (None: failed), wall time, and whether it repeated an earlier model."""
        f = self.families[key]
        if repeat:
            f.repeats += 1
        else:
            f.values.append(value)
        if seconds is not None and math.isfinite(seconds):
            f.seconds.append(float(seconds))

    def snapshot(self) -> dict[str, dict[str, Any]]:
        stalled = set(self.stalled())
        return {k: {"trials": f.started, "finished": len(f.values) + f.repeats, "repeats": f.repeats,
                    "cover": f.cover, "seconds": round(sum(f.seconds), 3),
                    "mean_s": round(self.cost(k), 3) if f.seconds else None,
                    "best": self.best(k), "stalled": k in stalled}
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
        cover = {k: 1 + sum(w == k for w, _ in warm) + cover_size(spec, k) for k in spec.models}
        policy = {"cover": cover, "by_time": spec.time_budget_s is not None, **policy}
        self.policy = BudgetPolicy(list(spec.models), spec.mode, planned, **policy)
        self.trials: dict[str, dict[str, Any]] = {}  # trial_id -> number, family, phase, config
        self.done: set[str] = set()
        self.decisions: list[dict[str, Any]] = []
        self.ended: str | None = None  # why the search ended before num_samples (the converged decision's reason)
        self._said: tuple | None = None  # the plan as last printed

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return False  # the space, metric and mode come from the sweep file

    def suggest(self, trial_id: str) -> dict | str | None:
        if len(self.trials) >= self.num_samples or self.ended:
            return Searcher.FINISHED
        decision = self.policy.next()
        key = decision.family
        if key is None:
            if decision.phase == CONVERGED:
                self._converged(decision)
                return Searcher.FINISHED
            return None  # every family stalled, trials still running: ask again when one ends
        if decision.phase == "default":
            config = dict(self.defaults[key].config)
        else:
            config = self.searchers[key].suggest(trial_id)
        self.trials[trial_id] = {"number": len(self.trials) + 1, "family": key, "phase": decision.phase,
                                 "config": config}
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
        result = result or {}
        value = result.get(self.first)
        finite = not error and isinstance(value, (int, float)) and math.isfinite(value)
        seconds = result.get("time_total_s")
        self.policy.finished(key, float(value) if finite else None,
                             seconds=float(seconds) if isinstance(seconds, (int, float)) else None,
                             repeat=bool(result.get("equivalent")))
        saturated = result.get("saturated_at")
        if not error and isinstance(saturated, (int, float)) and math.isfinite(saturated):
            self._below_saturation(key, info.get("config") or {}, float(saturated))

    def _below_saturation(self, key: str, config: dict, saturated_at: float) -> None:
        """Queue the family's point with C halfway (log scale) below `saturated_at`, where the model still changes,
        unless a trial with the same other settings already tried a C below it."""

        name = f"{key}.C"
        dist = space_distributions(self.spec, key).get(name)
        if dist is None or saturated_at <= dist.low * 1.000001:
            return
        others = {n: v for n, v in config.items() if n.startswith(f"{key}.") and n != name}
        for info in self.trials.values():
            c = info.get("config") or {}
            if info["family"] == key and c.get(name, math.inf) < saturated_at and \
                    all(c.get(n) == v for n, v in others.items()):
                return
        lower = math.sqrt(dist.low * saturated_at) if dist.log else (dist.low + saturated_at) / 2
        point = {n: v for n, v in others.items() if n in space_distributions(self.spec, key)}
        point[name] = lower
        self.searchers[key]._ot_study.enqueue_trial(point, skip_if_exists=True)
        print(f"budget: {key}'s SVMs are saturated from C={saturated_at:.4g} on (every larger C is the same model): "
              f"its search tries C={lower:.4g} next", flush=True)

    def _converged(self, decision: Decision) -> None:
        """The search is over before num_samples: recorded, printed, and told to the driver."""

        self.ended = decision.reason
        self.decisions.append({"trial": None, "trial_id": None, "family": None, "phase": decision.phase,
                               "reason": decision.reason, "families": self.policy.snapshot()})
        print(f"budget: {decision.reason}; no more trials", flush=True)
        self._publish()
        driver = active_driver(self.sweep) if self.sweep else None
        if driver is not None:
            driver.converged = decision.reason

    def _tell_default(self, key: str, result: dict | None, error: bool) -> None:
        """The default trial's outcome as a trial of its family's Optuna study (if its values fit the space)."""

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
        searching = decision.phase in ("cover", "budget")  # interleaved: one plan, said once
        stalled = tuple(self.policy.stalled()) if searching else ()
        plan = ("search" if searching else decision.phase, stalled)
        lines = [f"budget: {_plan_line(decision, stalled, self.policy)}"] if plan != self._said else []
        self._said = plan
        outside = self.defaults[decision.family].outside if decision.phase == "default" else []
        if outside:
            lines.append(f"budget: {decision.family}'s default lies outside its searched space ({', '.join(outside)}): "
                         "it runs anyway as the baseline; the family's search does not learn from it")
        return lines

    def _publish(self) -> None:
        """Every decision so far as budget.jsonl on the parent run (the whole file again: artifacts do not append)."""

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
    unit = "seconds" if policy.by_time else "trials"
    if not stalled:
        return (f"each family's first trials cover its space (Sobol points) before its search models it (TPE); "
                f"trials go to the families still improving (best up by more than {policy.delta:g} over their last "
                f"{policy.after} finished trials), least {unit} spent first; all are improving")
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
