"""The report's backbone section: LogME beside each backbone's best validation figure, and their rank correlation."""

from __future__ import annotations

import pandas as pd
import pytest

from carclf.report.backbones import BackboneRanking, backbone_section, backbone_table, rank_correlations

METRIC = "val_f1_macro"
SCORES = {"keep": 3, "families": [{"family": "svm", "kept": ["a", "b", "c"], "scores": [
    {"backbone": "a", "logme": 0.5}, {"backbone": "b", "logme": 0.1}, {"backbone": "c", "logme": -0.2},
    {"backbone": "d", "logme": -0.9}]}]}


def trials(rows):
    """(run_id, family, status, figure, backbone) rows -> the trials frame and run_id -> backbone."""
    frame = pd.DataFrame([r[:4] for r in rows], columns=["run_id", "model", "status", METRIC])
    return frame, {r[0]: r[4] for r in rows}


ROWS = [("r1", "svm", "FINISHED", 0.9, "a"), ("r2", "svm", "FINISHED", 0.7, "a"), ("r3", "svm", "FINISHED", 0.6, "b"),
        ("r4", "svm", "FAILED", None, "b"), ("r5", "svm", "FINISHED", 0.3, "c"), ("r6", "svm", "FINISHED", 0.99, "z"),
        ("r7", "other", "FINISHED", 0.95, "c")]


def test_table_has_each_scored_backbone_with_its_own_familys_best_finished_trial():
    frame, backbones = trials(ROWS)
    table = backbone_table(SCORES, frame, backbones, METRIC, "max")
    assert list(table["backbone"]) == ["a", "b", "c", "d"] and list(table["rank"]) == [1, 2, 3, 4]
    assert list(table["trials"]) == [2, 1, 1, 0]  # the failed trial, another family's and unscored ones not counted
    assert table[f"best {METRIC}"].tolist()[:3] == [0.9, 0.6, 0.3] and pd.isna(table[f"best {METRIC}"].iloc[3])
    assert list(table["searched"]) == [True, True, True, False]


@pytest.mark.parametrize("mode, figures, rho", [("max", [0.9, 0.6, 0.3], 1.0), ("max", [0.3, 0.6, 0.9], -1.0),
                                                ("min", [0.1, 0.2, 0.3], 1.0)])  # min: a lower figure is better
def test_rank_correlation_is_positive_when_the_scores_order_the_backbones_as_their_trials(mode, figures, rho):
    rows = [(f"r{i}", "svm", "FINISHED", f, b) for i, (f, b) in enumerate(zip(figures, "abc"))]
    frame, backbones = trials(rows)
    table = backbone_table(SCORES, frame, backbones, METRIC, mode)
    [row] = rank_correlations(table, METRIC, mode).to_dict(orient="records")
    assert row["backbones"] == 3 and row["spearman_rho"] == pytest.approx(rho)


def test_fewer_than_three_tried_backbones_give_no_correlation_and_the_section_says_why():
    frame, backbones = trials([("r1", "svm", "FINISHED", 0.9, "a"), ("r2", "svm", "FINISHED", 0.5, "b")])
    table = backbone_table(SCORES, frame, backbones, METRIC, "max")
    correlations = rank_correlations(table, METRIC, "max")
    assert correlations.empty
    page = backbone_section(BackboneRanking(table, correlations, METRIC))
    assert "LogME" in page and "three or more" in page and ">d<" in page


def test_no_ranking_no_section():
    assert backbone_section(None) == ""
