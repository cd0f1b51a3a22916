"""Plotly figures for neurons over a run or a corpus scan (``lens.neurons(...).figure()``, ``Scan.figure()``).

plotly is imported inside each function: the core never loads a plotting library at import time."""

from __future__ import annotations

__all__ = ["neurons_figure", "scan_figure", "histogram_figure"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _scatter(frame, title: str, hover_extra=None):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (layer, part) in enumerate(frame.groupby("layer")):
        text = [f"L{layer} N{n}" for n in part["neuron"]]
        if hover_extra is not None:
            text = [f"{t}<br>{x}" for t, x in zip(text, hover_extra(part))]
        fig.add_trace(go.Scattergl(
            x=part["fraction_positive"], y=part["max"], mode="markers", name=f"layer {layer}", text=text,
            hovertemplate="%{text}<br>fraction > 0 %{x:.3f}<br>max %{y:.4g}<extra></extra>",
            marker={"size": 5, "opacity": 0.7, "color": _PALETTE[i % len(_PALETTE)]},
        ))
    fig.update_layout(title=title, xaxis_title="fraction of tokens with activation > 0", yaxis_title="max activation",
                      template="plotly_white", height=460)
    return fig


def neurons_figure(result):
    """Max vs fraction > 0 of every neuron of a ``lens.neurons`` result, one colour per layer.

    Example: ``lens.neurons(run).figure().write_html("neurons.html")``.
    """
    top = result.examples
    first = {}
    if len(top):
        for row in top[top["rank"] == 0].itertuples():
            first[(row.layer, row.neuron)] = row.token
    return _scatter(result.frame, "Neurons — max vs fraction active",
                    lambda part: [f"top token {first.get((l, n), '')!r}" for l, n in zip(part["layer"], part["neuron"])])


def scan_figure(scan, layer: int | None = None):
    """Max vs fraction > 0 of every scanned neuron (or one layer's), over the whole corpus.

    Example: ``lens.Scan.load("scans/minilm").figure(layer=3)``.
    """
    frame = scan.to_frame()
    if layer is not None:
        frame = frame[frame["layer"] == layer]
    model = str(scan.provenance.get("model_id", "?")).split("/")[-1]
    return _scatter(frame, f"Neurons of {model} over {scan.tokens:,} tokens ({scan.documents:,} documents)")


def histogram_figure(scan, layer: int, neuron: int):
    """The neuron's activation histogram on the scan's fixed edges (log count; signed log-magnitude bins).

    Example: ``histogram_figure(scan, 3, 42).show()``.
    """
    import plotly.graph_objects as go

    h = scan.histogram(layer, neuron)
    lower, upper, count = h["lower"], h["upper"], h["count"]
    keep = count > 0
    labels = [f"[{lo:.3g}, {hi:.3g})" if lo != hi else "0" for lo, hi in zip(lower[keep], upper[keep])]
    fig = go.Figure(go.Bar(x=labels, y=count[keep], marker_color="#1f77b4",
                           hovertemplate="%{x}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=f"Layer {layer}, neuron {neuron}: activation histogram", yaxis_type="log",
                      xaxis_title="activation bin", yaxis_title="tokens", template="plotly_white", height=360)
    return fig
