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

import logging
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline
from torch import nn

from carclf.core.errors import ConfigError, WeightsError
from carclf.models.records import FEATURE_MODES, FINETUNE_MODES, Architecture, InputConfig
from carclf.models.registry import MODELS, _architecture, image_size_problem, is_network
from carclf.models.weights import resolve_weights
from carclf.shipped.car_classifier import FeatureExtractor, feature_trunk, is_zoo_name, set_head

log = logging.getLogger(__name__)

def _linear_head(model: nn.Module, arch: Architecture) -> nn.Linear:
    return model.get_submodule(arch.network.head)


def _set_head(model: nn.Module, arch: Architecture, num_classes: int) -> None:
    set_head(model, arch.network.head, num_classes)


def _load_into(model: nn.Module, arch: Architecture, state: dict, source: str) -> None:
    """Strict load; a file whose head has other rows than the model's (a fine-tuned model) resizes the head first.
    A file in another naming the architecture knows (the lite0 wheel's) is mapped onto the model's names first."""
    if arch.adapt_state is not None:
        state = arch.adapt_state(state)
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
    problem = image_size_problem(name, size)
    if problem:
        raise ConfigError(problem)
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
    head_inputs = _linear_head(model, arch).in_features  # read before a zoo model's trunk drops its head
    trunk = feature_trunk(name, model, features)
    if (features == "penultimate" and arch.network.penultimate is not None) or is_zoo_name(name):
        dim = head_inputs  # the classifier's input: a zoo model's pooled pre-logits in either mode
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


