"""Benchmark: sweeps on the demo data under the faults users meet; nothing may be lost.

    .venv/bin/python bench/faults.py        # about 10-15 minutes on 2 loaded cores; ends with RESULT {json}

Scenarios (each its own sweep name in one project folder and one MLflow database):
  worker_sigkill     the first network trial's process is SIGKILLed mid-epoch (Tune retries it)
  server_killed      the sweep's MLflow server (its whole process group) is SIGKILLed while trials run
  time_budget        the time budget runs out while every trial is still running (none has reported)
  driver_sigkill     `carclf sweep` and everything it started are SIGKILLed after two trials; then --resume
  driver_sigterm     the driver gets SIGTERM after its first trial; then --resume
  two_at_once        three `carclf sweep` at once: names x, x and y (one x must be refused, untouched)
  results_enospc     writing the results table fails with ENOSPC; then --resume writes it
  store_deleted      the sweep's mlflow.db is deleted after its first trial; restored from a copy, then --resume
  store_corrupted    mlflow.db's first page is overwritten after the first trial; restored, then --resume
  disk_full          the project lies on a small tmpfs, filled after the first trial; freed, then --resume
                     (skipped, with the reason, where no tmpfs can be mounted)
The last three also report `stop_s`, the seconds from the fault to the driver's exit (a clean stop:
the cause and the resume line printed). CARCLF_BENCH_SCENARIOS=store_deleted,disk_full runs only those.
For each: trials expected, trials recorded (a row in results.csv and exactly one finished run,
or for trials the budget cut, a row and no open run), runs left RUNNING, files half-written
(temporary files, unreadable or mismatched tables, unreadable sweep.json). The RESULT line holds
them and `lost` = not recorded + left RUNNING + half-written, which must be 0.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

SAMPLES = 3
STOP_LIMIT_S = 180  # a store or disk fault must end the driver within this (the aim is about a minute)


# ---------------------------------------------------------------------- the sweeps


def sweep_file(tmp: Path, name: str, data: Path, **over) -> Path:
    spec = {"base": {"data": {"path": str(data), "image_size": 32, "min_images": 2},
                     "split": {"train": 0.6, "val": 0.2, "test": 0.2}, "balance": {"mode": "none"},
                     "augment": {"strength": 0.0},
                     "train": {"device": "cpu", "num_workers": 0, "batch_size": 16, "amp": False},
                     "model": {"weights": "none"}, "svm": {"backbone": "simple_cnn", "backbone_weights": "none"},
                     "tracking": {"experiment": "faults", "log_model": False}},
            "models": {"simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 2}},
                       "svm_linear": {"model": "svm", "space": {"kernel": "linear"}}},
            "num_samples": SAMPLES, "max_concurrent_trials": 2, "n_startup_trials": SAMPLES,
            "scheduler": None, "seeds": {"sampler": 11, "run": 0}, "max_failures": 1}
    spec.update(over)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def faulty_experiment(cfg, *, on_epoch=None, parent_run_id=None, tags=None, **kw):
    """run_experiment with the fault control.json asks for: SIGKILL of the first network trial at its first
    epoch, or a slow start (the trial holds its run open and reports nothing for `delay_s`)."""
    from carclf.experiment import run_experiment
    from carclf.tracking import runs as tracking

    control_file = Path(os.environ["CARCLF_BENCH_CONTROL"])
    control = json.loads(control_file.read_text()) if control_file.exists() else {}
    (control_file.parent / "started").mkdir(exist_ok=True)
    (control_file.parent / "started" / tags["carclf.trial_id"]).touch()
    step = on_epoch
    if control.get("kill_first_network") and cfg.model.name != "svm":
        def step(epoch, row):
            try:
                os.close(os.open(control_file.parent / "killed", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return on_epoch(epoch, row)
            os.kill(os.getpid(), signal.SIGKILL)
    if control.get("delay_s"):
        with tracking.start_run(experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                                parent_run_id=parent_run_id, tags=tags, uri=cfg.tracking.uri) as run:
            time.sleep(control["delay_s"])
            tracking.log_metrics({"val_f1_macro": 0.5, "test_f1_macro": 0.5})
        return SimpleNamespace(run_id=run.info.run_id, val_metrics={"f1_macro": 0.5}, test_metrics={"f1_macro": 0.5})
    return run_experiment(cfg, on_epoch=step, parent_run_id=parent_run_id, tags=tags, **kw)


# ---------------------------------------------------------------------- what was kept


def check(tmp: Path, uri: str, names: list[str], expected: int, budget: bool = False) -> dict:
    """Trials recorded, runs left RUNNING and files half-written for the sweeps `names`."""
    import pandas as pd
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    recorded = running = half = 0
    for name in names:
        folder = tmp / "results" / name
        half += sum(1 for p in folder.glob(".*") if p.is_file())  # temporary files left behind
        try:
            state = json.loads((folder / "sweep.json").read_text())
            table = pd.read_csv(folder / "results.csv")
            if len(pd.read_parquet(folder / "results.parquet")) != len(table):
                half += 1
        except FileNotFoundError:
            continue  # nothing recorded for this name: counted as not recorded
        except (ValueError, OSError):
            half += 1
            continue
        exp = client.get_run(state["parent_run_id"]).info.experiment_id
        runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'",
                                  run_view_type=ViewType.ACTIVE_ONLY, max_results=1000)
        running += sum(r.info.status == "RUNNING" for r in runs)
        finished = collections.Counter(r.data.tags.get("carclf.trial_id") for r in runs if r.info.status == "FINISHED")
        for row in table.itertuples():
            if finished.get(row.trial_id) == 1 or (budget and finished.get(row.trial_id, 0) <= 1):
                recorded += 1
    return {"expected": expected, "recorded": min(recorded, expected), "running": running, "half_written": half}


# ---------------------------------------------------------------------- the scenarios


def in_process(tmp, uri, name, data, control: dict, **over) -> tuple:
    from sweeps.run.runner import run_sweep

    (tmp / "control.json").write_text(json.dumps(control))
    path = sweep_file(tmp, name, data, **over)
    return path, run_sweep(path, name=name, tracking_uri=uri, experiment_fn=faulty_experiment)


def worker_sigkill(tmp, uri, data):
    in_process(tmp, uri, "worker_sigkill", data, {"kill_first_network": True},
               models={"simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 2}}})
    assert (tmp / "killed").exists(), "no trial was killed"
    return check(tmp, uri, ["worker_sigkill"], SAMPLES)


def _server_pids(db: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            # the store is handed to the server in its environment, never on its command line
            store = next((e.decode().split("=", 1)[1] for e in env if e.startswith(b"MLFLOW_BACKEND_STORE_URI=")), "")
            if "mlflow" in cmd and " server" in cmd and str(db) in store:
                pids.append(int(entry.name))
    return pids


def server_killed(tmp, uri, data):
    started = tmp / "started"
    killed = []

    def kill_when_trials_run():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and len(list(started.glob("*"))) < 1:
            time.sleep(0.2)
        time.sleep(2.0)  # mid-trial
        for pid in _server_pids(Path(uri[len("sqlite:///"):])):
            killed.append(pid)
            try:
                os.killpg(pid, signal.SIGKILL)  # the server leads its process group: launcher and uvicorn die together
            except ProcessLookupError:  # uvicorn, gone with its launcher's group
                pass

    for p in started.glob("*"):
        p.unlink()
    thread = threading.Thread(target=kill_when_trials_run, daemon=True)
    thread.start()
    in_process(tmp, uri, "server_killed", data, {})
    assert killed, "the server was not killed"
    return check(tmp, uri, ["server_killed"], SAMPLES)


def time_budget(tmp, uri, data):
    _, table = in_process(tmp, uri, "time_budget", data, {"delay_s": 20}, time_budget_s=10, num_samples=6)
    return check(tmp, uri, ["time_budget"], len(table), budget=True)


def cli(tmp, name, path, *extra, project: Path | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **({"CARCLF_PROJECT_ROOT": str(project)} if project else {}))
    return subprocess.Popen([sys.executable, "-m", "carclf.cli", "sweep", str(path), "--name", name, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)


def _after_trials(proc, n: int, act) -> str:
    out, done = [], 0
    for line in proc.stdout:
        out.append(line)
        if line.startswith("[") and "->" in line:
            done += 1
            if done == n:
                act(proc)
                break
    out.extend(proc.stdout)
    proc.wait(timeout=600)
    return "".join(out)


def driver_killed(tmp, uri, data, how: str):
    name = f"driver_{how}"
    path = sweep_file(tmp, name, data, num_samples=4)
    proc = cli(tmp, name, path, "--tracking-uri", uri)
    if how == "sigkill":
        _after_trials(proc, 2, lambda p: os.killpg(p.pid, signal.SIGKILL))
    else:
        _after_trials(proc, 1, lambda p: p.send_signal(signal.SIGTERM))
        assert proc.returncode == 130, f"SIGTERM: exit {proc.returncode}"
    resumed = cli(tmp, name, path, "--tracking-uri", uri, "--resume")
    text = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, text[-2000:]
    return check(tmp, uri, [name], 4)


def two_at_once(tmp, uri, data):
    path = sweep_file(tmp, "two", data, num_samples=2, models={"svm_linear": {"model": "svm",
                                                                              "space": {"kernel": "linear"}}})
    procs = [cli(tmp, "x", path, "--tracking-uri", uri), cli(tmp, "x", path, "--tracking-uri", uri),
             cli(tmp, "y", path, "--tracking-uri", uri)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes[:2]) == [0, 2] and codes[2] == 0, (codes, [o[-1500:] for o in outs])
    assert "is running right now" in outs[codes.index(2)]
    return check(tmp, uri, ["x", "y"], 4)


def results_enospc(tmp, uri, data):
    import pandas as pd

    from carclf.core.errors import SweepError
    from sweeps.run.runner import run_sweep

    real = pd.DataFrame.to_csv

    def full_disk(self, target, *a, **kw):
        if "results.csv" in str(target):
            Path(target).write_text("trial_id,mod")  # part of it reached the disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, target, *a, **kw)

    (tmp / "control.json").write_text("{}")
    path = sweep_file(tmp, "results_enospc", data)
    pd.DataFrame.to_csv = full_disk
    try:
        run_sweep(path, name="results_enospc", tracking_uri=uri, experiment_fn=faulty_experiment)
        raise AssertionError("the full disk went unnoticed")
    except SweepError as e:
        print(f"  refused as it should: {e}", flush=True)
    finally:
        pd.DataFrame.to_csv = real
    half = check(tmp, uri, ["results_enospc"], SAMPLES)["half_written"]
    run_sweep(path, name="results_enospc", tracking_uri=uri, resume=True, experiment_fn=faulty_experiment)
    after = check(tmp, uri, ["results_enospc"], SAMPLES)
    after["half_written"] += half
    return after


def _store_fault(tmp: Path, data: Path, name: str, fault) -> dict:
    """A CLI sweep in its own project folder; `fault(project)` after its first trial; the driver must stop on its
    own, naming the cause and the resume line; then `fault`'s undo and --resume must finish every trial."""
    import shutil

    project = tmp / name
    project.mkdir(exist_ok=True)
    uri = f"sqlite:///{project / 'mlflow.db'}"
    path = sweep_file(project, name, data, num_samples=4)
    proc = cli(project, name, path, "--tracking-uri", uri, project=project)
    faulted: dict = {}

    def act(p):
        shutil.copy2(project / "mlflow.db", tmp / f"{name}.backup.db")  # the user's backup, taken just before
        faulted["undo"], faulted["at"] = fault(project), time.monotonic()
        timer.start()

    def hung():  # a driver still there this long after the fault did not stop on its own
        faulted["killed"] = True
        os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(STOP_LIMIT_S, hung)
    text = _after_trials(proc, 1, act)
    timer.cancel()
    stop_s = round(time.monotonic() - faulted["at"], 1) if "at" in faulted else None
    clean = not faulted.get("killed") and proc.returncode in (2, 130) and "--resume" in text
    print(f"  stopped with exit {proc.returncode} after {stop_s} s; last lines:\n    "
          + "\n    ".join(text.strip().splitlines()[-3:]), flush=True)
    faulted["undo"]()
    resumed = cli(project, name, path, "--tracking-uri", uri, "--resume", project=project)
    out = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out[-2000:]
    result = check(project, uri, [name], 4)
    result.update(stop_s=stop_s, clean_stop=clean)
    if not clean:
        result["half_written"] += 1  # a stop that needed a kill, or said nothing, counts as a loss
    return result


