"""FP4 formats: the E2M1 element codec, MXFP4 (OCP MX v1.0) and NVFP4.

Definitions: docs/definitions.md "Low-bit formats". MXFP4 and NVFP4 reproduce
``torchao.prototype.mx_formats`` (``to_mx`` with ``ScaleCalculationMode.FLOOR`` and ``nvfp4_quantize``
with a per-tensor scale) bit for bit; torchao asserts ``in % block == 0`` and returns NaN codes for an
all-zero NVFP4 tensor, both of which lens handles.
"""


from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .packing import (
    PackedWeight,
    _check_weight,
    _pad_last,
    pack_nibbles,
    unpack_nibbles,
)

# ----------------------------------------------------------------------------------------------------
# FP4 E2M1 element codec
# ----------------------------------------------------------------------------------------------------

#: Code → value of FP4 E2M1 (bit 3 sign, bits 2–1 exponent, bit 0 mantissa); code 8 is −0.0.
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                            -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=torch.float32)
# Midpoint j lies between magnitude codes j and j+1. Round-to-nearest-even on the FP4 grid means a tie
# goes to the code whose mantissa bit (the code's lowest bit) is 0, i.e. to the even code.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (``uint8`` in ``0..15``, unpacked) of ``x`` — docs/definitions.md#fp4-e2m1.

    Magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}; round to nearest, ties to even at every midpoint (0.25→0,
    0.75→1, 1.25→1, 1.75→2, 2.5→2, 3.5→4, 5→4); anything ≥ 6 (and +Inf) saturates to 6; the sign bit is
    kept, so −0.0 and tiny negatives encode as code 8 (−0), exactly as torchao's ``f32_to_f4_unpacked``.

    Example: ``e2m1_encode(torch.tensor([0.25, 0.75, -5.0, 7.0]))`` → ``tensor([0, 2, 14, 7])``.
    """
    x = x.to(torch.float32)
    mag = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for j, mid in enumerate(_E2M1_MIDPOINTS):
        upper_is_even = (j + 1) % 2 == 0
        code += (mag >= mid if upper_is_even else mag > mid).to(torch.uint8)
    return code | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Float32 values of unpacked E2M1 codes (docs/definitions.md#fp4-e2m1); code 8 decodes to −0.0.

    Example: ``e2m1_decode(torch.tensor([0, 2, 14, 7], dtype=torch.uint8))`` → ``tensor([0., 1., -4., 6.])``.
    """
    return E2M1_VALUES.to(codes.device)[codes.long()]


class E2M1Codec:
    """Element-wise FP4 E2M1 with no scale: the building block of MXFP4/NVFP4 (docs/definitions.md#fp4-e2m1).

    The input is taken in FP4 units as it is (callers scale it); codes are packed two per byte.

    Example::

        p = E2M1Codec().quantize(torch.tensor([[0.3, -2.6, 9.0, 1.75]]))
        E2M1Codec().dequantize(p)     # tensor([[0.5, -3.0, 6.0, 2.0]])
    """

    scheme = "fp4-e2m1"

    def quantize(self, x: torch.Tensor) -> PackedWeight:
        """Encode any-shaped ``x``; an odd element count gets one padding nibble (docs/definitions.md).

        Example: ``E2M1Codec().quantize(torch.ones(3)).nbytes()`` → ``2``.
        """
        xf = x.detach().to(torch.float32).reshape(-1)
        if not bool(torch.isfinite(xf).all()):
            raise ConfigError(f"{self.scheme}: the input contains NaN or Inf")
        codes, _ = _pad_last(e2m1_encode(xf), 2)
        return PackedWeight(self.scheme, tuple(x.shape), {"codes": pack_nibbles(codes)}, {})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """Decode to float32 in the original shape (docs/definitions.md).

        Example: ``E2M1Codec().dequantize(E2M1Codec().quantize(torch.tensor([5.0])))`` → ``tensor([4.])``.
        """
        n = math.prod(p.shape)
        return e2m1_decode(unpack_nibbles(p.data["codes"]))[:n].reshape(p.shape)


