"""Cluster settings for `carclf sweep --address`: a tracking URI, storage and data that every node reaches.

    uri, storage = resolve_cluster_settings("auto", "http://head:5000", "s3://my-bucket/carclf")

With no address nothing changes (a local sweep). With one, the driver connects to the cluster,
looks at its nodes and refuses, before any trial starts, what would break on a remote worker: a
sqlite or file tracking store (each node would write its own), a tracking server on the driver's
loopback, a local storage folder that the other nodes do not share, a data folder a node cannot read.
What it cannot settle from the driver it asks every node: one small Ray task per node, pinned there
with NodeAffinitySchedulingStrategy, checks the paths and the tracking server from that node's side.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator
from urllib.parse import urlparse

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from carclf.core.errors import DataError, SweepError, TrackingError
from carclf.core.files import check_can_create
from carclf.core.redact import redact, strip_credentials

log = logging.getLogger(__name__)

# Set to 1 when a local storage path is a shared file system (NFS, EFS, Lustre) mounted at the same
# place on every node: the driver cannot prove that for nodes the autoscaler has not started yet.
SHARED_STORAGE_ENV = "CARCLF_SHARED_STORAGE"
# Long enough for a server across a data centre, short enough that a typo fails at once.
HEALTH_TIMEOUT_S = 5.0
# A node that does not run a zero-CPU task in this time is down or unreachable.
NODE_PROBE_TIMEOUT_S = 60.0
_TRACKING_HINT = ("start one tracking server every node can reach, e.g. on the head node: "
                  "`carclf server --host 0.0.0.0 --port 5000 --allowed-hosts 'HEAD,HEAD:5000'`, "
                  "then pass --tracking-uri http://HEAD:5000 (or export MLFLOW_TRACKING_URI=http://HEAD:5000)")
_STORAGE_HINT = ("pass --storage-path on a file system every node mounts at the same path "
                 f"(NFS, EFS; then also set {SHARED_STORAGE_ENV}=1 if the cluster autoscales) "
                 "or an object store URI such as s3://BUCKET/carclf or gs://BUCKET/carclf")


# ---------------------------------------------------------------------- what the cluster looks like


@dataclass(frozen=True)
class Node:
    node_id: str
    ip: str
    is_head: bool = False

    def __str__(self) -> str:
        return f"node {self.ip} ({self.node_id[:12]}{', head' if self.is_head else ''})"


@dataclass
class ClusterView:
    """The alive nodes of a Ray cluster and whether its autoscaler may add more; runs probes on nodes."""

    nodes: list[Node]
    may_grow: bool = False  # the autoscaler can start nodes that are not up yet (and not checked now)

    @property
    def all_local(self) -> bool:
        """Every node (now and later) runs on this machine: its paths and loopback are the driver's."""
        return not self.may_grow and all(is_local_ip(n.ip) for n in self.nodes)

    @property
    def remote_nodes(self) -> list[Node]:
        return [n for n in self.nodes if not is_local_ip(n.ip)]

    def probe(self, node: Node, checks: list[tuple]) -> list[str]:
        """Run `checks` (see run_checks) on `node`; the problems found, each naming the node and the path."""
        return _probe_nodes([node], checks)[node]

    def probe_all(self, checks: list[tuple]) -> dict[Node, list[str]]:
        return _probe_nodes(self.nodes, checks)

    @property
    def head(self) -> Node:
        return next((n for n in self.nodes if n.is_head), self.nodes[0])


@lru_cache(maxsize=64)
def is_local_ip(ip: str) -> bool:
    """True for loopback and for any address of this machine (binding to it succeeds only here)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr.is_loopback:
        return True
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


def _alive_nodes() -> list[Node]:
    nodes = []
    for n in ray.nodes():
        if n.get("Alive"):
            head = "node:__internal_head__" in n.get("Resources", {})
            nodes.append(Node(node_id=n["NodeID"], ip=n["NodeManagerAddress"], is_head=head))
    return nodes


def _autoscaler_may_grow(n_alive: int) -> bool:
    """Whether the autoscaler's node groups allow more nodes than are alive (launcher, KubeRay)."""
    try:
        from ray._private.state import state  # a private API: imported where its absence is handled

        config = state.get_cluster_config()
    except Exception as e:  # a private API: if it moves, assume a fixed cluster and say so
        log.debug("cannot read the autoscaler's cluster config: %s", e)
        return False
    if config is None:
        return False
    groups = list(config.node_group_configs)
    if any(g.max_count < 0 for g in groups):
        return True
    return sum(g.max_count for g in groups) > n_alive


def inspect_cluster() -> ClusterView:
    """The cluster Ray is connected to (call after ray.init)."""
    nodes = _alive_nodes()
    if not nodes:
        raise SweepError("the Ray cluster reports no alive nodes")
    return ClusterView(nodes=nodes, may_grow=_autoscaler_may_grow(len(nodes)))


