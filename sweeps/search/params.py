"""What a sweep file's parameters may be, and each model family's space of them.

A parameter is a constant (`epochs: 3`), a list of choices (`{choices: [16, 32]}`) or a range
(`{low: 1e-4, high: 1e-2, log: true}`; integer bounds give an integer range). `NetworkSpace` and
`SVMSpace` name the fields a family may search and the RunConfig path each one sets (`FIELDS`);
`SharedSpace` holds those every family may search. `sweeps.search.spec` builds sweeps from them.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from carclf.shipped.car_classifier import STACK_SEPARATOR


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FloatRange(_Strict):
    low: float
    high: float
    log: bool = False  # log-uniform: learning rates, C and gamma span decades

    @model_validator(mode="after")
    def _ordered(self) -> "FloatRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def candidates(self) -> list:
        return [self.low, self.high]


class IntRange(_Strict):
    low: int
    high: int
    step: int = Field(default=1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> "IntRange":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("a log integer range needs low > 0 and step 1")
        return self

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def candidates(self) -> list:
        return [self.low, self.high]


class Choice(_Strict):
    choices: list[Union[bool, int, float, str, None]] = Field(min_length=1)

    @field_validator("choices")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if len({repr(x) for x in v}) != len(v):
            raise ValueError(f"choices must be distinct, got {v}")
        return v

    def suggest(self, trial, name: str):
        if len(self.choices) == 1:
            return self.choices[0]
        return trial.suggest_categorical(name, self.choices)

    def candidates(self) -> list:
        return list(self.choices)


class GammaRange(FloatRange):
    scale: bool = False  # also offer sklearn's 'scale' (1 / (n_features * X.var())) next to the range

    def suggest(self, trial, name: str):
        if self.scale and trial.suggest_categorical(f"{name}_scale", [True, False]):
            return "scale"
        return super().suggest(trial, name)

    def candidates(self) -> list:
        return super().candidates() + (["scale"] if self.scale else [])


def _form(value) -> str:
    """How a parameter is written: a mapping with `choices`, another mapping (a range), or a constant.

    Validating only that branch of the union makes the error name the real problem ("low must be below
    high") instead of one complaint per branch ("Input should be a valid number").
    """
    if isinstance(value, Choice) or (isinstance(value, dict) and "choices" in value):
        return "<choices>"
    return "<a range>" if isinstance(value, (dict, FloatRange, IntRange)) else "<a constant>"


def _choice_form(value) -> str:
    """The same for a parameter that has no range: every mapping is a list of choices."""
    return "<choices>" if isinstance(value, (dict, Choice)) else "<a constant>"


def _param(constant, ranged=None):
    """A constant, a Choice or (if `ranged` is given) a range, told apart by the value's form."""
    branches = [Annotated[Choice, Tag("<choices>")], Annotated[constant, Tag("<a constant>")]]
    if ranged is not None:
        branches.insert(0, Annotated[ranged, Tag("<a range>")])
    return Annotated[Union[tuple(branches)], Discriminator(_form if ranged is not None else _choice_form)]


FloatParam = _param(float, FloatRange)
IntParam = _param(int, IntRange)


def _is_searched(p) -> bool:
    return isinstance(p, (FloatRange, IntRange, Choice))


def _candidates(p) -> list:
    return p.candidates() if _is_searched(p) else [p]


def _sample(p, trial, name: str):
    return p.suggest(trial, name) if _is_searched(p) else p


class _Space(_Strict):
    """Fields map onto RunConfig paths (FIELDS); None leaves the base config's value."""

    FIELDS: ClassVar[dict[str, str]] = {}
    augment_strength: FloatParam | None = None
    samples_per_class: IntParam | None = None

    def params(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS if getattr(self, k) is not None}


_SHARED = {"augment_strength": "augment.strength", "samples_per_class": "balance.samples_per_class"}


class SharedSpace(_Space):
    """Searched for every model unless the model's own space sets the field."""

    FIELDS: ClassVar[dict[str, str]] = _SHARED


class NetworkSpace(_Space):
    FIELDS: ClassVar[dict[str, str]] = {"lr": "train.lr", "epochs": "train.epochs", "batch_size": "train.batch_size",
              "finetune": "model.finetune", "weight_decay": "train.weight_decay", "optimizer": "train.optimizer",
              "top_blocks": "model.top_blocks", **_SHARED}
    lr: FloatParam | None = FloatRange(low=1e-4, high=1e-2, log=True)
    epochs: IntParam | None = None
    batch_size: IntParam | None = None
    finetune: _param(Literal["head", "full", "probe", "top"]) | None = None
    weight_decay: FloatParam | None = None
    optimizer: _param(Literal["adamw", "sgd"]) | None = None
    top_blocks: IntParam | None = None  # finetune 'top': how many of the last blocks train (carclf.training.top)


class SVMSpace(_Space):
    FIELDS: ClassVar[dict[str, str]] = {"kernel": "svm.kernel", "C": "svm.C", "gamma": "svm.gamma",
                                        "gamma_factor": "svm.gamma_factor", "backbone": "svm.backbone", **_SHARED}
    kernel: _param(Literal["linear", "rbf", "logistic"]) | None = None
    # A searched backbone: each one's features are extracted once and shared by every trial that picks it.
    # A choice may be a stack, [a, b] (written a+b, as svm.backbone writes it).
    backbone: _param(str) | None = None
    C: FloatParam | None = FloatRange(low=0.01, high=100.0, log=True)
    gamma: _param(Union[Literal["scale"], float], GammaRange) | None = None  # only used by rbf trials
    gamma_factor: FloatParam | None = None  # times the 'scale' gamma (carclf.models.svm); rbf trials only

    @field_validator("backbone", mode="before")
    @classmethod
    def _stacks_as_text(cls, v):
        def text(x):
            return STACK_SEPARATOR.join(map(str, x)) if isinstance(x, (list, tuple)) else x

        if isinstance(v, dict) and isinstance(v.get("choices"), list):
            return {**v, "choices": [text(x) for x in v["choices"]]}
        return text(v)

    @model_validator(mode="after")
    def _gamma_or_factor(self) -> "SVMSpace":
        if self.gamma_factor is not None and self.gamma not in (None, "scale"):
            raise ValueError("gamma and gamma_factor: search one of them; gamma_factor scales gamma 'scale' "
                             "(drop gamma, or set it to scale)")
        return self


RBF_ONLY = ("gamma", "gamma_factor")  # SVM settings the linear and logistic kernels ignore: never drawn for them
