"""carclf loads only the models it wrote: a tampered model is refused before anything from it runs.

Each attack starts from a real carclf model (a tiny network or SVM logged in a private store), changes
it the way anyone with write access to a tracking server could, and publishes it as a run's `model`.
The payload writes a marker file. Each test first shows that plain MLflow does run the payload, then
that `carclf predict` refuses the model and the marker is never written.
"""

from __future__ import annotations

import importlib.util
import pickle
import py_compile
import shutil
import sys
import textwrap
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import encode, random_image
from mlflow.tracking import MlflowClient

from carclf.cli import main
from carclf.core.errors import TrackingError
from carclf.serving.predict import load_model, predict_paths

EXPERIMENT = "cars"


class _WriteMarker:
    """Unpickling this opens (creates) the marker file: what a crafted pickle can do, harmlessly."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _photos(n: int) -> list[bytes]:
    return [encode(random_image(i, size=(24, 24)), "PNG") for i in range(n)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A private sqlite store holding one tiny carclf network model and one tiny carclf SVM model."""
    from carclf.models.networks import build_backbone, build_model
    from carclf.tracking import runs as tracking

    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root}/mlflow.db"
    mp = pytest.MonkeyPatch()
    mp.setenv("CARCLF_PROJECT_ROOT", str(root))
    mp.setattr(tracking, "_experiment_ids", {})
    mlflow.set_tracking_uri(uri)
    torch.manual_seed(0)
    photos = _photos(1)
    net = build_model("simple_cnn", num_classes=3, weights="none", image_size=16).eval()
    with tracking.start_run(experiment=EXPERIMENT, uri=uri) as run:
        tracking.log_network_model(net, input_example=photos, metadata={
            "classes": ["bus", "van", "sedan"], "input_config": asdict(net.input_config), "model": "simple_cnn",
            "kind": "network"})
        network_run = run.info.run_id
    backbone = build_backbone("simple_cnn", weights="none", image_size=16)
    features = np.random.default_rng(0).random((12, backbone(torch.zeros(1, 3, 16, 16)).shape[1]))
    pipe = build_model("svm", num_classes=3, C=10.0, cv=2).fit(features, np.arange(12) % 3)
    with tracking.start_run(experiment=EXPERIMENT, uri=uri) as run:
        tracking.log_svm_model(pipe, backbone, input_example=photos, metadata={
            "classes": ["a", "b", "c"], "input_config": asdict(backbone.input_config), "model": "svm", "kind": "svm",
            "backbone": "simple_cnn", "features": "gap"})
        svm_run = run.info.run_id
    mp.undo()
    return {"uri": uri, "network": f"runs:/{network_run}/model", "svm": f"runs:/{svm_run}/model"}


@pytest.fixture
def tracking_uri(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    mlflow.set_tracking_uri(store["uri"])
    mlflow.set_registry_uri(store["uri"])
    return store["uri"]


@pytest.fixture
def photo_dir(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(_photos(3)):
        (folder / f"car{i}.png").write_bytes(data)
    return folder


def _copy(store: dict, kind: str, dst: Path) -> Path:
    """A private copy of the untouched model's files, to tamper with."""
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=store[kind], dst_path=str(dst)))


