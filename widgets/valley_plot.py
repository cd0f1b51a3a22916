"""``ValleyPlot``: entropy, anisotropy and first-token norm per layer for one or several runs, with the bound."""

from __future__ import annotations

import numpy as np
import traitlets

from lens.analysis.valley import ValleyResult, valley
from lens.errors import ConfigError
from lens.run import Run

from ._base import LensWidget
from ._data import Index, check_run, f32

__all__ = ["ValleyPlot", "VALLEY_COLUMNS"]

# the per-layer quantities drawn, in the order of `series`' second axis (see lens.valley for definitions)
VALLEY_COLUMNS = (
    "entropy_raw_normalized",
    "entropy_normalized_normalized",
    "entropy_upper_bound_normalized",
    "anisotropy",
    "anisotropy_lower_bound",
    "first_norm_ratio",
)


class ValleyPlot(LensWidget):
    """Compression valley per residual layer ℓ = 0..L for one or more runs, overlaid.

    Three panels (docs/definitions.md): matrix entropy ÷ log min(T, d) — raw (solid), normalized (dotted) and the
    massive-activation upper bound on the raw entropy (dashed); anisotropy p₁ with its lower bound
    (dashed); and the first-token norm ÷ the median token norm (log scale). Each run has its own colour,
    its valley range shaded and its argmin layer marked when the valley is interior (a run whose minimum is
    at the embeddings or the output gets no shading, and its legend says "no interior valley"). Values are means over sequences
    (``ValleyResult.mean``). Runs of different depths are compared on relative depth ℓ/L (a toggle
    switches between layer index and depth). The data is (runs × 6 × (L+1)) numbers, so nothing is
    aggregated at any sequence length.

    Accepts ``Run``s (``lens.valley(run)`` is computed) and ``ValleyResult``s, in any mix; ``labels``
    names them (default: model ids, or "run i"). Python can read back ``layer`` — the layer last
    clicked or chosen with the keyboard (−1: none).

    Example::

        short = lens.trace(lens.load(), ["A short text."])
        long = lens.trace(lens.load(), ["A much longer text, with clauses, that keeps going for a while."])
        lens.widgets.ValleyPlot(short, lens.valley(long), labels=["short", "long"])
    """

    _component = "valley_plot"
    _float_traits = frozenset({"series"})

    info = traitlets.Dict().tag(sync=True)
    series = traitlets.Bytes(help="float32 [runs, 6, max L + 1], NaN-padded; columns: VALLEY_COLUMNS").tag(sync=True)
    layer = Index(-1, help="selected residual layer (−1: none)").tag(sync=True)

    def __init__(self, *sources: Run | ValleyResult, labels: list[str] | tuple[str, ...] | None = None):
        if not sources:
            raise ConfigError("ValleyPlot needs at least one lens.Run or lens.valley(run) result")
        results: list[ValleyResult] = []
        for i, source in enumerate(sources):
            if isinstance(source, ValleyResult):
                results.append(source)
            elif isinstance(source, Run):
                results.append(valley(check_run(source, "ValleyPlot")))
            else:
                raise ConfigError(
                    f"ValleyPlot argument {i} is a {type(source).__name__}; pass lens.Run objects or "
                    "lens.valley(run) results, e.g. ValleyPlot(run_a, run_b, labels=['dense', 'sparse'])"
                )
        if labels is None:
            ids = [str(r.run.provenance.get("model_id", "run")).split("/")[-1] for r in results]
            labels = ids if len(set(ids)) == len(ids) else [f"run {i}" for i in range(len(results))]
        else:
            labels = [str(label) for label in labels]
            if len(labels) != len(results):
                raise ConfigError(f"got {len(labels)} labels for {len(results)} runs; give one label per run")
        self._results = results
        self._labels = labels
        depth = max(r.values["entropy_raw"].shape[0] for r in results)
        series = np.full((len(results), len(VALLEY_COLUMNS), depth), np.nan, dtype=np.float32)
        for i, r in enumerate(results):
            for j, column in enumerate(VALLEY_COLUMNS):
                values = r.mean(column)
                series[i, j, : values.shape[0]] = values
        info = {
            "labels": labels,
            "columns": list(VALLEY_COLUMNS),
            "n_layers": [int(r.values["entropy_raw"].shape[0] - 1) for r in results],
            "valley_layer": [int(r.valley_layer) for r in results],
            "valley_range": [[int(r.valley_range[0]), int(r.valley_range[1])] for r in results],
            # a minimum at either end is a trend, not a valley: no shading, and the legend says so
            "interior": [bool(getattr(r, "interior", True)) for r in results],
            "alpha": [float(r.alpha) for r in results],
            "n_sequences": [int(r.run.n_sequences) for r in results],
            "models": [str(r.run.provenance.get("model_id", "?")) for r in results],
        }
        super().__init__(info=info, series=f32(series))

    @traitlets.validate("layer")
    def _check_layer(self, proposal):
        value = proposal["value"]
        deepest = max(self.info["n_layers"]) if self.info else 0
        if not -1 <= value <= deepest:
            raise ConfigError(f"layer {value} does not exist; residual layers are 0..{deepest} (−1: none)")
        return value

    def figure(self):
        """The same comparison as a static plotly figure (``lens.report.figures.valley_figure``).

        Example: ``lens.widgets.ValleyPlot(run_a, run_b).figure().write_html("valley.html")``.
        """
        from lens.report import figures

        return figures.valley_figure(self._results, self._labels)

    def _default_title(self) -> str:
        return "lens — compression valley: " + ", ".join(self._labels)
