"""`model.finetune: probe`: a frozen backbone read once into the SVM's feature cache, only the head trained,
logged as a normal network model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from carclf.config import ConfigError, RunConfig, validate_run_config
from carclf.experiment import run_experiment
from carclf.models.networks import build_backbone, build_model
from carclf.models.registry import is_network, list_models, min_image_size
from carclf.shipped.car_classifier import network
from carclf.training import features
from carclf.training.probe import feature_config, frozen_network, probe_feature_mode

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
# Every network with a pretrained backbone: what a probe can freeze.
PRETRAINED = [n for n in list_models() if is_network(n) and n != "simple_cnn"]


def probe_config(demo_dir, augment: float = 0.0, **train) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"path": str(demo_dir), "image_size": 32}, "balance": {"mode": "none"},
        "augment": {"strength": augment},
        "model": {"name": "mobilenet_v2", "weights": "none", "finetune": "probe"},
        "train": {"epochs": 6, "batch_size": 16, "lr": 1e-2, "patience": 6, **train},
        "tracking": {"experiment": "test"}})


def svm_config(demo_dir) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"path": str(demo_dir), "image_size": 32}, "balance": {"mode": "none"}, "augment": {"strength": 0.0},
        "model": {"name": "svm"}, "train": {"batch_size": 16}, "tracking": {"experiment": "test"},
        "svm": {"backbone": "mobilenet_v2", "backbone_weights": "none", "features": "gap", "kernel": "linear"}})


@pytest.fixture
def extractions(monkeypatch) -> list[str]:
    """The splits whose features the backbone computed (cache misses), in order."""
    seen: list[str] = []
    real = features._extract_split

    def counting(backbone, cfg, data, split, **kw):
        seen.append(split)
        return real(backbone, cfg, data, split, **kw)

    monkeypatch.setattr(features, "_extract_split", counting)
    return seen


@pytest.mark.slow  # a run that logs its model, then loads it back through carclf's check: about 20 s on 2 cores
def test_probe_trains_only_the_head_and_logs_a_network_model_that_predicts_the_same(demo_dir, tracked):
    from carclf.serving.model_check import load_checked_model
    from carclf.shipped.car_classifier import CarClassifier

    cfg = probe_config(demo_dir)
    epochs = []
    result = run_experiment(cfg, on_epoch=lambda e, row: epochs.append(e))
    model, start = result.model, frozen_network(cfg, len(result.classes))
    head = network("mobilenet_v2").head
    trained, initial = model.state_dict(), start.state_dict()
    assert trained.keys() == initial.keys()
    # The backbone, batch-norm statistics included, is bitwise what it was; the head learnt.
    assert all(torch.equal(trained[k], initial[k]) for k in trained if not k.startswith(f"{head}."))
    assert not torch.equal(trained[f"{head}.weight"], initial[f"{head}.weight"])
    # ... and it is the backbone whose features were cached (a random init, seeded as the extraction seeds it).
    cached = features.build_feature_backbone(feature_config(cfg)).state_dict()
    assert all(torch.equal(trained[f"features.{k.removeprefix('trunk.')}"], v) for k, v in cached.items())

    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["carclf.kind"] == "network" and run.data.params["model.finetune"] == "probe"
    assert epochs == list(range(1, len(result.history) + 1)) and len(epochs) >= 2
    assert run.data.metrics["n_params_trainable"] == sum(p.numel() for p in model.get_submodule(head).parameters())
    assert run.data.metrics["val_f1_macro"] == pytest.approx(result.val_metrics["f1_macro"])
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test_metrics["accuracy"])
    # The logged model passes carclf's check; on the test photos' bytes it predicts what the network in memory
    # predicts, and what the head predicted on the cached features.
    checked, meta = load_checked_model(f"runs:/{result.run_id}/model")
    assert meta["kind"] == "network" and meta["model"] == "mobilenet_v2" and meta["classes"] == result.classes
    photos = pd.DataFrame({"image": [Path(p).read_bytes() for p in _test_paths(cfg)]})
    ic = model.input_config
    in_memory = CarClassifier(result.classes, ic.size, ic.mean, ic.std, network=model).predict(photos)
    logged = checked.predict(photos)
    assert logged["class"].tolist() == in_memory["class"].tolist() == [result.classes[i] for i in result.pred_test]
    assert np.allclose(logged["probability"].astype(float), in_memory["probability"].astype(float), atol=1e-5)


def _test_paths(cfg) -> list[str]:
    from carclf.data.prepare import prepare_data

    return prepare_data(cfg, image_size=cfg.data.image_size).test["path"].tolist()


def test_an_svm_and_probes_share_one_extraction(demo_dir, tracked, extractions):
    """The SVM on MobileNetV2's pooled features extracts them; probes with other learning rates read them."""
    run_experiment(svm_config(demo_dir), log_model=False)
    assert sorted(extractions) == ["test", "train", "val"]
    first = run_experiment(probe_config(demo_dir, lr=1e-2), log_model=False)
    second = run_experiment(probe_config(demo_dir, lr=1e-3), log_model=False)
    assert len(extractions) == 3  # nothing extracted again
    for result in (first, second):
        assert MlflowClient().get_run(result.run_id).data.metrics["feature_cache_hits"] == 3
    assert _losses(first) != _losses(second)  # another learning rate, another head


