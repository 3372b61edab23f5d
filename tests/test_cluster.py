"""Cluster support: settings refused before a trial starts, caches safe under concurrent writers, and a
real two-node Ray cluster on loopback running a sweep that logs to an MLflow tracking server."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from carclf.errors import SweepError, TrackingError
from sweeps.cluster import (SHARED_STORAGE_ENV, ClusterView, Node, is_local_ip, is_object_store,
                            resolve_cluster_settings, run_checks)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_DIR = ROOT / "cluster"

HEAD = Node("a" * 56, "127.0.0.1", is_head=True)
REMOTE = Node("b" * 56, "203.0.113.7")  # TEST-NET-3: never an address of this machine


# ---------------------------------------------------------------------- a cluster with fake remote nodes


class FakeCluster(ClusterView):
    """Local nodes run the checks here; a remote node sees only the folders in `shared` and the URLs
    in `reachable` (what another machine with a shared mount and a network route would see)."""

    def __init__(self, nodes, *, may_grow=False, shared=(), reachable=()):
        super().__init__(nodes=list(nodes), may_grow=may_grow)
        self.shared = [str(s) for s in shared]
        self.reachable = set(reachable)
        self.probed: list[tuple[Node, list]] = []

    def probe(self, node, checks):
        self.probed.append((node, checks))
        if is_local_ip(node.ip):
            return run_checks(checks)
        visible = [c for c in checks if self._visible(c)]
        hidden = [f"{c[1]} {c[2]}: {'unreachable' if c[0] == 'http' else 'does not exist'} here"
                  for c in checks if not self._visible(c)]
        return run_checks(visible) + hidden

    def probe_all(self, checks):
        return {n: self.probe(n, checks) for n in self.nodes}

    def _visible(self, check) -> bool:
        if check[0] == "http":
            return check[2] in self.reachable
        return any(str(check[2]).startswith(s) for s in self.shared)


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        ok = self.path == "/health"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    """A tiny server answering /health like MLflow's, on every interface; yields its port."""
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _outward_ip() -> str | None:
    """This machine's address on its default route (no packet is sent), or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("203.0.113.1", 9))
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- resolve_cluster_settings: refusals


def test_no_address_leaves_local_settings_unchanged():
    assert resolve_cluster_settings(None, "sqlite:///x.db", "rel/ray") == ("sqlite:///x.db", "rel/ray")


@pytest.mark.parametrize("uri", ["sqlite:////data/mlflow.db", "file:///data/mlruns", "/data/mlruns"])
def test_remote_workers_refuse_a_local_tracking_store(uri):
    with pytest.raises(SweepError) as e:
        resolve_cluster_settings("auto", uri, "s3://bucket/ray", cluster=FakeCluster([HEAD, REMOTE]))
    msg = str(e.value)
    assert uri in msg
    assert "carclf server --host 0.0.0.0" in msg and "MLFLOW_TRACKING_URI=http://HEAD:5000" in msg


def test_autoscaling_cluster_refuses_a_local_tracking_store_even_with_only_the_head_up():
    with pytest.raises(SweepError, match="autoscaler"):
        resolve_cluster_settings("auto", "sqlite:////tmp/m.db", "s3://b/r", cluster=FakeCluster([HEAD], may_grow=True))


def test_unreachable_tracking_server_names_the_uri():
    uri = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(TrackingError, match=f"{uri} is unreachable"):
        resolve_cluster_settings("auto", uri, "s3://b/r", cluster=FakeCluster([HEAD, REMOTE]))


def test_loopback_tracking_server_is_refused_when_nodes_are_remote(health_server):
    uri = f"http://127.0.0.1:{health_server}"
    with pytest.raises(SweepError, match="loopback.*--host 0.0.0.0"):
        resolve_cluster_settings("auto", uri, "s3://b/r", cluster=FakeCluster([HEAD, REMOTE], reachable={uri}))


def test_tracking_server_must_answer_on_every_node(health_server):
    ip = _outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    uri = f"http://{ip}:{health_server}"
    cluster = FakeCluster([HEAD, REMOTE], reachable=set())
    with pytest.raises(TrackingError) as e:
        resolve_cluster_settings("auto", uri, "s3://b/r", cluster=cluster)
    assert "203.0.113.7" in str(e.value) and uri in str(e.value)
    ok = FakeCluster([HEAD, REMOTE], reachable={uri})
    assert resolve_cluster_settings("auto", uri + "/", "s3://b/r", cluster=ok) == (uri, "s3://b/r")


@pytest.mark.parametrize("storage", ["s3://bucket/carclf", "gs://bucket/x", "abfs://c@acct.dfs.core.windows.net/r"])
def test_object_store_storage_is_accepted_for_remote_workers(storage, health_server):
    uri = f"http://127.0.0.1:{health_server}"
    # All nodes local here, so the loopback server is fine; the storage URI is passed through unchanged.
    assert resolve_cluster_settings("auto", uri, storage, cluster=FakeCluster([HEAD])) == (uri, storage)
    assert is_object_store(storage) and not is_object_store("file:///tmp/x") and not is_object_store("/tmp/x")


def test_local_storage_is_refused_when_the_other_node_does_not_share_it(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    storage = tmp_path / "ray"
    with pytest.raises(SweepError) as e:
        check_storage(FakeCluster([HEAD, REMOTE], shared=()), str(storage))
    msg = str(e.value)
    assert str(storage) in msg and "203.0.113.7" in msg and "s3://" in msg and "--storage-path" in msg
    assert not [p for p in storage.iterdir() if p.name.startswith(".carclf-shared")], "the marker must be removed"


def test_local_storage_proven_shared_by_a_marker_is_accepted(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    storage = tmp_path / "shared" / "ray"
    cluster = FakeCluster([HEAD, REMOTE], shared=[tmp_path / "shared"])
    assert check_storage(cluster, str(storage)) == str(storage)
    kinds = [c[0] for _, checks in cluster.probed for c in checks]
    assert kinds == ["write_marker", "marker", "remove_marker"]
    assert list(storage.iterdir()) == []


def test_local_storage_on_an_autoscaling_cluster_needs_the_shared_declaration(tmp_path, monkeypatch):
    monkeypatch.delenv(SHARED_STORAGE_ENV, raising=False)
    cluster = FakeCluster([HEAD], may_grow=True)
    with pytest.raises(SweepError, match=SHARED_STORAGE_ENV):
        check_storage(cluster, str(tmp_path / "ray"))
    monkeypatch.setenv(SHARED_STORAGE_ENV, "1")
    assert check_storage(cluster, str(tmp_path / "ray")) == str(tmp_path / "ray")


def test_relative_storage_path_is_refused_on_a_cluster():
    with pytest.raises(SweepError, match="relative"):
        check_storage(FakeCluster([HEAD, REMOTE]), "results/ray")


def test_cluster_on_this_machine_keeps_local_store_and_storage(tmp_path):
    """The loopback test cluster: every node is this machine, so local paths are the same everywhere."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = resolve_cluster_settings("auto", uri, f"file://{tmp_path}/ray", cluster=FakeCluster([HEAD]))
    assert out == (uri, f"{tmp_path}/ray")


