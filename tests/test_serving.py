"""Registered models serve anyone: a Python process without carclf, and `mlflow models serve` over HTTP."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from conftest import REAL_DATA
from mlflow.tracking import MlflowClient
from tiny_sweep import split_paths, sweeps, uri  # noqa: F401 - fixtures

from carclf.serving.promote import promote

FAMILIES = ("svm_rbf", "simple_cnn")
SERVE_START_S = 240  # loading torch, MLflow and the model on a loaded 2-core machine

# Run in a fresh interpreter: carclf cannot be imported there, so the model must carry all it needs.
_WITHOUT_CARCLF = r"""
import json, sys

class NoCarclf:
    def find_spec(self, name, path=None, target=None):
        if name == "carclf" or name.startswith("carclf."):
            raise ModuleNotFoundError("carclf is not installed here", name=name)
        return None

sys.meta_path.insert(0, NoCarclf())
import mlflow
import pandas as pd

out = {}
for uri, paths in json.load(sys.stdin).items():
    images = [open(p, "rb").read() for p in paths]
    pred = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": images}))
    out[uri] = {"classes": pred["class"].tolist(), "errors": pred["error"].tolist()}
assert "carclf" not in sys.modules
print("RESULT " + json.dumps(out))
"""


def _representative(sweeps, model):
    return next(f for f in sweeps.good.families if f.model == model).representative


@pytest.mark.slow
def test_registered_models_predict_like_the_retest_in_a_process_without_carclf(sweeps, uri, tmp_path):
    promote("good")
    client = MlflowClient(uri)
    request = {f"models:/carclf-{m}@champion": split_paths(client, _representative(sweeps, m).run_id)
               for m in FAMILIES}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_CARCLF], input=json.dumps(request), env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.rsplit("RESULT ", 1)[1])
    for m in FAMILIES:
        rep = _representative(sweeps, m)
        got = answers[f"models:/carclf-{m}@champion"]
        assert got["errors"] == [""] * len(rep.pred)
        assert got["classes"] == [rep.classes[i] for i in rep.pred], m


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _served(model_uri: str, log_path: Path):
    """`mlflow models serve` on 127.0.0.1 with the venv's bin on PATH (it starts uvicorn by name); the whole
    process group is stopped on leaving, whatever happened inside."""
    port, bin_dir = _free_port(), Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(url, proc, log_path)
        yield url
    finally:
        _stop(proc)


def _wait_until_up(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVE_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow models serve exited ({proc.returncode}): {log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"mlflow models serve did not answer in {SERVE_START_S} s: {log_path.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())["predictions"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.mark.slow
def test_served_model_answers_posted_photos_with_class_names(sweeps, uri, tmp_path):
    promote("good", model="svm_rbf")
    rep = _representative(sweeps, "svm_rbf")
    known = split_paths(MlflowClient(uri), rep.run_id)[0]  # evaluation predicted rep.pred[0] for it
    photos = sorted(REAL_DATA.rglob("*.jpg"))[:1] if REAL_DATA.is_dir() else []
    images = [Path(known).read_bytes(), b"not an image", *(p.read_bytes() for p in photos)]
    with _served("models:/carclf-svm_rbf@champion", tmp_path / "serve.log") as url:
        split = _post(url, {"dataframe_split": {"columns": ["image"], "data": [[_b64(i)] for i in images]},
                            "params": {"top_k": 2}})
        records = _post(url, {"dataframe_records": [{"image": _b64(images[0])}]})
    assert len(split) == len(images)
    assert split[0]["class"] == rep.classes[rep.pred[0]] and split[0]["error"] == ""
    assert split[0]["top_classes"][0] == split[0]["class"] and len(split[0]["top_classes"]) == 2
    assert split[1]["class"] is None and "cannot identify image file" in split[1]["error"]
    assert all(row["class"] in rep.classes and row["error"] == "" for row in split[2:])  # a real photo
    assert records[0]["class"] == split[0]["class"] and len(records[0]["top_classes"]) == 3  # default top_k


@pytest.mark.parametrize("top_k", [-5, 0, "x", 2.5, None, [1]])
def test_a_bad_top_k_is_mlflows_invalid_parameter_error_in_one_line(top_k):
    from mlflow.exceptions import MlflowException

    from carclf.shipped.pyfunc_model import CarClassifierModel

    model = CarClassifierModel()
    model.classifier = None  # never reached: the parameter is checked first
    with pytest.raises(MlflowException) as err:
        model.predict(None, pd.DataFrame({"image": [b""]}), params={"top_k": top_k})
    assert err.value.error_code == "INVALID_PARAMETER_VALUE" and err.value.get_http_status_code() == 400
    assert err.value.message.startswith("params.top_k must be a whole number of at least 1")
    assert "\n" not in err.value.message and err.value.json_kwargs.get("stack_trace") is None


def test_a_whole_top_k_reaches_the_classifier():
    from carclf.shipped.pyfunc_model import CarClassifierModel

    seen = []
    model = CarClassifierModel()
    model.classifier = type("Stub", (), {"predict": lambda self, frame, top_k: seen.append(top_k)})()
    model.predict(None, pd.DataFrame({"image": [b""]}), params={"top_k": "2"})
    model.predict(None, pd.DataFrame({"image": [b""]}), params=None)
    assert seen == [2, 3]
