"""The typed, frozen configuration of one run: defaults in code, then YAML, then `--set` overrides.

    cfg = load_run_config("run.yaml", ["train.lr=0.01", "model.name=svm"])

Validation happens once, here; an invalid value raises `ConfigError` naming the
field and the allowed values.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# ConfigError lives in carclf.core.errors (so models.py need not import config); importable from here too.
from carclf.core.errors import ConfigError
from carclf.models.finetune import probe_problem, top_problem
from carclf.models.registry import check_model_name, is_network, list_models
from carclf.models.svm import gamma_factor_problem
from carclf.shipped.car_classifier import STACK_SEPARATOR


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    path: Path = Path("demo_data")  # any ImageFolder tree: one folder per class
    classes: list[str] | None = None  # a named list; None keeps all (or the top_k)
    top_k: int | None = Field(default=None, ge=1)  # keep the K most frequent classes (the study kept 10)
    min_images: int = Field(default=5, ge=1)  # classes with fewer images are left out, with a warning
    image_size: int = Field(default=224, ge=16, le=1024)  # the side images are resized to (square)
    cache_dir: Path | None = None  # decode and feature caches; None means carclf.core.paths.cache_root()


class SplitConfig(_Frozen):
    train: float = Field(default=0.7, gt=0, lt=1)
    val: float = Field(default=0.1, gt=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions train+val+test must sum to 1, got {total:.4f}")
        return self


class BalanceConfig(_Frozen):
    mode: Literal["none", "undersample", "oversample", "both"] = "both"
    samples_per_class: int | None = Field(default=None, ge=1)  # None: the median class count of the train split
    class_weights: bool = False  # weight the loss by inverse class frequency instead of (or on top of) resampling


class AugmentConfig(_Frozen):
    strength: float = Field(default=0.5, ge=0.0, le=1.0)  # 0 = no augmentation, 1 = the strongest preset


class ModelConfig(_Frozen):
    name: str = "simple_cnn"
    weights: str = "imagenet"  # 'imagenet' | 'none' | a path to a local state_dict
    # transfer learning: train the new head only, everything, or (probe) the head on cached features of the
    # frozen backbone, which runs once (carclf.training.probe), or (top) the last top_blocks blocks and the head on
    # cached activations of the frozen trunk below them (carclf.training.top)
    finetune: Literal["head", "full", "probe", "top"] = "head"
    top_blocks: int = Field(default=2, ge=1)  # finetune 'top': how many of the network's last blocks train

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        return check_model_name(v)

    @model_validator(mode="after")
    def _probe_has_a_backbone(self) -> "ModelConfig":
        if self.finetune == "probe":

            problem = probe_problem(self.name, self.weights)
            if problem:
                raise ValueError(problem)
        if self.finetune == "top":

            problem = top_problem(self.name, self.weights, self.top_blocks)
            if problem:
                raise ValueError(problem)
        return self


class TrainConfig(_Frozen):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=32, ge=1)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    patience: int = Field(default=3, ge=1)  # early stopping on validation macro-F1
    num_workers: int | None = Field(default=None, ge=0)  # loader workers and prefetch; None: auto (0 on CPU)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = True  # mixed precision, used on CUDA only
    # Split images (uint8) a run keeps on its device, all splits together; larger splits are streamed
    # from disk per batch. 2 GB holds about 13,000 images at 224 px: model10 is 167 MB, and four trials
    # sharing one GPU still leave most of its memory to the models.
    device_data_mb: int = Field(default=2048, ge=0)


class SVMConfig(_Frozen):
    # the CNN whose features the SVM reads: a name, or a stack of names ([a, b], written a+b) whose features are
    # read side by side, each from its own cache
    backbone: str = "vgg16"
    backbone_weights: str | tuple[str, ...] = "imagenet"  # one for all of a stack's members, or one per member
    features: Literal["gap", "penultimate"] = "gap"  # global-average-pooled or penultimate-layer features
    # logistic: a multinomial logistic regression (softmax probabilities), for many classes (carclf.models.svm)
    kernel: Literal["linear", "rbf", "logistic"] = "rbf"
    C: float = Field(default=1.0, gt=0)
    gamma: Union[Literal["scale"], float] = "scale"
    # RBF gamma = gamma_factor / (n_features * X.var()) with gamma 'scale': relative to the features' own
    # scale, so one range suits any backbone; 1.0 is scikit-learn's 'scale'. Only with gamma 'scale'.
    gamma_factor: float = Field(default=1.0, gt=0)
    linear_impl: Literal["svc", "liblinear"] = "svc"  # liblinear = LinearSVC, faster on many samples
    # SVM probabilities: sigmoids on cross-validated decision values (one SVM fit per fold and one on all), or
    # on a held-out share of the training split (one fit); the logistic kernel has its own softmax
    calibration: Literal["cv", "holdout"] = "cv"
    augment_copies: int = Field(default=1, ge=1)  # feature passes over the (balanced) train split

    @field_validator("gamma", mode="before")
    @classmethod
    def _scale_or_number(cls, v):
        # One message for both branches of the union, not "should be 'scale'" and "should be a number"
        if isinstance(v, str) and v != "scale":
            try:
                return float(v)
            except ValueError:
                raise ValueError("gamma must be 'scale' or a positive number") from None
        return v

    @field_validator("backbone", mode="before")
    @classmethod
    def _stack_as_text(cls, v):
        return STACK_SEPARATOR.join(map(str, v)) if isinstance(v, (list, tuple)) else v

    @field_validator("backbone")
    @classmethod
    def _network_backbone(cls, v: str) -> str:
        for name in backbone_members(v):
            try:
                network = is_network(name)
            except ConfigError as e:  # named as what it is here: a backbone
                raise ValueError(str(e).replace("unknown model", "unknown backbone", 1)) from None
            if not network:
                networks = [m for m in list_models() if is_network(m)]
                raise ValueError(f"backbone {name!r} is not a network; allowed: {', '.join(networks)}, or a zoo "
                                 "model torchvision/<model> or timm/<model>")
        if len(set(backbone_members(v))) != len(backbone_members(v)):
            raise ValueError(f"a stack names each backbone once, got {v!r}")
        return v

    @model_validator(mode="after")
    def _weights_per_member(self) -> "SVMConfig":
        members = backbone_members(self.backbone)
        if not isinstance(self.backbone_weights, str) and len(self.backbone_weights) != len(members):
            raise ValueError(f"svm.backbone_weights lists {len(self.backbone_weights)} weights for "
                             f"{len(members)} backbone(s) {self.backbone!r}: give one per backbone, or one for all")
        return self

    def members(self) -> list[tuple[str, str]]:
        """(backbone, weights) of each backbone the SVM reads: one, or each member of a stack."""
        names = backbone_members(self.backbone)
        weights = self.backbone_weights
        return list(zip(names, [weights] * len(names) if isinstance(weights, str) else weights))

    @field_validator("gamma")
    @classmethod
    def _positive_gamma(cls, v):
        if not isinstance(v, str) and v <= 0:
            raise ValueError("gamma must be 'scale' or a positive number")
        return v

    @model_validator(mode="after")
    def _factor_scales_scale(self) -> "SVMConfig":
        problem = gamma_factor_problem(self.gamma, self.gamma_factor)
        if problem:
            raise ValueError(problem)
        return self


def backbone_members(backbone: str) -> list[str]:
    """The networks of `svm.backbone`: itself, or a stack's members (`a+b`)."""

    return backbone.split(STACK_SEPARATOR)


