"""Build a sweep's report: select, retest, compare, render, write the files and the 'report' MLflow run.

    result = build_report("quickstart", seeds=3)   # results/quickstart/report/, and `carclf report quickstart`

The report run is linked to the sweep's parent run by a tag, not nested under it; each retest is
a child of the report run. Anything left out of the comparison (an interrupted sweep, trials
stopped early or failed, a family without a finished trial, a failed retest) is said in the
report. Every file is written atomically.
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from carclf.core.console import fit_table, wrapped
from carclf.core.errors import DataError, SweepError
from carclf.core.files import USER_FILE_MODE, atomic_path, check_can_create
from carclf.report.analysis import analysis_section, load_analysis
from carclf.report.backbones import backbone_ranking, backbone_section
from carclf.report.chance import RATE_METRIC, below_majority, majority_rate
from carclf.report.compare import (
    TABLE_METRICS,
    comparison_table,
    confused_pairs_table,
    mcnemar_table,
    per_class_f1_table,
    ranking_metric,
    split_counts_table,
    winner,
    winner_sentence,
)
from carclf.report.edges import edge_lines, edge_section, load_edge_warnings
from carclf.report.gain import RULE as GAIN_RULE
from carclf.report.gain import (
    TuningPair,
    default_retests,
    default_trials,
    defaults_summary,
    gain_metrics,
    gain_problems,
    gain_records,
    gain_section,
    gain_sentences,
    gain_table,
    retest_defaults,
)
from carclf.report.render import (
    CONFUSION_PREFIX,
    REGISTERED_COLUMN,
    _with_intervals,
    chooser_header,
    figure_png,
    render_html,
    report_figures,
)
from carclf.report.retest import (
    REPRESENTATIVE_TAG,
    RETEST_SEEDS_TAG,
    TEST_HASH_TAG,
    FamilyRetest,
    check_same_test_split,
    retest_trial,
    run_manifest,
    run_test_hash,
)
from carclf.report.selection import (
    ROLE_TAG,
    SWEEP_TAG,
    SweepInfo,
    parent_run,
    resolve_sweep,
    select_best,
    sweep_client,
    trial_runs,
    unfinished,
)
from carclf.tracking.browse import ui_heading, ui_path, ui_url

log = logging.getLogger(__name__)

SWEEP_PARENT_TAG = "carclf.sweep_parent_run_id"
PARENT_BEST_TAG = "carclf.best_model"  # on the sweep's parent run: the report's winner once there is a report
PARENT_BEST_BY_TAG = "carclf.best_model_chosen_by"
WINNER_TAG = "carclf.winner"  # on the report run: the family the report names best (what promote marks)
REPORT_FILES = {
    "table_csv": "comparison.csv", "table_parquet": "comparison.parquet", "mcnemar": "mcnemar.csv",
    "per_class": "per_class_f1.csv", "confused": "confused_pairs.csv", "status": "trials_not_finished.csv",
    "split_counts": "split_counts.csv", "gain": "tuning_gain.csv", "bars": "metrics.png",
    "class_frequency": "class_frequency.png",
    "pareto": "pareto.png", "html": "report.html", "summary": "report.json",
}  # plus one confusion_<family>.png per family


def report_file_name(key: str) -> str:
    """The file a report output is written to: REPORT_FILES, or `confusion_<family>.png`."""
    if key in REPORT_FILES:
        return REPORT_FILES[key]
    if key.startswith(CONFUSION_PREFIX):
        return f"{key}.png"
    raise KeyError(f"no report file for {key!r}")


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path, mode=USER_FILE_MODE) as tmp:  # a report is for sharing: the umask decides, as for any file
        write(str(tmp))


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
        path = out_dir / report_file_name(key)
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
    problems: list[str]  # failures and an interrupted sweep: warnings
    files: dict[str, Path]
    winner: dict[str, Any] | None = None  # compare.winner: the best family, its interval, the runner-up
    remarks: list[str] = field(default_factory=list)  # expected events worth saying (early stops)
    gain: pd.DataFrame = field(default_factory=pd.DataFrame)  # gain.gain_table: best against default, per family
    pairs: list[TuningPair] = field(default_factory=list)  # each family's best and default retests
    edge_warnings: list[dict[str, Any]] = field(default_factory=list)  # the sweep's edge_warnings.json
    below_majority: list[str] = field(default_factory=list)  # families that do not beat the majority-class rate


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


def _remarks(info: SweepInfo, trials: pd.DataFrame) -> list[str]:
    """What went as designed but is worth saying: trials the scheduler stopped early are no candidates."""
    left = unfinished(trials, info.metric)
    stopped = int((left["status"] == "STOPPED_EARLY").sum())
    if not stopped:
        return []
    return [f"Stopped early by the scheduler: {stopped} of {len(trials)} trials (ASHA ends a trial whose validation "
            "curve trails the others at a checkpoint, to spend the time on better ones); they are not candidates."]


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
    _check_out_dir(out_dir, given=out is not None)
    report_run_id = _start_report_run(client, info, seeds)
    try:
        result = _report_body(client, info, trials, best, report_run_id, seeds, out_dir, n_boot, progress)
    except BaseException as e:
        client.set_tag(report_run_id, "carclf.error", f"{type(e).__name__}: {e}"[:5000])
        client.set_terminated(report_run_id, status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(report_run_id, status="FINISHED")
    return result


def _check_out_dir(out_dir: Path, *, given: bool) -> None:
    """The report's folder can be written, checked before any retest (by making a file there, as root may not)."""

    what, hint = ("--out", "pick another --out") if given else ("the report folder", "pass --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"cannot write {what} {out_dir}: it is a file; the report needs a folder ({hint})")
    check_can_create(out_dir / "report.html", what, hint)


def _check_trials_share_test_split(client, chosen: pd.DataFrame) -> None:
    """Fail before any retraining if the chosen trials (best and default ones) were tested on different images."""
    hashes = {(row["model"], row["trial_id"]): run_test_hash(client, row["run_id"]) for _, row in chosen.iterrows()}
    if len(set(hashes.values())) > 1:
        shown = ", ".join(f"{m} trial {t}: {h[:12]}" for (m, t), h in sorted(hashes.items()))
        raise SweepError(f"the chosen trials were tested on different images ({shown}); "
                         "models can only be compared on one test split")


def _report_body(client, info, trials, best, report_run_id, seeds, out_dir, n_boot, progress) -> ReportResult:
    defaults = default_trials(client, info, trials)
    _check_trials_share_test_split(client, pd.concat([best, defaults], ignore_index=True))
    experiment = _experiment_name(client, info)
    families = [retest_trial(client, info, trial, seeds=seeds, report_run_id=report_run_id, experiment=experiment,
                             progress=progress) for _, trial in best.iterrows()]
    pairs = retest_defaults(client, info, defaults, families, seeds=seeds, report_run_id=report_run_id,
                            experiment=experiment, progress=progress)
    test_hash = check_same_test_split(families + default_retests(pairs))
    _tag_retests(client, families + default_retests(pairs), test_hash)
    problems = _problems(info, trials, best, families, parent_run(client, info).info.status) + gain_problems(pairs)
    if not any(f.runs for f in families):
        raise SweepError(f"sweep {info.name!r}: every retest failed: " + "; ".join(problems))
    return _write_report(client, info, trials, families, pairs, report_run_id, out_dir, n_boot, test_hash, problems,
                         seeds)


def _experiment_name(client, info: SweepInfo) -> str:
    return client.get_experiment(parent_run(client, info).info.experiment_id).name


def _tag_retests(client, families: list[FamilyRetest], test_hash: str) -> None:
    for f in families:
        for r in f.runs:
            client.set_tag(r.run_id, TEST_HASH_TAG, test_hash)
            client.set_tag(r.run_id, REPRESENTATIVE_TAG, str(r is f.representative).lower())
            client.set_tag(r.run_id, RETEST_SEEDS_TAG, str(len(f.runs)))


def _write_report(client, info, trials, families, pairs, report_run_id, out_dir, n_boot, test_hash, problems,
                  seeds) -> ReportResult:
    table = _with_registered(comparison_table(families, info.metric, n_boot=n_boot), families)
    mcn = mcnemar_table(families)
    per_class, confused = per_class_f1_table(families), confused_pairs_table(families)
    not_finished = unfinished(trials, info.metric)
    split_counts = _split_counts(client, families)
    best, remarks = winner(table, mcn, info.metric, info.mode), _remarks(info, trials)
    gain = gain_table(pairs, best, info.metric, info.mode, n_boot=n_boot)
    edges = load_edge_warnings(client, info)
    figures = {k: figure_png(fig) for k, fig in report_figures(families, table, split_counts).items()}
    search, search_figures = analysis_section(load_analysis(client, info), families, info)
    ranking = backbone_ranking(client, info, trials)  # the sweep's LogME of its searched backbones, if it ranked any
    figures.update(search_figures)
    first = next(r for f in families for r in f.runs)
    n_test, rate = len(first.y_true), majority_rate(first.y_true, first.classes)
    chance = below_majority(dict(zip(table["model"], table["test_accuracy"])), rate,
                            what="test accuracy (mean over seeds)")
    notes = {"created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seeds": seeds,
             "n_test": n_test, "test_hash": test_hash, "n_boot": n_boot, "report_run_id": report_run_id}
    page = render_html(info=info, table=table, mcnemar=mcn, per_class=per_class, confused=confused,
                       not_finished=not_finished, problems=problems, figures_png=figures, notes=notes,
                       winner=best, remarks=remarks, sections=[backbone_section(ranking), search],
                       top_sections=[_chance_section(chance), gain_section(gain, info.metric), edge_section(edges)])
    summary = {**_summary(info, families, report_run_id, test_hash, problems, seeds), "winner": best,
               "remarks": remarks, "tuning_gain": gain_records(gain), "defaults": defaults_summary(pairs),
               "edge_warnings": edges, "majority_class_rate": rate.rate, "below_majority": chance,
               "backbone_ranking": ranking.summary() if ranking else None}
    files = write_outputs(out_dir, {"table_csv": table, "table_parquet": table, "mcnemar": mcn, "per_class": per_class,
                                    "confused": confused, "status": not_finished, "split_counts": split_counts,
                                    "gain": gain, **figures, "html": page, "summary": summary})
    for path in files.values():
        client.log_artifact(report_run_id, str(path), "report")
    _log_report_metrics(client, report_run_id, table, gain)
    client.log_metric(report_run_id, RATE_METRIC, rate.rate)
    if best is not None:
        client.set_tag(report_run_id, WINNER_TAG, best["model"])
        _name_parent_best(client, info, best)
    client.set_tag(report_run_id, "mlflow.note.content", " ".join([winner_sentence(best), *gain_sentences(gain)]))
    return ReportResult(info, report_run_id, out_dir, table, mcn, families, problems, files, best, remarks, gain,
                        pairs, edges, chance)


def _chance_section(warnings: list[str]) -> str:
    return "".join(f"<p class='warn'>Warning: {html.escape(w)}.</p>" for w in warnings)


def _with_registered(table: pd.DataFrame, families: list[FamilyRetest]) -> pd.DataFrame:
    """The table with the representative run's own test accuracy and macro-F1: the figures of the model
    `carclf promote` registers (the table's other figures are means over seeds)."""
    reps = {f.model: f.representative.test_metrics for f in families if f.runs}
    for name in ("accuracy", "f1_macro"):
        table[f"registered_test_{name}"] = [float(reps[m].get(name, math.nan)) for m in table["model"]]
    return table


def _name_parent_best(client, info, best: dict[str, Any]) -> None:
    """The sweep's parent run names the report's winner as its best model, for the same reason (validation over
    the retests' seeds), replacing the running best the sweep tagged from single trials."""
    try:
        client.set_tag(info.parent_run_id, PARENT_BEST_TAG, best["model"])
        client.set_tag(info.parent_run_id, PARENT_BEST_BY_TAG, f"{best['chosen_by']} (carclf report)")
    except Exception as e:  # noqa: BLE001 - the report stands without the parent's tag
        log.warning("could not name the winner on the sweep's parent run %s: %s", info.parent_run_id, e)


def _split_counts(client, families: list[FamilyRetest]) -> pd.DataFrame:
    """Images per class and split, from the first retested family's manifest (every retest shares the test
    split), and the training split after each family's balancing."""
    done = [f for f in families if f.runs]
    manifest = run_manifest(client, done[0].representative.run_id)
    return split_counts_table(manifest, {f.model: f.config for f in done})


def _summary(info, families, report_run_id, test_hash, problems, seeds) -> dict[str, Any]:
    return {"sweep": info.name, "sweep_parent_run_id": info.parent_run_id, "report_run_id": report_run_id,
            "tracking_uri": info.tracking_uri, "metric": info.metric, "mode": info.mode, "seeds": seeds,
            "test_manifest_hash": test_hash, "representative": "first successful seed (the trial's own seed)",
            "problems": problems,
            "models": {f.model: {"trial_run_id": f.trial_run_id, "val_metric": f.val_metric,
                                 "representative_run_id": f.representative.run_id if f.runs else None,
                                 "retest_run_ids": [r.run_id for r in f.runs], "errors": f.errors,
                                 "deterministic": f.deterministic}
                       for f in families}}


def _log_report_metrics(client, run_id: str, table: pd.DataFrame, gain: pd.DataFrame) -> None:
    for _, row in table.iterrows():
        for m in TABLE_METRICS:
            value = row[f"test_{m}"]
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(run_id, f"{row['model']}.test_{m}", value)
    for key, value in gain_metrics(gain).items():
        client.log_metric(run_id, key, value)


def console_table(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The comparison for the terminal: the ranking metric with its interval first, the configuration
    last (wrapped by carclf.core.console); report.html and comparison.csv hold every column."""
    shown = _with_intervals(table, metric)
    first = f"test {ranking_metric(metric)}"
    order = ["model", metric, chooser_header(metric), "seeds", first,
             *[c for c in shown.columns if c.startswith("test ") and c != first], REGISTERED_COLUMN, "train s", "infer ms/img", "params", "size MB", "configuration"]
    return shown[[c for c in order if c in shown.columns]]


def cli_report(args) -> int:
    result = build_report(args.sweep, seeds=args.seeds, out=args.out, progress=True)
    metric = result.info.metric
    shown = console_table(result.table, metric)
    kept = ("model", chooser_header(metric), "seeds", f"test {ranking_metric(metric)}", "configuration")
    optional = [c for c in shown.columns if c not in kept]  # left out last first when the terminal is narrow
    print(fit_table(shown, wrap="configuration", optional=optional))
    if len(result.mcnemar):
        print("\nMcNemar (each family's first seed, the model promote registers; Holm-adjusted):")
        print(fit_table(result.mcnemar[["model_a", "model_b", "accuracy_a_first_seed", "accuracy_b_first_seed",
                                        "only_a_right", "only_b_right", "p_holm", "significant"]]))
    print()
    rule = [f"tuning gain: {GAIN_RULE}"] if not result.gain.empty else []
    for text in [winner_sentence(result.winner), *rule, *gain_sentences(result.gain),
                 *(f"note: {r}" for r in result.remarks),
                 *(f"warning: {w}" for w in result.below_majority), *(f"warning: {p}" for p in result.problems),
                 *(f"warning: search range: {m}" for m in edge_lines(result.edge_warnings))]:
        print(wrapped(text))
    uri = result.info.tracking_uri
    experiment_id = sweep_client(result.info).get_run(result.report_run_id).info.experiment_id
    print(f"\nreport: {result.files['html']}")
    print(f"{ui_heading(uri)}\n  the report run: {ui_url(uri, ui_path(experiment_id, run_id=result.report_run_id))}")
    print(f"next: carclf promote {result.info.name}   (registers each family and marks the winner)")
    return 0
