"""lens.neurons on a Run (checked against every tracked activation), the NeuronExplorer's Python side, and the
``lens scan`` command line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CORPUS

import lens
from lens.errors import ConfigError, RunFormatError


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    torch.set_num_threads(1)
    return lens.load(tiny_model_dir("gpt2"))


def test_neurons_of_a_run_equal_the_tracked_activations(gpt2):
    tracked = [(0, 3), (1, 17), (1, 100)]
    run = lens.trace(gpt2, CORPUS[:6], track_neurons=tracked, top_k_neurons=4, progress=False)
    result = lens.neurons(run)
    frame = result.to_frame().set_index(["layer", "neuron"])
    for p, (layer, neuron) in enumerate(tracked):
        x = run.arrays["mlp.tracked"][p].astype(np.float64)
        row = frame.loc[(layer, neuron)]
        assert row["count"] == len(x)
        np.testing.assert_allclose(row["mean"], x.mean(), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(row["std"], x.std(), rtol=1e-4, atol=1e-7)
        assert row["max"] == np.float32(x.max())
        np.testing.assert_allclose(row["fraction_positive"], (x > 0).mean())
        top = result.neuron(layer, neuron)
        order = np.argsort(-x, kind="stable")[:4]
        np.testing.assert_allclose(top["value"], x[order], rtol=1e-6)
        first = int(order[0])
        seq = int(np.searchsorted(run.offsets, first, side="right") - 1)
        assert top["token"].iloc[0] == run.tokens[seq][first - int(run.offsets[seq])]
        assert top["token"].iloc[0] in top["context"].iloc[0]
    assert "layers" in repr(result) and "<b>lens.neurons</b>" in result._repr_html_()
    assert len(result.figure().data) == 2
    with pytest.raises(ConfigError, match="kind"):
        result.to_frame("nope")
    with pytest.raises(RunFormatError, match="capture"):
        lens.neurons(lens.trace(gpt2, CORPUS[:2], capture=("attention",), progress=False))


def test_neurons_of_a_scan_and_the_explorer_pages_on_demand(gpt2, tmp_path):
    lw = pytest.importorskip("lens.widgets")
    s = lens.scan(gpt2, CORPUS[:8], out=tmp_path / "s", top_k=3, progress=False)
    assert len(lens.neurons(s).to_frame()) == 2 * 128
    explorer = lw.NeuronExplorer(s, page_size=10)
    assert len(explorer.table) == 10 * 7 * 4 and explorer.table_meta["rows"] == 256  # one page only
    explorer.sort, explorer.descending = "fraction_positive", False
    table = np.frombuffer(explorer.table, dtype=np.float32).reshape(10, 7)
    assert (np.diff(table[:, 5]) >= 0).all()
    explorer.layer_filter = 1
    assert explorer.table_meta["rows"] == 128
    with explorer.hold_trait_notifications():
        explorer.layer, explorer.neuron = 1, 5
    detail = explorer.detail
    assert detail["layer"] == 1 and len(detail["examples"]) == 3
    assert np.frombuffer(explorer.hist, np.float32).sum() == s.tokens
    assert sum(explorer.payload_bytes().values()) < 60_000
    with pytest.raises(ConfigError, match="sort"):
        explorer.sort = "nonsense"
    with pytest.raises(ConfigError, match="lens.Scan"):
        lw.NeuronExplorer(object())
    html = explorer.to_html(None, neurons=[(0, 1), (1, 2)])
    assert "NeuronExplorer" in html and len(html) < 3_000_000


def test_the_scan_command(tiny_model_dir, tmp_path, capsys):
    from lens.cli import main

    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n".join(CORPUS[:6]))
    assert main(["scan", str(tiny_model_dir("gpt2")), str(corpus), "--out", str(tmp_path / "s"), "--quiet",
                 "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "6 documents" in out and "fraction_positive" in out
    assert lens.Scan.load(tmp_path / "s").documents == 6
    assert main(["scan", str(tiny_model_dir("gpt2")), str(tmp_path / "missing.txt"), "--out", str(tmp_path / "x"),
                 "--quiet"]) == 1
    assert "no file or folder" in capsys.readouterr().err
    assert main(["scan", str(tiny_model_dir("gpt2")), str(corpus), "--out", str(tmp_path / "s"), "--quiet"]) == 1
    assert "resume=True" in capsys.readouterr().err
