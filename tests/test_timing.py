"""Inference time per image: warm-up excluded, the median, the whole classifier, and no feature cache's timing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_experiment import config

from carclf.core.threads import torch_threads
from carclf.experiment import run_experiment
from carclf.models.records import InputConfig
from carclf.training import features
from carclf.training.timing import TIMING_IMAGES, network_classes, seconds_per_image


class FakeClock:
    """A clock that only `classify` moves, by the next of the given durations."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), []

    def __call__(self) -> float:
        return self.now

    def classify(self, images):
        self.calls.append(len(images))
        self.now += self.durations.pop(0)


def test_the_warm_up_call_is_not_timed_and_the_median_is_taken_per_image():
    clock = FakeClock([100.0, 1.0, 9.0, 2.0])  # a slow first call, then an outlier among three
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    assert seconds_per_image(clock.classify, images, repeats=3, warmup=1, clock=clock) == pytest.approx(2.0 / 4)
    assert clock.calls == [4] * 4  # one warm-up and three timed calls, each on the whole batch


def test_without_warm_up_the_first_call_counts():
    clock = FakeClock([100.0, 1.0, 2.0])
    assert seconds_per_image(clock.classify, torch.zeros(2, 3, 8, 8), repeats=3, warmup=0,
                             clock=clock) == pytest.approx(2.0 / 2)


def test_network_classes_are_the_networks_and_its_modes_are_left_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.LazyLinear(5))
    model(torch.zeros(2, 3, 8, 8))
    model.train()
    ic = InputConfig(size=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    classes = network_classes(model, ic, torch.device("cpu"))(images)
    assert all(m.training for m in model.modules())
    model.eval()
    expected = model((images.float() / 255 - 0.5) / 0.25).argmax(1).numpy()
    assert np.array_equal(classes, expected)


@pytest.mark.slow  # two SVM runs: about 10 s on 2 busy cores
def test_an_svms_inference_time_does_not_depend_on_the_feature_cache(demo_dir, tracked, monkeypatch):
    """The same SVM with a cold and a warm feature cache: the same order of time per image, and none of it
    read from the cache's record of how long extraction took (here made absurd on every cache hit)."""
    cfg = config(demo_dir, model={"name": "svm"}, train={"device": "cpu"})
    # one thread: two torch threads on cores other processes keep busy wait on each other, which would time the
    # machine's load rather than the classifier
    with torch_threads(1):
        cold = run_experiment(cfg, evaluate_test=False, log_model=False)
    load = features.FeatureCache.load

    def slow_record(self, key):
        found = load(self, key)
        if found is not None:
            found.meta.update(seconds=1000.0, seconds_per_image=10.0)
        return found

    monkeypatch.setattr(features.FeatureCache, "load", slow_record)
    with torch_threads(1):
        warm = run_experiment(cfg, evaluate_test=False, log_model=False)
    hits = [MlflowClient().get_run(r.run_id).data.metrics["feature_cache_hits"] for r in (cold, warm)]
    assert hits == [0, 2]
    assert 0 < warm.infer_ms_per_img < 1000.0  # 10 s per image would read 10,000 ms
    assert 1 / 3 < warm.infer_ms_per_img / cold.infer_ms_per_img < 3
    assert cold.infer_seconds_per_image == pytest.approx(cold.infer_ms_per_img / 1000)


def test_the_timing_batch_is_small(demo_dir):
    from carclf.data.prepare import prepare_data
    from carclf.training.timing import timing_images

    cfg = config(demo_dir, model={"name": "svm"})
    images = timing_images(cfg, prepare_data(cfg, image_size=32), torch.device("cpu"))
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert 0 < len(images) <= TIMING_IMAGES
