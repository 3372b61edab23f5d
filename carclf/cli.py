"""The `carclf` command line: data, train, sweep, report, promote, predict, ui, server.

Each subcommand imports its module only when it runs, so `carclf --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from carclf.errors import CarclfError


def _handler(target: str):
    """'module:function' resolved at call time."""

    def run(args: argparse.Namespace):
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="inspect, split and make image data")
    dsub = data.add_subparsers(dest="data_command", required=True)

    demo = dsub.add_parser("demo", help="write a small synthetic, imbalanced demo data set (a pipeline check)")
    demo.add_argument("dir", help="output folder (one sub-folder per class)")
    demo.add_argument("--images", type=int, default=300, help="total number of images")
    demo.add_argument("--size", type=int, default=96, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--force", action="store_true", help="overwrite a non-empty folder")
    demo.set_defaults(func=_handler("carclf.demo:cli_demo"))

    def selection(p):
        p.add_argument("path", help="ImageFolder tree: one folder per class")
        p.add_argument("--classes", nargs="+", help="keep only these classes")
        p.add_argument("--top-k", type=int, help="keep the K most frequent classes")
        p.add_argument("--min-images", type=int, default=5, help="leave out classes with fewer images")
        p.add_argument("--cache-dir", help="cache folder for the file-hash index "
                       "(default: CARCLF_CACHE_DIR, else ~/.cache/carclf)")

    stats = dsub.add_parser("stats", help="class table, duplicates, skipped files and the class-frequency figure")
    selection(stats)
    stats.add_argument("--figure", help="PNG path for the class-frequency chart (default: class_frequency.png)")
    stats.set_defaults(func=_handler("carclf.data:cli_stats"))

    split = dsub.add_parser("split", help="stratified, duplicate-aware train/val/test split saved as a manifest")
    selection(split)
    split.add_argument("--out", required=True, help="manifest path (.parquet)")
    split.add_argument("--fractions", nargs=3, type=float, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    split.add_argument("--seed", type=int, default=0)
    split.set_defaults(func=_handler("carclf.data:cli_split"))


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="one tracked training run (network or SVM on CNN features)")
    p.add_argument("--config", help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=0.01 (repeatable)")
    p.set_defaults(func=_handler("carclf.experiment:cli_train"))


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune + Optuna sweep, every trial tracked in MLflow")
    p.add_argument("file", help="sweep definition YAML (see sweeps/)")
    p.add_argument("--name", help="sweep name (default: the file's stem)")
    p.add_argument("--address", help="Ray cluster: 'auto' or ray://HOST:10001 (default: local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--storage-path", help="Ray Tune storage (must be shared by all nodes on a cluster)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite at the project root)")
    p.set_defaults(func=_handler("sweeps.runner:cli_sweep"))


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="retest the best configuration per model on the test split and compare")
    p.add_argument("sweep", help="sweep name or its results folder")
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per model")
    p.add_argument("--out", help="output folder (default: results/<sweep>/report)")
    p.set_defaults(func=_handler("carclf.report:cli_report"))


def _add_promote(sub) -> None:
    p = sub.add_parser("promote", help="register retested models and move an alias to the better one")
    p.add_argument("sweep", help="sweep name or its results folder (after `carclf report`)")
    p.add_argument("--model", help="model family to promote (default: every family in the report)")
    p.add_argument("--alias", default="champion")
    p.add_argument("--force", action="store_true", help="move the alias even if the new version is not better")
    p.set_defaults(func=_handler("carclf.promote:cli_promote"))


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="predict car models for images with a registered or logged model")
    p.add_argument("model_uri", help="e.g. models:/carclf-svm@champion or runs:/RUN_ID/model")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--out", help="write predictions as CSV")
    p.add_argument("--tracking-uri", help="MLflow store holding the model (default: MLFLOW_TRACKING_URI or sqlite at the project root)")
    p.set_defaults(func=_handler("carclf.predict:cli_predict"))


def _add_tracking(sub) -> None:
    ui = sub.add_parser("ui", help="open the MLflow UI on the project's database (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--backend-store-uri", help="default: the project's tracking URI")
    ui.set_defaults(func=_handler("carclf.tracking:cli_ui"))

    srv = sub.add_parser("server", help="run an MLflow tracking server for a Ray cluster")
    srv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    srv.add_argument("--port", type=int, default=5000)
    srv.add_argument("--backend-store-uri", help="sqlite:////abs/mlflow.db or postgresql://... (default: project sqlite)")
    srv.add_argument("--artifacts-destination", help="where the server stores artifacts (default: <project>/mlartifacts)")
    srv.add_argument("--allowed-hosts", help="comma-separated Host values the server accepts")
    srv.set_defaults(func=_handler("carclf.server:cli_server"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carclf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data, _add_train, _add_sweep, _add_report, _add_promote, _add_predict, _add_tracking):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except CarclfError as e:
        print(f"carclf: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carclf: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
