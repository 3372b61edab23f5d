"""Render the report: the figures (metric bars, images per class and split, a confusion matrix per family)
and one self-contained HTML page.

    figures = {k: figure_png(fig) for k, fig in report_figures(families, table).items()}
    page = render_html(info=info, table=table, mcnemar=mcn, ..., figures_png=figures, notes=notes)

The page needs nothing else: tables are inline and figures are base64 data URIs. The figures
themselves are drawn by carclf.core.figures.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Sequence

import numpy as np
import pandas as pd

from carclf.core.figures import confusion_figure, metric_bars_figure, split_counts_figure
from carclf.report.compare import TABLE_METRICS, pooled_confusion, retest_column, winner_sentence
from carclf.report.retest import FamilyRetest
from carclf.report.selection import SweepInfo

CONFUSION_PREFIX = "confusion_"  # one figure (and file) per family: confusion_<family>
DETERMINISTIC_NOTE = "deterministic: retested once"
REGISTERED_COLUMN = "registered model (first seed): test accuracy / f1_macro"


def report_figures(families: list[FamilyRetest], table: pd.DataFrame,
                   split_counts: pd.DataFrame | None = None) -> dict[str, Any]:
    """The report's matplotlib Figures: the comparison bars, the images per class and split (when
    `split_counts` is given), and one confusion matrix per family (key `confusion_<family>`)."""

    done = [f for f in families if f.runs]
    if not done:
        return {}
    # error bars: the '<metric>_std' columns (seed-to-seed spread)
    figures = {"bars": metric_bars_figure(table, [f"test_{m}" for m in TABLE_METRICS],
                                          title="Test metrics per model (mean ± std over seeds)")}
    if split_counts is not None and not split_counts.empty:
        figures["class_frequency"] = split_counts_figure(split_counts)
    for f in done:
        title = f"{f.model}: test split, row-normalised (counts summed over {len(f.runs)} seed(s))"
        figures[f"{CONFUSION_PREFIX}{f.model}"] = confusion_figure(pooled_confusion(f), f.runs[0].classes,
                                                                   normalize=True, title=title)
    return figures


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1320px;padding:0 1rem;color:#222}table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.85rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;vertical-align:top}th{background:#f3f3f3}
td.num{text-align:right;white-space:nowrap}td.ci{text-align:right;white-space:pre}td.wide{min-width:15rem}
img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#555;font-size:.9rem}.warn{color:#a40}.winner{font-size:1.05rem;background:#f4f8fc;
border-left:4px solid #36c;padding:.5rem .75rem}.figs{display:flex;flex-wrap:wrap;gap:1rem}
.figs figure{margin:0;flex:1 1 520px;max-width:640px}figcaption{color:#555;font-size:.85rem}"""
_WIDE = {"configuration"}  # long text: given room, wrapped, left-aligned


