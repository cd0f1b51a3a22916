"""llama.cpp's activation quantization and the integer dot products of its CPU matmul, emulated in torch.

llama.cpp's CPU backend (ggml-cpu) multiplies a quantized weight row by an activation row without
dequantizing the weight: it first quantizes the activation row to the weight type's ``vec_dot_type``
(``type_traits_cpu[type].vec_dot_type`` in ggml-cpu.c) and then runs an integer dot product per block
(``ggml_vec_dot_<weight>_<act>`` in ggml-cpu/quants.c):

=======================  =============  =====================================================================
weight type              vec_dot_type   per-block dot product (``sumi`` = Σ integer codes × int8 codes)
=======================  =============  =====================================================================
Q4_0, Q5_0, Q8_0, IQ4_NL Q8_0           ``sumi · d_w · d_x``
Q4_1, Q5_1               Q8_1           ``d_w · d_x · sumi + m_w · s_x`` (``s_x`` = fp16(``d_x`` · Σ q_x))
Q2_K, Q4_K, Q5_K         Q8_K           ``d_w · d_x · Σ sc·sumi − dmin_w · d_x · Σ m · bsums_x``
Q3_K, Q6_K               Q8_K           ``d_w · d_x · Σ sc·sumi``
=======================  =============  =====================================================================

The activation formats (``quantize_row_q8_0_ref``, ``_q8_1_ref``, ``_q8_K_ref`` in ggml-quants.c):

* Q8_0 — blocks of 32: ``d = amax / 127`` (fp32), ``q = roundf(x · (1/d))`` (halves away from zero), the
  fp16 of ``d`` is stored and used in the product.
* Q8_1 — as Q8_0, plus ``s = fp16(d · Σ q)`` per block, computed with the fp32 ``d`` — the term that
  carries the weight's minimum ``m``. This is where Q8_1 changes results beyond the rounding of ``x``: the
  exact product would use ``fp16(d) · Σ q`` unrounded.
* Q8_K — blocks of 256: ``iscale = −127 / max`` (``max`` the signed element of largest magnitude),
  ``q = min(127, nearest_int(iscale · x))`` (half to even), ``d = 1 / iscale`` kept in fp32 (not fp16),
  ``bsums`` = Σ q over each 16 elements (exact integers).

What :func:`emulated_linear` reproduces: the rounding of every activation to its block's grid and scale
(fp16 scale for Q8_0/Q8_1, fp32 for Q8_K), Q8_1's separately rounded ``s`` term, and the split of the
K-quants' product into the scaled-code term and the minimum term applied through the activation's
16-element sums (``bsums``). Since ``sumi`` and ``bsums`` are exact integers, the remaining difference from
ggml's result is the order of the float32 accumulation (ggml sums blocks left to right, torch's matmul in
its own order): ≈ 1e-7 relative, not bit-exact.

Not emulated: ggml's SIMD paths of ``quantize_row_q8_0``/``q8_1`` on x86 (AVX) compute ``127 / amax`` and
round halves to even, which can differ from the reference in ties and last-ulp cases (none in the test
suite's random rows, checked against libggml's own ``from_float``); the repacked weight layouts of
ggml-cpu (Q4_0/Q4_K/IQ4_NL interleaved for AVX2/NEON, with their own activation-quantizing kernels) and
llamafile's sgemm (same quantized operands, other summation orders); and the rest of llama.cpp's graph
(its f16 KV cache, fused kernels), which is the model's business, not the linear layer's. F16/BF16 weights
round the activation to their own type (``quantize_activations(x, "f16")``).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from .gguf_blocks import f16_bytes, first_absmax, rdiv

#: Weight type → the activation type llama.cpp's CPU matmul converts the input row to
#: (``type_traits_cpu[type].vec_dot_type``), including the float types a GGUF file may also hold.
VEC_DOT_TYPE: dict[str, str] = {
    "q4_0": "q8_0", "q5_0": "q8_0", "q8_0": "q8_0", "iq4_nl": "q8_0",
    "q4_1": "q8_1", "q5_1": "q8_1",
    "q2_k": "q8_k", "q3_k": "q8_k", "q4_k": "q8_k", "q5_k": "q8_k", "q6_k": "q8_k",
    "f32": "f32", "f16": "f16", "bf16": "bf16",
}

ACTIVATION_TYPES = ("q8_0", "q8_1", "q8_k", "f32", "f16", "bf16")
_FLOAT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_BLOCK = {"q8_0": 32, "q8_1": 32, "q8_k": 256}
_SUM_GROUP = {"q8_1": 32, "q8_k": 16}


_HALF_DOWN = 0.49999997  # see gguf_blocks.roundf: trunc(v ± this) is C's roundf


def _q8_0_1(xb: torch.Tensor, with_sum: bool):
    lo, hi = torch.aminmax(xb, dim=1)
    d = (torch.maximum(hi, -lo) + 0.0) / 127.0                   # amax / 127 (+0.0 for an all-zero block)
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = xb * inv.unsqueeze(1)                                    # in place from here: one buffer
    q.add_(torch.copysign(torch.tensor(_HALF_DOWN, device=q.device), q)).trunc_()   # roundf
    s = None
    if with_sum:
        # y.s = GGML_FP32_TO_FP16(sum * d): the integer sum times the fp32 (not fp16) scale.
        s = f16_bytes(q.sum(dim=1) * d).view(torch.float16).to(torch.float32)
    d16 = f16_bytes(d).view(torch.float16).to(torch.float32)     # [N, 1]
    return q.mul_(d16).add_(0.0), s                              # codes × fp16(d); +0.0 for −0 codes


def _q8_k(xb: torch.Tensor, with_sum: bool):
    amax, mx = first_absmax(xb)
    iscale = rdiv(-127.0, mx)
    # min(127, nearest_int(iscale · x)) as float codes; +0.0 turns −0 into the integer 0, so that 0 · d keeps
    # d's sign (d = −max/127 is negative when max is), as q · d does in C.
    q = (xb * iscale.unsqueeze(1)).round_().clamp_max_(127.0).add_(0.0)
    zero = amax == 0
    if bool(zero.any()):
        q[zero] = 0.0
    d = torch.where(zero, torch.zeros_like(iscale), 1.0 / iscale).unsqueeze(1)   # fp32, not fp16
    sums = None
    if with_sum:
        sums = q.reshape(q.shape[0], 16, 16).sum(dim=2).mul_(d)  # bsums (exact integers) × d
    return q.mul_(d), sums


def quantize_activations(x: torch.Tensor, vec_dot_type: str, *, return_sums: bool = False):
    """Fake-quantize activations ``x [..., K]`` as llama.cpp's CPU matmul does before its dot product:
    quantize each row in blocks to ``vec_dot_type`` (``"q8_0"``, ``"q8_1"`` or ``"q8_k"``; see
    :data:`VEC_DOT_TYPE`) with ggml's reference rounding, and return the values those codes stand for.
    ``"f16"``/``"bf16"`` round to that float type (round to nearest even, as ggml converts rows for F16 /
    BF16 weights and its f16 KV cache); ``"f32"`` returns ``x`` as float32.

    Returns float32 ``x̂`` of ``x``'s shape; with ``return_sums=True`` also the block sums the dot product
    uses, float32 ``[..., K / g]``: for Q8_1 the stored fp16 ``s = d · Σ q`` per 32 (g = 32), for Q8_K
    ``d · bsum`` per 16 (g = 16); ``None`` for Q8_0.

    Raises ``ConfigError`` for an unknown type or when ``K`` is not a multiple of the block (32; 256 for
    Q8_K) — llama.cpp's rows always are.

    Example::

        x = torch.tensor([[0.5, -1.0] + [0.0] * 30])
        quantize_activations(x, "q8_0")[0, :2]     # tensor([ 0.5000, -1.0000]) on Q8_0's grid of 1/127
    """
    if vec_dot_type not in ACTIVATION_TYPES:
        raise ConfigError(f"unknown activation type {vec_dot_type!r}; valid: {', '.join(ACTIVATION_TYPES)}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
        raise ConfigError("quantize_activations needs a floating-point tensor [..., K]")
    if vec_dot_type in _FLOAT:
        xf = x.detach().to(_FLOAT[vec_dot_type]).to(torch.float32)
        return (xf, None) if return_sums else xf
    bs = _BLOCK[vec_dot_type]
    k = x.shape[-1]
    if k % bs:
        raise ConfigError(f"{vec_dot_type}: the row length {k} is not a multiple of its block ({bs})")
    xb = x.detach().to(torch.float32).reshape(-1, bs)
    fn = _q8_k if vec_dot_type == "q8_k" else _q8_0_1
    xq, sums = fn(xb, return_sums and vec_dot_type != "q8_0")
    xq = xq.reshape(x.shape)
    if not return_sums:
        return xq
    if sums is not None:
        sums = sums.reshape(*x.shape[:-1], k // _SUM_GROUP[vec_dot_type])
    return xq, sums


def emulated_linear(x: torch.Tensor, weight_type: str, out_features: int, dequant_chunks,
                    split_chunks=None) -> torch.Tensor:
    """``x @ Ŵᵀ`` as llama.cpp's CPU matmul computes it (see the module docstring), float32 ``[..., out]``.

    ``dequant_chunks()`` yields ``(r0, r1, W[r0:r1])`` (float32 dequantized rows); for types with a
    minimum and a summed activation type, ``split_chunks()`` yields ``(r0, r1, scaled, offsets)`` with
    ``W = scaled + offsets`` expanded over groups of 32 (Q4_1/Q5_1) or 16 (K-quants). The generators walk
    the weight in row chunks, so no full-size float32 weight is built.
    """
    vdt = VEC_DOT_TYPE[weight_type]
    use_split = vdt in _SUM_GROUP and split_chunks is not None
    xq, sums = quantize_activations(x, vdt, return_sums=True)
    xq2 = xq.reshape(-1, x.shape[-1])
    out = torch.empty(xq2.shape[0], out_features, dtype=torch.float32, device=x.device)
    if use_split:
        s2 = sums.reshape(xq2.shape[0], -1)
        for r0, r1, scaled, offs in split_chunks():
            out[:, r0:r1] = xq2 @ scaled.T + s2 @ offs.T
    else:
        for r0, r1, w in dequant_chunks():
            out[:, r0:r1] = xq2 @ w.T
    return out.reshape(*x.shape[:-1], out_features)
