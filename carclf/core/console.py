"""Tables for the terminal: no wider than the terminal, one column's long text wrapped, extra columns left out.

    print(fit_table(table, wrap="configuration", optional=["size MB", "params"]))

The full tables stay in the CSV and HTML files; what the terminal shows is for reading. Numbers are
right-aligned, text left-aligned; missing values are blank.
"""

from __future__ import annotations

import math
import numbers
import shutil
import textwrap
from typing import Any, Sequence

import pandas as pd

_GAP = "  "
_MIN_WRAP = 16  # narrower than this, wrapped text is unreadable: the table overflows instead


def terminal_width(fallback: int = 100) -> int:
    """Columns of the terminal (COLUMNS wins), else `fallback` (e.g. output piped to a file)."""
    return shutil.get_terminal_size((fallback, 24)).columns


def cell_text(value: Any, float_format: str = "{:.4g}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return float_format.format(float(value))
    return str(value)


def _is_numeric(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def wrapped(text: str, width: int | None = None, indent: str = "  ") -> str:
    """A long line wrapped to the terminal, continuation lines indented."""
    return textwrap.fill(text, width or terminal_width(), subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def constant_values(df: pd.DataFrame, columns: Sequence[str]) -> dict[str, Any]:
    """Those of `columns` whose non-missing values are all one value (and present at least once): column -> value."""
    out = {}
    for c in columns:
        if c in df.columns:
            values = df[c].dropna().map(cell_text).unique()
            if len(values) == 1:
                out[c] = values[0]
    return out


def fit_table(df: pd.DataFrame, *, width: int | None = None, wrap: str | None = None,
              optional: Sequence[str] = (), float_format: str = "{:.4g}") -> str:
    """`df` as text at most `width` wide (default: the terminal's).

    The `wrap` column (best placed last) gets the room the others leave, its text wrapped onto more
    lines; if that room is too small, the `optional` columns are left out, last first, and a final
    line says which.
    """
    width = width or terminal_width()
    cells = {c: [cell_text(v, float_format) for v in df[c]] for c in df.columns}
    numeric = {c: _is_numeric(df[c]) for c in df.columns}
    columns, dropped = list(df.columns), []
    droppable = [c for c in reversed(optional) if c in columns]
    room = _wrap_room(columns, cells, wrap, width)
    while room is not None and room < _MIN_WRAP and droppable:
        columns.remove(droppable[0])
        dropped.append(droppable.pop(0))
        room = _wrap_room(columns, cells, wrap, width)
    lines = _render(columns, cells, numeric, wrap, room, len(df))
    if dropped:
        lines.append(wrapped(f"({', '.join(reversed(dropped))}: left out to fit the terminal)", width))
    return "\n".join(lines)


def _width(column: str, cells: dict) -> int:
    return max([len(str(column)), *(len(t) for t in cells[column])])


def _wrap_room(columns: list, cells: dict, wrap: str | None, width: int) -> int | None:
    """None when the table fits as it is; else the width left for the wrapped column (0 without one)."""
    total = sum(_width(c, cells) for c in columns) + len(_GAP) * (len(columns) - 1)
    if total <= width:
        return None
    if wrap not in columns:
        return 0
    return max(width - (total - _width(wrap, cells)), 0)


def _render(columns: list, cells: dict, numeric: dict, wrap: str | None, room: int | None, n_rows: int) -> list[str]:
    widths = {c: _width(c, cells) for c in columns}
    if wrap in columns and room is not None:  # never narrower than its longest word: words are not cut
        words = max((len(w) for t in cells[wrap] for w in t.split()), default=0)
        widths[wrap] = max(room, _MIN_WRAP, len(str(wrap)), words)
    def line(values: dict) -> str:
        parts = [values[c].rjust(widths[c]) if numeric[c] else values[c].ljust(widths[c]) for c in columns]
        return _GAP.join(parts).rstrip()

    out = [line({c: str(c) for c in columns})]
    for i in range(n_rows):
        row = {c: cells[c][i] for c in columns}
        extra: list[str] = []
        if wrap in columns and len(row[wrap]) > widths[wrap]:
            pieces = textwrap.wrap(row[wrap], widths[wrap], break_long_words=False) or [""]
            row[wrap], extra = pieces[0], pieces[1:]
        out.append(line(row))
        for piece in extra:
            out.append(line({c: (piece if c == wrap else "") for c in columns}))
    return out
