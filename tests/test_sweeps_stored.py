"""`carclf sweep FILE --resume` on a finished sweep answers from what is stored: no Ray, no server."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from carclf.cli import main


def _stored_sweep(root, data_dir, uri, status: str):
    """What `carclf sweep` leaves behind: the sweep file, results/<name>/ (sweep.json, sweep.yaml, the results
    table) and a parent run that ended with `status`."""
    spec = {"base": {"data": {"path": str(data_dir), "image_size": 32, "min_images": 2},
                     "model": {"weights": "none"}, "tracking": {"experiment": "sweeps"}},
            "models": {"simple_cnn": {"space": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "epochs": 2}}},
            "num_samples": 2, "max_concurrent_trials": 1}
    path = root / "done.yaml"
    path.write_text(yaml.safe_dump(spec))
    client = MlflowClient(uri)
    parent = client.create_run(client.create_experiment("sweeps"), tags={"carclf.role": "sweep",
                                                                         "carclf.sweep": "done"}).info.run_id
    client.set_terminated(parent, status=status)
    out = root / "results" / "done"
    out.mkdir(parents=True)
    (out / "sweep.yaml").write_text(path.read_text())
    (out / "sweep.json").write_text(json.dumps({"name": "done", "parent_run_id": parent, "experiment": "sweeps",
                                                "tracking_uri": uri, "storage_path": str(out / "ray"),
                                                "metric": "val_f1_macro", "mode": "max"}))
    pd.DataFrame({"trial_id": ["a1", "b2"], "model": ["simple_cnn"] * 2, "status": ["completed"] * 2,
                  "val_f1_macro": [0.61, 0.72], "lr": [0.002, 0.005]}).to_parquet(out / "results.parquet")
    return path, out


def _no_ray(monkeypatch):
    import sweeps.run.runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("a finished sweep started Ray or a server")

    monkeypatch.setattr(runner, "ray_session", refuse)
    monkeypatch.setattr(runner, "_tracking_endpoint", refuse)


def test_resume_of_a_finished_sweep_prints_its_stored_table_and_the_next_step(tracked, demo_dir, tmp_path, monkeypatch,
                                                                            capsys):
    path, out = _stored_sweep(tmp_path, demo_dir, tracked, "FINISHED")
    _no_ray(monkeypatch)
    assert main(["sweep", str(path), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "sweep 'done' has finished: nothing to resume; its results as stored" in printed
    assert "b2" in printed and "0.72" in printed
    assert "next: carclf report done" in printed

    (out / "report").mkdir()
    (out / "report" / "report.json").write_text("{}")
    assert main(["sweep", str(path), "--resume"]) == 0
    assert "next: carclf promote done" in capsys.readouterr().out


@pytest.mark.parametrize("status", ["KILLED", "RUNNING"])
def test_an_interrupted_sweep_is_not_answered_from_storage(tracked, demo_dir, tmp_path, status):
    from sweeps.run.driver import plan_sweep
    from sweeps.run.stored import finished_table

    path, _ = _stored_sweep(tmp_path, demo_dir, tracked, status)
    plan = plan_sweep(path, name=None, address=None, resume=True, storage_path=None, tracking_uri=None)
    assert finished_table(plan) is None
