"""The MLflow layer: absolute URIs, experiments created once, run status on failure, artifacts and models."""

from __future__ import annotations

import importlib.util
import io
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
from PIL import Image

from carclf.config import RunConfig
from carclf.core.errors import TrackingError
from carclf.tracking import runs as tracking

MODEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where a loaded model runs

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


def _photos(n: int, size: int = 24) -> list[bytes]:
    """n distinct encoded images of mixed formats and modes (what a user would post)."""
    out = []
    for i in range(n):
        rgb = np.random.default_rng(i).integers(0, 256, (size, size + 8 * i, 3), dtype=np.uint8)
        img = Image.fromarray(rgb, "RGB")
        buf = io.BytesIO()
        (img.convert("L") if i % 3 == 2 else img).save(buf, format="PNG" if i % 2 else "JPEG")
        out.append(buf.getvalue())
    return out


def _eval_batch(photos: list[bytes], input_config) -> torch.Tensor:
    """What carclf's own evaluation feeds a network: decode-cache decoding, then the eval preset, on the
    device a loaded model picks (so a CUDA host compares like with like)."""
    from carclf.data.cache import decode_image
    from carclf.data.transforms import EvalPreset

    preset = EvalPreset(input_config)
    return torch.stack([preset(decode_image(p, input_config.size)) for p in photos]).to(MODEL_DEVICE)


def _metadata(net, classes, **extra) -> dict:
    from dataclasses import asdict

    return {"classes": classes, "input_config": asdict(net.input_config), **extra}


def test_network_model_is_one_pyfunc_from_photo_bytes_to_class_probabilities(tracked):
    from carclf.models.networks import build_model

    torch.manual_seed(0)
    classes = ["bus", "van", "sedan"]
    net = build_model("simple_cnn", num_classes=3, weights="none", image_size=16).eval()
    photos = _photos(5)
    with tracking.start_run(experiment="cars"):
        info = tracking.log_network_model(net, input_example=photos[:1],
                                          metadata=_metadata(net, classes, model="simple_cnn", kind="network"))
    model = mlflow.pyfunc.load_model(info.model_uri)
    with torch.inference_mode():
        expected = torch.softmax(net.to(MODEL_DEVICE)(_eval_batch(photos, net.input_config)), dim=1).cpu().numpy()
    for batch in (photos, photos[-1:]):  # any batch size
        out = model.predict(pd.DataFrame({"image": batch}), params={"top_k": 2})
        probs = expected[-len(batch):]
        assert out["class"].tolist() == [classes[i] for i in probs.argmax(1)]
        assert np.allclose(out["probability"].astype(float), probs.max(1), atol=1e-5)
        assert all(len(t) == 2 for t in out["top_classes"]) and (out["error"] == "").all()
    # Weights as a plain state_dict that loads without unpickling; no torch.export program.
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    state = torch.load(local / "artifacts" / "weights.pt", weights_only=True)
    assert set(state) == set(net.state_dict()) and not list(local.rglob("*.pt2"))
    assert info.signature.inputs.input_names() == ["image"] and info.signature.params.to_dict()[0]["name"] == "top_k"


def test_svm_model_ships_its_backbone_and_predicts_what_backbone_plus_pipeline_predict(tracked):
    from carclf.models.networks import build_backbone, build_model

    torch.manual_seed(0)
    backbone = build_backbone("simple_cnn", weights="none", image_size=16)
    photos = _photos(12)
    with torch.inference_mode():
        features = backbone.to(MODEL_DEVICE)(_eval_batch(photos, backbone.input_config)).cpu().numpy()
    labels = np.arange(12) % 3
    pipe = build_model("svm", num_classes=3, C=10.0, cv=2).fit(features, labels)
    meta = _metadata(backbone, ["a", "b", "c"], kind="svm", model="svm", backbone="simple_cnn", features="gap")
    with tracking.start_run(experiment="cars"):
        info = tracking.log_svm_model(pipe, backbone, input_example=photos[:1], metadata=meta)
    out = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"image": photos}))
    assert out["class"].tolist() == [["a", "b", "c"][i] for i in pipe.predict(features)]
    assert np.allclose(out["probability"].astype(float), pipe.predict_proba(features).max(1), atol=1e-6)
    loaded = mlflow.models.get_model_info(info.model_uri)
    assert loaded.metadata["classes"] == ["a", "b", "c"] and loaded.metadata["backbone"] == "simple_cnn"
    assert (Path(mlflow.artifacts.download_artifacts(info.model_uri)) / "artifacts" / "svm.skops").is_file()


