"""Register the retested models of a sweep, mark the report's winner, and move an alias only to a better model.

    carclf promote quickstart                       # every family in the latest report, and the winner
    carclf promote quickstart --model svm --force   # move carclf-svm@champion regardless

One registered model per family (`carclf-svm`, `carclf-vgg16`, ...). A family is the sweep's
model entry: a sweep with `svm_linear` and `svm_rbf` entries registers `carclf-svm_linear` and
`carclf-svm_rbf`. The registered version is the family's representative retest run from the
latest finished `carclf report` of the sweep (role `retest`: the retests of default configurations,
role `retest_default`, are never registered). The alias (default `champion`; aliases, not the
deprecated stages) moves to it only if it beats the current holder on the same test split
(equal test-manifest hashes) by the test counterpart of the sweep's selection metric (the first
objective of a multi-objective sweep), or by another figure the versions carry (`--metric`, e.g.
`infer_ms_per_img` or `size_mb`, lower is better); `--force` moves it anyway.

The family the report names the winner is also registered as a version of `carclf-best`, whose
alias follows the same rule: `models:/carclf-best@champion` is the best model promoted so far,
whatever its family. The figure compared is the registered model's own test figure (the trial's
seed); the report's mean over seeds is printed beside it and kept as a version tag.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from urllib.parse import urlencode

from mlflow.exceptions import MlflowException

from carclf.core.errors import SweepError, TrackingError
from carclf.report import (
    MODEL_TAG,
    REPRESENTATIVE_TAG,
    RETEST_SEEDS_TAG,
    ROLE_TAG,
    SOURCE_TRIAL_TAG,
    SWEEP_TAG,
    TEST_HASH_TAG,
    WINNER_TAG,
    SweepInfo,
    chosen_configuration,
    family_of,
    parent_run,
    ranking_metric,
    resolve_sweep,
    run_manifest,
    sweep_client,
    sweep_uri,
    trial_config,
)
from carclf.report.chance import below_majority, majority_from_labels
from carclf.tracking.browse import WORKFLOW_PARAM, ui_heading, ui_url

log = logging.getLogger(__name__)

REGISTERED_PREFIX = "carclf-"
BEST_MODEL = "carclf-best"  # the report's winner, whatever its family
TAG_PREFIX = "carclf."
# Figures copied onto each version, so the registry alone can compare versions: test metrics (higher is
# better) and costs (lower is better: inference per image on the validation split, model size).
VERSION_METRICS = ("test_accuracy", "test_precision_macro", "test_recall_macro", "test_f1_macro", "infer_ms_per_img",
                   "size_mb")
COST_METRICS = ("infer_ms_per_img", "size_mb")


def registered_name(model: str) -> str:
    return f"{REGISTERED_PREFIX}{model}"


def matching_test_metric(metric: str) -> str:
    """The test figure that matches a validation selection metric: val_f1_macro -> test_f1_macro."""
    return "test_" + metric[len("val_"):] if metric.startswith("val_") else f"test_{metric}"


def comparison(info: SweepInfo, metric: str | None) -> tuple[str, str]:
    """(figure, mode) that decides between versions: the sweep's selection metric on the test split by default."""
    if metric is None:
        return matching_test_metric(info.metric), info.mode
    if metric not in VERSION_METRICS:
        raise SweepError(f"--metric {metric!r}: versions carry {', '.join(VERSION_METRICS)}")
    return metric, "min" if metric in COST_METRICS else "max"


