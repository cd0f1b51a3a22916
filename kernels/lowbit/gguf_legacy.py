"""GGUF legacy block formats — Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 — and IQ4_NL, block by block (pure torch).

Every block holds 32 consecutive weights of one row (``in`` is GGUF's fastest dimension ``ne[0]``):

==========  =====  ==============================================================  =========================
type        bytes  layout (little-endian)                                          value of weight ``j``
==========  =====  ==============================================================  =========================
Q4_0        18     fp16 d · 16 B nibbles                                           ``d · (q_j − 8)``
Q4_1        20     fp16 d · fp16 m · 16 B nibbles                                  ``d · q_j + m``
Q5_0        22     fp16 d · u32 qh (bit j = 5th bit of q_j) · 16 B nibbles         ``d · (q_j − 16)``
Q5_1        24     fp16 d · fp16 m · u32 qh · 16 B nibbles                         ``d · q_j + m``
Q8_0        34     fp16 d · 32 int8                                                ``d · q_j``
IQ4_NL      18     fp16 d · 16 B nibbles                                           ``d · kvalues[q_j]``
==========  =====  ==============================================================  =========================

Nibble ``j < 16`` is the low half of byte ``j``, nibble ``j + 16`` its high half. Bits/weight: 4.5, 5.0, 5.5,
6.0, 8.5, 4.5.

``dequantize_*`` reproduce gguf-py's ``gguf/quants.py`` (the reference transformers uses) operation for
operation, so they agree bit for bit. ``quantize_*`` reproduce gguf-py's ``quantize_blocks``, which equal
llama.cpp's ``quantize_row_*_ref`` (ggml-quants.c; the two differ only for blocks whose largest-magnitude
element is −0.0). IQ4_NL (not one of ``GGUF_TYPES``, present because llama-quantize falls back to it for
Q2_K/Q3_K rows that are not a multiple of 256) follows ``quantize_row_iq4_nl_ref``.
"""

from __future__ import annotations

import torch

from .gguf_blocks import (
    bits_le,
    f16_at,
    f16_bytes,
    first_absmax,
    nibbles,
    pack_bits_le,
    roundf,
    seq_sum,
)

#: IQ4_NL's 16 non-linear levels (``kvalues_iq4nl`` in ggml-common.h).
IQ4NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _inv(d: torch.Tensor) -> torch.Tensor:
    # ``id = d ? 1.0f/d : 0.0f``; 1/d is exact IEEE (torch's reciprocal of a tensor is).
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    # q: [N, 32] in 0..15 (uint8) → [N, 16]: element j low, element j + 16 high.
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


# ----------------------------------------------------------------------------------------------------
# Dequantization: [N, bytes] uint8 → [N, 32] float32
# ----------------------------------------------------------------------------------------------------


def dequantize_q4_0(b: torch.Tensor) -> torch.Tensor:
    q = nibbles(b[:, 2:18], torch.float32)
    return q.sub_(8.0).mul_(f16_at(b, 0))                      # d · (q − 8)


def dequantize_q4_1(b: torch.Tensor) -> torch.Tensor:
    q = nibbles(b[:, 4:20], torch.float32)
    return q.mul_(f16_at(b, 0)).add_(f16_at(b, 2))              # d · q + m


def _q5(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    q = nibbles(b[:, qh_at + 4:qh_at + 20])
    return q.bitwise_or_(bits_le(b[:, qh_at:qh_at + 4]) << 4)


def dequantize_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _q5(b, 2).to(torch.float32)
    return q.sub_(16.0).mul_(f16_at(b, 0))                     # d · (q − 16)


def dequantize_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _q5(b, 4).to(torch.float32)
    return q.mul_(f16_at(b, 0)).add_(f16_at(b, 2))              # d · q + m


def dequantize_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:34].view(torch.int8).to(torch.float32).mul_(f16_at(b, 0))


def dequantize_iq4_nl(b: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=b.device)
    return table[nibbles(b[:, 2:18]).to(torch.int32)].mul_(f16_at(b, 0))


# The same formats split as "scaled codes" + "offset" (Ŵ = scaled + offset, exactly the two terms the
# dequantization adds), for llama.cpp's Q8_1 dot product, which handles the offset m through the
# activation block sum s: Σ (d·q + m)·x̂ = Σ (d·q)·x̂ + m·s.


def split_q4_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return nibbles(b[:, 4:20], torch.float32).mul_(f16_at(b, 0)), f16_at(b, 2)