@contextlib.contextmanager
def connected(address: str) -> Iterator[None]:
    """Connected to the cluster at `address` for the checks; disconnects only if it connected itself."""

    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:  # ConnectionError, AuthenticationError, a bad address: all user-facing here
        raise SweepError(f"cannot connect to the Ray cluster at --address {address}: {e}\n"
                         "start one with `ray start --head` (or the files in cluster/), and on a cluster with "
                         "token authentication run with the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"
                         ) from None
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------- checks that run on each node


def run_checks(checks: list[tuple]) -> list[str]:
    """Check paths and URLs from where this runs; returns problems (empty when all is well).

    ("dir", what, path)            an existing folder whose listing is readable
    ("file", what, path)           an existing, readable file (local weights)
    ("writable", what, path)       a folder that exists and is writable, or can be created
    ("marker", what, path, text)   a file holding `text` (proves a folder is shared)
    ("http", what, url)            an MLflow server answering GET url/health
    """
    problems = []
    for kind, what, *args in checks:
        problem = _CHECKS[kind](*args)
        if problem:
            problems.append(redact(f"{what} {args[0]}: {problem}"))
    return problems


def _check_dir(path: str) -> str | None:
    p = Path(path)
    if not p.is_dir():
        return "not a folder here" if p.exists() else "does not exist here"
    try:
        next(os.scandir(p), None)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def _check_file(path: str) -> str | None:
    p = Path(path)
    if not p.is_file():
        return "not a file here" if p.exists() else "does not exist here"
    if not os.access(p, os.R_OK):
        return "cannot be read here"
    return None


def _check_writable(path: str) -> str | None:
    p = Path(path)
    existing = next((q for q in (p, *p.parents) if q.exists()), None)
    if existing is None or not existing.is_dir():
        return "cannot be created here"

    try:  # by making a file: os.access says yes to root even on a read-only mount
        check_can_create(existing / ".carclf-check")
    except DataError:
        return f"is not writable here ({existing} is read-only for this user)"
    return None


def _check_marker(path: str, text: str) -> str | None:
    try:
        found = Path(path).read_text(encoding="utf-8")
    except OSError:
        return "not visible here: this folder is not shared with the head node"
    return None if found == text else "holds another node's marker: not the same shared folder"


def _check_http(url: str) -> str | None:
    try:
        with urllib.request.urlopen(strip_credentials(url).rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S) as r:
            return None if r.status == 200 else f"answered /health with HTTP {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"unreachable from here ({getattr(e, 'reason', e)})"


def _write_marker(path: str, text: str) -> str | None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text, encoding="utf-8")
    except OSError as e:
        return f"cannot write to {Path(path).parent} ({e.strerror or e})"
    return None


def _remove_marker(path: str) -> str | None:
    with contextlib.suppress(OSError):
        os.unlink(path)
    return None


_CHECKS = {"dir": _check_dir, "file": _check_file, "writable": _check_writable, "marker": _check_marker, "http": _check_http,
           "write_marker": _write_marker, "remove_marker": _remove_marker}


def _probe_nodes(nodes: list[Node], checks: list[tuple]) -> dict[Node, list[str]]:
    """One zero-CPU task per node, pinned there, so a busy cluster still answers."""

    task = ray.remote(num_cpus=0, max_retries=0)(run_checks)
    refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote(checks): n
            for n in nodes}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=NODE_PROBE_TIMEOUT_S)
    out: dict[Node, list[str]] = {}
    for ref in ready:
        try:
            out[refs[ref]] = ray.get(ref)
        except Exception as e:  # the node cannot import carclf, died, ...
            out[refs[ref]] = [f"the check task failed there: {type(e).__name__}: {str(e).splitlines()[0]}"]
    for ref in pending:
        ray.cancel(ref, force=True)
        out[refs[ref]] = [f"did not run a check within {NODE_PROBE_TIMEOUT_S:.0f} s (node down or unreachable)"]
    return out


def _raise_problems(found: dict[Node, list[str]], error=SweepError, hint: str = "") -> None:
    lines = [f"  {node}: {p}" for node, problems in found.items() for p in problems]
    if lines:
        raise error("the Ray cluster's nodes cannot use these settings:\n" + "\n".join(lines)
                    + (f"\n{hint}" if hint else ""))


# ---------------------------------------------------------------------- tracking URI


def _scheme(uri: str) -> str:
    return urlparse(uri).scheme.lower() if "://" in uri else ""


