"""Tuning gain: each family's retested best configuration against its retested default, on the same test images.

    defaults = default_trials(client, info, trials)       # the trial tagged carclf.baseline=true, per family
    pairs = retest_defaults(client, info, defaults, families, seeds=3, report_run_id=rid, experiment="carclf")
    table = gain_table(pairs, winner, info.metric, info.mode, n_boot=2000)   # a row per family, then 'overall'
    gain_sentences(table)       # 'svm_rbf: tuning gained +0.068 [+0.032, +0.108] accuracy, ..., McNemar p=0.0007'

A family's default configuration is what it runs without search (the sweep's base and the family's
config); its trial run carries `carclf.baseline` = "true" (sweeps made before defaults were run
have none: the family then shows no gain). Its retest follows the best's seed policy (several seeds,
or one when training is deterministic) and is tagged `carclf.role` = `retest_default`, so
`carclf promote`, which registers only `retest` runs, never takes it. When the best trial is the
default trial, the best's retest serves both.

The gain is best minus default: test accuracy and the test counterpart of the selection metric, each
averaged over seeds, with a paired percentile bootstrap interval over test images (a resample draws
the same images for both), and McNemar's exact test on the two representative runs (first seed).
The verdict follows one rule (RULE): the accuracy interval decides, since it rests on every seed and
every test image; McNemar's p is shown beside it, and where it disagrees the sentence says so and why,
so no verdict contradicts the figures next to it. Overall, the report's winner is set against the
best default across families, ranked as the winner is: on validation (the retests' seed mean).
"""

from __future__ import annotations

import html
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from carclf.core import stats
from carclf.report.compare import ranking_metric, retest_val
from carclf.report.render import _html_table
from carclf.report.retest import FamilyRetest, retest_trial
from carclf.report.selection import BASELINE_TAG, ROLE_TAG, parent_run

log = logging.getLogger(__name__)

DEFAULT_ROLE = "retest_default"  # carclf.role of a default configuration's retest runs (best's: 'retest')
OVERALL = "overall"
ALPHA = 0.05
RULE = ("Tuning helped when the 95% interval of the accuracy gain lies above 0, made it worse when it lies below 0, "
        "and made no measurable difference when it includes 0. McNemar's exact test (first seeds only) is shown "
        f"beside it; where its p (below {ALPHA} or not) disagrees with the interval, the sentence says why.")


@dataclass
class TuningPair:
    """A family's retested best and, when there is one, its retested default configuration."""

    model: str
    best: FamilyRetest
    default: FamilyRetest | None = None
    same: bool = False  # the best trial is the default trial: its retest serves both
    missing: str = ""  # why there is nothing to compare with ('' when there is)

    @property
    def comparable(self) -> bool:
        return bool(self.best.runs) and self.default is not None and bool(self.default.runs)


def default_trials(client, info, trials: pd.DataFrame) -> pd.DataFrame:
    """The rows of `trials` (selection.trial_runs) that ran a family's default configuration, one per family:
    the finished one if any, else the first."""
    experiment_id = parent_run(client, info).info.experiment_id
    query = (f"tags.mlflow.parentRunId = '{info.parent_run_id}' and tags.`{ROLE_TAG}` = 'trial' "
             f"and tags.`{BASELINE_TAG}` = 'true'")
    runs = client.search_runs([experiment_id], filter_string=query, max_results=50000)
    ids = {r.data.tags.get("carclf.trial_id", r.info.run_id) for r in runs}
    if trials.empty or not ids:
        return trials.iloc[0:0]
    chosen = trials[trials["trial_id"].astype(str).isin(ids)]
    rank = (chosen["status"] != "FINISHED").astype(int)
    ordered = chosen.assign(_rank=rank).sort_values(["_rank", "start_time"], kind="mergesort")
    return ordered.drop_duplicates("model").drop(columns="_rank").sort_values("model").reset_index(drop=True)


