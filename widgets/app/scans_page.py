"""The Scans page (corpus scans → NeuronExplorer; admins start scans over an uploaded, bounded corpus) and
the Vision page (vision-language runs → PatchOverlay).

Both views come from other parts of lens (``lens.scan``, ``lens.widgets.NeuronExplorer``,
``lens.widgets.PatchOverlay``); the pages look them up when a session starts, list what the store holds
either way, and say plainly what this installation can and cannot show.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import json

import pandas as pd
import panel as pn

from lens.errors import LensError
from lens.store.core import normalize_tags

from .inputs import human_bytes, texts_from_upload
from .session import message_pane, sentence, show_message

__all__ = ["ScansPage", "VisionPage", "feature"]


def feature(name: str):
    """A view or capability of this installation, or None: ``"NeuronExplorer"``, ``"PatchOverlay"`` (widgets),
    ``"scan"`` (``lens.scan``)."""
    if name == "scan":
        return importlib.util.find_spec("lens.scan")
    import lens.widgets as lw

    return getattr(lw, name, None)


def _frame(entries, kind: str) -> pd.DataFrame:
    label = "documents" if kind == "scan" else "inputs"
    return pd.DataFrame([[e.id, e.owner, e.created_text, e.model.split("/")[-1], e.n_inputs, e.n_tokens,
                          e.preview[:80], ", ".join(e.tags), human_bytes(e.size_bytes)] for e in entries],
                        columns=["id", "owner", "created", "model", label, "tokens", "preview", "tags", "size"])


class _EntryList:
    """A table of one kind of entry with Open/Delete, a message area and a view area (shared by both pages)."""

    kind = "scan"
    page_name = "scans"
    vision: bool | None = None

    def __init__(self, session):
        self.s = session
        self.table = pn.widgets.Tabulator(_frame([], self.kind), selectable=1, disabled=True, show_index=False,
                                          height=260, sizing_mode="stretch_width", layout="fit_data_fill",
                                          css_classes=[f"lens-{self.kind}-table"])
        self.open_button = pn.widgets.Button(name="Open", button_type="primary", width=90,
                                             css_classes=[f"lens-{self.page_name}-open"])
        self.delete_button = pn.widgets.Button(name="Delete", button_type="danger", width=90,
                                               css_classes=[f"lens-{self.page_name}-delete"])
        self.message = message_pane(f"lens-{self.kind}-message")
        self.holder = pn.Column(sizing_mode="stretch_width")
        self.widget = None
        self._seen = None
        self.open_button.on_click(self._on_open)
        self.delete_button.on_click(self._on_delete)
        session.every(10, self._maybe_refresh, page=self.page_name)
        self.refresh()

    def refresh(self) -> None:
        self._seen = self.s.shared.version()
        filters = {} if self.vision is None else {"vision": self.vision}
        frame = _frame(self.s.shared.entries(self._entry_kind, **filters), self.kind)
        if not frame.equals(self.table.value):
            self.table.value = frame

    @property
    def _entry_kind(self) -> str:
        return "scan" if self.kind == "scan" else "run"

    def _maybe_refresh(self) -> None:
        if self.s.shared.version() != self._seen:
            self.refresh()

    def on_show(self) -> None:
        self._maybe_refresh()

    def _selected(self) -> str | None:
        frame = self.table.value
        rows = [i for i in self.table.selection if i < len(frame)]
        return str(frame.iloc[rows[0]]["id"]) if rows else None

    def _on_open(self, _=None) -> None:
        entry_id = self._selected()
        if entry_id is None:
            return show_message(self.message, "Select an entry to open.", "warning")
        self.open(entry_id)

    def _on_delete(self, _=None) -> None:
        entry_id = self._selected()
        if entry_id is None:
            return show_message(self.message, "Select an entry to delete.", "warning")
        try:
            self.s.store.delete(entry_id, by=self.s.user)
        except LensError as exc:
            return show_message(self.message, f"Not deleted: {exc}", "danger")
        self.s.shared.runs.forget(entry_id)
        show_message(self.message, f"Deleted {entry_id}.", "success")
        self._show(None)
        self.s.shared.invalidate()
        self.refresh()

    def _show(self, widget, *panes) -> None:
        if self.widget is not None:
            self.s.release(self.widget)
        self.widget = self.s.track(widget) if widget is not None else None
        self.holder.objects = [*panes] + ([widget.to_panel(sizing_mode="stretch_width")] if widget is not None else [])

    def open(self, entry_id: str) -> None:
        raise NotImplementedError  # each page shows its own view


class ScansPage(_EntryList):
    """See the module docstring."""

    kind = "scan"

    def __init__(self, session):
        super().__init__(session)
        limits = session.config.limits
        self.can_scan = feature("scan") is not None
        self.explorer = feature("NeuronExplorer")
        self.model = pn.widgets.Select(name="Model", options={m.title: m.name for m in session.config.models}, width=300)
        self.corpus = pn.widgets.FileInput(accept=".txt,.jsonl,.json", css_classes=["lens-corpus"])
        self.start = pn.widgets.Button(name="Start scan", button_type="primary", disabled=not self.can_scan, width=120)
        self.start.on_click(self._on_start)
        self.documents: list[str] = []
        self.corpus.param.watch(self._on_corpus, "value")
        notes = []
        if self.explorer is None:
            notes.append("This lens has no NeuronExplorer view yet: an opened scan shows its manifest and files.")
        admin = []
        if session.is_admin:
            admin = [pn.pane.HTML(
                f"<h4>New scan (admins)</h4><small>A corpus of at most {limits.corpus_documents:,} documents and "
                f"{human_bytes(limits.corpus_bytes)} (one document per line of a .txt, or .jsonl/.json)."
                + ("" if self.can_scan else " <b>This lens has no corpus scans (lens.scan); upgrade lens to run them.</b>")
                + "</small>"), pn.Row(self.model, self.corpus, self.start)]
        self.panel = pn.Column(pn.pane.HTML("<h3>Corpus scans</h3>" + "".join(f"<p><small>{n}</small></p>" for n in notes)),
                               self.table, pn.Row(self.open_button, self.delete_button), self.message, self.holder,
                               *admin, sizing_mode="stretch_width")

    def open(self, entry_id: str) -> None:
        unreadable = None
        try:
            entry = self.s.store.entry(entry_id, kind="scan")
            folder = self.s.store.scan_folder(entry.id)
            if self.explorer is not None:
                import lens

                try:
                    widget = self.explorer(lens.Scan.load(folder))
                except (LensError, OSError, ValueError) as exc:
                    # the stored files are whole (the store checked them) but not a scan this lens can read:
                    # say why, and still show what the store knows about it
                    unreadable = exc
                else:
                    show_message(self.message, "")
                    return self._show(widget, pn.pane.HTML(f"<b>NeuronExplorer — scan {entry.id}</b>"))
            manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (LensError, OSError, ValueError) as exc:
            return show_message(self.message, sentence(exc), "danger")
        rows = "".join(f"<tr><td>{html.escape(n)}</td><td><code>{s[:16]}…</code></td></tr>" for n, s in sorted(entry.files.items()))
        corpus = manifest.get("corpus") or {}
        if unreadable is not None:
            show_message(self.message, "The neuron explorer cannot open this scan: " + sentence(unreadable), "warning")
        else:
            show_message(self.message, "")
        self._show(None, pn.pane.HTML(
            f"<div class='lens-scans-view'><h4>Scan {entry.id}</h4><p>{html.escape(entry.model)} · {entry.n_inputs:,} documents · {entry.n_tokens:,} "
            f"tokens · by {html.escape(entry.owner)} · schema {html.escape(str(manifest.get('schema')))}</p>"
            f"<p>{html.escape(str(corpus.get('description') or ''))}</p>"
            f"<table><tr><th>file</th><th>sha256</th></tr>{rows}</table></div>", sizing_mode="stretch_width"))

    def _on_corpus(self, event) -> None:
        self.documents = []
        if event.new is None:
            return
        limits = self.s.config.limits
        try:
            if len(event.new) > limits.corpus_bytes:
                raise LensError(f"the corpus is {human_bytes(len(event.new))}; scans take at most {human_bytes(limits.corpus_bytes)}")
            documents = texts_from_upload(self.corpus.filename or "", event.new,
                                          dataclasses.replace(limits, upload_bytes=limits.corpus_bytes))
            if not documents or len(documents) > limits.corpus_documents:
                raise LensError(f"the corpus has {len(documents)} documents; scans take 1 to {limits.corpus_documents:,}")
        except LensError as exc:
            return show_message(self.message, f"Corpus refused: {exc}", "danger")
        self.documents = documents
        show_message(self.message, f"{self.corpus.filename}: {len(documents):,} documents read.", "info")

    def _on_start(self, _=None) -> None:
        if not self.s.is_admin:
            return show_message(self.message, "Only admins start scans.", "danger")
        if not self.documents:
            return show_message(self.message, "Upload a corpus first.", "warning")
        try:
            job = self.s.store.jobs.submit(self.s.user, "scan", self.model.value,
                                           {"documents": self.documents, "tags": normalize_tags("scan")},
                                           max_active=self.s.config.limits.jobs_per_user)
        except LensError as exc:
            return show_message(self.message, f"Not queued: {exc}", "danger")
        show_message(self.message, f"Scan job {job.id} queued; the scan appears here when it is done.", "info")


class VisionPage(_EntryList):
    """See the module docstring."""

    kind = "vision"
    page_name = "vision"
    vision = True

    def __init__(self, session):
        super().__init__(session)
        self.overlay = feature("PatchOverlay")
        note = ("Runs of vision-language models, with the patch overlay of their visual tokens."
                if self.overlay is not None else
                "Runs of vision-language models. This lens has no PatchOverlay view yet: open these runs on the Runs "
                "page for their attention views.")
        self.panel = pn.Column(pn.pane.HTML(f"<h3>Vision</h3><p><small>{note}</small></p>"), self.table,
                               pn.Row(self.open_button, self.delete_button), self.message, self.holder,
                               sizing_mode="stretch_width")

    def open(self, entry_id: str) -> None:
        if self.overlay is None:
            self.s.page("runs").open(entry_id)
            return
        try:
            entry = self.s.store.entry(entry_id, kind="run")
            widget = self.overlay(self.s.shared.runs.get(entry.id))
        except LensError as exc:
            return show_message(self.message, sentence(exc), "danger")
        show_message(self.message, "")
        self._show(widget, pn.pane.HTML(f"<b>PatchOverlay — run {entry.id}</b>"))