def check_tracking_uri(uri: str, cluster: ClusterView) -> str:
    """An http(s) server that answers, from the driver and (for remote nodes) from every node."""
    scheme = _scheme(uri)
    if scheme in ("http", "https"):
        uri = uri.rstrip("/")
        problem = _check_http(uri)
        if problem:
            raise TrackingError(f"MLflow tracking server {redact(uri)} is {problem.replace(' from here', '')}; "
                                f"{_TRACKING_HINT}")
        host = urlparse(uri).hostname or ""
        if not cluster.all_local and _is_loopback_host(host):
            raise SweepError(f"tracking URI {redact(uri)} is this machine's loopback, which other nodes cannot reach; "
                             + _TRACKING_HINT)
        if cluster.remote_nodes:
            _raise_problems(cluster.probe_all([("http", "tracking server", uri)]), TrackingError, _TRACKING_HINT)
        return uri
    if cluster.all_local:
        return uri  # a local store: the runner puts a loopback server in front of sqlite for its trials
    where = f"{len(cluster.remote_nodes)} remote node(s)" if cluster.remote_nodes else "nodes the autoscaler may add"
    raise SweepError(f"tracking URI {redact(uri)} is a store on this machine, which {where} cannot write to; "
                     + _TRACKING_HINT)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- storage path


def is_object_store(path: str) -> bool:
    """s3://, gs://, abfs://, hdfs:// ... (anything with a scheme but file://)."""
    scheme = _scheme(str(path))
    return bool(scheme) and scheme != "file"


def declared_shared() -> bool:
    return os.environ.get(SHARED_STORAGE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_storage_path(storage: str, cluster: ClusterView) -> str:
    """An object-store URI, or a folder every node sees: on this machine only, declared or proven shared."""
    if is_object_store(storage):
        return storage
    local = Path(storage[len("file://"):] if storage.startswith("file://") else storage).expanduser()
    if not local.is_absolute():
        raise SweepError(f"--storage-path {storage} is relative; nodes run trials in other folders: "
                         "give an absolute path on a shared file system or an object store URI")
    if cluster.all_local or declared_shared():
        return str(local)
    if cluster.may_grow:
        raise SweepError(f"--storage-path {local} is a local folder and the autoscaler may add nodes that "
                         f"cannot be checked now; {_STORAGE_HINT}")
    _prove_shared(local, cluster)
    return str(local)


def _prove_shared(folder: Path, cluster: ClusterView) -> None:
    """The head node writes a marker into `folder`; every other node must read the same marker."""
    marker = str(folder / f".carclf-shared-{uuid.uuid4().hex}")
    text = uuid.uuid4().hex
    head = cluster.head
    problems = cluster.probe(head, [("write_marker", "storage path", marker, text)])
    if problems:
        raise SweepError(f"--storage-path {folder} on {head}: {problems[0]}; {_STORAGE_HINT}")
    try:
        others = [n for n in cluster.nodes if n != head]
        found = {n: cluster.probe(n, [("marker", "storage path", marker, text)]) for n in others}
        found = {n: [p.replace(marker, str(folder)) for p in ps] for n, ps in found.items()}
        _raise_problems(found, SweepError, _STORAGE_HINT)
    finally:
        cluster.probe(head, [("remove_marker", "storage path", marker)])


# ---------------------------------------------------------------------- data on every node


def check_data_paths(cluster: ClusterView, *, data_path: str | None = None, cache_dir: str | None = None,
                     files: Iterable[str] = ()) -> None:
    """The data folder and `files` must be readable and the cache folder writable on every node.

    Fails fast, naming each node and path, instead of as many failed trials as there are nodes.
    """
    checks: list[tuple] = []
    if data_path:
        checks.append(("dir", "data folder", str(data_path)))
    if cache_dir:
        checks.append(("writable", "cache folder", str(cache_dir)))
    checks += [("file", "file", str(f)) for f in files]
    if checks:
        _raise_problems(cluster.probe_all(checks), SweepError,
                        "put the data on a shared file system or copy it to the same path on every node "
                        "(see cluster/README.md); the cache folder may be per node or shared")


# ---------------------------------------------------------------------- the entry point


def resolve_cluster_settings(address: str | None, tracking_uri: str, storage_path: str, *,
                             data_path: str | None = None, cache_dir: str | None = None, files: Iterable[str] = (),
                             cluster: ClusterView | None = None) -> tuple[str, str]:
    """(tracking_uri, storage_path) that every node of the cluster at `address` can use, else SweepError.

    address None: a local sweep, returned unchanged. data_path, cache_dir and files (e.g. local weights)
    are checked on every node when given. `cluster` is for tests (a view with fake probes); by default
    the driver connects to `address` and inspects the real cluster.
    """
    if address is None:
        return tracking_uri, storage_path
    data = {"data_path": data_path, "cache_dir": cache_dir, "files": tuple(files)}
    if cluster is not None:
        return _resolve(cluster, tracking_uri, storage_path, data)
    with connected(address):
        return _resolve(inspect_cluster(), tracking_uri, storage_path, data)


def _resolve(cluster: ClusterView, tracking_uri: str, storage_path: str, data: dict) -> tuple[str, str]:
    log.info("Ray cluster: %d node(s)%s%s", len(cluster.nodes), ", all on this machine" if cluster.all_local else "",
             ", autoscaling" if cluster.may_grow else "")
    uri = check_tracking_uri(tracking_uri, cluster)
    storage = check_storage_path(str(storage_path), cluster)
    check_data_paths(cluster, **data)
    return uri, storage
