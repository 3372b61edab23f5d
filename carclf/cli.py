"""The `carclf` command line: data, train, rank, sweep, analyze, report, promote, predict, ui, server.

Each subcommand imports its module only when it runs, so `carclf --help` is instant. Every option's
help says its default; `-v` works before or after the subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import textwrap

from carclf.core.errors import CarclfError
from carclf.core.redact import RedactingFormatter, redact


def _handler(target: str):
    """'module:function' resolved at call time."""

    def run(args: argparse.Namespace):
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


DESCRIPTION = ("carclf: hyperparameter sweeps of car-model image classifiers (CNNs and SVMs on CNN features) "
               "with Ray Tune and Optuna, every run tracked in MLflow, a statistical comparison on the test split, "
               "and the winner promoted to the MLflow model registry.")
EPILOG = ("first hour: carclf data demo demo_data; carclf sweep sweeps/quickstart.yaml; carclf report quickstart; "
          "carclf promote quickstart; carclf ui (see README.md)")
# MLflow's own output that carclf replaces by its own: a progress bar per artifact download (dozens per
# report) and, at the end of a run on a tracking server, a link that may point at the sweep's temporary
# server. Set either variable yourself to keep MLflow's behaviour.
QUIET_MLFLOW = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' to an option's help unless the help says its default itself (or there is none
    worth saying: a flag, or None explained in words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        nothing_to_say = any(default is x for x in (None, False, argparse.SUPPRESS))  # `is`: 0 == False
        if ("default" in text or not action.option_strings or nothing_to_say
                or isinstance(action, argparse._HelpAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {shown})"

    def _split_lines(self, text, width):
        # model URIs and option names hold hyphens: never break a line inside one
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _add_parser(sub, name: str, **kw) -> argparse.ArgumentParser:
    """A subcommand with carclf's help formatter and its own `-v`."""
    parser = sub.add_parser(name, formatter_class=HelpFormatter, **kw)
    _add_verbose(parser, argparse.SUPPRESS)  # SUPPRESS: without -v here, the top-level value stays
    return parser


