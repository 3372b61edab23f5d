"""Report, statistics: seed means with bootstrap intervals, McNemar tests, per-class F1 and confused pairs."""

import numpy as np
import pandas as pd
import pytest
from report_samples import CLASSES, sample_family

from carclf.config import RunConfig
from carclf.report.compare import (
    comparison_table,
    confused_pairs_table,
    mcnemar_table,
    per_class_f1_table,
    split_counts_table,
    winner,
    winner_sentence,
)


def test_comparison_table_means_intervals_and_cost_columns():
    fams = [sample_family("svm", 0.1), sample_family("simple_cnn", 0.4)]
    table = comparison_table(fams, "val_f1_macro", n_boot=300).set_index("model")
    for model, fam in zip(["svm", "simple_cnn"], fams):
        accs = [np.mean(r.pred == r.y_true) for r in fam.runs]
        row = table.loc[model]
        assert row["test_accuracy"] == pytest.approx(np.mean(accs))
        assert row["test_accuracy_std"] == pytest.approx(np.std(accs, ddof=1))
        for m in ("accuracy", "precision_macro", "recall_macro", "f1_macro"):
            assert row[f"test_{m}_ci_low"] <= row[f"test_{m}"] <= row[f"test_{m}_ci_high"]
        assert row["train_seconds"] == pytest.approx(3.0) and row["infer_ms_per_image"] == pytest.approx(1.0)
        assert row["representative_run_id"] == f"{model}-0" and row["seeds"] == 3
    assert "kernel=" in table.loc["svm", "configuration"] and "lr=" in table.loc["simple_cnn", "configuration"]


def test_mcnemar_table_flags_a_real_difference_and_not_a_null_one():
    fams = [sample_family("svm", 0.05, n=300), sample_family("simple_cnn", 0.5, n=300), sample_family("resnet18", 0.05, n=300)]
    fams[2].runs[0].pred = fams[0].runs[0].pred.copy()  # identical representative predictions
    table = mcnemar_table(fams).set_index(["model_a", "model_b"])
    assert table.loc[("svm", "simple_cnn"), "p_holm"] < 1e-6 and table.loc[("svm", "simple_cnn"), "significant"]
    assert table.loc[("svm", "resnet18"), "p_value"] == 1.0 and not table.loc[("svm", "resnet18"), "significant"]
    assert (table["p_holm"] >= table["p_value"]).all()


def test_per_class_and_confused_pairs_tables():
    fams = [sample_family("svm", 0.2), sample_family("simple_cnn", 0.4)]
    per_class = per_class_f1_table(fams)
    assert per_class["class"].tolist() == CLASSES and per_class["support"].tolist() == [30, 30, 30]
    assert (per_class["svm"] > per_class["simple_cnn"]).all()
    pairs = confused_pairs_table(fams, k=2)
    # errors are always true -> true+1: bus->sedan, sedan->van, van->bus
    assert set(zip(pairs["true"], pairs["predicted"])) <= {("bus", "sedan"), ("sedan", "van"), ("van", "bus")}
    assert pairs.groupby("model").size().to_dict() == {"simple_cnn": 2, "svm": 2}


def _manifest(per_class_train: dict, val: int = 2, test: int = 2) -> pd.DataFrame:
    rows = []
    for label, (cls, n_train) in enumerate(per_class_train.items()):
        for i, split in enumerate(["train"] * n_train + ["val"] * val + ["test"] * test):
            rows.append({"path": f"/d/{cls}/{i}.jpg", "sha256": f"{cls}{i}", "class": cls, "label": label,
                         "split": split})
    return pd.DataFrame(rows)


