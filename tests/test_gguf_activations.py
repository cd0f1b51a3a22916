"""llama.cpp's activation quantization and CPU matmul, emulated by ``QuantConfig(..., activations="llama.cpp")``
(docs/definitions.md#gguf-formats).

Independent references: ``gguf_reference`` (a numpy re-implementation of ggml's ``quantize_row_q8_0_ref`` /
``q8_1_ref`` / ``q8_K_ref`` and the ``ggml_vec_dot_*_generic`` formulas, sharing no code with lens), and
llama.cpp's own C — libggml's ``from_float`` and SIMD ``vec_dot`` through ctypes — wherever llama-cpp-python
is installed.
"""

from __future__ import annotations

import ctypes

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gguf_reference as ref
from gguf_testdata import ACT_TYPES, CpuTraits, bits_equal, c_quantize, libggml, smollm2_gguf_path
from lens.kernels.errors import ConfigError
from lens.kernels.lowbit import (
    GGUF_WEIGHT_TYPES,
    VEC_DOT_TYPE,
    GGUFCodec,
    QuantConfig,
    QuantLinear,
    dequantize,
    gguf_bytes,
    gguf_linear,
    gguf_type_id,
    packed_from_gguf,
    quantize_activations,
    quantize_model,
)


# ------------------------------------------------------------------------------------------------
# Against llama.cpp's own C (libggml), wherever llama-cpp-python is installed
# ------------------------------------------------------------------------------------------------


def test_activation_quantization_and_dot_products_match_libggml():
    base, cpu = libggml()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(CpuTraits)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    vec_dot_t = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
                                 ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    g = torch.Generator().manual_seed(3)
    n = 1024
    for t in GGUF_WEIGHT_TYPES:
        vdt = VEC_DOT_TYPE[t]
        bs, ts, tid = ACT_TYPES[vdt]
        w = torch.randn(4, n, generator=g) * 0.05
        p = GGUFCodec(t).quantize(w)
        traits = cpu.ggml_get_type_traits_cpu(gguf_type_id(t)).contents
        assert traits.vec_dot_type == tid                      # the table lens uses is llama.cpp's
        act = cpu.ggml_get_type_traits_cpu(tid).contents
        for _ in range(3):
            x = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g))).numpy()
            yref = c_quantize(base, "quantize_row_" + vdt.replace("_k", "_K") + "_ref", x, ts, bs)
            ysimd = np.zeros_like(yref)
            from_float_t(act.from_float)(x.ctypes.data, ysimd.ctypes.data, n)
            xq = quantize_activations(torch.from_numpy(x), vdt).numpy()
            blk = yref.reshape(-1, ts)
            d = blk[:, :4].copy().view(np.float32) if vdt == "q8_k" else \
                blk[:, :2].copy().view(np.float16).astype(np.float32)
            q = blk[:, (4 if vdt != "q8_0" else 2):(4 if vdt != "q8_0" else 2) + bs].copy().view(np.int8)
            assert bits_equal(xq, (q.astype(np.float32) * d).reshape(-1)), t
            emu = gguf_linear(torch.from_numpy(x)[None], p, activations="llama.cpp")[0].numpy()
            plain = gguf_linear(torch.from_numpy(x)[None], p)[0].numpy()
            rows = gguf_bytes(p)
            for r in range(4):
                s = np.zeros(1, np.float32)
                vec_dot_t(traits.vec_dot)(n, s.ctypes.data, 0, np.ascontiguousarray(rows[r]).ctypes.data, 0,
                                          ysimd.ctypes.data, 0, 1)
                scale = ref.abs_terms(t, dequantize(p)[r].numpy(), x)
                assert abs(emu[r] - s[0]) <= 2e-6 * scale, (t, r, emu[r], s[0])
                if r == 0:
                    assert abs(plain[r] - s[0]) > 10 * abs(emu[r] - s[0]), t


def test_float_vec_dot_types_match_libggml():
    # F16 / BF16 weights (and llama.cpp's f16 KV cache) convert the other operand to their own type.
    _, cpu = libggml()
    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(CpuTraits)
    cpu.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    from_float_t = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    ids = {"f32": 0, "f16": 1, "bf16": 30}
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(4096, generator=g) * torch.exp(3 * torch.randn(4096, generator=g))).numpy()
    for t, tid in ids.items():
        traits = cpu.ggml_get_type_traits_cpu(tid).contents
        assert traits.vec_dot_type == ids[VEC_DOT_TYPE[t]]
        if t == "f32":
            continue
        raw = np.zeros(x.size, np.uint16)
        from_float_t(cpu.ggml_get_type_traits_cpu(tid).contents.from_float)(x.ctypes.data, raw.ctypes.data, x.size)
        got = quantize_activations(torch.from_numpy(x), t)
        assert np.array_equal(got.to(getattr(torch, {"f16": "float16", "bf16": "bfloat16"}[t])).view(torch.int16)
                              .numpy().view(np.uint16), raw), t


# ------------------------------------------------------------------------------------------------
# Against the independent numpy reference
# ------------------------------------------------------------------------------------------------


