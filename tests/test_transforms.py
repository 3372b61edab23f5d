"""Transform presets (carclf/transforms.py): strength 0 is no augmentation, strength scales every op."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from carclf.transforms import EvalPreset, TrainPreset, random_ops


@dataclass(frozen=True)
class _Input:  # the fields of carclf.models.InputConfig the presets read
    size: int = 32
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)


def _image(size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


_RANDOM = (v2.RandomRotation, v2.RandomResizedCrop, v2.RandomHorizontalFlip, v2.ColorJitter)


def test_strength_zero_has_no_random_op_and_equals_eval():
    preset = TrainPreset(_Input(), strength=0.0)
    assert not [t for t in preset.transforms.transforms if isinstance(t, _RANDOM)]
    image = _image()
    torch.testing.assert_close(preset(image), EvalPreset(_Input())(image))
    torch.testing.assert_close(preset(image), preset(image))


def test_output_is_normalised_float_chw():
    image = np.full((32, 32, 3), 255, np.uint8)
    x = EvalPreset(_Input())(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and type(x) is torch.Tensor
    expected = (1.0 - torch.tensor(_Input.mean)) / torch.tensor(_Input.std)
    torch.testing.assert_close(x[:, 0, 0], expected)


def test_positive_strength_gives_a_new_variant_each_call():
    preset = TrainPreset(_Input(), strength=1.0)
    image = _image()
    outputs = [preset(image) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) for o in outputs)
    assert len({o.numpy().tobytes() for o in outputs}) == 4


def test_strength_scales_every_random_op():
    weak, strong = random_ops(32, 0.2), random_ops(32, 1.0)
    by_type = lambda ops: {type(t): t for t in ops}  # noqa: E731
    w, s = by_type(weak), by_type(strong)
    assert set(w) == set(s) == set(_RANDOM)
    assert w[v2.RandomRotation].degrees[1] < s[v2.RandomRotation].degrees[1]
    assert w[v2.RandomResizedCrop].scale[0] > s[v2.RandomResizedCrop].scale[0]
    assert w[v2.RandomHorizontalFlip].p < s[v2.RandomHorizontalFlip].p
    assert w[v2.ColorJitter].brightness[1] < s[v2.ColorJitter].brightness[1]


def test_cached_size_differs_from_model_size():
    image = _image(48)
    assert EvalPreset(_Input(size=24))(image).shape == (3, 24, 24)
    assert TrainPreset(_Input(size=24), 0.0)(image).shape == (3, 24, 24)
    assert TrainPreset(_Input(size=24), 0.7)(image).shape == (3, 24, 24)


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_0_1_is_refused(strength):
    with pytest.raises(ValueError, match="strength"):
        TrainPreset(_Input(), strength)