class TrackingConfig(_Frozen):
    experiment: str = "carclf"
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite at the project root
    run_name: str | None = None
    log_model: bool = True


class RunConfig(_Frozen):
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    balance: BalanceConfig = BalanceConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    svm: SVMConfig = SVMConfig()
    tracking: TrackingConfig = TrackingConfig()
    seed: int = 0

    @property
    def is_svm(self) -> bool:
        return self.model.name == "svm"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set d['a']['b'] = value for key 'a.b', creating nested dicts on the way."""
    parts = key.split(".")
    node = d
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """['train.lr=0.01', 'data.classes=[a, b]'] -> nested dict; values are parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.01")
        value = yaml.safe_load(raw) if raw.strip() else None
        _check_expanded_size(value, f"--set {key.strip()}")
        set_dotted(out, key.strip(), value)
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, unreadable or non-mapping file raises ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    _check_expanded_size(data, f"config file {p}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


# YAML aliases let a few lines expand to billions of values (an "alias bomb"); a config has a few hundred.
MAX_YAML_VALUES = 100_000
# Values in messages are shortened: a nested or long value is shown by its start.
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 80, 80


def _check_expanded_size(data: Any, source: str) -> None:
    """Refuse a value whose aliases expand to more than MAX_YAML_VALUES; the walk stops at the limit."""
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_VALUES:
            raise ConfigError(f"{source} expands to more than {MAX_YAML_VALUES:,} values (YAML anchors and "
                              "aliases repeated inside each other); write the values out instead")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def format_validation_error(err: ValidationError, source: str = "config") -> str:
    """One line per problem, naming the field. A union told apart by a tag written `<form>` (see
    sweeps/search/spec.py) reports the branch the value's form picked: "(as a range)" instead of one line per branch."""
    lines = [f"invalid {source}:"]
    for e in err.errors():
        parts = [str(x) for x in e["loc"]]
        forms = [p[1:-1] for p in parts if p.startswith("<") and p.endswith(">")]
        field = ".".join(p for p in parts if not (p.startswith("<") and p.endswith(">")))
        if not field:  # a check across fields: its message names them
            lines.append(f"  {e['msg'].removeprefix('Value error, ')}")
            continue
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {_SHOWN.repr(value)})"
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {message}{shown}" + "".join(f" (read as {form})" for form in forms))
    return "\n".join(lines)


def validate_run_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then `key=value` overrides; validated once."""
    data = read_yaml(path) if path is not None else {}
    data = deep_merge(data, parse_overrides(overrides))
    source = str(path) if path is not None else "config"
    return validate_run_config(data, source)
