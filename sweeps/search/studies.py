"""The Optuna view of a sweep's trials, rebuilt from MLflow: the parameters its search drew, as Optuna studies.

    trials = sweep_trials(client, info)                          # one SweepTrial per trial run of the sweep
    study = family_study(spec, "svm_rbf", trials, "val_f1_macro", "max")   # an in-memory optuna Study
    point = space_point(spec, "svm_rbf", value_of)               # the Optuna params that give a configuration

MLflow holds each trial's resolved RunConfig (its params), not the names the family's define-by-run
space (sweeps.search.family.FamilySpace) gave its draws; `space_point` maps a configuration back to those names,
and `space_distributions` gives their Optuna distributions, both from the sweep file. So a sweep
that is still running, was interrupted, or ran elsewhere can be studied with Optuna's own tools.
"""

from __future__ import annotations

import datetime as dt
import math
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from mlflow.exceptions import MlflowException
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import TypeAdapter

from carclf.config import ConfigError, RunConfig, read_yaml
from carclf.core.errors import SweepError
from carclf.report.selection import param_value, parent_run, trial_runs
from sweeps.search.spec import (
    COST_METRICS,
    RBF_ONLY,
    Choice,
    FloatRange,
    GammaRange,
    IntRange,
    NetworkSpace,
    SVMSpace,
    SweepSpec,
    validate_sweep_spec,
)

_FIELDS = {**NetworkSpace.FIELDS, **SVMSpace.FIELDS}


@dataclass
class SweepTrial:
    """One trial of a sweep as MLflow recorded it (its kept attempt, as `carclf report` counts it)."""

    run_id: str
    trial_id: str
    family: str  # the sweep's model entry
    status: str  # FINISHED, STOPPED_EARLY, FAILED, RUNNING, KILLED
    start_ms: int
    end_ms: int | None
    metrics: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)  # the run's flattened RunConfig, as MLflow stores it

    def value(self, name: str) -> float:
        v = self.metrics.get(name, float("nan"))
        return float(v) if v is not None else float("nan")

    def finished_with(self, names) -> bool:
        return self.status == "FINISHED" and all(math.isfinite(self.value(n)) for n in names)


def searched_fields(spec: SweepSpec) -> list[str]:
    """The RunConfig fields ('svm.C', 'train.lr') some family of the sweep searches: what its trials differ in."""
    return sorted({_FIELDS[name] for key in spec.models for name, p in spec.model_params(key).items()
                   if _searched(p) and name in _FIELDS})


def _searched(p) -> bool:
    """What SearchSpace asks Optuna for: a range, or a choice among several values (one value is a constant)."""
    return isinstance(p, (FloatRange, IntRange)) or (isinstance(p, Choice) and len(p.choices) > 1)


def _distribution(p):
    if isinstance(p, FloatRange):
        return FloatDistribution(p.low, p.high, log=p.log)
    if isinstance(p, IntRange):
        return IntDistribution(p.low, p.high, step=p.step, log=p.log)
    return CategoricalDistribution(p.choices)


def space_distributions(spec: SweepSpec, key: str) -> dict[str, Any]:
    """Every parameter the search can draw for model entry `key`, by its Optuna name, with its distribution.

    With several families `model` (the families as choices) comes first: each family has its own Optuna
    search (sweeps.run.budget), so it is never drawn; it names the family a point belongs to.
    """

    out: dict[str, Any] = {}
    if len(spec.models) > 1:
        out["model"] = CategoricalDistribution(list(spec.models))
    for name, p in spec.model_params(key).items():
        if not _searched(p):
            continue
        if isinstance(p, GammaRange) and p.scale:
            out[f"{key}.{name}_scale"] = CategoricalDistribution([True, False])
        out[f"{key}.{name}"] = _distribution(p)
    return out


def space_point(spec: SweepSpec, key: str, value_of: Callable[[str], Any]) -> dict[str, Any]:
    """The Optuna params (name -> value) that make SearchSpace give model entry `key` this configuration.

    `value_of(dotted)` is the configuration's value of a RunConfig field ('svm.C'). Mirrors
    SearchSpace.__call__: gamma and gamma_factor only for an RBF kernel, 'scale' as the `<key>.gamma_scale` switch.
    """
    params = spec.model_params(key)
    out: dict[str, Any] = {"model": key} if len(spec.models) > 1 else {}
    kernel = value_of(_FIELDS["kernel"]) if "kernel" in params else None
    for name, p in params.items():
        if not _searched(p) or (name in RBF_ONLY and kernel not in (None, "rbf")):
            continue
        value = value_of(_FIELDS[name])
        if isinstance(p, GammaRange) and p.scale:
            out[f"{key}.{name}_scale"] = value == "scale"
            if value == "scale":
                continue
        out[f"{key}.{name}"] = value
    return out


OUTSIDE = object()  # what `fitted` returns for a value the distribution cannot draw


def fitted(distribution, value):
    """`value` as the distribution draws it (the matching choice; a number inside the range), else OUTSIDE."""

    if isinstance(distribution, CategoricalDistribution):
        # 0 and 0.0 are one choice (YAML may spell it either way); True is never 1
        same = [c for c in distribution.choices if c == value and isinstance(c, bool) == isinstance(value, bool)]
        return same[0] if same else OUTSIDE
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return OUTSIDE
    if not distribution.low <= value <= distribution.high:
        return OUTSIDE
    if isinstance(distribution, IntDistribution):
        return int(value) if float(value).is_integer() else OUTSIDE
    return float(value) if isinstance(distribution, FloatDistribution) else OUTSIDE


