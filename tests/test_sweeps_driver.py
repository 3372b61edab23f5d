"""Sweeps, the driver's plan: absolute paths for trials, and a started sweep is continued, never started again."""

import json
from pathlib import Path

import pytest
import yaml

from carclf.core.errors import SweepError
from sweeps.run.driver import plan_sweep


def _plan(path, **kw):
    args = {"name": None, "address": None, "resume": False, "storage_path": None, "tracking_uri": None, **kw}
    return plan_sweep(path, **args)


@pytest.fixture
def sweep_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CARCLF_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")  # relative: taken from the project root
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    path = tmp_path / "quick.yaml"
    path.write_text(yaml.safe_dump({"base": {"data": {"path": "photos", "image_size": 32}},
                                    "models": {"svm": {"space": {"kernel": "linear"}}}}))
    return path


def test_plan_gives_trials_absolute_paths(sweep_file, tmp_path):
    plan = _plan(sweep_file)
    assert plan.name == "quick" and plan.out_dir == tmp_path / "results" / "quick" and plan.state is None
    assert plan.overrides["data"]["path"] == str(tmp_path / "photos")
    assert Path(plan.overrides["data"]["cache_dir"]).is_absolute()
    assert plan.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert plan.storage == str(tmp_path / "results" / "quick" / "ray") and plan.experiment == "carclf"


def test_missing_data_and_relative_paths_through_a_ray_client_are_refused(sweep_file, tmp_path):
    with pytest.raises(SweepError, match="base.data.path must be an absolute path"):
        _plan(sweep_file, address="ray://head:10001")
    (tmp_path / "photos").rmdir()
    with pytest.raises(SweepError, match="base.data.path: photos does not exist"):
        _plan(sweep_file)


def test_a_started_sweep_is_resumed_from_its_state_and_only_with_the_same_file(sweep_file, tmp_path):
    out = tmp_path / "results" / "quick"
    out.mkdir(parents=True)
    state = {"name": "quick", "parent_run_id": "p1", "experiment": "cars", "tracking_uri": "sqlite:////shared/m.db",
             "storage_path": "/shared/ray"}
    (out / "sweep.json").write_text(json.dumps(state))
    (out / "sweep.yaml").write_text(sweep_file.read_text())
    with pytest.raises(SweepError, match="already exists.*--resume"):
        _plan(sweep_file)
    plan = _plan(sweep_file, resume=True)
    assert plan.state == state
    assert (plan.uri, plan.storage, plan.experiment) == ("sqlite:////shared/m.db", "/shared/ray", "cars")
    sweep_file.write_text(sweep_file.read_text() + "num_samples: 3\n")
    with pytest.raises(SweepError, match="differs from the sweep it started with"):
        _plan(sweep_file, resume=True)


@pytest.mark.parametrize("name", ["../../escape_test", "/tmp/escape", "a/b", "..", ".hidden", "", "two words"])
def test_a_sweep_name_that_is_not_one_plain_folder_name_is_refused(sweep_file, tmp_path, name):
    with pytest.raises(SweepError, match="--name .* is not allowed"):
        _plan(sweep_file, name=name)
    assert not (tmp_path / "results").exists() and not (tmp_path.parent / "escape_test").exists()


def test_the_name_field_of_a_sweep_file_is_checked_too(sweep_file):
    from carclf.core.errors import ConfigError

    sweep_file.write_text(sweep_file.read_text() + "name: ../up\n")
    with pytest.raises(ConfigError, match="name: .*'../up' is not allowed"):
        _plan(sweep_file)
    sweep_file.write_text(sweep_file.read_text().replace("name: ../up", "name: v1.2_run-3"))
    assert _plan(sweep_file).name == "v1.2_run-3"


def test_a_claimed_name_refuses_a_second_driver_and_is_free_again_after(sweep_file, tmp_path):
    from sweeps.run.driver import claim_sweep

    plan = _plan(sweep_file)
    with claim_sweep(plan):
        with pytest.raises(SweepError, match="sweep 'quick' is running right now"):
            with claim_sweep(_plan(sweep_file)):
                pass
        (plan.out_dir / "sweep.json").write_text("{}")  # the first driver got as far as recording the sweep
        with pytest.raises(SweepError, match="sweep 'quick' is running right now"):
            _plan(sweep_file)  # not "already exists ... --resume": it is running
    with pytest.raises(SweepError, match="already exists.*--resume"):
        _plan(sweep_file)


def test_a_missing_path_names_each_folder_looked_in_once(sweep_file, tmp_path):
    sweep_file.write_text(yaml.safe_dump({"base": {"data": {"path": "nowhere", "image_size": 32}},
                                          "models": {"svm": {"space": {"kernel": "linear"}}}}))
    with pytest.raises(SweepError) as err:
        _plan(sweep_file)  # the working directory is the project root here
    assert str(err.value).endswith(f"nowhere does not exist (looked in {tmp_path})")


def test_resume_while_the_first_driver_is_still_starting_says_it_is_running(sweep_file, tmp_path):
    from sweeps.run.driver import claim_sweep

    with claim_sweep(_plan(sweep_file)):  # claimed, sweep.json not yet written
        with pytest.raises(SweepError, match="sweep 'quick' is running right now"):
            _plan(sweep_file, resume=True)
    with pytest.raises(SweepError, match="cannot resume.*sweep.json is missing"):
        _plan(sweep_file, resume=True)  # nobody holds it: the state is simply missing


@pytest.mark.parametrize("storage", ["/proc/nope", "/proc/version"])
def test_a_storage_path_that_cannot_be_written_is_refused_before_anything_starts(sweep_file, tmp_path, storage):
    with pytest.raises(SweepError, match=f"--storage-path.*{storage}"):
        _plan(sweep_file, storage_path=storage)
    assert not (tmp_path / "results").exists()


def test_a_writable_storage_path_is_taken_as_an_absolute_folder(sweep_file, tmp_path):
    plan = _plan(sweep_file, storage_path="ray_store/new")
    assert plan.storage == str(tmp_path / "ray_store" / "new") and not (tmp_path / "ray_store").exists()


def test_a_sweep_refused_before_it_recorded_anything_leaves_no_folder(sweep_file, tmp_path):
    from sweeps.run.driver import claim_sweep

    plan = _plan(sweep_file)
    with pytest.raises(SweepError, match="no node"):
        with claim_sweep(plan):
            raise SweepError("no node can hold a trial")
    assert not plan.out_dir.exists()
    with claim_sweep(_plan(sweep_file)):  # the name is free
        pass
