"""The sweep preflight (sweeps/run/preflight.py): weights and data every trial needs, checked before Ray starts."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import encode, random_image

from carclf.core.errors import SweepError
from carclf.models import registry
from sweeps.run.preflight import preflight
from sweeps.search.spec import validate_sweep_spec


def _photos(root: Path, counts: dict[str, int]) -> Path:
    seed = 0
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            seed += 1
            (root / cls / f"{i}.png").write_bytes(encode(random_image(seed), "PNG"))
    return root


def _spec(data: Path, **base):
    spec = {"base": {"data": {"path": str(data), "image_size": 32, "min_images": 3},
                     "balance": {"mode": "none"}, "model": {"weights": "none"},
                     "svm": {"backbone": "simple_cnn", "backbone_weights": "none"}, **base},
            "models": {"simple_cnn": {"space": {"epochs": 2}}, "svm_rbf": {"model": "svm"}},
            "scheduler": {"grace_period": 1}}
    return validate_sweep_spec(spec, "sweep.yaml")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty torch hub cache, no MobileNetV2 weights package and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(registry, "mobilenet_v2_weights_file", lambda: None)

    def no_network(url, *args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)


def test_backbone_weights_that_cannot_be_resolved_refuse_the_sweep_naming_family_and_file(tmp_path, offline):
    data = _photos(tmp_path / "cars", {"a": 6, "b": 6})
    spec = _spec(data, svm={"backbone": "mobilenet_v2", "backbone_weights": "imagenet"})
    with pytest.raises(SweepError) as err:
        preflight(spec)
    msg = str(err.value)
    assert msg.startswith("models.svm_rbf: svm.backbone_weights 'imagenet' of mobilenet_v2")
    assert "mobilenet_v2-b0353104.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg


def test_a_missing_weights_file_refuses_the_sweep(tmp_path):
    data = _photos(tmp_path / "cars", {"a": 6, "b": 6})
    spec = _spec(data, model={"weights": str(tmp_path / "nope.pth")})
    with pytest.raises(SweepError, match=r"models.simple_cnn: model.weights .* weights file not found: .*nope.pth"):
        preflight(spec)


def test_available_weights_and_usable_data_pass(tmp_path, caplog):
    data = _photos(tmp_path / "cars", {"a": 6, "b": 6, "c": 6})
    with caplog.at_level(logging.WARNING):
        preflight(_spec(data))
    assert "folds" not in caplog.text


def test_an_svm_class_with_a_single_training_image_is_refused_with_the_fix(tmp_path):
    # 3 images split 0.7/0.1/0.2: one each for validation and test, one left to train on.
    data = _photos(tmp_path / "cars", {"a": 6, "b": 6, "tiny": 3})
    with pytest.raises(SweepError) as err:
        preflight(_spec(data))
    msg = str(err.value)
    assert msg.startswith("models.svm_rbf: class 'tiny'") and "single training image" in msg
    assert "data.min_images" in msg and "balance.mode oversample" in msg


def test_an_svm_class_with_two_training_images_calibrates_with_two_folds_and_says_so(tmp_path, caplog):
    data = _photos(tmp_path / "cars", {"a": 6, "b": 6, "small": 4})
    with caplog.at_level(logging.WARNING):
        preflight(_spec(data))
    assert "models.svm_rbf: class 'small' has 2 training images" in caplog.text
    assert "calibrated with 2 folds instead of 3" in caplog.text


def test_one_class_data_is_refused_naming_the_folder_and_the_classes_found(tmp_path):
    data = _photos(tmp_path / "cars", {"only": 8, "few": 2})
    with pytest.raises(SweepError) as err:
        preflight(_spec(data))
    msg = str(err.value)
    assert f"{data}: a classifier needs at least 2 classes" in msg
    assert "keeps 1 (only)" in msg and "few (2), only (8)" in msg and "data.min_images (3)" in msg


def test_a_data_path_that_is_a_file_is_refused_naming_it(tmp_path):
    data = tmp_path / "cars.zip"
    data.write_bytes(b"PK")
    with pytest.raises(SweepError, match=f"data.path {data} is a file"):
        preflight(_spec(data))


def test_run_sweep_runs_the_preflight_before_anything_is_written(tmp_path, monkeypatch):
    from sweeps.run import runner

    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    data = _photos(tmp_path / "cars", {"a": 6, "b": 6})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"base": {"data": {"path": str(data), "image_size": 32},
                                             "model": {"weights": str(tmp_path / "nope.pth")}},
                                    "models": {"simple_cnn": {"space": {"epochs": 1}}}}))
    import sweeps.run.driver

    monkeypatch.setattr(sweeps.run.driver, "_resolve_weights_paths", lambda spec: spec)  # let the file reach the preflight
    with pytest.raises(SweepError, match="models.simple_cnn: model.weights"):
        runner.run_sweep(path)
    assert not (tmp_path / "results").exists()