def test_svm_pipeline_with_a_type_the_loader_does_not_trust_is_refused_at_logging(tracked):
    import operator

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer
    from sklearn.svm import SVC

    from carclf.models.networks import build_backbone

    x, y = np.random.default_rng(0).random((8, 4)), np.arange(8) % 2
    pipe = Pipeline([("neg", FunctionTransformer(operator.neg)), ("svc", SVC())]).fit(x, y)
    backbone = build_backbone("simple_cnn", weights="none", image_size=16)
    meta = _metadata(backbone, ["a", "b"], kind="svm", model="svm", backbone="simple_cnn", features="gap")
    with tracking.start_run(experiment="cars"):
        with pytest.raises(TrackingError, match="_operator.neg"):
            tracking.log_svm_model(pipe, backbone, input_example=_photos(1), metadata=meta)


class _FakeServer:
    """Stands in for carclf.tracking.server.TrackingServer in `carclf ui`: records what it was given and what had been
    printed when it started; Ctrl+C right after."""

    def __init__(self, capsys, uri, port):
        self.uri, self.port, self.capsys, self.printed_before_start = uri, port, capsys, None
        self.url = f"http://127.0.0.1:{port}"
        _FakeServer.last = self

    def __enter__(self):
        self.printed_before_start = self.capsys.readouterr().out
        return self

    def __exit__(self, *exc):
        return False

    @property
    def running(self):
        raise KeyboardInterrupt


def _fake_ui(monkeypatch, capsys):
    from carclf.tracking import runs

    monkeypatch.setattr(runs, "TrackingServer", lambda uri, port: _FakeServer(capsys, uri, port))


def test_cli_ui_prints_its_links_once_the_server_answers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    _fake_ui(monkeypatch, capsys)
    port = _free_port()
    args = type("Args", (), {"backend_store_uri": "sqlite:///m.db", "port": port})()
    assert tracking.cli_ui(args) == 0
    fake = _FakeServer.last
    assert fake.uri == f"sqlite:///{tmp_path.resolve()}/m.db" and fake.port == port
    assert f"http://127.0.0.1:{port}" not in fake.printed_before_start
    assert f"MLflow UI: http://127.0.0.1:{port}/#/experiments?workflowType=machine_learning" in capsys.readouterr().out


def test_the_ui_server_is_the_light_one_on_loopback_with_the_store_off_its_command_line():
    from carclf.tracking.server import TrackingServer

    server = TrackingServer("postgresql://mlflow:secret@db:5432/mlflow", port=5055)
    cmd, env = server._command(), server._environment()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--workers") + 1] == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"  # no job runner and its consumers
    assert env["MLFLOW_BACKEND_STORE_URI"] == "postgresql://mlflow:secret@db:5432/mlflow"
    assert not [a for a in cmd if "secret" in a]


def test_cli_ui_keeps_a_database_password_off_the_screen(monkeypatch, capsys):
    _fake_ui(monkeypatch, capsys)
    monkeypatch.setattr(tracking, "_check_database_driver", lambda uri: None)  # as if psycopg were installed
    args = type("Args", (), {"backend_store_uri": "postgresql://mlflow:secret@db:5432/mlflow", "port": _free_port()})()
    assert tracking.cli_ui(args) == 0
    out = _FakeServer.last.printed_before_start + capsys.readouterr().out
    assert "secret" not in out and "postgresql://mlflow:***@db:5432/mlflow" in out