def _html_table(df: pd.DataFrame) -> str:
    """An HTML table: numbers right-aligned, text left-aligned, long text columns given room."""
    if df.empty:
        return "<p class='note'>(none)</p>"
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in df.columns)
    rows = []
    for values in df.itertuples(index=False):
        cells = []
        for column, value in zip(df.columns, values):
            number = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
            text = _cell(value)
            if _is_interval(text):  # 'mean ± std [low, high]' on two lines, right-aligned like a number
                css, text = "ci", text.replace(" [", "\n[")
            else:
                css = "num" if number else ("wide" if column in _WIDE else "")
            cells.append(f"<td{f' class={css!r}' if css else ''}>{e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _is_interval(text: str) -> bool:
    return " [" in text and text.endswith("]")


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _with_intervals(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The main table as the reader sees it: 'mean ± std [low, high]' per test metric."""
    if table.empty:
        return table
    shown = table[["model", "configuration", metric, "seeds"]].copy()
    if retest_column(metric) in table.columns:  # the column that chose the winner says so in its header
        shown.insert(3, chooser_header(metric), table[retest_column(metric)].round(4))
    fixed = table["deterministic"].astype(bool) if "deterministic" in table.columns else pd.Series(False, table.index)
    # a deterministic family is retested once: a spread over seeds would be a meaningless ± 0
    shown["seeds"] = [DETERMINISTIC_NOTE if d else n for d, n in zip(fixed, table["seeds"])]
    for m in TABLE_METRICS:
        shown[f"test {m}"] = [_figure(r, f"test_{m}", spread=not d) for d, (_, r) in zip(fixed, table.iterrows())]
    if "registered_test_accuracy" in table.columns:  # the representative run: what `carclf promote` registers
        shown[REGISTERED_COLUMN] = [
            f"{a:.3f} / {f:.3f}" for a, f in zip(table["registered_test_accuracy"], table["registered_test_f1_macro"])]
    shown["train s"] = table["train_seconds"].round(1)
    shown["infer ms/img"] = table["infer_ms_per_image"].round(3)
    shown["params"] = table["n_params"]
    shown["size MB"] = table["size_mb"].round(2)
    return shown


def chooser_header(metric: str) -> str:
    return f"{metric} retests (chose the winner)"


def _figure(row, column: str, *, spread: bool) -> str:
    """'mean ± std [low, high]', or 'value [low, high]' without a spread over seeds."""
    std = f" ± {row[f'{column}_std']:.3f}" if spread else ""
    return f"{row[column]:.3f}{std} [{row[f'{column}_ci_low']:.3f}, {row[f'{column}_ci_high']:.3f}]"


def render_html(*, info: SweepInfo, table: pd.DataFrame, mcnemar: pd.DataFrame, per_class: pd.DataFrame,
                confused: pd.DataFrame, not_finished: pd.DataFrame, problems: list[str],
                figures_png: dict[str, bytes], notes: dict[str, Any], winner: dict[str, Any] | None = None,
                remarks: Sequence[str] = (), sections: Sequence[str] = (), top_sections: Sequence[str] = ()) -> str:
    """One self-contained HTML page: tables inline, figures as base64 data URIs, no external assets.

    `problems` (failures, an interrupted sweep) are shown as warnings; `remarks` (trials the scheduler
    stopped early, as it should) in neutral words. `sections`: further self-contained HTML sections
    (e.g. carclf.report.analysis), placed before the runs; `top_sections` (the tuning gain, the edge
    warnings) right after the comparison table.
    """
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>carclf report: {e(info.name)}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>Model comparison: sweep {e(info.name)}</h1>",
             f"<p class='winner'>{e(winner_sentence(winner))}</p>" if table is not None and not table.empty else "",
             f"<p class='note'>Generated {e(notes['created'])}. Selection: best finished trial per model by "
             f"<b>{e(info.metric)}</b> ({e(info.mode)}) on the validation split. Each chosen configuration was "
             f"retrained with {notes['seeds']} seed(s) (once where training is deterministic: an SVM on "
             "features no seed changes) on the same split and evaluated on the test split "
             f"({notes['n_test']} images, manifest {e(notes['test_hash'][:12])}). "
             "Test figures: mean ± std over seeds, with a 95% percentile bootstrap interval over test images "
             f"({notes['n_boot']} resamples, the same images drawn for every seed, metric averaged over seeds). "
             "McNemar: exact test on the representative runs (the first seed), Holm-adjusted over all pairs.</p>"]
    if problems:
        parts.append("<h2 class='warn'>Left out of the comparison</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in problems)
                     + "</ul>")
    parts += [f"<p class='note'>{e(r)}</p>" for r in remarks]
    parts += ["<h2>Comparison</h2>", _html_table(_with_intervals(table, info.metric)), *top_sections]
    for key, title, caption in _SINGLE_FIGURES:
        if key in figures_png:
            parts.append(f"<h2>{title}</h2><figure><img alt='{e(title)}' src='{data_uri(figures_png[key])}'>"
                         f"<figcaption>{e(caption)}</figcaption></figure>")
    parts.append(_confusion_section(figures_png))
    parts += ["<h2>Pairwise McNemar tests</h2><p class='note'>On each family's representative run: its first seed "
              "(the trial's own), the model <code>carclf promote</code> registers. The accuracies here are that "
              "run's, not the means over seeds of the comparison table.</p>", _html_table(mcnemar),
              "<h2>Per-class test F1 (mean over seeds)</h2>", _html_table(per_class),
              "<h2>Most confused class pairs (counts summed over seeds)</h2>", _html_table(confused),
              "<h2>Trials not considered (stopped early, failed or unfinished)</h2>", _html_table(not_finished),
              *sections,
              "<h2>Runs</h2>", _html_table(table[["model", "trial_run_id", "representative_run_id"]]
                                           if not table.empty else table),
              f"<p class='note'>MLflow: report run {e(notes.get('report_run_id') or '')}, sweep parent run "
              f"{e(info.parent_run_id)} at {e(info.tracking_uri)}.</p></body></html>"]
    return "\n".join(p for p in parts if p)


_SINGLE_FIGURES = (
    ("class_frequency", "Images per class and split",
     "Validation and test hold real images only; balancing resamples the training split alone (classes above "
     "the target are sampled down, classes below filled up with augmented copies), per family's configuration."),
    ("bars", "Test metrics per model", "Mean over seeds; error bars: the standard deviation over seeds."),
)


def _confusion_section(figures_png: dict[str, bytes]) -> str:
    keys = [k for k in figures_png if k.startswith(CONFUSION_PREFIX)]
    if not keys:
        return ""
    e = html.escape
    figs = "".join(f"<figure><img alt='{e(k[len(CONFUSION_PREFIX):])} confusion matrix' "
                   f"src='{data_uri(figures_png[k])}'><figcaption>{e(k[len(CONFUSION_PREFIX):])}, test split"
                   "</figcaption></figure>" for k in keys)
    return ("<h2>Test confusion matrices, one per model</h2><p class='note'>Cells are row-normalised: each row is "
            "a true class and sums to 1, so the diagonal is that class's recall; off the diagonal, the share of "
            "the class taken for another. Counts are summed over seeds before normalising.</p>"
            f"<div class='figs'>{figs}</div>")
