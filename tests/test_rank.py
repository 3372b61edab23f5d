"""Ranking backbones before training: LogME on each candidate's cached train features, from the API and `carclf rank`."""

from __future__ import annotations

import shutil

import pytest

from carclf.cli import main
from carclf.config import RunConfig
from carclf.core.errors import ConfigError
from carclf.training import features
from carclf.training.rank import Candidate, parse_backbones, rank_backbones


def run_config(path, tmp_path, size=32) -> RunConfig:
    return RunConfig.model_validate({"data": {"path": str(path), "image_size": size,
                                              "cache_dir": str(tmp_path / "cache")}, "train": {"batch_size": 16}})


@pytest.mark.slow
def test_scores_each_candidate_best_first_and_reads_the_features_back_the_second_time(demo_dir, tmp_path,
                                                                                        monkeypatch):
    cfg = run_config(demo_dir, tmp_path)
    candidates = [Candidate("simple_cnn", "none"), Candidate("mobilenet_v2", "none")]
    first = rank_backbones(cfg, candidates)
    assert sorted(s.backbone for s in first) == ["mobilenet_v2 (none)", "simple_cnn (none)"]
    assert [s.logme for s in first] == sorted((s.logme for s in first), reverse=True)
    assert not any(s.cached for s in first) and all(s.n_train > 0 for s in first)

    monkeypatch.setattr(features, "build_feature_backbone", lambda cfg: pytest.fail("features were not reused"))
    again = rank_backbones(cfg, candidates)
    assert all(s.cached for s in again)
    assert [(s.backbone, s.logme) for s in again] == [(s.backbone, s.logme) for s in first]


def test_a_misspelt_backbone_is_refused_before_any_data_is_read(demo_dir, tmp_path, monkeypatch, capsys):
    import carclf.training.rank

    monkeypatch.setattr(carclf.training.rank, "prepare_data", lambda *a, **k: pytest.fail("data read before the check"))
    code = main(["rank", str(demo_dir), "--backbones", "mobilenet_v2,mobilenet_v3", "--image-size", "32",
                 "--set", f"data.cache_dir={tmp_path}"])
    assert code == 2
    assert "mobilenet_v3" in capsys.readouterr().err


def test_an_image_size_below_a_backbones_minimum_is_refused(demo_dir, tmp_path):
    with pytest.raises(ConfigError, match="--image-size 32"):
        rank_backbones(run_config(demo_dir, tmp_path, size=16), [Candidate("mobilenet_v2", "none")])


@pytest.mark.parametrize("text", ["", "a,,b", "a,b,a"])
def test_backbone_lists_must_name_each_backbone_once(text):
    with pytest.raises(ConfigError, match="--backbones"):
        parse_backbones(text)


@pytest.mark.slow
def test_cli_prints_the_table(demo_dir, tmp_path, capsys):
    code = main(["rank", str(demo_dir), "--backbones", "simple_cnn,mobilenet_v2", "--image-size", "32",
                 "--set", "svm.backbone_weights=none", "--set", f"data.cache_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0
    assert "LogME" in out and "simple_cnn" in out and "mobilenet_v2" in out


@pytest.mark.slow
@pytest.mark.real_data
def test_pretrained_mobilenet_scores_above_the_same_network_at_random_init(real_data_dir, tmp_path):
    """On 3 classes x 16 real car photos: ImageNet features carry the car model, random ones do not."""
    small = tmp_path / "cars"
    for folder in sorted(p for p in real_data_dir.iterdir() if p.is_dir())[:3]:
        (small / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:16]:
            shutil.copy(photo, small / folder.name / photo.name)
    scores = rank_backbones(run_config(small, tmp_path, size=64),
                            [Candidate("mobilenet_v2", "none"), Candidate("mobilenet_v2", "imagenet")])
    assert [s.backbone for s in scores] == ["mobilenet_v2 (imagenet)", "mobilenet_v2 (none)"]
