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

from carclf.core.errors import TrackingError
from carclf.tracking.server import TrackingServer, free_port, port_in_use


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


# --------------------------------------------------------------------------- reachable beyond loopback


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 120) -> list[str]:
    """Lines of proc's output up to the one starting with `marker` (fails after `timeout` s)."""
    import queue
    import threading

    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, "".join(seen)
            continue
        seen.append(line)
        if line.startswith(marker):
            return seen
    raise AssertionError(f"no line starting with {marker!r} within {timeout} s:\n{''.join(seen)}")


def _request(url: str, host: str, *, data: bytes | None = None, origin: str | None = None,
             login: tuple[str, str] | None = None):
    """(status, body) of a request to `url` carrying the Host header a client of `host` would send."""
    import base64
    import urllib.error
    import urllib.request

    headers = {"Host": host, "Content-Type": "application/json"}
    if origin:
        headers["Origin"] = origin
    if login:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(login).encode()).decode()
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_cli_server_on_every_interface_warns_and_its_printed_url_answers(tmp_path):
    import json
    from urllib.parse import urlsplit

    port = free_port()
    env = dict(os.environ, CARCLF_PROJECT_ROOT=str(tmp_path))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "carclf.cli", "server", "--host", "0.0.0.0", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = "".join(_read_until(proc, "export MLFLOW_TRACKING_URI="))
        assert "NO authentication" in out and f"0.0.0.0:{port}" in out, out
        url = out.split("export MLFLOW_TRACKING_URI=")[1].split()[0]
        host = urlsplit(url).netloc  # what a client of the printed URL sends as Host header
        assert urlsplit(url).hostname not in ("127.0.0.1", "localhost", "0.0.0.0") and host.endswith(f":{port}")
        local = f"http://127.0.0.1:{port}"  # the same server; the test machine need not resolve its own name
        assert _request(f"{local}/health", host)[0] == 200
        status, body = _request(f"{local}/api/2.0/mlflow/experiments/search?max_results=5", host)
        assert status == 200 and "experiments" in json.loads(body), body
        # A change from the UI at the printed URL (its origin) is accepted too.
        status, body = _request(f"{local}/api/2.0/mlflow/experiments/create", host, origin=url,
                                data=json.dumps({"name": "from-the-printed-url"}).encode())
        assert status == 200, body
        # Host checking is on, not switched off: a name this machine does not have is refused.
        assert _request(f"{local}/api/2.0/mlflow/experiments/search?max_results=5", f"evil.example:{port}")[0] == 403
    finally:
        _stop(proc)


@pytest.mark.slow
def test_cli_server_with_basic_auth_refuses_requests_without_the_password(tmp_path):
    pytest.importorskip("flask_wtf", reason='MLflow\'s basic-auth app needs pip install "mlflow[auth]"')
    port, password = free_port(), "a-long-admin-password"
    env = dict(os.environ, CARCLF_PROJECT_ROOT=str(tmp_path), MLFLOW_FLASK_SERVER_SECRET_KEY="test-key",
               MLFLOW_AUTH_ADMIN_PASSWORD=password)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_AUTH_CONFIG_PATH", None)
    proc = subprocess.Popen([sys.executable, "-m", "carclf.cli", "server", "--host", "0.0.0.0", "--port", str(port),
                             "--basic-auth"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out = "".join(_read_until(proc, "export MLFLOW_TRACKING_URI="))
        assert "basic authentication over plain HTTP" in out and "NO authentication" not in out, out
        host = out.split("export MLFLOW_TRACKING_URI=http://")[1].split()[0]
        search = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=5"
        assert _request(search, host)[0] == 401
        assert _request(search, host, login=("admin", "wrong-password"))[0] == 401
        assert _request(search, host, login=("admin", password))[0] == 200
        assert (tmp_path / "basic_auth.db").is_file()  # the users live beside the project's mlflow.db
    finally:
        _stop(proc)


def test_basic_auth_without_its_secret_key_is_refused_before_starting(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_FLASK_SERVER_SECRET_KEY", raising=False)
    server = TrackingServer(f"sqlite:///{tmp_path}/mlflow.db", basic_auth=True)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("started a server"))
    with pytest.raises(TrackingError, match="mlflow\\[auth\\]|MLFLOW_FLASK_SERVER_SECRET_KEY"):
        server.start()


def test_server_on_loopback_gets_no_host_settings_of_its_own(tmp_path):
    server = TrackingServer(f"sqlite:///{tmp_path}/mlflow.db", port=5000)
    server._host_settings()
    assert server.allowed_hosts is None and server.cors_allowed_origins is None
    assert server.client_url == "http://127.0.0.1:5000"


def test_given_allowed_hosts_are_kept_and_get_their_port_forms(tmp_path):
    server = TrackingServer(f"sqlite:///{tmp_path}/mlflow.db", host="0.0.0.0", port=5000,
                            allowed_hosts="mlflow.internal,*.corp.example")
    server._host_settings()
    assert server.allowed_hosts.split(",") == ["mlflow.internal", "mlflow.internal:5000", "*.corp.example"]
    # The printed URL uses a name the server accepts.
    assert server.client_url == "http://mlflow.internal:5000"
    assert server.cors_allowed_origins == "http://mlflow.internal:5000"


def _cmdlines_while_running(popen, seen: list[str]):
    """Popen that records the command line of the process and of its children while they live."""
    import threading

    def watch(pid: int) -> None:
        while True:
            try:
                pids = [pid, *Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                return
            for p in pids:
                try:
                    seen.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode())
                except OSError:
                    pass
            time.sleep(0.01)

    def wrapped(*args, **kw):
        proc = popen(*args, **kw)
        threading.Thread(target=watch, args=(proc.pid,), daemon=True).start()
        return proc

    return wrapped


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_database_password_is_never_in_the_server_argv_nor_its_error(tmp_path, monkeypatch, caplog):
    seen: list[str] = []
    monkeypatch.setattr(subprocess, "Popen", _cmdlines_while_running(subprocess.Popen, seen))
    server = TrackingServer("postgresql://mlflow:secret@127.0.0.1:1/db", artifacts_destination=tmp_path / "art")
    with caplog.at_level("INFO"), pytest.raises(TrackingError) as err:
        server.start()
    assert any("mlflow server" in c for c in seen), seen  # the server's own command line was read
    assert not [c for c in seen if "secret" in c]
    assert "secret" not in str(err.value) and "postgresql://mlflow:***@127.0.0.1:1/db" in str(err.value)
    assert caplog.records and "secret" not in caplog.text


def test_stop_kills_a_server_that_ignores_sigterm_within_its_grace(tmp_path):
    server = TrackingServer(f"sqlite:///{tmp_path}/mlflow.db")
    server._proc = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                     "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
                                     "time.sleep(120)"], stdout=subprocess.PIPE, start_new_session=True)
    pid = server._proc.pid
    assert server._proc.stdout.readline() == b"up\n"  # SIGTERM is ignored from here on
    start = time.monotonic()
    server.stop(grace=1.0)
    assert time.monotonic() - start < 5
    assert not _alive(pid)