def store_deleted(tmp, uri, data):
    def fault(project):
        (project / "mlflow.db").unlink()
        return lambda: os.replace(tmp / "store_deleted.backup.db", project / "mlflow.db")
    return _store_fault(tmp, data, "store_deleted", fault)


def store_corrupted(tmp, uri, data):
    def fault(project):
        with open(project / "mlflow.db", "r+b") as f:
            f.write(b"\0" * 4096)  # its first page
        return lambda: os.replace(tmp / "store_corrupted.backup.db", project / "mlflow.db")
    return _store_fault(tmp, data, "store_corrupted", fault)


def disk_full(tmp, uri, data):
    mount = tmp / "disk_full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        return {"expected": 0, "recorded": 0, "running": 0, "half_written": 0,
                "skipped": f"no tmpfs here: {done.stderr.strip()[:200]}"}

    def fault(project):
        filler = project / "filler"
        free = os.statvfs(project).f_bavail * os.statvfs(project).f_frsize
        with open(filler, "wb") as f:  # leave 4 MB: below the watchdog's limit, as a disk filling up would
            f.truncate(0)
            chunk = b"\0" * 2**20
            for _ in range(max(0, free // 2**20 - 4)):
                f.write(chunk)
        return lambda: filler.unlink()

    try:
        return _store_fault(tmp, data, "disk_full", fault)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


STORE_SCENARIOS = [("store_deleted", store_deleted), ("store_corrupted", store_corrupted), ("disk_full", disk_full)]


def main() -> int:
    import ray

    from carclf.data.demo import make_demo

    results = {}
    with tempfile.TemporaryDirectory(prefix="carclf-bench-faults-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ.update(CARCLF_PROJECT_ROOT=str(tmp), CARCLF_CACHE_DIR=str(tmp / "cache"),
                          CARCLF_BENCH_CONTROL=str(tmp / "control.json"))
        data = tmp / "demo"
        make_demo(data, n_images=60, size=40, seed=0)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        chosen = [n for n in os.environ.get("CARCLF_BENCH_SCENARIOS", "").split(",") if n]
        scenarios = [("worker_sigkill", worker_sigkill), ("server_killed", server_killed),
                     ("time_budget", time_budget), ("results_enospc", results_enospc)]
        scenarios = [(n, run) for n, run in scenarios if not chosen or n in chosen]
        # One Ray for the in-process scenarios; it inherits CARCLF_BENCH_CONTROL.
        if scenarios:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            for name, run in scenarios:
                results[name] = timed(name, run, tmp, uri, data)
        finally:
            ray.shutdown()
        for name, run in [("driver_sigkill", lambda t, u, d: driver_killed(t, u, d, "sigkill")),
                          ("driver_sigterm", lambda t, u, d: driver_killed(t, u, d, "sigterm")),
                          ("two_at_once", two_at_once), *STORE_SCENARIOS]:
            if not chosen or name in chosen:
                results[name] = timed(name, run, tmp, uri, data)
    lost = sum(r["expected"] - r["recorded"] + r["running"] + r["half_written"] for r in results.values())
    print(f"\n{'scenario':16} {'expected':>8} {'recorded':>8} {'RUNNING':>8} {'half-written':>12} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:16} {r['expected']:8} {r['recorded']:8} {r['running']:8} {r['half_written']:12} "
              f"{r['seconds']:8.0f}")
    print(f"lost: {lost}")
    print("RESULT " + json.dumps({"lost": lost, "scenarios": results}))
    return 0 if lost == 0 else 1


def timed(name, run, *args) -> dict:
    print(f"\n=== {name}", flush=True)
    start = time.perf_counter()
    try:
        result = run(*args)
    except Exception as e:  # noqa: BLE001 - a scenario that breaks counts everything as lost
        print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
        result = {"expected": 1, "recorded": 0, "running": 0, "half_written": 0, "error": str(e)[:300]}
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(f"  {name}: {result}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
