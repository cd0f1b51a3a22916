"""``NeuronExplorer``: every neuron of a corpus scan in a sortable, filterable table, and a page per neuron."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import traitlets

from lens.errors import ConfigError

from ._base import LensWidget
from ._data import Index, f32

__all__ = ["NeuronExplorer", "TABLE_COLUMNS", "SORT_KEYS"]

#: the numeric columns of ``table`` (float32 [rows, len(TABLE_COLUMNS)])
TABLE_COLUMNS = ("layer", "neuron", "max", "mean", "std", "fraction_positive", "sparsity")
SORT_KEYS = ("max", "mean", "std", "fraction_positive", "sparsity", "min", "neuron")


class NeuronExplorer(LensWidget):
    """Browse the neurons of a ``lens.scan`` (docs/definitions.md, "Corpus scans").

    Left: a table of neurons (layer, neuron, max, mean, std, fraction > 0, sparsity, top token), sortable by
    any column, filtered by layer and by a token (neurons whose top-k examples have that token at the example
    position — a DuckDB query over the scan's Parquet files), paged ``page_size`` rows at a time. Right: the
    page of the selected neuron — its histogram on the scan's fixed edges, the top-k contexts coloured by
    activation (with the attention mass the position receives, sink-token and massive-activation flags), the
    quantile samples per sign × decade group, and the logit effects (tokens it writes towards / away from).

    The browser only ever holds one page of the table and one neuron: everything is read from the Scan on
    demand (dense statistics from memory, examples from Parquet) and sent as binary buffers. Python reads back
    ``layer`` and ``neuron`` (the neuron shown; −1 before any), and can set them.

    Example::

        scan = lens.Scan.load("scans/minilm")
        explorer = lens.widgets.NeuronExplorer(scan, sort="max")
        explorer.layer, explorer.neuron = 3, 42
        explorer.to_html("neurons.html", neurons=[(3, 42), (5, 7)])
    """

    _component = "neuron_explorer"
    _selection = ("sort", "descending", "layer_filter", "search", "page", "layer", "neuron")
    _float_traits = frozenset({"table", "hist"})

    info = traitlets.Dict().tag(sync=True)
    sort = traitlets.Unicode("max").tag(sync=True)
    descending = traitlets.Bool(True).tag(sync=True)
    layer_filter = Index(-1, help="show one layer (−1: all)").tag(sync=True)
    search = traitlets.Unicode("", help="a token: only neurons whose top examples contain it").tag(sync=True)
    page = Index(0).tag(sync=True)
    layer = Index(-1).tag(sync=True)
    neuron = Index(-1).tag(sync=True)
    table = traitlets.Bytes(help="float32 [rows, TABLE_COLUMNS] of the current page").tag(sync=True)
    table_meta = traitlets.Dict(help="rows matching, pages, top tokens of the page rows").tag(sync=True)
    hist = traitlets.Bytes(help="float32 [bins] token counts of the selected neuron").tag(sync=True)
    detail = traitlets.Dict(help="the selected neuron's examples, samples and logit effects").tag(sync=True)

    def __init__(self, scan, *, page_size: int = 40, **selection):
        if getattr(scan, "__lens_scan__", False) is not True:
            raise ConfigError(
                f"NeuronExplorer shows a lens.Scan (lens.scan(...) or lens.Scan.load(folder)); got {type(scan).__name__}"
            )
        if not scan.n_neurons:
            raise ConfigError("this scan has no dense MLP neurons to explore (an MoE model: see scan.routing_frame())")
        if page_size < 1:
            raise ConfigError(f"page_size must be ≥ 1; got {page_size}")
        self._scan = scan
        self._frame = scan.to_frame()
        self._page_size = int(page_size)
        self._search_cache: dict[str, Any] = {}
        self._export_neurons: list[tuple[int, int]] | None = None
        from lens.scan.reducers import group_bounds

        info = {
            "model": str(scan.provenance.get("model_id", "?")),
            "summary": scan.summary(),
            "layers": scan.layers,
            "n_neurons": scan.n_neurons,
            "columns": list(TABLE_COLUMNS),
            "sort_keys": list(SORT_KEYS),
            "hist_lower": [float(x) for x in scan.arrays["hist.lower"]],
            "hist_upper": [float(x) for x in scan.arrays["hist.upper"]],
            "groups": [[float(lo), float(hi)] for lo, hi in group_bounds()],
            "context": list(scan.config["context"]),
            "page_size": self._page_size,
        }
        super().__init__(info=info, **selection)

    @traitlets.validate("sort")
    def _check_sort(self, proposal):  # rejected before it is set, so the widget keeps a valid state
        if proposal["value"] not in SORT_KEYS:
            raise ConfigError(f"sort must be one of {SORT_KEYS}; got {proposal['value']!r}")
        return proposal["value"]

    @traitlets.validate("layer_filter")
    def _check_layer_filter(self, proposal):
        value = proposal["value"]
        if value != -1 and value not in self._scan.layers:
            raise ConfigError(f"layer_filter {value} was not scanned; layers: {self._scan.layers} (−1: all)")
        return value

    # -- the table ------------------------------------------------------------------------------------
    def _validate_selection(self, selection: dict[str, Any]) -> None:
        if selection["sort"] not in SORT_KEYS:
            raise ConfigError(f"sort must be one of {SORT_KEYS}; got {selection['sort']!r}")
        if selection["layer_filter"] != -1 and selection["layer_filter"] not in self._scan.layers:
            raise ConfigError(f"layer_filter {selection['layer_filter']} was not scanned; layers: {self._scan.layers} (−1: all)")
        if selection["layer"] >= 0 and selection["neuron"] >= 0:  # the browser sets them one trait at a time
            self._scan._check(selection["layer"], selection["neuron"])

    def _rows(self, selection: dict[str, Any]):
        frame = self._frame
        if selection["layer_filter"] >= 0:
            frame = frame[frame["layer"] == selection["layer_filter"]]
        text = selection["search"]
        if text:
            if text not in self._search_cache:
                self._search_cache[text] = self._scan.neurons_with_token(text)[["layer", "neuron"]]
            hits = self._search_cache[text]
            frame = frame.merge(hits, on=["layer", "neuron"], how="inner")
        key = selection["sort"]
        return frame.sort_values([key, "layer", "neuron"], ascending=[not selection["descending"], True, True], kind="stable")

    def _top_tokens(self, page) -> list[str]:
        import pyarrow.parquet as pq

        path = self._scan._parquet("examples.parquet")
        if path is None or not len(page):
            return [""] * len(page)
        found: dict[tuple[int, int], str] = {}
        for layer, part in page.groupby("layer"):
            table = pq.read_table(path, columns=["neuron", "token"], filters=[
                ("layer", "=", int(layer)), ("rank", "=", 0), ("neuron", "in", [int(n) for n in part["neuron"]])])
            for n, tok in zip(table.column("neuron").to_pylist(), table.column("token").to_pylist()):
                found[(int(layer), int(n))] = tok
        return [found.get((int(l), int(n)), "") for l, n in zip(page["layer"], page["neuron"])]

    def _derive(self, selection: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
        rows = self._rows(selection)
        total = len(rows)
        pages = max(1, -(-total // self._page_size))
        page_index = min(max(selection["page"], 0), pages - 1)
        page = rows.iloc[page_index * self._page_size : (page_index + 1) * self._page_size]
        table = page[list(TABLE_COLUMNS)].to_numpy(dtype=np.float32)
        out = {
            "table": f32(table),
            "table_meta": {"rows": total, "pages": pages, "page": page_index, "top": self._top_tokens(page),
                           "search": selection["search"]},
        }
        out.update(self._neuron_page(selection["layer"], selection["neuron"]))
        return out

    # -- one neuron -----------------------------------------------------------------------------------
    def _neuron_page(self, layer: int, neuron: int) -> dict[str, Any]:
        if layer < 0 or neuron < 0:
            return {"hist": b"", "detail": {}}
        scan = self._scan
        li = scan._check(layer, neuron)
        stats = self._frame.iloc[li * scan.n_neurons + neuron]
        ex = scan.examples(layer, neuron)
        sm = scan.samples(layer, neuron)
        lg = scan.logit_effects(layer, neuron)

        def floats(values) -> list:
            return [None if not np.isfinite(v) else float(v) for v in values]

        detail = {
            "layer": int(layer), "neuron": int(neuron),
            "stats": {k: float(stats[k]) for k in ("count", "mean", "std", "min", "max", "fraction_positive", "sparsity")},
            "examples": [
                {"value": float(r.value), "doc": int(r.doc), "position": int(r.position),
                 "tokens": list(r.context_tokens), "acts": floats(r.context_acts), "mass": float(r.mass),
                 "sink": bool(r.is_sink), "massive": float(r.massive_ratio)}
                for r in ex.itertuples()
            ],
            "samples": [
                {"group": int(r.group), "value": float(r.value), "doc": int(r.doc), "position": int(r.position),
                 "tokens": list(r.context_tokens)}
                for r in sm.itertuples()
            ],
            "logits": {
                d: [[r.token, float(r.effect)] for r in lg[lg["direction"] == d].itertuples()] for d in ("up", "down")
            } if len(lg) else {},
        }
        return {"hist": f32(scan.arrays["neuron.hist"][li, neuron].astype(np.float32)), "detail": detail}

    # -- export ---------------------------------------------------------------------------------------
    def _export_selections(self) -> Iterable[dict[str, Any]]:
        current = self._current_selection()
        chosen = self._export_neurons or ([(current["layer"], current["neuron"])] if current["layer"] >= 0 else [])
        return [{**current, "layer": int(l), "neuron": int(n)} for l, n in chosen] or [current]

    def to_html(self, path=None, *, neurons: Iterable[tuple[int, int]] | None = None, **kwargs):
        """Standalone HTML of the table page shown now and the pages of ``neurons`` [(layer, neuron), ...]
        (default: the selected one), clickable offline. Other keyword arguments as ``LensWidget.to_html``.

        Example: ``explorer.to_html("neurons.html", neurons=[(3, 42), (5, 7)])``.
        """
        chosen = [(int(l), int(n)) for l, n in neurons] if neurons is not None else None
        for l, n in chosen or []:
            self._scan._check(l, n)
        self._export_neurons = chosen
        try:
            if chosen and self.layer < 0:
                with self.hold_trait_notifications():
                    self.layer, self.neuron = chosen[0]
            return super().to_html(path, **kwargs)
        finally:
            self._export_neurons = None

    def _default_title(self) -> str:
        return "lens — neurons: " + str(self._scan.provenance.get("model_id", "?"))
