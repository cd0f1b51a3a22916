"""Widgets without a browser: what each component derives from a run, the payload rules (binary, pooled),
errors, linking, Panel mirroring and the standalone export's contents.

Every expected value is recomputed independently from the run's arrays (``run.pattern``,
``run.mass_received``, ``lens.sinks``, ``lens.valley``) or from a planted pattern with known block values.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
import ipywidgets
import numpy as np
import pytest
from test_widgets_support import (  # noqa: F401  (fixtures)
    SINK_SHARE,
    f32,
    gpt2_pair,
    i32,
    minilm_run,
    minilm_run_b,
    planted_pattern,
    read_export,
    synthetic_run,
    tiny_gpt2,
    u8,
    view_of,
)

import lens
import lens.widgets as lw
from lens.analysis.sinks import uniform_share
from lens.widgets._data import pool_pattern, pool_profile, visible_token
from lens.widgets.tokens import display_tokens
from lens.widgets.valley_plot import VALLEY_COLUMNS

STATIC = Path(lw.__file__).with_name("static")
COMPONENT_FILES = ["attention_explorer", "sink_map", "valley_plot", "token_view", "compare_view"]


# -- packaging and import rules ------------------------------------------------------------------------
def test_import_lens_loads_no_ui_library():
    code = ("import sys, lens; r = lens.Run; lens.sinks; lens.valley; "
            "print([m for m in sys.modules if m.split('.')[0] in ('anywidget', 'ipywidgets', 'panel', 'plotly', 'bokeh')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_every_component_ships_one_offline_module():
    files = sorted(p.name for p in STATIC.iterdir())
    # pyproject's package-data ships exactly static/*.js and static/*.css: nothing may hide in subfolders
    assert all(p.suffix in (".js", ".css") and p.is_file() for p in STATIC.iterdir()), files
    for name in COMPONENT_FILES + ["_core", "_grids", "_charts", "_standalone"]:
        # the SVG namespace is an identifier, not an address; any other URL could be a network request
        text = (STATIC / f"{name}.js").read_text().replace('"http://www.w3.org/2000/svg"', "")
        assert "http://" not in text and "https://" not in text, f"{name}.js names a URL"
        assert "require(" not in text and "fetch(" not in text, f"{name}.js loads something at render time"
        assert not any(line.lstrip().startswith("import ") for line in text.splitlines()), f"{name}.js imports"
    for name in COMPONENT_FILES:
        assert (STATIC / f"{name}.js").read_text().rstrip().endswith("export default { render };")
    css = (STATIC / "lens.css").read_text()
    assert "url(" not in css and "@import" not in css
    assert "--jp-layout-color0" in css and "--jp-ui-font-color1" in css  # follows the JupyterLab theme


def _numeric_lists(value, path="") -> list[str]:
    """Paths of JSON lists of more than 64 numbers inside a trait value (numbers must travel as bytes)."""
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += _numeric_lists(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        flat = [x for x in value if isinstance(x, (int, float)) and not isinstance(x, bool)]
        if len(flat) > 64:
            found.append(path)
        for i, v in enumerate(value):
            if isinstance(v, (list, dict)):
                found += _numeric_lists(v, f"{path}[{i}]")
    return found


# -- AttentionExplorer ----------------------------------------------------------------------------------
def test_explorer_shows_the_kept_pattern_and_its_mass_exactly(minilm_run):
    run = minilm_run
    explorer = lw.AttentionExplorer(run, layer=2, head=5, seq=1)
    length = int(run.lengths[1])
    meta = explorer.view_meta
    assert meta["kept"] and meta["block"] == 1 and (meta["nq"], meta["nk"]) == (length, length)
    assert meta["dtype"] == "f32"  # an exact pattern travels exactly
    block_max, block_mean = f32(explorer.view).reshape(2, length, length)
    np.testing.assert_array_equal(block_max, run.pattern(2, 5, 1))  # bidirectional: nothing masked
    np.testing.assert_array_equal(block_mean, run.pattern(2, 5, 1))
    mass = run.mass_received(2, 5, 1)
    np.testing.assert_allclose(f32(explorer.mass), mass)
    np.testing.assert_array_equal(i32(explorer.sink_keys), np.nonzero(mass > 5.0 * uniform_share(length, False))[0])
    np.testing.assert_allclose(f32(explorer.scores).reshape(run.n_layers, run.n_heads),
                               lens.sinks(run).sink_score[1], rtol=1e-6)
    assert explorer.tokens == run.tokens[1]
    np.testing.assert_array_equal(u8(explorer.special).astype(bool), run.arrays["special"][run.span(1)])


def test_explorer_selection_from_python_updates_what_is_shown(minilm_run):
    run = minilm_run
    explorer = lw.AttentionExplorer(run)
    seen = []
    explorer.observe(lambda change: seen.append((change.name, change.new)), names=["layer", "head"])
    explorer.layer, explorer.head = 1, 7  # a head whose pattern was not kept
    assert seen == [("layer", 1), ("head", 7)]
    assert explorer.view_meta["kept"] is False and explorer.view == b""
    assert (explorer.view_meta["layer"], explorer.view_meta["head"]) == (1, 7)
    np.testing.assert_allclose(f32(explorer.mass), run.mass_received(1, 7, explorer.seq))
    explorer.seq = 3
    assert explorer.tokens == run.tokens[3]
    np.testing.assert_allclose(f32(explorer.mass), run.mass_received(1, 7, 3))


def test_explorer_defaults_to_the_strongest_kept_sink_head(minilm_run):
    explorer = lw.AttentionExplorer(minilm_run)
    scores = lens.sinks(minilm_run).sink_score[0]
    expected = max(minilm_run.kept_patterns(), key=lambda p: scores[p])
    assert (explorer.layer, explorer.head) == expected


def test_causal_pattern_marks_masked_keys(tiny_gpt2):
    run = lens.trace(tiny_gpt2, ["The quick brown fox jumps."], keep_patterns=[(1, 2)], progress=False)
    explorer = lw.AttentionExplorer(run, layer=1, head=2)
    length = int(run.lengths[0])
    block_max = f32(explorer.view).reshape(2, length, length)[0]
    upper = np.triu(np.ones((length, length), bool), 1)
    assert np.isnan(block_max[upper]).all()  # keys no query may attend: "masked", not 0
    np.testing.assert_array_equal(block_max[~upper], run.pattern(1, 2)[~upper])


def test_pooling_matches_a_block_by_block_reference():
    rng = np.random.default_rng(0)
    length, cells = 301, 64
    pattern = np.tril(rng.random((length, length)).astype(np.float32))
    pattern /= pattern.sum(1, keepdims=True)
    block_max, block_mean, block = pool_pattern(pattern, cells, causal=True)
    assert block == 5 and block_max.shape == (61, 61)
    for qb in range(61):
        for kb in range(61):
            q = np.arange(qb * block, min(length, (qb + 1) * block))[:, None]
            k = np.arange(kb * block, min(length, (kb + 1) * block))[None, :]
            allowed = np.broadcast_to(k <= q, (q.size, k.size))
            values = pattern[q, k][allowed]
            if values.size == 0:
                assert np.isnan(block_max[qb, kb]) and np.isnan(block_mean[qb, kb])
            else:
                assert block_max[qb, kb] == values.max()
                assert block_mean[qb, kb] == pytest.approx(values.mean(), rel=1e-5)
    pooled, b = pool_profile(np.arange(10, dtype=np.float32), 4)
    assert b == 3 and pooled.tolist() == [2, 5, 8, 9]


def test_a_4096_token_head_is_pooled_not_shipped():
    run = synthetic_run([4096], kept=[(1, 2)])
    explorer = lw.AttentionExplorer(run)
    meta = explorer.view_meta
    assert (explorer.layer, explorer.head) == (1, 2)
    assert meta["block"] == 16 and (meta["nq"], meta["nk"]) == (256, 256) and meta["dtype"] == "f16"
    assert len(explorer.view) == 2 * 256 * 256 * 2  # pooled values as half floats
    block_max, block_mean = view_of(explorer)
    reference = planted_pattern(4096).reshape(256, 16, 256, 16).max(axis=(1, 3)).astype(np.float16)
    finite = ~np.isnan(block_max)
    np.testing.assert_array_equal(block_max[finite], reference[finite])
    # the sink column survives pooling: every query block after the first puts 0.6 on key 0
    np.testing.assert_array_equal(block_max[1:, 0], np.float16(SINK_SHARE))
    sizes = explorer.payload_bytes()
    assert sum(sizes.values()) < 700_000, sizes  # vs 4 × 4096² = 67 MB for the raw pattern
    binary = {k for k, v in explorer._state().items() if isinstance(v, bytes)}
    assert {"view", "mass", "scores", "thumbs", "special", "sink_keys"} <= binary
    for name, value in explorer._state().items():
        assert not _numeric_lists(value), f"{name} sends numbers as JSON"


def test_tiles_come_at_full_resolution_on_request():
    run = synthetic_run([1000], kept=[(0, 1)])
    explorer = lw.AttentionExplorer(run, tile_size=48)
    assert explorer.view_meta["block"] == 4
    explorer.tile_request = {"q0": 500, "k0": 480, "rev": 3}
    meta = explorer.tile_meta
    assert (meta["q0"], meta["k0"], meta["nq"], meta["nk"], meta["rev"]) == (500, 480, 48, 48, 3)
    tile = f32(explorer.tile).reshape(48, 48)
    expected = run.pattern(0, 1)[500:548, 480:528].copy()
    q, k = np.arange(500, 548)[:, None], np.arange(480, 528)[None, :]
    expected[np.broadcast_to(k > q, expected.shape)] = np.nan
    np.testing.assert_array_equal(tile, expected)
    explorer.tile_request = {"q0": 990, "k0": -5, "rev": 4}  # clamped into the sequence
    assert (explorer.tile_meta["q0"], explorer.tile_meta["k0"]) == (1000 - 48, 0)
    explorer.tile_request = {"q0": "x", "rev": 5}  # from the browser: reported, not raised
    assert explorer.tile == b"" and "integer" in explorer.tile_meta["error"]
    explorer.head = 0  # not kept: no tile, and a message that says how to get one
    explorer.tile_request = {"q0": 0, "k0": 0, "rev": 6}
    assert explorer.tile == b"" and "keep_patterns=[(0, 0)]" in explorer.tile_meta["error"]


def test_ten_thousand_tokens_stay_small_everywhere():
    run = synthetic_run([10_000], n_layers=4, n_heads=4)
    for widget in (lw.AttentionExplorer(run), lw.SinkMap(run), lw.TokenView.mass(run, 0, 0)):
        sizes = widget.payload_bytes()
        # per-token arrays at full resolution (T float32) plus token strings; never T² anything
        assert sum(sizes.values()) < 250_000, (type(widget).__name__, sizes)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")  # lens.valley: one token has no entropy
def test_single_token_run(tiny_gpt2, tmp_path):
    run = lens.trace(tiny_gpt2, [[7]], keep_patterns="all", progress=False, keep_hidden="all")
    assert run.lengths.tolist() == [1]
    explorer = lw.AttentionExplorer(run)
    assert f32(explorer.view).tolist() == [1.0, 1.0] and f32(explorer.mass).tolist() == [1.0]
    assert explorer.to_html(tmp_path / "one.html").stat().st_size > 0
    assert lw.SinkMap(run).strip_meta["T"] == 1
    plot = lw.ValleyPlot(run)  # entropies of a 1-token matrix are undefined: NaN, drawn as gaps
    assert np.isnan(f32(plot.series)).any()
    assert lw.TokenView(run, [0.5]).tokens == run.tokens[0]


# -- errors ---------------------------------------------------------------------------------------------
def test_bad_input_raises_lens_errors_that_say_what_to_do(minilm, minilm_run):
    no_attention = lens.trace(minilm, ["Only the MLP."], capture=("mlp",), track_neurons=[(1, 3)], progress=False)
    cases = [
        (lambda: lw.AttentionExplorer(42), lens.ConfigError, "lens.trace"),
        (lambda: lw.AttentionExplorer(no_attention), lens.RunFormatError, "capture"),
        (lambda: lw.AttentionExplorer(minilm_run, max_cells=0), lens.ConfigError, "max_cells"),
        (lambda: lw.AttentionExplorer(minilm_run, seq=9), lens.ConfigError, "0..4"),
        (lambda: lw.SinkMap("run"), lens.ConfigError, "lens.sinks"),
        (lambda: lw.SinkMap(no_attention), lens.RunFormatError, "capture"),
        (lambda: lw.SinkMap(minilm_run, metric="max"), lens.ConfigError, "metric"),
        (lambda: lw.ValleyPlot(), lens.ConfigError, "at least one"),
        (lambda: lw.ValleyPlot(minilm_run, labels=["a", "b"]), lens.ConfigError, "one label per run"),
        (lambda: lw.ValleyPlot([1, 2]), lens.ConfigError, "lens.valley"),
        (lambda: lw.TokenView(minilm_run, [1.0, 2.0]), lens.ConfigError, "one value per token"),
        (lambda: lw.TokenView(minilm_run, "abc"), lens.ConfigError, "numbers"),
        (lambda: lw.TokenView.neuron(minilm_run, 0, 0), lens.ConfigError, "track_neurons=[(0, 0)]"),
        (lambda: lw.TokenView.mass(no_attention, 0, 0), lens.RunFormatError, "capture"),
        (lambda: lw.CompareView(object()), lens.ConfigError, "lens.compare"),
    ]
    for make, error, hint in cases:
        with pytest.raises(error, match=None) as info:
            make()
        assert isinstance(info.value, lens.LensError)
        assert hint in str(info.value), (hint, str(info.value))
    # a run without attention still has everything TokenView needs
    assert lw.TokenView.neuron(no_attention, 1, 3).tokens == no_attention.tokens[0]


def test_out_of_range_selection_is_refused_and_nothing_changes(minilm_run):
    explorer = lw.AttentionExplorer(minilm_run)
    before = (explorer.layer, explorer.head, explorer.view_meta)
    with pytest.raises(lens.ConfigError, match="0..5"):
        explorer.layer = 6
    with pytest.raises(lens.ConfigError, match="integer"):
        explorer.head = "2"
    assert (explorer.layer, explorer.head, explorer.view_meta) == before
    single = lw.TokenView(minilm_run, np.zeros(int(minilm_run.lengths[2])), seq=2)
    with pytest.raises(lens.ConfigError, match="sequence 2 only"):
        single.seq = 0


# -- the other components ---------------------------------------------------------------------------------
def test_sink_map_grid_and_strip_follow_the_selection(minilm_run):
    result = lens.sinks(minilm_run, epsilon=0.4)
    sink_map = lw.SinkMap(result, seq=4)
    np.testing.assert_allclose(f32(sink_map.scores).reshape(6, 12), result.sink_score[4], rtol=1e-6)
    np.testing.assert_array_equal(u8(sink_map.outline).reshape(6, 12).astype(bool), result.sink_score[4] >= 0.4)
    best = np.unravel_index(np.argmax(result.mean_sink_score), (6, 12))
    assert (sink_map.layer, sink_map.head) == tuple(int(i) for i in best)
    sink_map.layer, sink_map.head = 3, 9
    np.testing.assert_allclose(f32(sink_map.mass), minilm_run.mass_received(3, 9, 4))
    assert sink_map.strip_meta["score"] == pytest.approx(result.sink_score[4, 3, 9])
    sink_map.metric = "special"
    np.testing.assert_allclose(f32(sink_map.scores).reshape(6, 12), result.special_mass[4], rtol=1e-6)


def test_valley_plot_overlays_runs_of_different_depth(minilm_run, tiny_gpt2):
    short = lens.trace(tiny_gpt2, ["Numbers like 3.14159 and 2026 and punctuation."], progress=False)
    deep, shallow = lens.valley(minilm_run), lens.valley(short)
    plot = lw.ValleyPlot(minilm_run, shallow, labels=["MiniLM", "tiny GPT-2"])
    series = f32(plot.series).reshape(2, len(VALLEY_COLUMNS), 7)
    for j, column in enumerate(VALLEY_COLUMNS):
        np.testing.assert_allclose(series[0, j], deep.mean(column), rtol=1e-6)
        np.testing.assert_allclose(series[1, j, :3], shallow.mean(column), rtol=1e-6)
    assert np.isnan(series[1, :, 3:]).all()
    assert plot.info["n_layers"] == [6, 2] and plot.info["valley_layer"] == [deep.valley_layer, shallow.valley_layer]
    assert len(plot.figure().data) == 12  # the plotly version: 6 curves per run


def test_token_view_neuron_values_per_sequence(minilm_run):
    view = lw.TokenView.neuron(minilm_run, 4, 100, seq=1)
    row = minilm_run.arrays["mlp.tracked"][minilm_run.meta["tracked_neurons"].index([4, 100])]
    np.testing.assert_allclose(f32(view.values), row[minilm_run.span(1)])
    assert view.info["diverging"] == bool(row.min() < 0 < row.max())
    view.seq = 3
    np.testing.assert_allclose(f32(view.values), row[minilm_run.span(3)])
    assert view.tokens == minilm_run.tokens[3]
    positive = lw.TokenView.mass(minilm_run, 0, 0)
    assert positive.info["diverging"] is False and positive.info["vmin"] == 0.0


def test_display_tokens_rebuilds_readable_text():
    assert display_tokens(["[CLS]", "play", "##ing", ".", "[SEP]"]) == (
        ["[CLS]", "play", "ing", ".", "[SEP]"], [False, True, False, False, True])
    assert display_tokens(["The", "Ġcat", "Ġsat", ".", "Ċ"]) == (["The", "cat", "sat", ".", "↵"], [False, True, True, False, False])
    assert visible_token(" hi\n\x7f") == "␣hi↵\\x7f"


def test_compare_view_shows_the_deltas_and_both_runs(gpt2_pair):
    run_a, run_b = gpt2_pair
    result = lens.compare(run_a, run_b)
    view = lw.CompareView(result)
    delta = np.asarray(result.sink_delta, np.float32)
    np.testing.assert_array_equal(f32(view.sink_delta).reshape(delta.shape), delta)
    expected = np.stack([result.entropy_delta, result.anisotropy_delta, result.hidden_cosine, result.hidden_rel_error])
    np.testing.assert_allclose(f32(view.layer_series).reshape(expected.shape), expected, rtol=1e-6)
    assert view.info["kl"] == pytest.approx(result.kl) and view.info["top1_agreement"] == pytest.approx(result.top1_agreement)
    assert view.info["hidden_kept"] is True and view.info["labels"] == list(result.labels)
    assert (view.layer, view.head) == tuple(int(i) for i in np.unravel_index(np.argmax(np.abs(delta)), delta.shape))
    view.seq, view.layer, view.head = 1, 1, 3
    np.testing.assert_allclose(f32(view.mass_a), run_a.mass_received(1, 3, 1))
    np.testing.assert_allclose(f32(view.mass_b), run_b.mass_received(1, 3, 1))
    assert view.strip_meta["same_tokens"] is True and view.tokens_a == run_a.tokens[1]
    with pytest.raises(lens.ConfigError, match="one value per residual layer"):
        lw.CompareView(dataclasses.replace(result, entropy_delta=np.zeros(2)))


def test_compare_view_says_what_an_encoder_comparison_lacks(minilm, minilm_run, minilm_texts):
    without_hidden = lens.trace(minilm, minilm_texts, progress=False)
    view = lw.CompareView(lens.compare(minilm_run, without_hidden))
    # no hidden states on one side (NaN) and no next-token distributions for an encoder
    assert view.info["hidden_kept"] is False and view.info["kl"] is None and view.info["top1_agreement"] is None
    np.testing.assert_allclose(f32(view.sink_delta), 0.0, atol=1e-6)  # the same model on the same inputs


# -- linking, shortcuts, Panel ------------------------------------------------------------------------
def test_widgets_link_through_their_traits(minilm_run):
    sink_map, explorer = lw.SinkMap(minilm_run), lw.AttentionExplorer(minilm_run)
    ipywidgets.link((sink_map, "layer"), (explorer, "layer"))
    ipywidgets.link((sink_map, "head"), (explorer, "head"))
    sink_map.layer, sink_map.head = 5, 11
    assert (explorer.layer, explorer.head) == (5, 11)
    assert (explorer.view_meta["layer"], explorer.view_meta["head"], explorer.view_meta["kept"]) == (5, 11, True)


def test_show_shortcuts(minilm_run):
    assert isinstance(minilm_run.show(layer=0, head=0), lw.AttentionExplorer)
    assert isinstance(lens.sinks(minilm_run).show(), lw.SinkMap)
    overlay = lens.valley(minilm_run).show(lens.valley(minilm_run), labels=["a", "b"])
    assert isinstance(overlay, lw.ValleyPlot) and overlay.info["labels"] == ["a", "b"]


def test_panel_component_and_widget_are_one_object_model(minilm_run):
    explorer = lw.AttentionExplorer(minilm_run)
    component = explorer.to_panel()
    assert component._esm == explorer._esm  # the same ESM, not a port
    seen = []
    explorer.observe(lambda change: seen.append(change.new), names=["head"])
    component.param.update(layer=5, head=11)  # what a click in the dashboard does
    assert (explorer.layer, explorer.head) == (5, 11) and seen == [11]
    assert component.view_meta["layer"] == 5 and component.view == explorer.view != b""
    explorer.head = 0  # and the other way
    assert component.head == 0 and component.view_meta["head"] == 0 and component.view_meta["kept"] is False


# -- standalone export ----------------------------------------------------------------------------------
def test_export_holds_every_selection_and_decodes_to_the_live_values(minilm_run, tmp_path):
    explorer = lw.AttentionExplorer(minilm_run)
    path = explorer.to_html(tmp_path / "explorer.html")
    html = path.read_text()
    assert "<script src" not in html and "<link" not in html and "https://" not in html
    assert html.replace("http://www.w3.org/2000/svg", "").count("http://") == 0
    export = read_export(html)
    table = export["table"]
    assert len(table) == minilm_run.n_sequences * 6 * 12
    assert export["state"]["live"] is False
    explorer.seq, explorer.layer, explorer.head = 1, 2, 5
    entry = table["[1,2,5]"]
    # half floats keep ~3 significant digits
    np.testing.assert_allclose(f32(entry["view"]), f32(explorer.view), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(f32(entry["mass"]), f32(explorer.mass), rtol=1e-3, atol=1e-5)
    assert entry["tokens"] == minilm_run.tokens[1] and entry["view_meta"] == explorer.view_meta
    exact = read_export(explorer.to_html(precision="single"))["table"]["[1,2,5]"]
    assert exact["view"] == explorer.view


def test_export_survives_hostile_token_strings(tmp_path):
    hostile = ["</script><script>alert(1)</script>", "<!--", "&amp;", "\u2028"]
    run = synthetic_run([4], tokens=[hostile])
    html = lw.TokenView(run, [1.0, 2.0, 3.0, 4.0]).to_html()
    assert html.count("</script>") == 4  # manifest, ESM, data, boot — nothing from the tokens
    assert read_export(html)["state"]["tokens"] == hostile


def test_export_pools_more_to_fit_its_budget_or_says_what_to_do():
    run = synthetic_run([1024], n_layers=2, n_heads=2, kept=[(0, 0), (0, 1), (1, 0), (1, 1)])
    rng = np.random.default_rng(1)
    for name in [k for k in run.arrays if k.startswith("pattern.")]:
        # noise does not compress: the export has to pool to get smaller
        run.arrays[name] = rng.random(run.arrays[name].shape, dtype=np.float32)
    explorer = lw.AttentionExplorer(run)
    roomy_html = explorer.to_html(max_bytes=50_000_000)
    assert read_export(roomy_html)["table"]["[0,0,0]"]["view_meta"]["nq"] == 256
    budget = len(roomy_html.encode()) * 2 // 3
    tight_html = explorer.to_html(max_bytes=budget)
    assert len(tight_html.encode()) <= budget
    tight = read_export(tight_html)["table"]["[0,0,0]"]["view_meta"]
    assert tight["nq"] < 256 and tight["block"] > 4
    with pytest.raises(lens.ConfigError, match="max_bytes"):
        explorer.to_html(max_bytes=20_000)


def test_export_of_every_component_is_one_self_contained_file(minilm_run, minilm_run_b, gpt2_pair):
    widgets = [
        lw.SinkMap(minilm_run),
        lw.ValleyPlot(minilm_run, minilm_run_b),
        lw.TokenView.neuron(minilm_run, 2, 5),
        lw.CompareView(lens.compare(*gpt2_pair)),
    ]
    for widget in widgets:
        html = widget.to_html()
        export = read_export(html)
        assert export["manifest"]["component"] == type(widget).__name__
        assert json.loads(json_script(html, "lens-esm")) == widget._esm
        assert len(html.encode()) < 1_000_000


def json_script(html: str, ident: str) -> str:
    start = html.index(f'id="{ident}">') + len(f'id="{ident}">')
    return html[start : html.index("</script>", start)]
