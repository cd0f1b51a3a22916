"""Payload budgets, measured as sizes (never times): a 2048-token run of a 12-layer × 12-head model.

* The AttentionExplorer adds ≤ 2 MB to the saved notebook: the widget state JupyterLab and nbclient store
  in the notebook's metadata (``ipywidgets.embed.embed_data``: binary buffers base64-encoded), plus the
  output that references it, measured as the growth of the written .ipynb file — with a full-resolution
  tile open, the largest state the widget can reach.
* Its standalone HTML export is ≤ 3 MB, at full overview resolution (no extra pooling needed).

For scale (docs/benchmarks.md): CircuitsVis writes 1.17 GB of HTML for 12 heads at T = 2048.
"""

from __future__ import annotations

import json

import ipywidgets.embed
import nbformat
import numpy as np
import pytest
from test_widgets_support import f32, read_export, view_of

import lens.widgets as lw
from lens.bench.widgets import KEPT_HEADS, build_model, long_run

NOTEBOOK_BUDGET = 2_000_000
HTML_BUDGET = 3_000_000


def notebook_growth(widget) -> tuple[int, int]:
    """(bytes the widget state adds to the .ipynb, bytes of the state alone)."""
    # only this widget and what it depends on: without `state`, embed_data saves every widget alive
    own = ipywidgets.embed.dependency_state([widget], drop_defaults=True)
    state = ipywidgets.embed.embed_data(views=[widget], state=own)["manager_state"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("explorer")]
    before = len(nbformat.writes(nb).encode())
    nb.cells[0].outputs = [nbformat.v4.new_output(
        "display_data",
        data={"application/vnd.jupyter.widget-view+json": {"model_id": widget.model_id, "version_major": 2,
                                                            "version_minor": 0},
              "text/plain": repr(widget)},
    )]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": state}
    after = len(nbformat.writes(nb).encode())
    return after - before, len(json.dumps(state).encode())


@pytest.fixture(scope="module")
def run_2048(tmp_path_factory):
    lm = build_model(tmp_path_factory.mktemp("gpt2-12x12"), n_positions=2048)
    run = long_run(lm, 2048)
    assert (run.n_layers, run.n_heads, int(run.lengths[0])) == (12, 12, 2048)
    assert run.kept_patterns() == sorted(KEPT_HEADS)
    return run


@pytest.mark.slow
def test_explorer_on_2048_tokens_adds_at_most_2_mb_to_the_notebook(run_2048, report_figure):
    explorer = lw.AttentionExplorer(run_2048, layer=5, head=7)
    meta = explorer.view_meta
    assert meta["kept"] and meta["block"] == 8 and (meta["nq"], meta["nk"]) == (256, 256)
    growth, state = notebook_growth(explorer)
    explorer.tile_request = {"q0": 1024, "k0": 960, "rev": 1}
    assert f32(explorer.tile).size == 48 * 48
    growth_tile, state_tile = notebook_growth(explorer)
    report_figure(f"AttentionExplorer, T=2048, 12×12 heads: notebook +{growth:,} B (widget state {state:,} B); "
                  f"with a tile open +{growth_tile:,} B")
    assert max(growth, growth_tile) <= NOTEBOOK_BUDGET
    # the budget is met by pooling, not by dropping data: the overview is the block max of the real pattern
    block_max = view_of(explorer)[0]
    reference = run_2048.pattern(5, 7).reshape(256, 8, 256, 8).max(axis=(1, 3)).astype(np.float16)
    finite = np.isfinite(block_max)
    np.testing.assert_array_equal(block_max[finite], reference[finite])


@pytest.mark.slow
def test_explorer_on_2048_tokens_exports_to_at_most_3_mb(run_2048, tmp_path, report_figure):
    explorer = lw.AttentionExplorer(run_2048)
    path = explorer.to_html(tmp_path / "explorer.html", max_bytes=HTML_BUDGET)
    size = path.stat().st_size
    export = read_export(path.read_text())
    report_figure(f"AttentionExplorer, T=2048, 12×12 heads: standalone HTML {size:,} B "
                  f"({len(export['table'])} selections)")
    assert size <= HTML_BUDGET
    assert len(export["table"]) == 144
    # every kept head at the live widget's resolution, every head's mass at full resolution
    for layer, head in KEPT_HEADS:
        assert export["table"][f"[0,{layer},{head}]"]["view_meta"]["nq"] == 256
    assert all(len(entry["mass"]) == 4 * 2048 for entry in export["table"].values())
