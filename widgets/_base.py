"""The base every lens widget shares: one ESM module per component, binary traits, Python-side derivation
of what the browser shows, a standalone HTML export, and the same component inside Panel.

How a component works (the same in JupyterLab, Panel and a standalone HTML file):

* The ESM in ``static/`` draws and handles input. It sets *selection* traits (``seq``, ``layer``, ``head``…)
  and redraws when *derived* traits arrive (``view``, ``mass``, ``tokens``…).
* Python observes the selection traits and computes the derived traits (``LensWidget._derive``), so the
  browser only ever holds what is on screen: pooled overviews and the selected head, not every number of
  the run. Requests that are not selections (a full-resolution tile) are traits as well, not custom
  messages, because Panel's AnyWidget adapter has no ``model.send``.
* The standalone export precomputes ``_derive`` for every selection into a lookup table and ships it with
  a small model shim (``static/_standalone.js``) that answers ``model.set``/``save_changes`` from that
  table, so the very same ``render()`` runs without a kernel.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import math
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import anywidget
import traitlets

from lens.atomic import atomic_write_text
from lens.errors import ConfigError
from ._data import f16_bits

__all__ = ["LensWidget", "STATIC"]

STATIC = Path(__file__).with_name("static")
_BASE_TRAITS = frozenset(anywidget.AnyWidget.class_trait_names()) | {"_esm", "_css", "_anywidget_id"}
DEFAULT_EXPORT_BYTES = 3_000_000


def _read_static(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


def _script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element whatever strings it holds (tokens can be "</script>")."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _jsonable(value: Any) -> Any:
    """NaN/inf are not JSON; the components treat ``null`` as "no value"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


#: The shared helpers, by concern, prepended in this order to every component's module text.
SHARED_JS = ("_core", "_grids", "_charts")


