"""Faults a sweep survives: killed workers, a killed tracking server, SIGTERM, the time budget, races, a full disk.

Sweeps with Ray are `slow`. Most use a stand-in for run_experiment (`fake_experiment`) that logs a
real MLflow run and takes as long as the test says, so the faults land mid-trial on purpose; the
driver-level ones run `carclf sweep` as a user would, with real tiny trials.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

# Trials import this module's functions by reference; Ray workers do not have tests/ on their path.
import ray.cloudpickle  # noqa: E402  (Ray is a dependency; importing it starts nothing)
import yaml
from conftest import random_image

from carclf.core.errors import DataError, SweepError

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ---------------------------------------------------------------------- a controllable trial


def fake_experiment(cfg, *, on_epoch=None, parent_run_id=None, tags=None, **kw):
    """Stands in for run_experiment: one real MLflow run; control.json (beside the data folder) says how long
    it takes and whether the first attempt of the first trial kills its own process (SIGKILL)."""
    from carclf.tracking import runs as tracking

    control_dir = Path(cfg.data.path).parent
    control = json.loads((control_dir / "control.json").read_text())
    score = round(cfg.train.lr * 50, 6)
    with tracking.start_run(experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                            parent_run_id=parent_run_id, tags=tags, uri=cfg.tracking.uri) as run:
        tracking.log_params({"tracking.uri": cfg.tracking.uri})
        (control_dir / "started").mkdir(exist_ok=True)
        (control_dir / "started" / run.info.run_id).touch()
        if control.get("kill_first_attempt"):
            try:
                fd = os.open(control_dir / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, tags["carclf.trial_id"].encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(control.get("seconds", 1.0))
        tracking.log_metrics({"val_f1_macro": score, "test_f1_macro": score, "epochs_run": 1})
    return SimpleNamespace(run_id=run.info.run_id, val_metrics={"f1_macro": score}, test_metrics={"f1_macro": score},
                           infer_ms_per_img=1.0, size_mb=0.1)


def _fake_sweep(tmp_path: Path, control: dict, **over) -> Path:
    # Trials are faked, but the driver's preflight reads the data: two tiny classes of real images.
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(4):
            random_image(ord(cls) * 10 + i, size=(8, 8)).save(tmp_path / "data" / cls / f"{i}.png")
    (tmp_path / "control.json").write_text(json.dumps(control))
    spec = {"base": {"data": {"path": str(tmp_path / "data"), "image_size": 32, "min_images": 2},
                     "train": {"device": "cpu", "num_workers": 0}, "model": {"weights": "none"},
                     "tracking": {"experiment": "faults", "log_model": False}},
            "models": {"simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 1}}},
            "num_samples": 3, "max_concurrent_trials": 2, "n_startup_trials": 3, "warm_cache": False,
            "max_failures": 1, "seeds": {"sampler": 3, "run": 0}}
    spec.update(over)
    path = tmp_path / "faults.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _children(uri: str, parent: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


# ---------------------------------------------------------------------- faults inside one sweep


def _server_pids(db: Path) -> list[int]:
    """The MLflow server serving `db` that this process started (each leads its own process group with uvicorn)."""
    def serves(pid: int) -> bool:
        # The store is handed over in the environment (MLFLOW_BACKEND_STORE_URI), never on the command line.
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            return False
        store = next((e.decode().split("=", 1)[1] for e in env if e.startswith(b"MLFLOW_BACKEND_STORE_URI=")), "")
        return "mlflow" in cmd and str(db) in store

    return [pid for pid in _descendants(os.getpid()) if serves(pid)]


@pytest.mark.slow
def test_a_sweep_survives_a_killed_trial_worker_and_a_killed_tracking_server(tmp_path, tracked_db, ray_local,
                                                                             capsys):
    from mlflow.tracking import MlflowClient

    from sweeps.run.runner import run_sweep

    tracked = tracked_db

    path = _fake_sweep(tmp_path, {"kill_first_attempt": True, "seconds": 2.0}, num_samples=3)
    db = Path(tracked[len("sqlite:///"):])
    killed_server = []

    def kill_server_mid_trial():
        # Once two trial runs have started (one of them the attempt that kills itself), the whole
        # server (launcher and uvicorn) dies at once, as under the OOM killer, while trials are mid-run.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and len(list((tmp_path / "started").glob("*"))) < 2:
            time.sleep(0.2)
        pids = _server_pids(db)
        killed_server.extend(pids)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:  # uvicorn, in the launcher's group, is gone with it
                pass

    killer = threading.Thread(target=kill_server_mid_trial, daemon=True)
    killer.start()
    table = run_sweep(path, name="faulty", tracking_uri=tracked, experiment_fn=fake_experiment)
    killer.join(timeout=5)
    out = capsys.readouterr().out
    assert killed_server, "the server was never killed"
    assert table.attrs["status"] == "FINISHED"

    # The server came back on the same port, so every trial logged to one URL throughout.
    first_url = out.split("MLflow server for this sweep, while it runs: ")[1].split()[0]
    assert f"is back on {first_url}" in out
    runs = _children(tracked, table.attrs["parent_run_id"])
    assert {r.data.params["tracking.uri"] for r in runs} == {first_url}
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # Every trial completed once; the killed attempt is closed as FAILED and its trial was retried.
    assert len(table) == 3 and set(table["status"]) == {"completed"}
    finished = collections.Counter(r.data.tags["carclf.trial_id"] for r in runs if r.info.status == "FINISHED")
    assert set(finished.values()) == {1} and set(finished) == set(table["trial_id"])
    victim = (tmp_path / "killed").read_text()
    attempts = [r for r in runs if r.data.tags["carclf.trial_id"] == victim]
    assert sorted(r.info.status for r in attempts) == ["FAILED", "FINISHED"]
    dead = next(r for r in attempts if r.info.status == "FAILED")
    assert "process died" in dead.data.tags["carclf.error"]
    assert table.set_index("trial_id").loc[victim, "attempts"] == 2
    parent = MlflowClient(tracked).get_run(table.attrs["parent_run_id"])
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_the_time_budget_ending_mid_trial_ends_the_sweep_cleanly_and_resume_works(tmp_path, tracked_db, ray_local):
    from mlflow.tracking import MlflowClient

    from sweeps.run.runner import run_sweep

    tracked = tracked_db

    # Trials take longer than the whole budget: it runs out while they have reported nothing.
    path = _fake_sweep(tmp_path, {"seconds": 8.0}, num_samples=6, time_budget_s=5)
    table = run_sweep(path, name="budget", tracking_uri=tracked, experiment_fn=fake_experiment)
    assert table.attrs["status"] == "FINISHED"
    assert 1 <= len(table) < 6
    saved = (tmp_path / "results" / "budget" / "results.csv").read_text().splitlines()
    assert len(saved) == len(table) + 1
    client = MlflowClient(tracked)
    parent = table.attrs["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    runs = _children(tracked, parent)
    assert not [r for r in runs if r.info.status == "RUNNING"]

    # --resume: the budget is spent, so it ends at once, FINISHED, with nothing trained again.
    again = run_sweep(path, name="budget", tracking_uri=tracked, resume=True, experiment_fn=fake_experiment)
    assert again.attrs["status"] == "FINISHED"
    assert sorted(again["trial_id"]) == sorted(table["trial_id"])
    assert {r.info.run_id for r in _children(tracked, parent)} == {r.info.run_id for r in runs}
    assert client.get_run(parent).info.status == "FINISHED"


@pytest.mark.slow
def test_a_trial_no_node_can_hold_is_refused_before_anything_starts(tmp_path, tracked, ray_local):
    from sweeps.run.runner import run_sweep

    models = {"simple_cnn": {"space": {"epochs": 1}, "resources": {"cpu": 1, "gpu": 1}}}
    path = _fake_sweep(tmp_path, {}, models=models)
    with pytest.raises(SweepError, match=r"models\.simple_cnn\.resources\.gpu: each trial asks for 1 GPU.*gpu: 0"):
        run_sweep(path, name="gpu", tracking_uri=tracked, experiment_fn=fake_experiment)
    assert not (tmp_path / "results" / "gpu").exists()  # the name stays free
    assert not (tmp_path / "started").exists()


# ---------------------------------------------------------------------- the driver: SIGTERM, resume, sockets


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _decode(hex_addr: str) -> str:
    """An address from /proc/net/tcp{,6}: little-endian 32-bit words."""
    import ipaddress

    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket the processes hold."""
    owner = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                found.append((owner[fields[9]], _decode(addr), int(port, 16)))
    return found


