"""The typed sweep definition: what a sweep file may say, validated (naming the field) before Ray starts.

    spec = load_sweep_spec("sweeps/quickstart.yaml")
    params = spec.space_fn()(optuna_trial)          # define-by-run: the model, then only its parameters
    cfg = spec.run_config(params)                   # a carclf RunConfig for that trial

A parameter is a constant, a list of choices or a range (sweeps.search.params). An SVM entry may
search its backbone (`backbone: {choices: [mobilenet_v2, resnet18]}`); the choices are scored before the trials
(LogME, `rank_backbones`, sweeps.run.ranking).

One objective (`metric: val_f1_macro`, `mode: max`) or two (`metric: [val_f1_macro, infer_ms_per_img]`,
`mode: [max, min]`; the second may also be `size_mb` or another validation metric): Optuna then
searches for the Pareto front, while ASHA, the running best, the report's selection and promote
keep to the first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from carclf.config import (
    ConfigError,
    RunConfig,
    backbone_members,
    deep_merge,
    format_validation_error,
    read_yaml,
    set_dotted,
    validate_run_config,
)
from carclf.core.errors import SweepError
from carclf.core.paths import check_sweep_name
from carclf.models.registry import image_size_problem, is_network, min_image_size

# The parameter types and the families' spaces (re-exported: sweep code imports them from here).
from sweeps.search.params import (  # noqa: F401
    RBF_ONLY,
    Choice,
    FloatRange,
    GammaRange,
    IntRange,
    NetworkSpace,
    SharedSpace,
    SVMSpace,
    _candidates,
    _is_searched,
    _sample,
    _Space,
    _Strict,
)

# Metrics every trial reports on the validation split, each epoch (networks) and at the end.
METRICS = ("val_accuracy", "val_balanced_accuracy", "val_f1_macro", "val_precision_macro", "val_recall_macro",
           "val_f1_weighted", "val_precision_weighted", "val_recall_weighted")
# What else a trial reports at its end and a sweep may optimise as a further objective, with the usual direction:
# inference time per image on the validation split (ms), and the model's size (MB, backbone included).
COST_METRICS = {"infer_ms_per_img": "min", "size_mb": "min"}
MAX_OBJECTIVES = 2


class Resources(_Strict):
    cpu: float = Field(default=1.0, gt=0)
    gpu: float = Field(default=0.0, ge=0)  # fractions pack several small trials on one GPU
    memory_gb: float = Field(default=0.0, ge=0)  # Ray's `memory` resource (GiB) a trial reserves; 0: none

    @field_validator("gpu")
    @classmethod
    def _fraction_or_whole(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"gpu above 1 must be a whole number, got {v}")
        return v

    def as_ray(self) -> dict[str, float]:
        bundle = {"CPU": self.cpu, "GPU": self.gpu, "memory": float(round(self.memory_gb * 1024 ** 3))}
        return {k: v for k, v in bundle.items() if v or k == "CPU"}


class ModelEntry(_Strict):
    model: str | None = None  # a registered model (carclf.models.registry.list_models()); default: the entry's key
    config: dict[str, Any] = {}  # RunConfig overrides for this model, e.g. {svm: {backbone: mobilenet_v2}}
    space: dict[str, Any] = {}  # NetworkSpace or SVMSpace fields, checked once the model's kind is known
    resources: Resources = Resources()


class ASHA(_Strict):
    """Asynchronous successive halving on the per-epoch metric; applies to network trials only."""

    type: Literal["asha"] = "asha"
    grace_period: int = Field(default=1, ge=1)  # epochs every network trial gets before it can be stopped
    reduction_factor: float = Field(default=2.0, gt=1)
    max_t: int | None = Field(default=None, ge=1)  # None: the most epochs any network trial can run


class Seeds(_Strict):
    sampler: int = 0  # Optuna's TPESampler: the same seed proposes the same trials
    run: int = 0  # RunConfig.seed of every trial (split, init, augmentation)


class Objective(_Strict):
    name: str
    mode: Literal["max", "min"]


class RankBackbones(_Strict):
    """Before the trials, score each SVM family's searched backbones (LogME, sweeps.run.ranking)."""

    score: bool = True  # their train features are extracted for the trials anyway; scoring them takes seconds
    keep: int | None = Field(default=None, ge=1)  # search only the best k backbones of each family; None: all

    @model_validator(mode="after")
    def _keep_needs_scores(self) -> "RankBackbones":
        if self.keep is not None and not self.score:
            raise ValueError("keep picks the best-scored backbones: it needs score: true")
        return self