def test_data_folder_missing_on_a_node_fails_naming_node_and_path(tmp_path, health_server):
    ip = _outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback address")
    uri = f"http://{ip}:{health_server}"
    data = tmp_path / "data"
    data.mkdir()
    cluster = FakeCluster([HEAD, REMOTE], shared=[tmp_path / "ray"], reachable={uri})
    with pytest.raises(SweepError) as e:
        resolve_cluster_settings("auto", uri, str(tmp_path / "ray"), data_path=str(data),
                                 cache_dir=str(tmp_path / "ray" / "cache"), cluster=cluster)
    lines = [ln for ln in str(e.value).splitlines() if "203.0.113.7" in ln or "127.0.0.1" in ln]
    assert lines == [f"  {REMOTE}: data folder {data}: does not exist here"], "only the remote node lacks the data"


def test_node_checks_report_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        problems = run_checks([("dir", "data folder", str(tmp_path / "missing")),
                               ("dir", "data folder", str(tmp_path / "file")),
                               ("dir", "data folder", str(tmp_path)),
                               ("writable", "cache folder", str(tmp_path / "new" / "cache")),
                               ("writable", "cache folder", str(ro / "cache")),
                               ("marker", "storage path", str(tmp_path / "no-marker"), "t"),
                               ("http", "tracking server", f"http://127.0.0.1:{_free_port()}")])
    finally:
        ro.chmod(0o700)
    text = "\n".join(problems)
    assert f"{tmp_path / 'missing'}: does not exist here" in text
    assert f"{tmp_path / 'file'}: not a folder here" in text
    assert f"data folder {tmp_path}:" not in text
    assert str(tmp_path / "new" / "cache") not in text
    if os.geteuid() != 0:  # root writes anywhere
        assert str(ro / "cache") in text
    assert "not shared with the head node" in text and "unreachable from here" in text


def check_storage(cluster, storage):
    from sweeps.cluster import check_storage_path

    return check_storage_path(storage, cluster)
