"""Run a sweep: Ray Tune with a seeded Optuna define-by-run space and ASHA, every trial a child run in MLflow.

    carclf sweep sweeps/quickstart.yaml              # results/quickstart/{results.csv,parquet}, MLflow runs
    carclf sweep sweeps/quickstart.yaml --resume     # continue after a crash or Ctrl-C
    carclf sweep sweeps/wide.yaml --warm-start quickstart --top 2   # start from quickstart's best configurations

The driver validates the sweep file, resolves every path to an absolute one (trials run in their
own working directories), creates the MLflow experiment and the sweep's parent run, and, for a local
sqlite store, starts one MLflow server that all trials log through (no `database is locked`).
Each trial calls `carclf.experiment.run_experiment`, the same code as `carclf train`.

A sweep ends FINISHED (exit 0) when its trials or its time budget are done, and KILLED (exit 130,
with the command that resumes it) after Ctrl-C, SIGTERM or a tracking server that could not be
brought back; no trial run is left RUNNING either way.

The parts: sweeps.search.spec (the sweep file), sweeps.run.driver (paths, tracking, parent run, state, the
name's lock), sweeps.run.session (Ray on loopback, SIGTERM), sweeps.run.capacity (trials that fit a node),
sweeps.run.watchdog (the tracking server kept up), sweeps.run.trial (one trial), sweeps.run.tuner (search,
scheduler, resources, resume), sweeps.run.progress (a line per finished trial, the time budget),
sweeps.run.results (the results table), sweeps.run.cluster (multi-node checks), sweeps.search.warmstart (first
trials from an earlier sweep), sweeps.analysis.explain (importance, history, Pareto front: run at the end,
logged to the parent run).
"""

from __future__ import annotations

import _thread
import contextlib
import signal
import time
from typing import Callable

from carclf.core.errors import SweepError
from carclf.report.selection import resolve_sweep, sweep_client, sweep_lines
from sweeps.analysis.edges import edge_lines, read_edge_warnings
from sweeps.analysis.explain import analyze_finished_sweep
from sweeps.run.capacity import check_cluster_capacity
from sweeps.run.driver import (
    SweepPlan,
    _tracking_endpoint,
    claim_sweep,
    open_parent_run,
    plan_sweep,
    prepare_stores,
    trial_context,
    warm_decode_cache,
)
from sweeps.run.preflight import preflight
from sweeps.run.progress import SweepProgress, sweep_progress
from sweeps.run.ranking import check_searched_backbones, rank_sweep_backbones
from sweeps.run.records import (
    ERROR_TAG,
    MODEL_TAG,
    PARENT_TAG,
    ROLE_TAG,
    STOPPED_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
    _mlflow_client,
)
from sweeps.run.results import PARAM_COLUMNS, _show, close_unfinished_runs, collect_results, orphan_runs, results_table
from sweeps.run.session import ray_session, sigterm_as_ctrl_c
from sweeps.run.stored import finished_table
from sweeps.run.trial import FinishRunOnStop, TrialContext, TrialStopped, first_fill_lock, run_trial, trial_config
from sweeps.run.tuner import NetworkASHA, PerModelResources, _interrupted, fit, make_trainable
from sweeps.run.watchdog import TrackingEndpoint, http_limits
from sweeps.search.plan import show_plan
from sweeps.search.spec import load_sweep_spec
from sweeps.search.warmstart import warm_start_points

# Besides its own two functions, the public names this module held before it was split, importable from here.
__all__ = ["run_sweep", "cli_sweep",
           "ERROR_TAG", "MODEL_TAG", "PARENT_TAG", "ROLE_TAG", "STOPPED_TAG", "SWEEP_TAG", "TRIAL_TAG",
           "PARAM_COLUMNS", "FinishRunOnStop", "NetworkASHA", "PerModelResources", "SweepProgress", "TrialContext",
           "TrialStopped", "first_fill_lock", "make_trainable", "results_table", "run_trial", "trial_config",
           "warm_decode_cache"]


