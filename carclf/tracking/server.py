"""A local MLflow tracking server: one writer in front of a sqlite database, so parallel trials never lock it.

    with TrackingServer("sqlite:////abs/mlflow.db") as server:
        os.environ["MLFLOW_TRACKING_URI"] = server.url   # trials log over HTTP

`carclf server` runs one in the foreground (for a Ray cluster or the UI) until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
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

from carclf.core import paths
from carclf.core.errors import TrackingError
from carclf.core.redact import redact

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


_WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# After SIGTERM the server gets this long to finish its requests before SIGKILL: a loaded server
# (many trials logging) otherwise took over 30 s to exit after Ctrl-C. SQLite survives a kill.
STOP_GRACE_S = 5.0


def _probe_host(host: str) -> str:
    # A server bound to every interface is still reached through loopback from here.
    return "127.0.0.1" if host in _WILDCARD_HOSTS else host


def is_loopback(host: str) -> bool:
    """Whether a bind address serves this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def public_names(host: str) -> list[str]:
    """Names other machines reach a server bound to `host` by: for 0.0.0.0 or ::, this machine's FQDN,
    host name and non-loopback addresses; else the bind address itself."""
    if host not in _WILDCARD_HOSTS:
        return [f"[{host}]" if ":" in host and not host.startswith("[") else host]  # an IPv6 address in a URL
    names = [socket.getfqdn(), socket.gethostname()]
    try:
        names += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:  # a host name that does not resolve: the names alone
        pass
    return list(dict.fromkeys(n for n in names if n and not n.startswith("localhost") and not is_loopback(n)))


def _host_part(entry: str) -> str:
    """'name:5000' -> 'name'; '[::1]:5000' -> '[::1]'."""
    return entry[:entry.index("]") + 1] if entry.startswith("[") and "]" in entry else entry.split(":")[0]


def _with_ports(entries: list[str], port: int) -> list[str]:
    """Each plain name also as name:port: a browser or client sends the port in its Host header."""
    out = []
    for entry in entries:
        out.append(entry)
        if "*" not in entry and _host_part(entry) == entry:
            out.append(f"{entry}:{port}")
    return list(dict.fromkeys(out))


