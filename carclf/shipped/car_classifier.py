"""A carclf classifier on its own: encoded photos in, car models out. Shipped inside every logged model.

    clf = load_classifier({"spec": "spec.json", "weights": "weights.pt", "svm": "svm.skops"})
    clf.predict(pd.DataFrame({"image": [Path("car.jpg").read_bytes()]}), top_k=3)

carclf copies this file into each MLflow model it logs (`code_paths`), so a model loads and
predicts without carclf. It imports only torch, torchvision, NumPy, pandas, PIL and, for an
SVM, scikit-learn and skops; a model on a timm architecture (`timm/<model>`) also imports timm.
carclf takes its decoding and its network architectures from here, never the other way round,
so training and serving cannot drift apart.

What a model folder holds (the `artifacts` of `load_classifier`):
- `spec`: JSON with the kind ('network' | 'svm'), the class names, the input config (size,
  mean, std) and the architecture (network: its name and constructor arguments; SVM: the
  backbone's name and feature mode; a stack of backbones: `members`, each with its name, feature mode,
  mean and std);
- `weights`: a torch state_dict (the network, or the SVM's feature backbone), read with
  `torch.load(..., weights_only=True)`;
- `svm` (SVM only): the scikit-learn Pipeline saved by skops, read with the explicit list of
  trusted types below.
Nothing is unpickled.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torchvision.models as tvm
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms.v2 import functional as tvf

log = logging.getLogger(__name__)

SPEC_VERSION = 1
DEFAULT_TOP_K = 3
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("class", "probability", "top_classes", "top_probabilities", "error")
# The only types outside skops' defaults that carclf's SVM pipeline (StandardScaler, then a sigmoid-
# calibrated SVC or LinearSVC) holds. Defined here, not read from the model's files, so a tampered
# model cannot widen what gets loaded.
SVM_TRUSTED_TYPES = ("sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration",
                     "sklearn.calibration._TemperatureScaling")
_BATCH = 64  # images decoded and run at a time: bounds memory for large requests
_WHITE = (255, 255, 255)
_BYTESIO_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


# --------------------------------------------------------------------------- decoding


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale, palette, RGBA, CMYK, 16-bit ... -> RGB; transparency is flattened onto white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # PIL's convert clips wide-range integers at 255; rescale to the full 8-bit range instead.
        values = np.asarray(img, dtype=np.float64)
        top = values.max() or 1.0
        return Image.fromarray((values * (255.0 / top)).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy for the usual upright photo
    except Exception as e:  # malformed EXIF must not make an otherwise good photo unreadable
        log.debug("ignoring unreadable EXIF orientation: %s", e)
    return img


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image bytes -> uint8 array (image_size, image_size, 3), RGB, EXIF orientation applied.

    The image is squashed to a square, not centre-cropped: car photos are wide
    (median about 2:1), and a centre crop would cut off the front and the rear,
    which carry most of what tells two models apart.

    Raises OSError / ValueError (and PIL's errors) for unreadable or truncated data.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                # Draft mode decodes at 1/2, 1/4 or 1/8 scale while staying >= the target size.
                img.draft(None, (image_size, image_size))
            img.load()
            rgb = to_rgb(_apply_exif_orientation(img))
    resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.array(resized, dtype=np.uint8)  # writable: torch.from_numpy warns on read-only arrays


def read_error(exc: BaseException) -> str:
    """A one-line reason for an unreadable image (without the in-memory buffer PIL names: it says nothing)."""
    text = _BYTESIO_REPR.sub("", str(exc)).strip() or "unreadable"
    return f"{type(exc).__name__}: {text}"


def image_error(exc: BaseException) -> str:
    """read_error without the in-memory buffer PIL names ("<_io.BytesIO object at 0x...>"): it says nothing."""
    return _BYTESIO_REPR.sub("", read_error(exc))


def image_bytes(value: Any) -> bytes:
    """One cell of the `image` column as bytes: bytes as given, a str as base64 (JSON clients send that)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"a string image must be base64-encoded bytes ({e})") from None
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ValueError("no image bytes")
    raise TypeError(f"expected encoded image bytes or a base64 string, got {type(value).__name__}")


# --------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Network:
    """How to build one architecture (random init) and take it apart: its head and its feature trunk."""

    make: Callable[..., nn.Module]  # the network with its original (ImageNet) head
    head: str  # dotted path of the last nn.Linear, replaced for our classes
    trunk: Callable[[nn.Module], nn.Module]  # images -> last conv map [N, C, h, w]
    penultimate: Callable[[nn.Module], nn.Module] | None = None  # images -> [N, D] before the head


