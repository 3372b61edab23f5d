"""Cluster support: settings refused before a trial starts, caches safe under concurrent writers, and a
real two-node Ray cluster on loopback running a sweep that logs to an MLflow tracking server."""

from __future__ import annotations

import http.server
import json
import os
import re
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

from carclf.core.errors import SweepError, TrackingError
from sweeps.run.cluster import (
    SHARED_STORAGE_ENV,
    ClusterView,
    Node,
    is_local_ip,
    is_object_store,
    resolve_cluster_settings,
    run_checks,
)

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
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
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
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"w")
    with pytest.raises(SweepError, match=re.escape(f"{REMOTE}: file {weights}: does not exist here")):
        resolve_cluster_settings("auto", uri, str(tmp_path / "ray"), files=[str(weights)], cluster=cluster)


def test_node_checks_report_what_is_wrong(tmp_path):
    (tmp_path / "file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        problems = run_checks([("dir", "data folder", str(tmp_path / "missing")),
                               ("dir", "data folder", str(tmp_path / "file")),
                               ("dir", "data folder", str(tmp_path)),
                               ("file", "weights", str(tmp_path / "file")),
                               ("file", "weights", str(tmp_path / "missing.pth")),
                               ("writable", "cache folder", str(tmp_path / "new" / "cache")),
                               ("writable", "cache folder", str(ro / "cache")),
                               ("writable", "cache folder", "/proc/carclf/cache"),
                               ("marker", "storage path", str(tmp_path / "no-marker"), "t"),
                               ("http", "tracking server", f"http://127.0.0.1:{_free_port()}")])
    finally:
        ro.chmod(0o700)
    text = "\n".join(problems)
    assert f"{tmp_path / 'missing'}: does not exist here" in text
    assert f"{tmp_path / 'file'}: not a folder here" in text
    assert f"data folder {tmp_path}:" not in text and f"weights {tmp_path / 'file'}:" not in text
    assert f"weights {tmp_path / 'missing.pth'}: does not exist here" in text
    assert str(tmp_path / "new" / "cache") not in text
    if os.geteuid() != 0:  # root writes anywhere
        assert str(ro / "cache") in text
    assert "cache folder /proc/carclf/cache: is not writable here" in text  # not even root writes there
    assert "not shared with the head node" in text and "unreachable from here" in text


def check_storage(cluster, storage):
    from sweeps.run.cluster import check_storage_path

    return check_storage_path(storage, cluster)



# ---------------------------------------------------------------------- cluster/ files

# Values that only make sense in the author's account: each must sit on a line that says CHANGE.
PLACEHOLDERS = ("ami-0123456789abcdef0", "123456789012", "fs-0123456789abcdef0", "registry.example.com",
                "YOUR_", "us-west-2", "efs-sc", "mlflow-host", "/home/ubuntu")


def _unmarked_placeholders(text: str) -> list[str]:
    """Lines holding a placeholder without CHANGE on them or in the comment block right above them.

    The leading comment block (usage examples) is exempt; a commented-out setting is checked like a live one.
    """
    lines = text.splitlines()
    body = next((i for i, ln in enumerate(lines) if not ln.lstrip().startswith("#")), len(lines))
    out = []
    for i in range(body, len(lines)):
        if not any(p in lines[i] for p in PLACEHOLDERS) or "CHANGE" in lines[i]:
            continue
        above, j = [], i - 1
        while j >= body and lines[j].lstrip().startswith("#"):
            above.append(lines[j])
            j -= 1
        if not any("CHANGE" in ln for ln in above):
            out.append(f"{i + 1}: {lines[i].strip()}")
    return out


@pytest.mark.parametrize("name", ["ray-cluster.yaml", "kuberay.yaml", "docker-compose.yml", "mlflow-server.service",
                                  "tracking-server.sh"])
def test_every_value_a_user_must_change_is_marked(name):
    assert _unmarked_placeholders((CLUSTER_DIR / name).read_text()) == []
    assert _unmarked_placeholders("# header: ami-0123456789abcdef0\nImageId: ami-0123456789abcdef0\n") == [
        "2: ImageId: ami-0123456789abcdef0"]


