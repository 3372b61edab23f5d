"""The comparison's statistics, as tables: test metrics with bootstrap intervals, McNemar tests, per-class F1.

    table = comparison_table(families, "val_f1_macro", n_boot=2000)   # one row per model
    pairs = mcnemar_table(families)                                   # one row per pair of models, Holm-adjusted

Intervals are percentile bootstrap intervals over test images, paired across seeds (each resample
draws the same images for every seed; the metric is averaged over seeds). McNemar's exact test
compares the representative runs (the first seed) of every pair of models on the same test images.
The statistics themselves are in carclf.core.stats; this module applies them to retested families.

The winner is chosen on validation, as every other choice is: the family with the best mean over its
retests' seeds of the sweep's selection metric on the validation split (`<metric>_retest`; the trial's
own figure where a retest recorded none). Its test figures are the outcome, not the criterion: the
table still shows every family's, and a sentence says so when test would have ordered the first two
the other way.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd

from carclf.core import stats
from carclf.core.metrics import confusion, most_confused_pairs, per_class_report
from carclf.data.prepare import SPLITS, balance
from carclf.report.retest import FamilyRetest
from carclf.report.selection import chosen_configuration

TABLE_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


def comparison_table(families: list[FamilyRetest], metric: str, *, n_boot: int = 2000,
                     level: float = 0.95) -> pd.DataFrame:
    """The study's main table: one row per model with seed mean/std and bootstrap intervals."""
    rows = []
    for f in families:
        if not f.runs:
            continue
        y, preds, k = f.runs[0].y_true, f.preds, len(f.runs[0].classes)
        row: dict[str, Any] = {"model": f.model, "configuration": chosen_configuration(f.config),
                               metric: f.val_metric, retest_column(metric): retest_val(f, metric),
                               "seeds": len(f.runs), "deterministic": bool(f.deterministic)}
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


def retest_column(metric: str) -> str:
    """The comparison table's column that chooses the winner: the selection metric's mean over the retests."""
    return f"{metric}_retest"


def retest_val(f: FamilyRetest, metric: str) -> float:
    """The mean over `f`'s retests of the selection metric on validation (its trial's figure if none has it)."""
    name = metric[len("val_"):] if metric.startswith("val_") else metric
    values = [r.val_metrics.get(name) for r in f.runs]
    values = [float(v) for v in values if isinstance(v, (int, float)) and np.isfinite(v)]
    return float(np.mean(values)) if values else float(f.val_metric)


def mcnemar_table(families: list[FamilyRetest]) -> pd.DataFrame:
    """McNemar's exact test for every pair of models, on their representative runs' test predictions."""
    done = [f for f in families if f.runs]
    rows = []
    for a, b in itertools.combinations(done, 2):
        ra, rb = a.representative, b.representative
        res = stats.mcnemar(ra.y_true, ra.pred, rb.pred)
        rows.append({"model_a": a.model, "model_b": b.model,
                     "accuracy_a_first_seed": float(np.mean(ra.pred == ra.y_true)),
                     "accuracy_b_first_seed": float(np.mean(rb.pred == rb.y_true)),
                     "only_a_right": res.a_only, "only_b_right": res.b_only,
                     "p_value": res.p_value, "p_mid": res.p_mid})
    table = pd.DataFrame(rows, columns=["model_a", "model_b", "accuracy_a_first_seed", "accuracy_b_first_seed", "only_a_right",
                                        "only_b_right", "p_value", "p_mid"])
    table["p_holm"] = stats.holm(table["p_value"].tolist()) if len(table) else []
    table["significant"] = table["p_holm"] < 0.05
    return table


def pooled_confusion(family: FamilyRetest) -> np.ndarray:
    """Confusion counts summed over seeds (each seed sees every test image once)."""

    k = len(family.runs[0].classes)
    return sum(confusion(r.y_true, r.pred, k)[0] for r in family.runs)


def per_class_f1_table(families: list[FamilyRetest]) -> pd.DataFrame:
    """Per-class test F1 per model (mean over seeds), with the class's test support."""

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

    parts = []
    for f in families:
        if f.runs:
            pairs = most_confused_pairs(pooled_confusion(f), f.runs[0].classes, k=k)
            parts.append(pairs.assign(model=f.model, seeds=len(f.runs)))
    if not parts:
        return pd.DataFrame(columns=["model", "true", "predicted", "count", "seeds"])
    table = pd.concat(parts, ignore_index=True)
    return table[["model"] + [c for c in table.columns if c != "model"]]


def ranking_metric(selection_metric: str) -> str:
    """The table metric that ranks the retested families: the selection metric's test counterpart
    (val_f1_macro -> f1_macro), or macro-F1 when the table holds no interval for it."""
    name = selection_metric[len("val_"):] if selection_metric.startswith("val_") else selection_metric
    return name if name in TABLE_METRICS else "f1_macro"