class SimpleCNN(nn.Module):
    """The from-scratch baseline: conv-BN-ReLU-maxpool blocks, global average pool, dropout, a linear head."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for width in widths:
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            c_in = width
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)  # the study's regulariser for a model that sees few images
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x).mean(dim=(2, 3))))


def _features(model: nn.Module) -> nn.Module:
    return model.features


def _classifier_penultimate(model: nn.Module) -> nn.Module:
    # VGG and AlexNet: conv features, adaptive pool (which is why small inputs work), classifier minus its last layer
    return nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *list(model.classifier)[:-1])


def _resnet_trunk(model: nn.Module) -> nn.Module:
    return nn.Sequential(*list(model.children())[:-2])  # without the average pool and fc


NETWORKS: dict[str, Network] = {
    "vgg16": Network(tvm.vgg16, "classifier.6", _features, _classifier_penultimate),
    "alexnet": Network(tvm.alexnet, "classifier.6", _features, _classifier_penultimate),
    "resnet18": Network(tvm.resnet18, "fc", _resnet_trunk),
    "mobilenet_v2": Network(tvm.mobilenet_v2, "classifier.1", _features),
    "efficientnet_b0": Network(tvm.efficientnet_b0, "classifier.1", _features),
    "simple_cnn": Network(SimpleCNN, "fc", _features),
}


ZOOS = ("torchvision", "timm")  # a zoo name is `<zoo>/<model>[.<weights tag>]`, e.g. timm/convnext_tiny.fb_in22k


def is_zoo_name(name: str) -> bool:
    return isinstance(name, str) and name.partition("/")[0] in ZOOS and bool(name.partition("/")[2])


def network(name: str) -> Network:
    if is_zoo_name(name):
        return zoo_network(name)
    if name not in NETWORKS:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(sorted(NETWORKS))}")
    return NETWORKS[name]


# --------------------------------------------------------------------------- the torchvision and timm zoos


def _zoo_maker(name: str) -> Callable[..., nn.Module]:
    """The architecture behind a zoo name, random init. A timm tag picks its head's width (in22k: 21,841
    classes), so the tag goes to timm; a torchvision weights member never changes the architecture."""
    zoo, _, model = name.partition("/")
    if zoo == "torchvision":
        arch = model.split(".", 1)[0]
        return lambda **kw: tvm.get_model(arch, weights=None, **kw)
    import timm  # only models that name a timm architecture need timm

    return lambda **kw: timm.create_model(model, pretrained=False, **kw)


def _build(make: Callable[[], nn.Module], meta: bool) -> nn.Module:
    """`make()` on the meta device (no time spent on an init that is overwritten) where the model allows it:
    some compute numbers in their constructor (timm's stochastic-depth rates), which the meta device has not."""
    if meta:
        try:
            with torch.device("meta"):
                return make()
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            pass
    return make()


def _classifier_path(model: nn.Module) -> str:
    """The dotted path of the model's last nn.Linear: timm names its classifier (get_classifier); for
    torchvision it is the last linear layer, which every classification model there ends with."""
    modules = dict(model.named_modules())
    target = model.get_classifier() if hasattr(model, "get_classifier") else None
    named = [n for n, m in modules.items() if m is target and isinstance(m, nn.Linear)]
    if named:
        return named[0]
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear classifier to replace")
    return linears[-1]


class PreLogits(nn.Module):
    """A timm model's pooled pre-logit features: forward_features, then forward_head(..., pre_logits=True)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.reset_classifier(0)  # the classifier's weights are not features: not shipped
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def _before_head(head: str) -> Callable[[nn.Module], nn.Module]:
    """A torchvision model whose classifier is dropped: its output is the classifier's input."""
    def trunk(model: nn.Module) -> nn.Module:
        model.set_submodule(head, nn.Identity())
        return model

    return trunk


@functools.lru_cache(maxsize=64)
def zoo_network(name: str) -> Network:
    """The Network of a zoo model: its features are the classifier's input (the pooled pre-logits) whichever
    feature mode is asked for."""
    make = _zoo_maker(name)
    head = _classifier_path(_build(make, meta=True))
    trunk = _pre_logits if name.startswith("timm/") else _before_head(head)
    return Network(make, head, trunk, trunk)


def _pre_logits(model: nn.Module) -> nn.Module:
    return PreLogits(model)


def set_head(model: nn.Module, head: str, num_classes: int) -> None:
    """Replace the last linear layer at `head` by a fresh one with `num_classes` outputs."""
    old = model.get_submodule(head)
    model.set_submodule(head, nn.Linear(old.in_features, num_classes))


def build_network(name: str, num_classes: int | None = None, **kwargs) -> nn.Module:
    """The architecture with random weights; its head replaced for `num_classes` if given."""
    net = network(name)
    model = net.make(**kwargs)
    if num_classes is not None:
        set_head(model, net.head, num_classes)
    return model


def feature_trunk(name: str, model: nn.Module, features: str = "gap") -> nn.Module:
    """The part of `model` that makes features: 'gap' the last conv map, 'penultimate' the head's input
    (vgg16, alexnet; the conv map for the others)."""
    net = network(name)
    if features == "penultimate" and net.penultimate is not None:
        return net.penultimate(model)
    if features not in ("gap", "penultimate"):
        raise ValueError(f"features must be 'gap' or 'penultimate', got {features!r}")
    return net.trunk(model)


class FeatureExtractor(nn.Module):
    """Images [N, 3, H, W] -> features [N, D]; a conv map is global-average-pooled."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.trunk(x)
        return y.mean(dim=(2, 3)) if y.ndim == 4 else y


STACK_SEPARATOR = "+"  # a stack of backbones is named by its members joined: mobilenet_v2+timm/tf_efficientnet_lite0


class Normalised(nn.Module):
    """A member of a stack: images in [0, 1] normalised with the member's own mean and std, then its features."""

    def __init__(self, extractor: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.extractor = extractor
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor((x - self.mean) / self.std).flatten(1)


class StackedFeatures(nn.Module):
    """Several backbones' features side by side, in the members' order: images in [0, 1] -> [N, sum of widths]."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.members], dim=1)


def stack_member(name: str, features: str, mean: Sequence[float], std: Sequence[float],
                 model: nn.Module | None = None) -> Normalised:
    """One stack member: `model` (random init if None) cut to its feature trunk, normalising its own input."""
    trunk = feature_trunk(name, model if model is not None else build_network(name), features)
    return Normalised(FeatureExtractor(trunk), mean, std)


# --------------------------------------------------------------------------- preprocessing


def normalise(images: np.ndarray | torch.Tensor, mean: Sequence[float], std: Sequence[float],
              device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W] on `device`, scaled to [0, 1] and normalised
    (the same torchvision operations as carclf's evaluation preset)."""
    batch = torch.as_tensor(images).to(device).permute(0, 3, 1, 2)
    return tvf.normalize(tvf.to_dtype(batch, torch.float32, scale=True), mean=list(mean), std=list(std))


def rank_classes(probs: np.ndarray, classes: Sequence[str], k: int) -> tuple[list[list[str]], list[list[float]]]:
    """Per row, the k most likely classes (most likely first, ties in class order) and their probabilities."""
    k = min(k, len(classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    names = [[classes[j] for j in row] for row in order]
    values = [[float(p[j]) for j in row] for p, row in zip(probs, order)]
    return names, values


# --------------------------------------------------------------------------- the classifier


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of parameter names to tensors)")
    return dict(state)


def _with_weights(make: Callable[[], nn.Module], state: dict) -> nn.Module:
    """Build (on the meta device where the model allows it), then take the weights."""
    module = _build(make, meta=True)
    module.load_state_dict(state, strict=True, assign=True)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"the weights leave {', '.join(left[:3])} unset")
    return module.eval()


@dataclass
class CarClassifier:
    """The whole classifier: decoding, normalisation, the network (or backbone + SVM) and the class names."""

    classes: list[str]
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    network: nn.Module  # logits, or the SVM's features
    svm: Any = None  # a fitted scikit-learn Pipeline over the features; None for a network
    device: torch.device = torch.device("cpu")

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, size, size, 3] -> class probabilities [N, n_classes], in one forward pass."""
        with torch.inference_mode():
            y = self.network(normalise(images, self.mean, self.std, self.device)).float()
            if self.svm is not None:
                return self._svm_probabilities(y.flatten(1).cpu().numpy())
            return torch.softmax(y, dim=1).cpu().numpy()

    def _svm_probabilities(self, features: np.ndarray) -> np.ndarray:
        probs = self.svm.predict_proba(features)
        full = np.zeros((len(features), len(self.classes)))
        full[:, np.asarray(self.svm.classes_, dtype=int)] = probs  # a class unseen in training keeps 0
        return full

    def decode(self, values: Sequence[Any]) -> tuple[list[np.ndarray | None], list[str]]:
        """Each value decoded at the model's size, or None and the reason it could not be."""
        def one(value):
            try:
                return decode_image(image_bytes(value), self.size), ""
            except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
                return None, image_error(e)

        if len(values) < 2:
            results = [one(v) for v in values]
        else:  # PIL decodes outside the GIL: threads overlap the photos of a batch
            with ThreadPoolExecutor(max_workers=min(len(values), os.cpu_count() or 1, 8)) as pool:
                results = list(pool.map(one, values))
        return [r[0] for r in results], [r[1] for r in results]

    def predict(self, frame: pd.DataFrame, top_k: int = DEFAULT_TOP_K) -> pd.DataFrame:
        """One row per input row: `class`, `probability`, `top_classes`, `top_probabilities`, `error`.

        An image that cannot be decoded gets its reason in `error` (empty otherwise) and no class;
        the other rows are still predicted.
        """
        if IMAGE_COLUMN not in frame.columns:
            raise ValueError(f"the input needs a column {IMAGE_COLUMN!r} of encoded image bytes; "
                             f"got columns {list(frame.columns)}")
        if int(top_k) < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        images = frame[IMAGE_COLUMN].tolist()
        names, values, errors = [], [], []
        for start in range(0, len(images), _BATCH):  # a batch at a time: memory stays bounded
            batch_names, batch_values, batch_errors = self._predict_batch(images[start:start + _BATCH], int(top_k))
            names += batch_names
            values += batch_values
            errors += batch_errors
        return _table(names, values, errors)

    def _predict_batch(self, images: list, k: int) -> tuple[list[list[str]], list[list[float]], list[str]]:
        arrays, errors = self.decode(images)
        good = [i for i, a in enumerate(arrays) if a is not None]
        names, values = [[] for _ in arrays], [[] for _ in arrays]
        if good:
            probs = self.probabilities(np.stack([arrays[i] for i in good]))
            for i, n, v in zip(good, *rank_classes(probs, self.classes, k)):
                names[i], values[i] = n, v
        return names, values, errors


def _table(names: list[list[str]], values: list[list[float]], errors: list[str]) -> pd.DataFrame:
    # A failed row has no class and no probability: None, so served JSON says null (NaN is not JSON).
    first = [n[0] if n else None for n in names]
    prob = [v[0] if v else None for v in values]
    return pd.DataFrame({
        "class": pd.Series(first, dtype=object),
        "probability": pd.Series(prob, dtype=object if None in prob else "float64"),
        "top_classes": pd.Series(names, dtype=object),
        "top_probabilities": pd.Series(values, dtype=object),
        "error": pd.Series(errors, dtype=object),
    }, columns=list(OUTPUT_COLUMNS))


def load_classifier(artifacts: Mapping[str, str], device: torch.device | str | None = None) -> CarClassifier:
    """The classifier from a model's artifact files; on cuda when the host has it, else on the CPU."""
    with open(artifacts["spec"], encoding="utf-8") as f:
        spec = json.load(f)
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"model spec version {spec.get('version')!r} is not {SPEC_VERSION}; "
                         "load it with the car_classifier.py it was logged with")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = load_state_dict(artifacts["weights"])
    svm = None
    if spec["kind"] == "svm":
        model = _with_weights(lambda: _svm_backbone(spec), state)
        svm = load_svm(artifacts["svm"])
    elif spec["kind"] == "network":
        n = len(spec["classes"])
        model = _with_weights(lambda: build_network(spec["architecture"], n, **spec.get("kwargs", {})), state)
    else:
        raise ValueError(f"unknown model kind {spec['kind']!r}; expected 'network' or 'svm'")
    ic = spec["input_config"]
    return CarClassifier(classes=[str(c) for c in spec["classes"]], size=int(ic["size"]), mean=tuple(ic["mean"]),
                         std=tuple(ic["std"]), network=model.to(device), svm=svm, device=device)


def _svm_backbone(spec: Mapping[str, Any]) -> nn.Module:
    """The SVM's feature backbone, random init: one network's trunk, or a stack of members (spec `members`)."""
    if spec.get("members"):
        return StackedFeatures([stack_member(m["backbone"], m.get("features", "gap"), m["mean"], m["std"])
                                for m in spec["members"]])
    name = spec["backbone"]
    return FeatureExtractor(feature_trunk(name, build_network(name), spec.get("features", "gap")))


def load_svm(path: str):
    """The SVM pipeline, through skops with this module's own list of trusted types."""
    import skops.io

    return skops.io.load(path, trusted=list(SVM_TRUSTED_TYPES))