def test_launcher_config_passes_rays_own_schema():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER_DIR / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))  # what `ray up` does first
    nodes = config["available_node_types"]
    head, workers = nodes[config["head_node_type"]], [v for k, v in nodes.items() if k != config["head_node_type"]]
    assert head["resources"]["CPU"] == 0, "trials stay off the head node"
    assert workers and all(w["node_config"]["InstanceType"].startswith(("g", "p")) for w in workers), "GPU workers"
    assert all(w["max_workers"] > w.get("min_workers", 0) for w in workers), "workers autoscale"
    setup = "\n".join(config["setup_commands"])
    assert "torch==2.14.1" in setup and "torchvision==0.29.1" in setup and "~/carclf" in setup
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "/mnt/efs" in "\n".join(config["initialization_commands"])
    broken = json.loads(json.dumps(config))
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 1  # a typo the schema must catch
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_kuberay_manifest_has_head_gpu_workers_shared_volume_and_tracking_service():
    docs = {d["kind"] + "/" + d["metadata"]["name"]: d
            for d in yaml.safe_load_all((CLUSTER_DIR / "kuberay.yaml").read_text())}
    ray_cluster = docs["RayCluster/carclf"]
    assert ray_cluster["apiVersion"] == "ray.io/v1"
    spec = ray_cluster["spec"]
    assert spec["enableInTreeAutoscaling"] and spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]["template"]["spec"]
    (gpu,) = spec["workerGroupSpecs"]
    worker = gpu["template"]["spec"]
    assert gpu["maxReplicas"] > gpu["minReplicas"]
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= 1
    service = docs["Service/carclf-mlflow"]
    port = service["spec"]["ports"][0]["port"]
    for pod in (head, worker):
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_TRACKING_URI"] == f"http://carclf-mlflow:{port}"
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        mounted = {m["name"] for m in container["volumeMounts"]}
        assert claims.get("shared") == "carclf-shared" and "shared" in mounted
        assert env["CARCLF_CACHE_DIR"].startswith("/data/")
    assert docs["PersistentVolumeClaim/carclf-shared"]["spec"]["accessModes"] == ["ReadWriteMany"]
    server = " ".join(docs["Deployment/carclf-mlflow"]["spec"]["template"]["spec"]["containers"][0]["args"])
    for flag in ("--host 0.0.0.0", "--artifacts-destination", "--allowed-hosts", "postgresql://", f"--port {port}"):
        assert flag in server


