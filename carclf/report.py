"""The study's answer: retest the best configuration per model on the test split and compare them.

    carclf report quickstart            # results/quickstart/report/report.html and a 'report' MLflow run

For each model family in a sweep, the finished trial with the best validation metric is
picked (never a test figure), retrained with several seeds on the same split (only
`cfg.seed` changes) and evaluated on the untouched test split. Intervals are percentile
bootstrap intervals over test images, paired across seeds (each resample draws the same
images for every seed; the metric is averaged over seeds). McNemar's exact test compares
the representative runs (the first seed: the trial's own seed, never chosen by a test
figure) of every pair of models on the same test images, Holm-adjusted.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from carclf import paths, stats
from carclf.config import RunConfig, flatten, read_yaml, set_dotted, validate_run_config
from carclf.errors import CarclfError, SweepError, TrackingError

log = logging.getLogger(__name__)

ROLE_TAG, SWEEP_TAG, MODEL_TAG = "carclf.role", "carclf.sweep", "carclf.model"
SWEEP_MODEL_TAG = "carclf.sweep_model"  # the sweep's model entry (svm_linear, svm_rbf: both model 'svm')
STOPPED_TAG = "carclf.stopped_early"  # set by the sweep runner on trials the scheduler stopped
SWEEP_PARENT_TAG = "carclf.sweep_parent_run_id"
REPORT_RUN_TAG = "carclf.report_run_id"
SOURCE_TRIAL_TAG = "carclf.source_trial_run_id"
REPRESENTATIVE_TAG = "carclf.representative"
TEST_HASH_TAG = "carclf.test_manifest_hash"
SEED_INDEX_TAG = "carclf.retest_seed_index"
MANIFEST_ARTIFACT = "data/manifest.parquet"
TABLE_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
REPORT_FILES = {
    "table_csv": "comparison.csv", "table_parquet": "comparison.parquet", "mcnemar": "mcnemar.csv",
    "per_class": "per_class_f1.csv", "confused": "confused_pairs.csv", "status": "trials_not_finished.csv",
    "bars": "metrics.png", "confusion": "confusion.png", "html": "report.html", "summary": "report.json",
}
# The searched settings shown as a model's "chosen configuration"; the full config is the run's config.yaml.
NETWORK_KEYS = ("model.weights", "model.finetune", "train.optimizer", "train.lr", "train.weight_decay",
                "train.epochs", "train.batch_size", "augment.strength", "balance.mode", "balance.samples_per_class")
SVM_KEYS = ("svm.backbone", "svm.backbone_weights", "svm.features", "svm.kernel", "svm.C", "svm.gamma",
            "augment.strength", "balance.mode", "balance.samples_per_class")


# --------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepInfo:
    """What `results/<name>/sweep.json` says about a sweep."""

    name: str
    folder: Path
    parent_run_id: str
    experiment: str
    tracking_uri: str
    metric: str
    mode: str

    @property
    def report_dir(self) -> Path:
        return self.folder / "report"


def resolve_sweep(sweep: str | Path) -> SweepInfo:
    """A sweep name (under paths.results_root()) or a results folder -> its sweep.json, validated."""
    given = Path(sweep).expanduser()
    folder = given if (given / "sweep.json").is_file() else paths.results_root() / str(sweep)
    meta_path = folder / "sweep.json"
    if not meta_path.is_file():
        raise SweepError(f"no sweep {str(sweep)!r}: neither {given} nor {folder} holds sweep.json; "
                         f"run `carclf sweep FILE --name NAME` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SweepError(f"{meta_path} is not readable JSON: {e}") from e
    missing = [k for k in ("name", "parent_run_id", "tracking_uri", "metric", "mode") if not meta.get(k)]
    if missing:
        raise SweepError(f"{meta_path} lacks {', '.join(missing)}")
    mode = str(meta["mode"]).lower()
    if mode not in ("max", "min"):
        raise SweepError(f"{meta_path}: mode must be 'max' or 'min', got {meta['mode']!r}")
    return SweepInfo(name=str(meta["name"]), folder=folder.resolve(), parent_run_id=str(meta["parent_run_id"]),
                     experiment=str(meta.get("experiment") or "carclf"), tracking_uri=str(meta["tracking_uri"]),
                     metric=str(meta["metric"]), mode=mode)


def sweep_uri(info: SweepInfo) -> str:
    from carclf.tracking import resolve_tracking_uri

    return resolve_tracking_uri(info.tracking_uri)


def sweep_client(info: SweepInfo):
    from mlflow.tracking import MlflowClient

    uri = sweep_uri(info)
    # the registry lives in the same store; without this a client would follow mlflow's global registry URI
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def parent_run(client, info: SweepInfo):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(info.parent_run_id)
    except MlflowException as e:
        raise TrackingError(f"sweep {info.name!r}: parent run {info.parent_run_id} not found at "
                            f"{info.tracking_uri}: {e.message}") from None


def trial_runs(client, info: SweepInfo) -> pd.DataFrame:
    """One row per trial of the sweep: run_id, trial_id, model, status, start_time, error, metrics.

    `model` is the sweep's model entry (tag carclf.sweep_model, e.g. svm_linear and svm_rbf are two
    families of the one `svm` model). A trial retried after a failure keeps its best attempt.
    The selection metric is the trial's final value (see final_metric), not MLflow's latest step.
    """
    experiment_id = parent_run(client, info).info.experiment_id
    query = (f"tags.mlflow.parentRunId = '{info.parent_run_id}' and tags.`{ROLE_TAG}` = 'trial'")
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000,
                              order_by=["attributes.start_time ASC"])
    rows = [_trial_row(client, r, info.metric) for r in runs]
    if not rows:
        return pd.DataFrame(columns=["run_id", "trial_id", "model", "status", "start_time", "error"])
    return _one_attempt_per_trial(pd.DataFrame(rows))


def _trial_row(client, run, metric: str) -> dict[str, Any]:
    tags = run.data.tags
    status = run.info.status
    if status == "KILLED" and STOPPED_TAG in tags:
        status = "STOPPED_EARLY"  # ended by the scheduler for a poor validation curve: expected, not an error
    row = {"run_id": run.info.run_id, "trial_id": tags.get("carclf.trial_id", run.info.run_id),
           "model": family_of(tags, run.data.params), "status": status, "start_time": run.info.start_time,
           "error": tags.get("carclf.error", ""), **run.data.metrics}
    if status == "FINISHED" and metric in run.data.metrics:
        row[metric] = final_metric(client, run.info.run_id, metric)
    return row


def family_of(tags: dict, params: dict | None = None) -> str:
    """A run's model family: the sweep's model entry if tagged, else the carclf model name."""
    return tags.get(SWEEP_MODEL_TAG) or tags.get(MODEL_TAG) or (params or {}).get("model.name", "")


def final_metric(client, run_id: str, key: str) -> float:
    """The value a run logged last for `key`.

    Runs from before per-epoch curves moved to `epoch_*` keys logged epochs under the same key at
    step=epoch and the final evaluation (the restored best epoch) at step 0 afterwards; MLflow's
    'latest' value is the highest step's, i.e. the last epoch's, not the final one.
    """
    history = client.get_metric_history(run_id, key)
    if not history:
        return float("nan")
    return float(max(history, key=lambda m: (m.timestamp, -m.step)).value)


def _one_attempt_per_trial(trials: pd.DataFrame) -> pd.DataFrame:
    rank = trials["status"].map({"FINISHED": 0, "STOPPED_EARLY": 1}).fillna(2)
    ordered = trials.assign(_rank=rank).sort_values(["_rank", "start_time"], ascending=[True, False], kind="mergesort")
    kept = ordered.drop_duplicates("trial_id").drop(columns="_rank")
    return kept.sort_values("start_time", kind="mergesort").reset_index(drop=True)


def select_best(trials: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """The best FINISHED trial per model by the validation `metric`; ties go to the earlier trial.

    Refuses a test metric: choosing on the test split would make the test figures optimistic.
    """
    if metric.startswith("test_"):
        raise SweepError(f"selection metric {metric!r} is a test figure; pick by a validation metric")
    if trials.empty or metric not in trials.columns:
        return trials.iloc[0:0].assign(**{metric: pd.Series(dtype=float)})
    done = trials[(trials["status"] == "FINISHED") & trials[metric].notna()]
    ascending = mode == "min"
    ordered = done.sort_values([metric, "start_time"], ascending=[ascending, True], kind="mergesort")
    return ordered.groupby("model", sort=True).head(1).sort_values("model").reset_index(drop=True)


def unfinished(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Trials that did not finish with a validation figure: what the report says it left out."""
    if trials.empty:
        return pd.DataFrame(columns=["trial_id", "model", "status", "error", "run_id"])
    has_metric = trials[metric].notna() if metric in trials.columns else pd.Series(False, index=trials.index)
    left = trials[(trials["status"] != "FINISHED") | ~has_metric]
    return left[["trial_id", "model", "status", "error", "run_id"]].reset_index(drop=True)


