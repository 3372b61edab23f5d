"""Report, tuning gain: each family's best against its default configuration, per family and overall, in words."""

import numpy as np
import pytest
from report_samples import sample_family

from carclf.core import stats
from carclf.report.compare import comparison_table, mcnemar_table, winner
from carclf.report.gain import (
    OVERALL,
    TuningPair,
    gain_metrics,
    gain_section,
    gain_sentence,
    gain_table,
    pair_gain,
    verdict,
)


def _pairs(**families):
    """{family: (best error rate, default error rate or None or 'same')} -> TuningPairs on the same 300 images."""
    pairs = []
    for name, (best_rate, default_rate) in families.items():
        best = sample_family(name, best_rate, n=300)
        if default_rate is None:
            pairs.append(TuningPair(name, best, missing="the sweep ran no default-configuration trial for it"))
        elif default_rate == "same":
            pairs.append(TuningPair(name, best, default=best, same=True))
        else:
            default = sample_family(name + "_default", default_rate, n=300)
            default.model, default.trial_run_id = name, f"default-{name}"
            pairs.append(TuningPair(name, best, default=default))
    return pairs


def _winner(pairs):
    fams = [p.best for p in pairs]
    table = comparison_table(fams, "val_f1_macro", n_boot=100)
    return winner(table, mcnemar_table(fams), "val_f1_macro", "max")


def test_pair_gain_is_best_minus_default_with_a_paired_interval_and_mcnemar():
    (pair,) = _pairs(svm=(0.05, 0.4))
    gain = pair_gain(pair.best, pair.default, "f1_macro", n_boot=300)
    y = pair.best.runs[0].y_true
    best_acc = np.mean([np.mean(p == y) for p in pair.best.preds])
    default_acc = np.mean([np.mean(p == y) for p in pair.default.preds])
    assert gain["test_accuracy_gain"] == pytest.approx(best_acc - default_acc)
    assert 0 < gain["test_accuracy_gain_low"] < gain["test_accuracy_gain"] < gain["test_accuracy_gain_high"]
    assert gain["test_f1_macro_gain_low"] > 0
    test = stats.mcnemar(y, pair.best.representative.pred, pair.default.representative.pred)
    assert (gain["only_best_right"], gain["only_default_right"], gain["mcnemar_p"]) == \
        (test.a_only, test.b_only, test.p_value)
    assert verdict(gain) == "gain"


def test_the_verdict_follows_the_interval_and_a_disagreeing_mcnemar_is_explained():
    row = {"family": "svm", "test_accuracy_gain": 0.089, "test_accuracy_gain_low": 0.022,
           "test_accuracy_gain_high": 0.178, "test_accuracy_best": 0.8, "test_accuracy_default": 0.711,
           "mcnemar_p": 0.12, "only_best_right": 9, "only_default_right": 3}
    assert verdict(row) == verdict({**row, "mcnemar_p": 0.01}) == "gain"
    assert verdict({**row, "test_accuracy_gain_low": -0.1, "test_accuracy_gain_high": -0.01}) == "loss"
    assert verdict({**row, "test_accuracy_gain_low": -0.02, "test_accuracy_gain_high": 0.05}) == "no measurable gain"
    assert verdict({**row, "same": True}) == "default was best"
    # the case: an interval above 0 beside p=0.12 is a gain, and the sentence says why McNemar differs
    text = gain_sentence(row, "accuracy")
    assert "tuning gained +0.089 [+0.022, +0.178]" in text and "did not help" not in text
    assert "McNemar's test does not confirm it on its own (p=0.12)" in text and "9 against 3" in text
    assert "does not confirm" not in gain_sentence({**row, "mcnemar_p": 0.01}, "accuracy")
    across = gain_sentence({**row, "test_accuracy_gain_low": -0.01, "mcnemar_p": 0.03}, "accuracy")
    assert "no measurable difference (the accuracy interval includes 0)" in across and "does not bear out" in across


def test_no_sentence_says_no_gain_beside_an_interval_above_0():
    rng = np.random.default_rng(0)
    for _ in range(200):
        low = rng.uniform(-0.2, 0.2)
        row = {"family": "f", "test_accuracy_gain": low + 0.05, "test_accuracy_gain_low": low,
               "test_accuracy_gain_high": low + 0.1, "test_accuracy_best": 0.8, "test_accuracy_default": 0.75,
               "mcnemar_p": rng.uniform(0, 1), "only_best_right": 5, "only_default_right": 4}
        text = gain_sentence(row, "accuracy")
        if low > 0:
            assert "gained" in text and "no measurable" not in text and "worse" not in text
        elif low + 0.1 < 0:
            assert "worse" in text and "gained" not in text
        else:
            assert "no measurable difference" in text


