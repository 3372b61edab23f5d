"""Benchmark: `sweeps/model10.yaml` end to end from a cold feature cache: the sweep's wall time, then the report's.

    .venv/bin/python bench/sweep_wall.py     # from the project root; 35-60 minutes on 2 heavily loaded cores

Runs the sweep file as a user does (`run_sweep`, then `build_report` with one seed) into a temporary
project folder with its own MLflow database and its own cache folder. The decode cache is filled
before the clock starts (both the old and the new driver decode with every core before the trials);
the feature cache starts empty, so the timing covers what this benchmark is about: extracting the
MobileNetV2 features at 320 px once, and the trials that read them.

The carclf on PYTHONPATH is the one measured: run it once with this checkout and once with an
earlier one to compare (the RESULT line names the code it ran). The last line is `RESULT {json}`.
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
SWEEP = ROOT / "sweeps" / "model10.yaml"


def main() -> int:
    if not DATA.is_dir():
        print(f"model10 photos not found at {DATA}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="carclf-bench-wall-") as tmp:
        os.environ["CARCLF_PROJECT_ROOT"] = tmp
        os.environ["CARCLF_CACHE_DIR"] = str(Path(tmp) / "cache")
        spec = yaml.safe_load(SWEEP.read_text(encoding="utf-8"))
        spec["base"]["data"]["path"] = str(DATA)
        path = Path(tmp) / "model10.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return run(path, spec, Path(tmp))


def run(path: Path, spec: dict, tmp: Path) -> int:
    import carclf
    from carclf.config import validate_run_config
    from carclf.data.prepare import prepare_data
    from carclf.report import build_report
    from sweeps.run.runner import run_sweep

    cfg = validate_run_config(spec["base"])
    prepare_data(cfg, image_size=cfg.data.image_size, progress=True)  # decode once, outside the timings
    start = time.perf_counter()
    table = run_sweep(path, name="bench-wall", tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    sweep_s = time.perf_counter() - start
    start = time.perf_counter()
    report = build_report("bench-wall", seeds=1, n_boot=200)
    report_s = time.perf_counter() - start
    done = table[table["status"] == "completed"].dropna(subset=["val_f1_macro"])
    top = done.sort_values("val_f1_macro", ascending=False, kind="stable").iloc[0]
    result = {"code": str(Path(carclf.__file__).resolve().parents[1]), "sweep_s": round(sweep_s, 1),
              "report_s": round(report_s, 1), "trials": int(len(table)), "completed": int(len(done)),
              "best_model": str(top["model"]), "best_val_f1_macro": round(float(top["val_f1_macro"]), 4),
              "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
              "test_f1_macro": {str(r["model"]): round(float(r["test_f1_macro"]), 4)
                                for _, r in report.table.iterrows()}}
    print(f"sweep {sweep_s:.0f} s ({len(table)} trials), report {report_s:.0f} s; best by validation "
          f"{top['model']} val macro-F1 {top['val_f1_macro']:.4f}")
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
