"""Warm start: a new sweep's first trials are the best configurations of an earlier sweep, per family.

    carclf sweep sweeps/wide.yaml --warm-start narrow --top 2
    start = warm_start_points(spec, "narrow", top=2)      # start.points -> sweeps.run.budget.budget_search(spec, points)

A user who widens a space keeps what the earlier sweep learnt. The points run right after each
family's default configuration, each from its family's Optuna search. For each model entry of the new
sweep, the earlier sweep's `top` best finished trials of the same entry (by its own selection
metric) become points of the new space: every parameter the new space draws takes the trial's
value, so the point is the earlier configuration. A value the new space cannot draw (outside a
range, not a choice) and a parameter the new space no longer searches are dropped, and each
drop is named in a note. Points are ordered by rank (every family's best, then every second
best, ...), so a small budget still seeds every family.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from carclf.core.errors import SweepError
from carclf.report.selection import resolve_sweep, sweep_client
from sweeps.search.spec import SweepSpec
from sweeps.search.studies import (
    OUTSIDE,
    SweepTrial,
    config_value,
    describe_distribution,
    fitted,
    space_distributions,
    space_point,
    sweep_spec,
    sweep_trials,
)

log = logging.getLogger(__name__)


@dataclass
class WarmStart:
    """The points to evaluate first, where each came from, and what was dropped or skipped (one note each)."""

    source: str  # the earlier sweep
    points: list[dict[str, Any]] = field(default_factory=list)  # Optuna params, in the order to run them
    sources: list[dict[str, Any]] = field(default_factory=list)  # per point: family, trial_id, run_id, value
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "points": self.points, "sources": self.sources, "notes": self.notes}


def warm_start_points(spec: SweepSpec, earlier: str, top: int = 1) -> WarmStart:
    """The best `top` configurations per family of the sweep `earlier` (a name or results folder) as
    points of `spec`'s space, read from MLflow."""

    if top < 1:
        raise SweepError(f"--top must be at least 1, got {top}")
    info = resolve_sweep(earlier)
    client = sweep_client(info)
    return points_from_trials(spec, sweep_spec(client, info), sweep_trials(client, info), top=top,
                              metric=info.metric, mode=info.mode, source=info.name)


def points_from_trials(spec: SweepSpec, earlier_spec: SweepSpec | None, trials: list[SweepTrial], *, top: int,
                       metric: str, mode: str, source: str) -> WarmStart:
    """`warm_start_points` for trials already read: the ranking, the mapping into `spec`'s space, the notes."""
    start = WarmStart(source=source)
    for family in sorted({t.family for t in trials} - set(spec.models)):
        start.notes.append(f"{source}: family {family!r} is not in this sweep; its trials are not used")
    ranked = {key: _best(trials, key, top, metric, mode) for key in spec.models}
    for key in [k for k, best in ranked.items() if not best]:
        start.notes.append(f"{source}: no finished trial of {key!r}; it starts from scratch")
    for rank in range(top):
        for key, best in ranked.items():
            if rank < len(best):
                _add(start, spec, earlier_spec, key, best[rank], metric)
    room = max(0, spec.num_samples - len(spec.models))  # each family's default configuration runs first
    if len(start.points) > room:
        start.notes.append(f"{len(start.points)} warm-start points but num_samples is {spec.num_samples} and the "
                           f"{len(spec.models)} default configuration(s) run first: only the first {room} run")
    return start


def _best(trials: list[SweepTrial], key: str, top: int, metric: str, mode: str) -> list[SweepTrial]:
    done = [t for t in trials if t.family == key and t.finished_with([metric])]
    sign = -1.0 if mode == "max" else 1.0
    return sorted(done, key=lambda t: (sign * t.value(metric), t.start_ms))[:top]  # ties: the earlier trial


def _add(start: WarmStart, spec: SweepSpec, earlier_spec: SweepSpec | None, key: str, trial: SweepTrial,
         metric: str) -> None:
    point, dropped = _point(spec, earlier_spec, key, trial)
    where = f"{start.source}: {key} trial {trial.trial_id} ({metric} {trial.value(metric):.4f})"
    if not set(point) - {"model"}:
        start.notes.append(f"{where}: skipped, none of its parameters fits this sweep's space"
                           + (f" (dropped {', '.join(dropped)})" if dropped else ""))
        return
    if point in start.points:
        start.notes.append(f"{where}: skipped, the same point as an earlier one in this space")
        return
    if dropped:
        start.notes.append(f"{where}: dropped {', '.join(dropped)}")
    start.points.append(point)
    start.sources.append({"family": key, "trial_id": trial.trial_id, "run_id": trial.run_id,
                          "value": trial.value(metric)})


def _point(spec: SweepSpec, earlier_spec: SweepSpec | None, key: str, trial: SweepTrial) -> tuple[dict, list[str]]:
    """The trial's configuration as a point of `spec`'s space, and the parameters dropped (with why)."""
    def value_of(dotted: str):
        return config_value(trial.params, dotted)

    distributions = space_distributions(spec, key)
    point, dropped = {}, []
    for name, value in space_point(spec, key, value_of).items():
        v = fitted(distributions[name], value)
        if v is OUTSIDE:
            where = describe_distribution(distributions[name])
            dropped.append(f"{_short(name)}={value!r} (outside this sweep's {where})")
        else:
            point[name] = v
    if earlier_spec is not None and key in earlier_spec.models:
        for name in sorted(set(space_point(earlier_spec, key, value_of)) - set(distributions) - {"model"}):
            dropped.append(f"{_short(name)} (not searched in this sweep)")
    return point, dropped


def _short(name: str) -> str:
    return name.split(".", 1)[-1]