def retest_defaults(client, info, defaults: pd.DataFrame, families: list[FamilyRetest], *, seeds: int,
                    report_run_id: str, experiment: str, progress: bool = False) -> list[TuningPair]:
    """One TuningPair per retested family: its default's retest (role retest_default), or the reason there is none."""
    by_model = {row["model"]: row for _, row in defaults.iterrows()}
    pairs = []
    for best in families:
        row = by_model.get(best.model)
        if not best.runs:
            pairs.append(TuningPair(best.model, best, missing="the best configuration's retest failed"))
        elif row is None:
            pairs.append(TuningPair(best.model, best, missing="the sweep ran no default-configuration trial for it "
                                    "(sweeps made before defaults were run as baselines)"))
        elif row["run_id"] == best.trial_run_id:
            pairs.append(TuningPair(best.model, best, default=best, same=True))
        elif row["status"] not in ("FINISHED", "STOPPED_EARLY"):
            pairs.append(TuningPair(best.model, best, missing=f"its default-configuration trial {row['status']}"))
        else:
            default = retest_trial(client, info, row, seeds=seeds, report_run_id=report_run_id,
                                   experiment=experiment, role=DEFAULT_ROLE, progress=progress)
            reason = "" if default.runs else "the default configuration's retest failed: " + "; ".join(default.errors)
            pairs.append(TuningPair(best.model, best, default=default, missing=reason))
    return pairs


def default_retests(pairs: list[TuningPair]) -> list[FamilyRetest]:
    """The default retests that are runs of their own (not the best's, reused)."""
    return [p.default for p in pairs if p.default is not None and not p.same]


def pair_gain(best: FamilyRetest, default: FamilyRetest, metric: str, *, n_boot: int = 2000,
              level: float = 0.95) -> dict[str, Any]:
    """Best minus default on the same test images: test accuracy and `metric` (a stats.METRICS name), each the
    mean over seeds with its paired bootstrap interval; McNemar's exact test on the representative runs."""
    y, k = best.runs[0].y_true, len(best.runs[0].classes)
    out: dict[str, Any] = {}
    for name in dict.fromkeys(("accuracy", metric)):
        diff = stats.bootstrap_diff_ci(y, best.preds, default.preds, name, n_boot=n_boot, level=level, n_classes=k)
        out.update({f"test_{name}_best": stats.seed_mean_metric(y, best.preds, name, k),
                    f"test_{name}_default": stats.seed_mean_metric(y, default.preds, name, k),
                    f"test_{name}_gain": diff.estimate, f"test_{name}_gain_low": diff.low,
                    f"test_{name}_gain_high": diff.high})
    test = stats.mcnemar(y, best.representative.pred, default.representative.pred)
    out.update(only_best_right=test.a_only, only_default_right=test.b_only, mcnemar_p=test.p_value)
    return out


def verdict(row: dict[str, Any]) -> str:
    """'gain', 'loss', 'no measurable gain' (by RULE: the accuracy interval), or 'default was best'."""
    if row.get("same"):
        return "default was best"
    if row["test_accuracy_gain_low"] > 0:
        return "gain"
    if row["test_accuracy_gain_high"] < 0:
        return "loss"
    return "no measurable gain"


def mcnemar_note(row: dict[str, Any]) -> str:
    """Why McNemar's p disagrees with the verdict ('' when it agrees)."""
    kind, p = verdict(row), row["mcnemar_p"]
    counts = f"{row.get('only_best_right', '?')} against {row.get('only_default_right', '?')}"
    if kind in ("gain", "loss") and not p < ALPHA:
        return (f" McNemar's test does not confirm it on its own (p={p:.2g}): it counts only the test images on "
                f"which the two first seeds answered differently ({counts}), while the interval rests on every "
                "seed and image.")
    if kind == "no measurable gain" and p < ALPHA:
        return (f" McNemar's test on the first seeds alone finds a difference (p={p:.2g}; {counts} images answered "
                "right by one only), which the interval over every seed does not bear out.")
    return ""


