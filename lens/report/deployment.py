"""The demo report's deployment section: dense vs sparse vs low-bit on the demo model."""

from __future__ import annotations

from lens.kernels.sparse import SparseConfig
from lens.models.deploy import long_documents
from lens.models.lensmodel import DEFAULT_MODEL_ID

__all__ = ["demo_section"]


def _demo_sparse() -> SparseConfig:
    return SparseConfig(mode="hybrid", topk=0.25, topp=0.95, block_q=64, block_k=64)


def demo_section(lm, texts, dense_run, *, progress: bool | None = None):
    """Dense vs sparse vs NVFP4 vs int4 vs ternary on the demo model: how sinks and the valley move.

    Sparse attention needs sequences of several blocks to skip anything, so the sparse comparison traces
    long documents made of the demo sentences, cut to the model's 512 positions (dense and sparse on the
    same inputs). Returns
    (heading, summary text, figures, frames) for ``lens.report.Report.section``.
    """
    import numpy as np

    import lens
    from lens.report.figures import valley_figure

    model_id = None if lm.source == "embedded" and lm.model_id == DEFAULT_MODEL_ID else lm.model_id
    rows = []
    valleys = [lens.valley(dense_run)]
    labels = ["dense"]
    figures = []
    # low-bit weights: same inputs as the dense run
    base = dense_run if "resid.hidden.0" in dense_run.arrays else lens.trace(lm, texts, progress=False, keep_hidden="all")
    for scheme in ("nvfp4", "int4", "ternary"):
        deployed = lens.load(model_id, quant=scheme, progress=progress)
        run = lens.trace(deployed, texts, progress=progress, keep_hidden="all")
        result = lens.compare(base, run)
        valleys.append(lens.valley(run))
        labels.append(scheme)
        rows.append(_row(scheme, result, run))
    # sparse attention: both runs on the tiled inputs
    documents = long_documents(texts)
    dense_long = lens.trace(lm, documents, truncate=True, progress=progress, keep_hidden="all")
    sparse_lm = lens.load(model_id, attention=_demo_sparse(), progress=progress)
    sparse_long = lens.trace(sparse_lm, documents, truncate=True, progress=progress, keep_hidden="all")
    sparse_result = lens.compare(dense_long, sparse_long)
    rows.insert(0, _row("sparse hybrid p=0.95", sparse_result, sparse_long))
    notes = sparse_result.notes()
    frame = _display_frame(rows)
    figures.append(valley_figure(valleys, labels))
    figures.append(sparse_result.figure())
    text = "\n".join(
        f"{r['variant']}: Δ sink ≤ {r['max_abs_sink_delta']:.3f}, "
        + (f"valley at layer {r['valley_layer']}, " if r["valley_interior"] else
           f"no interior valley (minimum at layer {r['valley_layer']}), ")
        + f"hidden-state relative error ≤ {r['max_hidden_rel_error']:.3f}"
        + (f", {r['block_density']:.0%} of blocks computed" if np.isfinite(r["block_density"]) else "")
        + (f", {r['bits_per_weight']:.2f} bits/weight" if np.isfinite(r["bits_per_weight"]) else "")
        for r in rows
    )
    text = "\n".join([text, "(sparse attention on 512-token documents made of the same sentences, dense on the same)",
                      *notes])
    return "Deployment path: what sparse attention and low-bit weights change", text, figures, {"variants": frame}


def _row(name, result, run) -> dict:
    import numpy as np

    report = run.provenance.get("quant_report") or {}
    return {
        "variant": name,
        "max_abs_sink_delta": float(np.nanmax(np.abs(result.sink_delta))),
        "mean_abs_sink_delta": float(np.nanmean(np.abs(result.sink_delta))),
        "valley_layer": int(result.valley_layers[1]),
        "valley_interior": bool(result.valley_interior[1]),
        "max_entropy_delta": float(np.nanmax(np.abs(result.entropy_delta))),
        "max_hidden_rel_error": float(np.nanmax(result.hidden_rel_error)),
        "min_hidden_cosine": float(np.nanmin(result.hidden_cosine)),
        "block_density": float(np.nanmean(result.density_b)) if np.isfinite(result.density_b).any() else float("nan"),
        "bits_per_weight": float(report.get("bits_per_weight", float("nan"))),
    }


def _display_frame(rows):
    """The variants table of the report: readable headings, one valley column, narrow enough for the page."""
    import numpy as np
    import pandas as pd

    def valley(r):
        return f"layer {r['valley_layer']}" if r["valley_interior"] else f"none (min. at {r['valley_layer']})"

    return pd.DataFrame({
        "variant": [r["variant"] for r in rows],
        "max |Δ sink|": [r["max_abs_sink_delta"] for r in rows],
        "interior valley": [valley(r) for r in rows],
        "max |Δ entropy|": [r["max_entropy_delta"] for r in rows],
        "hidden rel. error ≤": [r["max_hidden_rel_error"] for r in rows],
        "hidden cosine ≥": [r["min_hidden_cosine"] for r in rows],
        "blocks computed": [f"{r['block_density']:.0%}" if np.isfinite(r["block_density"]) else "all" for r in rows],
        "bits/weight": [f"{r['bits_per_weight']:.2f}" if np.isfinite(r["bits_per_weight"]) else "32" for r in rows],
    })