def run_sweep(spec_path, *, name: str | None = None, address: str | None = None, resume: bool = False,
              storage_path: str | None = None, tracking_uri: str | None = None,
              experiment_fn: Callable | None = None, warm_start: str | None = None, top: int = 1):
    """Run (or with resume=True continue) a sweep; returns the results table, also saved under results/<name>/.

    `warm_start`: an earlier sweep whose `top` best configurations per family are the first trials.
    """
    plan = plan_sweep(spec_path, name=name, address=address, resume=resume, storage_path=storage_path,
                      tracking_uri=tracking_uri)
    stored = finished_table(plan) if resume and warm_start is None else None
    if stored is not None:  # nothing left to run: no Ray, no server
        print(f"sweep {plan.name!r} has finished: nothing to resume; its results as stored", flush=True)
        return stored
    preflight(plan.spec)
    check_searched_backbones(plan.spec)
    show_plan(plan.spec, plan.name)  # what it extracts, each family's estimated trial, a budget that holds none refused
    start = _warm_start(plan, warm_start, top)
    timings: dict[str, float] = {"start": time.perf_counter()}
    # The name is this driver's until it ends; Ray is up (on loopback when local) and SIGTERM acts as Ctrl-C.
    with claim_sweep(plan), ray_session(address), sigterm_as_ctrl_c(), http_limits():
        check_cluster_capacity(plan.spec)  # before anything is written: an impossible sweep leaves no trace
        prepare_stores(plan, address)
        return _run(plan, address, experiment_fn, timings, start)


def _run(plan: SweepPlan, address: str | None, experiment_fn: Callable | None, timings: dict[str, float], start):
    with _tracking_endpoint(plan.spec, plan.uri, on_lost=_stop_like_ctrl_c) as endpoint:
        parent = open_parent_run(_mlflow_client(endpoint.uri), endpoint.uri, plan)
        if not (address or "").startswith("ray://"):  # through a Ray client the driver may not see the data
            plan.spec = rank_sweep_backbones(plan.spec, plan.overrides, client=_mlflow_client(endpoint.uri),
                                             parent=parent)
        if start is not None:
            _log_warm_start(_mlflow_client(endpoint.uri), parent, start)
        orphans = orphan_runs(_mlflow_client(endpoint.uri), parent, plan.exp_path) if plan.state else ()
        ctx = trial_context(plan, endpoint.uri, parent, experiment_fn, orphans=orphans)
        status = "FAILED"
        try:
            with sweep_progress(plan.name, plan.spec, _mlflow_client(endpoint.uri), parent,
                                resumed=bool(plan.state)) as driver:
                timings["fit_start"], timings["fit_end"] = fit(plan.spec, plan.name, plan.storage, ctx, address,
                                                               restore=bool(plan.state),
                                                               points=start.points if start else ())
                _stop_if_store_lost(plan, endpoint)
                table = collect_results(plan.spec, _bookkeeping(endpoint, plan), parent, driver.trials, plan.out_dir)
            analyze_finished_sweep(plan.spec, _bookkeeping(endpoint, plan), plan.out_dir)
            status, ended_by = _end_status(plan, driver, timings["fit_end"] - timings["fit_start"], endpoint.lost)
            table.attrs["ended_by"] = ended_by
            with contextlib.suppress(Exception):  # the sweep itself is done; only the tag is lost
                _bookkeeping(endpoint, plan).set_tag(parent, ENDED_TAG, ended_by)
        except KeyboardInterrupt:
            status = "KILLED"
            close_unfinished_runs(_bookkeeping(endpoint, plan), parent)
            _resume_hint(plan, "was interrupted")
            raise
        finally:
            with contextlib.suppress(Exception):
                _bookkeeping(endpoint, plan).set_terminated(parent, status=status)
    timings["end"] = time.perf_counter()
    table.attrs["timings"] = {k: v - timings["start"] for k, v in timings.items() if k != "start"}
    table.attrs["parent_run_id"] = parent
    table.attrs["status"] = status  # FINISHED, or KILLED when interrupted (resume with --resume)
    table.attrs["out_dir"] = str(plan.out_dir)
    return table


ENDED_TAG = "carclf.sweep_ended_by"  # on the parent run: num_samples, time_budget, converged or interrupted


def _warm_start(plan: SweepPlan, earlier: str | None, top: int):
    """The earlier sweep's best configurations as this sweep's first points (None without --warm-start)."""
    if earlier is None:
        return None
    if plan.state:
        raise SweepError("--warm-start seeds a new sweep; a resumed sweep continues its own search")

    start = warm_start_points(plan.spec, earlier, top)
    print(f"warm start from {start.source!r}: {len(start.points)} configuration(s) run first", flush=True)
    for note in start.notes:
        print(f"  {note}", flush=True)
    return start


def _log_warm_start(client, parent: str, start) -> None:
    client.log_param(parent, "warm_start", start.source)
    client.log_dict(parent, start.as_dict(), "warm_start.json")


def _bookkeeping(endpoint: TrackingEndpoint, plan: SweepPlan):
    """The driver's client for closing the sweep: through its server, or the store itself once the server is lost."""
    _stop_if_store_lost(plan, endpoint)  # a deleted store must not be made again, empty, by MLflow
    return _mlflow_client(plan.uri if endpoint.lost else endpoint.uri)


