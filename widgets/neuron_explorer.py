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


class _Checked:
    """A selection trait whose every assignment goes through ``NeuronExplorer._check`` first.

    The check runs in the trait's own ``validate`` rather than a ``@traitlets.validate`` method because traitlets
    defers ``@validate`` inside ``hold_trait_notifications`` — which ``HasTraits.__init__``, ipywidgets' update from
    the browser and the Panel mirror all use — and rolls back only on a ``TraitError`` there: a ``ConfigError``
    would leave the rejected value set and derive from it. Here a rejected value is never stored, in any context.
    """

    def validate(self, obj, value):
        return super().validate(obj, obj._check(self.name, value))


class _Index(_Checked, Index):
    pass


class _Text(_Checked, traitlets.Unicode):
    pass


class _Flag(_Checked, traitlets.Bool):
    pass


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
    # the selection: each value is checked before it is set (``_check``), so a rejected one raises ConfigError
    # and the widget keeps showing the previous, valid selection
    sort = _Text("max", help=f"the column the table is sorted by: one of {SORT_KEYS}").tag(sync=True)
    descending = _Flag(True).tag(sync=True)
    layer_filter = _Index(-1, help="show one layer (−1: all)").tag(sync=True)
    search = _Text("", help="a token: only neurons whose top examples contain it").tag(sync=True)
    page = _Index(0, help="the table page (from 0); beyond the last page: the last page").tag(sync=True)
    layer = _Index(-1, help="the layer of the neuron shown (−1: none)").tag(sync=True)
    neuron = _Index(-1, help="the neuron shown (−1: none)").tag(sync=True)
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
        self._export_start: tuple[int, int] | None = None
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
        # the keywords were set one at a time: a page checked before a filter among them may be past the end
        self._settle_page()

    # -- the selection --------------------------------------------------------------------------------
    def _check(self, name: str, value: Any, selection: dict[str, Any] | None = None) -> Any:
        """``value`` for selection trait ``name`` as it is stored, or ``ConfigError`` saying what is allowed.

        Every trait is checked on its own (the browser sets them one at a time: ``layer`` then ``neuron``); only
        ``page`` looks at others — ``layer_filter`` and ``search`` in ``selection`` (default: the widget's) — to
        clamp a page beyond the end to the last page, the one the table shows. ``selection`` is given when a whole
        selection is checked (the constructor, a refresh, each selection of an export).
        """
        scan = self._scan
        if name in ("sort", "search"):
            if not isinstance(value, str):
                raise ConfigError(f"{name} must be a string; got {value!r}" + (f" (one of {SORT_KEYS})" if name == "sort" else ""))
            if name == "sort" and value not in SORT_KEYS:
                raise ConfigError(f"sort must be one of {SORT_KEYS}; got {value!r}")
            if name == "search":
                self._matches(value)  # run the query now: a search that cannot run is rejected, not half-set
            return value
        if name == "descending":
            if not isinstance(value, (bool, np.bool_)):
                raise ConfigError(f"descending must be True or False; got {value!r}")
            return bool(value)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{name} must be an integer; got {value!r}")
        value = int(value)
        if name in ("layer", "layer_filter") and value != -1 and value not in scan.layers:
            raise ConfigError(f"{name} {value} was not scanned; this scan has layers {scan.layers} (−1: "
                              + ("all)" if name == "layer_filter" else "no neuron shown)"))
        if name == "neuron" and not -1 <= value < scan.n_neurons:
            raise ConfigError(f"neuron {value} does not exist; neurons are 0..{scan.n_neurons - 1} (−1: none shown)")
        if name == "page":
            if value < 0:
                raise ConfigError(f"page must be ≥ 0 (pages count from 0); got {value}")
            if selection is not None:
                value = min(value, self._pages(selection) - 1)
            elif not self.cross_validation_lock:
                value = min(value, self._pages({"layer_filter": self.layer_filter, "search": self.search}) - 1)
            # else: assigned with others at once (hold_trait_notifications: a browser update, the constructor), a
            # filter set after it may change the number of pages; the refresh then clamps it (_settle_page)
        return value

    def _validate_selection(self, selection: dict[str, Any]) -> None:
        for name in self._selection:
            self._check(name, selection[name], selection)

    def _settle_page(self) -> None:
        """Set ``page`` to the page the table shows, when a filter or search left fewer pages than it."""
        shown = int(self.table_meta.get("page", 0))
        if self.page != shown:
            # the derived traits already show that page: setting the trait must not derive them again
            self._derived_for = tuple({**self._current_selection(), "page": shown}.values())
            self.page = shown

    def _refresh(self) -> None:
        super()._refresh()
        self._settle_page()

    def _current_selection(self) -> dict[str, Any]:
        selection = super()._current_selection()
        if self._export_start is not None:  # to_html: the export opens on this neuron; the widget's stays
            selection["layer"], selection["neuron"] = self._export_start
        return selection

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        if self._export_start is not None:
            state["layer"], state["neuron"] = self._export_start
        return state

    # -- the table ------------------------------------------------------------------------------------
    def _matches(self, text: str):
        """The (layer, neuron) of the neurons whose top examples have token ``text`` (cached per token)."""
        if text not in self._search_cache:
            self._search_cache[text] = self._scan.neurons_with_token(text)[["layer", "neuron"]]
        return self._search_cache[text]

    def _filtered(self, selection: dict[str, Any]):
        frame = self._frame
        if selection["layer_filter"] >= 0:
            frame = frame[frame["layer"] == selection["layer_filter"]]
        if selection["search"]:
            frame = frame.merge(self._matches(selection["search"]), on=["layer", "neuron"], how="inner")
        return frame

    def _pages(self, selection: dict[str, Any]) -> int:
        return max(1, -(-len(self._filtered(selection)) // self._page_size))

    def _rows(self, selection: dict[str, Any]):
        frame = self._filtered(selection)
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
        (default: the selected one), clickable offline; it opens on the selected neuron, or on the first of
        ``neurons`` when none is selected. The widget's own selection is left as it is. Other keyword arguments
        as ``LensWidget.to_html``.

        Example: ``explorer.to_html("neurons.html", neurons=[(3, 42), (5, 7)])``.
        """
        chosen = None if neurons is None else [self._export_pair(pair) for pair in _iterate(neurons)]
        start = chosen[0] if chosen and (self.layer < 0 or self.neuron < 0) else None
        self._export_neurons, self._export_start = chosen, start
        try:
            return super().to_html(path, **kwargs)
        finally:
            self._export_neurons = self._export_start = None

    def _export_pair(self, pair) -> tuple[int, int]:
        try:
            layer, neuron = pair
        except (TypeError, ValueError):
            layer = neuron = None
        if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (layer, neuron)):
            raise ConfigError(f"neurons must be (layer, neuron) pairs of integers, e.g. [(3, 42), (5, 7)]; got {pair!r}")
        self._scan._check(int(layer), int(neuron))
        return int(layer), int(neuron)

    def _default_title(self) -> str:
        return "lens — neurons: " + str(self._scan.provenance.get("model_id", "?"))


def _iterate(neurons) -> Iterable:
    try:
        return iter(neurons)
    except TypeError:
        raise ConfigError(f"neurons must be a list of (layer, neuron) pairs, e.g. [(3, 42), (5, 7)]; got {neurons!r}") from None