def test_winner_is_the_best_validation_figure_though_another_family_is_higher_on_test():
    # svm is best on validation (retest mean 0.90) but errs more on test than resnet18 (val 0.85)
    fams = [sample_family("svm", 0.10, n=300, val=0.90), sample_family("resnet18", 0.04, n=300, val=0.85),
            sample_family("simple_cnn", 0.5, n=300, val=0.5)]
    table = comparison_table(fams, "val_f1_macro", n_boot=200)
    rows = table.set_index("model")
    assert rows.loc["resnet18", "test_f1_macro"] > rows.loc["svm", "test_f1_macro"]
    assert rows.loc["svm", "val_f1_macro_retest"] == pytest.approx(0.90)
    w = winner(table, mcnemar_table(fams), "val_f1_macro", "max")
    assert w["model"] == "svm" and w["chosen_by"] == "val_f1_macro_retest" and w["chosen_value"] == pytest.approx(0.9)
    assert w["value"] == rows.loc["svm", "test_f1_macro"]  # its test figure: the outcome
    assert w["runner_up"] == "resnet18" and w["test_leader"] == "resnet18"
    text = winner_sentence(w)
    assert text.startswith("Winner, chosen on validation: svm")
    assert text.count("Validation and test disagree on the order") == 1 and "on test resnet18 scored higher" in text
    # when both agree, no such sentence
    agree = [sample_family("svm", 0.04, n=300, val=0.9), sample_family("resnet18", 0.10, n=300, val=0.85)]
    w = winner(comparison_table(agree, "val_f1_macro", n_boot=50), mcnemar_table(agree), "val_f1_macro", "max")
    assert w["model"] == "svm" and w["test_leader"] is None and "disagree" not in winner_sentence(w)


def test_winner_carries_its_test_figure_with_its_interval_and_the_runner_up_verdict():
    fams = [sample_family("simple_cnn", 0.5, n=300), sample_family("svm", 0.05, n=300),
            sample_family("resnet18", 0.06, n=300)]
    table = comparison_table(fams, "val_f1_macro", n_boot=200)
    w = winner(table, mcnemar_table(fams), "val_f1_macro", "max")
    row = table.set_index("model").loc["svm"]
    assert w["model"] == "svm" and w["metric"] == "test_f1_macro" and w["value"] == row["test_f1_macro"]
    assert (w["ci_low"], w["ci_high"]) == (row["test_f1_macro_ci_low"], row["test_f1_macro_ci_high"])
    assert w["runner_up"] == "resnet18" and not w["significant"]  # 5% vs 6% errors: McNemar cannot tell
    assert "not significant" in winner_sentence(w) and "may well be equally good" in winner_sentence(w)
    far = winner(table[table["model"] != "resnet18"], mcnemar_table(fams[:2]), "val_f1_macro", "max")
    assert far["runner_up"] == "simple_cnn" and far["significant"] and "is significant" in winner_sentence(far)
    # a selection metric without a test interval in the table ranks by macro-F1, and says so
    by_ba = comparison_table(fams, "val_balanced_accuracy", n_boot=50)
    assert winner(by_ba, mcnemar_table(fams), "val_balanced_accuracy", "max")["metric"] == "test_f1_macro"


def test_winner_alone_and_without_families():
    fams = [sample_family("svm", 0.1)]
    w = winner(comparison_table(fams, "val_f1_macro", n_boot=50), mcnemar_table(fams), "val_f1_macro", "max")
    assert w["model"] == "svm" and w["runner_up"] is None and "only family" in winner_sentence(w)
    assert winner(pd.DataFrame(), mcnemar_table([]), "val_f1_macro", "max") is None


def test_split_counts_per_class_and_split_and_each_family_balanced():
    manifest = _manifest({"bus": 12, "sedan": 6, "van": 3})
    configs = {"cnn": RunConfig(balance={"mode": "both", "samples_per_class": 5}),
               "svm": RunConfig(balance={"mode": "none"}),
               "median": RunConfig(balance={"mode": "oversample"})}
    table = split_counts_table(manifest, configs).set_index("class")
    assert table.index.tolist() == ["bus", "sedan", "van"]  # label order
    assert table["train"].tolist() == [12, 6, 3] and table["val"].tolist() == [2, 2, 2]
    assert table["test"].tolist() == [2, 2, 2]
    assert table["train balanced: cnn"].tolist() == [5, 5, 5]  # both: down and up to the target
    assert table["train balanced: svm"].tolist() == [12, 6, 3]  # none: as split
    assert table["train balanced: median"].tolist() == [12, 6, 6]  # oversample to the median, never down
