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

    server: object  # carclf.server.TrackingServer
    on_lost: Callable[[str], None] | None = None
    interval_s: float = 1.0
    misses: int = MISSES_BEFORE_RESTART
    attempts: int = RESTART_ATTEMPTS
    restarts: int = 0
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> None:
        missed = 0
        while not self._stop.wait(self.interval_s):
            with self._lock:
                if self._stop.is_set():
                    return
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
