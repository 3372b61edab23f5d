"""The sweep's tracking server under watch: restarted on its port and store if it dies; nobody waits on it for long.

    with TrackingServer(uri) as server, watch_server(server, on_lost=stop_the_sweep) as watch:
        ...                       # watch.lost: why the server could not be brought back, else None

A loopback MLflow server that dies mid-sweep (killed, out of memory) would leave every trial
retrying its HTTP calls for minutes and its runs RUNNING for good. The watchdog, a thread on
the driver, asks the server for /health every second. When its process has exited, or /health
has failed `misses` times running, it ends whatever is left of the server (its process group)
and starts it again on the same port and store, so the URI every trial holds stays valid. If
that fails `attempts` times it records why and calls `on_lost` (the runner stops Tune the way
Ctrl-C does: the sweep ends KILLED with a resume hint).

The watchdog also looks at the server's sqlite store each round: a store deleted or replaced, no longer
an SQLite file, or on a disk with less than MIN_FREE_MB left cannot be fixed by a restart, so it
records that (`store_lost`) and calls `on_lost` at once, instead of trials failing one by one.

MLflow's HTTP client retries a request to a dead server for about four minutes by default;
`HTTP_LIMITS` (set in the driver and in every trial) bound that to about a minute, longer than a
restart takes, so a server that stays dead fails a trial instead of hanging it past the budget.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

log = logging.getLogger(__name__)

# MLflow's client settings (mlflow.environment_variables): 6 retries with backoff factor 1 sleep
# 0+2+4+8+16+32 s (urllib3 doubles from the second retry), about a minute; 30 s per request.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "6", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# A loaded machine may answer /health slowly: this long per check, this many misses before a restart.
HEALTH_TIMEOUT_S = 10.0
MISSES_BEFORE_RESTART = 3
RESTART_ATTEMPTS = 3
# Below this much free space on the store's disk the sweep is stopped: SQLite and the artifacts need room to finish.
MIN_FREE_MB = 16
_SQLITE_HEADER = b"SQLite format 3\x00"


def _store_file(backend_store_uri: str) -> str | None:
    return backend_store_uri[len("sqlite:///"):] if backend_store_uri.startswith("sqlite:///") else None


def store_identity(path: str | None) -> tuple[int, int] | None:
    """(device, inode) of the store file now; None when there is none to watch."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st else None


def store_problem(path: str, identity: tuple[int, int]) -> tuple[str, bool] | None:
    """Why the sweep must stop for the sqlite store at `path` (which had `identity` when the sweep started), and
    whether the store can still be written to close its runs (a disk nearly full: yes); None if nothing is wrong."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            header = f.read(len(_SQLITE_HEADER))
        vfs = os.statvfs(os.path.dirname(path) or ".")
    except FileNotFoundError:
        return f"its store {path} was deleted", False
    except OSError as e:
        return f"its store {path} cannot be read ({e.strerror or e})", False
    if (st.st_dev, st.st_ino) != identity:
        return f"its store {path} was replaced by another file", False
    if header != _SQLITE_HEADER:
        return f"its store {path} is damaged (its first bytes are no longer an SQLite header)", False
    free_mb = vfs.f_bavail * vfs.f_frsize / 2**20
    if free_mb < MIN_FREE_MB:
        return f"the disk holding its store {path} is full ({free_mb:.1f} MB left)", True
    return None


def bound_http_retries() -> None:
    """In a trial's process: MLflow's HTTP retries bounded, unless the user set these variables."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def http_limits() -> Iterator[None]:
    """The same bounds for the driver while the sweep runs; its environment restored afterwards."""
    added = [k for k in HTTP_LIMITS if k not in os.environ]
    bound_http_retries()
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@dataclass
class ServerWatch:
    """What the watchdog saw: restarts made, and why it gave up (None while the server is up)."""

    server: object  # carclf.tracking.server.TrackingServer
    on_lost: Callable[[str], None] | None = None
    interval_s: float = 1.0
    misses: int = MISSES_BEFORE_RESTART
    attempts: int = RESTART_ATTEMPTS
    restarts: int = 0
    lost: str | None = None
    store_lost: bool = False  # the store itself is unusable: nothing more can be read from or written to it
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        missed = 0
        store = _store_file(self.server.backend_store_uri)
        identity = store_identity(store)
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._stop.is_set():
                    return
                problem = store_problem(store, identity) if identity else None
                if problem:
                    self.lost, writable = f"the sweep's tracking store cannot be used: {problem[0]}", problem[1]
                    self.store_lost = not writable
                    print(self.lost, flush=True)
                    break
                if self.server.healthy(timeout=HEALTH_TIMEOUT_S):
                    missed = 0
                    continue
                missed += 1
                if self.server.running and missed < self.misses:
                    continue  # slow, not dead (yet)
                missed = 0
                if self._bring_back():
                    continue
            if self.on_lost is not None:
                self.on_lost(self.lost)
            return
        if self.lost and self.on_lost is not None:  # a store problem breaks out of the loop
            self.on_lost(self.lost)

    def _bring_back(self) -> bool:
        port, store = self.server.port, self.server.backend_store_uri
        why = "its process exited" if not self.server.running else "it stopped answering /health"
        print(f"the sweep's MLflow server on port {port} is down ({why}); starting it again", flush=True)
        error = None
        for attempt in range(self.attempts):
            if self._stop.is_set():
                return True
            try:
                self.server.restart()
            except Exception as e:  # noqa: BLE001 - any failure to start is reported below
                error = e
                log.warning("restarting the MLflow server on port %s failed (attempt %d): %s", port, attempt + 1, e)
                time.sleep(1.0 + attempt)  # e.g. the old socket not released yet
                continue
            self.restarts += 1
            print(f"the sweep's MLflow server is back on {self.server.url} (backend {store})", flush=True)
            return True
        self.lost = (f"the sweep's MLflow server on port {port} died and could not be started again "
                     f"({self.attempts} attempts): {error}")
        print(self.lost, flush=True)
        return False

    def stop(self) -> None:
        self._stop.set()


@contextlib.contextmanager
def watch_server(server, on_lost: Callable[[str], None] | None = None, **kw) -> Iterator[ServerWatch]:
    """A thread that keeps `server` (a started TrackingServer) up for the duration of the block."""
    watch = ServerWatch(server, on_lost, **kw)
    thread = threading.Thread(target=watch.run, name="carclf-server-watchdog", daemon=True)
    thread.start()
    try:
        yield watch
    finally:
        watch.stop()
        with watch._lock:  # a restart under way finishes before the server is stopped for good
            pass
        thread.join(timeout=5)


@dataclass
class TrackingEndpoint:
    """Where trials log (`uri`) and, when it is the sweep's own server, the watch over it."""

    uri: str
    watch: ServerWatch | None = None

    @property
    def lost(self) -> str | None:
        return self.watch.lost if self.watch is not None else None

    @property
    def store_lost(self) -> bool:
        return self.watch is not None and self.watch.store_lost
