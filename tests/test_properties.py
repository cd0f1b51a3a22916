"""Property-based tests (hypothesis) with a fixed example budget, so CI time stays bounded.

* codecs: quantize → dequantize within each format's error bound, pack/unpack round trips, scale invariance;
* mask builders: every block a sparse selection keeps is allowed by the model's mask, and the uniform share
  the kernels measure equals the definition on random masks (windows, padding, bidirectional blocks);
* input encoding: any Unicode string either encodes (ids and labels that decode back) or raises ``InputError``;
* ``Run`` save → load round trips of arbitrary arrays and metadata, and any flipped byte is caught.

``derandomize=True`` makes every run try the same examples (no flaky CI, no example database on disk).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import lens
from lens.errors import EmptyInputError, InputError, InputTooLongError, RunFormatError
from lens.kernels.attention import attention_with_stats
from lens.kernels.lowbit import (
    E2M1_VALUES,
    Int4Codec,
    Int8Codec,
    MXFP4Codec,
    NVFP4Codec,
    TernaryCodec,
    e2m1_decode,
    e2m1_encode,
    pack_bits,
    pack_nibbles,
    pack_trits,
    unpack_bits,
    unpack_nibbles,
    unpack_trits,
)
from lens.kernels.sparse import SparseConfig, select_blocks, sparse_element_mask
from lens.models.inputs import encode
from lens.models.labels import token_labels
from lens.run import Run

BUDGET = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SMALL = settings(BUDGET, max_examples=15)

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def weights(rows=st.integers(1, 6), cols=st.integers(1, 70)):
    return st.tuples(rows, cols).flatmap(lambda s: hnp.arrays(np.float32, s, elements=finite))


# --------------------------------------------------------------------------------------------- codecs


@BUDGET
@given(st.lists(st.integers(0, 15), min_size=0, max_size=64).filter(lambda x: len(x) % 2 == 0))
def test_nibbles_round_trip(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(t)), t)


@BUDGET
@given(st.lists(st.booleans(), max_size=100))
def test_bits_round_trip(bits):
    t = torch.tensor(bits, dtype=torch.bool)
    assert torch.equal(unpack_bits(pack_bits(t), len(bits)), t)


@BUDGET
@given(st.lists(st.integers(-1, 1), max_size=100))
def test_trits_round_trip(trits):
    t = torch.tensor(trits, dtype=torch.int8)
    assert torch.equal(unpack_trits(pack_trits(t), len(trits)), t)


@BUDGET
@given(hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(-20, 20, allow_nan=False, width=32)))
def test_e2m1_is_the_nearest_value(x):
    xs = torch.from_numpy(x)
    decoded = e2m1_decode(e2m1_encode(xs))
    grid = torch.cat([E2M1_VALUES, -E2M1_VALUES])
    clamped = xs.clamp(-6, 6)
    nearest = (clamped[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.all((decoded - clamped).abs() <= nearest + 1e-6)
    assert torch.all(torch.isin(decoded, grid))
    assert torch.equal(e2m1_decode(e2m1_encode(-xs)), -decoded)  # sign symmetric


@BUDGET
@given(weights())
def test_int8_error_bound_and_scale_invariance(w):
    t = torch.from_numpy(w)
    codec = Int8Codec()
    p = codec.quantize(t)
    scale = p.data["scales"]
    err = (codec.dequantize(p) - t).abs()
    assert torch.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-30)
    scaled = codec.dequantize(codec.quantize(t * 4.0))  # a power of two: exact
    assert torch.equal(scaled, codec.dequantize(p) * 4.0)


@BUDGET
@given(weights(cols=st.integers(1, 40)), st.sampled_from([2, 4, 8, 16]))
def test_int4_error_bound(w, group):
    t = torch.from_numpy(w)
    codec = Int4Codec(group_size=group)
    p = codec.quantize(t)
    pad = (-t.shape[1]) % group
    scale = p.data["scales"].float().repeat_interleave(group, dim=1)[:, : t.shape[1] + pad][:, : t.shape[1]]
    assert torch.all((codec.dequantize(p) - t).abs() <= scale / 2 * (1 + 1e-5) + 1e-30)


@BUDGET
@given(weights(cols=st.integers(1, 64)), st.integers(-6, 6))
def test_mx_and_nv_fp4_scale_invariance(w, k):
    """Multiplying a weight by 2^k multiplies its MXFP4 and NVFP4 dequantization by 2^k, exactly."""
    t = torch.from_numpy(w)
    for codec in (MXFP4Codec(), NVFP4Codec()):
        base = codec.dequantize(codec.quantize(t))
        if not torch.isfinite(base).all() or float(t.abs().max()) == 0.0:
            continue
        scaled = codec.dequantize(codec.quantize(t * 2.0**k))
        assert torch.equal(scaled, base * 2.0**k), type(codec).__name__
        amax = float(t.abs().max())
        assert float((base - t).abs().max()) <= amax  # never worse than dropping the weight


@BUDGET
@given(weights())
def test_ternary_codes_and_gamma(w):
    t = torch.from_numpy(w)
    codec = TernaryCodec()
    deq = codec.dequantize(codec.quantize(t))
    gamma = float(t.abs().mean())
    values = torch.unique(deq)
    assert all(math.isclose(abs(float(v)), gamma, rel_tol=1e-6) or float(v) == 0.0 for v in values)


# ------------------------------------------------------------------------------------ mask builders


@st.composite
def masks(draw):
    """A boolean [B, 1, T, T] mask of a shape real models build: causal or not, padding on either side,
    a sliding window, a bidirectional block — in any combination."""
    batch, length = draw(st.integers(1, 2)), draw(st.integers(2, 70))
    pos = torch.arange(length)
    causal = draw(st.booleans())
    base = (pos[None, :] <= pos[:, None]) if causal else torch.ones(length, length, dtype=torch.bool)
    if draw(st.booleans()):
        window = draw(st.integers(1, length))
        base = base & ((pos[:, None] - pos[None, :]).abs() < window)
    if causal and draw(st.booleans()):
        start = draw(st.integers(0, length - 1))
        stop = draw(st.integers(start + 1, length))
        block = (pos >= start) & (pos < stop)
        base = base | (block[:, None] & block[None, :])
    rows = []
    for _ in range(batch):
        n = draw(st.integers(1, length))
        left = draw(st.booleans())
        keys = (pos >= length - n) if left else (pos < n)
        rows.append(base & keys[None, :])
    return torch.stack(rows)[:, None]


def _definition(mask: torch.Tensor):
    m = mask[:, 0]
    valid = torch.diagonal(m, dim1=-2, dim2=-1)
    seen = (m & valid[:, :, None]).double()
    n_keys = seen.sum(-1, keepdim=True)
    inv = torch.where(n_keys > 0, 1.0 / n_keys.clamp(min=1), torch.zeros_like(n_keys))
    return seen.sum(1), (seen * inv).sum(1)


@BUDGET
@given(masks(), st.integers(0, 10**6))
def test_uniform_share_is_the_definition_for_any_mask(mask, seed):
    batch, _, length, _ = mask.shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, 2, length, 8, generator=g) for _ in range(3))
    _, stats = attention_with_stats(q, k, v, attention_mask=mask, chunk_size=7)
    count, uniform = _definition(mask)
    np.testing.assert_allclose(stats.query_count.numpy(), count.numpy())
    np.testing.assert_allclose(stats.uniform_sum.numpy(), uniform.numpy(), rtol=1e-5, atol=1e-6)


@BUDGET
@given(masks(), st.sampled_from(["topk", "topp", "hybrid", "streaming"]), st.floats(0.05, 1.0),
       st.sampled_from([16, 32]), st.integers(0, 10**6))
def test_every_kept_block_is_allowed_by_the_models_mask(mask, mode, fraction, block, seed):
    batch, _, length, _ = mask.shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 2, length, 16, generator=g)
    k = torch.randn(batch, 1, length, 16, generator=g)
    config = (SparseConfig.streaming(sink_tokens=2, window=block, block_q=block, block_k=block) if mode == "streaming"
              else SparseConfig(mode=mode, topk=fraction, topp=fraction, block_q=block, block_k=block))
    sel = select_blocks(q, k, config, attention_mask=mask)
    n_q, n_k = sel.kept.shape[-2:]
    padded = torch.zeros(batch, 1, n_q * block, n_k * block, dtype=torch.bool)
    padded[..., :length, :length] = mask
    allowed_blocks = padded.view(batch, 1, n_q, block, n_k, block).any(dim=5).any(dim=3)
    assert not bool((sel.kept & ~allowed_blocks).any()), "a kept block holds no allowed (query, key) pair"
    elements = sparse_element_mask(sel, attention_mask=mask)
    assert not bool((elements & ~mask).any()), "the sparse kernel would attend outside the model's mask"


# ------------------------------------------------------------------------------------- input encoding

# st.text() never yields lone surrogates, which are exactly what must be refused: build strings from characters
_characters = st.one_of(
    st.characters(codec=None),  # any code point hypothesis likes (control, combining, astral, …)
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),  # lone surrogates
    st.sampled_from(list("日本語😀👩\u200d\ufe0f\u0301\u202e \t\n\x00")),  # byte-level splits, joiners
)
unicode_text = st.lists(_characters, max_size=40).map("".join)


@pytest.fixture(scope="module")
def gpt2(tiny_model_dir):
    return lens.load(tiny_model_dir("gpt2"))


@BUDGET
@given(unicode_text)
def test_any_string_encodes_or_raises_input_error(gpt2, minilm, text):
    for lm in (gpt2, minilm):
        try:
            encoded = encode(lm, [text])
        except (InputError, EmptyInputError, InputTooLongError) as exc:
            assert "input 0" in str(exc)
            if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
                assert "surrogate" in str(exc)
            continue
        assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text), "a lone surrogate must be refused"
        ids = encoded.ids[0]
        labels, flags = token_labels(lm.tokenizer, ids)
        assert len(labels) == len(ids) == len(flags)
        decoded = lm.tokenizer.decode(ids)
        if "\ufffd" not in decoded:
            assert not any("\ufffd" in label for label in labels)
        if lm is gpt2:
            assert "".join(labels) == decoded, "byte-level labels concatenate to the tokenizer's decode"


@SMALL
@given(st.lists(unicode_text.filter(lambda t: bool(t.strip()) and not any(0xD800 <= ord(c) <= 0xDFFF for c in t)),
                min_size=1, max_size=3))
def test_traced_text_is_finite_and_batch_invariant(gpt2, texts):
    run = lens.trace(gpt2, texts, capture=("attention",), progress=False)
    assert np.isfinite(run.arrays["attn.key_mass"]).all()
    alone = lens.trace(gpt2, texts[-1:], capture=("attention",), progress=False)
    np.testing.assert_allclose(run.arrays["attn.key_mass"][..., run.span(len(texts) - 1)],
                               alone.arrays["attn.key_mass"], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- Run save/load

json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int32, np.int8, np.uint8, np.bool_])


@st.composite
def runs(draw):
    lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=3))
    n = sum(lengths)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = [[draw(st.text(max_size=5)) for _ in range(m)] for m in lengths]
    arrays = {"offsets": offsets, "token_ids": np.arange(n, dtype=np.int64), "special": np.zeros(n, dtype=bool)}
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(dtypes)
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
        arrays[f"extra.{i}"] = draw(hnp.arrays(dtype, shape))
    meta = {"n_layers": 1, "n_heads": 1, "causal": draw(st.booleans()), "user": draw(json_value)}
    return Run(arrays=arrays, tokens=tokens, meta=meta)


@BUDGET
@given(runs(), st.integers(0, 2**31))
def test_run_save_load_round_trip_and_any_flipped_byte(tmp_path_factory, run, where):
    path = tmp_path_factory.mktemp("prop") / "run.lens"
    run.save(path)
    back = Run.load(path)
    assert back.tokens == run.tokens
    assert back.meta == json.loads(json.dumps(run.meta))
    assert set(back.arrays) == set(run.arrays)
    for name, arr in run.arrays.items():
        assert back.arrays[name].dtype == arr.dtype and back.arrays[name].shape == arr.shape
        np.testing.assert_array_equal(back.arrays[name], arr)
    raw = bytearray(path.read_bytes())
    raw[where % len(raw)] ^= 1 << (where % 8)
    path.write_bytes(bytes(raw))
    try:
        damaged = Run.load(path)
    except RunFormatError:
        return
    # the only bytes a flip may leave undetected: JSON whitespace/padding that changes nothing
    assert damaged.tokens == run.tokens and damaged.meta == back.meta
    for name, arr in run.arrays.items():
        np.testing.assert_array_equal(damaged.arrays[name], arr)