def winner(table: pd.DataFrame, mcnemar: pd.DataFrame, metric: str, mode: str) -> dict[str, Any] | None:
    """The best family by validation (`retest_column(metric)`, the mean over its retests' seeds), with its test
    figure of the selection metric's test counterpart and its interval as the outcome, the runner-up (next by
    validation), whether McNemar's test (Holm-adjusted) tells the two apart, and `test_leader`: the family
    test ranks first when that is not the winner (else None). None without a family."""
    if table.empty:
        return None
    name = ranking_metric(metric)
    column, chooser = f"test_{name}", retest_column(metric)
    if chooser not in table.columns:
        chooser = metric  # a table of retests without validation figures: the trials' own
    better_first = mode == "min"
    ranked = table.sort_values(chooser, ascending=better_first, kind="mergesort").reset_index(drop=True)
    best = ranked.iloc[0]
    by_test = table.sort_values(column, ascending=better_first, kind="mergesort").reset_index(drop=True).iloc[0]
    out: dict[str, Any] = {"model": best["model"], "chosen_by": chooser, "chosen_value": float(best[chooser]),
                           "metric": column, "value": float(best[column]),
                           "ci_low": float(best[f"{column}_ci_low"]), "ci_high": float(best[f"{column}_ci_high"]),
                           "seeds": int(best["seeds"]), "deterministic": bool(best.get("deterministic", False)),
                           "runner_up": None, "test_leader": None}
    if by_test["model"] != best["model"] and float(by_test[column]) != float(best[column]):
        out.update(test_leader=by_test["model"], test_leader_value=float(by_test[column]),
                   test_leader_chosen_value=float(by_test[chooser]))
    if len(ranked) > 1:
        second = ranked.iloc[1]
        pair = mcnemar[((mcnemar["model_a"] == best["model"]) & (mcnemar["model_b"] == second["model"]))
                       | ((mcnemar["model_a"] == second["model"]) & (mcnemar["model_b"] == best["model"]))]
        out.update(runner_up=second["model"], runner_up_chosen_value=float(second[chooser]),
                   runner_up_value=float(second[column]),
                   runner_up_ci_low=float(second[f"{column}_ci_low"]),
                   runner_up_ci_high=float(second[f"{column}_ci_high"]),
                   p_holm=float(pair["p_holm"].iloc[0]) if len(pair) else float("nan"),
                   significant=bool(pair["significant"].iloc[0]) if len(pair) else False)
    return out


def winner_sentence(w: dict[str, Any] | None) -> str:
    """The winner in words, e.g. for the report's first paragraph and `carclf report`'s last lines."""
    if w is None:
        return "No family was retested: there is no winner."
    chooser = w.get("chosen_by", "validation")
    seeds = ("deterministic: retested once" if w.get("deterministic") else f"mean over {w['seeds']} seed(s)")
    head = (f"Winner, chosen on validation: {w['model']} ({chooser} {w['chosen_value']:.3f}, {seeds}); its "
            f"outcome on the test split: {w['metric']} {w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}] "
            f"(95% bootstrap interval).")
    disagree = _disagreement(w)
    if w["runner_up"] is None:
        return f"{head} It was the only family retested."
    verdict = ("significant" if w["significant"] else "not significant")
    return (f"{head} Runner-up on validation: {w['runner_up']} ({w['runner_up_chosen_value']:.3f}), test "
            f"{w['runner_up_value']:.3f} [{w['runner_up_ci_low']:.3f}, {w['runner_up_ci_high']:.3f}]. Their test "
            f"difference is {verdict} (McNemar's exact test on their right and wrong test answers, first seed, "
            f"Holm-adjusted p = {w['p_holm']:.3g}{'' if w['significant'] else '; the two may well be equally good'})."
            f"{disagree}")


def _disagreement(w: dict[str, Any]) -> str:
    """One sentence when test puts another family first ('' when validation and test agree on the first)."""
    if not w.get("test_leader"):
        return ""
    return (f" Validation and test disagree on the order: on test {w['test_leader']} scored higher "
            f"({w['test_leader_value']:.3f} against {w['value']:.3f}) though its validation figure was lower "
            f"({w['test_leader_chosen_value']:.3f}); the winner stays the one chosen on validation, since a choice "
            "made on test would be tuned to the test images.")


def split_counts_table(manifest: pd.DataFrame, configs: dict[str, Any]) -> pd.DataFrame:
    """Images per class and split (train, val, test) as the runs split them, and the training split after
    each family's balancing (`configs`: family -> RunConfig); one row per class."""

    order = manifest.drop_duplicates("class").sort_values("label")["class"].tolist()  # label order
    counts = manifest.pivot_table(index="class", columns="split", values="sha256", aggfunc="count", fill_value=0)
    counts = counts.reindex(index=order, columns=list(SPLITS), fill_value=0)
    table = counts.reset_index().rename_axis(columns=None)
    train = manifest[manifest["split"] == "train"]
    for family, cfg in configs.items():
        balanced = balance(train, mode=cfg.balance.mode, samples_per_class=cfg.balance.samples_per_class,
                           seed=cfg.seed)["class"].value_counts()
        table[f"train balanced: {family}"] = [int(balanced.get(c, 0)) for c in table["class"]]
    return table
