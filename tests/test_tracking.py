"""The MLflow layer: absolute URIs, experiments created once, run status on failure, artifacts and models."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from carclf import tracking
from carclf.config import RunConfig
from carclf.errors import TrackingError


def test_relative_sqlite_uri_is_made_absolute_under_the_project_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert tracking.resolve_tracking_uri("sqlite:///runs/m.db") == f"sqlite:///{tmp_path.resolve()}/runs/m.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"


def test_default_uri_is_the_environment_or_the_project_database(tmp_path, monkeypatch):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking.resolve_tracking_uri() == "sqlite:////elsewhere/x.db"


def test_unreachable_server_is_reported_quickly_with_its_uri():
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}"):
        tracking.resolve_tracking_uri(uri)
    assert time.perf_counter() - start < 5


def test_experiment_is_created_once_with_an_absolute_artifact_location(tracked, tmp_path, monkeypatch):
    exp_id = tracking.ensure_experiment("cars", tracked)
    monkeypatch.setattr(tracking, "_experiment_ids", {})  # a fresh process elsewhere finds the same experiment
    monkeypatch.chdir(tmp_path / "..")
    assert tracking.ensure_experiment("cars", tracked) == exp_id
    location = MlflowClient(tracked).get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "mlartifacts" / "cars").resolve().as_uri()


def test_child_run_links_to_its_parent_and_finishes(tracked):
    with tracking.start_run(experiment="cars", run_name="sweep") as parent:
        parent_id = parent.info.run_id
    with tracking.start_run(experiment="cars", parent_run_id=parent_id, tags={"carclf.role": "trial"}) as child:
        child_id = child.info.run_id
    run = MlflowClient().get_run(child_id)
    assert run.data.tags["mlflow.parentRunId"] == parent_id and run.data.tags["carclf.role"] == "trial"
    assert run.info.status == "FINISHED" and mlflow.active_run() is None


def test_a_failing_block_ends_the_run_failed_with_the_error_text(tracked):
    with pytest.raises(ValueError, match="bad batch"):
        with tracking.start_run(experiment="cars") as run:
            raise ValueError("bad batch")
    got = MlflowClient().get_run(run.info.run_id)
    assert got.info.status == "FAILED" and "bad batch" in got.data.tags[tracking.ERROR_TAG]
    assert mlflow.active_run() is None


def test_config_params_and_artifacts_round_trip(tracked, tmp_path, run_artifacts):
    cfg = RunConfig.model_validate({"train": {"lr": 0.01}, "data": {"classes": ["a", "b"]}})
    df = pd.DataFrame({"class": ["a", "b"], "f1": [0.5, 1.0]})
    with tracking.start_run(experiment="cars") as run:
        tracking.log_config(cfg)
        tracking.log_json({"counts": np.array([[1, 0], [2, 3]])}, "confusion_val.json")
        tracking.log_dataframe(df, "per_class_val.csv")
        tracking.log_dataframe(df, "data/manifest.parquet")
        tracking.log_metrics({"val_f1": np.float64(0.5), "nan": float("nan"), "flag": True}, step=1)
        with pytest.raises(ValueError, match="parquet or .csv"):
            tracking.log_dataframe(df, "table.txt")
    run_id = run.info.run_id
    data = MlflowClient().get_run(run_id).data
    assert data.params["train.lr"] == "0.01" and data.params["data.classes"] == '["a", "b"]'
    assert data.metrics == {"val_f1": 0.5}
    assert {"config.yaml", "confusion_val.json", "per_class_val.csv", "data/manifest.parquet"} <= run_artifacts(run_id)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "dl")))
    assert json.loads((local / "confusion_val.json").read_text())["counts"] == [[1, 0], [2, 3]]
    pd.testing.assert_frame_equal(pd.read_parquet(local / "data/manifest.parquet"), df)
    assert RunConfig.model_validate(__import__("yaml").safe_load((local / "config.yaml").read_text())) == cfg


def test_svm_model_loads_back_in_skops_format_and_predicts_the_same(tracked):
    from carclf.models import build_model

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(60, 6)) + np.repeat(np.eye(3, 6) * 4, 20, axis=0)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    pipe = build_model("svm", num_classes=3, C=2.0).fit(x, y)
    with tracking.start_run(experiment="cars"):
        info = tracking.log_svm_model(pipe, input_example=x[:2], metadata={"classes": ["a", "b", "c"]})
    assert info.flavors["sklearn"]["serialization_format"] == "skops"
    loaded = mlflow.sklearn.load_model(info.model_uri)
    assert np.array_equal(loaded.predict(x), pipe.predict(x))
    assert mlflow.models.get_model_info(info.model_uri).metadata["classes"] == ["a", "b", "c"]


def test_network_model_loads_back_in_pt2_format_with_any_batch_size(tracked):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3))
    example = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    with tracking.start_run(experiment="cars"):
        info = tracking.log_network_model(net, input_example=example, metadata={"classes": ["a", "b", "c"]})
    x = np.random.default_rng(1).random((5, 3, 16, 16), dtype=np.float32)
    out = np.asarray(mlflow.pyfunc.load_model(info.model_uri).predict(x))
    with torch.inference_mode():
        assert np.allclose(out, net(torch.from_numpy(x)).numpy(), atol=1e-5)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert (local / "data" / "model.pt2").is_file() and not (local / "data" / "model.pth").exists()
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3, 16, 16]
    with pytest.raises(ValueError, match="N>=2"):
        tracking.log_network_model(net, input_example=example[:1], metadata={})


def test_cli_ui_runs_mlflow_ui_on_loopback_with_an_absolute_uri(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    calls = []
    monkeypatch.setattr(tracking.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    args = type("Args", (), {"backend_store_uri": "sqlite:///m.db", "port": 5055})()
    assert tracking.cli_ui(args) == 0
    cmd = calls[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5055"
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/m.db"
    assert "http://127.0.0.1:5055" in capsys.readouterr().out
    assert os.path.isabs(cmd[cmd.index("--backend-store-uri") + 1][len("sqlite:///"):])
