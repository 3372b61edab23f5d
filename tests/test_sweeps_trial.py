"""Sweeps, one trial: trials needing the same cache entries wait for the first to fill them."""

from __future__ import annotations

import pytest


def test_first_fill_lock_makes_the_second_trial_wait_for_the_first(tmp_path, caplog):
    import threading
    import time

    from sweeps.run.trial import first_fill_lock

    key = {"svm": {"backbone": "mobilenet_v2"}, "data": {"image_size": 320}}
    order = []

    def trial(name, hold):
        with first_fill_lock(tmp_path, key):
            order.append(f"{name} in")
            time.sleep(hold)
            order.append(f"{name} out")

    first = threading.Thread(target=trial, args=("first", 0.5))
    first.start()
    time.sleep(0.1)
    trial("second", 0)
    first.join()
    assert order == ["first in", "first out", "second in", "second out"]
    assert len(list((tmp_path / "sweep-locks").glob("*.done"))) == 1
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting for another trial")]
    assert len(waits) == 1 and "mobilenet_v2" in waits[0] and "320 px" in waits[0]  # the second says what it waits for


def test_features_the_driver_extracted_let_trials_run_side_by_side(tmp_path):
    import threading

    from sweeps.run.trial import first_fill_lock, mark_filled

    key = {"svm": {"backbone": "mobilenet_v2"}}
    mark_filled(tmp_path, key)
    inside = threading.Barrier(2, timeout=5)

    def trial():
        with first_fill_lock(tmp_path, key):
            inside.wait()  # both inside at once, or the barrier times out

    other = threading.Thread(target=trial)
    other.start()
    trial()
    other.join()


@pytest.mark.parametrize("settings, seed_matters", [
    ({}, False),  # unaugmented features of a weights file: trials that differ only in seed share them
    ({"augment": {"strength": 0.5}}, True),
    ({"balance": {"mode": "both"}}, True),  # balancing draws rows by seed
    ({"svm": {"backbone_weights": "none"}}, True),  # a random-init backbone is seeded
])
def test_trials_wait_for_each_other_only_where_the_seed_leaves_the_features_alone(settings, seed_matters):
    from carclf.config import RunConfig, deep_merge
    from sweeps.run.trial import _feature_key

    base = {"model": {"name": "svm"}, "balance": {"mode": "none"}, "augment": {"strength": 0.0},
            "svm": {"backbone": "mobilenet_v2", "backbone_weights": "imagenet"}}
    keys = [_feature_key(RunConfig.model_validate(deep_merge(base, {**settings, "seed": s}))) for s in (0, 1)]
    assert (keys[0] != keys[1]) == seed_matters
    other_c = RunConfig.model_validate(deep_merge(base, {**settings, "svm": {**settings.get("svm", {}), "C": 9.0}}))
    assert _feature_key(other_c) == keys[0]  # C never changes the features


def test_first_fill_lock_is_not_marked_done_by_a_failure(tmp_path):
    from sweeps.run.trial import first_fill_lock

    with pytest.raises(RuntimeError):
        with first_fill_lock(tmp_path, {"k": 1}):
            raise RuntimeError("extraction failed")
    assert not list((tmp_path / "sweep-locks").glob("*.done"))


def _parent_and_trial_runs(uri: str, runs: list[tuple[str, str, dict]]):
    """A sweep's parent run and child trial runs [(trial_id, status, sampled params)] as the runner tags them."""
    from mlflow.tracking import MlflowClient

    from sweeps.run.records import PARAMS_TAG, PARENT_TAG, ROLE_TAG, TRIAL_TAG
    from sweeps.run.trial import params_key

    client = MlflowClient(uri)
    exp = client.create_experiment("trials")
    parent = client.create_run(exp, tags={ROLE_TAG: "sweep"}).info.run_id
    ids = []
    for trial_id, status, params in runs:
        run = client.create_run(exp, tags={PARENT_TAG: parent, ROLE_TAG: "trial", TRIAL_TAG: trial_id,
                                           PARAMS_TAG: params_key(params)})
        client.log_metric(run.info.run_id, "val_f1_macro", 0.75)
        client.set_terminated(run.info.run_id, status=status)
        ids.append(run.info.run_id)
    return client, parent, ids


def _ctx(parent: str, uri: str, orphans=()):
    from sweeps.run.trial import TrialContext
    from sweeps.search.spec import validate_sweep_spec

    spec = validate_sweep_spec({"models": {"svm": {"space": {"kernel": "linear"}}}})
    return TrialContext(sweep="s", spec=spec, overrides={}, parent_run_id=parent, tracking_uri=uri, resumed=True,
                        orphans=tuple(orphans))


def test_a_resumed_trial_takes_over_the_finished_run_of_a_trial_tune_never_saved(tracked_db):
    from sweeps.run.records import ADOPTED_TAG, TRIAL_TAG
    from sweeps.run.trial import _reuse_finished_run

    params = {"model": "svm", "svm.C": 2.5}
    client, parent, (orphan, other) = _parent_and_trial_runs(
        tracked_db, [("lost1", "FINISHED", params), ("t2", "FINISHED", {"model": "svm", "svm.C": 9.0})])
    ctx = _ctx(parent, tracked_db, orphans=[orphan])
    client.set_tag(orphan, "carclf.orphan", "tagged by an earlier resume")
    # Not an orphan, or other parameters: trained as usual.
    assert _reuse_finished_run(_ctx(parent, tracked_db), client, "new1", "svm", params) is None
    assert _reuse_finished_run(ctx, client, "new1", "svm", {"model": "svm", "svm.C": 1.0}) is None
    row = _reuse_finished_run(ctx, client, "new1", "svm", dict(params))
    assert row["mlflow_run_id"] == orphan and row["val_f1_macro"] == 0.75 and row["reused"] == 1
    tags = client.get_run(orphan).data.tags
    assert tags[TRIAL_TAG] == "new1" and tags[ADOPTED_TAG] == "lost1" and "carclf.orphan" not in tags
    # Taken once: a second trial with the same parameters trains its own.
    assert _reuse_finished_run(ctx, client, "new2", "svm", dict(params)) is None
    assert client.get_run(other).data.tags[TRIAL_TAG] == "t2"


def test_a_trial_attempt_whose_process_died_is_closed_failed_when_the_trial_starts_again(tracked_db):
    from sweeps.run.records import ERROR_TAG
    from sweeps.run.trial import close_dead_attempts

    client, parent, (dead, other) = _parent_and_trial_runs(tracked_db, [("t1", "RUNNING", {}), ("t2", "RUNNING", {})])
    close_dead_attempts(_ctx(parent, tracked_db), client, "t1")
    assert client.get_run(dead).info.status == "FAILED"
    assert "process died" in client.get_run(dead).data.tags[ERROR_TAG]
    assert client.get_run(other).info.status == "RUNNING"  # another trial's run is left alone
