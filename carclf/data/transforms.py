"""Train and eval transforms, derived from a model's input config: per image, and batched on any device.

    train_tf = TrainPreset(model.input_config, strength=0.5)   # one image: random, applied afresh at every call
    eval_tf = EvalPreset(model.input_config)                  # one image: deterministic
    x = train_tf(uint8_hwc_array)                             # float tensor CHW, normalised

    augment = BatchTrainAugment(model.input_config, strength=0.5)
    x = augment(uint8_nchw_batch, generator)                  # the batch's device; parameters drawn per image
    x = BatchEval(model.input_config)(uint8_nchw_batch)       # EvalPreset's maths on a whole batch

One `strength` knob in [0, 1] scales every random operation; 0 builds no random
operation at all, so the train transforms then equal the eval ones. The batched
augmentation draws rotation, resized crop, flip and colour jitter from the same
ranges as the per-image preset, independently for every image of a batch, and
composes the three geometric operations into one affine warp per image (one
`grid_sample` for the batch). Training uses the batched path (carclf.data.inputs);
prediction uses the per-image eval preset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

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


def _check_strength(strength: float) -> float:
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"augmentation strength must be in [0, 1], got {strength}")
    return s


def random_ops(size: int, strength: float) -> list:
    """The random operations for one strength; empty for strength 0."""
    s = _check_strength(strength)
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


# --------------------------------------------------------------------------- batched, on the batch's device

_CROP_ATTEMPTS = 10  # as torchvision's RandomResizedCrop: the first of 10 draws that fits, else the whole image


@dataclass
class AugmentParams:
    """Per-image parameters of one batch (tensors of length N on the batch's device).

    Geometry is in normalised coordinates (the image spans [-1, 1]): the crop's half-extent
    `crop_w`, `crop_h` (1 = the whole side) and centre `crop_x`, `crop_y` lie in the rotated image.
    """

    angle: torch.Tensor  # radians
    crop_w: torch.Tensor
    crop_h: torch.Tensor
    crop_x: torch.Tensor
    crop_y: torch.Tensor
    flip: torch.Tensor  # bool
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor

    @classmethod
    def identity(cls, n: int, device=None) -> "AugmentParams":
        one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
        return cls(zero, one, one, zero, zero, torch.zeros(n, dtype=torch.bool, device=device), one, one, one)


class BatchTrainAugment:
    """TrainPreset's random operations on a uint8 NCHW batch, parameters independent per image, then normalise.

    Rotation, random resized crop and horizontal flip are one affine map per image, applied with
    a single `grid_sample` (bilinear, black outside the rotated image as torchvision fills it).
    Brightness, contrast and saturation follow torchvision's formulas with per-image factors.
    torchvision shuffles the order of the three colour operations; they are linear blends that
    commute up to clipping at [0, 1], so a fixed order is used. Every draw comes from the
    `generator` passed in, which lives on the batch's device: no host round trip.
    """

    def __init__(self, input_config, strength: float):
        self.input_config = input_config
        self.strength = _check_strength(strength)
        self.size = _size(input_config)
        self.eval = BatchEval(input_config)

    def __repr__(self) -> str:
        return f"BatchTrainAugment(size={self.size}, strength={self.strength})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.strength == 0.0:
            return self.eval(images)
        return self.eval.normalise(self.augment(images, generator))

    def augment(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 NCHW -> float NCHW in [0, 1] at the model's size, augmented but not normalised."""
        # Contiguous NCHW first: grid_sample on CPU is slower on channels_last input, and the uint8 copy is cheap.
        x = TF.to_dtype(images.contiguous(), torch.float32, scale=True)
        if self.strength == 0.0:
            return self.eval.resize(x)
        return self.apply(x, self.sample(len(x), generator, x.device))

    def sample(self, n: int, generator: torch.Generator | None, device) -> AugmentParams:
        """Draw every image's parameters from the ranges random_ops uses for this strength."""
        s = self.strength
        u = torch.rand(n, 2 * _CROP_ATTEMPTS + 7, generator=generator, device=device)
        area, ratio = u[:, :_CROP_ATTEMPTS], u[:, _CROP_ATTEMPTS:2 * _CROP_ATTEMPTS]
        rest = u[:, 2 * _CROP_ATTEMPTS:]
        min_area = 1.0 - (1.0 - MIN_CROP_SCALE) * s
        log_aspect = math.log(1.0 + MAX_ASPECT_JITTER * s)
        area = min_area + (1.0 - min_area) * area
        aspect = torch.exp((2.0 * ratio - 1.0) * log_aspect)
        w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
        fits = (w <= 1.0) & (h <= 1.0)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)
        found = fits.any(1)
        w = torch.where(found, w.gather(1, first).squeeze(1), 1.0)
        h = torch.where(found, h.gather(1, first).squeeze(1), 1.0)
        jitter = MAX_COLOR_JITTER * s
        low = max(0.0, 1.0 - jitter)

        def factor(col):
            return low + (1.0 + jitter - low) * rest[:, col]

        return AugmentParams(
            angle=(2.0 * rest[:, 0] - 1.0) * math.radians(MAX_ROTATION_DEG * s),
            crop_w=w, crop_h=h,
            crop_x=(2.0 * rest[:, 1] - 1.0) * (1.0 - w), crop_y=(2.0 * rest[:, 2] - 1.0) * (1.0 - h),
            flip=rest[:, 3] < MAX_FLIP_P * s,
            brightness=factor(4), contrast=factor(5), saturation=factor(6))

    def apply(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        """Float NCHW in [0, 1] -> augmented float NCHW at the model's size (still in [0, 1])."""
        return _color_jitter_(self._warp(x, p), p)

    def _warp(self, x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
        # Output point u -> flip -> crop box (in the rotated image) -> rotate back into the source image.
        cos, sin = torch.cos(p.angle), torch.sin(p.angle)
        sx = torch.where(p.flip, -p.crop_w, p.crop_w)
        theta = torch.stack([
            torch.stack([cos * sx, -sin * p.crop_h, cos * p.crop_x - sin * p.crop_y], 1),
            torch.stack([sin * sx, cos * p.crop_h, sin * p.crop_x + cos * p.crop_y], 1)], 1)
        grid = _affine_grid(theta.to(x.dtype), self.size)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """F.affine_grid(theta, (N, C, size, size), align_corners=False), built from two broadcast sums.

    The same sampling points as affine_grid's batched matrix product, at a quarter of its CPU time.
    """
    n = theta.shape[0]
    ticks = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2 + 1) / size - 1  # pixel centres
    grid = torch.empty(n, size, size, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):
        a, b, c = (theta[:, k, j].view(n, 1, 1) for j in range(3))
        torch.add(a * ticks.view(1, 1, size), b * ticks.view(1, size, 1) + c, out=grid[..., k])
    return grid


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma (0.299, 0.587, 0.114), N1HW: what torchvision's rgb_to_grayscale computes for float images."""
    r, g, b = x.unbind(1)
    return (0.299 * r).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1)


