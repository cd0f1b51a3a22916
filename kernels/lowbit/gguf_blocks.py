"""GGUF / ggml block formats: the type table and the exact-arithmetic helpers every GGUF codec shares.

The table gives, per ggml type, the block length (weights per block), the block's byte size and ggml's
numeric type id (``enum ggml_type`` in ggml.h, the value a GGUF file stores; equal to
``gguf.GGMLQuantizationType``). The helpers reproduce the C reference's float32 arithmetic in torch:

* ``nearest_int`` — ggml's ``nearest_int`` (add 1.5·2²³ and read the mantissa) is round-half-to-even for
  ``|v| < 2²²``, which is ``torch.round``;
* ``roundf`` — C's ``roundf`` (half away from zero), computed as gguf-py's ``np_roundf`` does it
  (``floor(a) + floor(2·(a − floor(a)))``) because ``floor(a + 0.5)`` rounds 0.49999997 up;
* ``seq_sum`` — a left-to-right float32 sum, the order of the C loops ``for (i…) s += …`` (``torch.sum``
  reduces pairwise, which rounds differently);
* ``rdiv`` — ``c / t`` for a constant ``c``: ``python_scalar / tensor`` is computed by torch as a
  reciprocal times ``c``, which is not the IEEE quotient; a 0-dim tensor numerator is.

Everything else in the GGUF codecs is one IEEE float32 operation per C operation, in the C order (torch
never fuses ``a * b + c`` into an FMA outside ``addcmul``/``addmm``, which these codecs do not use).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

QK = 32      # legacy block length (QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = QK8_1 = QK4_NL = 32)
QK_K = 256   # K-quant super-block length

#: name → (block length, block bytes, ggml type id). The ten GGUF weight types lens quantizes to, the
#: IQ4_NL type llama-quantize falls back to for Q2_K/Q3_K rows that are not a multiple of 256, and the
#: activation types of llama.cpp's CPU dot products.
GGML_TYPE_TABLE: dict[str, tuple[int, int, int]] = {
    "q4_0": (32, 18, 2),
    "q4_1": (32, 20, 3),
    "q5_0": (32, 22, 6),
    "q5_1": (32, 24, 7),
    "q8_0": (32, 34, 8),
    "q8_1": (32, 36, 9),
    "q2_k": (256, 84, 10),
    "q3_k": (256, 110, 11),
    "q4_k": (256, 144, 12),
    "q5_k": (256, 176, 13),
    "q6_k": (256, 210, 14),
    "q8_k": (256, 292, 15),
    "iq4_nl": (32, 18, 20),
}


def block_info(type_name: str) -> tuple[int, int]:
    """``(weights per block, bytes per block)`` of a ggml type name (lower case).

    Example: ``block_info("q4_k")`` → ``(256, 144)`` (4.5 bits/weight).
    """
    try:
        bs, ts, _ = GGML_TYPE_TABLE[type_name]
    except KeyError:
        raise ConfigError(f"unknown GGUF type {type_name!r}; valid: {', '.join(GGML_TYPE_TABLE)}") from None
    return bs, ts


# ----------------------------------------------------------------------------------------------------
# Bytes ↔ numbers (little-endian, as GGUF stores them)
# ----------------------------------------------------------------------------------------------------


def f16_at(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 field at byte ``offset`` of every block, as float32 ``[N, 1]`` (exact widening)."""
    if offset % 2 == 0 and blocks.shape[1] % 2 == 0 and blocks.is_contiguous():
        try:  # every GGUF block is an even number of bytes with its fp16 fields at even offsets
            return blocks.view(torch.float16)[:, offset // 2:offset // 2 + 1].to(torch.float32)
        except RuntimeError:  # an odd storage offset
            pass
    return blocks[:, offset:offset + 2].contiguous().view(torch.float16).to(torch.float32)


def f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32 → ``[N, 2]`` uint8: the IEEE fp16 (round to nearest even) bytes of each value, as
    ``GGML_FP32_TO_FP16`` and numpy's ``astype(float16)`` produce them."""
    return values.reshape(-1, 1).to(torch.float16).contiguous().view(torch.uint8)


def f32_bytes(values: torch.Tensor) -> torch.Tensor:
    """``[N]`` float32 → ``[N, 4]`` uint8 (Q8_K's scale is a plain float)."""
    return values.reshape(-1, 1).to(torch.float32).contiguous().view(torch.uint8)


_SHIFTS8 = torch.arange(8, dtype=torch.uint8)


def bits_le(b: torch.Tensor) -> torch.Tensor:
    """``[N, k]`` uint8 → ``[N, 8k]`` uint8 in {0, 1}: bit ``j`` of the little-endian integer (byte ``j // 8``,
    bit ``j % 8``) — Q5_0/Q5_1's ``qh`` word."""
    n, k = b.shape
    return ((b.unsqueeze(-1) >> _SHIFTS8.to(b.device)) & 1).reshape(n, 8 * k)


def pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bits_le`: ``[N, 8k]`` values in {0, 1} → ``[N, k]`` uint8."""
    n, m = bits.shape
    w = (1 << torch.arange(8, dtype=torch.int32, device=bits.device))
    return (bits.to(torch.int32).reshape(n, m // 8, 8) * w).sum(-1).to(torch.uint8)


def nibbles(qs: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """``[..., k]`` bytes → ``[..., 2k]`` in ``dtype``: all low nibbles, then all high nibbles (the legacy
    blocks' order: element ``j`` in the low nibble of byte ``j``, element ``j + k`` in its high nibble)."""
    out = torch.empty(*qs.shape[:-1], 2, qs.shape[-1], dtype=dtype, device=qs.device)
    out[..., 0, :] = qs & 0x0F
    out[..., 1, :] = qs >> 4
    return out.view(*qs.shape[:-1], 2 * qs.shape[-1])


# ----------------------------------------------------------------------------------------------------
# The C reference's float32 arithmetic
# ----------------------------------------------------------------------------------------------------


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` as int32: round half to even (exact for ``|v| ≤ 4194303``, ggml's assert)."""
    return torch.round(v).to(torch.int32)


_JUST_BELOW_HALF = 0.49999997  # float32(0.5 − 2⁻²⁵), the largest float below 0.5


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C ``roundf`` (nearest integer, halves away from zero) of float32 ``v``, as float32; a zero result is
    +0.0, as the integer code it becomes.

    ``trunc(v ± (0.5 − 2⁻²⁵))``: adding 0.5 itself would round 0.49999997 up to 1; with the largest float
    below 0.5, a fraction ≥ 0.5 still reaches the next integer (the sum is at least ``n − 2⁻²⁵``, which
    rounds to ``n`` for ``n ≥ 1``) and a smaller one cannot (its distance below ``n`` exceeds half an ulp of
    the sum). Equal to gguf-py's ``np_roundf`` for every finite float, in three passes instead of nine.
    """
    return torch.trunc(v + torch.copysign(torch.full_like(v, _JUST_BELOW_HALF), v)) + 0.0


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Left-to-right float32 sum over the last dimension (``float s = 0; for (i…) s += t[i];``)."""
    cols = t.movedim(-1, 0).contiguous()
    acc = torch.zeros_like(cols[0])
    for c in cols:
        acc = acc + c
    return acc


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """The IEEE float32 quotient ``c / t`` for a float32 constant ``c`` (see the module docstring)."""
    return torch.tensor(c, dtype=torch.float32, device=t.device) / t


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` per row of ``[N, n]``: the largest ``|x|`` and the signed value where it first occurs
    (the C loops' ``if (ax > amax) { amax = ax; max = x[i]; }``; gguf-py's ``argmax`` of ``|x|``)."""
    lo, hi = torch.aminmax(x, dim=1)
    mx = torch.where(hi >= -lo, hi, lo)
    tie = (hi == -lo) & (hi != 0)  # +a and −a both present: the first one wins
    if bool(tie.any()):
        rows = tie.nonzero().squeeze(1)
        sub = x[rows]
        mx[rows] = sub.gather(1, sub.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    zero = (hi == 0) & (lo == 0)      # all ±0: gguf-py takes the first element (its sign matters for Q4_0)
    if bool(zero.any()):
        mx = torch.where(zero, x[:, 0], mx)
    return mx.abs(), mx


def as_blocks(raw: torch.Tensor, type_name: str) -> torch.Tensor:
    """A row-major byte tensor ``[..., k · block bytes]`` viewed as ``[N, block bytes]`` blocks."""
    _, ts = block_info(type_name)
    if raw.dtype != torch.uint8:
        raise ConfigError(f"{type_name}: packed GGUF blocks must be uint8 bytes, got {raw.dtype}")
    if raw.numel() % ts:
        raise ConfigError(f"{type_name}: {raw.numel()} bytes is not a whole number of {ts}-byte blocks")
    return raw.reshape(-1, ts)