def _is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


class _Driver:
    """`carclf sweep` in a subprocess; a thread reads its output and acts when its first trial has finished."""

    def __init__(self, cmd: list[str], env: dict, on_first_trial):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.serving = threading.Event()  # its name is claimed and its MLflow server is up
        self.reader = threading.Thread(target=self._read, args=(on_first_trial,), daemon=True)
        self.reader.start()

    def _read(self, on_first_trial) -> None:
        acted = False
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("MLflow server for this sweep"):
                self.serving.set()
            if not acted and line.startswith("[") and "->" in line:
                acted = True
                on_first_trial(self.proc)
        self.serving.set()

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
            self.reader.join(timeout=10)
            return code
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    @property
    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.slow
def test_driver_faults_sigterm_a_second_start_of_the_name_and_another_sweep_alongside(tmp_path, demo_dir, ray_local,
                                                                                     migrated_db, monkeypatch):
    """A user starts sweep 'term'; starts it again by mistake (refused, nothing touched); runs sweep 'other'
    at the same time; stops 'term' with SIGTERM (like Ctrl-C: exit 130, a resume hint, nothing RUNNING),
    and resumes it: every trial once. While 'term' runs, its Ray and MLflow server listen on loopback only."""
    import shutil

    from mlflow.tracking import MlflowClient
    from test_sweeps_runner import _sweep_file

    from sweeps.run.runner import run_sweep

    shutil.copy2(migrated_db, tmp_path / "mlflow.db")  # as a first sweep would have left it
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # More trials than the two that run at once: the SIGTERM always leaves some unstarted (with as many trials
    # as families, the defaults, all in flight, could all finish in Tune's graceful stop and end the sweep).
    path = _sweep_file(tmp_path / "s.yaml", demo_dir, num_samples=5)
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("CARCLF_CACHE_DIR", str(tmp_path / "cache"))
    sockets = []

    def look_then_terminate(proc):
        sockets.extend(listening_sockets(_descendants(proc.pid)))  # Ray, its workers and the server are all up
        proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or a batch scheduler would

    term = _Driver([sys.executable, "-m", "carclf.cli", "sweep", str(path), "--name", "term", "--tracking-uri", uri],
                   dict(os.environ), look_then_terminate)
    assert term.serving.wait(timeout=300), term.text[-3000:]
    state_file = tmp_path / "results" / "term" / "sweep.json"
    deadline = time.monotonic() + 120
    while not state_file.exists() and term.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # the parent run is being made
    claimed = state_file.read_bytes()
    with pytest.raises(SweepError, match="sweep 'term' is running right now"):
        run_sweep(path, name="term", tracking_uri=uri)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = run_sweep(_fake_sweep(other_dir, {"seconds": 1.0}, num_samples=2), name="other", tracking_uri=uri,
                      experiment_fn=fake_experiment)
    code = term.wait(timeout=300)
    text = term.text

    assert state_file.read_bytes() == claimed  # the refused second start changed nothing
    assert other.attrs["status"] == "FINISHED" and set(other["status"]) == {"completed"} and len(other) == 2

    # Local Ray (GCS, raylet, driver, workers) and the MLflow server listen on loopback only.
    assert len(sockets) >= 4, text[-3000:]
    assert [s for s in sockets if not _is_loopback(s[1])] == []

    assert code == 130, text[-3000:]
    assert "--resume" in text and "Traceback" not in text and "*** SIGTERM received" not in text
    state = json.loads(state_file.read_text())
    client = MlflowClient(uri)
    assert client.get_run(state["parent_run_id"]).info.status == "KILLED"
    assert not [r for r in _children(uri, state["parent_run_id"]) if r.info.status == "RUNNING"]

    table = run_sweep(path, name="term", tracking_uri=uri, resume=True)
    assert table.attrs["status"] == "FINISHED" and len(table) == 5
    runs = _children(uri, state["parent_run_id"])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    finished = collections.Counter(r.data.tags["carclf.trial_id"] for r in runs if r.info.status == "FINISHED")
    assert set(finished) == set(table["trial_id"]) and set(finished.values()) == {1}
    assert client.get_run(state["parent_run_id"]).info.status == "FINISHED"