def test_compose_file_runs_mlflow_on_postgres_with_proxied_artifacts():
    compose = yaml.safe_load((CLUSTER_DIR / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow"}
    command = services["mlflow"]["command"]
    assert "postgresql://mlflow:" in command and "@postgres:5432/mlflow" in command
    for flag in ("--artifacts-destination", "--host 0.0.0.0", "--allowed-hosts"):
        assert flag in command
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.slow
def test_tracking_server_script_serves_sqlite_and_proxies_artifacts(tmp_path):
    """cluster/tracking-server.sh as documented, bound to loopback here: runs, artifacts go through it."""
    from mlflow.tracking import MlflowClient

    port = _free_port()
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(port), "STATE_DIR": str(tmp_path / "state"),
           "MLFLOW": str(Path(sys.executable).with_name("mlflow"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(["bash", str(CLUSTER_DIR / "tracking-server.sh")], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while run_checks([("http", "server", url)]) and time.monotonic() < deadline:
            assert proc.poll() is None, "the tracking server script exited"
            time.sleep(0.5)
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("script"))
        (tmp_path / "note.txt").write_text("hello")
        client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        stored = list((tmp_path / "state" / "mlartifacts").rglob("note.txt"))
        assert [p.read_text() for p in stored] == ["hello"]
        assert (tmp_path / "state" / "mlflow.db").is_file()
    finally:
        _kill_session(proc.pid)


# ---------------------------------------------------------------------- caches under concurrent writers

# Each writer stores the same entry again and again, filled with its own value; a torn or half-written
# file would show as a read error, a short array or mixed values.
_DECODE_WRITER = """
import sys, numpy as np
from carclf.data.cache import DecodeCache
root, value, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cache = DecodeCache(root, 256)
array = np.full((256, 256, 3), value, np.uint8)
for _ in range(n):
    cache.store("ab" * 32, array)
"""
_FEATURE_WRITER = """
import sys, numpy as np
from carclf.training.features import FeatureCache, FeatureSet
root, value, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
fs = FeatureSet(np.full((2000, 64), value, np.float32), np.full(2000, value), [f"img{i}" for i in range(2000)],
                {"writer": value})
for _ in range(n):
    FeatureCache(root).save({"split": "train", "entry": "same"}, fs)
"""


def _race(script: str, root: Path, read, n: int = 40) -> int:
    """Two writer processes on one entry while this process reads it; returns the number of reads."""
    procs = [subprocess.Popen([sys.executable, "-c", script, str(root), str(v), str(n)]) for v in (1, 2)]
    reads = 0
    try:
        while any(p.poll() is None for p in procs):
            if read() is not None:
                reads += 1
            time.sleep(0.002)  # leave the writers most of the two cores
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0]
    assert read() is not None
    leftovers = [p.name for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert leftovers == [], "writers must not leave temporary files behind"
    return reads


@pytest.mark.slow
def test_two_processes_writing_one_decode_cache_entry_never_expose_a_partial_file(tmp_path):
    from carclf.data.cache import DecodeCache

    cache = DecodeCache(tmp_path, 256)
    entry = cache.entry_path("ab" * 32)

    def read():
        if not entry.exists():
            return None
        array = np.load(entry, allow_pickle=False)  # a truncated file raises here
        assert array.shape == (256, 256, 3)
        assert array.min() == array.max() and array.max() in (1, 2), "bytes of two writers mixed"
        return array

    reads = _race(_DECODE_WRITER, tmp_path, read)
    assert reads > 0
    assert cache.load("never-read: the entry is cached", "ab" * 32).shape == (256, 256, 3)


@pytest.mark.slow
def test_two_processes_writing_one_feature_cache_entry_never_expose_a_partial_file(tmp_path):
    from carclf.training.features import FeatureCache

    cache = FeatureCache(tmp_path)
    key = {"split": "train", "entry": "same"}

    def read():
        if not cache.contains(key):
            return None
        fs = cache.load(key)  # an unreadable file comes back as None (a miss): a failure here
        assert fs is not None, "a reader saw an incomplete feature file"
        assert fs.features.shape == (2000, 64) and len(fs.paths) == 2000
        # Rows come from one complete file. (The schema metadata, `meta`, may come from the other writer's
        # file: pq.read_table(path) opens the path twice, and both files are valid for the key.)
        value = fs.labels[0]
        assert value in (1, 2) and (fs.labels == value).all() and (fs.features == value).all(), \
            "rows of two writers mixed"
        return fs

    reads = _race(_FEATURE_WRITER, tmp_path, read, n=20)
    assert reads > 0


# ---------------------------------------------------------------------- a real two-node cluster on loopback

def _session_pids(sid: int) -> list[int]:
    """Every process in session `sid`: `ray start` leads it, and the daemons it spawns stay in it."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return pids


def _kill_session(sid: int, grace_s: float = 3.0) -> None:
    """SIGTERM the session's processes, then SIGKILL what is left (raylet and GCS may ignore SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not _session_pids(sid):
            return


@dataclass
class LoopbackCluster:
    address: str
    env: dict  # what a driver needs to join: the cluster's auth token
    sessions: list
    temp_dir: Path


def _ray_start(args: list[str], env: dict, name: str, sessions: list, log_dir: Path) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    log = log_dir / f"ray-start-{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(ray_bin), "start", *args, "--node-ip-address=127.0.0.1", "--num-cpus=1",
                                 f"--resources={json.dumps({f'carclf_test_{name}': 1})}",
                                 "--object-store-memory=150000000", "--dashboard-agent-listen-port=0",
                                 "--disable-usage-stats"],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        sessions.append(proc.pid)  # the session id is the leader's pid; recorded before anything can fail
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        raise RuntimeError(f"`ray start` for the {name} node failed ({rc}):\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head and a worker node as separate `ray start` processes on loopback, 1 CPU each.

    Token authentication with a token of its own (never ~/.ray/auth_token); a short temp dir because
    Ray's socket paths must stay under the OS limit; every process it started is killed afterwards
    (by session, never `ray stop`, which would stop other Ray clusters on this machine).
    """
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    temp_dir = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    logs = tmp_path_factory.mktemp("ray-logs")
    port = _free_port()
    sessions: list[int] = []
    try:
        _ray_start(["--head", f"--port={port}", f"--temp-dir={temp_dir}", "--include-dashboard=false",
                    f"--dashboard-port={_free_port()}"], env, "head", sessions, logs)
        _ray_start([f"--address=127.0.0.1:{port}", f"--temp-dir={temp_dir}"], env, "worker", sessions, logs)
        yield LoopbackCluster(address=f"127.0.0.1:{port}", env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
                              sessions=sessions, temp_dir=temp_dir)
    finally:
        for sid in reversed(sessions):
            _kill_session(sid)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
        left = [pid for sid in sessions for pid in _session_pids(sid)]
        assert left == [], f"Ray processes left running: {left}"


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """An MLflow tracking server on loopback with a SQLite backend and its own artifact folder."""
    from carclf.tracking.server import TrackingServer

    root = tmp_path_factory.mktemp("tracking")
    server = TrackingServer(f"sqlite:///{root / 'mlflow.db'}", artifacts_destination=root / "artifacts")
    with server:
        yield server


def _in_driver(code: str, cluster: LoopbackCluster, **kw) -> dict:
    """Run `code` in a fresh Python process that joins the cluster (Ray reads the auth settings at import,
    so a driver joining a token cluster must start with them); `code` sets `out`, returned as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(cluster.env)
    script = f"import json, sys\nkw = json.loads(sys.argv[1])\n{code}\nprint('OUT=' + json.dumps(out))"
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(kw)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OUT=")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][4:])


_CHECK_ON_CLUSTER = """
import ray
from carclf.core.errors import SweepError
from sweeps.run.cluster import connected, inspect_cluster, resolve_cluster_settings
with connected(kw["address"]):
    view = inspect_cluster()
    out = {"nodes": [n.node_id for n in view.nodes], "all_local": view.all_local, "may_grow": view.may_grow,
           "resources": [sorted(n["Resources"]) for n in ray.nodes() if n["Alive"]]}
out["still_connected"] = ray.is_initialized()
out["ok"] = resolve_cluster_settings(kw["address"], kw["uri"], kw["storage"], data_path=kw["data"],
                                     cache_dir=kw["cache"])
try:
    resolve_cluster_settings(kw["address"], kw["uri"], kw["storage"], data_path=kw["missing"])
    out["error"] = None
except SweepError as e:
    out["error"] = str(e)
"""


@pytest.mark.slow
def test_settings_are_checked_on_every_node_of_a_real_cluster(ray_cluster, tracking_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    out = _in_driver(_CHECK_ON_CLUSTER, ray_cluster, address=ray_cluster.address, uri=tracking_server.url,
                     storage=str(tmp_path / "ray"), data=str(data), cache=str(tmp_path / "cache"),
                     missing=str(tmp_path / "nowhere"))
    assert len(out["nodes"]) == 2 and out["all_local"] and not out["may_grow"]
    assert sum("carclf_test_head" in r for r in out["resources"]) == 1
    assert sum("carclf_test_worker" in r for r in out["resources"]) == 1
    assert not out["still_connected"], "the check disconnects what it connected"
    assert out["ok"] == [tracking_server.url, str(tmp_path / "ray")]
    lines = [ln for ln in (out["error"] or "").splitlines() if "nowhere" in ln]
    assert len(lines) == 2, f"both nodes report the missing data folder, each by name: {out['error']}"
    assert {ln.split(":")[0].strip().split(" (")[1][:12] for ln in lines} == {n[:12] for n in out["nodes"]}


SWEEP = {
    "name": "cluster-test",
    "base": {
        "data": {"image_size": 32, "min_images": 2},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2},
        "balance": {"mode": "none"},
        "augment": {"strength": 0.0},
        "model": {"weights": "none"},
        "svm": {"backbone": "mobilenet_v2", "backbone_weights": "none"},
        "train": {"epochs": 2, "batch_size": 16, "device": "cpu", "amp": False, "num_workers": 0},
        "tracking": {"experiment": "cluster-test"},
    },
    "models": {
        "simple_cnn": {"space": {"lr": {"low": 0.001, "high": 0.01, "log": True}}, "resources": {"cpu": 1}},
        "svm": {"space": {"C": {"low": 0.1, "high": 10.0, "log": True}, "kernel": "linear"}, "resources": {"cpu": 1}},
    },
    "num_samples": 4,
    "max_concurrent_trials": 2,  # one trial per 1-CPU node at a time: both nodes must take trials
    "scheduler": None,  # every trial runs to the end, so every one has a complete run to check
    "max_failures": 0,
}


@pytest.mark.slow
def test_sweep_on_a_two_node_cluster_tracks_every_trial_in_the_server(ray_cluster, tracking_server, tmp_path,
                                                                      monkeypatch):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    from carclf.data.demo import make_demo

    make_demo(tmp_path / "data", n_images=60, size=32, seed=0)
    spec = json.loads(json.dumps(SWEEP))
    spec["base"]["data"].update(path=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    sweep_file = tmp_path / "cluster-test.yaml"
    sweep_file.write_text(yaml.safe_dump(spec))
    project = tmp_path / "project"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(ray_cluster.env, CARCLF_PROJECT_ROOT=str(project), CARCLF_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "carclf.cli", "sweep", str(sweep_file), "--address", ray_cluster.address,
           "--tracking-uri", tracking_server.url, "--storage-path", str(tmp_path / "ray")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    state = json.loads((project / "results" / "cluster-test" / "sweep.json").read_text())
    assert state["tracking_uri"] == tracking_server.url and state["storage_path"] == str(tmp_path / "ray")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server.url)
    client = MlflowClient(tracking_server.url)
    exp = client.get_experiment_by_name("cluster-test")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'",
                              run_view_type=ViewType.ALL, max_results=100)
    assert len(runs) == SWEEP["num_samples"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["carclf.node_id"] for r in runs}) == 2, "trials must run on both nodes"
    artifacts_root = Path(tracking_server.artifacts_destination)
    for run in runs:
        assert run.data.tags["carclf.role"] == "trial" and run.data.tags["carclf.sweep"] == "cluster-test"
        # lean trials: validation only, the test split is the report's
        assert "val_f1_macro" in run.data.metrics and not any(k.startswith("test_") for k in run.data.metrics)
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "confusion_val.json"} <= names and "confusion_test.json" not in names, names
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), "artifacts go through the server"
        assert list(artifacts_root.rglob(f"{run.info.run_id}/artifacts/confusion_val.json")), \
            f"run {run.info.run_id}'s artifacts are not in the server's folder {artifacts_root}"

    # lean trials log no model: the models that get registered are the report's retests'
    trial_ids = {r.info.run_id for r in runs}
    assert not [m for m in client.search_logged_models([exp.experiment_id]) if m.source_run_id in trial_ids]

    import pandas as pd

    table = pd.read_csv(project / "results" / "cluster-test" / "results.csv")
    assert set(table["mlflow_run_id"]) == {r.info.run_id for r in runs}
    assert not (tmp_path / "mlflow.db").exists() and not (project / "mlflow.db").exists(), \
        "nothing may fall back to a local store"
