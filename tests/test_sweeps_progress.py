"""Sweeps, progress: a line per finished trial; the running best goes to the parent run only when it improves."""

from types import SimpleNamespace

from sweeps.run.progress import _DRIVERS, SweepProgress, sweep_progress
from sweeps.search.spec import validate_sweep_spec

SPEC = validate_sweep_spec({"base": {"data": {"image_size": 32}}, "models": {"svm": {"space": {"kernel": "linear"}}}})


class _Client:
    """What the progress callback asks of an MlflowClient; each log_batch is kept as (run, metrics, tags)."""

    def __init__(self, best: float | None = None):
        self.batches, self.best = [], best

    def log_batch(self, run_id, metrics=(), tags=()):
        self.batches.append((run_id, {m.key: m.value for m in metrics}, {t.key: t.value for t in tags}))

    def get_run(self, run_id):
        return SimpleNamespace(data=SimpleNamespace(metrics={"best_val_f1_macro": self.best}))


def _trial(trial_id: str, value: float | None, **config):
    result = {} if value is None else {"val_f1_macro": value}
    return SimpleNamespace(trial_id=trial_id, config={"model": "svm", "svm.C": 1.5, **config}, last_result=result)


def test_a_line_per_trial_and_the_best_logged_when_it_improves(capsys):
    client, progress = _Client(), SweepProgress("quick")
    with sweep_progress("quick", SPEC, client, "parent", resumed=False) as driver:
        progress.on_trial_complete(0, [], _trial("t1", 0.5, baseline=True))
        progress.on_trial_complete(1, [], _trial("t2", 0.4))
        progress.on_trial_error(2, [], _trial("t3", None))
        progress.on_trial_complete(3, [], _trial("t4", 0.7))
        progress.on_experiment_end(["every trial"])
    assert "quick" not in _DRIVERS  # only while Tune runs
    assert (driver.best, driver.finished, driver.failed, driver.trials) == (0.7, 3, 1, ["every trial"])
    assert {run for run, _, _ in client.batches} == {"parent"}
    assert [m.get("best_val_f1_macro") for _, m, _ in client.batches] == [0.5, None, None, 0.7]
    assert [(m["trials_finished"], m["trials_failed"]) for _, m, _ in client.batches] == [(1, 0), (2, 0), (2, 1), (3, 1)]
    assert client.batches[3][2] == {"carclf.best_trial_id": "t4", "carclf.best_model": "svm"}
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[t1] svm (default) C=1.5 -> val_f1_macro 0.5000 (best 0.5000)"  # the family's baseline
    assert lines[1] == "[t2] svm C=1.5 -> val_f1_macro 0.4000 (best 0.5000)"
    assert lines[2] == "[t3] svm C=1.5 -> failed" and lines[3].endswith("(best 0.7000)")


def test_a_resumed_sweep_goes_on_from_its_running_best():
    client = _Client(best=0.9)
    with sweep_progress("again", SPEC, client, "parent", resumed=True) as driver:
        SweepProgress("again").on_trial_complete(0, [], _trial("t5", 0.8))
    assert driver.best == 0.9 and "best_val_f1_macro" not in client.batches[0][1]


def test_a_callback_without_its_sweep_does_nothing():
    SweepProgress("gone").on_trial_complete(0, [], _trial("t1", 0.5))  # e.g. after the sweep ended: no error


def test_the_time_budget_tells_the_driver_it_ran_out_also_when_restored_spent():
    import pickle
    import time

    from sweeps.run.progress import SweepBudget

    budget = SweepBudget("timed", 0.05)
    with sweep_progress("timed", SPEC, _Client(), "parent", resumed=False) as driver:
        assert not budget.stop_all()  # the clock starts at the first check
        assert not driver.budget_spent
        time.sleep(0.1)
        assert budget.stop_all() and driver.budget_spent
    saved = pickle.dumps(budget)  # as Tune saves it with the experiment's state
    with sweep_progress("timed", SPEC, _Client(), "parent", resumed=True) as resumed:
        pickle.loads(saved)  # --resume: Tune restores the spent budget and ends at once, asking it nothing
        assert resumed.budget_spent
    with sweep_progress("timed", SPEC, _Client(), "parent", resumed=True) as fresh:
        pickle.loads(pickle.dumps(SweepBudget("timed", 60)))
        assert not fresh.budget_spent