def _publish(folder: Path) -> str:
    """The tampered files as a new run's `model`, as someone with write access to the server would leave them."""
    client = MlflowClient()
    run = client.create_run(client.get_experiment_by_name(EXPERIMENT).experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    return f"runs:/{run.info.run_id}/model"


def _edit_mlmodel(folder: Path, edit) -> None:
    path = folder / "MLmodel"
    mlmodel = yaml.safe_load(path.read_text())
    edit(mlmodel)
    path.write_text(yaml.safe_dump(mlmodel))


def _load_unchecked(folder: Path, monkeypatch) -> None:
    """What plain MLflow does with the model (the payload's proof of life), leaving no tampered module behind."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # carclf must not rely on MLflow's default
    monkeypatch.setattr(sys, "path", list(sys.path))  # MLflow puts the model's code/ first and leaves it there
    monkeypatch.delitem(sys.modules, "car_classifier", raising=False)  # so the model's own copy is imported
    try:
        mlflow.pyfunc.load_model(str(folder))
    except Exception:  # noqa: BLE001 - most payloads break the load after running; that is not the point
        pass
    finally:
        for name in [n for n in sys.modules if n == "car_classifier" or n.startswith("code_model_")]:
            del sys.modules[name]


def _refused_by_predict(uri: str, photo_dir: Path, tracking_uri: str, capsys) -> str:
    assert main(["predict", uri, str(photo_dir), "--tracking-uri", tracking_uri]) == 2
    err = capsys.readouterr().err
    assert f"refusing model {uri}" in err and "nothing from it was loaded" in err
    return err


# --------------------------------------------------------------------------- attacks


def _pickled_pyfunc(folder: Path, marker: Path) -> None:
    """The pyfunc flavour turned into a cloudpickled PythonModel whose unpickling writes the marker."""
    (folder / "python_model.pkl").write_bytes(pickle.dumps(_WriteMarker(marker)))

    def edit(mlmodel):
        conf = mlmodel["flavors"]["python_function"]
        conf.pop("model_code_path")
        conf.update(loader_module="mlflow.pyfunc.model", python_model="python_model.pkl")
    _edit_mlmodel(folder, edit)


def _pickled_sklearn(folder: Path, marker: Path) -> None:
    """The attack as first seen: an sklearn model in pickle format under carclf's metadata."""
    (folder / "model.pkl").write_bytes(pickle.dumps(_WriteMarker(marker)))

    def edit(mlmodel):
        env = mlmodel["flavors"]["python_function"]["env"]
        mlmodel["flavors"] = {
            "python_function": {"loader_module": "mlflow.sklearn", "model_path": "model.pkl", "env": env,
                                "python_version": "3.11"},
            "sklearn": {"pickled_model": "model.pkl", "serialization_format": "pickle", "sklearn_version": "1.9.0"}}
    _edit_mlmodel(folder, edit)


def _payload_line(marker: Path) -> str:
    return f"\nopen({str(marker)!r}, 'w').close()  # runs at import\n"


def _edited_module(folder: Path, marker: Path) -> None:
    with open(folder / "code" / "car_classifier.py", "a") as f:
        f.write(_payload_line(marker))


def _edited_entry(folder: Path, marker: Path) -> None:
    entry = folder / "pyfunc_model.py"
    entry.write_text(_payload_line(marker) + entry.read_text())


def _stale_bytecode(folder: Path, marker: Path) -> None:
    """The source untouched, but a __pycache__ beside it that Python runs instead (never checked against it)."""
    source = folder / "code" / "car_classifier.py"
    tampered = folder / "tampered.py"
    tampered.write_text(source.read_text() + _payload_line(marker))
    py_compile.compile(str(tampered), cfile=importlib.util.cache_from_source(str(source)),
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH, doraise=True)
    tampered.unlink()


@pytest.mark.parametrize("attack, why", [
    (_pickled_pyfunc, "pickled Python object"),
    (_pickled_sklearn, "flavours"),
    (_edited_module, "code/car_classifier.py is not the one"),
    (_edited_entry, "pyfunc_model.py is not the one"),
    (_stale_bytecode, "files carclf never writes: code/__pycache__/car_classifier"),
])
def test_a_tampered_network_model_is_refused_and_its_payload_never_runs(
        attack, why, store, tracking_uri, photo_dir, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload_ran"
    folder = _copy(store, "network", tmp_path / "model")
    attack(folder, marker)
    uri = _publish(folder)
    proof = tmp_path / "unchecked"
    shutil.copytree(folder, proof)
    _load_unchecked(proof, monkeypatch)
    assert marker.exists(), "the payload does not run under plain MLflow, so this test would prove nothing"
    marker.unlink()
    monkeypatch.delitem(sys.modules, "car_classifier", raising=False)  # nothing cached stands in for the check
    err = _refused_by_predict(uri, photo_dir, tracking_uri, capsys)
    assert why in err
    assert not marker.exists()


PAYLOAD_MODULE = """
from pathlib import Path

MARKER = Path({marker!r})


class Gadget:
    '''Anything whose state, once restored, acts: here it writes the marker.'''

    def __init__(self):
        self.argument = "anything"  # skops restores (and so calls __setstate__ for) a non-empty state only

    def __setstate__(self, state):
        MARKER.write_text("ran")
        self.__dict__.update(state)
"""


def test_an_svm_whose_skops_file_names_an_untrusted_type_is_refused_without_building_it(
        store, tracking_uri, photo_dir, tmp_path, monkeypatch, capsys):
    import skops.io
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    marker = tmp_path / "payload_ran"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "carclf_test_gadget.py").write_text(textwrap.dedent(PAYLOAD_MODULE.format(marker=str(marker))))
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))  # importable, as a real attacker's type would be
    gadget = importlib.import_module("carclf_test_gadget").Gadget
    folder = _copy(store, "svm", tmp_path / "model")
    svm = folder / "artifacts" / "svm.skops"
    skops.io.dump(Pipeline([("scale", StandardScaler()), ("svc", gadget())]), svm)
    del sys.modules["carclf_test_gadget"]
    uri = _publish(folder)
    assert "carclf_test_gadget.Gadget" in skops.io.get_untrusted_types(file=svm)
    skops.io.load(svm, trusted=skops.io.get_untrusted_types(file=svm))  # trusting what the file names runs it
    assert marker.exists(), "the payload does not run when loaded, so this test would prove nothing"
    marker.unlink()
    del sys.modules["carclf_test_gadget"]
    err = _refused_by_predict(uri, photo_dir, tracking_uri, capsys)
    assert "types carclf does not trust: carclf_test_gadget.Gadget" in err
    assert not marker.exists() and "carclf_test_gadget" not in sys.modules


