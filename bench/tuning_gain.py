"""Does tuning pay for itself? The model10 sweep against each family's default configuration.

    .venv/bin/python bench/tuning_gain.py        # from the project root

On the model10 photos (../shared/data/stanford_cars_model10), in a temporary project (its own MLflow
database and results/) with the user's decode and feature caches:

1. warm-up (not timed): decode the photos at every size both sweep files use, and extract the
   MobileNetV2 features once, so neither sweep's time includes work the other was spared;
2. the sweep as it was before tuning was made to pay (bench/model10_before.yaml, a copy of the
   sweep file of that time): its wall time is the budget;
3. today's `sweeps/model10.yaml`: its wall time, then `carclf report` on it, which retests each
   family's best and its default configuration (the sweep's first trial of the family) on the same
   test images and computes the tuning gain: a paired bootstrap 95% interval and McNemar's p.

Target: a gain whose interval excludes 0 for at least one family, with today's sweep taking no more
than the earlier one's wall time (10% allowed for timing noise on a shared machine).
The last line is `RESULT {json}`.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "stanford_cars_model10"
BEFORE = ROOT / "bench" / "model10_before.yaml"
AFTER = ROOT / "sweeps" / "model10.yaml"
NOISE = 1.10  # today's sweep may take up to 10% longer than the earlier one and still count as "the same time"


def sweep_file(src: Path, out: Path) -> Path:
    spec = yaml.safe_load(src.read_text())
    spec["base"]["data"]["path"] = str(DATA)
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def warm_up(files: list[Path], cache: Path, tmp: Path) -> None:
    """Decode the photos at each size the sweeps use and cache the SVMs' features (untimed)."""
    from carclf.config import validate_run_config
    from carclf.experiment import run_experiment
    from sweeps.driver import warm_decode_cache
    from sweeps.spec import load_sweep_spec

    for path in files:
        warm_decode_cache(load_sweep_spec(path), {"data": {"path": str(DATA), "cache_dir": str(cache)}})
    spec = load_sweep_spec(files[-1])
    svm = next(k for k in spec.models if not spec.is_network(k))
    cfg = spec.base_config(svm)
    cfg.setdefault("tracking", {})["uri"] = f"sqlite:///{tmp / 'warmup.db'}"
    run_experiment(validate_run_config(cfg), evaluate_test=True, log_model=False)


def timed_sweep(path: Path, name: str, uri: str):
    from sweeps.runner import run_sweep

    start = time.perf_counter()
    table = run_sweep(path, name=name, tracking_uri=uri)
    return table, time.perf_counter() - start


def _round(v, n=4):
    return None if v is None or v != v else round(float(v), n)


def main() -> int:
    if not DATA.is_dir():
        print(f"real photos not found at {DATA}", file=sys.stderr)
        return 2
    from carclf import paths

    cache = paths.cache_root()  # resolved before the project root moves: reuse the user's caches
    with tempfile.TemporaryDirectory(prefix="carclf-bench-tuning-") as tmp:
        tmp = Path(tmp)
        os.environ["CARCLF_PROJECT_ROOT"] = str(tmp)
        os.environ["CARCLF_CACHE_DIR"] = str(cache)
        before = sweep_file(BEFORE, tmp / "before.yaml")
        after = sweep_file(AFTER, tmp / "after.yaml")
        warm_up([before, after], cache, tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        before_table, before_s = timed_sweep(before, "before", uri)
        after_table, after_s = timed_sweep(after, "tuning", uri)
        from carclf.report import build_report

        start = time.perf_counter()
        report = build_report("tuning", n_boot=2000)
        report_s = time.perf_counter() - start
        gain = report.gain
        edges = report.edge_warnings
    families = {}
    for row in gain.to_dict("records"):
        families[row["family"]] = {
            "tuned": row.get("tuned"), "default_of": row.get("default_of"),
            "best_test_accuracy": _round(row.get("test_accuracy_best")),
            "default_test_accuracy": _round(row.get("test_accuracy_default")),
            "gain": _round(row.get("test_accuracy_gain")),
            "gain_95": [_round(row.get("test_accuracy_gain_low")), _round(row.get("test_accuracy_gain_high"))],
            "mcnemar_p": _round(row.get("mcnemar_p"), 5), "verdict": row.get("verdict")}
    significant = sorted(k for k, f in families.items()
                         if k != "overall" and f["gain_95"][0] is not None and f["gain_95"][0] > 0)
    result = {
        "sweep_wall_s": round(after_s, 1), "before_sweep_wall_s": round(before_s, 1), "report_s": round(report_s, 1),
        "trials": int(len(after_table)), "before_trials": int(len(before_table)),
        "trials_by_family": {k: int(v) for k, v in after_table["model"].value_counts().items()},
        "families": families, "edge_warnings": [e.get("message") for e in edges],
        "families_with_gain": significant,
        "target_met": bool(significant) and after_s <= NOISE * before_s,
    }
    print(gain.drop(columns=["sentence"], errors="ignore").to_string(index=False))
    for row in gain.to_dict("records"):
        print(f"{row['family']}: {row.get('sentence', '')}")
    print(f"\nsweep {after_s:.0f} s ({len(after_table)} trials) against the earlier sweep's {before_s:.0f} s "
          f"({len(before_table)} trials); report {report_s:.0f} s")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
