"""Network weights: 'imagenet' (torchvision's file, from torch's hub cache or a pip-installed copy; a
download only where the network allows it, never a silent random fall-back), 'none' (random init) or a
local state_dict; and the sha256 that identifies them (feature-cache keys, predict's check).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from carclf.core.errors import ConfigError, WeightsError
from carclf.core.files import file_sha256
from carclf.models.records import Architecture
from carclf.models.registry import _architecture, is_network
from carclf.models.zoo import HubWeights, no_pretrained
from carclf.shipped.car_classifier import is_zoo_name, load_state_dict

log = logging.getLogger(__name__)


def _load_state_dict_file(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (expected 'imagenet', 'none' or a state_dict path)")
    try:
        if path.suffix == ".safetensors":  # the Hugging Face hub's format (timm's pretrained files)
            from safetensors.torch import load_file  # heavy: loaded for a .safetensors file only

            return dict(load_file(str(path)))
        return load_state_dict(str(path))
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise WeightsError(f"cannot read a state_dict from {path}: {type(e).__name__}: {e}") from e


def _imagenet_file(arch: Architecture) -> Path:
    """Where the ImageNet file is: torch's hub cache, else a pip-installed copy; the cache path if neither.
    A timm model's file: the Hugging Face (or torch hub) cache, else a pip-installed copy."""

    if isinstance(arch.imagenet, HubWeights):
        found = arch.imagenet.cached() or (arch.offline_file() if arch.offline_file is not None else None)
        return found or arch.imagenet.missing_path()
    path = Path(torch.hub.get_dir()) / "checkpoints" / arch.imagenet.url.rsplit("/", 1)[-1]
    if not path.is_file() and arch.offline_file is not None:
        path = arch.offline_file() or path
    return path


def _hub_weights(name: str, arch: Architecture) -> tuple[dict, str]:
    """A timm model's pretrained file: from its cache, a pip-installed copy, else downloaded into the cache."""
    path = _imagenet_file(arch)
    if not path.is_file():
        try:
            path = arch.imagenet.download()
        except Exception as e:  # offline, proxy, a repository gone: the user must supply the file
            raise WeightsError(f"pretrained weights for {name} are not available: not in the cache and the "
                               f"download failed ({type(e).__name__}: {str(e)[:200]}). Put "
                               f"{arch.imagenet.where()}; or use weights='none' for random init.") from None
    return _load_state_dict_file(path), file_sha256(path)


def _imagenet_weights(name: str, arch: Architecture) -> tuple[dict, str]:
    if isinstance(arch.imagenet, HubWeights):
        return _hub_weights(name, arch)
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
        if arch.imagenet is None and is_zoo_name(name):

            raise no_pretrained(name)
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
