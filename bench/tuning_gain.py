"""Does tuning pay on photos it was not tuned on? sweeps/model10.yaml against each family's default, on two photo sets.

    .venv/bin/python bench/tuning_gain.py        # from the project root; both photo sets
    CARCLF_BENCH_SETS=model10b .venv/bin/python bench/tuning_gain.py     # one of them

For each photo set (../shared/data/stanford_cars_model10, and stanford_cars_model10b: 10 other car
models, none in model10), in a temporary project (its own MLflow database and results/) with the
user's decode and feature caches:

1. warm-up (not timed): decode the photos and extract the MobileNetV2 features once, so neither
   sweep's time includes work the other was spared;
2. the sweep file as it was before this search covered its space (bench/model10_before.yaml: 16
   trials over wide ranges; run by today's code): its wall time W is the set's time;
3. today's `sweeps/model10.yaml` with `time_budget_s` = W (the same wall time; it may end sooner when
   its search converges), then `carclf report` on it, which retests each family's best and its
   default configuration on the same test images: per family the tuned and default test accuracy
   with a paired bootstrap 95% interval of the gain, and McNemar's p;
4. the RBF SVM at C=10, gamma 'scale' (gamma_factor 1), the textbook setting, on the same split.

Targets, per set: the winner's test accuracy (the family the report names, chosen on validation) at
or above the best default's; at least one family's gain interval above 0; and the RBF family's
tuned test accuracy at or above its C=10 'scale' setting's. The last line is `RESULT {json}`.
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
DATA_ROOT = ROOT.parent / "shared" / "data"
SETS = {"model10": DATA_ROOT / "stanford_cars_model10", "model10b": DATA_ROOT / "stanford_cars_model10b"}
BEFORE = ROOT / "bench" / "model10_before.yaml"
AFTER = ROOT / "sweeps" / "model10.yaml"
REFERENCE_RBF = {"C": 10.0, "gamma_factor": 1.0}  # scikit-learn's SVC with C=10, gamma 'scale'


def sweep_file(src: Path, out: Path, data: Path, **over) -> Path:
    spec = yaml.safe_load(src.read_text())
    spec["base"]["data"]["path"] = str(data)
    spec.update(over)
    out.write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def _svm_config(path: Path, data: Path, cache: Path, tmp: Path, **svm) -> dict:
    from sweeps.search.spec import load_sweep_spec

    spec = load_sweep_spec(path)
    key = "svm_rbf" if "svm_rbf" in spec.models else next(k for k in spec.models if not spec.is_network(k))
    cfg = spec.base_config(key)
    cfg["data"] = {**cfg["data"], "path": str(data), "cache_dir": str(cache)}
    cfg["svm"] = {**cfg.get("svm", {}), **svm}
    cfg.setdefault("tracking", {})["uri"] = f"sqlite:///{tmp / 'warmup.db'}"
    return cfg


def warm_up(files: list[Path], data: Path, cache: Path, tmp: Path) -> None:
    """Decode the photos at each size the sweeps use and cache the SVMs' features (untimed)."""
    from carclf.config import validate_run_config
    from carclf.experiment import run_experiment
    from sweeps.run.driver import warm_decode_cache
    from sweeps.search.spec import load_sweep_spec

    for path in files:
        warm_decode_cache(load_sweep_spec(path), {"data": {"path": str(data), "cache_dir": str(cache)}})
    run_experiment(validate_run_config(_svm_config(files[-1], data, cache, tmp)), evaluate_test=True, log_model=False)


def reference_rbf(path: Path, data: Path, cache: Path, tmp: Path) -> float:
    """Test accuracy of the RBF SVM at C=10, gamma 'scale', on the sweep's split and cached features."""
    from carclf.config import validate_run_config
    from carclf.experiment import run_experiment

    cfg = _svm_config(path, data, cache, tmp, kernel="rbf", **REFERENCE_RBF)
    result = run_experiment(validate_run_config(cfg), evaluate_test=True, log_model=False)
    return float(result.test_metrics["accuracy"])


def timed_sweep(path: Path, name: str, uri: str):
    from sweeps.run.runner import run_sweep

    start = time.perf_counter()
    table = run_sweep(path, name=name, tracking_uri=uri)
    return table, time.perf_counter() - start


def _round(v, n=4):
    return None if v is None or v != v else round(float(v), n)


def _families(gain) -> dict:
    out = {}
    for row in gain.to_dict("records"):
        out[row["family"]] = {
            "tuned": row.get("tuned"), "default_of": row.get("default_of"),
            "best_test_accuracy": _round(row.get("test_accuracy_best")),
            "default_test_accuracy": _round(row.get("test_accuracy_default")),
            "gain": _round(row.get("test_accuracy_gain")),
            "gain_95": [_round(row.get("test_accuracy_gain_low")), _round(row.get("test_accuracy_gain_high"))],
            "mcnemar_p": _round(row.get("mcnemar_p"), 5), "verdict": row.get("verdict")}
    return out


