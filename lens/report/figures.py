"""Plotly figures for analysis results. Imported only when a ``.figure()`` is asked for, so that
``import lens`` stays free of plotting libraries."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["sink_heatmap", "massive_curve", "norm_curve", "valley_figure"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]


def _title(result, what: str) -> str:
    prov = result.run.provenance
    model = prov.get("model_id", "?").split("/")[-1]
    attn = (prov.get("attention") or {}).get("kind", "dense")
    quant = (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None
    deploy = attn + (f" + {quant}" if quant else "")
    return f"{what} — {model} ({deploy}, {result.run.n_sequences} sequences)"


def sink_heatmap(result):
    """Layer × head heatmap of the sink score (mass on token 0); sink heads (score ≥ ε and ≥ 2·u[0]) are
    outlined along their cell's border, so the number inside stays readable.

    Example: ``sink_heatmap(lens.sinks(run)).write_html("sinks.html")``.
    """
    score = result.mean_sink_score
    n_layers, n_heads = score.shape
    text = np.vectorize(lambda v: f"{v:.2f}")(score)
    fig = go.Figure(
        go.Heatmap(
            z=score,
            x=np.arange(n_heads),
            y=np.arange(n_layers),
            zmin=0,
            zmax=1,
            colorscale="Viridis",
            text=text,
            texttemplate="%{text}" if score.size <= 400 else None,
            hovertemplate="layer %{y} head %{x}<br>sink score %{z:.3f}<extra></extra>",
            colorbar={"title": "mass on<br>token 0"},
        )
    )
    layers, heads = np.nonzero(result.is_sink_head)  # score ≥ ε and ≥ 2 × the uniform share of token 0
    for layer, head in zip(layers.tolist(), heads.tolist()):
        fig.add_shape(type="rect", x0=head - 0.46, x1=head + 0.46, y0=layer - 0.46, y1=layer + 0.46,
                      line={"color": "#ff4136", "width": 2.5}, fillcolor="rgba(0,0,0,0)", layer="above")
    # a legend entry for the outline (shapes have none)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers",
                             name=f"sink head (≥ {result.epsilon:g} and ≥ 2× uniform)", showlegend=True,
                             marker={"symbol": "square-open", "size": 12, "color": "#ff4136", "line": {"width": 2}}))
    fig.update_layout(
        title=_title(result, "Attention sinks"),
        yaxis={"autorange": "reversed", "title": "layer", "tickmode": "array", "tickvals": list(range(n_layers)),
               "ticktext": [f"L{layer}" for layer in range(n_layers)], "showgrid": False, "zeroline": False},
        xaxis={"title": "head", "tickmode": "array", "tickvals": list(range(n_heads)),
               "ticktext": [f"H{h}" for h in range(n_heads)], "showgrid": False, "zeroline": False},
        legend={"orientation": "h", "y": -0.15},
        plot_bgcolor="rgba(0,0,0,0)",
        height=max(320, 40 * n_layers + 160),
    )
    return fig


def _log_axis(values: np.ndarray, title: str, **extra) -> dict:
    """A log axis labelled only at powers of ten (plotly's default labels 2 and 5 between decades too,
    which overlap on a short axis)."""
    finite = values[np.isfinite(values) & (values > 0)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (1.0, 10.0)
    lo, hi = int(np.floor(np.log10(low))), int(np.ceil(np.log10(high)))
    if hi - lo < 1:
        hi = lo + 1
    ticks = [10.0**e for e in range(lo, hi + 1)]
    return {"title": title, "type": "log", "tickmode": "array", "tickvals": ticks,
            "ticktext": [_power_label(e) for e in range(lo, hi + 1)], "range": [lo - 0.05, hi + 0.05], **extra}


def _power_label(exponent: int) -> str:
    if -2 <= exponent <= 3:
        return f"{10.0**exponent:g}"
    return "10" + str(exponent).translate(str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹"))


def massive_curve(result):
    """Largest |activation| divided by the median |activation| per residual layer (log scale), with the
    massive-activation threshold (Sun et al.: 1000× the median).

    Example: ``massive_curve(lens.sinks(run))``.
    """
    run = result.run
    top = np.abs(run.arrays["resid.top_value"][:, :, 0])
    median = np.maximum(run.arrays["resid.median_abs"], 1e-30)
    ratio = top / median
    layers = np.arange(ratio.shape[0])
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=layers, y=ratio.mean(1), mode="lines+markers", name="max |x| / median |x|",
                             error_y={"type": "data", "array": ratio.std(1), "visible": ratio.shape[1] > 1}))
    fig.add_trace(go.Scatter(x=layers, y=top.max(1), mode="lines+markers", name="max |x|", yaxis="y2",
                             line={"dash": "dot"}))
    fig.add_hline(y=result.massive_rel, line_dash="dash", line_color="#d62728",
                  annotation_text=f"{result.massive_rel:g}× median", annotation_position="bottom left")
    fig.update_layout(
        title=_title(result, "Massive activations"),
        xaxis={"title": "residual layer (input of block ℓ; last = final output)"},
        yaxis=_log_axis(np.concatenate([ratio.mean(1), [result.massive_rel]]), "ratio to median"),
        yaxis2=_log_axis(top.max(1), "max |x|", overlaying="y", side="right", showgrid=False),
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def norm_curve(result):
    """First-token norm divided by the median norm of the other tokens, per residual layer.

    Example: ``norm_curve(lens.sinks(run))``.
    """
    ratio = result.first_norm_ratio
    layers = np.arange(ratio.shape[0])
    fig = go.Figure(
        go.Scatter(x=layers, y=np.nanmean(ratio, 1), mode="lines+markers", name="‖x₀‖ / median ‖x_t‖",
                   error_y={"type": "data", "array": np.nanstd(ratio, 1), "visible": ratio.shape[1] > 1})
    )
    fig.update_layout(title=_title(result, "First-token norm"), xaxis={"title": "residual layer"},
                      yaxis={"title": "ratio", "type": "log"})
    return fig


def valley_figure(results, labels=None):
    """Entropy, anisotropy and first-token norm per layer for one or more ``ValleyResult``s, overlaid.

    Example: ``valley_figure([lens.valley(dense_run), lens.valley(sparse_run)], ["dense", "sparse"])``.
    """
    fig = make_subplots(
        rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
        subplot_titles=(
            "matrix entropy ÷ log min(T, d) — measured (solid) and the massive-activation upper bound (dashed)",
            "anisotropy p₁ — measured (solid) and lower bound (dashed)",
            "first-token norm ÷ median token norm",
        ),
    )
    notes: list[str] = []
    for i, result in enumerate(results):
        color = _PALETTE[i % len(_PALETTE)]
        label = labels[i] if labels else (
            result.run.provenance.get("model_id", "run").split("/")[-1]
            if len(results) == 1
            else f"run {i}"
        )
        layers = np.arange(result.values["entropy_raw"].shape[0])
        group = f"g{i}"

        def line(row, y, name, dash=None, show=True, opacity=1.0):
            fig.add_trace(
                go.Scatter(x=layers, y=y, mode="lines+markers", name=name, legendgroup=group, showlegend=show,
                           line={"color": color, "dash": dash}, opacity=opacity,
                           hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.4f}}<extra></extra>"),
                row=row, col=1,
            )

        line(1, result.mean("entropy_raw_normalized"), f"{label}: raw entropy")
        line(1, result.mean("entropy_normalized_normalized"), f"{label}: normalized entropy (α={result.alpha:g})",
             dash="dot", opacity=0.7)
        line(1, result.mean("entropy_upper_bound_normalized"), f"{label}: bound on raw entropy", dash="dash",
             opacity=0.6)
        line(2, result.mean("anisotropy"), f"{label}: anisotropy", show=False)
        line(2, result.mean("anisotropy_lower_bound"), f"{label}: anisotropy bound", dash="dash", show=False,
             opacity=0.6)
        line(3, result.mean("first_norm_ratio"), f"{label}: first-token norm ratio", show=False)
        if getattr(result, "interior", True):
            lo, hi = result.valley_range
            fig.add_vrect(x0=lo - 0.4, x1=hi + 0.4, fillcolor=color, opacity=0.08, line_width=0, row=1, col=1)
            fig.add_vline(x=result.valley_layer, line_dash="dot", line_color=color, row=1, col=1)
        else:
            notes.append(f"{label}: no interior valley — entropy {result.trend()}")
    fig.update_yaxes(title_text="H / log r", row=1, col=1)
    fig.update_yaxes(title_text="p₁", row=2, col=1)
    fig.update_yaxes(title_text="ratio", type="log", row=3, col=1)
    fig.update_xaxes(title_text="residual layer ℓ (0 = embeddings, L = last block output)", row=3, col=1)
    title = _title(results[0], "Compression valley") if len(results) == 1 else "Compression valley"
    fig.update_layout(title=title, height=820 + 18 * len(notes), legend={"orientation": "h", "y": -0.08})
    if notes:  # an honest caption: a minimum at either end is a trend, not a valley
        fig.add_annotation(text="<br>".join(notes), xref="paper", yref="paper", x=0, y=1.0, yanchor="bottom",
                           yshift=22, showarrow=False, align="left", font={"size": 12, "color": "#b03a2e"})
        fig.update_layout(margin={"t": 110 + 18 * len(notes)})
    return fig


def compare_figure(result):
    """Sink-score change per head (diverging heatmap), entropy and anisotropy of both runs per layer, and
    hidden-state agreement per layer.

    Example: ``compare_figure(lens.compare(dense_run, sparse_run))``.
    """
    a, b = result.labels
    fig = make_subplots(
        rows=2, cols=2, horizontal_spacing=0.12, vertical_spacing=0.16,
        subplot_titles=(f"Δ sink score ({b} − {a})", "normalized raw entropy", "anisotropy p₁",
                        "hidden states: cosine and relative error"),
    )
    delta = result.sink_delta
    bound = float(np.nanmax(np.abs(delta))) or 1e-6
    n_layers, n_heads = delta.shape
    fig.add_trace(
        go.Heatmap(z=delta, x=[f"H{h}" for h in range(n_heads)], y=[f"L{layer}" for layer in range(n_layers)],
                   zmin=-bound, zmax=bound, colorscale="RdBu_r", colorbar={"x": 0.44, "len": 0.42, "y": 0.8},
                   hovertemplate="layer %{y} head %{x}<br>Δ %{z:+.4f}<extra></extra>"),
        row=1, col=1,
    )
    layers = np.arange(len(result.entropy_a))
    for values, name, color, dash in (
        (result.entropy_a, a, _PALETTE[0], None), (result.entropy_b, b, _PALETTE[1], "dash")):
        fig.add_trace(go.Scatter(x=layers, y=values, name=name, legendgroup=name, line={"color": color, "dash": dash}),
                      row=1, col=2)
    for values, name, color, dash in (
        (result.anisotropy_a, a, _PALETTE[0], None), (result.anisotropy_b, b, _PALETTE[1], "dash")):
        fig.add_trace(go.Scatter(x=layers, y=values, name=name, legendgroup=name, showlegend=False,
                                 line={"color": color, "dash": dash}), row=2, col=1)
    if np.isfinite(result.hidden_cosine).any():
        fig.add_trace(go.Scatter(x=layers, y=result.hidden_cosine, name="cosine", line={"color": _PALETTE[2]}),
                      row=2, col=2)
        fig.add_trace(go.Scatter(x=layers, y=result.hidden_rel_error, name="relative error",
                                 line={"color": _PALETTE[3], "dash": "dot"}), row=2, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_xaxes(title_text="residual layer", row=2, col=1)
    fig.update_xaxes(title_text="residual layer", row=2, col=2)
    notes = result.notes() if hasattr(result, "notes") else []
    fig.update_layout(title=f"{b} against {a}" + "".join(f"<br><sup>⚠ {n}</sup>" for n in notes), height=720,
                      legend={"orientation": "h", "y": -0.12}, margin={"t": 100 + 24 * len(notes)})
    return fig


def decoding_figure(result):
    """Per decoding step: attention on the sink tokens and on the recent window (mean over heads and layers
    1..L−1), and the KL divergence to a baseline generation when the result has one."""
    frame = result.to_frame()
    has_kl = result.kl is not None
    fig = make_subplots(rows=2 if has_kl else 1, cols=1, shared_xaxes=True,
                        subplot_titles=("attention of each new query", "KL to the baseline (nats)")[: 2 if has_kl else 1])
    for s, part in frame.groupby("sequence"):
        hover = [f"{t!r}" for t in part["token"]]
        for column, color, dash in (("sink_mass", _PALETTE[0], None), ("window_mass", _PALETTE[1], "dash"),
                                    ("first_mass", _PALETTE[2], "dot")):
            fig.add_trace(go.Scatter(x=part["step"], y=part[column], name=f"{column} (seq {s})", text=hover,
                                     line={"color": color, "dash": dash}, legendgroup=column,
                                     hovertemplate="step %{x} %{text}<br>%{y:.3f}<extra></extra>"), row=1, col=1)
        if has_kl:
            fig.add_trace(go.Scatter(x=part["step"], y=part["kl"], name=f"KL (seq {s})", text=hover,
                                     line={"color": _PALETTE[3]}, hovertemplate="step %{x} %{text}<br>%{y:.2e}<extra></extra>"),
                          row=2, col=1)
    fig.update_xaxes(title_text="decoding step", row=2 if has_kl else 1, col=1)
    fig.update_layout(title=_title(result, "decoding, per step"), height=560 if has_kl else 380)
    return fig
