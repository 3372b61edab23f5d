"""The local MLflow tracking server: starts healthy, takes runs over HTTP, stops without leftovers, fails clearly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from carclf.errors import TrackingError
from carclf.server import TrackingServer, free_port, port_in_use


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (it holds no port and no database).
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def test_port_taken_is_refused_naming_the_port(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        with pytest.raises(TrackingError, match=f"port {port}"):
            TrackingServer(f"sqlite:///{tmp_path}/mlflow.db", port=port).start()


def test_missing_database_folder_is_refused(tmp_path):
    with pytest.raises(TrackingError, match="does not exist"):
        TrackingServer(f"sqlite:///{tmp_path}/nowhere/mlflow.db")


def test_free_port_is_free():
    assert not port_in_use("127.0.0.1", free_port())


@pytest.mark.slow
def test_server_serves_runs_and_stops_its_processes(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    with TrackingServer(f"sqlite:///{db}", artifacts_destination=tmp_path / "art") as server:
        assert server.url.startswith("http://127.0.0.1:")
        client = MlflowClient(server.url)
        exp = client.create_experiment("e")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "m", 0.5)
        pid = server._proc.pid
        assert _alive(pid)
    # The run went into the sqlite file behind the server.
    assert MlflowClient(f"sqlite:///{db}").get_run(run.info.run_id).data.metrics["m"] == 0.5
    deadline = time.time() + 10
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(pid)
    assert not server.running


@pytest.mark.slow
def test_server_that_cannot_start_says_why(tmp_path):
    # An unknown store scheme makes `mlflow server` exit at start-up.
    with pytest.raises(TrackingError, match="exited with code"):
        TrackingServer("nosuchstore://x", artifacts_destination=tmp_path / "art").start()


@pytest.mark.slow
def test_cli_server_prints_the_uri_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    env = dict(os.environ, CARCLF_PROJECT_ROOT=str(tmp_path))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "carclf.cli", "server", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("export MLFLOW_TRACKING_URI="):
                break
        assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{port}\n" in lines, "".join(lines)
        assert (tmp_path / "mlflow.db").is_file()  # the project's database by default
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert not port_in_use("127.0.0.1", port) or _wait_port_free(port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_port_free(port: int, timeout: float = 10) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not port_in_use("127.0.0.1", port):
            return True
        time.sleep(0.2)
    return False
