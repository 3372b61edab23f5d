"""Which fine-tuning modes a network supports: its blocks (`finetune: top` trains the last k), a pretrained
backbone to freeze (`probe`, `top`). Checked by the run configuration, before any weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

from carclf.models.registry import MODELS, _architecture, is_network


def probe_problem(name: str, weights: str) -> str | None:
    """Why `model.finetune: probe` cannot apply to network `name` with `weights`, or None if it can."""

    if not is_network(name):
        return (f"model.finetune 'probe' trains a network's head on its frozen backbone; {name!r} is not a network "
                "(an SVM reads its features through svm.backbone)")
    # A state_dict file, or a torchvision architecture (ImageNet weights; 'none' freezes a random init, as `head` does)
    from_file = str(weights).lower() not in ("imagenet", "none")
    if not from_file and _architecture(name).imagenet is None:
        return (f"model.finetune 'probe' needs a pretrained backbone to freeze; {name} has none with "
                f"model.weights={weights!r}: use finetune 'head' or 'full', or set model.weights to a state_dict path")
    return None


_FEATURES_FAMILY = (tvm.MobileNetV2, tvm.MobileNetV3, tvm.EfficientNet)
_POOLED_FAMILY = (tvm.VGG, tvm.AlexNet)
_TIMM_CONTAINERS = ("blocks", "stages", "layers")


@dataclass(frozen=True)
class Blocks:
    """A network's blocks in forward order: `entries[i]` is the first module block i runs (the cut hooks it)."""

    blocks: list[nn.Module]
    entries: list[nn.Module]
    kind: str  # how the network goes on after its blocks: 'features', 'resnet' or 'timm'


def find_blocks(model: nn.Module) -> Blocks | None:
    """The block sequence of `model`, found by its type; None for a network carclf cannot cut."""
    if isinstance(model, _FEATURES_FAMILY):
        blocks = list(model.features)
        return Blocks(blocks, blocks, "features")
    if isinstance(model, _POOLED_FAMILY):
        groups = _between_pools(list(model.features))
        return Blocks([nn.Sequential(*g) for g in groups], [g[0] for g in groups], "features")
    if isinstance(model, tvm.ResNet):
        blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
        return Blocks(blocks, blocks, "resnet")
    if type(model).__module__.startswith("timm.") and hasattr(model, "forward_head"):
        blocks = _timm_blocks(model)
        return Blocks(blocks, blocks, "timm") if blocks else None
    return None


def _between_pools(layers: list[nn.Module]) -> list[list[nn.Module]]:
    """VGG's and AlexNet's conv blocks: the layers up to and including each max-pool."""
    groups, current = [], []
    for layer in layers:
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def _timm_blocks(model: nn.Module) -> list[nn.Module]:
    for name in _TIMM_CONTAINERS:
        container = getattr(model, name, None)
        if isinstance(container, (nn.Sequential, nn.ModuleList)) and len(container) > 1:
            return list(container)
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    return layers if all(isinstance(x, nn.Module) for x in layers) else []


def no_blocks_message(name: str) -> str:
    return (f"model.finetune 'top' trains a network's last blocks; {name} has no block sequence carclf knows "
            "(torchvision MobileNet, EfficientNet, ResNet, VGG, AlexNet; timm models with blocks or stages): "
            "use finetune 'probe', 'head' or 'full'")


def too_many_message(name: str, k: int, n: int) -> str:
    return f"model.top_blocks={k}: {name} has {n} blocks, so top_blocks must be 1 to {n}"


def top_problem(name: str, weights: str, k: int) -> str | None:
    """Why `model.finetune: top` with `model.top_blocks: k` cannot apply to network `name`, or None if it can."""

    if not is_network(name):
        return (f"model.finetune 'top' trains a network's last blocks on its frozen trunk; {name!r} is not a "
                "network")
    n = block_count(name)
    if n is None:
        return no_blocks_message(name)
    if k > n:
        return too_many_message(name, k, n)
    from_file = str(weights).lower() not in ("imagenet", "none")
    if not from_file and MODELS[name].factory().imagenet is None:
        return (f"model.finetune 'top' needs a pretrained trunk to freeze; {name} has none with "
                f"model.weights={weights!r}: use finetune 'full', or set model.weights to a state_dict path")
    return None


_BLOCK_COUNTS: dict[str, int | None] = {}


def block_count(name: str) -> int | None:
    """How many blocks network `name` has (built on the meta device: no memory, no weights), None if it has none."""
    if name not in _BLOCK_COUNTS:

        with torch.device("meta"):
            model = _architecture(name).network.make()
        found = find_blocks(model)
        _BLOCK_COUNTS[name] = None if found is None else len(found.blocks)
    return _BLOCK_COUNTS[name]