def test_activation_quantization_equals_ggml_reference_rounding():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 512, generator=g) * torch.exp(torch.randn(3, 512, generator=g))
    x[0, :32] = torch.arange(32) - 15.5              # amax 15.5: q = roundf(±(k+0.5)·127/15.5) …
    x[1, :32] = (torch.arange(32) - 16) * (127 / 127)  # amax 16 → exact integer multiples
    x[1, 32:64] = torch.linspace(-127, 127, 32).round() + 0.5   # halves on Q8_0's grid (amax 127.5)
    x[2, :256] = 0.0                                  # an all-zero Q8_K block
    x[2, 256:288] = 127.0
    x[2, 288:320] = torch.arange(32) + 0.5           # Q8_K ties: half to even (nearest_int), not away
    for vdt, reference in (("q8_0", ref.q8_0_row), ("q8_1", ref.q8_1_row), ("q8_k", ref.q8_k_row)):
        got, sums = quantize_activations(x, vdt, return_sums=True)
        assert got.shape == x.shape and got.dtype == torch.float32
        for r in range(x.shape[0]):
            blocks = reference(x[r].numpy())
            assert bits_equal(got[r].numpy(), ref.fake_quant(blocks)), (vdt, r)
            if vdt == "q8_1":
                assert bits_equal(sums[r].numpy(), np.array([b["s"] for b in blocks], np.float32))
            if vdt == "q8_k":
                want = np.concatenate([b["bsums"].astype(np.float32) * b["d"] for b in blocks])
                assert bits_equal(sums[r].numpy(), want.astype(np.float32))
    assert torch.equal(quantize_activations(x.to(torch.bfloat16), "q8_0"),
                       quantize_activations(x.to(torch.bfloat16).float(), "q8_0"))
    with pytest.raises(ConfigError, match="multiple"):
        quantize_activations(torch.randn(2, 48), "q8_0")
    with pytest.raises(ConfigError, match="q8_0, q8_1, q8_k"):
        quantize_activations(torch.randn(2, 64), "q8_2")


@pytest.mark.parametrize("t", GGUF_WEIGHT_TYPES)
def test_emulated_matmul_equals_ggml_vec_dot_reference(t):
    g = torch.Generator().manual_seed(gguf_type_id(t))
    n, rows = 512, 6
    w = torch.randn(rows, n, generator=g) * 0.05
    w[1] += 0.05                                      # a large minimum for the _1 / K types
    p = GGUFCodec(t).quantize(w)
    x = torch.randn(3, n, generator=g) * torch.exp(torch.randn(3, n, generator=g))
    emu = gguf_linear(x, p, activations="llama.cpp")
    plain = gguf_linear(x, p)
    wq = dequantize(p).numpy()
    worse = 0
    for i in range(x.shape[0]):
        for r in range(rows):
            want = ref.vec_dot(t, gguf_bytes(p)[r], x[i].numpy())
            scale = ref.abs_terms(t, wq[r], x[i].numpy())
            assert abs(float(emu[i, r]) - want) <= 2e-6 * scale, (t, i, r)
            worse += abs(float(plain[i, r]) - want) > 10 * abs(float(emu[i, r]) - want)
    assert worse >= 0.8 * x.shape[0] * rows    # unquantized activations are measurably not llama.cpp


def test_q8_1_sum_term_is_what_changes_q4_1_results():
    # Q4_1 · Q8_1 = d_w·d_x·Σq_w·q_x + m·s with s = fp16(d_x32 · Σq_x): with a large minimum m, using the
    # fake-quantized x̂ alone (m · fp16(d_x) · Σq_x) is off by the rounding of s; the emulation is not.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(8, 256, generator=g) * 0.01 + 3.0
    p = GGUFCodec("q4_1").quantize(w)
    x = torch.randn(5, 256, generator=g)
    emu = gguf_linear(x, p, activations="llama.cpp")
    fake_only = F.linear(quantize_activations(x, "q8_1"), dequantize(p))
    want = torch.tensor([[ref.vec_dot("q4_1", gguf_bytes(p)[r], x[i].numpy()) for r in range(8)]
                         for i in range(5)])
    assert (emu - want).abs().max() < 0.1 * (fake_only - want).abs().max()


# ------------------------------------------------------------------------------------------------
# In models and on the real SmolLM2 file
# ------------------------------------------------------------------------------------------------


def test_llama_cpp_activations_on_a_tiny_llama_keep_outputs_close():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    base = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(ids).logits
        outs = {}
        for act in (None, "llama.cpp"):
            m = transformers.LlamaForCausalLM(cfg).eval()
            m.load_state_dict(base.state_dict())
            quantize_model(m, QuantConfig("q4_k", activations=act), progress=False)
            outs[act] = m(ids).logits
    for y in outs.values():   # random-init weights (std 0.02) are Q4_K's hardest case: cos ≈ 0.984
        assert F.cosine_similarity(y.flatten(), want.flatten(), dim=0) > 0.97
    emu_shift = (outs["llama.cpp"] - outs[None]).norm() / (outs[None] - want).norm()
    assert 0 < emu_shift < 0.5   # activation rounding moves the logits, by less than weight quantization


def test_smollm2_projection_as_quantlinear_with_llama_cpp_activations():
    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    t = next(t for t in reader.tensors if t.name == "blk.12.ffn_down.weight")
    p = packed_from_gguf(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())))
    q = QuantLinear.from_packed(p, config=QuantConfig("q4_1", activations="llama.cpp"))
    assert (q.out_features, q.in_features) == (576, 1536) and q.weight_bytes() == t.n_bytes
    x = torch.randn(2, 1536, generator=torch.Generator().manual_seed(0))
    y = q(x)
    for r in (0, 17, 575):
        want = ref.vec_dot("q4_1", gguf_bytes(p)[r], x[0].numpy())
        assert abs(float(y[0, r]) - want) <= 2e-6 * ref.abs_terms("q4_1", dequantize(p)[r].numpy(), x[0].numpy())
