"""Each family's default configuration: the trial a sweep runs first for it, to measure what tuning buys.

    trial = default_trial(spec, "svm_rbf")
    trial.config     # the Tune config: {"model": "svm_rbf", "svm_rbf.C": 1.0, ..., "baseline": True}
    trial.point      # the same configuration as Optuna params of the family's space (values inside it only)
    trial.outside    # what lies outside the searched space, e.g. "C=1.0 (outside range [10, 1000])"

The default is the RunConfig the family runs with no search: the sweep's `base` plus the family's
`config`, validated, with each searched field at that value and the family's constants as given.
For an SVM, scikit-learn's own defaults stand in for searched C, gamma and gamma_factor (C=1.0,
gamma 'scale', gamma_factor 1.0) unless `base` or the family's `config` sets them. A default outside
the searched range still runs (it is the baseline); it is then named in `outside` and not told to
the family's Optuna study, whose distributions cannot hold it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from carclf.config import RunConfig, set_dotted, validate_run_config
from sweeps.search.family import FamilySpace
from sweeps.search.spec import NetworkSpace, SVMSpace, SweepSpec
from sweeps.search.studies import OUTSIDE, _searched, describe_distribution, fitted, space_distributions, space_point

BASELINE = "baseline"  # the Tune config key that marks a family's default trial (tagged carclf.baseline)
# scikit-learn's SVC defaults, for the SVM fields a sweep searches (gamma_factor 1.0 is gamma 'scale').
SKLEARN_DEFAULTS = {"svm.C": 1.0, "svm.gamma": "scale", "svm.gamma_factor": 1.0}


@dataclass(frozen=True)
class DefaultTrial:
    family: str
    config: dict[str, Any]  # the Tune config, marked {"baseline": True}
    point: dict[str, Any]  # Optuna params of the family's space, without `model`; values outside it left out
    outside: list[str] = field(default_factory=list)  # searched values outside the space, as "C=1.0 (outside ...)"

    @property
    def in_space(self) -> bool:
        return not self.outside


class _Answers:
    """A stand-in for an Optuna trial that answers each suggestion from a fixed point, checked by nobody.

    Lets FamilySpace build the Tune config of a configuration that may lie outside its own space.
    """

    def __init__(self, point: dict[str, Any]):
        self.point = point
        self.asked: dict[str, Any] = {}

    def _answer(self, name: str, *args, **kwargs):
        self.asked[name] = self.point[name]
        return self.point[name]

    suggest_float = suggest_int = suggest_categorical = _answer


def _fields() -> dict[str, str]:
    return {**NetworkSpace.FIELDS, **SVMSpace.FIELDS}


def default_config(spec: SweepSpec, key: str) -> RunConfig:
    """The family's configuration with no search (scikit-learn's SVM defaults where the SVM's C, gamma or
    gamma_factor is searched and neither `base` nor the family's `config` sets it)."""
    cfg = spec.base_config(key)
    fields = _fields()
    for name, p in spec.model_params(key).items():
        dotted = fields[name]
        if not _searched(p):
            set_dotted(cfg, dotted, p.choices[0] if hasattr(p, "choices") else p)  # the family's constant
        elif dotted in SKLEARN_DEFAULTS and not _is_set(cfg, dotted):
            set_dotted(cfg, dotted, SKLEARN_DEFAULTS[dotted])
    return validate_run_config(cfg, f"default configuration of {key}")


def _is_set(cfg: dict, dotted: str) -> bool:
    section, name = dotted.split(".")
    return name in (cfg.get(section) or {})


def default_trial(spec: SweepSpec, key: str) -> DefaultTrial:
    """The family's default configuration as its first trial: the Tune config and its Optuna point."""
    cfg = default_config(spec, key)

    def value_of(dotted: str):
        section, name = dotted.split(".")
        return getattr(getattr(cfg, section), name)

    wanted = {n: v for n, v in space_point(spec, key, value_of).items() if n != "model"}
    answers = _Answers(wanted)
    returned = FamilySpace(spec, key)(answers)
    # As OptunaSearch builds a config: every drawn value by its name, then what the space returns.
    config = {**answers.asked, **returned, BASELINE: True}
    distributions = space_distributions(spec, key)
    point, outside = {}, []
    for name, value in wanted.items():
        inside = fitted(distributions[name], value)
        if inside is OUTSIDE:
            outside.append(f"{name.split('.', 1)[-1]}={value!r} (outside {describe_distribution(distributions[name])})")
        else:
            point[name] = inside
    return DefaultTrial(family=key, config=config, point=point, outside=outside)