def _mlflow_default_hosts() -> list[str]:
    # What `mlflow server` accepts without --allowed-hosts (localhost and private-network addresses):
    # passing our own list replaces it, so it is kept alongside.
    # heavy: loaded when used, so `carclf server` starts without it
    from mlflow.server.security_utils import get_default_allowed_hosts

    return get_default_allowed_hosts()


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
    """`mlflow server` as a child process: start() waits until /health answers; stop() ends its process group.

    Bound beyond loopback with no `allowed_hosts`, it accepts the Host headers of `client_url` (this
    machine's names, with and without the port), localhost and MLflow's defaults, and CORS requests from
    `client_url`'s origin, so the URL it gives out works. The backend store URI reaches the child through
    MLFLOW_BACKEND_STORE_URI, never its command line, which every local user can read.
    """

    def __init__(self, backend_store_uri: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
                 artifacts_destination: str | Path | None = None, allowed_hosts: str | None = None,
                 cors_allowed_origins: str | None = None, basic_auth: bool = False,
                 startup_timeout: float = 120.0):
        self.backend_store_uri = _check_backend(backend_store_uri or paths.default_tracking_uri())
        self.host = host
        self.port = port
        self.artifacts_destination = _artifacts_location(artifacts_destination)
        self.allowed_hosts = allowed_hosts
        self.cors_allowed_origins = cors_allowed_origins
        self.basic_auth = basic_auth
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{_probe_host(self.host)}:{self.port}"

    @property
    def exposed(self) -> bool:
        """Whether other machines can reach it (bound beyond loopback)."""
        return not is_loopback(self.host)

    @property
    def client_url(self) -> str:
        """The URL other machines use: one of this host's names the server accepts, else `url`."""
        if not self.exposed:
            return self.url
        names = public_names(self.host)
        if self.allowed_hosts and self.allowed_hosts != "*":
            listed = [_host_part(e) for e in self.allowed_hosts.split(",") if "*" not in e]
            others = [n for n in listed if n and not is_loopback(n) and n not in _WILDCARD_HOSTS]
            names = [n for n in names if n in listed] or others or names
        return f"http://{names[0]}:{self.port}" if names else self.url

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _host_settings(self) -> None:
        """Fill in --allowed-hosts and --cors-allowed-origins for a server other machines reach."""
        if not self.exposed:
            return
        if self.allowed_hosts is None:
            names = public_names(self.host)
            entries = _with_ports([*names, "localhost", "127.0.0.1"], self.port) + _mlflow_default_hosts()
            self.allowed_hosts = ",".join(dict.fromkeys(entries))
        elif self.allowed_hosts != "*":
            entries = [e.strip() for e in self.allowed_hosts.split(",") if e.strip()]
            self.allowed_hosts = ",".join(_with_ports(entries, self.port))
        if self.cors_allowed_origins is None:
            # The UI served at client_url sends that origin with every change it makes.
            self.cors_allowed_origins = self.client_url

    def _command(self) -> list[str]:
        cmd = [sys.executable, "-c", _LAUNCHER, "--artifacts-destination", self.artifacts_destination,
               "--host", self.host, "--port", str(self.port), "--workers", "1"]
        if self.allowed_hosts:
            cmd += ["--allowed-hosts", self.allowed_hosts]
        if self.cors_allowed_origins:
            cmd += ["--cors-allowed-origins", self.cors_allowed_origins]
        if self.basic_auth:
            cmd += ["--app-name", "basic-auth"]
        return cmd

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The job runner (GenAI jobs) starts a dozen consumer processes nobody here uses.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        env.pop("MLFLOW_TRACKING_URI", None)
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_store_uri  # `mlflow server` reads it (click envvar)
        return env

    def _check_basic_auth(self) -> None:
        if not self.basic_auth:
            return
        if importlib.util.find_spec("flask_wtf") is None:
            raise TrackingError('MLflow\'s basic-auth app needs its extra packages: pip install "mlflow[auth]"')
        if not os.environ.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
            raise TrackingError("MLflow's basic-auth app needs MLFLOW_FLASK_SERVER_SECRET_KEY (one random value, "
                                "e.g. `openssl rand -hex 32`, kept the same across restarts)")

    def start(self) -> "TrackingServer":
        if self.running:
            return self
        self._check_basic_auth()
        if self.port == 0:
            self.port = free_port(_probe_host(self.host))
        elif port_in_use(self.host, self.port):
            raise TrackingError(f"cannot start the MLflow server: port {self.port} on {self.host} is already in use "
                                f"(pick another with --port, or 0 for a free one)")
        if "://" not in self.artifacts_destination:
            Path(self.artifacts_destination).mkdir(parents=True, exist_ok=True)
        self._host_settings()
        self._log = tempfile.TemporaryFile(mode="w+b")
        log.info("starting MLflow server on %s (backend %s)", self.url, redact(self.backend_store_uri))
        # The basic-auth app keeps its users in basic_auth.db relative to the working directory
        # (unless MLFLOW_AUTH_CONFIG_PATH says otherwise): the project root, beside mlflow.db.
        cwd = paths.project_root() if self.basic_auth else None
        self._proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, env=self._environment(), cwd=cwd,
                                      start_new_session=True)
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
        return redact(self._log.read().decode("utf-8", "replace")[-n:])

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise TrackingError(f"the MLflow server for {redact(self.backend_store_uri)} exited with code "
                                    f"{self._proc.returncode} before answering on {self.url}:\n{self._output_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        log.info("MLflow server ready at %s", self.url)
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TrackingError(f"the MLflow server for {redact(self.backend_store_uri)} did not answer on "
                            f"{self.url}/health within {self.startup_timeout:.0f} s:\n{self._output_tail()}")

    def healthy(self, timeout: float = 5.0) -> bool:
        """Its process is alive and GET /health answers 200 within `timeout` seconds."""
        if not self.running:
            return False
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def restart(self, port_wait: float = 10.0) -> "TrackingServer":
        """End whatever is left of the server (its whole process group), then start it on the same port and store."""
        self.stop()
        deadline = time.monotonic() + port_wait  # the dead server's socket may take a moment to close
        while port_in_use(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.start()

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the server's process group, SIGKILL after `grace` seconds: bounded, also under load."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            self._signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning("the MLflow server did not stop within %.0f s of SIGTERM; killing it", grace)
        if proc is not None:
            # uvicorn lives in the same group; make sure nothing of it outlives the server.
            self._signal_group(proc, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace)  # a killed process is reaped at once unless stuck in the kernel
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


def exposure_warning(server: TrackingServer) -> str | None:
    """What a user must know about a server other machines reach (None on loopback)."""
    if not server.exposed:
        return None
    where = f"{server.host}:{server.port}" + (" (every interface)" if server.host in _WILDCARD_HOSTS else "")
    if server.basic_auth:
        return (f"WARNING: the MLflow server listens on {where} with basic authentication over plain HTTP: "
                "passwords and data cross the network unencrypted. Put a reverse proxy with TLS in front "
                "unless the network is trusted.")
    return (f"WARNING: the MLflow server listens on {where} with NO authentication: anyone who can reach this "
            "port can read, change and delete every run, artifact and registered model. Keep it on a trusted "
            "network, or put authentication in front (--basic-auth, or a reverse proxy with TLS and a login; "
            "see README.md, 'Who can reach what').")


def cli_server(args) -> int:
    """`carclf server`: serve the project's database in the foreground until Ctrl-C."""
    backend = args.backend_store_uri or paths.default_tracking_uri()
    server = TrackingServer(backend, host=args.host, port=args.port,
                            artifacts_destination=args.artifacts_destination, allowed_hosts=args.allowed_hosts,
                            cors_allowed_origins=args.cors_allowed_origins, basic_auth=args.basic_auth)
    try:  # Ctrl-C at any point after the start, even before the loop below, is the normal way out
        with server:
            print(f"MLflow tracking server: {server.url}  (backend {redact(server.backend_store_uri)}, "
                  f"artifacts {redact(server.artifacts_destination)})")
            warning = exposure_warning(server)
            if warning:
                print(warning, file=sys.stderr, flush=True)
            print(f"export MLFLOW_TRACKING_URI={server.client_url}")
            print("Ctrl-C stops it.", flush=True)
            while server.running:
                time.sleep(1)
            tail = server._output_tail()
    except KeyboardInterrupt:
        print("stopping the MLflow server", flush=True)
        return 0
    print(f"the MLflow server exited:\n{tail}", file=sys.stderr)
    return 1