class LensWidget(anywidget.AnyWidget):
    """Base class of the lens components (not used directly).

    Subclasses name their ESM file in ``_component``, list the traits whose change makes Python recompute
    what is shown in ``_selection``, implement ``_derive(selection, hints)``, and enumerate the selections
    a static export should contain in ``_export_selections()``.

    Example (what every component offers)::

        w = lens.widgets.SinkMap(run)
        w.layer, w.head                      # read the browser's selection back
        w.observe(print, names=["head"])     # or react to it
        w.to_html("sinks.html")              # one offline file
        w.to_panel()                         # the same component in a Panel app
    """

    _component: ClassVar[str] = ""
    _selection: ClassVar[tuple[str, ...]] = ()
    # float32 byte traits the static export may store as half floats
    _float_traits: ClassVar[frozenset[str]] = frozenset()

    live = traitlets.Bool(True, help="False in a standalone export: nothing answers requests").tag(sync=True)

    def __init_subclass__(cls, **kwargs):
        component = cls.__dict__.get("_component")
        if component:
            # One module per component: the shared helpers are prepended as text because a blob-URL module
            # (how anywidget and Panel load ESM) cannot import a sibling file, and we ship no bundler.
            cls._esm = "\n".join(_read_static(f"{name}.js") for name in (*SHARED_JS, component))
            cls._css = _read_static("lens.css")
        super().__init_subclass__(**kwargs)

    def __init__(self, **traits):
        self._derived_for: tuple | None = None
        self._mirrors: list[Callable[[dict[str, Any]], None]] = []
        if self._selection:
            # derive before the widget opens, so the browser gets one complete state instead of two
            defaults = self.class_traits()
            selection = {n: traits.get(n, defaults[n].default_value) for n in self._selection}
            self._validate_selection(selection)
            traits = {**traits, **self._derive(selection, {})}
            self._derived_for = tuple(selection.values())
        super().__init__(**traits)
        if self._selection:
            self.observe(self._on_selection, names=list(self._selection))

    # -- derivation ---------------------------------------------------------------------------------
    def _derive(self, selection: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
        """Traits that depend on ``selection``; ``hints`` lowers resolution for a static export."""
        return {}

    def _validate_selection(self, selection: dict[str, Any]) -> None:
        """Raise ``ConfigError`` for a selection the data cannot show (override)."""

    def _on_selection(self, change) -> None:
        self._refresh()

    def _current_selection(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._selection}

    def _refresh(self) -> None:
        selection = self._current_selection()
        key = tuple(selection.values())
        # ipywidgets applies a browser update trait by trait; several selection traits changing together
        # would otherwise recompute the same view once per trait
        if key == self._derived_for:
            return
        self._validate_selection(selection)
        updates = self._derive(selection, {})
        self._derived_for = key
        self._set_synced(updates)

    def _set_synced(self, updates: dict[str, Any]) -> None:
        """Set several traits as one update: one comm message in Jupyter, one patch in Panel."""
        with self.hold_trait_notifications(), self.hold_sync():
            for name, value in updates.items():
                setattr(self, name, value)
            for mirror in self._mirrors:
                mirror(updates)

    # -- trait bookkeeping --------------------------------------------------------------------------
    @classmethod
    def _lens_trait_names(cls) -> list[str]:
        return sorted(
            name for name, trait in cls.class_traits(sync=True).items() if name not in _BASE_TRAITS
        )

    def _state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._lens_trait_names()}

    def payload_bytes(self) -> dict[str, int]:
        """Bytes each synced trait sends to the browser now (binary traits: buffer size; others: JSON size).

        Example: ``sum(lens.widgets.AttentionExplorer(run).payload_bytes().values())``.
        """
        out = {}
        for name, value in self._state().items():
            if isinstance(value, (bytes, bytearray, memoryview)):
                out[name] = len(value)
            else:
                out[name] = len(json.dumps(_jsonable(value)))
        return out

    # -- display ----------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        """What the component shows and its selection — never the binary buffers it sends (ipywidgets'
        default repr lists every changed trait, raw bytes included)."""
        return _short_repr(type(self).__name__, self._state(), self._selection)

    # -- standalone export --------------------------------------------------------------------------
    def _export_selections(self) -> Iterable[dict[str, Any]]:
        """Every selection a static export answers (override; default: only the current one)."""
        return [self._current_selection()]

    def _export_hints(self, level: int) -> dict[str, Any] | None:
        """Resolution hints for a static export; each level is coarser. None: nothing left to reduce."""
        return {} if level == 0 else None

    def to_html(
        self,
        path: str | Path | None = None,
        *,
        title: str | None = None,
        max_bytes: int = DEFAULT_EXPORT_BYTES,
        precision: str = "half",
        sequences: Iterable[int] | None = None,
    ) -> str | Path:
        """Export this component to one standalone HTML file that works offline, without a kernel.

        The file inlines the component's ESM and CSS, a small model shim, and the data (gzip + base64);
        nothing is fetched when it opens. Selections (clicking a head, changing the sequence) work from
        a table precomputed here; requests that need Python (full-resolution tiles) are disabled.
        ``precision="half"`` stores numbers as 16-bit floats (≈3 significant digits — plenty for
        colours and hover values); ``"single"`` keeps float32. ``sequences`` limits a multi-sequence
        component to some sequences (the current one is always included). If the file would exceed ``max_bytes``,
        the export pools more coarsely (see each component's docstring) and raises ``ConfigError`` if
        even the coarsest version does not fit.

        Returns the HTML text when ``path`` is None, else writes it and returns the ``Path``.

        Example::

            lens.widgets.AttentionExplorer(run).to_html("attention.html")
        """
        if precision not in ("half", "single"):
            raise ConfigError(f"precision must be 'half' or 'single'; got {precision!r}")
        level = 0
        sizes = []
        while True:
            hints = self._export_hints(level)
            if hints is None:
                raise ConfigError(
                    f"the standalone export of this {type(self).__name__} needs more than max_bytes={max_bytes:,} "
                    f"(smallest attempt: {min(sizes):,} bytes); pass a larger max_bytes, or build the widget "
                    "from a run with fewer sequences or kept heads"
                )
            text = self._build_html(hints, title, precision, sequences)
            sizes.append(len(text.encode("utf-8")))
            if sizes[-1] <= max_bytes:
                break
            level += 1
        if path is None:
            return text
        return atomic_write_text(path, text)  # temp file + rename, the umask's permissions

    def _build_html(self, hints: dict[str, Any], title: str | None, precision: str, sequences) -> str:
        blobs: list[bytes] = []
        specs: list[list[Any]] = []
        pool: list[Any] = []
        index: dict[tuple[str, bytes], int] = {}
        offset = 0

        def encode(name: str, value: Any) -> Any:
            nonlocal offset
            if isinstance(value, (bytes, bytearray, memoryview)):
                raw = bytes(value)
                enc = "f16" if precision == "half" and name in self._float_traits else "raw"
                data = f16_bits(raw) if enc == "f16" else raw
                digest = (enc, hashlib.sha1(data).digest())
                if digest not in index:
                    index[digest] = len(specs)
                    specs.append([offset, len(data), enc])
                    blobs.append(data)
                    offset += len(data)
                return {"$lensblob": index[digest]}
            value = _jsonable(value)
            text = json.dumps(value, separators=(",", ":"))
            if len(text) < 64:
                return value
            # token lists and the like repeat across many selections: store each distinct one once
            digest = ("json", hashlib.sha1(text.encode()).digest())
            if digest not in index:
                index[digest] = len(pool)
                pool.append(value)
            return {"$lensvalue": index[digest]}

        selections = list(self._export_selections())
        if sequences is not None and "seq" in self._selection:
            wanted = {int(s) for s in sequences} | {int(getattr(self, "seq"))}
            selections = [s for s in selections if s["seq"] in wanted]
        table = {}
        for selection in selections:
            self._validate_selection(selection)
            derived = self._derive(selection, hints)
            key = json.dumps(list(selection.values()), separators=(",", ":"))
            table[key] = {name: encode(name, value) for name, value in derived.items()}
        state = self._state()
        state.update(self._derive(self._current_selection(), hints) if self._selection else {})
        state["live"] = False
        manifest = {
            "component": type(self).__name__,
            "selection": list(self._selection),
            "state": {name: encode(name, value) for name, value in state.items()},
            "table": table,
            "blobs": specs,
            "values": pool,
        }
        data = base64.b64encode(gzip.compress(b"".join(blobs), compresslevel=9, mtime=0)).decode("ascii")
        title = title or self._default_title()
        return _HTML.format(
            title=html.escape(title),
            css=self._css.replace("</", "<\\/"),
            manifest=_script_json(manifest),
            esm=_script_json(self._esm),
            data=data,
            boot=_read_static("_standalone.js"),
        )

    def _default_title(self) -> str:
        return f"lens — {type(self).__name__}"

    # -- Panel ----------------------------------------------------------------------------------------
    def to_panel(self, **params):
        """This component as a Panel object (``panel.custom.AnyWidgetComponent``) running the same ESM.

        The Panel object and this widget stay in sync both ways: a click in the dashboard updates
        ``widget.layer``/``widget.head`` (and every ``observe`` callback), and the Python-side derivation
        answers it. Extra ``params`` go to the Panel component (``sizing_mode``, ``height``…).

        Example::

            import panel as pn
            explorer = lens.widgets.AttentionExplorer(run)
            pn.Column("# Attention", explorer.to_panel()).servable()
        """
        cls = _panel_class(type(self))
        component = cls(**self._state(), **params)
        names = self._lens_trait_names()
        updating = [False]

        def from_panel(*events):
            if updating[0]:
                return
            changed = {e.name: e.new for e in events if _differs(getattr(self, e.name), e.new)}
            if changed:
                with self.hold_trait_notifications():
                    for name, value in changed.items():
                        setattr(self, name, value)

        def mirror(updates: dict[str, Any]) -> None:
            changed = {k: v for k, v in updates.items() if _differs(getattr(component, k), v)}
            if changed:
                updating[0] = True
                try:
                    component.param.update(**changed)
                finally:
                    updating[0] = False

        def to_panel_trait(change) -> None:
            mirror({change.name: change.new})

        component.param.watch(from_panel, names)
        self.observe(to_panel_trait, names=names)
        self._mirrors.append(mirror)
        return component


def _short_repr(name: str, state: dict[str, Any], selection: Iterable[str]) -> str:
    """``SinkMap(seq=0, layer=2, head=5; 14.2 kB to the browser)`` — selection traits and payload size only."""
    shown = [f"{k}={state[k]!r}" for k in selection if k in state]
    for extra in ("token", "metric"):
        if extra in state and extra not in selection:
            shown.append(f"{extra}={state[extra]!r}")
    labels = (state.get("info") or {}).get("labels") if isinstance(state.get("info"), dict) else None
    if labels:
        shown.insert(0, f"runs={list(labels)!r}")
    size = 0
    for value in state.values():
        size += len(value) if isinstance(value, (bytes, bytearray, memoryview)) else len(json.dumps(_jsonable(value), default=str))
    return f"{name}({', '.join(shown)}; {size / 1e3:.1f} kB to the browser)"


def _differs(a: Any, b: Any) -> bool:
    try:
        return bool(a != b)
    except Exception:  # e.g. numpy arrays; never expected for synced traits
        return a is not b


_PANEL_CLASSES: dict[type, type] = {}


def _panel_class(widget_cls: type) -> type:
    """A ``panel.custom.AnyWidgetComponent`` subclass mirroring ``widget_cls``'s synced traits."""
    base = next(c for c in widget_cls.__mro__ if c.__dict__.get("_component"))
    if base in _PANEL_CLASSES:
        return _PANEL_CLASSES[base]
    import panel as pn
    import param

    reserved = set(pn.custom.AnyWidgetComponent.param)
    params: dict[str, Any] = {}
    for name in base._lens_trait_names():
        if name in reserved:
            raise ConfigError(f"trait {name!r} of {base.__name__} collides with a Panel parameter; rename it")
        trait = base.class_traits()[name]
        default = trait.default()  # container traits keep their default in a factory, not default_value
        if isinstance(trait, traitlets.Bytes):
            params[name] = param.Bytes(default=default)
        elif isinstance(trait, traitlets.Bool):
            params[name] = param.Boolean(default=default)
        elif isinstance(trait, traitlets.Int):
            params[name] = param.Integer(default=default)
        elif isinstance(trait, traitlets.Float):
            params[name] = param.Number(default=default)
        elif isinstance(trait, traitlets.Unicode):
            params[name] = param.String(default=default)
        elif isinstance(trait, traitlets.Dict):
            params[name] = param.Dict(default=dict(default or {}))
        elif isinstance(trait, (traitlets.List, traitlets.Tuple)):
            params[name] = param.List(default=list(default or []))
        else:
            raise ConfigError(f"trait {name!r} of {base.__name__} has no Panel equivalent ({type(trait).__name__})")
    selection = base._selection

    def __repr__(self, *args, **kwargs) -> str:  # Panel: every parameter, raw buffers included, by default
        return _short_repr(type(self).__name__, {n: getattr(self, n) for n in params}, selection)

    namespace = {"_esm": base._esm, "_stylesheets": [base._css], "__module__": __name__, "__repr__": __repr__,
                 **params}
    cls = type(f"{base.__name__}Panel", (pn.custom.AnyWidgetComponent,), namespace)
    _PANEL_CLASSES[base] = cls
    return cls


_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body class="lens-standalone">
<div id="lens-app"></div>
<noscript>This lens view needs JavaScript.</noscript>
<script type="application/json" id="lens-manifest">{manifest}</script>
<script type="application/json" id="lens-esm">{esm}</script>
<script type="text/plain" id="lens-data">{data}</script>
<script type="module">
{boot}
</script>
</body>
</html>
"""
