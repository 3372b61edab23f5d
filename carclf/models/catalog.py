"""What `carclf models` lists: every name a model can be given, and whether its weights are on this machine."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import timm
import torch
import torchvision.models as tvm

from carclf.core.errors import ConfigError, WeightsError
from carclf.models.registry import _architecture, is_network, list_models
from carclf.models.weights import _imagenet_file
from carclf.models.zoo import (
    LITE0_ARCH,
    _installed_torchvision_file,
    _timm_weights,
    _torchvision_weights,
    lite0_weights_file,
    parse_name,
    torchvision_models,
)
from carclf.shipped.car_classifier import is_zoo_name


def offline_weights(name: str) -> bool:
    """Whether `name`'s pretrained weights are on this machine (a cache, or a pip-installed file); a zoo
    model is not built to answer."""

    if not is_zoo_name(name):
        arch = _architecture(name)
        return arch.imagenet is not None and _imagenet_file(arch).is_file()
    parsed = parse_name(name, check=False)
    if parsed.zoo == "torchvision":

        file_name = _torchvision_weights(parsed).url.rsplit("/", 1)[-1]
        installed = _installed_torchvision_file(file_name)
        return (Path(torch.hub.get_dir()) / "checkpoints" / file_name).is_file() or installed is not None
    if parsed.model == LITE0_ARCH and parsed.tag in ("", "in1k") and lite0_weights_file() is not None:
        return True
    hub = _timm_weights(parsed)
    return hub is not None and hub.cached() is not None


def listing(pattern: str | None = None) -> list[tuple[str, str]]:
    """(name, where it comes from) of every nameable model whose name contains `pattern` (a glob if it has * or ?)."""

    rows = [(n, "carclf") for n in list_models()]
    rows += [(f"torchvision/{m}{member}", "torchvision") for m in torchvision_models()
             for member in ["", *(f".{w.name}" for w in tvm.get_model_weights(m))]]
    rows += [(f"timm/{m}", "timm") for m in timm.list_pretrained()]
    if not pattern:
        return rows
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    return [r for r in rows if fnmatch.fnmatch(r[0].lower(), glob.lower())]


def cli_models(args) -> int:
    """`carclf models [--filter PATTERN]`: what can be named, and which have their weights on this machine."""
    rows = listing(args.filter)
    shown = 0
    for name, source in rows:
        offline = _offline_mark(name)
        print(f"{name:<60} {source:<12} {offline}")
        shown += 1
    print(f"{shown} model(s); 'offline' = pretrained weights on this machine, else downloaded on first use "
          "(timm/<model> lists each pretrained tag; torchvision/<model>.<WEIGHTS> picks another member)")
    return 0


def _offline_mark(name: str) -> str:
    try:
        if not is_network(name):
            return ""
        return "offline" if offline_weights(name) else ""
    except (ConfigError, WeightsError):
        return ""