class SweepSpec(_Strict):
    name: str | None = None  # default: the file's stem
    description: str = ""
    base: dict[str, Any] = {}  # a RunConfig (data, split, balance, ...) shared by all trials
    models: dict[str, ModelEntry] = Field(min_length=1)
    space: SharedSpace = SharedSpace()
    # The first objective: ASHA, the running best, the report's selection and promote use it.
    metric: str = "val_f1_macro"
    mode: Literal["max", "min"] = "max"
    # Every objective, first = (metric, mode), when the file names several (`metric: [a, b]`, `mode: [max, min]`);
    # empty for a single objective.
    objectives: tuple[Objective, ...] = ()
    num_samples: int = Field(default=8, ge=1)
    max_concurrent_trials: int = Field(default=2, ge=1)
    time_budget_s: float | None = Field(default=None, gt=0)
    scheduler: ASHA | None = ASHA()
    seeds: Seeds = Seeds()
    n_startup_trials: int | None = Field(default=None, ge=1)  # random trials before TPE, split over the families
    max_failures: int = Field(default=1, ge=0)  # retries of a trial that raised
    tracking_server: Literal["auto", "always", "never"] = "auto"  # auto: a server when the store is local sqlite
    warm_cache: bool = True  # decode every image once on the driver before trials start
    rank_backbones: RankBackbones = RankBackbones()  # searched backbones scored before the trials (sweeps.run.ranking)
    warm_features: bool = True  # extract the SVMs' and probes' features once on the driver, every core (sweeps.run.prefetch)

    @model_validator(mode="before")
    @classmethod
    def _objective_lists(cls, data: Any) -> Any:
        """`metric: [a, b]` with `mode: [max, min]` become metric a, mode max and the objectives (a, max), (b, min)."""
        if not isinstance(data, dict) or not isinstance(data.get("metric"), list):
            if isinstance(data, dict) and isinstance(data.get("mode"), list):
                raise ValueError("mode is a list, so metric must be a list of the same length")
            return data
        names, modes = data["metric"], data.get("mode")
        if not isinstance(modes, list) or len(modes) != len(names):
            raise ValueError(f"metric lists {len(names)} objectives: mode must list a direction (max or min) for each, "
                             f"e.g. mode: [max, min]; got {modes!r}")
        if not 1 <= len(names) <= MAX_OBJECTIVES:
            raise ValueError(f"metric may list 1 to {MAX_OBJECTIVES} objectives, got {len(names)}")
        out = {**data, "metric": names[0], "mode": modes[0]}
        if len(names) > 1:
            out["objectives"] = [{"name": n, "mode": m} for n, m in zip(names, modes)]
        return out

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        try:
            return v if v is None else check_sweep_name(v, "name")
        except SweepError as e:
            raise ValueError(str(e)) from None

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        if v not in METRICS:
            raise ValueError(f"unknown metric {v!r}; allowed: {', '.join(METRICS)}")
        return v

    @model_validator(mode="after")
    def _known_objectives(self) -> "SweepSpec":
        if not self.objectives:
            return self
        first = self.objectives[0]
        if (first.name, first.mode) != (self.metric, self.mode):
            raise ValueError(f"objectives must start with the metric ({self.metric}, {self.mode})")
        names = [o.name for o in self.objectives]
        allowed = (*METRICS, *COST_METRICS)
        for name in names[1:]:
            if name not in allowed:
                raise ValueError(f"metric: unknown objective {name!r}; allowed: {', '.join(allowed)}")
        if len(set(names)) != len(names):
            raise ValueError(f"metric: objectives must be distinct, got {names}")
        return self

    @field_validator("models")
    @classmethod
    def _keys(cls, v: dict) -> dict:
        for key in v:
            if not key or any(c in key for c in "./ "):
                raise ValueError(f"model key {key!r} may not be empty or hold '.', '/' or spaces")
        return v

    # ------------------------------------------------------------------ derived, after validation

    @property
    def objective_names(self) -> list[str]:
        """Every objective's name, first the metric: what each trial reports to Tune at its end."""
        return [o.name for o in self.objectives] or [self.metric]

    @property
    def objective_modes(self) -> list[str]:
        return [o.mode for o in self.objectives] or [self.mode]

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    def model_name(self, key: str) -> str:
        return self.models[key].model or key

    def is_network(self, key: str) -> bool:
        return is_network(self.model_name(key))

    def model_space(self, key: str) -> _Space:
        cls = NetworkSpace if self.is_network(key) else SVMSpace
        return cls.model_validate(self.models[key].space)

    def model_params(self, key: str) -> dict[str, Any]:
        """The model's own parameters plus the shared ones it does not set itself."""
        own = self.model_space(key)
        shared = {k: v for k, v in self.space.params().items() if getattr(own, k) is None}
        params = {**own.params(), **shared}
        if isinstance(own, SVMSpace):
            # The kernel decides whether gamma is sampled, so it is always known (the base's if not searched).
            params.setdefault("kernel", validate_run_config(self.base_config(key)).svm.kernel)
            if "rbf" not in _candidates(params["kernel"]):
                for name in RBF_ONLY:
                    params.pop(name, None)
        return params

    def base_config(self, key: str) -> dict[str, Any]:
        """The RunConfig dict of model `key` before sampling: base, the model's overrides, seed and name."""
        # A deep copy: deep_merge shares untouched sections with `base`, and callers set fields in place.
        cfg = deep_merge(copy.deepcopy(self.base), copy.deepcopy(self.models[key].config))
        return deep_merge(cfg, {"model": {"name": self.model_name(key)}, "seed": self.seeds.run})

    def network_epochs(self) -> dict[str, int]:
        """The most epochs each network family's trials can run."""
        out = {}
        for key in self.models:
            if self.is_network(key):
                p = self.model_space(key).epochs
                if p is None:
                    p = validate_run_config(self.base_config(key)).train.epochs
                out[key] = max(int(x) for x in _candidates(p))
        return out

    def max_epochs(self) -> int:
        """The most epochs a network trial can run: ASHA's max_t unless the file sets it."""
        return max(self.network_epochs().values(), default=1)

    def space_fn(self) -> "SearchSpace":
        return SearchSpace(self)

    def run_config(self, params: dict[str, Any]) -> RunConfig:
        """The trial's RunConfig from sampled `params` ({'model': key, '<key>.<field>': value})."""
        key = params["model"]
        cfg = self.base_config(key)
        fields = {**NetworkSpace.FIELDS, **SVMSpace.FIELDS}
        prefix = f"{key}."
        for name, value in params.items():
            if name.startswith(prefix) and name[len(prefix):] in fields:
                set_dotted(cfg, fields[name[len(prefix):]], value)
        return validate_run_config(cfg, f"trial config of {key}")