def _stop_if_store_lost(plan: SweepPlan, endpoint: TrackingEndpoint) -> None:
    """A store deleted, replaced or damaged mid-sweep: nothing more is read or written; say why and how to go on."""
    if endpoint.store_lost:
        raise SweepError(f"sweep {plan.name!r} stopped: {endpoint.lost}. Nothing more was written to it; once the "
                         f"store is back (restore it from a backup), continue with: carclf sweep {plan.spec_path} "
                         f"--name {plan.name} --resume")


def _stop_like_ctrl_c(reason: str) -> None:
    """The tracking server is gone for good: stop the sweep as Ctrl-C would (Tune ends gracefully)."""

    _thread.interrupt_main(signal.SIGINT)


def _resume_hint(plan: SweepPlan, what: str) -> None:
    if (plan.out_dir / "sweep.json").is_file():
        print(f"sweep {plan.name!r} {what}; continue it with: carclf sweep {plan.spec_path} --name {plan.name} "
              "--resume", flush=True)


def _end_status(plan: SweepPlan, driver, fit_seconds: float, lost: str | None = None) -> tuple[str, str]:
    """(FINISHED, or KILLED when Ctrl-C, SIGTERM or a lost tracking server cut the sweep short (with a resume
    hint); what ended it: interrupted, converged, time_budget or num_samples), said in a line."""
    trials = driver.trials
    if lost or _interrupted(plan.spec, trials, fit_seconds, driver.budget_spent, bool(driver.converged)):
        _resume_hint(plan, f"was interrupted after {len(trials)} of {plan.spec.num_samples} trials")
        return "KILLED", "interrupted"
    if len(trials) >= plan.spec.num_samples:
        print(f"sweep {plan.name!r}: ended after its num_samples ({plan.spec.num_samples}) trials", flush=True)
        return "FINISHED", "num_samples"
    if driver.converged and not driver.budget_spent:
        print(f"sweep {plan.name!r}: the search converged after {len(trials)} of {plan.spec.num_samples} trials, "
              f"before its time budget was spent ({driver.converged})", flush=True)
        return "FINISHED", "converged"
    print(f"sweep {plan.name!r}: its time budget ({plan.spec.time_budget_s:g} s) was spent after {len(trials)} of "
          f"{plan.spec.num_samples} trials", flush=True)
    return "FINISHED", "time_budget"


def cli_sweep(args) -> int:
    """`carclf sweep FILE [--name] [--address] [--resume] [--storage-path] [--tracking-uri] [--warm-start [--top]]`."""
    table = run_sweep(args.file, name=args.name, address=args.address, resume=args.resume,
                      storage_path=args.storage_path, tracking_uri=args.tracking_uri,
                      warm_start=getattr(args, "warm_start", None), top=getattr(args, "top", 1))
    spec = load_sweep_spec(args.file)
    print()
    print(_show(table, spec.metric) if not table.empty else "no trials ran")
    out = table.attrs.get("out_dir")
    print(f"\nresults: {out}/results.csv  (parent MLflow run {table.attrs.get('parent_run_id')})")
    _print_next_steps(out)
    _print_edge_warnings(out)
    return 130 if table.attrs.get("status") == "KILLED" else 0


def _print_next_steps(out_dir) -> None:
    """Where to look (the temporary server is gone: the UI link goes through `carclf ui`) and what to run next."""

    try:
        info = resolve_sweep(out_dir)
        lines = sweep_lines(info)
    except Exception as e:  # noqa: BLE001 - the sweep itself is done and saved; only the hint is lost
        print(f"(no MLflow UI link: {e})")
        return
    print("\n".join(lines))  # links are not wrapped: a terminal opens them only whole
    print(next_step(info))


def next_step(info) -> str:
    """What to run next: the report, or once it exists, promote (or predict once promoted)."""
    if not (info.report_dir / "report.json").is_file():
        return f"next: carclf report {info.name}   (retests the best configuration per model on the test split)"
    if not _promoted(info):
        return (f"next: carclf promote {info.name}   (the report is in {info.report_dir}; promote registers each "
                "family and marks the winner)")
    return ("next: carclf predict models:/carclf-best@champion IMAGES   (the report is written and its models "
            "are registered)")


def _promoted(info) -> bool:
    """Whether a registered version came from this sweep (`carclf promote` tags each with carclf.sweep)."""

    try:
        return bool(sweep_client(info).search_model_versions(f"tags.`carclf.sweep` = '{info.name}'", max_results=1))
    except Exception:  # noqa: BLE001 - a registry that cannot be searched: say the step that is safe
        return False


def _print_edge_warnings(out_dir) -> None:
    """Best values at an edge of their search range (sweeps.analysis.edges), last: what to widen before the next sweep."""
    lines = edge_lines(read_edge_warnings(out_dir)) if out_dir else []
    if lines:
        print("\n" + "\n".join(lines))
