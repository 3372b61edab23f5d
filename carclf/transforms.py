"""Train and eval transform presets (torchvision.transforms.v2), derived from a model's input config.

    train_tf = TrainPreset(model.input_config, strength=0.5)   # random, applied afresh at every call
    eval_tf = EvalPreset(model.input_config)                  # deterministic
    x = train_tf(uint8_hwc_array)                             # float tensor CHW, normalised

One `strength` knob in [0, 1] scales every random operation; 0 builds no random
operation at all, so the train preset then equals the eval preset.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

# The strongest settings (strength 1); each is scaled linearly by strength.
MAX_ROTATION_DEG = 15.0  # cars are photographed upright: a small tilt, not arbitrary rotation
MIN_CROP_SCALE = 0.5  # RandomResizedCrop keeps at least half the area, so the car stays in view
MAX_ASPECT_JITTER = 1 / 3  # aspect ratio range (1/(1+a), 1+a)
MAX_FLIP_P = 0.5  # a mirrored car is still the same model
MAX_COLOR_JITTER = 0.4  # brightness, contrast and saturation; hue is left alone (paint colour is not the class)


def _size(input_config) -> int:
    return int(getattr(input_config, "size", 224))


def _to_tensor() -> list:
    # ndarray HWC uint8 or PIL image -> tv_tensors.Image CHW uint8
    return [v2.ToImage()]


def _normalise(input_config) -> list:
    return [v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(input_config.mean), std=list(input_config.std))]


def random_ops(size: int, strength: float) -> list:
    """The random operations for one strength; empty for strength 0."""
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    if s == 0.0:
        return []
    aspect = 1.0 + MAX_ASPECT_JITTER * s
    jitter = MAX_COLOR_JITTER * s
    return [
        v2.RandomRotation(degrees=MAX_ROTATION_DEG * s, interpolation=v2.InterpolationMode.BILINEAR),
        v2.RandomResizedCrop(size, scale=(1.0 - (1.0 - MIN_CROP_SCALE) * s, 1.0), ratio=(1 / aspect, aspect),
                             antialias=True),
        v2.RandomHorizontalFlip(p=MAX_FLIP_P * s),
        v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter),
    ]


class _Preset:
    transforms: v2.Compose
    on_pil = False  # random ops run on PIL images: rotation and jitter are 2x faster there than on tensors

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.on_pil:
            image = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
        return self.transforms(image).as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transforms})"


class TrainPreset(_Preset):
    """Random rotation, resized crop, flip and colour jitter scaled by `strength`, then normalise."""

    def __init__(self, input_config, strength: float):
        self.input_config = input_config
        self.strength = float(strength)
        size = _size(input_config)
        ops = random_ops(size, self.strength)
        self.on_pil = bool(ops)
        if ops:  # RandomResizedCrop outputs `size` itself
            self.transforms = v2.Compose(ops + _to_tensor() + _normalise(input_config))
        else:
            self.transforms = EvalPreset(input_config).transforms


class EvalPreset(_Preset):
    """Resize to the model's input size (a no-op when the cache already holds that size), then normalise."""

    def __init__(self, input_config):
        self.input_config = input_config
        size = _size(input_config)
        self.transforms = v2.Compose(_to_tensor() + [v2.Resize((size, size), antialias=True)]
                                     + _normalise(input_config))
