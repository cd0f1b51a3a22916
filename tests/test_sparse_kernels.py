"""Block-sparse attention kernels (kernels/sparse*.py) against independent references.

Compilation dominates the run time, so the compiled tests share a handful of shapes: one GQA shape
(B=2, H=4, Hkv=2, T=600, D=16, default blocks 128 x 64; T is deliberately not a multiple of the
blocks) and MiniLM's own shape. Everything is fp32 with fixed seeds. No timing asserts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from lens.kernels.sparse import flex as sparse
from lens.kernels.attention import attention_with_stats
from lens.kernels.errors import ConfigError
from lens.kernels.sparse import (
    SparseConfig,
    linear_mix_weight,
    make_selection,
    select_blocks,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_with_stats,
    sparse_element_mask,
)

B, H, HKV, T, D = 2, 4, 2, 600, 16
LENGTHS = (600, 350)  # a batch of different lengths


def _qkv(seed: int = 0, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g) * scale
    k = torch.randn(B, HKV, T, D, generator=g) * scale
    v = torch.randn(B, HKV, T, D, generator=g)
    return q, k, v


def _masks():
    """Hugging Face style boolean masks [B, 1, T, T], True = attend."""
    pos = torch.arange(T)
    lengths = torch.tensor(LENGTHS)
    right = pos[None, :] < lengths[:, None]
    left = pos[None, :] >= (T - lengths)[:, None]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    window = causal & ~torch.ones(T, T, dtype=torch.bool).tril(-200)  # sliding window: not padding-shaped
    return {
        "causal": (None, True),
        "bidirectional": (None, False),
        "causal_right_padding": (right[:, None, None, :] & causal, False),
        "bidirectional_padding": (right[:, None, None, :].expand(B, 1, T, T), False),
        "causal_left_padding": (left[:, None, None, :] & causal, False),
        "sliding_window": (window.expand(B, 1, T, T), False),
    }


MASKS = _masks()


def _rel_l1(out, ref):
    return float((out.double() - ref.double()).abs().sum() / ref.double().abs().sum())


def _sdpa(q, k, v, mask, is_causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)


def _random_selection(config, mask, is_causal, seed, density=0.4):
    n_q, n_k = math.ceil(T / config.block_q), math.ceil(T / config.block_k)
    g = torch.Generator().manual_seed(seed)
    kept = torch.rand(B, H, n_q, n_k, generator=g) < density
    return make_selection(kept, config, q_len=T, k_len=T, attention_mask=mask, is_causal=is_causal)


# ------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, range_text",
    [
        ({"topk": 0}, "(0, 1]"),
        ({"topk": -0.1}, "(0, 1]"),
        ({"topk": 1.5}, "(0, 1]"),
        ({"topp": 0.0}, "(0, 1]"),
        ({"topp": 1.01}, "(0, 1]"),
        ({"topp": float("nan")}, "(0, 1]"),
        ({"block_q": 100}, "positive multiple of 16"),
        ({"block_k": 8}, "positive multiple of 16"),
        ({"block_k": 0}, "positive multiple of 16"),
        ({"block_q": 64.0}, "positive multiple of 16"),
        ({"mode": "top-k"}, "topk, topp, hybrid, streaming"),
        ({"sim_threshold": 1.5}, "[-1, 1]"),
        ({"local_blocks": -1}, ">= 0"),
        ({"keep_sink_block": 1}, "True or False"),
        ({"window": 0}, ">= 1"),
    ],
)
def test_invalid_configs_raise_config_error_naming_the_range(kwargs, range_text):
    with pytest.raises(ConfigError) as info:
        SparseConfig(**kwargs)
    assert range_text in str(info.value)
    assert isinstance(info.value, ValueError)  # ConfigError is also a ValueError


def test_valid_configs_and_describe():
    for kwargs in ({}, {"block_q": 64, "block_k": 64}, {"block_q": 16, "block_k": 48}, {"topk": 1.0, "topp": 1.0},
                   {"sim_threshold": -1.0, "local_blocks": 0}):
        SparseConfig(**kwargs)
    d = SparseConfig(mode="topp", topp=0.8).describe()
    assert d["mode"] == "topp" and d["topp"] == 0.8 and "topk" not in d and d["block_q"] == 128 and d["block_k"] == 64
    s = SparseConfig.streaming(sink_tokens=4, window=256).describe()
    assert s == {"kind": "sparse", "mode": "streaming", "block_q": 128, "block_k": 64, "sink_tokens": 4,
                 "window": 256, "linear_fallback": False}
    with pytest.raises(dataclasses.FrozenInstanceError):
        SparseConfig().topk = 0.5


# ---------------------------------------------------------------------- selection on planted scores


def _planted(probs_rows, *, block=16, n=4):
    """Q/K whose pooled block scores (with scale 1) are log(probs_rows): K block j = e_j, Q block i = log p_i."""
    dim = 16
    k = torch.zeros(1, 1, n * block, dim)
    for j in range(n):
        k[0, 0, j * block:(j + 1) * block, j] = 1.0
    q = torch.zeros(1, 1, n * block, dim)
    for i, row in enumerate(probs_rows):
        q[0, 0, i * block:(i + 1) * block, :n] = torch.log(torch.tensor(row, dtype=torch.float32))
    return q, k


PLANTED = [
    [0.997, 0.001, 0.001, 0.001],  # collapses onto the sink block
    [0.25, 0.25, 0.25, 0.25],  # near-uniform
    [0.05, 0.5, 0.15, 0.3],  # graded, best blocks not in index order
    [0.1, 0.15, 0.3, 0.45],
]


def _kept_sets(selection):
    return [set(torch.nonzero(row).flatten().tolist()) for row in selection.kept[0, 0]]


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("topp", [{0}, {0, 1, 2}, {1, 3}, {2, 3}]),
        ("topk", [{0, 1}, {0, 1}, {1, 3}, {2, 3}]),
        ("hybrid", [{0, 1}, {0, 1, 2}, {1, 3}, {2, 3}]),
    ],
)
def test_topk_topp_hybrid_select_by_definition(mode, expected):
    q, k = _planted(PLANTED)
    cfg = SparseConfig(mode=mode, topk=0.5, topp=0.7, block_q=16, block_k=16, keep_sink_block=False, local_blocks=0)
    sel = select_blocks(q, k, cfg, scale=1.0)
    assert _kept_sets(sel) == expected
    n_kept = sum(len(s) for s in expected)
    assert torch.allclose(sel.kept_fraction, torch.tensor([[n_kept / 16]]))
    # a sink-collapsed row: top-p alone keeps one block, hybrid still keeps the top-k blocks
    if mode == "topp":
        assert len(expected[0]) == 1


def test_causal_block_level_sink_and_local_window():
    q, k = _planted(PLANTED)
    cfg = SparseConfig(mode="topp", topp=0.7, block_q=16, block_k=16, keep_sink_block=False, local_blocks=0)
    sel = select_blocks(q, k, cfg, scale=1.0, is_causal=True)
    kept = sel.kept[0, 0]
    assert not torch.triu(kept, diagonal=1).any()  # never a block above the diagonal
    # row 1 renormalizes over blocks {0, 1}: 0.5 each, so p = 0.7 needs both
    assert _kept_sets(sel)[:2] == [{0}, {0, 1}]
    cfg = SparseConfig(mode="topk", topk=0.25, block_q=16, block_k=16, keep_sink_block=True, local_blocks=1)
    sel = select_blocks(q, k, cfg, scale=1.0, is_causal=True)
    # row 2: top-1 among {0,1,2} is block 1, plus sink 0 and diagonal 2; row 3: top-1 is 3 = diagonal
    assert _kept_sets(sel) == [{0}, {0, 1}, {0, 1, 2}, {0, 3}]
    assert torch.allclose(sel.kept_fraction, torch.tensor([[8 / 10]]))  # of the 10 causal blocks


def test_low_self_similarity_blocks_are_always_computed():
    q, k = _planted(PLANTED)
    g = torch.Generator().manual_seed(3)
    k[0, 0, 32:48] = torch.randn(16, 16, generator=g)  # key block 2: unrelated rows, mean cosine ~ 0
    q[0, 0, 16:32] = torch.randn(16, 16, generator=g)  # query block 1
    cfg = SparseConfig(mode="topk", topk=0.25, block_q=16, block_k=16, keep_sink_block=False, local_blocks=0,
                       sim_threshold=0.5)
    kept = select_blocks(q, k, cfg, scale=1.0).kept[0, 0]
    assert kept[:, 2].all() and kept[1].all()
    assert [int(n) for n in kept.sum(-1)] == [2, 4, 2, 2]  # others: their top-1 plus the forced column
    off = select_blocks(q, k, SparseConfig(mode="topk", topk=0.25, block_q=16, block_k=16, keep_sink_block=False,
                                           local_blocks=0, sim_threshold=-1.0), scale=1.0).kept[0, 0]
    assert [int(n) for n in off.sum(-1)] == [1, 1, 1, 1]


def test_fully_padded_key_blocks_are_never_kept():
    q, k = _planted(PLANTED)
    mask = (torch.arange(64) < 40)[None, None, None, :].expand(1, 1, 64, 64)  # keys 48..63: all padding
    cfg = SparseConfig(mode="hybrid", topk=1.0, topp=1.0, block_q=16, block_k=16)
    sel = select_blocks(q, k, cfg, attention_mask=mask, scale=1.0)
    assert not sel.kept[..., 3].any() and sel.kept[..., :3].all()
    assert float(sel.kept_fraction) == 1.0  # relative to the blocks the padding allows
    # block 2 is only partly real, so it is kept but never "full"; blocks 0 and 1 are full
    assert sel.full[..., :2].all() and not sel.full[..., 2].any()


def test_grouped_query_selection_equals_repeated_kv():
    q, k, _ = _qkv(1)
    cfg = SparseConfig(topk=0.2, topp=0.8, sim_threshold=0.05)
    grouped = select_blocks(q, k, cfg, is_causal=True)
    repeated = select_blocks(q, k.repeat_interleave(H // HKV, dim=1), cfg, is_causal=True)
    assert torch.equal(grouped.kept, repeated.kept) and torch.equal(grouped.full, repeated.full)


def test_ragged_lengths_pool_only_real_rows():
    # T = 600 with 128-row query blocks: the last block has 88 rows and must be pooled over those
    q, k, _ = _qkv(2)
    from lens.kernels.sparse.selection import _pool

    pooled, sim = _pool(q, 128, None, True)
    assert torch.allclose(pooled[:, :, -1], q[:, :, 512:].mean(dim=2), atol=1e-6)
    unit = F.normalize(q[0, 0, 512:], dim=-1)
    gram = unit @ unit.T
    n = gram.shape[0]
    assert torch.allclose(sim[0, 0, -1], (gram.sum() - gram.diagonal().sum()) / (n * (n - 1)), atol=1e-5)


# ------------------------------------------------------------------------------ execution (compiled)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_sparse_matches_masked_reference(mask_name):
    mask, is_causal = MASKS[mask_name]
    q, k, v = _qkv(3)
    cfg = SparseConfig()
    for seed in (0, 1):
        sel = _random_selection(cfg, mask, is_causal, seed)
        out = sparse_attention(q, k, v, sel, attention_mask=mask, is_causal=is_causal)
        ref = sparse_attention_reference(q, k, v, sel, attention_mask=mask, is_causal=is_causal)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    sel = select_blocks(q, k, SparseConfig(topk=0.2, topp=0.5), attention_mask=mask, is_causal=is_causal)
    assert float(sel.density) < 1.0
    out = sparse_attention(q, k, v, sel, attention_mask=mask, is_causal=is_causal)
    ref = sparse_attention_reference(q, k, v, sel, attention_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if mask_name == "causal_left_padding":
        # padded query rows of the shorter sequence have no key at all: zeros, not NaN
        assert (out[1, :, : T - LENGTHS[1]] == 0).all()


@pytest.mark.parametrize("mask_name", ["causal", "bidirectional", "causal_right_padding", "bidirectional_padding",
                                       "sliding_window"])
def test_every_block_kept_equals_dense_sdpa(mask_name):
    mask, is_causal = MASKS[mask_name]
    q, k, v = _qkv(4)
    cfg = SparseConfig()
    kept = torch.ones(B, H, math.ceil(T / 128), math.ceil(T / 64), dtype=torch.bool)
    sel = make_selection(kept, cfg, q_len=T, k_len=T, attention_mask=mask, is_causal=is_causal)
    assert float(sel.density) == 1.0
    out = sparse_attention(q, k, v, sel, attention_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(out, _sdpa(q, k, v, mask, is_causal), atol=1e-5, rtol=0)


def test_streaming_preset_keeps_exactly_sink_and_window():
    q, k, v = _qkv(5)
    cfg = SparseConfig.streaming(sink_tokens=4, window=100)
    sel = select_blocks(q, k, cfg, is_causal=True)
    pos = torch.arange(T)
    expected = (pos[None, :] <= pos[:, None]) & ((pos[None, :] < 4) | (pos[:, None] - pos[None, :] < 100))
    element = sparse_element_mask(sel, is_causal=True)
    assert torch.equal(element, expected.expand(B, H, T, T))
    # the kept blocks are exactly the blocks the pattern touches
    touched = F.pad(expected, (0, 640 - T, 0, 640 - T)).view(5, 128, 10, 64).any(dim=3).any(dim=1)
    assert torch.equal(sel.kept, touched.expand(B, H, 5, 10))
    out = sparse_attention(q, k, v, sel, is_causal=True)
    torch.testing.assert_close(out, _sdpa(q, k, v, expected, False), atol=1e-5, rtol=0)


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    q, k, v = _qkv(6)
    sel = select_blocks(q, k, SparseConfig(topk=0.3), is_causal=True)

    def broken(dynamic):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(sparse, "_compiled_flex", broken)
    monkeypatch.setitem(sparse._state, "compile_error", None)
    monkeypatch.setitem(sparse._state, "static_variants", set())
    with pytest.warns(RuntimeWarning, match="compiled FlexAttention is unavailable"):
        out = sparse_attention(q, k, v, sel, is_causal=True)
    torch.testing.assert_close(out, sparse_attention_reference(q, k, v, sel, is_causal=True), atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse_attention(q, k, v, sel, is_causal=True)  # warned once only


def test_additive_bias_softcap_and_shorter_queries_in_eager_flex():
    # eager FlexAttention evaluates the same mask_mod / score_mod code without compiling a new variant
    q, k, v = _qkv(7)
    mask = MASKS["causal_right_padding"][0]
    g = torch.Generator().manual_seed(7)
    additive = torch.where(mask, 0.3 * torch.randn(B, 1, T, T, generator=g), torch.finfo(torch.float32).min)
    for attention_mask, softcap in ((additive, None), (None, 2.0), (additive, 2.0)):
        causal = attention_mask is None
        sel = select_blocks(q, k, SparseConfig(topk=0.3), attention_mask=attention_mask, is_causal=causal)
        out = sparse_attention(q, k, v, sel, attention_mask=attention_mask, is_causal=causal, softcap=softcap,
                               compiled=False)
        ref = sparse_attention_reference(q, k, v, sel, attention_mask=attention_mask, is_causal=causal, softcap=softcap)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
        full = make_selection(torch.ones_like(sel.kept), SparseConfig(), q_len=T, k_len=T,
                              attention_mask=attention_mask, is_causal=causal)
        dense, _ = attention_with_stats(q, k, v, attention_mask=attention_mask, is_causal=causal, softcap=softcap)
        out = sparse_attention(q, k, v, full, attention_mask=attention_mask, is_causal=causal, softcap=softcap,
                               compiled=False)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)
    # a query chunk after a cache (Tq < Tk): the causal diagonal is bottom-right aligned
    q_short = q[:, :, -136:]
    sel = select_blocks(q_short, k, SparseConfig(topk=0.3), is_causal=True)
    out = sparse_attention(q_short, k, v, sel, is_causal=True, compiled=False)
    torch.testing.assert_close(out, sparse_attention_reference(q_short, k, v, sel, is_causal=True), atol=1e-5, rtol=0)
    full = make_selection(torch.ones_like(sel.kept), SparseConfig(), q_len=136, k_len=T, is_causal=True)
    dense, _ = attention_with_stats(q_short, k, v, is_causal=True)
    torch.testing.assert_close(sparse_attention(q_short, k, v, full, is_causal=True, compiled=False), dense,
                               atol=1e-5, rtol=0)


def test_mismatched_mask_is_rejected():
    q, k, v = _qkv(8)
    sel = select_blocks(q, k, SparseConfig(), is_causal=True)
    with pytest.raises(ValueError, match="differ from those the selection was made with"):
        sparse_attention(q, k, v, sel, is_causal=False)


def test_mask_analysis_follows_in_place_edits_and_inference_mode():
    # the analysis of a mask object is reused across layers, but never after the mask changed
    q, k, v = _qkv(12)
    mask = MASKS["bidirectional_padding"][0].clone()
    cfg = SparseConfig(mode="topk", topk=1.0)
    before = select_blocks(q, k, cfg, attention_mask=mask)
    assert before.allowed[0, 0, 0].all()
    mask[0, ..., 300:] = False  # sequence 0 now has 300 real tokens: key blocks 5..9 are padding
    after = select_blocks(q, k, cfg, attention_mask=mask)
    assert not after.allowed[0, :, :, 5:].any() and after.allowed[0, :, :, :5].all()
    with torch.inference_mode():  # inference tensors carry no version counter: analysed afresh
        frozen = mask.clone()
        sel = select_blocks(q, k, cfg, attention_mask=frozen)
        out, stats = sparse_attention_with_stats(q, k, v, sel, attention_mask=frozen, compiled=False)
        ref, probs = sparse_attention_reference(q, k, v, sel, attention_mask=frozen, return_probs=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.key_mass, (probs * stats.query_valid[:, None, :, None]).sum(2), atol=1e-4,
                               rtol=1e-5)


# ------------------------------------------------------------------------------------ linear fallback


def test_linear_fallback_recovers_skipped_mass():
    # small logits: attention is spread over all keys, so the skipped blocks carry most of the mass
    q, k, v = _qkv(9, scale=0.3)
    dense = _sdpa(q, k, v, None, False)
    errors = {}
    for linear in (False, True):
        cfg = SparseConfig(mode="topk", topk=0.2, keep_sink_block=False, local_blocks=0, linear_fallback=linear)
        sel = select_blocks(q, k, cfg)
        out = sparse_attention(q, k, v, sel)
        torch.testing.assert_close(out, sparse_attention_reference(q, k, v, sel), atol=1e-5, rtol=0)
        errors[linear] = _rel_l1(out, dense)
    assert sel.skipped_fraction() > 0.6
    weight = linear_mix_weight(sel)
    assert float(weight.mean()) > 0.5  # most of the estimated mass is in the skipped blocks
    assert errors[True] < 0.5 * errors[False], errors


# ------------------------------------------------------------------------------------------ statistics


def test_stats_equal_reference_renormalized_probabilities():
    mask, _ = MASKS["causal_right_padding"]
    q, k, v = _qkv(10)
    sel = select_blocks(q, k, SparseConfig(topk=0.2, topp=0.6), attention_mask=mask)
    out, stats = sparse_attention_with_stats(q, k, v, sel, attention_mask=mask, is_causal=False, pattern_heads=(0, 3),
                                             chunk_size=128)
    ref, probs = sparse_attention_reference(q, k, v, sel, attention_mask=mask, return_probs=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # rows sum to one over the kept blocks (or are empty), as docs/definitions.md defines them under sparsity
    sums = probs.sum(-1)
    assert torch.allclose(sums[sums > 0], torch.ones(()), atol=1e-5)
    valid = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None])
    assert torch.equal(stats.query_valid, valid)
    torch.testing.assert_close(stats.key_mass, (probs * valid[:, None, :, None]).sum(2), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(stats.patterns, probs[:, [0, 3]], atol=1e-6, rtol=0)
    assert stats.pattern_heads == (0, 3)
    torch.testing.assert_close(stats.kept_fraction, sel.kept_fraction)
    # |Q_k| counts the base mask (causal ∧ padding), not the sparse pattern: same as dense attention
    _, dense_stats = attention_with_stats(q, k, v, attention_mask=mask)
    torch.testing.assert_close(stats.query_count, dense_stats.query_count)
    assert torch.equal(stats.query_valid, dense_stats.query_valid)
    # with every block kept the statistics are dense attention's
    full = make_selection(torch.ones_like(sel.kept), SparseConfig(), q_len=T, k_len=T, attention_mask=mask)
    _, full_stats = sparse_attention_with_stats(q, k, v, full, attention_mask=mask, is_causal=False)
    torch.testing.assert_close(full_stats.key_mass, dense_stats.key_mass, atol=1e-4, rtol=1e-5)
    assert full_stats.patterns is None and torch.all(full_stats.kept_fraction == 1)


def test_stats_without_mask_match_dense_definitions():
    q, k, v = _qkv(11)
    sel = select_blocks(q, k, SparseConfig(topk=0.25, topp=0.5), is_causal=True)
    _, stats = sparse_attention_with_stats(q, k, v, sel, is_causal=True)
    _, probs = sparse_attention_reference(q, k, v, sel, is_causal=True, return_probs=True)
    torch.testing.assert_close(stats.key_mass, probs.sum(2), atol=1e-4, rtol=1e-5)
    assert torch.equal(stats.query_count[0], torch.arange(T, 0, -1).float())  # |Q_k| = T - k, causal
    assert stats.query_valid.all() and stats.patterns is None


# --------------------------------------------------------------------------------- MiniLM, real model


@pytest.fixture(scope="module", params=["tiled", "prose"])
def minilm_layers(request):
    """Q/K/V of every MiniLM layer at T = 512: the benchmark's sentences tiled (repeated text lets a token
    attend to its own copies far away), and ~530 tokens of distinct prose cut to 510 (no repetition)."""
    from pathlib import Path

    from lens.bench.attention import capture_minilm_qkv

    if request.param == "tiled":
        return capture_minilm_qkv(512)
    prose = (Path(__file__).parent / "data" / "minilm_prose.txt").read_text()
    return capture_minilm_qkv(512, sentences=[prose])


def test_minilm_hybrid_topp_095_accuracy_and_why_half_cannot_be_skipped(minilm_layers):
    """all-MiniLM-L6-v2 on tiled text and on distinct prose (T = 512, 8 key blocks of 64, bidirectional).

    Target asked for: relative L1 ≤ 0.07 against dense in every layer while skipping ≥ 50% of blocks.
    Measured: the accuracy holds (≤ 0.04), the skipping does not (1–32%). The reason is the model, not
    the selection: even an oracle that keeps, per query block, the 4 key blocks with the largest *true*
    attention mass (50% skipped) has relative L1 0.11–0.21, because MiniLM's attention at this length is
    spread — reaching 95% of a query block's mass takes 5–8 of its 8 key blocks. On distinct prose (no
    repeated text) the picture is the same: hybrid L1 ≤ 0.04 skipping 3–33%, oracle L1 0.12–0.35.
    This test pins both facts on both inputs.
    """
    cfg = SparseConfig(mode="hybrid", topk=0.25, topp=0.95, block_q=64, block_k=64)
    report = []
    for index, (q, k, v) in enumerate(minilm_layers):
        dense = F.scaled_dot_product_attention(q, k, v)
        sel = select_blocks(q, k, cfg)
        out = sparse_attention(q, k, v, sel)
        err, skipped = _rel_l1(out, dense), sel.skipped_fraction()
        # oracle: the heaviest half of the key blocks by true attention mass
        probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        block_mass = probs.view(1, 12, 8, 64, 8, 64).sum(-1).mean(3)
        top = block_mass.argsort(-1, descending=True)[..., :4]
        oracle = make_selection(torch.zeros_like(block_mass, dtype=torch.bool).scatter(-1, top, True), cfg,
                                q_len=512, k_len=512)
        oracle_err = _rel_l1(sparse_attention_reference(q, k, v, oracle), dense)
        report.append((index, round(err, 4), round(skipped, 3), round(oracle_err, 4)))
    message = f"(layer, rel L1, skipped, oracle rel L1 at 50% skipped): {report}"
    assert all(err <= 0.07 for _, err, _, _ in report), message
    assert all(skipped > 0.0 for _, _, skipped, _ in report), message
    assert max(skipped for _, _, skipped, _ in report) >= 0.25, message
    # no block selection can meet "≥ 50% skipped and ≤ 0.07" here: the best one misses it in every layer
    assert all(oracle_err > 0.07 for _, _, _, oracle_err in report), message