def trial_config(client, run_id: str) -> RunConfig:
    """The RunConfig a trial ran with: its config.yaml artifact, else rebuilt from its params."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, "config.yaml", tmp)
            return validate_run_config(read_yaml(local), f"config.yaml of run {run_id}")
        except (MlflowException, OSError, CarclfError) as e:
            log.warning("run %s: no usable config.yaml artifact (%s); rebuilding the config from params", run_id, e)
    params = client.get_run(run_id).data.params
    data: dict[str, Any] = {}
    for key, raw in params.items():
        set_dotted(data, key, _param_value(raw))
    return validate_run_config(data, f"params of run {run_id}")


def _param_value(raw: str) -> Any:
    import yaml

    if raw == "None":
        return None
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def chosen_configuration(cfg: RunConfig) -> str:
    """The searched settings of a config as 'key=value, ...'."""
    flat = flatten(cfg.to_dict())
    keys = SVM_KEYS if cfg.is_svm else NETWORK_KEYS
    return ", ".join(f"{k.split('.', 1)[1]}={_fmt(flat.get(k))}" for k in keys)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    # a weights file is known by its name; the folder differs per machine and drowns the table
    return Path(text).name if ("/" in text or "\\" in text) else text


# --------------------------------------------------------------------------- retests


@dataclass
class SeedRun:
    """One retest: a retrained configuration evaluated on the test split."""

    run_id: str | None
    seed: int
    y_true: np.ndarray
    pred: np.ndarray
    test_metrics: dict[str, float]
    val_metrics: dict[str, float]
    train_seconds: float
    infer_seconds_per_image: float
    n_params: int
    size_mb: float
    classes: list[str]
    test_hash: str = ""


@dataclass
class FamilyRetest:
    """All retests of one model family's chosen configuration."""

    model: str
    trial_run_id: str
    trial_id: str
    val_metric: float
    config: RunConfig
    runs: list[SeedRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def representative(self) -> SeedRun | None:
        """The first successful seed (seed index 0 is the trial's own seed); never picked by test figures."""
        return self.runs[0] if self.runs else None

    @property
    def preds(self) -> np.ndarray:
        return np.stack([r.pred for r in self.runs])


def seed_configs(cfg: RunConfig, n_seeds: int, *, uri: str, experiment: str, model: str) -> list[RunConfig]:
    """The retest configs: same settings and split, seeds cfg.seed, cfg.seed+1, ..."""
    out = []
    for i in range(n_seeds):
        seed = cfg.seed + i
        tracking = cfg.tracking.model_copy(update={"uri": uri, "experiment": experiment, "log_model": True,
                                                   "run_name": f"retest-{model}-seed{seed}"})
        out.append(validate_run_config({**cfg.to_dict(), "seed": seed, "tracking": tracking.model_dump(mode="json")},
                                       "retest config"))
    return out


def manifest_test_hash(manifest: pd.DataFrame) -> str:
    """A hash of the test split's (image content, class) pairs: equal hashes mean the same test images
    with the same labels, wherever the files lie (paths are left out on purpose)."""
    test = manifest.loc[manifest["split"] == "test", ["sha256", "class"]].astype(str)
    lines = sorted(test["sha256"] + "\t" + test["class"])
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def run_test_hash(client, run_id: str) -> str:
    """The test-split hash of the manifest a run logged (run_experiment logs it at MANIFEST_ARTIFACT)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, MANIFEST_ARTIFACT, tmp)
        return manifest_test_hash(pd.read_parquet(local))


def _seed_run(result, test_hash: str) -> SeedRun:
    if result.y_test is None or result.pred_test is None:
        raise SweepError(f"retest run {result.run_id} has no test predictions")
    return SeedRun(run_id=result.run_id, seed=result.config.seed, y_true=np.asarray(result.y_test),
                   pred=np.asarray(result.pred_test), test_metrics=dict(result.test_metrics or {}),
                   val_metrics=dict(result.val_metrics or {}), train_seconds=float(result.train_seconds),
                   infer_seconds_per_image=float(result.infer_seconds_per_image), n_params=int(result.n_params),
                   size_mb=float(result.size_mb), classes=list(result.classes), test_hash=test_hash)


def retest_family(family: FamilyRetest, configs: list[RunConfig], *, client, report_run_id: str,
                  info: SweepInfo, progress: bool = False) -> FamilyRetest:
    """Retrain and test one family once per config; a failed seed is recorded, the others go on."""
    from carclf.experiment import run_experiment

    for i, cfg in enumerate(configs):
        tags = {ROLE_TAG: "retest", SWEEP_TAG: info.name, REPORT_RUN_TAG: report_run_id, SWEEP_MODEL_TAG: family.model,
                SOURCE_TRIAL_TAG: family.trial_run_id, SEED_INDEX_TAG: i}
        try:
            result = run_experiment(cfg, parent_run_id=report_run_id, tags=tags, evaluate_test=True,
                                    log_model=True, progress=progress)
            family.runs.append(_seed_run(result, run_test_hash(client, result.run_id)))
        except (CarclfError, RuntimeError, ValueError, OSError) as e:
            log.error("retest of %s with seed %d failed: %s", family.model, cfg.seed, e)
            family.errors.append(f"seed {cfg.seed}: {type(e).__name__}: {e}")
    return family


def check_same_test_split(families: list[FamilyRetest]) -> str:
    """The one test-split hash every retest shares; SweepError if any run was tested on other images."""
    hashes = {(f.model, r.seed): r.test_hash for f in families for r in f.runs}
    distinct = set(hashes.values())
    if len(distinct) > 1:
        shown = ", ".join(f"{m} seed {s}: {h[:12]}" for (m, s), h in sorted(hashes.items()))
        raise SweepError(f"retests were tested on different images (test manifests differ: {shown}); "
                         "models can only be compared on one test split")
    reference = next((r.y_true for f in families for r in f.runs), None)
    for f in families:
        for r in f.runs:
            if not np.array_equal(r.y_true, reference):
                raise SweepError(f"{f.model} seed {r.seed}: test labels are in a different order")
    return distinct.pop() if distinct else ""


# --------------------------------------------------------------------------- tables


def comparison_table(families: list[FamilyRetest], metric: str, *, n_boot: int = 2000,
                     level: float = 0.95) -> pd.DataFrame:
    """The study's main table: one row per model with seed mean/std and bootstrap intervals."""
    rows = []
    for f in families:
        if not f.runs:
            continue
        y, preds, k = f.runs[0].y_true, f.preds, len(f.runs[0].classes)
        row: dict[str, Any] = {"model": f.model, "configuration": chosen_configuration(f.config),
                               metric: f.val_metric, "seeds": len(f.runs)}
        for name in TABLE_METRICS:
            values = [stats.seed_mean_metric(y, p, name, k) for p in preds]
            ci = stats.bootstrap_ci(y, preds, name, n_boot=n_boot, level=level, n_classes=k)
            row.update({f"test_{name}": ci.estimate, f"test_{name}_std": float(np.std(values, ddof=1))
                        if len(values) > 1 else 0.0, f"test_{name}_ci_low": ci.low, f"test_{name}_ci_high": ci.high})
        row.update({
            "train_seconds": float(np.mean([r.train_seconds for r in f.runs])),
            "infer_ms_per_image": 1000.0 * float(np.mean([r.infer_seconds_per_image for r in f.runs])),
            "n_params": int(f.runs[0].n_params), "size_mb": float(f.runs[0].size_mb),
            "trial_run_id": f.trial_run_id, "representative_run_id": f.representative.run_id,
        })
        rows.append(row)
    return pd.DataFrame(rows)


def mcnemar_table(families: list[FamilyRetest]) -> pd.DataFrame:
    """McNemar's exact test for every pair of models, on their representative runs' test predictions."""
    done = [f for f in families if f.runs]
    rows = []
    for a, b in itertools.combinations(done, 2):
        ra, rb = a.representative, b.representative
        res = stats.mcnemar(ra.y_true, ra.pred, rb.pred)
        rows.append({"model_a": a.model, "model_b": b.model,
                     "accuracy_a": float(np.mean(ra.pred == ra.y_true)),
                     "accuracy_b": float(np.mean(rb.pred == rb.y_true)),
                     "only_a_right": res.a_only, "only_b_right": res.b_only,
                     "p_value": res.p_value, "p_mid": res.p_mid})
    table = pd.DataFrame(rows, columns=["model_a", "model_b", "accuracy_a", "accuracy_b", "only_a_right",
                                        "only_b_right", "p_value", "p_mid"])
    table["p_holm"] = stats.holm(table["p_value"].tolist()) if len(table) else []
    table["significant"] = table["p_holm"] < 0.05
    return table


def pooled_confusion(family: FamilyRetest) -> np.ndarray:
    """Confusion counts summed over seeds (each seed sees every test image once)."""
    from carclf.metrics import confusion

    k = len(family.runs[0].classes)
    return sum(confusion(r.y_true, r.pred, k)[0] for r in family.runs)


def per_class_f1_table(families: list[FamilyRetest]) -> pd.DataFrame:
    """Per-class test F1 per model (mean over seeds), with the class's test support."""
    from carclf.metrics import per_class_report

    done = [f for f in families if f.runs]
    if not done:
        return pd.DataFrame(columns=["class", "support"])
    classes = done[0].runs[0].classes
    table = pd.DataFrame({"class": classes})
    for f in done:
        reports = [per_class_report(r.y_true, r.pred, classes).set_index("class") for r in f.runs]
        table[f.model] = [float(np.mean([rep.loc[c, "f1"] for rep in reports])) for c in classes]
    table["support"] = [int(np.sum(done[0].runs[0].y_true == i)) for i in range(len(classes))]
    return table


def confused_pairs_table(families: list[FamilyRetest], k: int = 5) -> pd.DataFrame:
    """Each model's most confused (true, predicted) class pairs, counts pooled over seeds."""
    from carclf.metrics import most_confused_pairs

    parts = []
    for f in families:
        if f.runs:
            pairs = most_confused_pairs(pooled_confusion(f), f.runs[0].classes, k=k)
            parts.append(pairs.assign(model=f.model, seeds=len(f.runs)))
    if not parts:
        return pd.DataFrame(columns=["model", "true", "predicted", "count", "seeds"])
    table = pd.concat(parts, ignore_index=True)
    return table[["model"] + [c for c in table.columns if c != "model"]]


# --------------------------------------------------------------------------- figures and HTML


def report_figures(families: list[FamilyRetest], table: pd.DataFrame) -> dict[str, Any]:
    """The comparison bar chart and the side-by-side confusion matrices (matplotlib Figures)."""
    from carclf.figures import confusion_grid_figure, metric_bars_figure

    done = [f for f in families if f.runs]
    if not done:
        return {}
    grid = {f.model: (pooled_confusion(f), f.runs[0].classes) for f in done}
    # error bars: the '<metric>_std' columns (seed-to-seed spread)
    return {"bars": metric_bars_figure(table, [f"test_{m}" for m in TABLE_METRICS],
                                       title="Test metrics per model (mean ± std over seeds)"),
            "confusion": confusion_grid_figure(grid)}


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1200px;padding:0 1rem;color:#222}table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#555;font-size:.9rem}.warn{color:#a40}"""


def _html_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "<p class='note'>(none)</p>"
    return df.to_html(index=False, border=0, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}")


def _with_intervals(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The main table as the reader sees it: 'mean ± std [low, high]' per test metric."""
    if table.empty:
        return table
    shown = table[["model", "configuration", metric, "seeds"]].copy()
    for m in TABLE_METRICS:
        shown[f"test {m}"] = [f"{r[f'test_{m}']:.3f} ± {r[f'test_{m}_std']:.3f} "
                              f"[{r[f'test_{m}_ci_low']:.3f}, {r[f'test_{m}_ci_high']:.3f}]"
                              for _, r in table.iterrows()]
    shown["train s"] = table["train_seconds"].round(1)
    shown["infer ms/img"] = table["infer_ms_per_image"].round(3)
    shown["params"] = table["n_params"]
    shown["size MB"] = table["size_mb"].round(2)
    return shown


def render_html(*, info: SweepInfo, table: pd.DataFrame, mcnemar: pd.DataFrame, per_class: pd.DataFrame,
                confused: pd.DataFrame, not_finished: pd.DataFrame, problems: list[str],
                figures_png: dict[str, bytes], notes: dict[str, Any]) -> str:
    """One self-contained HTML page: tables inline, figures as base64 data URIs, no external assets."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>carclf report: {e(info.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Model comparison: sweep {e(info.name)}</h1>",
             f"<p class='note'>Generated {e(notes['created'])}. Selection: best finished trial per model by "
             f"<b>{e(info.metric)}</b> ({e(info.mode)}) on the validation split. Each chosen configuration was "
             f"retrained with {notes['seeds']} seed(s) on the same split and evaluated on the test split "
             f"({notes['n_test']} images, manifest {e(notes['test_hash'][:12])}). "
             "Test figures: mean ± std over seeds, with a 95% percentile bootstrap interval over test images "
             f"({notes['n_boot']} resamples, the same images drawn for every seed, metric averaged over seeds). "
             "McNemar: exact test on the representative runs (the first seed), Holm-adjusted over all pairs.</p>"]
    if problems:
        parts.append("<h2 class='warn'>Left out of the comparison</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in problems)
                     + "</ul>")
    parts += ["<h2>Comparison</h2>", _html_table(_with_intervals(table, info.metric))]
    for key, title in (("bars", "Test metrics per model"), ("confusion", "Test confusion matrices (summed over seeds)")):
        if key in figures_png:
            parts.append(f"<h2>{title}</h2><img alt='{e(title)}' src='{data_uri(figures_png[key])}'>")
    parts += ["<h2>Pairwise McNemar tests</h2>", _html_table(mcnemar),
              "<h2>Per-class test F1 (mean over seeds)</h2>", _html_table(per_class),
              "<h2>Most confused class pairs (counts summed over seeds)</h2>", _html_table(confused),
              "<h2>Trials not considered (stopped early, failed or unfinished)</h2>", _html_table(not_finished),
              "<h2>Runs</h2>", _html_table(table[["model", "trial_run_id", "representative_run_id"]]
                                           if not table.empty else table),
              f"<p class='note'>MLflow: report run {e(notes.get('report_run_id') or '')}, sweep parent run "
              f"{e(info.parent_run_id)} at {e(info.tracking_uri)}.</p></body></html>"]
    return "\n".join(parts)


# --------------------------------------------------------------------------- files and the run


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # a report is for sharing; mkstemp's private 0600 would surprise
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_value(value: Any, target: str, suffix: str) -> None:
    if isinstance(value, pd.DataFrame):
        if suffix == ".parquet":
            value.to_parquet(target, index=False)
        else:
            value.to_csv(target, index=False)
    elif isinstance(value, bytes):
        Path(target).write_bytes(value)
    elif isinstance(value, str):
        Path(target).write_text(value, encoding="utf-8")
    else:
        Path(target).write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")


def write_outputs(out_dir: Path, outputs: dict[str, Any]) -> dict[str, Path]:
    """Every report file (tables, PNG bytes, HTML, JSON), each written atomically; returns name -> path."""
    written = {}
    for key, value in outputs.items():
        path = out_dir / REPORT_FILES[key]
        _atomic_write(path, lambda tmp, v=value, suffix=path.suffix: _write_value(v, tmp, suffix))
        written[key] = path
    return written


@dataclass
class ReportResult:
    info: SweepInfo
    report_run_id: str
    out_dir: Path
    table: pd.DataFrame
    mcnemar: pd.DataFrame
    families: list[FamilyRetest]
    problems: list[str]
    files: dict[str, Path]


def _start_report_run(client, info: SweepInfo, n_seeds: int) -> str:
    parent = parent_run(client, info)
    # Linked by tag, not nested (mlflow.parentRunId): a resumed sweep treats every child of its parent
    # run as a trial and deletes children it does not know.
    tags = {ROLE_TAG: "report", SWEEP_TAG: info.name, SWEEP_PARENT_TAG: info.parent_run_id,
            "mlflow.runName": f"report-{info.name}"}
    run = client.create_run(parent.info.experiment_id, tags=tags)
    client.log_param(run.info.run_id, "seeds", n_seeds)
    client.log_param(run.info.run_id, "metric", info.metric)
    return run.info.run_id


def _problems(info: SweepInfo, trials: pd.DataFrame, best: pd.DataFrame, families: list[FamilyRetest],
              parent_status: str) -> list[str]:
    out = []
    if parent_status != "FINISHED":
        out.append(f"the sweep's parent run is {parent_status}: the sweep was interrupted or is still running; "
                   "this report covers the trials that finished")
    left = unfinished(trials, info.metric)
    stopped = int((left["status"] == "STOPPED_EARLY").sum())
    if stopped:
        out.append(f"{stopped} of {len(trials)} trials were stopped early by the scheduler (a poor validation "
                   "curve) and are not candidates")
    other = left[left["status"] != "STOPPED_EARLY"]
    if len(other):
        counts = other.groupby("status").size().to_dict()
        out.append(f"{len(other)} of {len(trials)} trials did not finish with {info.metric} "
                   f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); see the table below")
    for model in sorted(set(trials["model"]) - set(best["model"])) if len(trials) else []:
        out.append(f"{model}: no finished trial, not retested")
    for f in families:
        out += [f"{f.model}: retest failed ({err})" for err in f.errors]
    return out


def build_report(sweep: str | Path, *, seeds: int = 3, out: str | Path | None = None, n_boot: int = 2000,
                 progress: bool = False) -> ReportResult:
    """Select, retest, compare and write the report (files and the 'report' MLflow run)."""
    if seeds < 1:
        raise SweepError(f"--seeds must be at least 1, got {seeds}")
    info = resolve_sweep(sweep)
    client = sweep_client(info)
    trials = trial_runs(client, info)
    best = select_best(trials, info.metric, info.mode)
    if best.empty:
        raise SweepError(f"sweep {info.name!r}: no finished trial with {info.metric} "
                         f"({len(trials)} trial runs found); nothing to report")
    out_dir = Path(out).expanduser().resolve() if out else info.report_dir
    report_run_id = _start_report_run(client, info, seeds)
    try:
        result = _report_body(client, info, trials, best, report_run_id, seeds, out_dir, n_boot, progress)
    except BaseException as e:
        client.set_tag(report_run_id, "carclf.error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(report_run_id, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(report_run_id, status="FINISHED")
    return result


def _check_trials_share_test_split(client, best: pd.DataFrame) -> None:
    """Fail before any retraining if the chosen trials were tested on different images."""
    hashes = {row["model"]: run_test_hash(client, row["run_id"]) for _, row in best.iterrows()}
    if len(set(hashes.values())) > 1:
        shown = ", ".join(f"{m}: {h[:12]}" for m, h in sorted(hashes.items()))
        raise SweepError(f"the chosen trials were tested on different images ({shown}); "
                         "models can only be compared on one test split")


def _report_body(client, info, trials, best, report_run_id, seeds, out_dir, n_boot, progress) -> ReportResult:
    _check_trials_share_test_split(client, best)
    families = []
    for _, trial in best.iterrows():
        cfg = trial_config(client, trial["run_id"])
        family = FamilyRetest(model=trial["model"], trial_run_id=trial["run_id"], trial_id=str(trial["trial_id"]),
                              val_metric=float(trial[info.metric]), config=cfg)
        configs = seed_configs(cfg, seeds, uri=sweep_uri(info), experiment=_experiment_name(client, info),
                               model=family.model)
        log.info("retesting %s (trial %s, %s=%.4f) with %d seed(s)", family.model, family.trial_id,
                 info.metric, family.val_metric, seeds)
        families.append(retest_family(family, configs, client=client, report_run_id=report_run_id, info=info,
                                      progress=progress))
    test_hash = check_same_test_split(families)
    _tag_retests(client, families, test_hash)
    problems = _problems(info, trials, best, families, parent_run(client, info).info.status)
    if not any(f.runs for f in families):
        raise SweepError(f"sweep {info.name!r}: every retest failed: " + "; ".join(problems))
    return _write_report(client, info, trials, families, report_run_id, out_dir, n_boot, test_hash, problems, seeds)


def _experiment_name(client, info: SweepInfo) -> str:
    return client.get_experiment(parent_run(client, info).info.experiment_id).name


def _tag_retests(client, families: list[FamilyRetest], test_hash: str) -> None:
    for f in families:
        for r in f.runs:
            client.set_tag(r.run_id, TEST_HASH_TAG, test_hash)
            client.set_tag(r.run_id, REPRESENTATIVE_TAG, str(r is f.representative).lower())


def _write_report(client, info, trials, families, report_run_id, out_dir, n_boot, test_hash, problems,
                  seeds) -> ReportResult:
    table = comparison_table(families, info.metric, n_boot=n_boot)
    mcn = mcnemar_table(families)
    per_class, confused = per_class_f1_table(families), confused_pairs_table(families)
    not_finished = unfinished(trials, info.metric)
    figures = {k: figure_png(fig) for k, fig in report_figures(families, table).items()}
    n_test = len(next(r.y_true for f in families for r in f.runs))
    notes = {"created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seeds": seeds,
             "n_test": n_test, "test_hash": test_hash, "n_boot": n_boot, "report_run_id": report_run_id}
    page = render_html(info=info, table=table, mcnemar=mcn, per_class=per_class, confused=confused,
                       not_finished=not_finished, problems=problems, figures_png=figures, notes=notes)
    summary = _summary(info, families, report_run_id, test_hash, problems, seeds)
    files = write_outputs(out_dir, {"table_csv": table, "table_parquet": table, "mcnemar": mcn, "per_class": per_class,
                                    "confused": confused, "status": not_finished, **figures, "html": page,
                                    "summary": summary})
    for path in files.values():
        client.log_artifact(report_run_id, str(path), "report")
    _log_report_metrics(client, report_run_id, table)
    return ReportResult(info, report_run_id, out_dir, table, mcn, families, problems, files)


def _summary(info, families, report_run_id, test_hash, problems, seeds) -> dict[str, Any]:
    return {"sweep": info.name, "sweep_parent_run_id": info.parent_run_id, "report_run_id": report_run_id,
            "tracking_uri": info.tracking_uri, "metric": info.metric, "mode": info.mode, "seeds": seeds,
            "test_manifest_hash": test_hash, "representative": "first successful seed (the trial's own seed)",
            "problems": problems,
            "models": {f.model: {"trial_run_id": f.trial_run_id, "val_metric": f.val_metric,
                                 "representative_run_id": f.representative.run_id if f.runs else None,
                                 "retest_run_ids": [r.run_id for r in f.runs], "errors": f.errors}
                       for f in families}}


def _log_report_metrics(client, run_id: str, table: pd.DataFrame) -> None:
    for _, row in table.iterrows():
        for m in TABLE_METRICS:
            value = row[f"test_{m}"]
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(run_id, f"{row['model']}.test_{m}", value)


def cli_report(args) -> int:
    result = build_report(args.sweep, seeds=args.seeds, out=args.out, progress=True)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(_with_intervals(result.table, result.info.metric).to_string(index=False))
    if len(result.mcnemar):
        print("\nMcNemar (representative runs):")
        print(result.mcnemar.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    for p in result.problems:
        print(f"note: {p}")
    print(f"\nreport: {result.files['html']}\nMLflow report run: {result.report_run_id}")
    return 0
