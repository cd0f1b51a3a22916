"""Self-contained HTML reports: plotly.js inlined once, every figure and table offline in one file."""

from __future__ import annotations

import datetime as _dt
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens.atomic import atomic_write_text

__all__ = ["Report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#fff}
header{background:#14213d;color:#fff;padding:18px 32px}
header h1{margin:0;font-size:22px} header p{margin:4px 0 0;opacity:.8}
main{max-width:1180px;margin:0 auto;padding:8px 32px 48px}
section{margin-top:28px} h2{border-bottom:2px solid #e5e8ec;padding-bottom:4px;font-size:19px}
pre.summary{background:#f4f6f8;border-left:4px solid #fca311;padding:12px 16px;white-space:pre-wrap;font-size:13px}
div.frame{overflow-x:auto;max-width:100%} table.frame{border-collapse:collapse;font-size:12px;margin:8px 0} table.frame td,table.frame th{border:1px solid #d9dde2;padding:3px 7px;text-align:right}
table.frame th{background:#f4f6f8} details{margin:8px 0} .note{color:#5c6670;font-size:13px}
@media (prefers-color-scheme: dark){body{background:#111;color:#e8e8e8} pre.summary,table.frame th{background:#1d2127} table.frame td,table.frame th{border-color:#333}}
"""


@dataclass
class Report:
    """An HTML report assembled from text, plotly figures and pandas frames, written atomically.

    Example::

        report = Report("lens demo", subtitle="all-MiniLM-L6-v2")
        report.section("Attention sinks", text=result.summary(), figures=[result.figure()],
                       frames={"per layer": result.to_frame("layers")})
        report.write("lens-report.html")
    """

    title: str
    subtitle: str = ""
    sections: list[dict[str, Any]] = field(default_factory=list)

    def section(self, heading: str, *, text: str = "", note: str = "", figures=(), frames=None) -> None:
        """Add a section: a heading, a summary ``text`` (monospace), a ``note``, plotly ``figures`` and named
        pandas ``frames`` (tables)."""
        self.sections.append(
            {"heading": heading, "text": text, "note": note, "figures": list(figures), "frames": dict(frames or {})}
        )

    def render(self) -> str:
        import plotly.offline

        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>",
            # plotly.js once, inline: the file works offline and stays one file
            f"<script>{plotly.offline.get_plotlyjs()}</script></head><body>",
            f"<header><h1>{html.escape(self.title)}</h1><p>{html.escape(self.subtitle)}</p></header><main>",
        ]
        for sec in self.sections:
            parts.append(f"<section><h2>{html.escape(sec['heading'])}</h2>")
            if sec["text"]:
                parts.append(f"<pre class='summary'>{html.escape(sec['text'])}</pre>")
            if sec["note"]:
                parts.append(f"<p class='note'>{html.escape(sec['note'])}</p>")
            for fig in sec["figures"]:
                parts.append(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}))
            for name, frame in sec["frames"].items():
                parts.append(f"<details open><summary>{html.escape(name)}</summary>")
                parts.append("<div class='frame'>")
                parts.append(frame.to_html(classes="frame", float_format=lambda v: f"{v:.4g}", index=False, border=0))
                parts.append("</div>")
                parts.append("</details>")
            parts.append("</section>")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        parts.append(f"<p class='note'>Written by lens on {stamp}.</p></main></body></html>")
        return "".join(parts)

    def write(self, path: str | os.PathLike) -> Path:
        """Render and write to ``path`` atomically (``lens.atomic``: temporary file, fsync, rename; the file gets
        the umask's permissions, e.g. 0644). Returns the absolute path.

        Example: ``Report("title").write("report.html")``.
        """
        path = Path(path).expanduser().resolve()
        atomic_write_text(path, self.render())
        return path
