"""``lens.neurons(scan)``: the examples and top-token tables of a corpus scan, ``neuron(layer, n)`` and
``show()`` — equal to what the Scan itself returns (``scan.examples``, ``scan.top_tokens``), on a tiny dense
Llama and on a pure-MoE tiny Mixtral (no dense neurons: clear errors that say where to look instead)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CORPUS, _bpe_tokenizer, build_tiny
from test_scan_moe import _config

import lens
from lens.errors import ConfigError

TEXTS = CORPUS[:8]


@pytest.fixture(scope="module")
def llama_scan(tmp_path_factory):
    torch.set_num_threads(1)
    folder = build_tiny("llama", tmp_path_factory.mktemp("tiny-llama"))
    return lens.scan(lens.load(folder), TEXTS, out=tmp_path_factory.mktemp("scan") / "s", top_k=3, progress=False)


@pytest.fixture(scope="module")
def mixtral_scan(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tiny-mixtral")
    tf.AutoModelForCausalLM.from_config(_config("mixtral")).save_pretrained(folder)
    _bpe_tokenizer("llama").save_pretrained(folder)
    return lens.scan(lens.load(folder), TEXTS, out=tmp_path_factory.mktemp("scan") / "m", top_k=3, progress=False)


def test_examples_table_and_neuron_equal_the_scans_own(llama_scan):
    s = llama_scan
    result = lens.neurons(s)
    examples = result.to_frame("examples")
    want = pd.concat([s.examples(layer, n) for layer in s.layers for n in range(s.n_neurons)], ignore_index=True)
    assert len(examples) == len(want) == len(s.layers) * s.n_neurons * 3  # 8 documents ≥ top_k = 3
    pd.testing.assert_frame_equal(examples, want)
    assert result.examples is result.examples  # read from Parquet once, then kept
    frame = s.to_frame().set_index(["layer", "neuron"])
    for layer, n in [(0, 5), (1, 0), (1, s.n_neurons - 1)]:
        one = result.neuron(layer, n)
        pd.testing.assert_frame_equal(one, s.examples(layer, n))
        assert list(one["rank"]) == [0, 1, 2] and (one["layer"] == layer).all() and (one["neuron"] == n).all()
        assert (np.diff(one["value"]) <= 0).all() and one["doc"].is_unique
        # the top example is the neuron's highest activation over the corpus, and its token sits in its context
        assert one["value"].iloc[0] == pytest.approx(float(frame.loc[(layer, n), "max"]), rel=1e-6)
        assert one["token"].iloc[0] in list(one["context_tokens"].iloc[0])
    with pytest.raises(ConfigError, match="was not scanned"):
        result.neuron(7, 0)
    with pytest.raises(ConfigError, match="does not exist"):
        result.neuron(0, s.n_neurons)
    assert len(result.to_frame("top_tokens")) == 0 and len(result.to_frame("routing")) == 0  # a dense model
    with pytest.raises(ConfigError, match="no split by modality"):
        result.to_frame("modality")
    with pytest.raises(ConfigError, match="kind"):
        result.to_frame("nope")
    assert repr(result).startswith("ScanNeuronResult(2 layers")
    hover = result.figure().data[0].text
    best0 = s.examples(0, 0)["token"].iloc[0]
    assert hover[0] == f"L0 N0<br>top token {best0!r}"


def test_show_opens_the_explorer_on_the_strongest_neuron(llama_scan):
    lw = pytest.importorskip("lens.widgets")
    s = llama_scan
    result = lens.neurons(s)
    best = s.to_frame().sort_values("max", ascending=False).iloc[0]
    explorer = result.show(page_size=5)
    assert isinstance(explorer, lw.NeuronExplorer) and explorer.info["summary"] == s.summary()
    assert (explorer.layer, explorer.neuron) == (int(best.layer), int(best.neuron))
    assert len(explorer.detail["examples"]) == len(result.neuron(int(best.layer), int(best.neuron)))
    chosen = result.show(layer=0, neuron=3)
    assert (chosen.layer, chosen.neuron) == (0, 3)
    frame = s.to_frame()
    last = max(s.layers)
    in_layer = frame[frame["layer"] == last].sort_values("max", ascending=False).iloc[0]
    opened = result.show(layer=last)
    assert (opened.layer, opened.neuron) == (last, int(in_layer.neuron))
    peak = frame[frame["neuron"] == 5].sort_values("max", ascending=False).iloc[0]
    opened = result.show(neuron=5)
    assert (opened.layer, opened.neuron) == (int(peak.layer), 5)  # it opened on layer −1: nothing shown


def test_pure_moe_scan_gives_top_tokens_experts_and_clear_errors(mixtral_scan):
    s = mixtral_scan
    assert s.n_neurons == 0 and s.moe_layers == [0, 1]
    result = lens.neurons(s)
    E = s.arrays["route.load"].shape[1]
    top = result.to_frame("top_tokens")
    want = pd.concat([s.top_tokens(layer, e) for layer in s.moe_layers for e in range(E)], ignore_index=True)
    assert len(top) > 0
    pd.testing.assert_frame_equal(top, want)
    pd.testing.assert_frame_equal(result.to_frame("experts"), s.expert_neurons_frame())
    pd.testing.assert_frame_equal(result.to_frame("routing"), s.routing_frame())
    assert len(result.to_frame("examples")) == 0 and "no dense MLP neurons" in repr(result)
    with pytest.raises(ConfigError, match=r'to_frame\("experts"\)'):
        result.neuron(0, 1)
    with pytest.raises(ConfigError, match=r'to_frame\("experts"\)'):
        result.show()