def test_cli_ui_on_a_port_in_use_exits_non_zero_at_once_and_names_another(tmp_path, monkeypatch, capsys):
    import socket
    import time

    from carclf.cli import main

    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        assert main(["ui", "--port", str(port)]) == 2
        assert time.monotonic() - start < 10
    captured = capsys.readouterr()
    assert f"port {port} is in use; try --port " in captured.err
    assert "http://" not in captured.out  # no links for a server that is not there


def _free_port() -> int:
    with socket.socket() as s:  # a port that was just free: nothing listens there
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_with_credentials_names_the_real_reason_without_the_password():
    port = _free_port()
    with pytest.raises(TrackingError) as err:
        tracking.resolve_tracking_uri(f"http://user:secret@127.0.0.1:{port}")
    msg = str(err.value)
    assert "secret" not in msg and f"http://user:***@127.0.0.1:{port}" in msg
    # The host is 127.0.0.1, not 'user:secret@127.0.0.1' (a name that never resolves): the port is closed.
    assert "refused" in msg.lower(), msg


def test_a_run_against_a_uri_with_credentials_records_and_logs_no_password(tracked, tmp_path, caplog):
    """Params, tags, config.yaml, the failure tag and the log lines of a run all hold the URI redacted."""
    cfg = RunConfig.model_validate({"tracking": {"uri": "http://trainer:secret@mlflow.internal:5000"}})
    with caplog.at_level("DEBUG"), pytest.raises(TrackingError):
        with tracking.start_run(experiment="cars") as run:
            tracking.log_config(cfg)
            tracking.resolve_tracking_uri(f"http://trainer:secret@127.0.0.1:{_free_port()}")  # fails, inside the run
    got = MlflowClient().get_run(run.info.run_id)
    assert got.data.params["tracking.uri"] == "http://trainer:***@mlflow.internal:5000"
    recorded = [*got.data.params.values(), *got.data.tags.values()]
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "dl")))
    recorded.append((local / "config.yaml").read_text())
    assert got.info.status == "FAILED" and "trainer:***@127.0.0.1" in got.data.tags[tracking.ERROR_TAG]
    assert not [text for text in recorded if "secret" in text]
    assert "secret" not in caplog.text


def test_processes_that_first_touch_a_new_sqlite_store_at_once_all_get_the_same_experiment(tmp_path):
    # Two sweeps started together on a new project both create mlflow.db; MLflow's migrations, run by
    # both at once, collided ("duplicate column name") before the first access was serialised.
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from carclf.tracking.runs import ensure_experiment; print(ensure_experiment('together', sys.argv[1]))"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in outs]
    assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1


@pytest.mark.skipif(importlib.util.find_spec("psycopg") is not None, reason="psycopg is installed here")
def test_a_postgres_uri_without_its_driver_names_the_extra_before_anything_starts():
    from carclf.core.errors import TrackingError
    from carclf.tracking.runs import resolve_tracking_uri

    with pytest.raises(TrackingError) as err:
        resolve_tracking_uri("postgresql://me:secret@db.example/mlflow")
    msg = str(err.value)
    assert "needs the database driver 'psycopg'" in msg and "pip install 'carclf[postgres]'" in msg
    assert "secret" not in msg


def test_a_database_uri_sqlalchemy_cannot_read_is_named():
    from carclf.core.errors import TrackingError
    from carclf.tracking.runs import resolve_tracking_uri

    with pytest.raises(TrackingError, match="is not a database URL SQLAlchemy understands"):
        resolve_tracking_uri("postgresql+nosuchdriver://db.example/mlflow")


def test_a_damaged_sqlite_store_is_named_before_mlflow_touches_it(tmp_path):
    import sqlite3

    from carclf.core.errors import TrackingError
    from carclf.tracking.runs import resolve_tracking_uri

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE runs (id TEXT)")
    assert resolve_tracking_uri(f"sqlite:///{db}") == f"sqlite:///{db}"  # a sound store passes
    with open(db, "r+b") as f:
        f.write(b"garbage" * 20)  # its first page overwritten
    before = db.read_bytes()
    with pytest.raises(TrackingError, match=f"tracking store {db} is not a readable SQLite database"):
        resolve_tracking_uri(f"sqlite:///{db}")
    assert db.read_bytes() == before  # read only
