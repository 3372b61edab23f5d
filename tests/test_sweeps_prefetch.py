"""Sweeps, features before the trials: every set a family's config or searched choices name, extracted once."""

from __future__ import annotations

import collections

import pytest
import yaml


def _spec(data_dir, models: dict, **over):
    from sweeps.search.spec import validate_sweep_spec

    return validate_sweep_spec(_spec_dict(data_dir, models, **over))


def _spec_dict(data_dir, models: dict, **over) -> dict:
    return {"base": {"data": {"path": str(data_dir), "image_size": 32, "min_images": 2},
                     "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "balance": {"mode": "none"},
                     "augment": {"strength": 0.0}, "train": {"device": "cpu", "num_workers": 0, "amp": False},
                     "model": {"weights": "none"}, "svm": {"backbone": "simple_cnn", "backbone_weights": "none"},
                     "tracking": {"experiment": "sweeps"}},
            "models": models, "num_samples": 4, **over}


def test_a_backbone_named_only_in_a_searched_choice_is_a_feature_set(demo_dir, tmp_path):
    from sweeps.run.prefetch import family_features

    spec = _spec(demo_dir, {"svm": {"space": {"backbone": {"choices": ["simple_cnn", "alexnet"]}}},
                            "net": {"model": "simple_cnn", "space": {"epochs": 2}}})
    configs, splits, note = family_features(spec, "svm", {"data": {"cache_dir": str(tmp_path)}})
    assert sorted(c.svm.backbone for c in configs) == ["alexnet", "simple_cnn"]
    assert splits == ("train", "val") and note == ""
    assert {str(c.data.cache_dir) for c in configs} == {str(tmp_path)}  # the trials' paths
    assert family_features(spec, "net", {}) is None  # a network trained on images reads no features


def test_a_searched_range_leaves_the_train_split_to_the_trials(demo_dir):
    from sweeps.run.prefetch import family_features

    spec = _spec(demo_dir, {"svm": {"space": {"samples_per_class": {"low": 5, "high": 20}}},
                            "probe": {"model": "mobilenet_v2", "space": {"finetune": {"choices": ["head", "probe"]},
                                                                        "epochs": 2}}})
    configs, splits, note = family_features(spec, "svm", {})
    assert splits == ("val",) and "samples_per_class" in note and len(configs) == 1
    configs, splits, _ = family_features(spec, "probe", {})
    assert splits == ("train", "val") and [c.model.finetune for c in configs] == ["probe"]


@pytest.mark.slow
def test_the_driver_extracts_each_split_once_before_any_trial_and_trials_extract_nothing(
        demo_dir, tmp_path, tracked, extractions, monkeypatch, capsys):
    from carclf.experiment import run_experiment
    from sweeps.run.driver import plan_sweep, prepare_stores, trial_context
    from sweeps.run.trial import _feature_key, _fill_paths, trial_config

    models = {"svm_linear": {"model": "svm", "space": {"kernel": "linear"}},
              "svm_rbf": {"model": "svm", "space": {"kernel": "rbf",
                                                    "backbone": {"choices": ["simple_cnn", "mobilenet_v2"]}}}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_spec_dict(demo_dir, models)))
    plan = plan_sweep(path, name=None, address=None, resume=False, storage_path=None, tracking_uri=tracked)
    prepare_stores(plan, None)
    # simple_cnn for both families, once; mobilenet_v2 only because svm_rbf's choice names it
    assert collections.Counter((b, s) for b, s, _ in extractions) == {("simple_cnn", "train"): 1, ("simple_cnn", "val"): 1,
                                              ("mobilenet_v2", "train"): 1, ("mobilenet_v2", "val"): 1}
    assert f"4 split(s) extracted, 0 set(s) already cached; " in capsys.readouterr().out

    # the trials read their features and extract none (they build the backbone only to time the whole
    # classifier on a few images, carclf.training.timing)
    ctx = trial_context(plan, tracked, parent_run_id="p")
    for params in ({"model": "svm_linear", "svm_linear.kernel": "linear", "svm_linear.C": 1.0},
                   {"model": "svm_rbf", "svm_rbf.kernel": "rbf", "svm_rbf.C": 1.0, "svm_rbf.backbone": "mobilenet_v2"}):
        cfg = trial_config(ctx, params, "t0")
        assert _fill_paths(cfg.data.cache_dir, _feature_key(cfg))[1].exists()  # no trial waits for another
        result = run_experiment(cfg, evaluate_test=False, log_model=False)
        assert 0.0 <= result.val_metrics["accuracy"] <= 1.0
    assert len(extractions) == 4
