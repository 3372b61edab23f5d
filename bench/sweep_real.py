"""Benchmark a real sweep: SVMs (linear, RBF) on MobileNetV2 features and fine-tuned MobileNetV2, model10 photos.

    .venv/bin/python bench/sweep_real.py                      # from the project root; sweeps/model10.yaml
    .venv/bin/python bench/sweep_real.py --num-samples 10     # fewer trials

Runs `sweeps/model10.yaml` (optionally with fewer trials) into a temporary project folder (its
own MLflow database and results/) but with the user's decode and feature caches, so a second run
skips decoding and feature extraction. Prints wall time, trials, the best validation and test
macro-F1 (sweep trials never see the test split: the test figures come from `carclf report` with
one seed, which retests the best trial per model family with that trial's own seed; its time is
reported apart from the sweep's), and the SVM picked by validation macro-F1 against the untuned reference in
../shared/data/README.md (RBF SVM, C=10, on MobileNetV2 features at 224 px, an 80/20 split:
test accuracy 0.887).
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
REFERENCE_TEST_ACCURACY = 0.887


def sweep_file(src: Path, out: Path, data: Path, num_samples: int | None) -> Path:
    spec = yaml.safe_load(src.read_text())
    spec["base"]["data"]["path"] = str(data)
    if num_samples:
        spec["num_samples"] = num_samples
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def best(table, metric: str, rows=None):
    rows = table if rows is None else rows
    rows = rows[rows["status"] == "completed"].dropna(subset=[metric])
    return None if rows.empty else rows.sort_values(metric, ascending=False, kind="stable").iloc[0]


def test_figures(report_table) -> dict:
    """model family -> {test_f1_macro, test_accuracy} of its retest (the report's table)."""
    return {row["model"]: {"test_f1_macro": row["test_f1_macro"], "test_accuracy": row["test_accuracy"]}
            for _, row in report_table.iterrows()}


def with_test(row, tested: dict):
    """A trial's row with its family's retest figures on the test split (NaN if its retest failed)."""
    if row is None:
        return None
    row = row.copy()
    figures = tested.get(row["model"], {})
    for key in ("test_f1_macro", "test_accuracy"):
        row[key] = float(figures.get(key, float("nan")))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=str(ROOT / "sweeps" / "model10.yaml"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--num-samples", type=int, help="override the sweep file's num_samples")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        print(f"real photos not found at {data}", file=sys.stderr)
        return 2
    from carclf.core import paths

    cache = paths.cache_root()  # resolved before the project root moves: reuse the user's caches
    with tempfile.TemporaryDirectory(prefix="carclf-bench-sweep-") as tmp:
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["CARCLF_CACHE_DIR"] = str(cache)
        path = sweep_file(Path(args.sweep), Path(tmp) / "model10.yaml", data, args.num_samples)
        from sweeps.run.runner import run_sweep

        start = time.perf_counter()
        table = run_sweep(path, name="bench-real", tracking_uri=f"sqlite:///{tmp}/mlflow.db")
        wall = time.perf_counter() - start
        from carclf.report import build_report

        start = time.perf_counter()
        tested = test_figures(build_report("bench-real", seeds=1, n_boot=200).table)
        report_s = time.perf_counter() - start
    completed = table[table["status"] == "completed"]
    top = best(table, "val_f1_macro")
    svm = best(table, "val_f1_macro", table[table["model_name"] == "svm"])
    top, svm = with_test(top, tested), with_test(svm, tested)
    result = {
        "wall_s": round(wall, 1), "report_s": round(report_s, 1), "trials": int(len(table)),
        "completed": int(len(completed)),
        "stopped_early": int((table["status"] == "stopped_early").sum()),
        "failed": int((table["status"] == "failed").sum()),
        "trials_by_model": {k: int(v) for k, v in table["model"].value_counts().items()},
        "best_model": None if top is None else top["model"],
        "best_val_f1_macro": None if top is None else round(float(top["val_f1_macro"]), 4),
        "best_test_f1_macro": None if top is None else round(float(top["test_f1_macro"]), 4),
        "best_svm": None if svm is None else {
            "model": svm["model"], "C": float(svm["C"]),
            "gamma": svm["gamma"] if isinstance(svm.get("gamma"), str) else None,
            "val_f1_macro": round(float(svm["val_f1_macro"]), 4),
            "test_f1_macro": round(float(svm["test_f1_macro"]), 4),
            "test_accuracy": round(float(svm["test_accuracy"]), 4)},
        "reference_test_accuracy": REFERENCE_TEST_ACCURACY,
    }
    result["svm_beats_reference"] = bool(svm is not None and svm["test_accuracy"] > REFERENCE_TEST_ACCURACY)
    cols = [c for c in ("model", "status", "C", "gamma", "lr", "samples_per_class", "augment_strength",
                        "val_f1_macro") if c in table.columns]
    print(table[cols].to_string(index=False))
    print(f"\nwall time {wall:.0f} s, {len(table)} trials ({len(completed)} completed)")
    if top is not None:
        print(f"best by validation: {top['model']} val macro-F1 {top['val_f1_macro']:.4f}, "
              f"test macro-F1 {top['test_f1_macro']:.4f}")
    if svm is not None:
        print(f"best SVM by validation: {svm['model']} test accuracy {svm['test_accuracy']:.4f} "
              f"(untuned reference {REFERENCE_TEST_ACCURACY})")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