# ---------------------------------------------------------------------- fast: no Ray


def test_results_table_write_that_hits_a_full_disk_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    import pandas as pd

    from sweeps.run.results import write_tables

    out = tmp_path / "results" / "s"
    table = pd.DataFrame({"trial_id": ["a", "b"], "val_f1_macro": [0.5, 0.7]})
    write_tables(table, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(self, path, *a, **kw):
        Path(path).write_bytes(b"trial_id,val_f1")  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    with pytest.raises(SweepError, match=r"results\.csv: No space left on device.*--resume"):
        write_tables(table.assign(val_f1_macro=[0.1, 0.2]), out)
    # The earlier pair is untouched (the parquet was written, then not moved in), and no temporary file is left.
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_results_table_in_an_unwritable_folder_is_a_clear_error(tmp_path):
    import pandas as pd

    from sweeps.run.results import write_tables

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(SweepError, match=f"cannot write the results table {blocked / 'results' / 'results.parquet'}"):
        write_tables(pd.DataFrame({"a": [1]}), blocked / "results")


def test_predict_out_to_an_unwritable_path_is_named(tmp_path):
    import pandas as pd

    from carclf.serving.predict import check_writable, write_csv

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(DataError, match=f"--out {blocked / 'p.csv'}: cannot write there"):
        check_writable(blocked / "p.csv")
    with pytest.raises(DataError, match=f"cannot write the predictions to {blocked / 'p.csv'}"):
        write_csv(pd.DataFrame({"a": [1]}), blocked / "p.csv")
    assert check_writable(tmp_path / "new" / "p.csv") == tmp_path / "new" / "p.csv"


class _FakeServer:
    """The parts of TrackingServer the watchdog uses; `dies` and `restart_fails` script what happens."""

    def __init__(self, restart_fails: bool):
        self.port, self.backend_store_uri, self.url = 5999, "sqlite:////x/mlflow.db", "http://127.0.0.1:5999"
        self.up, self.restart_fails, self.restarts = True, restart_fails, 0

    @property
    def running(self):
        return self.up

    def healthy(self, timeout):
        return self.up

    def restart(self):
        self.restarts += 1
        if self.restart_fails:
            raise OSError("port 5999 is taken")
        self.up = True
        return self


@pytest.mark.parametrize("restart_fails", [False, True])
def test_the_watchdog_restarts_a_dead_server_or_gives_up_and_says_why(restart_fails):
    from sweeps.run.watchdog import watch_server

    server, lost = _FakeServer(restart_fails), []
    with watch_server(server, lost.append, interval_s=0.05, attempts=2) as watch:
        time.sleep(0.2)
        server.up = False  # the process died
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (lost or watch.restarts):
            time.sleep(0.05)
    if restart_fails:
        assert server.restarts == 2 and watch.restarts == 0
        assert lost == [watch.lost] and "port 5999" in watch.lost and "could not be started again" in watch.lost
    else:
        assert watch.restarts == 1 and server.up and lost == [] and watch.lost is None


@pytest.mark.parametrize("fault, expected, store_lost", [
    ("deleted", "was deleted", True),
    ("replaced", "was replaced by another file", True),
    ("damaged", "is damaged (its first bytes are no longer an SQLite header)", True),
    ("disk full", "is full (", False),
])
def test_the_watchdog_stops_the_sweep_when_its_store_goes_away(fault, expected, store_lost, tmp_path, monkeypatch):
    import sqlite3

    from sweeps.run import watchdog

    db = tmp_path / "mlflow.db"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE runs (id TEXT)")
    server, lost = _FakeServer(restart_fails=False), []
    server.backend_store_uri = f"sqlite:///{db}"
    with watchdog.watch_server(server, lost.append, interval_s=0.05) as watch:
        time.sleep(0.2)
        assert lost == [] and watch.lost is None  # a healthy store is left alone
        if fault == "deleted":
            db.unlink()
        elif fault == "replaced":
            db.rename(tmp_path / "old.db")
            (tmp_path / "old.db").rename(tmp_path / "again.db")
            db.write_bytes((tmp_path / "again.db").read_bytes())
        elif fault == "damaged":
            with open(db, "r+b") as f:
                f.write(b"\0" * 100)
        else:
            monkeypatch.setattr(watchdog, "MIN_FREE_MB", float("inf"))
        started = time.monotonic()
        while time.monotonic() - started < 5 and not lost:
            time.sleep(0.05)
    assert lost == [watch.lost] and expected in watch.lost and str(db) in watch.lost
    assert watch.store_lost is store_lost and server.restarts == 0  # a restart cannot bring a store back


def test_a_lost_store_ends_the_sweep_with_the_cause_and_the_resume_line_and_is_not_made_again(tmp_path):
    from types import SimpleNamespace

    from carclf.core.errors import SweepError
    from sweeps.run import runner
    from sweeps.run.watchdog import ServerWatch, TrackingEndpoint

    db = tmp_path / "mlflow.db"
    watch = ServerWatch(_FakeServer(restart_fails=False), lost=f"the sweep's tracking store cannot be used: its "
                                                               f"store {db} was deleted", store_lost=True)
    endpoint = TrackingEndpoint("http://127.0.0.1:5999", watch)
    plan = SimpleNamespace(name="quick", spec_path="sweeps/quick.yaml", uri=f"sqlite:///{db}")
    for step in (runner._stop_if_store_lost, runner._bookkeeping):
        with pytest.raises(SweepError) as err:
            step(plan, endpoint) if step is runner._stop_if_store_lost else step(endpoint, plan)
        assert f"store {db} was deleted" in str(err.value)
        assert str(err.value).endswith("continue with: carclf sweep sweeps/quick.yaml --name quick --resume")
    assert not db.exists()
    watch.store_lost = False  # a disk nearly full: the runs are still closed through the store
    assert runner._bookkeeping(endpoint, plan) is not None


def test_mlflow_http_retries_are_bounded_where_trials_run(monkeypatch):
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    from sweeps.run.watchdog import HTTP_LIMITS, http_limits

    for key in HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")  # the user's own setting wins
    with http_limits():
        retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
        # urllib3's backoff: none before the first retry, then factor * 2**(n-1): the whole wait in seconds.
        assert sum(factor * 2 ** (n - 1) for n in range(2, retries + 1)) <= 90
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 7
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
