"""The views the dashboard shows for a stored run — the very components the notebooks use, in Panel.

Each view is a lens widget (anywidget) placed in the page through its ``to_panel()``: the same ESM, the
same Python-side derivation. A session keeps only the view on screen; switching closes the previous
widget (ipywidgets keeps every open widget in a global registry, so an unclosed one would live as long
as the process).
"""

from __future__ import annotations

import numpy as np

from lens.run import Run

__all__ = ["VIEWS", "make_view", "strongest_sink_head"]

#: name shown on the page → what it shows
VIEWS = {
    "SinkMap": "sink score per layer and head → the mass each token receives",
    "ValleyPlot": "matrix entropy, anisotropy and first-token norm per layer",
    "AttentionExplorer": "layer × head grid → a head's token × token pattern",
    "TokenView": "the text coloured by the mass each token receives in the selected head",
}


def strongest_sink_head(run: Run) -> tuple[int, int]:
    """(layer, head) with the highest mean sink score of the run (where SinkMap starts)."""
    from lens.analysis.sinks import sinks

    score = sinks(run).mean_sink_score
    layer, head = np.unravel_index(int(np.nanargmax(score)), score.shape)
    return int(layer), int(head)


def make_view(kind: str, run: Run, *, layer: int | None = None, head: int | None = None):
    """The lens widget of ``kind`` (a key of ``VIEWS``) for ``run``; ``layer``/``head`` carry the selection
    from one view to the next where it applies."""
    import lens.widgets as lw

    if kind == "SinkMap":
        return lw.SinkMap(run, layer=layer, head=head) if layer is not None and head is not None else lw.SinkMap(run)
    if kind == "ValleyPlot":
        return lw.ValleyPlot(run)
    if kind == "AttentionExplorer":
        if layer is not None and head is not None:
            return lw.AttentionExplorer(run, layer=layer, head=head)
        return lw.AttentionExplorer(run)
    if kind == "TokenView":
        if layer is None or head is None:
            layer, head = strongest_sink_head(run)
        return lw.TokenView.mass(run, layer, head)
    raise KeyError(f"unknown view {kind!r}; views: {', '.join(VIEWS)}")