def _add_verbose(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging (before or after the subcommand)")


def _add_data(sub) -> None:
    data = _add_parser(sub, "data", help="inspect, split and make image data")
    dsub = data.add_subparsers(dest="data_command", required=True)

    demo = _add_parser(dsub, "demo", help="write a small synthetic, imbalanced demo data set (a pipeline check)")
    demo.add_argument("dir", help="output folder (one sub-folder per class)")
    demo.add_argument("--images", type=int, default=300, help="total number of images")
    demo.add_argument("--size", type=int, default=96, help="image side in pixels")
    demo.add_argument("--seed", type=int, default=0, help="random seed: the same seed draws the same images")
    demo.add_argument("--force", action="store_true", help="overwrite a non-empty folder")
    demo.set_defaults(func=_handler("carclf.data.demo:cli_demo"))

    def selection(p):
        p.add_argument("path", help="ImageFolder tree: one folder per class")
        p.add_argument("--classes", nargs="+", help="keep only these classes (default: all)")
        p.add_argument("--top-k", type=int, help="keep the K most frequent classes (default: all)")
        p.add_argument("--min-images", type=int, default=5, help="leave out classes with fewer images")
        p.add_argument("--cache-dir", help="cache folder for the file-hash index "
                       "(default: CARCLF_CACHE_DIR, else ~/.cache/carclf)")

    stats = _add_parser(dsub, "stats", help="class table, duplicates, skipped files and the class-frequency figure")
    selection(stats)
    stats.add_argument("--figure", help="PNG path for the class-frequency chart (default: class_frequency.png)")
    stats.set_defaults(func=_handler("carclf.data.prepare:cli_stats"))

    split = _add_parser(dsub, "split", help="stratified, duplicate-aware train/val/test split saved as a manifest")
    selection(split)
    split.add_argument("--out", required=True, help="manifest path (.parquet)")
    split.add_argument("--fractions", nargs=3, type=float, default=[0.7, 0.1, 0.2], metavar=("TRAIN", "VAL", "TEST"),
                       help="shares of the images in train, validation and test (they sum to 1)")
    split.add_argument("--seed", type=int, default=0, help="split seed: the same seed gives the same split")
    split.set_defaults(func=_handler("carclf.data.prepare:cli_split"))


def _add_train(sub) -> None:
    p = _add_parser(sub, "train", help="one tracked training run (network or SVM on CNN features)",
                    description="One tracked run from a run config. Try: carclf train --config examples/run_svm.yaml "
                                "--set data.path=demo_data --set data.image_size=96 (the demo data, about a minute)")
    p.add_argument("--config", help="run config YAML, e.g. examples/run_svm.yaml or examples/run_cnn.yaml "
                                    "(no default: it says what to train, on which data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.lr=0.01 (repeatable; default: none)")
    p.set_defaults(func=_handler("carclf.experiment:cli_train"))


def _add_rank(sub) -> None:
    p = _add_parser(sub, "rank", help="score feature backbones on a data set before training on them (LogME)",
                    description="LogME (You et al., ICML 2021) of each backbone's train-split features, best first. "
                                "Try: carclf rank demo_data --backbones mobilenet_v2,simple_cnn --image-size 96")
    p.add_argument("data", help="ImageFolder tree: one folder per class")
    p.add_argument("--backbones", required=True, help="comma-separated names svm.backbone accepts, e.g. "
                   "mobilenet_v2,resnet18 (no default)")
    p.add_argument("--image-size", type=int, help="image side in pixels (default: the config's data.image_size, 224)")
    p.add_argument("--config", help="run config YAML for the data selection, split and balancing (default: none)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set svm.backbone_weights=none (repeatable; default: none)")
    p.set_defaults(func=_handler("carclf.training.rank:cli_rank"))


def _add_sweep(sub) -> None:
    p = _add_parser(sub, "sweep", help="run a Ray Tune + Optuna sweep, every trial tracked in MLflow")
    p.add_argument("file", help="sweep definition YAML (see sweeps/)")
    p.add_argument("--name", help="sweep name (default: the file's stem)")
    p.add_argument("--address", help="Ray cluster: 'auto' or ray://HOST:10001 (default: local Ray)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep of the same name")
    p.add_argument("--storage-path", help="Ray Tune storage, shared by all nodes on a cluster "
                   "(default: results/<name>/ray)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or sqlite at the project root)")
    p.add_argument("--warm-start", metavar="SWEEP",
                   help="an earlier sweep whose best configurations per family are this sweep's first trials "
                   "(default: none, a fresh search)")
    p.add_argument("--top", type=int, default=1, help="with --warm-start: configurations per family")
    p.set_defaults(func=_handler("sweeps.run.runner:cli_sweep"))


def _add_analyze(sub) -> None:
    p = _add_parser(sub, "analyze", help="hyperparameter importance, optimisation history, parallel coordinates, "
                                       "slices and the Pareto front of a sweep (finished, running or interrupted)")
    p.add_argument("sweep", help="sweep name or its results folder")
    p.set_defaults(func=_handler("sweeps.analysis.explain:cli_analyze"))


def _add_report(sub) -> None:
    p = _add_parser(sub, "report", help="retest the best configuration per model on the test split and compare")
    p.add_argument("sweep", help="sweep name or its results folder")
    p.add_argument("--seeds", type=int, default=3, help="retraining seeds per model")
    p.add_argument("--out", help="output folder (default: results/<sweep>/report)")
    p.set_defaults(func=_handler("carclf.report:cli_report"))


def _add_promote(sub) -> None:
    p = _add_parser(sub, "promote", help="register each retested family and the report's winner (carclf-best); "
                    "move an alias only to a better model")
    p.add_argument("sweep", help="sweep name or its results folder (after `carclf report`)")
    p.add_argument("--model", help="model family to promote (default: every family in the report)")
    p.add_argument("--alias", default="champion", help="registry alias that marks the best version")
    p.add_argument("--force", action="store_true", help="move the alias even if the new version is not better")
    p.add_argument("--metric", help="the figure that decides (default: the sweep's first objective, on the test split); "
                   "e.g. test_accuracy, or infer_ms_per_img / size_mb (lower is better)")
    p.set_defaults(func=_handler("carclf.serving.promote:cli_promote"))


def _add_predict(sub) -> None:
    p = _add_parser(sub, "predict", help="predict car models for images with a registered or logged model")
    p.add_argument("model_uri", help="e.g. models:/carclf-best@champion or models:/carclf-svm_rbf@champion "
                   "(both exist after the quickstart and `carclf promote quickstart`), or runs:/RUN_ID/model")
    p.add_argument("paths", nargs="+", help="image files or folders")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image, most likely first")
    p.add_argument("--out", help="also write the predictions as CSV to this file (default: print only)")
    p.add_argument("--tracking-uri", help="MLflow store holding the model (default: MLFLOW_TRACKING_URI or sqlite at the project root)")
    p.set_defaults(func=_handler("carclf.serving.predict:cli_predict"))


def _add_tracking(sub) -> None:
    ui = _add_parser(sub, "ui", help="open the MLflow UI on the project's database (127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1")
    ui.add_argument("--backend-store-uri", help="default: the project's tracking URI")
    ui.set_defaults(func=_handler("carclf.tracking.runs:cli_ui"))

    srv = _add_parser(sub, "server", help="run an MLflow tracking server for a Ray cluster")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines")
    srv.add_argument("--port", type=int, default=5000, help="port to listen on")
    srv.add_argument("--backend-store-uri", help="sqlite:////abs/mlflow.db or postgresql://... (default: project sqlite)")
    srv.add_argument("--artifacts-destination", help="where the server stores artifacts (default: <project>/mlartifacts)")
    srv.add_argument("--allowed-hosts", help="comma-separated Host values the server accepts (default with a "
                     "non-loopback --host: this machine's names, with and without the port, and localhost)")
    srv.add_argument("--cors-allowed-origins", help="comma-separated origins allowed to change data from a browser "
                     "(default with a non-loopback --host: the URL it prints)")
    srv.add_argument("--basic-auth", action="store_true", help="MLflow's basic-auth app: users and passwords "
                     "(needs mlflow[auth] and MLFLOW_FLASK_SERVER_SECRET_KEY; see README.md)")
    srv.set_defaults(func=_handler("carclf.tracking.server:cli_server"))


def _add_models(sub) -> None:
    p = _add_parser(sub, "models", help="list the models and backbones that can be named: carclf's own, "
                    "torchvision/<model>, timm/<model>.<tag>; 'offline' marks weights already on this machine")
    p.add_argument("--filter", default=None, help="only names containing this text (or matching a glob, e.g. "
                   "'timm/convnext*'); default: every name")
    p.set_defaults(func=_handler("carclf.models.catalog:cli_models"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="carclf", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_data, _add_train, _add_rank, _add_sweep, _add_analyze, _add_report, _add_promote, _add_predict,
                _add_models, _add_tracking):
        add(sub)
    return parser


def quiet_mlflow(environ=os.environ) -> None:
    """Turn MLflow's artifact progress bars and run links off, unless the user set those variables."""
    for key, value in QUIET_MLFLOW.items():
        environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_mlflow()
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    try:
        result = args.func(args)
    except CarclfError as e:
        print(f"carclf: error: {redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("carclf: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
