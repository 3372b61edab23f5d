"""One tracked run: prepare data, train a network or fit an SVM on CNN features, evaluate, log to MLflow.

    carclf train --config examples/run_svm.yaml --set svm.C=10
    result = run_experiment(load_run_config("examples/run_cnn.yaml"))

`carclf train` and every sweep trial go through `run_experiment`; the sweep reports
each epoch to Ray Tune through its `on_epoch` callback.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from carclf.config import RunConfig, load_run_config
from carclf.core import paths
from carclf.core.errors import ConfigError, WeightsError
from carclf.core.figures import class_frequency_figure, confusion_figure, save_figure, training_curves_figure
from carclf.core.metrics import classification_metrics, confusion, most_confused_pairs, per_class_report
from carclf.core.redact import redact
from carclf.data.inputs import DeviceBudget, run_batches
from carclf.data.prepare import class_weights, prepare_data
from carclf.models.networks import build_model, count_parameters, model_size_mb
from carclf.models.records import InputConfig
from carclf.models.registry import _architecture, is_network
from carclf.models.svm import fit_svm
from carclf.tracking import runs as tracking
from carclf.tracking.browse import ui_heading, ui_path, ui_url
from carclf.training.features import backbone_weights_id, build_feature_backbone, split_features
from carclf.training.loop import (
    EpochCallback,
    EvalOutput,
    Outcome,
    check_device,
    evaluate,
    fit,
    seed_everything,
    select_device,
)
from carclf.training.probe import run_probe
from carclf.training.timing import infer_seconds, network_classes, svm_classes, with_infer_ms
from carclf.training.top import run_top

log = logging.getLogger(__name__)

THREADS_TAG = "carclf.torch_threads"  # the CPU threads torch trained with (Ray gives a trial its CPU count)
# Shown by `carclf train`, in this order, where present.
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "precision_macro", "recall_macro", "f1_weighted",
                   "top3_accuracy", "roc_auc_ovr_macro")


@dataclass
class ExperimentResult:
    run_id: str | None
    config: RunConfig
    classes: list[str]
    val_metrics: dict
    test_metrics: dict | None
    history: list[dict]
    confusion_val: np.ndarray
    confusion_test: np.ndarray | None
    model: Any
    y_test: np.ndarray | None
    pred_test: np.ndarray | None
    probs_test: np.ndarray | None
    train_seconds: float
    infer_seconds_per_image: float
    n_params: int
    size_mb: float
    infer_ms_per_img: float = float("nan")  # the whole classifier per image (carclf.training.timing; a sweep objective)


def run_experiment(cfg: RunConfig, *, on_epoch: EpochCallback | None = None, parent_run_id: str | None = None,
                   tags: dict | None = None, evaluate_test: bool = True, log_model: bool | None = None,
                   progress: bool = False, data=None) -> ExperimentResult:
    """Everything one trial does, logged to one MLflow run (a child of `parent_run_id` if given).

    Raises whatever fails (data, weights, the callback); the run then ends FAILED with tag carclf.error.
    `data`: the PreparedData of `cfg`, when the caller checked it before any run started (`carclf train`).
    """

    seed_everything(cfg.seed)
    kind = "network" if is_network(cfg.model.name) else "svm"
    log_model = cfg.tracking.log_model if log_model is None else log_model
    # CPU float sums depend on the thread count: a retest runs with the trial's (carclf.report.retest)
    run_tags = {"carclf.model": cfg.model.name, "carclf.kind": kind, THREADS_TAG: _torch_threads(), **(tags or {})}
    with tracking.start_run(experiment=cfg.tracking.experiment, run_name=cfg.tracking.run_name,
                            parent_run_id=parent_run_id, tags=run_tags, uri=cfg.tracking.uri) as run:
        tracking.log_config(cfg)
        if data is None:
            data = prepare_data(cfg, image_size=cfg.data.image_size, progress=progress)
        _log_data(data, cfg.data.cache_dir)
        step = _epoch_logger(on_epoch)
        branch = _run_network if kind == "network" else _run_svm
        if cfg.model.finetune == "probe":  # a network's head on cached features of its frozen backbone
            branch = run_probe
        if cfg.model.finetune == "top":  # the last blocks on cached activations of the frozen trunk
            branch = run_top
        outcome = branch(cfg, data, on_epoch=step, evaluate_test=evaluate_test, progress=progress)
        result = _evaluate_and_log(cfg, data, outcome, run.info.run_id, log_model=log_model)
    return result


def _torch_threads() -> int:
    return torch.get_num_threads()


def _epoch_logger(on_epoch: EpochCallback | None) -> EpochCallback:
    """Log each epoch's row to MLflow as `epoch_<key>` (step = epoch), then hand it to the caller's callback.

    The prefix keeps the curves apart from the final val_*/test_* metrics: MLflow shows a metric's
    value at its highest step, which would otherwise be the last epoch's, not the best one's.
    """

    def step(epoch: int, row: dict) -> None:
        tracking.log_metrics({_epoch_name(k): v for k, v in row.items() if k != "epoch"}, step=epoch)
        if on_epoch is not None:
            on_epoch(epoch, row)

    return step


def _epoch_name(key: str) -> str:
    return key if key.startswith("epoch_") else f"epoch_{key}"


def _log_data(data, cache_dir) -> None:
    tracking.log_dataframe(data.manifest, "data/manifest.parquet")
    tracking.log_dataframe(data.class_counts, "data/class_counts.csv")
    tracking.log_artifact(_class_frequency_png(data.class_counts, cache_dir), "figures")
    tracking.log_json({"classes": data.classes, "duplicates": data.duplicates,
                       "skipped": [list(x) for x in data.skipped], "corrupt": [list(x) for x in data.corrupt],
                       "train_rows": len(data.train), "train_augmented_rows": int(data.train["augmented"].sum())},
                      "data/data_report.json")
    tracking.log_params({"data.n_classes": len(data.classes), "data.n_train": len(data.train),
                         "data.n_val": len(data.val), "data.n_test": len(data.test)})


def _class_frequency_png(table: pd.DataFrame, cache_dir) -> Path:
    """The class-frequency chart, drawn once per class table and kept in the cache.

    Every trial of a sweep logs the same chart; drawing it is most of a small trial's logging time.
    """

    digest = hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir is not None else paths.cache_root()
    path = root / "figures" / digest / "class_frequency.png"
    if not path.is_file():
        save_figure(class_frequency_figure(table), path)
    return path


# --------------------------------------------------------------------------- networks


def _run_network(cfg: RunConfig, data, *, on_epoch, evaluate_test: bool, progress: bool) -> Outcome:
    n = len(data.classes)
    model = build_model(cfg.model.name, num_classes=n, weights=cfg.model.weights, finetune=cfg.model.finetune,
                        image_size=cfg.data.image_size)
    ic = model.input_config
    device = select_device(cfg.train.device)
    budget = DeviceBudget(cfg.train.device_data_mb)
    batches = run_batches(cfg, data, ic, device, ("train", "val"), budget=budget)
    weights = class_weights(data.train["label"], n) if cfg.balance.class_weights else None
    per_image = infer_seconds(cfg, data, network_classes(model, ic, device, amp=cfg.train.amp), device)
    fitted = fit(model, batches["train"], batches["val"], cfg.train, n_classes=n, device=device,
                 class_weights=weights, on_epoch=with_infer_ms(on_epoch, per_image), progress=progress)
    test_out = None
    if evaluate_test:  # placed only now: a sweep trial never reads the test split
        test = run_batches(cfg, data, ic, device, ("test",), budget=budget)["test"]
        _, test_out = evaluate(model, test, device, n_classes=n, amp=cfg.train.amp)
    metadata = {"classes": data.classes, "input_config": asdict(ic), "model": cfg.model.name, "kind": "network",
                "weights": cfg.model.weights, "weights_sha256": getattr(model, "weights_sha256", None)}
    return Outcome(model=model, history=fitted.history, val=fitted.val_output, test=test_out,
                    train_seconds=fitted.seconds, infer_seconds_per_image=per_image,
                    n_params=count_parameters(model), size_mb=model_size_mb(model),
                    metadata=metadata, extra_metrics={"best_epoch": fitted.best_epoch,
                                                      "epochs_run": len(fitted.history),
                                                      "n_params_trainable": count_parameters(model, True)},
                    infer_ms_per_img=1000.0 * per_image)


# --------------------------------------------------------------------------- SVM on features


def _run_svm(cfg: RunConfig, data, *, on_epoch, evaluate_test: bool, progress: bool) -> Outcome:
    n = len(data.classes)
    splits = ("train", "val", "test") if evaluate_test else ("train", "val")
    device = select_device(cfg.train.device)
    sets = split_features(cfg, data, device=device, splits=splits, progress=progress)
    t0 = time.perf_counter()
    pipeline, fitted = fit_svm(cfg.svm, sets["train"].features, sets["train"].labels, seed=cfg.seed)
    fit_seconds = time.perf_counter() - t0
    tracking.set_tags(fitted.tags())  # saturated: every larger C gives this model (a sweep skips those trials)
    val = _svm_predict(pipeline, sets["val"], n)
    test = _svm_predict(pipeline, sets["test"], n) if evaluate_test else None
    val_metrics = classification_metrics(val.y_true, val.y_pred, scores=val.probs, n_classes=n)
    row = {"epoch": 1, "train_accuracy": float((pipeline.predict(sets["train"].features)
                                                 == sets["train"].labels).mean()),
           **{f"val_{k}": v for k, v in val_metrics.items()}}
    on_epoch(1, row)
    meta = sets["val"].meta
    extraction = sum(s.meta.get("seconds", 0.0) for s in sets.values() if not s.meta.get("cached"))
    metadata = _svm_metadata(cfg, data, meta, weights_sha=_backbone_sha(cfg))
    # the backbone runs whether or not its features came from the cache; the logged model ships this one
    backbone = build_feature_backbone(cfg)
    per_image = infer_seconds(cfg, data, svm_classes(backbone, pipeline, device), device)
    return Outcome(model=pipeline, history=[row], val=val, test=test, train_seconds=fit_seconds,
                    infer_seconds_per_image=per_image,
                    n_params=meta.get("backbone_params", 0) + count_parameters(pipeline),
                    size_mb=meta.get("backbone_size_mb", 0.0) + model_size_mb(pipeline), metadata=metadata,
                    extra_metrics={"feature_seconds": extraction, "svm_fit_seconds": fit_seconds,
                                   "feature_cache_hits": sum(bool(s.meta.get("cached")) for s in sets.values()),
                                   "feature_dim": sets["train"].features.shape[1],
                                   "n_train_features": len(sets["train"].labels), **fitted.metrics()},
                    infer_ms_per_img=1000.0 * per_image,
                    backbone=backbone.cpu().to(memory_format=torch.contiguous_format))


def _svm_predict(pipeline, fs, n_classes: int):
    probs = pipeline.predict_proba(fs.features)
    classes = pipeline.classes_
    full = np.zeros((len(probs), n_classes), dtype=np.float64)
    full[:, classes] = probs  # a class absent from the train features keeps probability 0
    return EvalOutput(y_true=fs.labels, y_pred=classes[probs.argmax(1)], probs=full)


def _backbone_sha(cfg: RunConfig) -> str:
    return backbone_weights_id(cfg)


def _svm_metadata(cfg: RunConfig, data, meta: dict, *, weights_sha: str) -> dict:

    # The backbone's input config without building it: its registered defaults at our image size. A stack's
    # members normalise their own input (`members`), so the stack takes images in [0, 1].
    members = [{"backbone": name, "features": cfg.svm.features, "mean": list(_architecture(name).input_config.mean),
                "std": list(_architecture(name).input_config.std)} for name, _ in cfg.svm.members()]
    base = InputConfig(mean=tuple(members[0]["mean"]), std=tuple(members[0]["std"]))
    if len(members) > 1:
        base = InputConfig(mean=(0.0,) * 3, std=(1.0,) * 3)
    ic = InputConfig(size=cfg.data.image_size, mean=base.mean, std=base.std)
    weights = cfg.svm.backbone_weights
    return {"classes": data.classes, "kind": "svm", "model": "svm", "backbone": cfg.svm.backbone,
            "backbone_weights": weights if isinstance(weights, str) else list(weights),
            "backbone_sha256": weights_sha, "features": cfg.svm.features, "feature_dim": meta.get("feature_dim"),
            "input_config": asdict(ic), **({"members": members} if len(members) > 1 else {})}


# --------------------------------------------------------------------------- evaluation and logging


def _evaluate_and_log(cfg: RunConfig, data, out: Outcome, run_id: str, *, log_model: bool) -> ExperimentResult:
    n = len(data.classes)
    val_metrics = classification_metrics(out.val.y_true, out.val.y_pred, scores=out.val.probs, n_classes=n)
    test_metrics = None
    if out.test is not None:
        test_metrics = classification_metrics(out.test.y_true, out.test.y_pred, scores=out.test.probs, n_classes=n)
    final = {**{f"val_{k}": v for k, v in val_metrics.items()},
             **{f"test_{k}": v for k, v in (test_metrics or {}).items()},
             "train_seconds": out.train_seconds, "infer_seconds_per_image": out.infer_seconds_per_image,
             "infer_ms_per_img": out.infer_ms_per_img, "n_params": out.n_params, "size_mb": out.size_mb, **out.extra_metrics}
    tracking.log_metrics(final)
    confusion_val = _log_split_report("val", out.val, data.classes)
    confusion_test = _log_split_report("test", out.test, data.classes) if out.test is not None else None
    _log_history(out.history, curves=not cfg.is_svm)
    if log_model:
        _log_model(cfg, data, out)
    return ExperimentResult(
        run_id=run_id, config=cfg, classes=data.classes, val_metrics=val_metrics, test_metrics=test_metrics,
        history=out.history, confusion_val=confusion_val, confusion_test=confusion_test, model=out.model,
        y_test=None if out.test is None else out.test.y_true, pred_test=None if out.test is None else out.test.y_pred,
        probs_test=None if out.test is None else out.test.probs, train_seconds=out.train_seconds,
        infer_seconds_per_image=out.infer_seconds_per_image, n_params=int(out.n_params), size_mb=float(out.size_mb),
        infer_ms_per_img=float(out.infer_ms_per_img))


def _log_split_report(split: str, output, classes: list[str]) -> np.ndarray:
    """Confusion matrix (JSON + PNG) and the per-class report (CSV) of one split; returns the counts."""

    counts, normalised = confusion(output.y_true, output.y_pred, len(classes))
    tracking.log_json({"classes": classes, "counts": counts, "row_normalised": normalised},
                      f"confusion_{split}.json")
    tracking.log_figure(confusion_figure(counts, classes, normalize=True), f"figures/confusion_{split}.png")
    report = per_class_report(output.y_true, output.y_pred, classes)
    tracking.log_dataframe(report, f"per_class_{split}.csv")
    tracking.log_dataframe(most_confused_pairs(counts, classes), f"confused_pairs_{split}.csv")
    return counts


def _log_history(history: list[dict], *, curves: bool) -> None:
    tracking.log_dataframe(pd.DataFrame(history), "history.csv")
    if curves:  # the SVM has a single 'epoch': no curve to draw
        tracking.log_figure(training_curves_figure(history), "figures/training_curves.png")


def _log_model(cfg: RunConfig, data, out: Outcome) -> None:
    """The whole classifier as one MLflow model (photo bytes in, class names out); an SVM ships its backbone."""
    example = [_example_image(data)]
    if not cfg.is_svm:
        tracking.log_network_model(out.model, input_example=example, metadata=out.metadata)
        return

    backbone = out.backbone if out.backbone is not None else build_feature_backbone(cfg)
    recorded = out.metadata["backbone_sha256"]
    if backbone.weights_sha256 is not None and backbone.weights_sha256 != recorded:
        raise WeightsError(f"backbone weights {cfg.svm.backbone_weights!r} changed during the run "
                           f"(sha256 {backbone.weights_sha256[:12]}..., features from {recorded[:12]}...)")
    tracking.log_svm_model(out.model, backbone, input_example=example, metadata=out.metadata)


def _example_image(data) -> bytes:
    """A validation image (a test one if there is none) as JPEG bytes at the model's size: the logged input
    example, small whatever the original file weighs."""

    frame = data.val if len(data.val) else data.test
    row = frame.iloc[0]
    buf = io.BytesIO()
    Image.fromarray(data.cache.load(row["path"], row["sha256"])).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- CLI


def summary_table(result: ExperimentResult) -> pd.DataFrame:
    """metric | val | test for the headline metrics (test empty when it was not evaluated)."""
    rows = []
    for key in SUMMARY_METRICS:
        if key in result.val_metrics:
            test = (result.test_metrics or {}).get(key, float("nan"))
            rows.append({"metric": key, "val": result.val_metrics[key], "test": test})
    return pd.DataFrame(rows)


TRAIN_NEEDS_CONFIG = (
    "carclf train needs --config FILE, a run config (YAML) that says which model to train on which images: "
    "the defaults alone would train a CNN for 10 epochs at 224 px, slow on a CPU. Try the demo data (about a "
    "minute): carclf train "
    "--config examples/run_svm.yaml --set data.path=demo_data --set data.image_size=96; for your photos, copy "
    "examples/run_svm.yaml or examples/run_cnn.yaml and set data.path")


def cli_train(args) -> int:
    """`carclf train --config run.yaml --set key=value`: validate, run, print the metrics and the run id."""

    if not args.config:
        raise ConfigError(TRAIN_NEEDS_CONFIG)
    cfg = load_run_config(args.config, args.overrides)
    uri = tracking.resolve_tracking_uri(cfg.tracking.uri)

    # the URI may carry a password (https://user:pass@host, postgresql://...): never print it
    print(f"model {cfg.model.name} on {cfg.data.path}; tracking {redact(uri)} (experiment {cfg.tracking.experiment!r})")

    check_device(cfg.train.device)  # before the scan and the run: a device that is not there is a config error
    # The data is scanned, selected and split before the run starts: a path that is a file or a single class
    # is refused with nothing logged
    data = prepare_data(cfg, image_size=cfg.data.image_size, progress=True)
    result = run_experiment(cfg, progress=True, data=data)
    print()
    print(summary_table(result).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\ntrain {result.train_seconds:.1f} s, inference {1000 * result.infer_seconds_per_image:.2f} ms/image, "
          f"{result.n_params:,} parameters, {result.size_mb:.1f} MB")
    _print_ui_hint(uri, result.run_id)
    print(f"run id: {result.run_id}")  # the last line: scripts read it
    return 0


def _print_ui_hint(uri: str, run_id: str | None) -> None:
    if run_id:
        experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
        print(f"{ui_heading(uri)}\n  {ui_url(uri, ui_path(experiment_id, run_id=run_id))}")