def _color_jitter_(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Brightness, contrast, saturation with per-image factors, in place, torchvision's formulas.

    brightness: x * b; contrast: blend with the mean of the image's luma; saturation: blend with its
    luma; each clipped to [0, 1]. In place and one blend per operation (kornia.enhance allocates a
    tensor per step and costs twice the CPU time here, which would make the batched path slower than
    the per-image one in a one-CPU trial).
    """
    n = x.shape[0]
    x.mul_(p.brightness.view(n, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x.lerp_(mean.expand_as(x), (1.0 - p.contrast).view(n, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)
    x.lerp_(_gray(x).expand_as(x), (1.0 - p.saturation).view(n, 1, 1, 1).to(x.dtype)).clamp_(0.0, 1.0)
    return x


class BatchEval:
    """EvalPreset's maths on a uint8 NCHW batch: resize (a no-op at the cache's size), to float, normalise."""

    def __init__(self, input_config):
        self.input_config = input_config
        self.size = _size(input_config)
        self._stats: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchEval(size={self.size})"

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if images.shape[-2:] != (self.size, self.size):  # resized as uint8, exactly as EvalPreset does
            images = TF.resize(images, [self.size, self.size], antialias=True)
        return self.normalise(TF.to_dtype(images, torch.float32, scale=True))

    def resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return TF.resize(x, [self.size, self.size], antialias=True)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std as v2.Normalize computes it; mean and std are made once per device, not per batch
        (a host-to-device copy of them would wait for every kernel queued before it)."""
        key = (x.device, x.dtype)
        if key not in self._stats:
            shape = (1, -1, 1, 1)
            self._stats[key] = (torch.tensor(self.input_config.mean, dtype=x.dtype).view(shape).to(x.device),
                                torch.tensor(self.input_config.std, dtype=x.dtype).view(shape).to(x.device))
        mean, std = self._stats[key]
        return x.sub(mean).div_(std)