def gain_table(pairs: list[TuningPair], winner: dict[str, Any] | None, metric: str, mode: str, *,
               n_boot: int = 2000, level: float = 0.95) -> pd.DataFrame:
    """One row per family (best against its default), then the overall row (the winner against the best default);
    rows without a default carry the reason in `missing` and no figures."""
    name = ranking_metric(metric)
    rows = [_row(p.model, p.best, p.default, p.same, p.missing, name, n_boot, level) for p in pairs]
    overall = _overall(pairs, winner, name, metric, mode, n_boot, level)
    if overall is not None:
        rows.append(overall)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["verdict"] = [verdict(r) if not r["missing"] else "no default" for r in table.to_dict("records")]
        table["sentence"] = [gain_sentence(r, name) for r in table.to_dict("records")]
    return table


def _row(family: str, best: FamilyRetest, default: FamilyRetest | None, same: bool, missing: str, name: str,
         n_boot: int, level: float) -> dict[str, Any]:
    row: dict[str, Any] = {"family": family, "tuned": best.model, "default_of": default.model if default else "",
                           "best_trial_run_id": best.trial_run_id,
                           "default_trial_run_id": default.trial_run_id if default else "", "same": same,
                           "missing": missing, "seeds_best": len(best.runs),
                           "seeds_default": len(default.runs) if default else 0, "val_best": best.val_metric,
                           "val_default": default.val_metric if default else float("nan")}
    if not missing and default is not None and default.runs and best.runs:
        row.update(pair_gain(best, default, name, n_boot=n_boot, level=level))
    return row


def _overall(pairs: list[TuningPair], winner: dict[str, Any] | None, name: str, metric: str, mode: str, n_boot: int,
             level: float) -> dict[str, Any] | None:
    """The winner's retest against the best default across families, ranked as the winner is: on validation."""
    if winner is None:
        return None
    best = next((p.best for p in pairs if p.model == winner["model"] and p.best.runs), None)
    defaults = [p.default for p in pairs if p.comparable]
    if best is None:
        return None
    if not defaults:
        return _row(OVERALL, best, None, False, "no family has a retested default configuration", name, n_boot,
                    level)

    ranked = sorted(defaults, key=lambda f: retest_val(f, metric), reverse=mode != "min")  # stable: ties keep the family order
    default = ranked[0]
    return _row(OVERALL, best, default, default.trial_run_id == best.trial_run_id, "", name, n_boot, level)


def _signed(x: float) -> str:
    return f"{x:+.3f}"


def gain_sentence(row: dict[str, Any], name: str = "f1_macro") -> str:
    """One row of gain_table in words."""
    who = (f"Overall ({row['tuned']}, the winner, against the best default configuration, {row['default_of']}'s)"
           if row["family"] == OVERALL else row["family"])
    if row.get("missing"):
        return f"{who}: no tuning gain shown: {row['missing']}."
    if row.get("same"):
        return (f"{who}: the default was the best configuration (the best trial is the default-configuration trial; "
                f"test accuracy {row['test_accuracy_best']:.3f}): tuning gained nothing over it.")
    acc = (f"{_signed(row['test_accuracy_gain'])} [{_signed(row['test_accuracy_gain_low'])}, "
           f"{_signed(row['test_accuracy_gain_high'])}] accuracy")
    other = (f", {_signed(row[f'test_{name}_gain'])} [{_signed(row[f'test_{name}_gain_low'])}, "
             f"{_signed(row[f'test_{name}_gain_high'])}] {name}" if name != "accuracy" else "")
    figures = f"{acc}{other}, McNemar p={row['mcnemar_p']:.2g}"
    kind, note = verdict(row), mcnemar_note(row)
    if kind == "gain":
        return f"{who}: tuning gained {figures} (tuned {row['test_accuracy_best']:.3f} against default " \
               f"{row['test_accuracy_default']:.3f}).{note}"
    if kind == "loss":
        return f"{who}: tuning made it worse: {figures}.{note}"
    return f"{who}: tuning made no measurable difference (the accuracy interval includes 0): {figures}.{note}"