class SearchSpace:
    """Optuna define-by-run space: picks the model, then samples only that model's parameters.

    A plain object (not a closure) so Ray can pickle it with the searcher's state for `--resume`.
    """

    def __init__(self, spec: SweepSpec):
        self.spec = spec
        self.keys = list(spec.models)
        self.params = {key: spec.model_params(key) for key in self.keys}

    def __call__(self, trial) -> dict[str, Any]:
        key = trial.suggest_categorical("model", self.keys) if len(self.keys) > 1 else self.keys[0]
        out: dict[str, Any] = {"model": key}
        params = self.params[key]
        kernel = _sample(params["kernel"], trial, f"{key}.kernel") if "kernel" in params else None
        if kernel is not None:
            out[f"{key}.kernel"] = kernel
        for field, p in params.items():
            if field == "kernel" or (field in RBF_ONLY and kernel not in (None, "rbf")):
                continue
            out[f"{key}.{field}"] = _sample(p, trial, f"{key}.{field}")
        return out


# ---------------------------------------------------------------------- loading and checks


def _check_model(spec: SweepSpec, key: str, source: str) -> None:
    """Every constant, choice and range end of the model's space must make a valid RunConfig."""
    where = f"models.{key}"
    try:
        base = validate_run_config(spec.base_config(key), f"{source}: {where} (base + config)")
    except ConfigError as e:
        raise ConfigError(f"{e}\n  (fields of `base` and of `{where}.config`; `{where}.model` picks the model)") from None
    kind = NetworkSpace if spec.is_network(key) else SVMSpace
    try:
        space = kind.model_validate(spec.models[key].space)
    except ValidationError as e:
        allowed = ", ".join(kind.FIELDS)
        msg = format_validation_error(e, f"{source}: {where}.space ({base.model.name} is searched over: {allowed})")
        raise ConfigError(msg.replace("\n  ", f"\n  {where}.space.")) from None
    _check_image_size(base, key, source)
    fields = {**kind.FIELDS}
    for field, p in {**spec.space.params(), **space.params()}.items():
        for value in _candidates(p):
            cfg = spec.base_config(key)
            set_dotted(cfg, fields[field], value)
            try:
                validate_run_config(cfg)
            except ConfigError as e:
                origin = f"{where}.space.{field}" if getattr(space, field) is not None else f"space.{field}"
                detail = str(e).splitlines()[-1].strip()
                raise ConfigError(f"invalid {source}:\n  {origin}: {value!r} is not allowed for {key} ({detail})") from None


