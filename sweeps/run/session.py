"""The driver's Ray session: a local Ray that listens on loopback only, and SIGTERM handled like Ctrl-C.

    with ray_session(address=None), sigterm_as_ctrl_c():
        ...                              # ray.init done; SIGTERM now stops Tune gracefully

Local Ray binds its gRPC servers (GCS, raylet, object manager, every worker) to all interfaces
unless its node address is 127.0.0.1, and `ray.init` turns a loopback `_node_ip_address` back
into the machine's external address on Linux. `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is Ray's
own switch for a single-machine Ray (its default on macOS and Windows): the node address is then
127.0.0.1 and every server of the session listens on loopback only. A sweep on a cluster
(`--address`) keeps the cluster's own settings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any, Iterator

import ray
from ray._private import ray_constants

log = logging.getLogger(__name__)

_SINGLE_MACHINE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Local Ray sized to this machine on loopback, unless Ray is already up (tests) or an address is given."""
    if ray.is_initialized():
        yield
        return
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        kwargs["address"] = address  # an existing cluster: its own resources, addresses and dashboard settings
        ray.init(**kwargs)
    else:
        kwargs.update(num_cpus=os.cpu_count() or 1, include_dashboard=False, _node_ip_address=LOOPBACK)
        with _single_machine():
            ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """Ray's single-machine switch while the local session starts (its processes inherit it).

    The driver read ray_constants when it imported Ray, so the constant is set for the start too.
    """

    old_env, old_flag = os.environ.get(_SINGLE_MACHINE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_MACHINE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_flag
        if old_env is None:
            os.environ.pop(_SINGLE_MACHINE, None)
        else:
            os.environ[_SINGLE_MACHINE] = old_env


def _as_ctrl_c(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does: Tune's SIGINT handler while Tune runs (a graceful stop), else KeyboardInterrupt."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """While the block runs (on the main thread), SIGTERM is handled like Ctrl-C; the old handler is put back after.

    Enter it after ray.init, which installs its own SIGTERM handler (one that exits at once).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _as_ctrl_c)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
