"""Predict: registered models round-trip and agree with evaluation; folders, bad files and CSV output."""

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from tiny_sweep import split_paths, sweeps, uri  # noqa: F401 - fixtures

from carclf.cli import main
from carclf.core.errors import TrackingError
from carclf.serving.predict import collect_images, predict_paths
from carclf.serving.promote import promote


@pytest.mark.slow
@pytest.mark.parametrize("model", ["svm_rbf", "simple_cnn"])
def test_registered_model_predicts_what_evaluation_predicted(sweeps, uri, model):
    promote("good", model=model)
    rep = next(f for f in sweeps.good.families if f.model == model).representative
    paths = split_paths(MlflowClient(uri), rep.run_id)
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
    # with --out the terminal gets what was used and a summary, not a line per image
    assert "broken.jpg" not in printed and "car0.jpg" not in printed
    assert f"model: runs:/{rep.run_id}/model (family svm_rbf of sweep good)" in printed
    counts = good["class_1"].value_counts()
    assert printed.rstrip().endswith("5 images: 2 errors; predicted: "
                                     + ", ".join(f"{c} {n}" for c, n in counts.items()))
    assert not list(out.parent.glob(".*.tmp"))


@pytest.mark.slow
def test_predict_names_the_version_an_alias_resolved_to_and_prints_every_image_without_out(sweeps, uri, capsys):
    promote("good", model="svm_rbf")
    version = MlflowClient(uri).get_model_version_by_alias("carclf-svm_rbf", "champion")
    images = sorted(sweeps.data_dir.rglob("*.jpg"))[:2]
    assert main(["predict", "models:/carclf-svm_rbf@champion", *map(str, images)]) == 0
    printed = capsys.readouterr().out
    trial = version.tags["carclf.trial_id"]
    assert trial and f"model: models:/carclf-svm_rbf@champion = carclf-svm_rbf v{version.version} (family svm_rbf " \
        f"of sweep good, trial {trial}, test f1_macro {float(version.tags['carclf.test_f1_macro']):.4f} for this " \
        "version)" in printed
    assert all(f"{p}: " in printed for p in images) and "2 images: 0 errors; predicted: " in printed


def test_collect_images_walks_sorted_and_skips_hidden_and_non_images(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    for name in ("b/2.JPG", "b/1.png", "a.webp", ".x.png", "c.txt", ".git/z.png"):
        (tmp_path / name).write_bytes(b"")
    explicit = tmp_path / "c.txt"
    files, missing = collect_images([tmp_path, explicit, tmp_path / "gone"])
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a.webp", "b/1.png", "b/2.JPG", "c.txt"]
    assert missing == [(str(tmp_path / "gone"), "no such file or folder")]


def test_unknown_model_uri_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError, match="models:/carclf-nothing@champion"):
        predict_paths("models:/carclf-nothing@champion", [tmp_path])


def test_a_model_from_before_the_photo_format_is_refused_with_what_to_do(tracked, tmp_path):
    import mlflow
    from sklearn.dummy import DummyClassifier

    from carclf.tracking import runs as tracking

    (tmp_path / "car.png").write_bytes(b"")
    old = {"classes": ["a", "b"], "input_config": {"size": 32}, "kind": "svm"}  # features in, class index out
    with tracking.start_run(experiment="cars"):
        info = mlflow.sklearn.log_model(DummyClassifier().fit([[0], [1]], [0, 1]), name="model", metadata=old,
                                        serialization_format="skops", pip_requirements=["scikit-learn"])
    with pytest.raises(TrackingError, match="older carclf.*carclf report"):
        predict_paths(info.model_uri, [tmp_path])


def test_predictions_csv_follows_the_umask_and_replaces_atomically(tmp_path):
    import os

    from carclf.serving.predict import write_csv

    out = tmp_path / "preds.csv"
    out.write_text("old")
    old = os.umask(0o077)
    try:
        write_csv(pd.DataFrame({"path": ["a.jpg"], "class_1": ["bus"]}), out)
        private = out.stat().st_mode & 0o777
        os.umask(0o022)
        write_csv(pd.DataFrame({"path": ["b.jpg"], "class_1": ["van"]}), out)
    finally:
        os.umask(old)
    assert private == 0o600 and out.stat().st_mode & 0o777 == 0o644  # the umask decides, as for any new file
    assert pd.read_csv(out)["path"].tolist() == ["b.jpg"] and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]


@pytest.mark.parametrize("out", ["/proc/predictions.csv", "/proc/nope/predictions.csv"])
def test_an_out_file_that_cannot_be_created_is_refused_even_for_root(out):
    from carclf.core.errors import DataError
    from carclf.serving.predict import check_writable

    with pytest.raises(DataError, match=f"cannot write --out {out}"):
        check_writable(out)


def test_a_writable_out_is_accepted_and_nothing_is_left_behind(tmp_path):
    from carclf.serving.predict import check_writable

    assert check_writable(tmp_path / "new" / "p.csv") == tmp_path / "new" / "p.csv"
    assert list(tmp_path.iterdir()) == []