def describe_distribution(distribution) -> str:
    """A distribution in words: "range [0.01, 100]" or "choices ['linear', 'rbf']"."""

    if isinstance(distribution, CategoricalDistribution):
        return f"choices {list(distribution.choices)}"
    return f"range [{distribution.low:g}, {distribution.high:g}]"


def config_value(params: dict[str, str], dotted: str) -> Any:
    """A RunConfig field's value from a run's MLflow params, typed as RunConfig types it ('1e-05' -> 1e-05)."""

    section, name = dotted.split(".")
    annotation = RunConfig.model_fields[section].annotation.model_fields[name].annotation
    raw = params.get(dotted)
    if raw is None:  # not logged: the RunConfig default
        return getattr(getattr(RunConfig(), section), name)
    return TypeAdapter(annotation).validate_python(param_value(raw))


def trial_point(spec: SweepSpec, key: str, trial: SweepTrial) -> dict[str, Any]:
    return space_point(spec, key, lambda dotted: config_value(trial.params, dotted))


# ---------------------------------------------------------------------- reading trials from MLflow


def sweep_trials(client, info) -> list[SweepTrial]:
    """The sweep's trials in the order they started: the report's view (carclf.report.selection.trial_runs,
    one attempt per trial, the final value of each metric) with each run's params and end time."""

    table = trial_runs(client, info)
    if table.empty:
        return []
    experiment_id = parent_run(client, info).info.experiment_id
    runs = {r.info.run_id: r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{info.parent_run_id}'", max_results=50000)}
    skip = {"run_id", "trial_id", "model", "status", "start_time", "error"}
    out = []
    for row in table.to_dict("records"):
        run = runs.get(row["run_id"])
        metrics = {k: float(v) for k, v in row.items() if k not in skip and isinstance(v, (int, float))}
        out.append(SweepTrial(run_id=row["run_id"], trial_id=str(row["trial_id"]), family=row["model"],
                              status=row["status"], start_ms=int(row["start_time"]),
                              end_ms=run.info.end_time if run is not None else None, metrics=metrics,
                              params=dict(run.data.params) if run is not None else {}))
    return out


def sweep_spec(client, info) -> SweepSpec:
    """The sweep file a sweep ran with: results/<name>/sweep.yaml, else the parent run's copy."""

    local = info.folder / "sweep.yaml"
    if local.is_file():
        return validate_sweep_spec(read_yaml(local), str(local))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(info.parent_run_id, "sweep.yaml", tmp)
        except (MlflowException, OSError) as e:
            raise SweepError(f"sweep {info.name!r}: no sweep file at {local} nor on parent run "
                             f"{info.parent_run_id} ({e}); the analysis needs its search space") from None
        try:
            return validate_sweep_spec(read_yaml(path), f"sweep.yaml of parent run {info.parent_run_id}")
        except ConfigError as e:
            raise SweepError(str(e)) from None


# ---------------------------------------------------------------------- in-memory studies


def _when(ms: int | None):
    return dt.datetime.fromtimestamp(ms / 1000.0) if ms else None


def _frozen(values: list[float], params: dict, distributions: dict, trial: SweepTrial):
    t = optuna.trial.create_trial(values=values, params=params, distributions=distributions,
                                  user_attrs={"run_id": trial.run_id, "trial_id": trial.trial_id,
                                              "family": trial.family})
    t.datetime_start, t.datetime_complete = _when(trial.start_ms), _when(trial.end_ms)
    return t


def family_study(spec: SweepSpec, key: str, trials: list[SweepTrial], metric: str, mode: str):
    """An in-memory Optuna study of model entry `key`'s finished trials, valued by `metric`.

    Trial numbers follow the order the trials started. The `model` choice is left out: within a
    family it is constant. A value outside the file's space (a changed file) leaves its parameter out.
    """

    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    distributions = {n: d for n, d in space_distributions(spec, key).items() if n != "model"}
    for trial in trials:
        if trial.family != key or not trial.finished_with([metric]):
            continue
        point = {n: fitted(distributions[n], v) for n, v in trial_point(spec, key, trial).items() if n in distributions}
        point = {n: v for n, v in point.items() if v is not OUTSIDE}
        study.add_trial(_frozen([trial.value(metric)], point, {n: distributions[n] for n in point}, trial))
    return study


def front_objectives(spec: SweepSpec, trials: list[SweepTrial]) -> list[tuple[str, str]] | None:
    """The two objectives of the sweep's Pareto front: the sweep's own, or for one objective the metric
    against inference time (the study's practical question) when the trials measured it."""
    if spec.multi_objective:
        return list(zip(spec.objective_names, spec.objective_modes))
    latency = "infer_ms_per_img"
    if any(t.finished_with([spec.metric, latency]) for t in trials):
        return [(spec.metric, spec.mode), (latency, COST_METRICS[latency])]
    return None


def pareto_study(trials: list[SweepTrial], objectives: list[tuple[str, str]]):
    """An in-memory multi-objective study of every finished trial of every family (no parameters: the
    front is across families, whose spaces differ). `study.best_trials` is the Pareto front."""

    names = [n for n, _ in objectives]
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for _, m in objectives])
    for trial in trials:
        if trial.finished_with(names):
            study.add_trial(_frozen([trial.value(n) for n in names], {}, {}, trial))
    return study