# ----------------------------------------------------------------------------------------------------
# MXFP4
# ----------------------------------------------------------------------------------------------------

_F32_MANT_BITS = 23
_E8M0_BIAS = 127
_E2M1_MAX_POW2 = 2  # 4 = largest power of two in E2M1


class MXFP4Codec:
    """OCP MX v1.0 MXFP4: blocks of 32 E2M1 codes sharing an E8M0 scale (docs/definitions.md#mxfp4).

    Scale ``X = 2^(floor(log2 amax) − 2)`` per block, ``q = E2M1(x / X)`` (saturating), 4.25 bits/weight.
    ``floor(log2 amax)`` is read from the float32 exponent field of ``amax`` — exact, and identical to
    torchao's ``to_mx(..., ScaleCalculationMode.FLOOR)``; the unbiased exponent is clamped to [−127, 127].

    Edge case (follows torchao, differs from a literal reading of docs/definitions.md#mxfp4): for blocks whose exponent
    clamps to −127 or −126 (``amax < 2^-124``, including all-zero blocks) torchao divides by 2^-126 — the
    smallest normal float — while the stored E8M0 byte 0 means 2^-127. We store the same byte and
    dequantize with the divisor actually used (``2^(max(e, 1) − 127)``), so the round trip is consistent;
    torchao's own ``to_dtype`` multiplies by 2^-127 there and so is off by 2× on such blocks.

    Example::

        p = MXFP4Codec().quantize(torch.randn(8, 64))
        p.data["scales"].shape        # torch.Size([8, 2]): biased E8M0 exponents, uint8
        MXFP4Codec().dequantize(p).shape   # torch.Size([8, 64])
    """

    scheme = "mxfp4"

    def __init__(self, block_size: int = 32):
        if block_size != 32:
            raise ConfigError(f"mxfp4: block_size must be 32 (OCP MX v1.0), got {block_size}")
        self.block_size = block_size

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight; rows are zero-padded to a multiple of 32 (padding stored) (docs/definitions.md).

        Example: ``MXFP4Codec().quantize(torch.randn(4, 40)).data["codes"].shape`` → ``(4, 32)``.
        """
        w = _check_weight(w, self.scheme)
        rows, cols = w.shape
        wp, pad = _pad_last(w, self.block_size)
        blocks = wp.view(rows, -1, self.block_size)
        amax = blocks.abs().amax(dim=-1)
        exp_field = (amax.view(torch.int32) >> _F32_MANT_BITS) & 0xFF
        unbiased = (exp_field - _E8M0_BIAS - _E2M1_MAX_POW2).clamp(-_E8M0_BIAS, _E8M0_BIAS)
        biased = (unbiased + _E8M0_BIAS).to(torch.uint8)
        q = blocks / self._divisor(biased).unsqueeze(-1)
        codes = pack_nibbles(e2m1_encode(q).view(rows, -1))
        return PackedWeight(self.scheme, (rows, cols), {"codes": codes, "scales": biased},
                            {"block_size": self.block_size, "pad": pad})

    @staticmethod
    def _divisor(biased: torch.Tensor) -> torch.Tensor:
        # Built from the exponent bits so that it is exactly 2^(e-127), with the minimum-normal floor
        # torchao applies (see the class docstring).
        e = biased.to(torch.int32).clamp_min(1)
        return (e << _F32_MANT_BITS).view(torch.float32)

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """Float32 weight ``E2M1(code) · X`` cropped to the logical shape (docs/definitions.md).

        Example: ``MXFP4Codec().dequantize(MXFP4Codec().quantize(torch.full((1, 32), 3.0)))`` → all 3.0.
        """
        rows, cols = p.shape
        scale = self._divisor(p.data["scales"])
        vals = e2m1_decode(unpack_nibbles(p.data["codes"])).view(rows, -1, p.meta["block_size"])
        return (vals * scale.unsqueeze(-1)).view(rows, -1)[:, :cols]


# ----------------------------------------------------------------------------------------------------
# NVFP4
# ----------------------------------------------------------------------------------------------------

_E4M3_MAX = 448.0
_E4M3_MIN_NORMAL = 2.0 ** -6
_E2M1_MAX = 6.0


class NVFP4Codec:
    """NVFP4: 16-element E2M1 blocks, FP8 E4M3 block scale, FP32 tensor scale (docs/definitions.md#nvfp4).

    ``s_t = amax / (448 · 6)``, ``s_b = E4M3(clamp(amax_block / 6 / s_t, 2^-6, 448))`` (round to nearest
    even by torch's float8 cast), codes ``E2M1(x · ((1 / s_t) / s_b))``; dequantized as
    ``E2M1 · (s_t · s_b)``. 4.5 bits/weight plus 32 bits per tensor.

    Differences from the formula of docs/definitions.md#nvfp4, both taken from torchao's ``nvfp4_quantize`` so that codes agree
    bit for bit: (1) the elements are multiplied by the reciprocal ``(1/s_t)/s_b`` instead of being divided
    by ``s_t · s_b`` — the two differ in the last float32 bit, which can flip a code at a rounding tie;
    (2) an all-zero tensor (``amax = 0``) makes torchao divide 0 by 0 and emit NaN codes; lens stores
    ``s_t = 0`` with zero codes there instead, so it dequantizes to zeros.

    Example::

        p = NVFP4Codec().quantize(torch.randn(32, 64))
        p.data["block_scales"].dtype     # torch.uint8 (raw E4M3 bits), shape [32, 4]
        float(p.data["tensor_scale"])    # amax / 2688
    """

    scheme = "nvfp4"

    def __init__(self, block_size: int = 16):
        if block_size != 16:
            raise ConfigError(f"nvfp4: block_size must be 16, got {block_size}")
        self.block_size = block_size

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight; rows are zero-padded to a multiple of 16 (padding stored) (docs/definitions.md).

        Example: ``NVFP4Codec().quantize(torch.randn(2, 20)).data["codes"].shape`` → ``(2, 16)``.
        """
        w = _check_weight(w, self.scheme)
        rows, cols = w.shape
        wp, pad = _pad_last(w, self.block_size)
        blocks = wp.view(rows, -1, self.block_size)
        amax = w.abs().amax() if w.numel() else torch.zeros((), dtype=torch.float32)
        tensor_scale = amax / (_E4M3_MAX * _E2M1_MAX)
        # Only the all-zero tensor has s_t = 0; any positive stand-in gives zero codes, avoiding 0/0.
        safe_ts = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
        block_scale = blocks.abs().amax(dim=-1) / _E2M1_MAX
        sb = (block_scale / safe_ts).clamp(_E4M3_MIN_NORMAL, _E4M3_MAX).to(torch.float8_e4m3fn)
        recip = (1.0 / safe_ts) / sb.to(torch.float32)
        codes = pack_nibbles(e2m1_encode(blocks * recip.unsqueeze(-1)).view(rows, -1))
        return PackedWeight(self.scheme, (rows, cols),
                            {"codes": codes, "block_scales": sb.view(torch.uint8),
                             "tensor_scale": tensor_scale.reshape(())},
                            {"block_size": self.block_size, "pad": pad})

    @staticmethod
    def block_scales_fp32(p: PackedWeight) -> torch.Tensor:
        """The combined per-block scale ``s_t · s_b`` in float32, ``[rows, n_blocks]`` (docs/definitions.md).

        Example: ``NVFP4Codec.block_scales_fp32(NVFP4Codec().quantize(w)).shape`` → ``(rows, in/16)``.
        """
        sb = p.data["block_scales"].view(torch.float8_e4m3fn).to(torch.float32)
        return p.data["tensor_scale"] * sb

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """Float32 weight ``E2M1(code) · (s_t · s_b)`` cropped to the logical shape (docs/definitions.md).

        Example: ``NVFP4Codec().dequantize(NVFP4Codec().quantize(torch.zeros(2, 16)))`` → zeros.
        """
        rows, cols = p.shape
        vals = e2m1_decode(unpack_nibbles(p.data["codes"])).view(rows, -1, p.meta["block_size"])
        return (vals * self.block_scales_fp32(p).unsqueeze(-1)).view(rows, -1)[:, :cols]




