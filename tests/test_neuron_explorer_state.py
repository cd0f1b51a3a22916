"""NeuronExplorer keeps a valid state: every selection trait (layer, neuron, page, sort, descending, layer_filter,
search) is checked before it is set, so a rejected value raises a LensError and leaves the previous value and what
the browser was sent; pages beyond the end are clamped to the page the table shows; ``to_html`` leaves the
selection as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CORPUS
from test_widgets_support import read_export

import lens
from lens.errors import ConfigError, LensError

lw = pytest.importorskip("lens.widgets")

SELECTION = ("sort", "descending", "layer_filter", "search", "page", "layer", "neuron")
DERIVED = ("table", "table_meta", "hist", "detail")
PAGE_SIZE = 40


@pytest.fixture(scope="module")
def scan(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    model = lens.load(tiny_model_dir("gpt2"))
    s = lens.scan(model, CORPUS[:8], out=tmp_path_factory.mktemp("explorer-state") / "s", top_k=3, progress=False)
    assert s.layers == [0, 1] and s.n_neurons == 128  # the numbers the cases below are written for
    return s


@pytest.fixture
def explorer(scan):
    e = lw.NeuronExplorer(scan, page_size=PAGE_SIZE)
    with e.hold_trait_notifications():
        e.layer, e.neuron = 1, 5
    e.page = 2
    assert e.detail["layer"] == 1 and e.detail["neuron"] == 5 and e.table_meta["page"] == 2
    return e


def snapshot(e) -> dict:
    """The selection and everything derived from it (what the browser holds)."""
    return {name: getattr(e, name) for name in SELECTION + DERIVED}


def a_token(scan, layer: int) -> str:
    """A token that is the top example of some neuron of ``layer`` (so a search for it has hits there)."""
    return scan.query("SELECT token FROM examples WHERE rank = 0 AND layer = ? LIMIT 1", [layer])["token"].iloc[0]


# trait, a rejected value, what the message must name
REJECTED = [
    ("layer", 7, "layer 7 was not scanned"),
    ("layer", -2, "layer -2 was not scanned"),
    ("layer", "1", "integer"),
    ("neuron", 4000, "neuron 4000 does not exist"),
    ("neuron", -5, "neuron -5 does not exist"),
    ("neuron", 2.0, "integer"),
    ("page", -1, "page must be"),
    ("page", "next", "integer"),
    ("sort", "nonsense", "sort must be one of"),
    ("sort", 3, "sort must be"),
    ("descending", "yes", "descending must be True or False"),
    ("layer_filter", 9, "layer_filter 9 was not scanned"),
    ("layer_filter", None, "integer"),
    ("search", 42, "search must be a string"),
]


@pytest.mark.parametrize("name, bad, message", REJECTED, ids=[f"{n}={b!r}" for n, b, _ in REJECTED])
def test_a_rejected_value_keeps_the_previous_state(explorer, name, bad, message):
    before = snapshot(explorer)
    changes = []
    explorer.observe(changes.append, names=list(SELECTION + DERIVED))
    with pytest.raises(ConfigError, match=message) as info:
        setattr(explorer, name, bad)
    assert isinstance(info.value, LensError)
    assert snapshot(explorer) == before and changes == []
    # the same inside a batch of assignments (how ipywidgets and Panel apply a browser update): nothing is
    # left half-set, and the widget still works
    with pytest.raises(ConfigError, match=message), explorer.hold_trait_notifications():
        setattr(explorer, name, bad)
    assert snapshot(explorer) == before and changes == []
    explorer.sort = "mean"
    assert explorer.table_meta["page"] == 2 and explorer.detail["neuron"] == 5
    assert "NeuronExplorer" in explorer.to_html(None)


@pytest.mark.parametrize("name, bad, message", REJECTED, ids=[f"{n}={b!r}" for n, b, _ in REJECTED])
def test_the_constructor_rejects_the_same_values(scan, name, bad, message):
    with pytest.raises(ConfigError, match=message):
        lw.NeuronExplorer(scan, **{name: bad})


def test_accepted_values_are_what_the_browser_shows(explorer, scan):
    explorer.descending = np.bool_(False)
    explorer.layer_filter = np.int64(1)
    assert explorer.descending is False and explorer.layer_filter == 1 and type(explorer.layer_filter) is int
    table = np.frombuffer(explorer.table, np.float32).reshape(-1, 7)
    assert (table[:, 0] == 1).all() and (np.diff(table[:, 2]) >= 0).all()  # layer 1 only, ascending max
    explorer.neuron = 127
    assert explorer.detail["neuron"] == 127 and explorer.detail["layer"] == 1
    token = a_token(scan, 1)
    explorer.search = token
    assert explorer.table_meta["search"] == token and explorer.table_meta["rows"] >= 1
    assert explorer.page == explorer.table_meta["page"] == 0  # fewer hits than one page: page 2 is clamped


def test_pages_beyond_the_end_are_clamped_like_the_table(scan):
    e = lw.NeuronExplorer(scan, page_size=PAGE_SIZE, page=1000)
    pages = -(-2 * 128 // PAGE_SIZE)
    assert e.table_meta["pages"] == pages and e.page == e.table_meta["page"] == pages - 1
    e.page = 0
    e.page = 999
    assert e.page == e.table_meta["page"] == pages - 1
    # a filter that leaves fewer pages moves the page with the table
    e.layer_filter = 1
    assert e.table_meta["pages"] == -(-128 // PAGE_SIZE)
    assert e.page == e.table_meta["page"] == -(-128 // PAGE_SIZE) - 1
    # a page and a filter set together (the order of a browser update is arbitrary)
    with e.hold_trait_notifications():
        e.page = 5
        e.layer_filter = -1
    assert e.page == e.table_meta["page"] == 5
    with e.hold_trait_notifications():
        e.page = 6
        e.layer_filter = 0
    assert e.page == e.table_meta["page"] == -(-128 // PAGE_SIZE) - 1
    # the constructor resolves its selection as a whole, whatever the keyword order
    e = lw.NeuronExplorer(scan, page_size=PAGE_SIZE, page=5, layer_filter=1)
    assert e.page == e.table_meta["page"] == -(-128 // PAGE_SIZE) - 1
    e = lw.NeuronExplorer(scan, page_size=PAGE_SIZE, search="no such token in any example")
    assert e.table_meta["rows"] == 0 and e.page == e.table_meta["page"] == 0


def test_to_html_leaves_the_selection_as_it_was(explorer, scan):
    before = snapshot(explorer)
    changes = []
    explorer.observe(changes.append, names=list(SELECTION + DERIVED))
    html = explorer.to_html(None, neurons=[(0, 1), (1, 2)])
    assert snapshot(explorer) == before and changes == []
    export = read_export(html)
    assert export["state"]["layer"] == 1 and export["state"]["neuron"] == 5  # opens on the neuron shown now
    shown = {(json.loads(key)[5], json.loads(key)[6]) for key in export["table"]}
    assert shown == {(0, 1), (1, 2)}

    # nothing selected: the export opens on the first exported neuron, the widget still shows none
    fresh = lw.NeuronExplorer(scan, page_size=PAGE_SIZE)
    fresh_before = snapshot(fresh)
    export = read_export(fresh.to_html(None, neurons=[(1, 3), (0, 4)]))
    assert snapshot(fresh) == fresh_before and (fresh.layer, fresh.neuron) == (-1, -1) and fresh.detail == {}
    assert (export["state"]["layer"], export["state"]["neuron"]) == (1, 3)
    assert export["state"]["detail"]["layer"] == 1 and export["state"]["detail"]["neuron"] == 3
    # the widget's own selection is what a later export and the next refresh use
    assert (fresh.layer, fresh.neuron) == (-1, -1)
    assert read_export(fresh.to_html(None))["state"]["detail"] == {}

    # bad neurons are rejected before anything is exported, and change nothing
    for bad, message in ([(1, 4000)], "neuron 4000 does not exist"), ([(7, 0)], "layer 7 was not scanned"), \
            ([1, 2], r"\(layer, neuron\) pairs"), ([("a", 1)], r"\(layer, neuron\) pairs"):
        with pytest.raises(ConfigError, match=message):
            explorer.to_html(None, neurons=bad)
        assert snapshot(explorer) == before and changes == []

