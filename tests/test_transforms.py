"""Transform presets (carclf/data/transforms.py): strength 0 is no augmentation, strength scales every op."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from carclf.data.transforms import AugmentParams, BatchEval, BatchTrainAugment, EvalPreset, TrainPreset, random_ops


@dataclass(frozen=True)
class _Input:  # the fields of carclf.models.records.InputConfig the presets read
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


# --------------------------------------------------------------------------- batched, on the batch's device


def _batch(n=6, size=32, seed=0) -> torch.Tensor:
    images = np.stack([_image(size, seed + i) for i in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2)  # uint8 NCHW, as carclf.data.inputs hands batches over


def _gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_batch_augmentation_draws_its_own_parameters_for_every_image():
    augment = BatchTrainAugment(_Input(), strength=1.0)
    same = _batch(1).expand(8, -1, -1, -1).contiguous()  # one image eight times
    out = augment(same, _gen())
    assert out.shape == (8, 3, 32, 32) and out.dtype == torch.float32
    assert len({o.numpy().tobytes() for o in out}) == 8
    params = augment.sample(8, _gen(), "cpu")
    for values in (params.angle, params.crop_w, params.crop_x, params.brightness, params.contrast, params.saturation):
        assert len(set(values.tolist())) == 8


def test_batch_augmentation_ranges_are_the_presets_ranges_at_every_strength():
    n = 4000
    for strength in (0.3, 1.0):
        ops = {type(t): t for t in random_ops(32, strength)}
        p = BatchTrainAugment(_Input(), strength).sample(n, _gen(1), "cpu")
        max_deg = ops[v2.RandomRotation].degrees[1]
        assert p.angle.abs().max() <= np.radians(max_deg) + 1e-6 and p.angle.abs().max() > 0.9 * np.radians(max_deg)
        crop = ops[v2.RandomResizedCrop]
        area, aspect = p.crop_w * p.crop_h, p.crop_w / p.crop_h
        assert area.min() >= crop.scale[0] - 1e-5 and area.max() <= 1 + 1e-6
        assert aspect.min() >= crop.ratio[0] - 1e-5 and aspect.max() <= crop.ratio[1] + 1e-5
        assert ((p.crop_x.abs() <= 1 - p.crop_w + 1e-6) & (p.crop_y.abs() <= 1 - p.crop_h + 1e-6)).all()  # inside
        assert abs(p.flip.float().mean().item() - ops[v2.RandomHorizontalFlip].p) < 0.03
        jitter = ops[v2.ColorJitter]
        for factor, (low, high) in ((p.brightness, jitter.brightness), (p.contrast, jitter.contrast),
                                    (p.saturation, jitter.saturation)):
            assert factor.min() >= low - 1e-6 and factor.max() <= high + 1e-6 and factor.std() > 0.2 * (high - low)


def test_batch_strength_zero_is_the_identity_before_normalisation():
    augment = BatchTrainAugment(_Input(), strength=0.0)
    batch = _batch()
    torch.testing.assert_close(augment.augment(batch, _gen()), batch.float() / 255, atol=1e-7, rtol=0)
    torch.testing.assert_close(augment(batch, _gen()), BatchEval(_Input())(batch))


@pytest.mark.parametrize("size", [32, 24])
def test_batch_eval_equals_the_eval_preset(size):
    images = np.stack([_image(32, i) for i in range(5)])
    batch = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = torch.stack([EvalPreset(_Input(size=size))(im) for im in images])
    torch.testing.assert_close(BatchEval(_Input(size=size))(batch), expected)


def test_batch_geometry_flips_and_rotates_each_image_as_asked():
    from carclf.data.transforms import _affine_grid

    theta = torch.randn(4, 2, 3, generator=_gen())
    expected = torch.nn.functional.affine_grid(theta, [4, 3, 24, 24], align_corners=False)
    torch.testing.assert_close(_affine_grid(theta, 24), expected, atol=1e-5, rtol=0)
    augment = BatchTrainAugment(_Input(), strength=1.0)
    x = _batch(3).float() / 255
    p = AugmentParams.identity(3)
    torch.testing.assert_close(augment.apply(x, p), x, atol=1e-5, rtol=0)
    p.flip = torch.tensor([True, False, True])
    out = augment.apply(x, p)
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], x[1], atol=1e-5, rtol=0)
    p = AugmentParams.identity(3)
    p.angle = torch.tensor([np.pi / 2, 0.0, -np.pi / 2])
    out = augment.apply(x, p)
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[2], torch.rot90(x[2], -1, (1, 2)), atol=1e-4, rtol=0)
    p = AugmentParams.identity(3)  # the centre half of the image, scaled up to the full size
    p.crop_w = p.crop_h = torch.full((3,), 0.5)
    out = augment.apply(x, p)
    centre = torch.nn.functional.interpolate(x[:, :, 8:24, 8:24], size=32, mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, :, 4:28, 4:28], centre[:, :, 4:28, 4:28], atol=1e-4, rtol=0)


def test_batch_augmentation_repeats_with_the_same_generator_seed():
    augment = BatchTrainAugment(_Input(), strength=0.7)
    batch = _batch()
    assert torch.equal(augment(batch, _gen(5)), augment(batch, _gen(5)))
    assert not torch.equal(augment(batch, _gen(5)), augment(batch, _gen(6)))
    with pytest.raises(ValueError, match="strength"):
        BatchTrainAugment(_Input(), 1.2)


def test_batch_colour_jitter_is_torchvisions_per_image():
    from torchvision.transforms.v2 import functional as F

    augment = BatchTrainAugment(_Input(), strength=1.0)
    x = _batch(4).float() / 255
    p = AugmentParams.identity(4)
    p.brightness, p.contrast, p.saturation = (torch.tensor(v) for v in ([0.6, 1.4, 1.0, 0.9],
                                                                         [1.3, 0.6, 1.0, 1.1],
                                                                         [0.7, 1.0, 1.4, 0.6]))
    out = augment.apply(x.clone(), p)
    for i in range(4):
        expected = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(x[i], p.brightness[i].item()),
                                                         p.contrast[i].item()), p.saturation[i].item())
        torch.testing.assert_close(out[i], expected, atol=2e-3, rtol=0)  # torchvision's red weight is 0.2989