def test_gain_table_per_family_and_overall_in_words():
    pairs = _pairs(svm_rbf=(0.05, 0.4), svm_linear=(0.2, 0.21), cnn=(0.3, None), knn=(0.35, "same"))
    w = _winner(pairs)
    assert w["model"] == "svm_rbf"
    table = gain_table(pairs, w, "val_f1_macro", "max", n_boot=300).set_index("family")
    assert list(table.index) == ["svm_rbf", "svm_linear", "cnn", "knn", OVERALL]
    assert table.loc["svm_rbf", "verdict"] == "gain"
    assert table.loc["svm_rbf", "sentence"].startswith("svm_rbf: tuning gained +0.")
    assert "accuracy" in table.loc["svm_rbf", "sentence"] and "McNemar p=" in table.loc["svm_rbf", "sentence"]
    assert table.loc["svm_linear", "verdict"] == "no measurable gain"
    assert "tuning made no measurable difference" in table.loc["svm_linear", "sentence"]
    assert table.loc["cnn", "verdict"] == "no default" and np.isnan(table.loc["cnn"].get("test_accuracy_gain"))
    assert "no tuning gain shown" in table.loc["cnn", "sentence"] and "no default-configuration trial" in \
        table.loc["cnn", "sentence"]
    assert table.loc["knn", "verdict"] == "default was best" and table.loc["knn", "test_accuracy_gain"] == 0.0
    assert "the default was the best configuration" in table.loc["knn", "sentence"]
    # overall: the winner against the best default across families (svm_linear's, the least wrong of them)
    overall = table.loc[OVERALL]
    assert overall["tuned"] == "svm_rbf" and overall["default_of"] == "svm_linear"
    linear_default = pairs[1].default
    y = linear_default.runs[0].y_true
    expected = (np.mean([np.mean(p == y) for p in pairs[0].best.preds])
                - np.mean([np.mean(p == y) for p in linear_default.preds]))
    assert overall["test_accuracy_gain"] == pytest.approx(expected)
    assert overall["sentence"].startswith("Overall (svm_rbf, the winner, against the best default configuration, "
                                          "svm_linear's): tuning gained")


def test_overall_without_any_default_says_so():
    pairs = _pairs(svm=(0.1, None), cnn=(0.3, None))
    table = gain_table(pairs, _winner(pairs), "val_f1_macro", "max", n_boot=100).set_index("family")
    assert set(table["verdict"]) == {"no default"}
    assert "no family has a retested default configuration" in table.loc[OVERALL, "sentence"]
    assert gain_metrics(table.reset_index()) == {}


def test_a_default_that_was_the_winners_best_makes_the_overall_default_best():
    pairs = _pairs(svm=(0.05, "same"), cnn=(0.3, 0.35))
    table = gain_table(pairs, _winner(pairs), "val_f1_macro", "max", n_boot=100).set_index("family")
    assert table.loc[OVERALL, "verdict"] == "default was best"
    assert table.loc[OVERALL, "default_of"] == "svm"


def test_gain_metrics_name_the_family_and_never_look_like_a_test_figure():
    pairs = _pairs(svm=(0.05, 0.4))
    table = gain_table(pairs, _winner(pairs), "val_f1_macro", "max", n_boot=100)
    metrics = gain_metrics(table)
    row = table.set_index("family").loc["svm"]
    assert metrics["svm.tuning_gain_accuracy"] == pytest.approx(row["test_accuracy_gain"])
    assert metrics["svm.tuning_gain_accuracy_low"] == pytest.approx(row["test_accuracy_gain_low"])
    assert metrics["overall.tuning_gain_f1_macro_high"] == pytest.approx(
        table.set_index("family").loc[OVERALL, "test_f1_macro_gain_high"])
    assert not [k for k in metrics if ".test_" in k]  # promote reads '<family>.test_*' as a family's figure


def test_gain_section_states_every_verdict_and_the_intervals():
    pairs = _pairs(svm=(0.05, 0.4), cnn=(0.3, None))
    table = gain_table(pairs, _winner(pairs), "val_f1_macro", "max", n_boot=100)
    page = gain_section(table, "val_f1_macro")
    row = table.set_index("family").loc["svm"]
    assert f"{row['test_accuracy_gain']:+.3f} [{row['test_accuracy_gain_low']:+.3f}, " \
           f"{row['test_accuracy_gain_high']:+.3f}]" in page
    for sentence in table["sentence"]:
        assert sentence.replace("'", "&#x27;") in page
    assert gain_sentence({"family": "svm", "missing": "its default-configuration trial FAILED"}) == \
        "svm: no tuning gain shown: its default-configuration trial FAILED."