def _val_winner(report, metric: str) -> tuple[str | None, float | None]:
    """The family with the best seed-mean validation figure of the retests, and its test accuracy."""
    import numpy as np

    best = None
    for f in report.families:
        vals = [r.val_metrics.get(metric[len("val_"):], np.nan) for r in f.runs]
        if vals and np.isfinite(np.mean(vals)) and (best is None or np.mean(vals) > best[1]):
            best = (f.model, float(np.mean(vals)), float(np.mean([r.test_metrics["accuracy"] for r in f.runs])))
    return (best[0], best[2]) if best else (None, None)


def run_set(name: str, data: Path, cache: Path) -> dict:
    from carclf.report import build_report

    with tempfile.TemporaryDirectory(prefix=f"carclf-bench-tuning-{name}-") as tmp:
        tmp = Path(tmp)
        os.environ["CARCLF_PROJECT_ROOT"] = str(tmp)
        before = sweep_file(BEFORE, tmp / "before.yaml", data)
        warm_up([before, sweep_file(AFTER, tmp / "after0.yaml", data)], data, cache, tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        before_table, before_s = timed_sweep(before, f"before-{name}", uri)
        after = sweep_file(AFTER, tmp / "after.yaml", data, time_budget_s=round(before_s, 1))
        after_table, after_s = timed_sweep(after, f"tuning-{name}", uri)
        start = time.perf_counter()
        report = build_report(f"tuning-{name}", n_boot=2000)
        report_s = time.perf_counter() - start
        reference = reference_rbf(after, data, cache, tmp)
        metric = yaml.safe_load(AFTER.read_text())["metric"]
        val_winner, val_winner_test = _val_winner(report, metric)
        families = _families(report.gain)
        w = report.winner or {}
        print(report.gain.drop(columns=["sentence"], errors="ignore").to_string(index=False))
        for row in report.gain.to_dict("records"):
            print(f"{name} {row['family']}: {row.get('sentence', '')}")
    defaults = [f["default_test_accuracy"] for k, f in families.items() if k != "overall" and f["default_test_accuracy"]]
    significant = sorted(k for k, f in families.items()
                         if k != "overall" and f["gain_95"][0] is not None and f["gain_95"][0] > 0)
    rbf = families.get("svm_rbf", {}).get("best_test_accuracy")
    out = {"before_wall_s": round(before_s, 1), "after_wall_s": round(after_s, 1), "report_s": round(report_s, 1),
           "ended_by": after_table.attrs.get("ended_by"),
           "trials": int(len(after_table)), "before_trials": int(len(before_table)),
           "trials_by_family": {k: int(v) for k, v in after_table["model"].value_counts().items()},
           "before_trials_by_family": {k: int(v) for k, v in before_table["model"].value_counts().items()},
           "families": families, "families_with_gain": significant,
           "report_winner": w.get("model"), "val_winner": val_winner, "val_winner_test_accuracy": _round(val_winner_test),
           "best_default_test_accuracy": max(defaults) if defaults else None,
           "rbf_tuned_test_accuracy": rbf, "rbf_c10_scale_test_accuracy": _round(reference)}
    out["targets"] = {
        "winner_at_or_above_best_default": bool(defaults and val_winner_test is not None
                                                and val_winner_test >= max(defaults) - 1e-9),
        "a_gain_interval_above_0": bool(significant),
        "rbf_at_or_above_c10_scale": bool(rbf is not None and rbf >= reference - 1e-9)}
    return out


def main() -> int:
    names = [n.strip() for n in os.environ.get("CARCLF_BENCH_SETS", ",".join(SETS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in SETS]
    if unknown:
        print(f"unknown photo set(s) {unknown}; known: {', '.join(SETS)}", file=sys.stderr)
        return 2
    missing = [str(SETS[n]) for n in names if not SETS[n].is_dir()]
    if missing:
        print(f"real photos not found at {', '.join(missing)}", file=sys.stderr)
        return 2
    from carclf.core import paths

    cache = paths.cache_root()  # resolved before the project root moves: reuse the user's caches
    os.environ["CARCLF_CACHE_DIR"] = str(cache)
    result = {name: run_set(name, SETS[name], cache) for name in names}
    for name, r in result.items():
        print(f"\n{name}: sweep {r['after_wall_s']:.0f} s ({r['trials']} trials, ended by {r['ended_by']}) against "
              f"the earlier file's {r['before_wall_s']:.0f} s ({r['before_trials']} trials); report {r['report_s']:.0f} s")
    result["target_met"] = all(all(r["targets"].values()) for r in result.values())
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
