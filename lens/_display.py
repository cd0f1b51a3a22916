"""How results show themselves: a short ``repr`` line and a small HTML card for notebooks.

Every public result (``Run``, ``LensModel``, ``SinkResult``, ``ValleyResult``, ``CompareResult``) shows what
it is, its shape and its headline numbers — never its arrays. The HTML card is a title, a headline and a
small table (a pandas frame, rounded), so a notebook cell ending in a result stays one screen tall.

Example::

    html_card("SinkResult", "12 sink heads of 72", frame)
"""

from __future__ import annotations

import html
from typing import Iterable

__all__ = ["html_card", "short_model"]

_STYLE = (
    "<style>.lens-card{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;font-size:13px;"
    "max-width:1100px}.lens-card table{border-collapse:collapse;margin-top:4px}.lens-card td,.lens-card th"
    "{border:1px solid rgba(128,128,128,.35);padding:2px 7px;text-align:right}.lens-card tr.lens-hl td"
    "{font-weight:600;background:rgba(252,163,17,.18)}.lens-card .lens-head{font-weight:600}"
    ".lens-card .lens-sub{opacity:.75;margin:2px 0}</style>"
)


def short_model(model_id) -> str:
    """The last path component of a model id: ``"sentence-transformers/all-MiniLM-L6-v2"`` → ``"all-MiniLM-L6-v2"``."""
    return str(model_id or "?").rstrip("/").split("/")[-1] or "?"


def html_card(title: str, headline: str, frame=None, *, lines: Iterable[str] = (), highlight_rows: Iterable[int] = (),
              max_rows: int = 24, digits: int = 4) -> str:
    """A title, a headline, optional extra lines and a small table, as HTML (everything escaped).

    ``frame`` is a pandas DataFrame shown without its index, numbers rounded to ``digits`` significant
    digits; rows past ``max_rows`` are cut with a note. ``highlight_rows`` (row positions) are bold.
    """
    parts = [_STYLE, "<div class='lens-card'>", f"<div class='lens-head'>{html.escape(title)}</div>",
             f"<div class='lens-sub'>{html.escape(headline)}</div>"]
    parts.extend(f"<div class='lens-sub'>{html.escape(line)}</div>" for line in lines)
    if frame is not None:
        shown = frame.head(max_rows)
        marked = set(int(i) for i in highlight_rows)
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in shown.columns)
        rows = []
        for i, row in enumerate(shown.itertuples(index=False)):
            cells = "".join(f"<td>{html.escape(_fmt(v, digits))}</td>" for v in row)
            rows.append(f"<tr class='lens-hl'>{cells}</tr>" if i in marked else f"<tr>{cells}</tr>")
        parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>")
        if len(frame) > max_rows:
            parts.append(f"<div class='lens-sub'>… {len(frame) - max_rows} more rows: .to_frame()</div>")
    parts.append("</div>")
    return "".join(parts)


def _fmt(value, digits: int) -> str:
    if isinstance(value, bool):
        return "✓" if value else ""
    if isinstance(value, float):
        if value != value:  # NaN
            return "–"
        return f"{value:.{digits}g}"
    try:
        import numpy as np

        if isinstance(value, np.bool_):
            return "✓" if value else ""
        if isinstance(value, np.floating):
            return _fmt(float(value), digits)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    return str(value)
