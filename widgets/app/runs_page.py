"""The Runs page: the team's runs (search, filter), a run's views, two runs compared, tags, deletion."""

from __future__ import annotations

import html
import logging

import pandas as pd
import panel as pn

from lens.errors import LensError
from lens.store.files import check_id

from .session import message_pane, sentence, show_message
from .views import VIEWS, make_view

__all__ = ["RunsPage", "COLUMNS"]

log = logging.getLogger("lens.serve")

COLUMNS = ["id", "owner", "created", "model", "attention", "quant", "inputs", "tokens", "preview", "tags"]


def entries_frame(entries) -> pd.DataFrame:
    return pd.DataFrame(
        [[e.id, e.owner, e.created_text, e.model.split("/")[-1], e.attention, e.quant or "—", e.n_inputs, e.n_tokens,
          e.preview[:90], ", ".join(e.tags)] for e in entries],
        columns=COLUMNS,
    )


class RunsPage:
    """See the module docstring. ``open(id)`` shows a run, ``compare(a, b)`` two."""

    def __init__(self, session):
        self.s = session
        self.search = pn.widgets.TextInput(name="Search", placeholder="model, owner, text, tag or id",
                                           css_classes=["lens-search"], width=280)
        self.owner = pn.widgets.Select(name="Owner", options=["everyone", "me"], value="everyone", width=140)
        self.table = pn.widgets.Tabulator(
            entries_frame([]), selectable="checkbox", disabled=True, show_index=False, pagination="local",
            page_size=12, sizing_mode="stretch_width", css_classes=["lens-runs-table"], layout="fit_data_fill",
        )
        self.open_button = pn.widgets.Button(name="Open", button_type="primary", css_classes=["lens-open"], width=90)
        self.compare_button = pn.widgets.Button(name="Compare two", css_classes=["lens-compare"], width=120)
        self.delete_button = pn.widgets.Button(name="Delete", button_type="danger", css_classes=["lens-delete"], width=90)
        self.tags = pn.widgets.TextInput(placeholder="tags, comma separated", css_classes=["lens-tags"], width=220)
        self.tags_button = pn.widgets.Button(name="Set tags", css_classes=["lens-set-tags"], width=90)
        self.run_id = pn.widgets.TextInput(name="Open a run by id", placeholder="16 hex digits, then Enter",
                                           css_classes=["lens-run-id"], width=220)
        self.message = message_pane("lens-runs-message")
        self.title = pn.pane.HTML("<span class='lens-view-title' data-n='0'>Select a run and press Open, or pick two "
                                  "and press Compare two.</span>", sizing_mode="stretch_width")
        self.view_kind = pn.widgets.RadioButtonGroup(options=list(VIEWS), value="SinkMap", visible=False,
                                                     css_classes=["lens-view-kind"], button_type="default")
        self.holder = pn.Column(sizing_mode="stretch_width", min_height=50, css_classes=["lens-view"])
        self.current: tuple[str, ...] | None = None  # ("run", id) or ("compare", a, b)
        self.widget = None
        self.layer_head: tuple[int, int] | None = None
        self.views_shown = 0
        self._seen = None

        self.search.param.watch(lambda e: self.refresh(), "value")
        self.owner.param.watch(lambda e: self.refresh(), "value")
        self.open_button.on_click(self._on_open)
        self.compare_button.on_click(self._on_compare)
        self.delete_button.on_click(self._on_delete)
        self.tags_button.on_click(self._on_tags)
        self.run_id.param.watch(lambda e: self.open(e.new.strip()) if e.new.strip() else None, "value")
        self.view_kind.param.watch(lambda e: self._show_view(e.new), "value")
        session.every(10, self._maybe_refresh, page="runs")
        self.refresh()
        self.panel = pn.Column(
            pn.Row(self.search, self.owner, self.run_id, sizing_mode="stretch_width"),
            self.table,
            pn.Row(self.open_button, self.compare_button, self.delete_button, self.tags, self.tags_button),
            self.message,
            self.title,
            self.view_kind,
            self.holder,
            sizing_mode="stretch_width",
        )

    # -- the table ----------------------------------------------------------------------------------
    def refresh(self) -> None:
        owner = {"everyone": None, "me": self.s.user}.get(self.owner.value, self.owner.value)
        self._seen = self.s.shared.version()
        frame = entries_frame(self.s.shared.entries("run", search=self.search.value or None, owner=owner))
        if not frame.equals(self.table.value):  # an unchanged table is not sent again
            self.table.value = frame

    def _maybe_refresh(self) -> None:
        if self.s.shared.version() != self._seen:
            self.refresh()

    def on_show(self) -> None:
        self._maybe_refresh()

    def _selected_ids(self) -> list[str]:
        frame = self.table.value
        return [str(frame.iloc[i]["id"]) for i in self.table.selection if i < len(frame)]

    # -- actions ------------------------------------------------------------------------------------
    def _on_open(self, _=None) -> None:
        ids = self._selected_ids()
        if len(ids) != 1:
            return show_message(self.message, f"Select one run to open (selected: {len(ids)}).", "warning")
        self.open(ids[0])

    def _on_compare(self, _=None) -> None:
        ids = self._selected_ids()
        if len(ids) != 2:
            return show_message(self.message, f"Select exactly two runs to compare (selected: {len(ids)}).", "warning")
        self.compare(*ids)

    def _on_delete(self, _=None) -> None:
        ids = self._selected_ids() or ([self.current[1]] if self.current and self.current[0] == "run" else [])
        if not ids:
            return show_message(self.message, "Select the runs to delete.", "warning")
        done = []
        try:
            for entry_id in ids:
                self.s.store.delete(entry_id, by=self.s.user)
                self.s.shared.runs.forget(entry_id)
                done.append(entry_id)
        except LensError as exc:
            show_message(self.message, (f"Deleted {', '.join(done)}. " if done else "") + f"Not deleted: {exc}", "danger")
        else:
            show_message(self.message, f"Deleted {', '.join(done)}.", "success")
        if self.current and any(i in self.current for i in done):
            self._clear_view()
        self.s.shared.invalidate()
        self.refresh()

    def _on_tags(self, _=None) -> None:
        ids = self._selected_ids() or ([self.current[1]] if self.current and self.current[0] == "run" else [])
        if not ids:
            return show_message(self.message, "Select the runs to tag.", "warning")
        try:
            for entry_id in ids:
                self.s.store.set_tags(entry_id, self.tags.value, by=self.s.user)
        except LensError as exc:
            return show_message(self.message, f"Tags not changed: {exc}", "danger")
        show_message(self.message, f"Tags of {', '.join(ids)} set.", "success")
        self.s.shared.invalidate()
        self.refresh()

    # -- views --------------------------------------------------------------------------------------
    def open(self, entry_id: str, view: str | None = None) -> bool:
        """Show the run ``entry_id`` (its SinkMap first, or ``view``); a message if it cannot be shown."""
        try:
            check_id(entry_id)
            entry = self.s.store.entry(entry_id, kind="run")
            run = self.s.shared.runs.get(entry.id)
        except LensError as exc:
            show_message(self.message, sentence(exc), "danger")
            return False
        show_message(self.message, "")
        self.current = ("run", entry.id)
        self.layer_head = None
        self._run, self._entry = run, entry
        self.s.go("runs")
        if pn.state.location is not None:
            pn.state.location.update_query(run=entry.id)
        kind = view or "SinkMap"
        with pn.io.hold():
            self.view_kind.visible = True
            if self.view_kind.value != kind:
                self.view_kind.value = kind  # its watcher shows the view
            else:
                self._show_view(kind)
        return True

    def compare(self, a: str, b: str) -> bool:
        """Show ``lens.compare(run a, run b)`` in a CompareView; a message if they cannot be compared."""
        import lens
        import lens.widgets as lw

        try:
            ea, eb = (self.s.store.entry(i, kind="run") for i in (a, b))
            result = lens.compare(self.s.shared.runs.get(ea.id), self.s.shared.runs.get(eb.id))
            widget = lw.CompareView(result)
        except LensError as exc:
            show_message(self.message, f"These runs cannot be compared: {exc}", "danger")
            return False
        show_message(self.message, "")
        self.current = ("compare", ea.id, eb.id)
        title = (f"CompareView — {ea.id} ({html.escape(result.labels[0])}) vs {eb.id} "
                 f"({html.escape(result.labels[1])})")
        with pn.io.hold():
            self.view_kind.visible = False
            self._place(widget, "CompareView", f"{ea.id},{eb.id}", title)
        return True

    def _show_view(self, kind: str) -> None:
        if not self.current or self.current[0] != "run":
            return
        if self.widget is not None and hasattr(self.widget, "layer") and hasattr(self.widget, "head"):
            self.layer_head = (int(self.widget.layer), int(self.widget.head))
        layer, head = self.layer_head or (None, None)
        try:
            widget = make_view(kind, self._run, layer=layer, head=head)
        except LensError as exc:
            return show_message(self.message, f"{kind} cannot show this run: {exc}", "warning")
        e = self._entry
        title = (f"{kind} — run {e.id} · {html.escape(e.model.split('/')[-1])} · {html.escape(e.attention)}"
                 f"{' · ' + html.escape(e.quant) if e.quant else ''} · by {html.escape(e.owner)} · {e.created_text} UTC")
        with pn.io.hold():
            self._place(widget, kind, e.id, title)

    def _place(self, widget, kind: str, ids: str, title: str) -> None:
        old = self.widget
        self.widget = self.s.track(widget)
        self.views_shown += 1
        self.holder.objects = [widget.to_panel(sizing_mode="stretch_width")]
        self.title.object = (f"<span class='lens-view-title' data-view='{kind}' data-run='{ids}' "
                             f"data-n='{self.views_shown}'>{title}</span>")
        if old is not None:
            self.s.release(old)

    def _clear_view(self) -> None:
        if self.widget is not None:
            self.s.release(self.widget)
        self.widget, self.current = None, None
        self.holder.objects = []
        self.view_kind.visible = False
        self.title.object = "<span class='lens-view-title' data-n='0'>The run shown was deleted.</span>"
