"""Inference time per image, measured one way for every family: the whole classifier on a few validation images.

    images = timing_images(cfg, data, device)                  # up to 16 decoded validation images, uint8 NCHW
    seconds = seconds_per_image(network_classes(model, ic, device), images)

`infer_ms_per_img` and `infer_seconds_per_image` of every run come from here: the classifier from a decoded
image tensor to a class (the network for networks, probes and tops; the feature backbone and the SVM for an
SVM), on the run's device and torch threads, after one warm-up call, the median of a few timed calls. Whether
the features came from a cache does not enter: the backbone always runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch

from carclf.config import RunConfig
from carclf.data.arrays import load_split
from carclf.data.transforms import BatchEval
from carclf.training.loop import EpochCallback, _autocast

TIMING_IMAGES = 16  # a fixed small batch: a stable median, and well under a second of a trial on small images
REPEATS = 3


def seconds_per_image(classify: Callable[[torch.Tensor], Any], images: torch.Tensor, *, repeats: int = REPEATS,
                      warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> float:
    """Seconds per image of `classify(images)`: `warmup` calls untimed (first-call allocations, lazy
    initialisation), then the median of `repeats` timed calls, divided by the number of images.
    `classify` must return its classes on the host, so a GPU's queued work is inside the time."""
    for _ in range(warmup):
        classify(images)
    spent = []
    for _ in range(repeats):
        t0 = clock()
        classify(images)
        spent.append(clock() - t0)
    return float(np.median(spent)) / max(len(images), 1)


def timing_images(cfg, data, device: torch.device, n: int = TIMING_IMAGES) -> torch.Tensor:
    """The first `n` unique validation images (test's if validation has none) as uint8 [n, 3, S, S] on `device`."""

    split = "val" if len(data.val) else "test"
    images = load_split(data, split, cache_dir=cfg.data.cache_dir).images[:n]
    return torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).to(device)


def _channels_last(device: torch.device):
    # as the feature extraction runs its backbones (carclf.training.features.backbone_features)
    return torch.channels_last if device.type in ("cpu", "cuda") else torch.contiguous_format


def network_classes(model: torch.nn.Module, input_config, device: torch.device, *,
                    amp: bool = False) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 images -> the network's classes, as evaluation runs it (eval preset, eval mode, the run's AMP).
    Moves `model` to `device`; each call leaves its modules' train/eval modes as it found them."""

    model.to(device)
    transform = BatchEval(input_config)

    def classify(images: torch.Tensor) -> np.ndarray:
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            with torch.inference_mode(), _autocast(device, amp):
                return model(transform(images)).argmax(1).cpu().numpy()
        finally:
            for m, training in modes:
                m.training = training

    return classify


def svm_classes(backbone: torch.nn.Module, pipeline, device: torch.device) -> Callable[[torch.Tensor], np.ndarray]:
    """uint8 images -> the SVM's classes: the feature backbone (eval preset), then the fitted pipeline's
    probabilities, as a logged SVM model predicts."""

    fmt = _channels_last(device)
    backbone = backbone.to(device, memory_format=fmt).eval()
    transform = BatchEval(backbone.input_config)

    def classify(images: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            feats = backbone(transform(images).contiguous(memory_format=fmt)).float().flatten(1).cpu().numpy()
        return pipeline.predict_proba(feats).argmax(1)

    return classify


def infer_seconds(cfg: RunConfig, data, classify, device) -> float:
    """Seconds per image of the whole classifier `classify` (as above) on a few validation images, measured on the
    run's device and threads. A network does not change speed while it learns: measured once, before
    training, its epochs report the figure too (a trial a scheduler stops has it)."""
    return seconds_per_image(classify, timing_images(cfg, data, device))


def with_infer_ms(on_epoch: EpochCallback, seconds: float) -> EpochCallback:
    """`on_epoch` with each row's `infer_ms_per_img` set to the measured figure."""

    def step(epoch: int, row: dict) -> None:
        on_epoch(epoch, {**row, "infer_ms_per_img": 1000.0 * seconds})

    return step