def _edit_spec(folder: Path, **change) -> None:
    import json

    path = folder / "artifacts" / "spec.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def test_pickled_weights_are_refused_in_one_line_and_never_unpickled(store, tracking_uri, photo_dir, tmp_path,
                                                                      capsys):
    marker = tmp_path / "payload_ran"
    folder = _copy(store, "network", tmp_path / "model")
    torch.save({"fc.weight": _WriteMarker(marker)}, folder / "artifacts" / "weights.pt")  # a zip, as torch writes
    err = _refused_by_predict(_publish(folder), photo_dir, tracking_uri, capsys)
    [line] = [ln for ln in err.splitlines() if "refusing model" in ln]
    assert "weights.pt is not a plain state_dict: torch refused it (UnpicklingError: Unsupported global" in line
    assert "Traceback" not in err and "weights_only" not in err and not marker.exists()


@pytest.mark.parametrize("tamper, why", [
    (lambda f: (f / "code" / "helpers.py").write_text("x = 1\n"), "files carclf never writes: code/helpers.py"),
    (lambda f: (f / "requirements.txt").write_text("--index-url https://example.org/simple\ntorch\n"),
     "requirements.txt holds '--index-url"),
    (lambda f: (f / "artifacts" / "weights.pt").write_bytes(pickle.dumps({"w": 1})), "not a torch state_dict"),
    (lambda f: torch.save({"w": [1, 2]}, f / "artifacts" / "weights.pt"), "holds dict, not a state_dict of tensors"),
    (lambda f: _edit_spec(f, kwargs={"weights": "DEFAULT"}), "constructor arguments carclf never writes: weights"),
    (lambda f: _edit_spec(f, kwargs=[1]), "kwargs are not a mapping"),
    (lambda f: _edit_mlmodel(f, lambda m: m["flavors"]["python_function"].update(model_config={"a": 1})),
     "settings carclf never writes: model_config"),
    (lambda f: _edit_mlmodel(f, lambda m: m["flavors"]["python_function"].update(code="artifacts")),
     "not carclf's code/ folder"),
])
def test_other_changes_carclf_never_makes_are_refused_by_name(tamper, why, store, tracking_uri, tmp_path):
    folder = _copy(store, "network", tmp_path / "model")
    tamper(folder)
    uri = _publish(folder)
    with pytest.raises(TrackingError, match=f"refusing model {uri}.*{why}"):
        load_model(uri)


# --------------------------------------------------------------------------- carclf's own models


@pytest.mark.parametrize("kind", ["network", "svm"])
def test_an_untouched_model_predicts_as_plain_mlflow_does_from_every_kind_of_uri(
        kind, store, tracking_uri, photo_dir):
    photos = [p.read_bytes() for p in sorted(photo_dir.iterdir())]
    expected = mlflow.pyfunc.load_model(store[kind]).predict(pd.DataFrame({"image": photos}), params={"top_k": 2})
    version = mlflow.register_model(store[kind], f"carclf-safe-{kind}")
    path_before = list(sys.path)
    for uri in (store[kind], f"models:/carclf-safe-{kind}/{version.version}"):
        df = predict_paths(uri, [photo_dir], top_k=2)
        assert (df["error"] == "").all()
        assert df["class_1"].tolist() == expected["class"].tolist()
        assert np.allclose(df[["prob_1", "prob_2"]].to_numpy(), np.stack(expected["top_probabilities"]))
    assert sys.path == path_before  # no deleted temporary folder is left on the import path


def test_a_file_swapped_on_the_server_after_the_check_is_not_what_runs(
        store, tracking_uri, photo_dir, tmp_path, monkeypatch):
    from carclf.serving import model_check

    marker = tmp_path / "payload_ran"
    uri = _publish(_copy(store, "network", tmp_path / "model"))
    on_server = Path(urlparse(MlflowClient().get_run(uri.split("/")[1]).info.artifact_uri).path) / "model"
    assert (on_server / "code" / "car_classifier.py").is_file()  # the store's own copy
    check = model_check.check_model_dir

    def check_then_swap(folder, model_uri):
        meta = check(folder, model_uri)
        _edited_module(on_server, marker)
        return meta

    monkeypatch.setattr(model_check, "check_model_dir", check_then_swap)
    monkeypatch.delitem(sys.modules, "car_classifier", raising=False)  # the module really is imported
    df = predict_paths(uri, [photo_dir])
    assert (df["error"] == "").all() and not marker.exists()
    with pytest.raises(TrackingError, match="code/car_classifier.py is not the one"):  # the server copy now fails
        load_model(uri)