def _losses(result) -> list[float]:
    return [row["train_loss"] for row in result.history]


def test_a_probe_ignores_augmentation_and_says_so(demo_dir, tracked, extractions, caplog):
    plain = run_experiment(probe_config(demo_dir), log_model=False)
    with caplog.at_level(logging.WARNING, logger="carclf.training.probe"):
        augmented = run_experiment(probe_config(demo_dir, augment=0.5), log_model=False)
    assert "augment.strength=0.5 is ignored" in caplog.text
    assert len(extractions) == 3  # the same features: no augmented extraction
    # No augmentation anywhere: the same seed trains the same head.
    assert _losses(augmented) == _losses(plain) and augmented.val_metrics == plain.val_metrics


@pytest.mark.parametrize("name", PRETRAINED)
def test_the_probes_features_are_the_heads_input(name):
    """What the SVM calls `features: <probe_feature_mode>` on this backbone is exactly what the network's head
    reads, so the assembled network computes what the head computed on cached features."""
    size = max(32, min_image_size(name))
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, weights="none", finetune="head", image_size=size).eval()
    backbone = build_backbone(name, weights="none", features=probe_feature_mode(name), image_size=size)
    backbone.load_state_dict({f"trunk.{k}": v for k, v in
                              _trunk_state(name, model, probe_feature_mode(name)).items()})
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    head = model.get_submodule(network(name).head)
    with torch.no_grad():
        assert backbone.feature_dim == head.in_features
        assert torch.allclose(model(x), head(backbone(x)), atol=1e-5, rtol=1e-4)


def _trunk_state(name, model, mode):
    from carclf.shipped.car_classifier import feature_trunk

    return feature_trunk(name, model, mode).state_dict()


@pytest.mark.parametrize("model, weights", [("simple_cnn", "none"), ("simple_cnn", "imagenet"), ("svm", "none")])
def test_a_probe_needs_a_network_with_a_pretrained_backbone(model, weights):
    with pytest.raises(ConfigError, match=r"run\.yaml:\n  model: model\.finetune 'probe'"):
        validate_run_config({"model": {"name": model, "weights": weights, "finetune": "probe"}}, "run.yaml")
    if model == "simple_cnn":  # from scratch: head and full stay allowed
        validate_run_config({"model": {"name": model, "weights": weights, "finetune": "full"}})
    # a torchvision network may be probed even from random init (a frozen random backbone, as `head` freezes it)
    assert validate_run_config({"model": {"name": "mobilenet_v2", "weights": "none", "finetune": "probe"}})


def test_model10_probe_reads_the_svms_features(demo_dir):
    """In sweeps/model10.yaml the probe family's features are the SVM families' (same cache key per split)."""
    from carclf.data.prepare import prepare_data
    from sweeps.search.spec import load_sweep_spec

    spec = load_sweep_spec(SWEEPS / "model10.yaml")
    on_demo = {"data": {"path": str(demo_dir), "min_images": 5}}
    probe = spec.run_config({"model": "mobilenet_v2"}).model_dump(mode="json")
    probe = RunConfig.model_validate({**probe, "data": {**probe["data"], **on_demo["data"]}})
    assert probe.model.finetune == "probe"
    data = prepare_data(probe, image_size=probe.data.image_size, decode=False)
    for family in ("svm_linear", "svm_rbf"):
        svm = spec.run_config({"model": family}).model_dump(mode="json")
        svm = RunConfig.model_validate({**svm, "data": {**svm["data"], **on_demo["data"]}})
        assert svm.data.image_size == probe.data.image_size == 320
        for split in ("train", "val", "test"):
            assert (features.feature_key(feature_config(probe), data, split, weights_sha="w")
                    == features.feature_key(svm, data, split, weights_sha="w"))
        assert (feature_config(probe).svm.backbone, feature_config(probe).svm.backbone_weights) == (
            svm.svm.backbone, svm.svm.backbone_weights)


def test_the_gpu_sweep_fine_tunes_whole_networks_on_cuda():
    from sweeps.search.spec import load_sweep_spec

    spec = load_sweep_spec(SWEEPS / "model10-gpu.yaml")
    assert set(spec.models) == {"vgg16", "alexnet", "mobilenet_v2", "convnext_tiny"}
    for key in spec.models:
        cfg = spec.run_config({"model": key})
        assert (cfg.model.finetune, cfg.train.device, cfg.train.amp, cfg.model.weights) == ("full", "cuda", True,
                                                                                            "imagenet")
        assert spec.models[key].resources.gpu > 0