def split_q5_1(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _q5(b, 4).to(torch.float32).mul_(f16_at(b, 0)), f16_at(b, 2)


# ----------------------------------------------------------------------------------------------------
# Quantization: [N, 32] float32 → [N, bytes] uint8
# ----------------------------------------------------------------------------------------------------


def quantize_q4_0(x: torch.Tensor) -> torch.Tensor:
    """``d = max / −8`` (``max`` = the element of largest magnitude), ``q = min(15, trunc(x/d + 8.5))``."""
    _, mx = first_absmax(x)
    d = mx / -8.0
    q = torch.trunc(x * _inv(d).unsqueeze(1) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((f16_bytes(d), _pack_nibbles(q)), dim=1)


def quantize_q4_1(x: torch.Tensor) -> torch.Tensor:
    """``d = (max − min) / 15``, ``m = min``, ``q = min(15, trunc((x − min)/d + 0.5))``."""
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    d = (mx - mn) / 15.0
    q = torch.trunc((x - mn.unsqueeze(1)) * _inv(d).unsqueeze(1) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat((f16_bytes(d), f16_bytes(mn), _pack_nibbles(q)), dim=1)


def _q5_bytes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return pack_bits_le(q >> 4), _pack_nibbles(q)


def quantize_q5_0(x: torch.Tensor) -> torch.Tensor:
    """``d = max / −16``, ``q = min(31, trunc(x/d + 16.5))``, 5th bits in ``qh``."""
    _, mx = first_absmax(x)
    d = mx / -16.0
    q = torch.trunc(x * _inv(d).unsqueeze(1) + 16.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _q5_bytes(q)
    return torch.cat((f16_bytes(d), qh, qs), dim=1)


def quantize_q5_1(x: torch.Tensor) -> torch.Tensor:
    """``d = (max − min) / 31``, ``m = min``, ``q = trunc((x − min)/d + 0.5)`` (≤ 31)."""
    mx, mn = x.amax(dim=1), x.amin(dim=1)
    d = (mx - mn) / 31.0
    q = torch.trunc((x - mn.unsqueeze(1)) * _inv(d).unsqueeze(1) + 0.5).clamp(0, 31).to(torch.uint8)
    qh, qs = _q5_bytes(q)
    return torch.cat((f16_bytes(d), f16_bytes(mn), qh, qs), dim=1)


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """``d = amax / 127``, ``q = roundf(x / d)`` (the reciprocal ``1/d`` is multiplied, as in C)."""
    d = x.abs().amax(dim=1) / 127.0
    q = roundf(x * _inv(d).unsqueeze(1)).to(torch.int8)
    return torch.cat((f16_bytes(d), q.view(torch.uint8)), dim=1)


def best_index_iq4nl(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``best_index_int8(16, kvalues_iq4nl, v)``: level ``i`` once ``2v`` reaches
    ``values[i−1] + values[i]`` (its branchless binary search over sorted thresholds is this count)."""
    thr = torch.tensor([IQ4NL_VALUES[i - 1] + IQ4NL_VALUES[i] for i in range(1, 16)],
                       dtype=torch.float32, device=v.device)
    return ((v + v).unsqueeze(-1) >= thr).sum(-1)


def quantize_iq4_nl(x: torch.Tensor) -> torch.Tensor:
    """``quantize_row_iq4_nl_ref``: ``d₀ = max / −127``, levels by nearest threshold of ``x / d₀``, then the
    least-squares scale ``d = Σ w·v·x / Σ w·v²`` with ``w = x²`` (``v`` the chosen levels).

    An all-zero block (``amax < 1e-15``) stores ``d = 0``; llama.cpp skips it and writes the level indices
    its scratch buffer still holds — the previous block's. :func:`fill_stale_iq4nl` reproduces that over a
    whole tensor (the first block of a call has no predecessor: index 0 here, uninitialized memory there).
    """
    amax, mx = first_absmax(x)
    d0 = mx / float(IQ4NL_VALUES[0])
    L = best_index_iq4nl(x * (1.0 / d0).unsqueeze(1))
    table = torch.tensor(IQ4NL_VALUES, dtype=torch.float32, device=x.device)
    q = table[L]
    w = x * x
    wq = w * q
    sumqx, sumq2 = seq_sum(wq * x), seq_sum(wq * q)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumq2))
    zero = amax < 1e-15
    d = torch.where(zero, torch.zeros_like(d), d)
    L = torch.where(zero.unsqueeze(1), torch.zeros_like(L), L)
    return torch.cat((f16_bytes(d), _pack_nibbles(L.to(torch.uint8))), dim=1)


def fill_stale_iq4nl(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Give every all-zero IQ4_NL block (of ``x [N, 32]``) the code bytes of the nearest earlier non-zero
    block, as llama.cpp's scratch-buffer reuse does; values are unaffected (``d = 0``)."""
    zero = x.abs().amax(dim=1) < 1e-15
    if not bool(zero.any()):
        return blocks
    idx = torch.arange(len(zero), device=x.device)
    src = torch.where(zero, torch.full_like(idx, -1), idx).cummax(dim=0).values
    fill = zero & (src >= 0)
    out = blocks.clone()
    out[fill, 2:] = blocks[src[fill], 2:]
    return out


DEQUANTIZE = {"q4_0": dequantize_q4_0, "q4_1": dequantize_q4_1, "q5_0": dequantize_q5_0,
              "q5_1": dequantize_q5_1, "q8_0": dequantize_q8_0, "iq4_nl": dequantize_iq4_nl}
QUANTIZE = {"q4_0": quantize_q4_0, "q4_1": quantize_q4_1, "q5_0": quantize_q5_0, "q5_1": quantize_q5_1,
            "q8_0": quantize_q8_0, "iq4_nl": quantize_iq4_nl}
SPLIT = {"q4_1": split_q4_1, "q5_1": split_q5_1}