def gain_sentences(table: pd.DataFrame) -> list[str]:
    return [] if table.empty else table["sentence"].tolist()


def gain_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The gain figures as MLflow metrics of the report run: '<family>.tuning_gain_<metric>[_low|_high]'
    (never '<family>.test_*': those name the retested families)."""
    out = {}
    for row in table.to_dict("records") if not table.empty else []:
        for key, value in row.items():
            if key.startswith("test_") and "_gain" in key and isinstance(value, (float, np.floating)) \
                    and math.isfinite(value):
                metric, _, bound = key[len("test_"):].partition("_gain")
                out[f"{row['family']}.tuning_gain_{metric}{bound}"] = float(value)
    return out


GAIN_COLUMNS = ("family", "default_of", "seeds_best", "seeds_default", "val_best", "val_default")


def gain_section(table: pd.DataFrame, metric: str) -> str:
    """The report's 'Did tuning pay?' section (HTML): the verdicts in words, then the figures."""

    e = html.escape
    head = ("<h2>Did tuning pay? Best against default configuration</h2><p class='note'>Each family's retested best "
            "configuration against its retested default configuration (its trial tagged carclf.baseline), on the same "
            "test images: the gain is best minus default, averaged over seeds, with a paired 95% bootstrap interval "
            f"over test images; McNemar's exact test on the first seeds. {html.escape(RULE)} Overall: the winner "
            "against the best default across families (the best on validation).</p>")
    if table.empty:
        return head + "<p class='note'>(no family retested)</p>"
    name = ranking_metric(metric)
    sentences = "<ul>" + "".join(f"<li>{e(s)}</li>" for s in gain_sentences(table)) + "</ul>"
    shown = table[[c for c in GAIN_COLUMNS if c in table.columns]].copy()
    shown = shown.rename(columns={"val_best": f"{metric} best", "val_default": f"{metric} default"})
    for m in dict.fromkeys(("accuracy", name)):
        if f"test_{m}_gain" in table.columns:
            shown[f"test {m} best / default"] = [_pair(r, m) for r in table.to_dict("records")]
            shown[f"{m} gain [95%]"] = [_interval(r, m) for r in table.to_dict("records")]
    if "mcnemar_p" in table.columns:
        shown["McNemar p"] = table["mcnemar_p"]
    shown["verdict"] = table["verdict"]
    return head + sentences + _html_table(shown)


def _pair(row: dict[str, Any], m: str) -> str:
    best = row.get(f"test_{m}_best")
    return "" if best is None or _nan(best) else f"{best:.3f} / {row[f'test_{m}_default']:.3f}"


def _interval(row: dict[str, Any], m: str) -> str:
    gain = row.get(f"test_{m}_gain")
    if gain is None or _nan(gain):
        return ""
    return f"{_signed(gain)} [{_signed(row[f'test_{m}_gain_low'])}, {_signed(row[f'test_{m}_gain_high'])}]"


def _nan(x: Any) -> bool:
    return isinstance(x, (float, np.floating)) and math.isnan(x)


def gain_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """The gain table as JSON-ready records (plain numbers, None for a missing figure)."""
    out = []
    for row in table.to_dict("records") if not table.empty else []:
        out.append({k: None if _nan(v) else v.item() if isinstance(v, np.generic) else v for k, v in row.items()})
    return out


def defaults_summary(pairs: list[TuningPair]) -> dict[str, Any]:
    """Per family: the default trial and the retest runs that stand for it (the best's own when it was the best)."""
    return {p.model: {"default_trial_run_id": p.default.trial_run_id if p.default else None, "same_as_best": p.same,
                      "retest_run_ids": [r.run_id for r in p.default.runs] if p.default else [],
                      "deterministic": p.default.deterministic if p.default else "", "missing": p.missing}
            for p in pairs}


def gain_problems(pairs: list[TuningPair]) -> list[str]:
    """Failures to say as warnings: a default configuration whose retest failed."""
    return [f"{p.model}: {p.missing}" for p in pairs if p.missing.startswith("the default configuration's retest")]
