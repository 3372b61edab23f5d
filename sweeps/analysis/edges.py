"""Edge-of-range warnings: a family's best value of a searched range at (or past) one of its ends, with a wider range.

    warnings = edge_warnings(spec, sweep_trials(client, info))    # [{"family", "param", "best", ...}, ...]
    write_edge_warnings(warnings, client, info)   # results/<name>/edge_warnings.json and the parent run's copy

A best value in the outer 5% of its range (on the log scale for a log range) says the optimum may lie
beyond it. The suggestion extends that end: a log range by a factor of 10, a linear one by its width,
never past what the run config allows (C > 0, augment strength <= 1, ...); a range already at such a
limit gets no warning. When several trials share the best value, the parameter is flagged only if
all of them sit at the same end (a saturated SVM scores the same for every large C: no reason to
widen C). `carclf sweep` prints the warnings at its end, `carclf analyze` with its analysis, and the
report shows them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from annotated_types import Ge, Gt, Le, Lt

from carclf.config import RunConfig
from carclf.core.files import USER_FILE_MODE, atomic_write_bytes
from sweeps.search.spec import FloatRange, IntRange, NetworkSpace, SVMSpace, SweepSpec
from sweeps.search.studies import SweepTrial, trial_point

EDGE_FILE = "edge_warnings.json"
EDGE_FRACTION = 0.05  # the outer share of a range, at either end, that counts as its edge
_FIELDS = {**NetworkSpace.FIELDS, **SVMSpace.FIELDS}
# Limits the run config checks in a validator rather than in the field's type
_EXTRA_LIMITS = {"svm.gamma": (Gt(0),)}


def position(value: float, low: float, high: float, log: bool) -> float:
    """Where `value` lies in [low, high]: 0 at low, 1 at high (below 0 or above 1 outside), on the log scale if `log`."""
    if log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def _limits(dotted: str) -> tuple:
    section, name = dotted.split(".")
    field = RunConfig.model_fields[section].annotation.model_fields[name]
    return tuple(field.metadata) + _EXTRA_LIMITS.get(dotted, ())


def suggest(p: FloatRange | IntRange, edge: str, best: float, limits=()) -> tuple[float, float]:
    """The range with its `edge` end moved out: x10 on a log range, by the width on a linear one, within `limits`."""
    low, high = p.low, p.high
    if edge == "lower":
        start = min(low, best)
        new = start / 10 if p.log else start - (high - low)
        for limit in limits:  # a bound the value may reach (Ge) caps it; an open one (Gt) is approached
            if isinstance(limit, Ge):
                new = max(new, limit.ge)
            elif isinstance(limit, Gt) and new <= limit.gt:
                new = limit.gt + 0.1 * (start - limit.gt)
        if isinstance(p, IntRange):
            new = max(math.floor(new), 1) if p.log else math.floor(new)
        return (min(new, low), high)
    start = max(high, best)
    new = start * 10 if p.log else start + (high - low)
    for limit in limits:
        if isinstance(limit, Le):
            new = min(new, limit.le)
        elif isinstance(limit, Lt) and new >= limit.lt:
            new = limit.lt - 0.1 * (limit.lt - start)
    if isinstance(p, IntRange):
        new = math.ceil(new)
    return (low, max(new, high))


def _edge(t: float) -> str | None:
    return "lower" if t <= EDGE_FRACTION else "upper" if t >= 1 - EDGE_FRACTION else None


def _best_trials(spec: SweepSpec, key: str, trials: list[SweepTrial]) -> list[SweepTrial]:
    """The family's finished trials that share its best value of the sweep's metric, in the order they started."""
    done = [t for t in trials if t.family == key and t.finished_with([spec.metric])]
    if not done:
        return []
    pick = max if spec.mode == "max" else min
    best = pick(t.value(spec.metric) for t in done)
    return [t for t in done if t.value(spec.metric) == best]


def _where(spec: SweepSpec, key: str, name: str) -> str:
    return f"models.{key}.space.{name}" if name in spec.models[key].space else f"space.{name}"


def _number(x: float) -> str:
    return f"{x:.4g}"


def family_warnings(spec: SweepSpec, key: str, trials: list[SweepTrial]) -> list[dict[str, Any]]:
    best = _best_trials(spec, key, trials)
    out = []
    for name, p in spec.model_params(key).items():
        if not isinstance(p, (FloatRange, IntRange)):
            continue
        # the values the best trials drew (a linear kernel draws no gamma; 'scale' is no number)
        values = [v for v in (trial_point(spec, key, t).get(f"{key}.{name}") for t in best)
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        edges = {_edge(position(v, p.low, p.high, p.log)) for v in values}
        if len(values) < len(best) or len(edges) != 1 or None in edges:
            continue
        edge, value = edges.pop(), values[0]
        low, high = suggest(p, edge, value, _limits(_FIELDS[name]))
        if (low, high) == (p.low, p.high):
            continue  # the range already reaches what the setting allows
        scale = ", log: true" if p.log else ""
        message = (f"{key}: the best {name} ({_number(value)}, trial {best[0].trial_id}) lies at the {edge} edge of "
                   f"its range [{_number(p.low)}, {_number(p.high)}]{' (log scale)' if p.log else ''}; the optimum "
                   f"may lie beyond it. Try {_where(spec, key, name)}: {{low: {_number(low)}, high: {_number(high)}"
                   f"{scale}}}")
        out.append({"family": key, "param": name, "best": value, "low": p.low, "high": p.high, "log": p.log,
                    "edge": edge, "suggested": {"low": low, "high": high}, "message": message})
    return out


def edge_warnings(spec: SweepSpec, trials: list[SweepTrial]) -> list[dict[str, Any]]:
    """Every family's edge warnings (sweeps.search.studies.sweep_trials gives `trials`)."""
    return [w for key in spec.models for w in family_warnings(spec, key, trials)]


def write_edge_warnings(warnings: list[dict[str, Any]], client, info) -> None:
    """results/<name>/edge_warnings.json and the parent run's artifact of the same name (an empty list: none)."""

    text = json.dumps(warnings, indent=2) + "\n"
    atomic_write_bytes(info.folder / EDGE_FILE, lambda f: f.write(text.encode()), mode=USER_FILE_MODE)
    client.log_text(info.parent_run_id, text, EDGE_FILE)


def read_edge_warnings(folder) -> list[dict[str, Any]]:
    """The warnings a sweep's results folder holds (none if it holds no file)."""

    path = Path(folder) / EDGE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []


def edge_lines(warnings: list[dict[str, Any]]) -> list[str]:
    if not warnings:
        return []
    return ["best values at the edge of their search range:"] + [f"  {w['message']}" for w in warnings]
