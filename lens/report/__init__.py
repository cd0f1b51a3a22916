"""Stage 5 — report: plotly figures, the standalone HTML report, and ``lens demo``.

| module | what it holds |
|---|---|
| ``figures`` | interactive plotly figures of analysis results (imported only when a figure is asked for) |
| ``html`` | ``Report``: one self-contained, offline HTML page of sections, text, figures and tables |
| ``demo`` | ``lens demo``: the embedded model, traced, summarized and written to a report |
| ``deployment`` | the demo's dense-versus-deployed section |

``from lens.report import Report`` (the path before the stage folders) keeps working.
"""


def __getattr__(name: str):
    if name == "Report":
        from lens.report.html import Report

        return Report
    raise AttributeError(f"module 'lens.report' has no attribute {name!r}")