def _check_image_size(cfg: RunConfig, key: str, source: str) -> None:
    """The family's images must be large enough for its network (an SVM: for its feature backbone)."""

    field, net = ("svm.backbone", cfg.svm.backbone) if cfg.is_svm else ("model", cfg.model.name)
    try:
        need = max(min_image_size(n) for n in backbone_members(net))  # a stack: its most demanding member
    except ConfigError as e:
        raise ConfigError(f"invalid {source}:\n  models.{key}: {field}: {e}") from None
    if cfg.data.image_size < need:
        raise ConfigError(f"invalid {source}:\n  models.{key}: data.image_size {cfg.data.image_size} is below the "
                          f"minimum of {net} ({need} px); set base.data.image_size (or models.{key}.config.data."
                          f"image_size) to at least {need}")
    for problem in filter(None, (image_size_problem(n, cfg.data.image_size) for n in backbone_members(net))):
        raise ConfigError(f"invalid {source}:\n  models.{key}: {problem}")  # a network that reads one size only


def _check_scheduler(spec: SweepSpec, source: str) -> None:
    """ASHA's grace period must fit in the epochs a network trial runs (Ray asserts it once started)."""
    epochs = spec.network_epochs()
    if spec.scheduler is None or not epochs:
        return
    grace, max_t = spec.scheduler.grace_period, spec.scheduler.max_t
    if max_t is not None and grace > max_t:
        raise ConfigError(f"invalid {source}:\n  scheduler.grace_period: {grace} exceeds scheduler.max_t {max_t}")
    if max_t is None and grace > max(epochs.values()):
        runs = ", ".join(f"{key}: {n}" for key, n in epochs.items())
        raise ConfigError(f"invalid {source}:\n  scheduler.grace_period: {grace} is above the most epochs any network "
                          f"trial runs ({runs}); lower scheduler.grace_period to at most {max(epochs.values())}, or "
                          "raise train.epochs (or the models' space.epochs)")


def validate_sweep_spec(data: dict[str, Any], source: str = "sweep") -> SweepSpec:
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
    try:
        validate_run_config(spec.base, f"{source}: base")
    except ConfigError as e:
        raise ConfigError(str(e).replace("\n  ", "\n  base.")) from None
    for key in spec.models:
        _check_model(spec, key, source)
    _check_scheduler(spec, source)
    return spec


def load_sweep_spec(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; any problem raises ConfigError naming the file and the field."""
    return validate_sweep_spec(read_yaml(path), str(path))


def describe_space(spec: SweepSpec) -> dict[str, Any]:
    """The search space as plain data (logged to the parent run as search_space.json)."""
    out = {}
    for key in spec.models:
        params = {}
        for field, p in spec.model_params(key).items():
            params[field] = p.model_dump() if _is_searched(p) else p
        out[key] = {"model": spec.model_name(key), "resources": spec.models[key].resources.model_dump(),
                    "params": params}
    return out
