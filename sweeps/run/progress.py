"""The sweep's progress on the driver: a line per finished trial, the running best on the parent run.

Tune pickles its callbacks, so `SweepProgress` holds only the sweep's name and finds the driver's
state (MLflow client, parent run, running best, the trials at the end) in `_DRIVERS`, which
`sweep_progress` fills for the duration of `Tuner.fit()`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from mlflow.entities import Metric, RunTag
from ray import tune
from ray.tune.stopper import TimeoutStopper

from sweeps.search.spec import SweepSpec

log = logging.getLogger(__name__)


@dataclass
class _Driver:
    """Driver-side state the progress callback looks up by sweep name (callbacks are pickled by Ray)."""

    spec: SweepSpec
    client: Any  # MlflowClient
    parent_run_id: str
    metric: str
    mode: str
    best: float | None = None
    finished: int = 0
    failed: int = 0
    lines: list[str] = field(default_factory=list)
    trials: list = field(default_factory=list)
    budget_spent: bool = False  # set by SweepBudget when the time budget ended the sweep
    converged: str | None = None  # set by the budget searcher when the search converged: why


_DRIVERS: dict[str, _Driver] = {}


def active_driver(sweep: str) -> _Driver | None:
    """The driver state of a sweep that is running in this process (what pickled callbacks and searchers log to)."""
    return _DRIVERS.get(sweep)


def _short_params(spec: SweepSpec, config: dict) -> str:
    label = config.get("model", "?")
    parts = []
    for name, value in config.items():
        if name.startswith(f"{label}.") and not name.endswith("_scale"):
            v = f"{value:.3g}" if isinstance(value, float) else str(value)
            parts.append(f"{name[len(label) + 1:]}={v}")
    return " ".join(parts)


class SweepProgress(tune.Callback):
    """A line per finished trial; the running best as metrics of the parent run."""

    def __init__(self, sweep: str):
        self.sweep = sweep

    def _driver(self) -> _Driver | None:
        return _DRIVERS.get(self.sweep)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._finished(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._finished(trial, failed=True)

    def on_experiment_end(self, trials, **info):
        d = self._driver()
        if d is not None:
            d.trials = list(trials)

    def _finished(self, trial, *, failed: bool) -> None:
        d = self._driver()
        if d is None:
            return
        result = trial.last_result or {}
        value = result.get(d.metric)
        params = _short_params(d.spec, trial.config)
        if trial.config.get("baseline"):
            params = f"(default) {params}".rstrip()
        metrics: dict[str, float] = {}
        tags: dict[str, str] = {}
        if failed or value is None:
            d.failed += 1
            line = f"[{trial.trial_id}] {trial.config.get('model')} {params} -> failed"
        else:
            d.finished += 1
            if d.best is None or (value > d.best if d.mode == "max" else value < d.best):
                d.best = value
                metrics[f"best_{d.metric}"] = value
                tags = {"carclf.best_trial_id": trial.trial_id, "carclf.best_model": str(trial.config.get("model"))}
            line = f"[{trial.trial_id}] {trial.config.get('model')} {params} -> {d.metric} {value:.4f} (best {d.best:.4f})"
            if result.get("equivalent"):  # sweeps.run.equivalence
                line += " [not trained: the same model as an earlier trial]"
        d.lines.append(line)
        print(line, flush=True)
        metrics.update(trials_finished=d.finished, trials_failed=d.failed)
        self._log(d, metrics, tags)

    @staticmethod
    def _log(d: _Driver, metrics: dict, tags: dict) -> None:
        """One request per finished trial: this runs in Tune's event loop."""

        try:
            d.client.log_batch(d.parent_run_id, metrics=_metrics(metrics, step=d.finished + d.failed),
                               tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:  # the sweep goes on even if the parent cannot be updated
            log.warning("could not log the running best to the parent run: %s", e)


class SweepBudget(TimeoutStopper):
    """The sweep's time budget (Tune's TimeoutStopper) that tells the driver when it ran out.

    A sweep the budget ended is finished, not interrupted. Tune saves the stopper with its state, so
    on --resume the budget goes on from what was left, and this tells the resumed driver too.
    """

    def __init__(self, sweep: str, seconds: float):
        super().__init__(seconds)
        self.sweep = sweep

    def stop_all(self) -> bool:
        spent = super().stop_all()
        if spent:
            self._tell_driver()
        return spent

    def __setstate__(self, state: dict) -> None:
        # Restored on --resume: a budget already spent ends the sweep without asking stop_all again.
        super().__setstate__(state)
        if self._budget <= 0:
            self._tell_driver()

    def _tell_driver(self) -> None:
        d = _DRIVERS.get(self.sweep)
        if d is not None:
            d.budget_spent = True


def _metrics(values: dict, step: int):
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in values.items()]


@contextlib.contextmanager
def sweep_progress(sweep: str, spec: SweepSpec, client, parent_run_id: str, resumed: bool) -> Iterator[_Driver]:
    """The driver state SweepProgress(sweep) reports into while Tune runs; its trials are there afterwards."""
    driver = _Driver(spec=spec, client=client, parent_run_id=parent_run_id, metric=spec.metric, mode=spec.mode)
    if resumed:  # the running best goes on from where the interrupted sweep left it
        m = client.get_run(parent_run_id).data.metrics
        driver.best = m.get(f"best_{spec.metric}")
    _DRIVERS[sweep] = driver
    try:
        yield driver
    finally:
        _DRIVERS.pop(sweep, None)
