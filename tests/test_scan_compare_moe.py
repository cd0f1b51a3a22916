"""``lens.compare(scan_a, scan_b)`` on mixture-of-experts models: a pure-MoE model (tiny Mixtral: no dense MLP)
compares its expert neurons and routing; Qwen2-MoE (dense shared expert) compares both; scans kept with
different ``top_k`` compare their common top-min(k); scans that cannot be compared raise ConfigError. Every
number is checked against a computation straight from the scans' arrays and Parquet files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CORPUS, _bpe_tokenizer
from test_scan_moe import _config

import lens
from lens.errors import ConfigError, LensError
from lens.scan import Scan

TEXTS = CORPUS[:8]


def _folder(kind: str, tmp_path_factory):
    """A tiny random model (test_scan_moe's config, router not planted: attention stays live, so int8 attention
    weights move what the experts see — lens's int8 leaves the fused 3-D expert weights of HF's MoE blocks as they are)."""
    import transformers as tf

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = tf.AutoModelForCausalLM.from_config(_config(kind))
    folder = tmp_path_factory.mktemp(f"tiny-{kind}")
    model.save_pretrained(folder)
    _bpe_tokenizer("llama").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mixtral_scans(tmp_path_factory):
    folder = _folder("mixtral", tmp_path_factory)
    out = tmp_path_factory.mktemp("mixtral-scans")
    dense = lens.scan(lens.load(folder), TEXTS, out=out / "dense", top_k=4, progress=False)
    int8 = lens.scan(lens.load(folder, quant="int8"), TEXTS, out=out / "int8", top_k=4, progress=False)
    return dense, int8


@pytest.fixture(scope="module")
def qwen_scans(tmp_path_factory):
    folder = _folder("qwen2_moe", tmp_path_factory)
    out = tmp_path_factory.mktemp("qwen-scans")
    lm = lens.load(folder)
    dense = lens.scan(lm, TEXTS, out=out / "dense", top_k=4, progress=False)
    int8 = lens.scan(lens.load(folder, quant="int8"), TEXTS, out=out / "int8", top_k=4, progress=False)
    top2 = lens.scan(lm, TEXTS, out=out / "top2", top_k=2, progress=False)
    return lm, dense, int8, top2


def _expected_experts(a, b):
    """mean shift, z, max ratio and tokens of the expert neurons, straight from the arrays."""
    ea = {k: a.arrays[f"expert_neuron.{k}"].astype(np.float64) for k in ("mean", "m2", "count", "max")}
    eb = {k: b.arrays[f"expert_neuron.{k}"].astype(np.float64) for k in ("mean", "m2", "count", "max")}
    counted = (ea["count"] > 0) & (eb["count"] > 0)
    shift = np.where(counted, eb["mean"] - ea["mean"], np.nan)
    with np.errstate(all="ignore"):
        std = np.sqrt(ea["m2"] / ea["count"])
        z = np.where(counted & (std > 0), shift / std, np.nan)
        ratio = np.where(counted & (ea["max"] != 0), eb["max"] / ea["max"], np.nan)
    return shift, z, ratio, ea["count"][..., 0], eb["count"][..., 0]


def _sets(scan, name, key, members, k):
    frame = pd.read_parquet(scan.folder / name)
    frame = frame[frame["rank"] < k]
    out: dict = {}
    for row in frame.itertuples():
        out.setdefault((row.layer, getattr(row, key)), set()).add(tuple(getattr(row, m) for m in members))
    return out


def _jaccard(sa, sb, key):
    a, b = sa.get(key, set()), sb.get(key, set())
    return len(a & b) / len(a | b) if a | b else np.nan


def _check_routing(result, a, b, k):
    frame = result.to_frame("routing").set_index(["layer", "expert"])
    ra, rb = a.routing_frame().set_index(["layer", "expert"]), b.routing_frame().set_index(["layer", "expert"])
    assert len(frame) == len(ra) == len(a.moe_layers) * a.arrays["route.load"].shape[1]
    for li, layer in enumerate(a.moe_layers):
        la, lb = a.arrays["route.load"][li], b.arrays["route.load"][li]
        np.testing.assert_allclose(frame.loc[layer, "load_shift"], lb / lb.sum() - la / la.sum(), atol=1e-12)
    np.testing.assert_allclose(frame["gate_share_shift"], (rb["gate_share"] - ra["gate_share"]).loc[frame.index])
    np.testing.assert_array_equal(frame["tokens_a"], ra["tokens"].loc[frame.index])
    sa, sb = (_sets(s, "routing.parquet", "expert", ("doc", "position"), k) for s in (a, b))
    want = [_jaccard(sa, sb, key) for key in frame.index]
    np.testing.assert_allclose(frame["top_token_jaccard"], want)


def test_pure_moe_scans_compare_expert_neurons_and_routing(mixtral_scans):
    dense, int8 = mixtral_scans
    assert dense.n_neurons == 0 and "neuron.hist" not in dense.arrays  # the crash of the new-user trial
    same = lens.compare(dense, dense)
    assert same.jaccard.shape == (0, 0) and len(same.to_frame()) == 0
    Lm, E, M = dense.arrays["expert_neuron.mean"].shape
    assert same.expert_mean_shift.shape == (Lm, E, M) and same.moe_layers == [0, 1]
    counted = dense.arrays["expert_neuron.count"] > 0
    assert counted.any()
    assert (same.expert_mean_shift[counted] == 0).all() and np.isnan(same.expert_mean_shift[~counted]).all()
    assert (same.expert_max_ratio[counted & (dense.arrays["expert_neuron.max"] != 0)] == 1).all()
    routing = same.to_frame("routing")
    assert (routing["load_shift"] == 0).all() and (routing["top_token_jaccard"] == 1).all()

    result = lens.compare(dense, int8)
    assert result.labels == ("dense", "dense + int8")
    shift, z, ratio, tokens_a, tokens_b = _expected_experts(dense, int8)
    assert np.nanmax(np.abs(shift)) > 0  # int8 weights do move the expert neurons
    np.testing.assert_allclose(result.expert_mean_shift, shift, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.expert_mean_shift_z, z, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.expert_max_ratio, ratio, rtol=1e-12)
    np.testing.assert_array_equal(result.expert_tokens, np.stack([tokens_a, tokens_b]))
    frame = result.to_frame("experts")
    assert len(frame) == Lm * E * M
    row = frame[(frame.layer == 1) & (frame.expert == 2) & (frame.neuron == 7)].iloc[0]
    assert row["mean_shift"] == pytest.approx(shift[1, 2, 7], rel=1e-12) and row["tokens_b"] == tokens_b[1, 2]
    _check_routing(result, dense, int8, 4)
    top = result.most_moved(5)  # the expert neurons: the model has no dense ones
    assert list(top.columns[:3]) == ["layer", "expert", "neuron"]
    assert top["mean_shift_z"].abs().iloc[0] == pytest.approx(np.nanmax(np.abs(z)))
    assert "expert neurons" in repr(result) and "<b>lens scan comparison</b>" in result._repr_html_()
    with pytest.raises(ConfigError, match="kind"):
        result.to_frame("layers")


def test_moe_with_a_dense_shared_expert_compares_all_three(qwen_scans):
    _, dense, int8, _ = qwen_scans
    result = lens.compare(dense, int8)
    L, M = len(dense.layers), dense.n_neurons
    assert result.jaccard.shape == (L, M) == (2, 48)
    sa, sb = (_sets(s, "examples.parquet", "neuron", ("doc",), 4) for s in (dense, int8))
    want = np.array([[_jaccard(sa, sb, (layer, n)) for n in range(M)] for layer in dense.layers])
    np.testing.assert_allclose(result.jaccard, want)
    ha, hb = (s.arrays["neuron.hist"].astype(np.float64) for s in (dense, int8))
    tv = 0.5 * np.abs(ha / ha.sum(-1, keepdims=True) - hb / hb.sum(-1, keepdims=True)).sum(-1)
    np.testing.assert_allclose(result.hist_distance, tv, atol=1e-15)
    assert tv.max() > 0
    np.testing.assert_allclose(result.mean_shift, int8.arrays["neuron.mean"] - dense.arrays["neuron.mean"])
    shift, z, ratio, _, _ = _expected_experts(dense, int8)
    np.testing.assert_allclose(result.expert_mean_shift, shift, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.expert_mean_shift_z, z, rtol=1e-12, atol=0)
    np.testing.assert_allclose(result.expert_max_ratio, ratio, rtol=1e-12)
    _check_routing(result, dense, int8, 4)
    assert (result.to_frame("routing")["load_shift"] != 0).any() and np.nanmin(result.jaccard) < 1
    same = lens.compare(dense, dense)
    assert np.nanmin(same.jaccard) == 1 and (same.hist_distance == 0).all() and (same.mean_shift == 0).all()
    assert (same.to_frame()["moved"] == 0).all()


def test_different_top_k_compare_the_common_top_min_k(qwen_scans):
    _, top4, _, top2 = qwen_scans
    ex4 = pd.read_parquet(top4.folder / "examples.parquet")
    # a naive comparison of the whole top-4 with the top-2 would report these neurons as moved
    assert (ex4.groupby(["layer", "neuron"]).size() > 2).any()
    for a, b in ((top4, top2), (top2, top4)):
        result = lens.compare(a, b)
        assert result.top_k == 2 and result.top_ks == (a.config["top_k"], b.config["top_k"])
        defined = ~np.isnan(result.jaccard)
        assert defined.sum() == len(ex4.groupby(["layer", "neuron"])) and (result.jaccard[defined] == 1).all()
        assert (result.to_frame("routing")["top_token_jaccard"] == 1).all()
        assert "top-2 (of" in result.summary()


def test_scans_that_cannot_be_compared_raise(qwen_scans, tmp_path):
    lm, dense, _, _ = qwen_scans
    short = lens.scan(lm, TEXTS, out=tmp_path / "short", top_k=4, max_len=16, stride=12, progress=False)
    with pytest.raises(ConfigError, match="windows differently.*max_len 256 vs 16"):
        lens.compare(dense, short)
    with pytest.raises(ConfigError, match="compare two scans"):
        lens.compare(dense, "not a scan")
    keep = ("corpus.", "hist.", "seq.", "sink.", "massive.")
    bare = {k: v for k, v in dense.arrays.items() if k.startswith(keep)}
    bare["neuron.layers"] = np.zeros(0, np.int64)
    empty = Scan(dense.folder, dense.manifest, bare)
    with pytest.raises(LensError, match="no neuron or routing statistics"):
        lens.compare(empty, empty)
    no_experts = Scan(dense.folder, dense.manifest, {k: v for k, v in dense.arrays.items() if not k.startswith("expert_")})
    with pytest.raises(ConfigError, match="different MoE experts"):
        lens.compare(dense, no_experts)
