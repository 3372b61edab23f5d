"""A local MLflow tracking server: one writer in front of a sqlite database, so parallel trials never lock it.

    with TrackingServer("sqlite:////abs/mlflow.db") as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.url   # trials log over HTTP

`carclf server` runs one in the foreground (for a Ray cluster or the UI) until Ctrl-C.
"""

from __future__ import annotations

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

from carclf import paths
from carclf.errors import TrackingError

log = logging.getLogger(__name__)

# The server process gets SIGTERM when its parent dies (Linux), so a driver killed with SIGKILL
# leaves no orphan server holding the database; elsewhere this is a plain exec.
_LAUNCHER = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
except Exception:
    pass
if os.getppid() == 1:
    sys.exit(3)  # the parent is already gone
os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", *sys.argv[1:]])
"""


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _probe_host(host: str) -> str:
    # A server bound to every interface is still reached through loopback from here.
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def _check_backend(uri: str) -> str:
    """Absolute sqlite URIs only (a relative one would land in the server's working directory)."""
    db = _sqlite_path(uri)
    if db is None:
        return uri
    if not db.is_absolute():
        db = db.resolve()
        uri = f"sqlite:///{db}"
    if not db.parent.is_dir():
        raise TrackingError(f"backend store {uri}: folder {db.parent} does not exist")
    return uri


def _artifacts_location(dest: str | Path | None) -> str:
    """An object-store URI stays as it is; a folder is made absolute (default: <project>/mlartifacts)."""
    if dest is not None and "://" in str(dest):
        return str(dest)
    return str(Path(dest or paths.project_root() / "mlartifacts").expanduser().resolve())


class TrackingServer:
    """`mlflow server` as a child process: start() waits until /health answers; stop() ends its process group."""

    def __init__(self, backend_store_uri: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 artifacts_destination: str | Path | None = None, allowed_hosts: str | None = None,
                 startup_timeout: float = 120.0):
        self.backend_store_uri = _check_backend(backend_store_uri or paths.default_tracking_uri())
        self.host = host
        self.port = port
        self.artifacts_destination = _artifacts_location(artifacts_destination)
        self.allowed_hosts = allowed_hosts
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{_probe_host(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-c", _LAUNCHER, "--backend-store-uri", self.backend_store_uri,
               "--artifacts-destination", self.artifacts_destination,
               "--host", self.host, "--port", str(self.port), "--workers", "1"]
        if self.allowed_hosts:
            cmd += ["--allowed-hosts", self.allowed_hosts]
        return cmd

    def start(self) -> "TrackingServer":
        if self.running:
            return self
        if self.port == 0:
            self.port = free_port(_probe_host(self.host))
        elif port_in_use(self.host, self.port):
            raise TrackingError(f"cannot start the MLflow server: port {self.port} on {self.host} is already in use "
                                f"(pick another with --port, or 0 for a free one)")
        if "://" not in self.artifacts_destination:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # The job runner (GenAI jobs) starts a dozen consumer processes nobody here uses.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.pop("MLFLOW_TRACKING_URI", None)
        self._log = tempfile.TemporaryFile(mode="w+b")
        log.info("starting MLflow server on %s (backend %s)", self.url, self.backend_store_uri)
        self._proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _output_tail(self, n: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-n:]

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TrackingError(f"the MLflow server for {self.backend_store_uri} exited with code "
                                    f"{self._proc.returncode} before answering on {self.url}:\n{self._output_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        log.info("MLflow server ready at %s", self.url)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TrackingError(f"the MLflow server for {self.backend_store_uri} did not answer on {self.url}/health "
                            f"within {self.startup_timeout:.0f} s:\n{self._output_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout)
        if proc is not None:
            # uvicorn lives in the same group; make sure nothing of it outlives the server.
            self._signal_group(proc, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    @staticmethod
    def _signal_group(proc: subprocess.Popen, sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TrackingServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _client_url(server: TrackingServer) -> str:
    """The URL other machines use: a server bound to every interface is reached by this host's name."""
    if server.host in ("0.0.0.0", "::"):
        name = socket.getfqdn()
        return f"http://{socket.gethostname() if name.startswith('localhost') else name}:{server.port}"
    return server.url


def cli_server(args) -> int:
    """`carclf server`: serve the project's database in the foreground until Ctrl-C."""
    backend = args.backend_store_uri or paths.default_tracking_uri()
    server = TrackingServer(backend, host=args.host, port=args.port,
                            artifacts_destination=args.artifacts_destination, allowed_hosts=args.allowed_hosts)
    try:  # Ctrl-C at any point after the start, even before the loop below, is the normal way out
        with server:
            print(f"MLflow tracking server: {server.url}  (backend {server.backend_store_uri}, "
                  f"artifacts {server.artifacts_destination})")
            print(f"export MLFLOW_TRACKING_URI={_client_url(server)}")
            print("Ctrl-C stops it.", flush=True)
            while server.running:
                time.sleep(1)
            tail = server._output_tail()
    except KeyboardInterrupt:
        print("stopping the MLflow server")
        return 0
    print(f"the MLflow server exited:\n{tail}", file=sys.stderr)
    return 1
