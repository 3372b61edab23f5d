"""Report, rendering: one self-contained HTML page with every table and figure, the winner first."""

import re

import pandas as pd
from report_samples import CLASSES, sample_family, sample_trials

from carclf.config import RunConfig
from carclf.report.compare import (
    comparison_table,
    confused_pairs_table,
    mcnemar_table,
    per_class_f1_table,
    split_counts_table,
    winner,
)
from carclf.report.render import render_html, report_figures
from carclf.report.selection import SweepInfo, unfinished

PNG = b"\x89PNG\r\n\x1a\nfake"
NOTES = {"created": "now", "seeds": 3, "n_test": 90, "test_hash": "abc", "n_boot": 100}


def _page(tmp_path, fams, **kw):
    table = comparison_table(fams, "val_f1_macro", n_boot=100)
    mcn = mcnemar_table(fams)
    info = SweepInfo("quick", tmp_path, "parent", "carclf", "sqlite:///x.db", "val_f1_macro", "max")
    figures = {"bars": PNG, "class_frequency": PNG, **{f"confusion_{f.model}": PNG for f in fams}}
    args = dict(info=info, table=table, mcnemar=mcn, per_class=per_class_f1_table(fams),
                confused=confused_pairs_table(fams), not_finished=unfinished(sample_trials(), "val_f1_macro"),
                problems=["alexnet: no finished trial, not retested"], figures_png=figures, notes=NOTES,
                winner=winner(table, mcn, "val_f1_macro", "max"))
    return render_html(**{**args, **kw}), table


def test_html_is_self_contained_and_holds_table_and_every_figure(tmp_path):
    fams = [sample_family("svm", 0.1), sample_family("simple_cnn", 0.3)]
    page, table = _page(tmp_path, fams)
    assert len(re.findall(r"<img [^>]*src='data:image/png;base64,", page)) == 4  # bars, classes, 2 confusions
    assert not re.search(r"(src|href)=['\"](https?:|//|/)", page)  # nothing fetched from anywhere
    assert page.count("<table") == 6 and "alexnet: no finished trial" in page and "RuntimeError: boom" in page
    assert f"{table.loc[0, 'test_accuracy']:.3f}" in page


def test_the_page_names_the_winner_first_with_its_interval_and_the_mcnemar_verdict(tmp_path):
    fams = [sample_family("svm", 0.05, n=300), sample_family("simple_cnn", 0.5, n=300)]
    page, table = _page(tmp_path, fams)
    best = table.set_index("model").loc["svm"]
    winner_at = page.index("Winner, chosen on validation: svm")
    assert winner_at < page.index("<h2>Comparison")  # before every table
    assert f"[{best['test_f1_macro_ci_low']:.3f}, {best['test_f1_macro_ci_high']:.3f}]" in page[winner_at:]
    assert "Runner-up on validation: simple_cnn" in page and "Their test difference is significant" in page
    assert "val_f1_macro retests (chose the winner)" in page  # the table says which column chose


def test_class_frequency_chart_and_one_titled_confusion_matrix_per_family(tmp_path):
    fams = [sample_family("svm", 0.1), sample_family("simple_cnn", 0.3)]
    page, _ = _page(tmp_path, fams)
    assert "<h2>Images per class and split</h2>" in page
    assert "row-normalised" in page and "each row is a true class and sums to 1" in page
    for model in ("svm", "simple_cnn"):
        assert f"alt='{model} confusion matrix'" in page and f"{model}, test split</figcaption>" in page

    manifest = pd.DataFrame({"class": [c for c in CLASSES for _ in range(10)],
                             "label": [i for i in range(3) for _ in range(10)],
                             "split": (["train"] * 6 + ["val"] * 2 + ["test"] * 2) * 3})
    manifest["sha256"] = [f"h{i}" for i in range(len(manifest))]
    manifest["path"] = [f"/data/{c}/{h}.jpg" for c, h in zip(manifest["class"], manifest["sha256"])]
    counts = split_counts_table(manifest, {"svm": RunConfig(balance={"mode": "both", "samples_per_class": 4})})
    figures = report_figures(fams, comparison_table(fams, "val_f1_macro", n_boot=50), counts)
    assert set(figures) == {"bars", "class_frequency", "confusion_svm", "confusion_simple_cnn"}
    for model in ("svm", "simple_cnn"):
        [ax, _colorbar] = figures[f"confusion_{model}"].axes
        assert ax.get_title().startswith(f"{model}: test split, row-normalised")
    assert len(figures["class_frequency"].axes) == 2  # as split; training split before and after balancing


def test_configuration_is_left_aligned_text_and_numbers_are_right_aligned(tmp_path):
    page, _ = _page(tmp_path, [sample_family("svm", 0.1), sample_family("simple_cnn", 0.3)])
    assert re.search(r"<td class='wide'>backbone=", page)  # the configuration column: text, given room
    assert re.search(r"<td class='num'>0\.\d+</td>", page)
    assert "td.num{text-align:right" in page and "text-align:left" in page


def test_early_stops_are_a_neutral_note_and_failures_a_warning(tmp_path):
    fams = [sample_family("svm", 0.1)]
    stopped = "Stopped early by the scheduler: 1 of 6 trials"
    page, _ = _page(tmp_path, fams, problems=[], remarks=[stopped])
    assert stopped in page and "class='warn'" not in page and "Left out of the comparison" not in page
    page, _ = _page(tmp_path, fams, problems=["svm: retest failed (seed 1: boom)"], remarks=[stopped])
    warning = page[page.index("Left out of the comparison"):page.index("</ul>")]
    assert "retest failed" in warning and stopped not in warning


def test_a_deterministic_family_says_retested_once_instead_of_a_spread_over_seeds(tmp_path):
    svm = sample_family("svm", 0.05, seeds=1, n=300)
    svm.deterministic = "an SVM on features that no seed changes"
    fams = [svm, sample_family("simple_cnn", 0.3, n=300)]
    page, table = _page(tmp_path, fams, top_sections=["<h2>Did tuning pay?</h2>"])
    row = table.set_index("model").loc["svm"]
    assert bool(row["deterministic"]) and not table.set_index("model").loc["simple_cnn", "deterministic"]
    assert "<td>deterministic: retested once</td>" in page
    svm_row = page[page.index("<td>svm</td>"):].split("</tr>")[0]
    assert " ± " not in svm_row  # no meaningless ± 0.000 ...
    assert f"{row['test_accuracy']:.3f}\n[{row['test_accuracy_ci_low']:.3f}, " in svm_row  # ... the interval stays
    cnn_row = page[page.index("<td>simple_cnn</td>"):].split("</tr>")[0]
    assert " ± " in cnn_row
    assert "(val_f1_macro_retest 0.950, deterministic: retested once)" in page  # the winner's sentence
    assert page.index("<h2>Comparison") < page.index("<h2>Did tuning pay?</h2>") < page.index("<h2>Pairwise")