def latest_report_run(client, info: SweepInfo):
    """The newest FINISHED report run of the sweep; SweepError telling to run `carclf report` if none."""
    experiment_id = parent_run(client, info).info.experiment_id
    query = (f"tags.`{ROLE_TAG}` = 'report' and tags.`{SWEEP_TAG}` = '{info.name}' "
             "and attributes.status = 'FINISHED'")
    runs = client.search_runs([experiment_id], filter_string=query, max_results=1,
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise SweepError(f"sweep {info.name!r} has no finished report: run `carclf report {info.name}` first")
    return runs[0]


def representative_runs(client, report_run, model: str | None = None) -> list:
    """The report's representative retest run per family (optionally one family)."""
    query = (f"tags.mlflow.parentRunId = '{report_run.info.run_id}' and tags.`{ROLE_TAG}` = 'retest' "
             f"and tags.`{REPRESENTATIVE_TAG}` = 'true'")
    runs = client.search_runs([report_run.info.experiment_id], filter_string=query, max_results=1000)
    by_model = {family_of(r.data.tags): r for r in runs}
    if model is None:
        if not by_model:
            raise SweepError(f"report run {report_run.info.run_id} holds no retested model; run `carclf report` again")
        return [by_model[m] for m in sorted(by_model)]
    if model not in by_model:
        raise SweepError(f"model {model!r} is not in report run {report_run.info.run_id}; "
                         f"retested: {', '.join(sorted(by_model)) or 'none'}")
    return [by_model[model]]


def version_tags(info: SweepInfo, run, report_run, client) -> dict[str, str]:
    """Tags for a registered version: where it came from (sweep, family, trial, the retest's seed), its own
    test figures on which split, and the report's means over seeds of the same figures (`..._seed_mean`)."""
    model = family_of(run.data.tags)
    trial_run_id = run.data.tags.get(SOURCE_TRIAL_TAG, "")
    tags = {f"{TAG_PREFIX}sweep": info.name, f"{TAG_PREFIX}family": model,
            f"{TAG_PREFIX}model": run.data.tags.get(MODEL_TAG, model),
            f"{TAG_PREFIX}report_run_id": report_run.info.run_id,
            f"{TAG_PREFIX}trial_run_id": trial_run_id,
            f"{TAG_PREFIX}trial_id": _trial_id(client, trial_run_id),
            f"{TAG_PREFIX}retest_seed": run.data.params.get("seed", ""),
            f"{TAG_PREFIX}retest_seeds": run.data.tags.get(RETEST_SEEDS_TAG) or report_run.data.params.get("seeds", ""),
            f"{TAG_PREFIX}test_manifest_hash": run.data.tags.get(TEST_HASH_TAG, ""),
            f"{TAG_PREFIX}selection_metric": info.metric,
            f"{TAG_PREFIX}configuration": chosen_configuration(trial_config(client, run.info.run_id))}
    for key in VERSION_METRICS:
        if key in run.data.metrics:
            tags[f"{TAG_PREFIX}{key}"] = repr(float(run.data.metrics[key]))
        seed_mean = report_run.data.metrics.get(f"{model}.{key}")
        if seed_mean is not None:
            tags[f"{TAG_PREFIX}{key}_seed_mean"] = repr(float(seed_mean))
    return tags


def _trial_id(client, trial_run_id: str) -> str:
    """The sweep's name for the trial (its Tune trial id), from the trial's run; '' if that run is gone."""

    try:
        return client.get_run(trial_run_id).data.tags.get("carclf.trial_id", "") if trial_run_id else ""
    except MlflowException:
        return ""


def version_description(tags: dict[str, str]) -> str:
    """The version's description on the registry page: whose model it is and which figure is whose."""
    t = {k[len(TAG_PREFIX):]: v for k, v in tags.items() if k.startswith(TAG_PREFIX)}

    def figures(suffix: str) -> str:
        shown = [f"{key[len('test_'):]} {float(t[key + suffix]):.4f}" for key in VERSION_METRICS
                 if key.startswith("test_") and t.get(key + suffix)]
        return ", ".join(shown) or "none"

    trial = f"trial {t['trial_id']} (run {t['trial_run_id']})" if t.get("trial_id") else f"trial run {t['trial_run_id']}"
    seeds = t.get("retest_seeds") or "?"
    mean = (f" The report's mean over its {seeds} seeds: {figures('_seed_mean')}." if seeds != "1"
            else " Retested once (no seed changes its training): the report's figures are this model's.")
    return (f"Family {t['family']} of sweep {t['sweep']}, {trial}: its configuration, chosen by "
            f"{t['selection_metric']} on the validation split ({t['configuration']}). This version is the report's "
            f"retest with seed {t.get('retest_seed') or '?'} (report run {t['report_run_id']}); its own test figures: "
            f"{figures('')}.{mean}")


def register(client, uri: str, run, tags: dict[str, str], name: str | None = None):
    """The registry version for the run's model under `name` (default: its family's registered model):
    reused if this run is registered there already, else new. `uri` is the registry's store (the client's)."""
    name = name or registered_name(family_of(run.data.tags))
    existing = [v for v in _versions(client, name) if v.run_id == run.info.run_id]
    if existing:
        if not existing[0].description:  # registered before versions carried one
            client.update_model_version(name, existing[0].version, description=version_description(tags))
        return existing[0], False
    _ensure_registered_model(client, name)
    source = logged_model_uri(client, run.info.run_id)
    version = client.create_model_version(name, source, run_id=run.info.run_id, tags=tags,
                                          model_id=source[len("models:/"):], description=version_description(tags))
    return client.get_model_version(name, version.version), True


def _ensure_registered_model(client, name: str) -> None:
    what = ("the model a carclf report named the winner, whatever its family; @champion follows the best"
            if name == BEST_MODEL else f"carclf model family {name[len(REGISTERED_PREFIX):]}")
    try:
        client.create_registered_model(name, description=f"{what} (registered by `carclf promote`)")
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def logged_model_uri(client, run_id: str) -> str:
    """`models:/<model id>` of the model the run logged (MLflow 3 keeps models apart from run artifacts)."""
    outputs = client.get_run(run_id).outputs
    model_ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    if not model_ids:
        raise TrackingError(f"run {run_id} logged no model; run `carclf report` again with model logging on")
    return f"models:/{model_ids[-1]}"


def _versions(client, name: str) -> list:
    try:
        return list(client.search_model_versions(f"name = '{name}'"))
    except MlflowException:
        return []


def current_holder(client, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass
class PromoteOutcome:
    name: str
    version: str
    registered_new: bool
    alias: str
    moved: bool
    new_value: float  # the registered model's own test figure (the trial's seed): what the alias rule compares
    old_version: str | None
    old_value: float | None
    reason: str
    seed_mean: float | None = None  # the report's mean of the same figure over its seeds
    seeds: int | None = None
    family: str | None = None  # for carclf-best: the winning family
    seed: str = ""  # the retest's seed: this version's
    warning: str = ""  # e.g. its test accuracy does not beat the majority-class rate of the test split

    def line(self, metric: str) -> str:
        mean = (f"; the report's mean over {self.seeds} seeds {_show(self.seed_mean)}"
                if self.seed_mean is not None and not math.isnan(self.seed_mean) and self.seeds != 1 else "")
        whose = f"this version, the retest with seed {self.seed}" if self.seed else "this version"
        what = f" = the report's winner, {self.family}" if self.family else ""
        old = (f"{self.alias} was v{self.old_version} ({metric} {_show(self.old_value)})"
               if self.old_version else f"no {self.alias} yet")
        verb = f"@{self.alias} moved here" if self.moved else f"@{self.alias} kept"
        return (f"{self.name} v{self.version}{what}: {metric} {_show(self.new_value)} ({whose}{mean}); "
                f"{old}: {verb} ({self.reason})")


def _show(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def _tag_float(version, key: str) -> float:
    try:
        return float(version.tags.get(key, "nan"))
    except ValueError:
        return float("nan")


def decide(new, old, *, metric: str, mode: str, force: bool) -> tuple[bool, str]:
    """(move the alias?, why) for a new version against the current holder (None if there is none)."""
    if old is None:
        return True, "first holder"
    if old.version == new.version:
        return False, "already the holder"
    if force:
        return True, "--force"
    key = f"{TAG_PREFIX}{metric}"
    hash_key = f"{TAG_PREFIX}test_manifest_hash"
    new_hash, old_hash = new.tags.get(hash_key), old.tags.get(hash_key)
    if not new_hash or new_hash != old_hash:
        return False, "tested on a different test split; use --force to move it anyway"
    new_value, old_value = _tag_float(new, key), _tag_float(old, key)
    if math.isnan(new_value):
        return False, f"the new version has no {metric}"
    if math.isnan(old_value):
        return True, f"the holder has no {metric}"
    better = new_value > old_value if mode == "max" else new_value < old_value
    return (True, "better on the same test split") if better else \
        (False, "not better on the same test split; use --force to move it anyway")


def promote(sweep: str, *, model: str | None = None, alias: str = "champion", force: bool = False,
            metric: str | None = None) -> list[PromoteOutcome]:
    """Register each retested family of the sweep's latest report, and the report's winner as a version of
    carclf-best; move `alias` where it is earned.

    `metric`: the figure that decides (one of VERSION_METRICS); default the sweep's first objective on test.
    """
    if not alias or (alias.lower().startswith("v") and alias[1:].isdigit()) or alias.lower() == "latest":
        raise SweepError(f"alias {alias!r} is reserved by MLflow (v<number>, latest); pick another name")
    info = resolve_sweep(sweep)
    client, uri = sweep_client(info), sweep_uri(info)
    metric, mode = comparison(info, metric)
    report_run = latest_report_run(client, info)
    best = report_winner(report_run, info)
    runs = ranked(representative_runs(client, report_run, model), report_run, info, best)
    rate = test_majority_rate(client, runs[0])
    outcomes = []
    for run in runs:
        tags = version_tags(info, run, report_run, client)
        warning = _chance_warning(run, rate)
        for name in (BEST_MODEL, None) if family_of(run.data.tags) == best else (None,):
            outcome = _promote_one(client, uri, run, tags, name, alias=alias, force=force, metric=metric, mode=mode,
                                   report_run=report_run)
            outcome.warning = warning
            outcomes.append(outcome)
    return outcomes


def ranked(runs: list, report_run, info: SweepInfo, best: str | None) -> list:
    """The report's winner first, then the other families by the report's ranking (mean over seeds)."""

    sign = -1.0 if info.mode == "max" else 1.0

    def key(run):
        family = family_of(run.data.tags)
        mean = report_run.data.metrics.get(f"{family}.test_{ranking_metric(info.metric)}", math.nan)
        return family != best, math.isnan(mean), sign * mean if not math.isnan(mean) else 0.0, family

    return sorted(runs, key=key)


def test_majority_rate(client, run):
    """The majority-class rate of the test split the run (and every retest of its report) was tested on."""

    manifest = run_manifest(client, run.info.run_id)
    return majority_from_labels(manifest.loc[manifest["split"] == "test", "class"].tolist())


def _chance_warning(run, rate) -> str:
    accuracy = run.data.metrics.get("test_accuracy", math.nan)
    found = below_majority({family_of(run.data.tags): accuracy}, rate, what="test accuracy (this version)")
    return found[0] if found else ""


def _promote_one(client, uri: str, run, tags: dict[str, str], name: str | None, *, alias: str, force: bool,
                 metric: str, mode: str, report_run) -> PromoteOutcome:
    """Register the run's model (under `name`, default its family's model) and move `alias` if earned."""
    try:
        version, is_new = register(client, uri, run, tags, name)
    except Exception as e:  # noqa: BLE001 - MLflow raises many types; the message names the run
        raise TrackingError(f"cannot register the model of run {run.info.run_id}: {e}") from e
    old = current_holder(client, version.name, alias)
    move, reason = decide(version, old, metric=metric, mode=mode, force=force)
    if move:
        client.set_registered_model_alias(version.name, alias, version.version)
    # the family's own retest count (a deterministic family is retested once); reports before the tag: the requested
    seeds = run.data.tags.get(RETEST_SEEDS_TAG) or report_run.data.params.get("seeds")
    outcome = PromoteOutcome(
        name=version.name, version=str(version.version), registered_new=is_new, alias=alias, moved=move,
        new_value=_tag_float(version, f"{TAG_PREFIX}{metric}"),
        old_version=str(old.version) if old is not None else None,
        old_value=_tag_float(old, f"{TAG_PREFIX}{metric}") if old is not None else None, reason=reason,
        seed_mean=_tag_float(version, f"{TAG_PREFIX}{metric}_seed_mean"), seeds=int(seeds) if seeds else None,
        family=family_of(run.data.tags) if name == BEST_MODEL else None, seed=run.data.params.get("seed", ""))
    log.debug(outcome.line(metric))  # `carclf promote` prints it; a library caller gets the outcome
    return outcome


def report_winner(report_run, info: SweepInfo) -> str | None:
    """The family the report names the winner: its tag, else (a report made before the tag) the family with
    the best seed mean of the ranking metric among the report's metrics."""

    tagged = report_run.data.tags.get(WINNER_TAG)
    if tagged:
        return tagged
    suffix = f".test_{ranking_metric(info.metric)}"
    means = {k[:-len(suffix)]: v for k, v in report_run.data.metrics.items() if k.endswith(suffix)}
    if not means:
        return None
    return (max if info.mode == "max" else min)(sorted(means), key=means.get)


def summary_lines(outcomes: list[PromoteOutcome], alias: str) -> list[str]:
    """What promote did, in a few lines: versions registered, where the alias moved, what to load."""
    new = sum(o.registered_new for o in outcomes)
    moved = [f"{o.name} v{o.version}" for o in outcomes if o.moved]
    kept = [o.name for o in outcomes if not o.moved]
    families = len({o.name for o in outcomes if o.family is None})
    lines = [f"summary: {len(outcomes)} versions of {families} families ({new} new, {len(outcomes) - new} "
             f"registered before); @{alias} moved to {', '.join(moved) or 'none'}"
             + (f"; kept on {', '.join(kept)}" if kept else "")]
    best = next((o for o in outcomes if o.family), None)
    if best is not None:
        holder = best.moved or best.reason == "already the holder"
        lines.append(f"  models:/{BEST_MODEL}@{alias} = v{best.version}, {best.family}: this report's winner" if holder
                     else f"  models:/{BEST_MODEL}@{alias} stays v{best.old_version} (an earlier report's winner); "
                          f"this report's winner, {best.family}, is v{best.version}")
    warned = sorted({o.warning for o in outcomes if o.warning})
    lines += [f"warning: {w}" for w in warned]
    return lines


def cli_promote(args) -> int:
    info = resolve_sweep(args.sweep)
    metric, _ = comparison(info, getattr(args, "metric", None))
    outcomes = promote(args.sweep, model=args.model, alias=args.alias, force=args.force,
                       metric=getattr(args, "metric", None))
    for outcome in outcomes:
        print(outcome.line(metric))
    print()
    for line in summary_lines(outcomes, args.alias):
        print(line)
    print(f"{ui_heading(info.tracking_uri)}\n  the registered models: "
          f"{ui_url(info.tracking_uri, '/#/models?' + urlencode(WORKFLOW_PARAM))}")
    return 0
