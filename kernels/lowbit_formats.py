"""Low-bit weight codecs, emulated exactly in pure torch and stored packed (DESIGN.md §3 "Low-bit formats").

Every codec turns a weight ``W`` of shape ``[out, in]`` into a :class:`PackedWeight` whose tensors are the
real bytes a deployment would keep (two 4-bit codes per ``uint8``, five ternary digits per ``uint8``,
eight binary signs per ``uint8``), and turns it back into a float tensor:

===================  =================================================  ===========================
scheme               storage                                            bits / weight (multiple in)
===================  =================================================  ===========================
``fp4-e2m1``         E2M1 codes only (element codec, no scale)          4
``mxfp4``            E2M1 codes + one E8M0 exponent per 32 elements     4.25
``nvfp4``            E2M1 codes + one E4M3 scale per 16 + one fp32      4.5 (+32 bits per tensor)
``int8``             int8 codes + one fp32 scale per output row         8 + 32/in
``int4``             uint4 codes + fp16 scale + uint8 zero per 128      4.1875
``nf4``              NF4 indices + one fp32 absmax per 64 (flattened)   4.5
``ternary``          base-3 digits, 5 per byte + fp32 γ                 1.6 (+32 bits per γ)
``binary-lowrank``   sign bits of U, V + fp16 s1, s2                    r(out+in)/(out·in) + 16(out+in)/(out·in)
===================  =================================================  ===========================

Padding: block formats split each row into blocks along ``in`` (MXFP4, NVFP4, int4) and pad the last block
of each row with zeros; NF4 and ternary blocks run over the flattened tensor (as bitsandbytes does) and pad
its tail. The padding is stored — it is real storage — so ``bits_per_weight`` (``8 · nbytes / (out · in)``)
counts it: an ``in`` that is not a multiple of the block costs a little more than the nominal rate.

Cross-checks: MXFP4 and NVFP4 reproduce ``torchao.prototype.mx_formats`` (``to_mx`` with
``ScaleCalculationMode.FLOOR`` and ``nvfp4_quantize`` with a per-tensor scale) bit for bit; the nibble
order (element ``2k`` in the low nibble) is torchao's, so the packed bytes themselves agree.
torchao is only the test oracle here: it asserts ``in % block == 0`` and, for an all-zero NVFP4 tensor,
returns NaN codes, both of which lens handles (see :class:`NVFP4Codec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ConfigError

__all__ = [
    "PackedWeight",
    "E2M1_VALUES",
    "NF4_TABLE",
    "e2m1_encode",
    "e2m1_decode",
    "pack_nibbles",
    "unpack_nibbles",
    "pack_bits",
    "unpack_bits",
    "pack_trits",
    "unpack_trits",
    "E2M1Codec",
    "MXFP4Codec",
    "NVFP4Codec",
    "Int8Codec",
    "Int4Codec",
    "NF4Codec",
    "TernaryCodec",
    "BinaryLowRankCodec",
    "codec_from_meta",
    "dequantize",
]

# ----------------------------------------------------------------------------------------------------
# The packed container
# ----------------------------------------------------------------------------------------------------


@dataclass
class PackedWeight:
    """A quantized weight as stored: its tensors are the only bytes kept (DESIGN.md §3).

    ``scheme`` names the codec, ``shape`` is the logical shape of the weight, ``data`` maps names to the
    stored tensors (codes, scales, …) and ``meta`` holds the codec's parameters as plain Python values
    (block size, rank, padding), so that :func:`dequantize` needs nothing but this object.

    Example::

        p = MXFP4Codec().quantize(torch.randn(64, 96))
        p.nbytes()            # 64 · 96 / 2 code bytes + 64 · 3 scale bytes = 3264
        p.bits_per_weight()   # 4.25
    """

    scheme: str
    shape: tuple[int, ...]
    data: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes of every stored tensor (codes, scales, zero points, padding included) (DESIGN.md §4).

        Example: ``Int8Codec().quantize(torch.randn(4, 8)).nbytes()`` → ``4·8 + 4·4 = 48``.
        """
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def numel(self) -> int:
        """Number of logical weights ``out · in``, the denominator of :meth:`bits_per_weight` (DESIGN.md §4).

        Example: ``NF4Codec().quantize(torch.randn(3, 5)).numel()`` → ``15``.
        """
        return math.prod(self.shape)

    def bits_per_weight(self) -> float:
        """Measured rate ``8 · nbytes / numel`` — real bytes, padding and scales included (DESIGN.md §4).

        Example: ``NVFP4Codec().quantize(torch.randn(128, 256)).bits_per_weight()`` → ``4.5009…``
        (4.5 plus the fp32 per-tensor scale).
        """
        return 8.0 * self.nbytes() / max(1, self.numel())

    def to(self, device: torch.device | str) -> "PackedWeight":
        """The same packed weight with its tensors on ``device`` (DESIGN.md §3).

        Example: ``p.to("cpu")``.
        """
        return PackedWeight(self.scheme, self.shape, {k: v.to(device) for k, v in self.data.items()},
                            dict(self.meta))


def _check_weight(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """Validate a 2-D finite weight and return it as contiguous float32 (bf16/fp16 → fp32 is exact)."""
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ConfigError(f"{scheme}: expected a 2-D weight [out, in], got {shape}")
    if not w.is_floating_point():
        raise ConfigError(f"{scheme}: expected a floating-point weight, got {w.dtype}")
    w = w.detach().to(torch.float32).contiguous()
    if not bool(torch.isfinite(w).all()):
        raise ConfigError(f"{scheme}: the weight contains NaN or Inf; low-bit codecs need finite weights")
    return w


def _pad_last(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    pad = (-x.shape[-1]) % multiple
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x, pad


# ----------------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------------


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dim, element ``2k`` in the low nibble as torchao
    does (DESIGN.md §3: formats are stored packed).

    Example: ``pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))`` → ``tensor([33, 15])``.
    """
    if codes.shape[-1] % 2:
        raise ConfigError(f"pack_nibbles needs an even last dimension, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., n]`` bytes → ``[..., 2n]`` codes in ``0..15`` (DESIGN.md §3).

    Example: ``unpack_nibbles(torch.tensor([33, 15], dtype=torch.uint8))`` → ``tensor([1, 2, 15, 0])``.
    """
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat boolean tensor eight per byte (element ``8k + j`` → bit ``j``), zero-padding the
    tail (DESIGN.md §3: binary signs are bit-packed).

    Example: ``pack_bits(torch.tensor([True, False, True]))`` → ``tensor([5], dtype=torch.uint8)``.
    """
    flat = bits.reshape(-1).to(torch.uint8)
    flat, _ = _pad_last(flat, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    # uint8 sum of distinct powers of two never exceeds 255, so the product-sum is exact in uint8.
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a boolean tensor (DESIGN.md §3).

    Example: ``unpack_bits(torch.tensor([5], dtype=torch.uint8), 3)`` → ``tensor([True, False, True])``.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.reshape(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


_TRIT_POWERS = (1, 3, 9, 27, 81)
_TRIT_LUT: dict[torch.device, torch.Tensor] = {}


def _trit_lut(device: torch.device) -> torch.Tensor:
    # A 256×5 int8 table (1.3 kB, shared by every module) turns decoding into one gather.
    lut = _TRIT_LUT.get(device)
    if lut is None:
        b = torch.arange(256, dtype=torch.int64)
        digits = torch.stack([(b // p) % 3 for p in _TRIT_POWERS], dim=1) - 1
        lut = digits.to(torch.int8).to(device)
        _TRIT_LUT[device] = lut
    return lut


def pack_trits(t: torch.Tensor) -> torch.Tensor:
    """Pack ternary values in {−1, 0, 1} five per byte, base 3 (3⁵ = 243 ≤ 256 → 1.6 bits; DESIGN.md §3).

    Example: ``pack_trits(torch.tensor([-1, 0, 1, 1, -1]))`` → ``tensor([75], dtype=torch.uint8)``
    (digits 0, 1, 2, 2, 0 → 0·1 + 1·3 + 2·9 + 2·27 + 0·81 = 75).
    """
    flat = (t.reshape(-1).to(torch.int16) + 1)
    flat, _ = _pad_last(flat, 5)  # pad digit 0 decodes to −1 but is cropped by unpack_trits(n)
    powers = torch.tensor(_TRIT_POWERS, dtype=torch.int16, device=flat.device)
    return (flat.view(-1, 5) * powers).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``n`` ternary values as int8 (DESIGN.md §3).

    Example: ``unpack_trits(pack_trits(torch.tensor([1, 0, -1])), 3)`` → ``tensor([1, 0, -1])``.
    """
    lut = _trit_lut(packed.device)
    return lut[packed.long()].reshape(-1)[:n]


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
    """FP4 E2M1 codes (``uint8`` in ``0..15``, unpacked) of ``x`` — DESIGN.md §3 "FP4 E2M1".

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
    """Float32 values of unpacked E2M1 codes (DESIGN.md §3 "FP4 E2M1"); code 8 decodes to −0.0.

    Example: ``e2m1_decode(torch.tensor([0, 2, 14, 7], dtype=torch.uint8))`` → ``tensor([0., 1., -4., 6.])``.
    """
    return E2M1_VALUES.to(codes.device)[codes.long()]


class E2M1Codec:
    """Element-wise FP4 E2M1 with no scale: the building block of MXFP4/NVFP4 (DESIGN.md §3 "FP4 E2M1").

    The input is taken in FP4 units as it is (callers scale it); codes are packed two per byte.

    Example::

        p = E2M1Codec().quantize(torch.tensor([[0.3, -2.6, 9.0, 1.75]]))
        E2M1Codec().dequantize(p)     # tensor([[0.5, -3.0, 6.0, 2.0]])
    """

    scheme = "fp4-e2m1"

    def quantize(self, x: torch.Tensor) -> PackedWeight:
        """Encode any-shaped ``x``; an odd element count gets one padding nibble (DESIGN.md §3).

        Example: ``E2M1Codec().quantize(torch.ones(3)).nbytes()`` → ``2``.
        """
        xf = x.detach().to(torch.float32).reshape(-1)
        if not bool(torch.isfinite(xf).all()):
            raise ConfigError(f"{self.scheme}: the input contains NaN or Inf")
        codes, _ = _pad_last(e2m1_encode(xf), 2)
        return PackedWeight(self.scheme, tuple(x.shape), {"codes": pack_nibbles(codes)}, {})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """Decode to float32 in the original shape (DESIGN.md §3).

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
    """OCP MX v1.0 MXFP4: blocks of 32 E2M1 codes sharing an E8M0 scale (DESIGN.md §3 "MXFP4").

    Scale ``X = 2^(floor(log2 amax) − 2)`` per block, ``q = E2M1(x / X)`` (saturating), 4.25 bits/weight.
    ``floor(log2 amax)`` is read from the float32 exponent field of ``amax`` — exact, and identical to
    torchao's ``to_mx(..., ScaleCalculationMode.FLOOR)``; the unbiased exponent is clamped to [−127, 127].

    Edge case (follows torchao, differs from a literal reading of DESIGN): for blocks whose exponent
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
        """Quantize a 2-D weight; rows are zero-padded to a multiple of 32 (padding stored) (DESIGN.md §3).

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
        """Float32 weight ``E2M1(code) · X`` cropped to the logical shape (DESIGN.md §3).

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
    """NVFP4: 16-element E2M1 blocks, FP8 E4M3 block scale, FP32 tensor scale (DESIGN.md §3 "NVFP4").

    ``s_t = amax / (448 · 6)``, ``s_b = E4M3(clamp(amax_block / 6 / s_t, 2^-6, 448))`` (round to nearest
    even by torch's float8 cast), codes ``E2M1(x · ((1 / s_t) / s_b))``; dequantized as
    ``E2M1 · (s_t · s_b)``. 4.5 bits/weight plus 32 bits per tensor.

    Differences from DESIGN's formula, both taken from torchao's ``nvfp4_quantize`` so that codes agree
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
        """Quantize a 2-D weight; rows are zero-padded to a multiple of 16 (padding stored) (DESIGN.md §3).

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
        """The combined per-block scale ``s_t · s_b`` in float32, ``[rows, n_blocks]`` (DESIGN.md §3).

        Example: ``NVFP4Codec.block_scales_fp32(NVFP4Codec().quantize(w)).shape`` → ``(rows, in/16)``.
        """
        sb = p.data["block_scales"].view(torch.float8_e4m3fn).to(torch.float32)
        return p.data["tensor_scale"] * sb

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """Float32 weight ``E2M1(code) · (s_t · s_b)`` cropped to the logical shape (DESIGN.md §3).

        Example: ``NVFP4Codec().dequantize(NVFP4Codec().quantize(torch.zeros(2, 16)))`` → zeros.
        """
        rows, cols = p.shape
        vals = e2m1_decode(unpack_nibbles(p.data["codes"])).view(rows, -1, p.meta["block_size"])
        return (vals * self.block_scales_fp32(p).unsqueeze(-1)).view(rows, -1)[:, :cols]


# ----------------------------------------------------------------------------------------------------
# Integer formats
# ----------------------------------------------------------------------------------------------------


class Int8Codec:
    """int8 per-channel symmetric (DESIGN.md §3): ``scale_o = max_i |W[o, i]| / 127``,
    ``q = clamp(round(W / scale), −127, 127)`` (round half to even), ``Ŵ = q · scale``; 8 + 32/in bits.

    The range is symmetric [−127, 127] so that −W quantizes to −q. torchao's int8 weight-only tensor uses
    ``amax / 127.5`` and [−128, 127] instead; lens uses torchao's own tensor when the torchao backend is
    chosen, and this codec otherwise, so each backend is faithful to its own definition.

    Example::

        p = Int8Codec().quantize(torch.tensor([[0.5, -1.27, 0.0]]))
        p.data["codes"]        # tensor([[ 50, -127,   0]], dtype=torch.int8)
        p.data["scales"]       # tensor([0.0100])
    """

    scheme = "int8"

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight row by row; an all-zero row stores scale 0 and zero codes (DESIGN.md §3).

        Example: ``Int8Codec().quantize(torch.randn(384, 1536)).bits_per_weight()`` → ``8.0208…``.
        """
        w = _check_weight(w, self.scheme)
        scale = w.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(w / safe.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return PackedWeight(self.scheme, tuple(w.shape), {"codes": codes, "scales": scale}, {})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``q · scale`` per row, float32 (DESIGN.md §3).

        Example: ``Int8Codec().dequantize(Int8Codec().quantize(torch.tensor([[1.27]])))`` → ``[[1.27]]``.
        """
        return p.data["codes"].to(torch.float32) * p.data["scales"].unsqueeze(1)


def _fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    # Scales are stored in fp16; rounding *up* keeps the whole group range representable, which is
    # what the |w − ŵ| ≤ scale/2 bound needs.
    h = x.to(torch.float16)
    low = h.to(torch.float32) < x
    inf = torch.full_like(h, float("inf"))
    return torch.where(low, torch.nextafter(h, inf), h)


class Int4Codec:
    """int4 group-wise asymmetric (DESIGN.md §3): groups of ``group_size`` (128) along ``in`` per row.

    Per group: ``lo = min(min W, 0)``, ``hi = max(max W, 0)`` (zero is kept in range so that padding and
    exact zeros stay exact), ``scale = (hi − lo) / 15`` stored in fp16 rounded up, integer zero point
    ``z = clamp(round(−lo / scale), 0, 15)`` stored as uint8, ``q = clamp(round(W / scale) + z, 0, 15)``
    packed two per byte, ``Ŵ = (q − z) · scale``. Guarantees ``|W − Ŵ| ≤ scale / 2``. 4 + 24/128 = 4.1875
    bits/weight for ``in`` a multiple of 128; shorter rows are zero-padded to whole groups.

    Example::

        p = Int4Codec(group_size=4).quantize(torch.tensor([[-1.0, 0.0, 0.5, 2.0]]))
        p.data["scales"], p.data["zeros"]    # 0.20007 (3/15 rounded up to fp16), 5
        Int4Codec(group_size=4).dequantize(p)   # ≈ [[-1.0004, 0.0, 0.4001, 2.0007]]
    """

    scheme = "int4"

    def __init__(self, group_size: int = 128):
        if group_size < 2 or group_size % 2:
            raise ConfigError(f"int4: group_size must be an even integer ≥ 2, got {group_size}")
        self.group_size = group_size

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight group by group (DESIGN.md §3).

        Example: ``Int4Codec().quantize(torch.randn(384, 1536)).bits_per_weight()`` → ``4.1875``.
        """
        w = _check_weight(w, self.scheme)
        rows, cols = w.shape
        wp, pad = _pad_last(w, self.group_size)
        g = wp.view(rows, -1, self.group_size)
        lo = g.amin(dim=-1).clamp_max(0.0)
        hi = g.amax(dim=-1).clamp_min(0.0)
        scale16 = _fp16_round_up((hi - lo) / 15.0)
        if bool(torch.isinf(scale16).any()):
            raise ConfigError("int4: a group's range exceeds the fp16 scale range (65504·15); use int8")
        scale = scale16.to(torch.float32)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
        zero = torch.round(-lo.unsqueeze(-1) / safe).clamp(0, 15)
        q = (torch.round(g / safe) + zero).clamp(0, 15).to(torch.uint8)
        return PackedWeight(self.scheme, (rows, cols),
                            {"codes": pack_nibbles(q.view(rows, -1)), "scales": scale16,
                             "zeros": zero.squeeze(-1).to(torch.uint8)},
                            {"block_size": self.group_size, "pad": pad})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``(q − z) · scale`` per group, float32, cropped to the logical shape (DESIGN.md §3).

        Example: ``Int4Codec().dequantize(Int4Codec().quantize(torch.zeros(2, 3)))`` → zeros.
        """
        rows, cols = p.shape
        gs = p.meta["block_size"]
        q = unpack_nibbles(p.data["codes"]).view(rows, -1, gs).to(torch.float32)
        z = p.data["zeros"].to(torch.float32).unsqueeze(-1)
        s = p.data["scales"].to(torch.float32).unsqueeze(-1)
        return ((q - z) * s).view(rows, -1)[:, :cols]


#: The bitsandbytes NF4 levels (QLoRA, Dettmers et al. 2023), as float32.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)
_NF4_MIDPOINTS = (NF4_TABLE[1:] + NF4_TABLE[:-1]) / 2


class NF4Codec:
    """NF4 (DESIGN.md §3): the bitsandbytes 16-level table, absmax blocks of 64 over the flattened weight.

    Per block ``a = max |W|`` (fp32, as bitsandbytes stores it without double quantization), index =
    nearest table level to ``W / a`` (a value exactly on a midpoint takes the lower level, as bitsandbytes'
    ``>`` comparisons do), ``Ŵ = table[index] · a``. 4 + 32/64 = 4.5 bits/weight; the flattened tail is
    zero-padded to a whole block. torchao's ``NF4Tensor`` uses a 4-decimal copy of the table and
    double-quantized scales, so it is not a bit-level reference for this codec.

    Example::

        p = NF4Codec(block_size=4).quantize(torch.tensor([[2.0, -1.0, 0.15, 0.0]]))
        NF4Codec(block_size=4).dequantize(p)   # [[2.0, -1.0500, 0.1592, 0.0]]  (levels 1.0, -0.525, 0.0796)
    """

    scheme = "nf4"

    def __init__(self, block_size: int = 64):
        if block_size < 2 or block_size % 2:
            raise ConfigError(f"nf4: block_size must be an even integer ≥ 2, got {block_size}")
        self.block_size = block_size

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight over its flattened blocks (DESIGN.md §3).

        Example: ``NF4Codec().quantize(torch.randn(384, 1536)).bits_per_weight()`` → ``4.5``.
        """
        w = _check_weight(w, self.scheme)
        flat, pad = _pad_last(w.reshape(-1), self.block_size)
        blocks = flat.view(-1, self.block_size)
        absmax = blocks.abs().amax(dim=1)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(1)
        idx = torch.bucketize(blocks / safe, _NF4_MIDPOINTS.to(w.device), right=False)
        return PackedWeight(self.scheme, tuple(w.shape),
                            {"codes": pack_nibbles(idx.to(torch.uint8).reshape(-1)), "absmax": absmax},
                            {"block_size": self.block_size, "pad": pad})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``table[index] · absmax``, float32, in the logical shape (DESIGN.md §3).

        Example: ``NF4Codec().dequantize(NF4Codec().quantize(torch.ones(1, 64)))`` → all ones.
        """
        bs = p.meta["block_size"]
        vals = NF4_TABLE.to(p.data["codes"].device)[unpack_nibbles(p.data["codes"]).long()]
        vals = vals.view(-1, bs) * p.data["absmax"].unsqueeze(1)
        return vals.reshape(-1)[: p.numel()].view(p.shape)


class TernaryCodec:
    """Ternary BitNet b1.58 (DESIGN.md §3): ``γ = mean |W|``, ``W_q = clamp(round(W / γ), −1, 1)``,
    ``Ŵ = γ · W_q``; γ per tensor (default) or per output row (``per_channel=True``), stored as fp32.

    Codes are packed five per byte in base 3 (1.6 bits/weight) over the flattened weight. A zero γ (all
    zero weights) stores γ = 0 and zero codes. BitNet adds ε = 1e-5 to γ before dividing; DESIGN's
    definition (no ε) is used here.

    Example::

        p = TernaryCodec().quantize(torch.tensor([[0.9, -0.1, -2.0, 0.4]]))   # γ = 0.85
        TernaryCodec().dequantize(p)    # [[0.85, 0.0, -0.85, 0.0]]
    """

    scheme = "ternary"

    def __init__(self, per_channel: bool = False):
        self.per_channel = bool(per_channel)

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight (about 1.6 bits/weight) (DESIGN.md §3).

        Example: ``TernaryCodec(True).quantize(torch.randn(8, 10)).data["gamma"].shape`` → ``(8,)``.
        """
        w = _check_weight(w, self.scheme)
        gamma = w.abs().mean(dim=1) if self.per_channel else w.abs().mean().reshape(1)
        safe = torch.where(gamma > 0, gamma, torch.ones_like(gamma))
        div = safe.unsqueeze(1) if self.per_channel else safe
        q = torch.round(w / div).clamp(-1, 1).to(torch.int8)
        return PackedWeight(self.scheme, tuple(w.shape), {"codes": pack_trits(q), "gamma": gamma},
                            {"per_channel": self.per_channel})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``γ · W_q``, float32 (DESIGN.md §3).

        Example: ``TernaryCodec().dequantize(TernaryCodec().quantize(torch.ones(2, 2)))`` → all ones.
        """
        q = unpack_trits(p.data["codes"], p.numel()).view(p.shape).to(torch.float32)
        g = p.data["gamma"]
        return q * (g.unsqueeze(1) if p.meta["per_channel"] else g)


# ----------------------------------------------------------------------------------------------------
# Sub-1-bit binary low-rank
# ----------------------------------------------------------------------------------------------------


def _sign(x: torch.Tensor) -> torch.Tensor:
    # sign(0) would drop a rank-1 term; +1 keeps every entry of U, V in {±1} deterministically.
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class BinaryLowRankCodec:
    """Sub-1-bit binary low-rank, NanoQuant-style (DESIGN.md §3): ``W ≈ diag(s1) · (U Vᵀ) · diag(s2)``,
    ``U ∈ {±1}^{out×r}``, ``V ∈ {±1}^{in×r}``, ``s1``, ``s2`` stored in fp16.

    Bits/weight = ``(ceil(out·r/8) + ceil(in·r/8)) · 8 / (out·in) + 16 (out + in) / (out·in)``; with a
    budget ``bits`` the rank is the largest ``r ≥ 1`` whose rate fits (``r = 1`` if none does — then the
    measured rate exceeds the budget, which :meth:`PackedWeight.bits_per_weight` reports honestly).

    Fit (deterministic; ``seed`` only drives the randomized SVD used when ``min(out, in) > 1024``):

    1. *Init*: ``s1 = mean_j |W_ij|``, ``s2 = mean_i |W_ij| / mean |W|`` (a rank-1 fit of ``|W|``);
       truncated SVD of ``W / (s1 s2ᵀ)`` → ``U, V = sign`` of the leading singular vectors scaled by
       ``√σ``; then the scales by least squares.
    2. *Sweeps* (``iters``, default 6): for each rank component k, the exact minimizer over the signs of
       column ``U[:, k]`` with everything else fixed is ``sign(s1 ⊙ (R_k (v_k ⊙ s2)))`` where ``R_k`` is the
       residual without component k — then the same for ``V[:, k]`` — so each update never increases
       ``‖W − Ŵ‖²``; after the sweep ``s1`` and ``s2`` are refit by closed-form least squares
       (``s1_i = ⟨W_i, P_i⟩ / ‖P_i‖²`` with ``P = U Vᵀ diag(s2)``, and symmetrically for ``s2``).
    3. The scales are rounded to fp16 and ``s2`` is refit once against the rounded ``s1``.

    The ADMM initialisation and block reconstruction of the NanoQuant paper are not implemented
    (DESIGN marks ADMM optional); this is the data-free weight-space fit.

    Example::

        c = BinaryLowRankCodec(bits=0.8)
        p = c.quantize(torch.randn(384, 1536))
        p.meta["rank"], p.bits_per_weight()    # 229, ≈ 0.80
    """

    scheme = "binary-lowrank"

    def __init__(self, bits: float | None = 0.8, rank: int | None = None, iters: int = 6, seed: int = 0):
        if rank is None and (bits is None or not (0 < bits <= 2)):
            raise ConfigError(f"binary-lowrank: bits budget must be in (0, 2], got {bits}")
        if rank is not None and rank < 1:
            raise ConfigError(f"binary-lowrank: rank must be ≥ 1, got {rank}")
        if iters < 0:
            raise ConfigError(f"binary-lowrank: iters must be ≥ 0, got {iters}")
        self.bits, self.rank, self.iters, self.seed = bits, rank, int(iters), int(seed)

    @staticmethod
    def storage_bits(out: int, inp: int, rank: int) -> int:
        """Stored bits of a rank-``rank`` factorization of an ``out × in`` weight (DESIGN.md §4).

        Example: ``BinaryLowRankCodec.storage_bits(384, 1536, 229)`` → ``8 · (10992 + 43968) + 16 · 1920``.
        """
        return 8 * (math.ceil(out * rank / 8) + math.ceil(inp * rank / 8)) + 16 * (out + inp)

    @classmethod
    def rank_for_budget(cls, out: int, inp: int, bits: float) -> int:
        """Largest rank whose storage fits ``bits`` per weight (at least 1) (DESIGN.md §3).

        Example: ``BinaryLowRankCodec.rank_for_budget(384, 1536, 0.8)`` → ``229``.
        """
        budget = bits * out * inp
        r = max(1, int((budget - 16 * (out + inp)) // (out + inp)))
        while r > 1 and cls.storage_bits(out, inp, r) > budget:
            r -= 1
        return r

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Fit and pack; see the class docstring for the algorithm (DESIGN.md §3).

        Example: ``BinaryLowRankCodec(rank=8).quantize(torch.randn(64, 64)).meta["rank"]`` → ``8``.
        """
        w = _check_weight(w, self.scheme)
        out, inp = w.shape
        r = self.rank if self.rank is not None else self.rank_for_budget(out, inp, self.bits)
        u, v, s1, s2 = self._fit(w, r)
        data = {"u_bits": pack_bits(u > 0), "v_bits": pack_bits(v > 0),
                "s1": s1.to(torch.float16), "s2": s2.to(torch.float16)}
        return PackedWeight(self.scheme, (out, inp), data, {"rank": r, "iters": self.iters, "seed": self.seed})

    # -- fitting ------------------------------------------------------------------------------------

    def _svd(self, m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if min(m.shape) > 1024 and r < min(m.shape) // 2:
            # A full SVD of a large layer costs O(n³); the randomized one is seeded so the fit stays
            # reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                a, s, b = torch.svd_lowrank(m, q=min(min(m.shape), r + 16), niter=4)
            return a[:, :r], s[:r], b[:, :r]
        a, s, bh = torch.linalg.svd(m, full_matrices=False)
        return a[:, :r], s[:r], bh[:r].T

    @staticmethod
    def _fit_s1(w, u, v, s2):
        p = (u @ v.T) * s2
        return (w * p).sum(1) / (p * p).sum(1).clamp_min(1e-30)

    @staticmethod
    def _fit_s2(w, u, v, s1):
        p = s1.unsqueeze(1) * (u @ v.T)
        return (w * p).sum(0) / (p * p).sum(0).clamp_min(1e-30)

    def _fit(self, w: torch.Tensor, r: int):
        out, inp = w.shape
        a = w.abs()
        tiny = torch.finfo(torch.float32).tiny
        s1 = a.mean(1).clamp_min(tiny)
        s2 = (a.mean(0) / a.mean().clamp_min(tiny)).clamp_min(tiny)
        k = min(r, out, inp)
        left, sv, right = self._svd(w / s1.unsqueeze(1) / s2, k)
        root = sv.clamp_min(0).sqrt()
        u = torch.ones(out, r)
        v = torch.ones(inp, r)
        u[:, :k] = _sign(left * root)
        v[:, :k] = _sign(right * root)
        if r > k:
            # Ranks beyond min(out, in) add no new directions; alternate signs so they start useful.
            u[:, k:] = _sign(torch.arange(out, dtype=torch.float32).unsqueeze(1) % 2 - 0.5)
        for _ in range(2):
            s1 = self._fit_s1(w, u, v, s2)
            s2 = self._fit_s2(w, u, v, s1)
        for _ in range(self.iters):
            resid = w - s1.unsqueeze(1) * (u @ v.T) * s2
            n1, n2 = (s1 * s1).sum(), (s2 * s2).sum()
            for j in range(r):
                uj, vj = u[:, j], v[:, j]
                a, b = s1 * uj, s2 * vj
                # R_k = R + a bᵀ is never formed: R_k (s2 ⊙ v) = R b + a ‖s2‖² (v ⊙ v = 1), and likewise
                # for the V step, so one sweep costs two mat-vecs and at most one rank-2 update per k.
                new_u = _sign(s1 * (resid @ b + a * n2))
                a_new = s1 * new_u
                new_v = _sign(s2 * (resid.T @ a_new + b * (a * a_new).sum()))
                if torch.equal(new_u, uj) and torch.equal(new_v, vj):
                    continue
                b_new = s2 * new_v
                resid.addmm_(torch.stack((a, a_new), 1), torch.stack((b, -b_new), 0))
                u[:, j], v[:, j] = new_u, new_v
            s1 = self._fit_s1(w, u, v, s2)
            s2 = self._fit_s2(w, u, v, s1)
        s1 = s1.to(torch.float16).to(torch.float32)
        s2 = self._fit_s2(w, u, v, s1)
        return u, v, s1, s2

    # -- decoding -----------------------------------------------------------------------------------

    @staticmethod
    def factors(p: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, V, s1, s2)`` as float32 (``U``: ``[out, r]``, ``V``: ``[in, r]`` in {±1}) (DESIGN.md §3).

        Example: ``U, V, s1, s2 = BinaryLowRankCodec.factors(p)``; ``(s1[:, None] * U) @ (s2[:, None] * V).T``
        is the dequantized weight.
        """
        out, inp = p.shape
        r = p.meta["rank"]
        u = unpack_bits(p.data["u_bits"], out * r).view(out, r).to(torch.float32) * 2 - 1
        v = unpack_bits(p.data["v_bits"], inp * r).view(inp, r).to(torch.float32) * 2 - 1
        return u, v, p.data["s1"].to(torch.float32), p.data["s2"].to(torch.float32)

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``diag(s1) · U Vᵀ · diag(s2)``, float32 (DESIGN.md §3).

        Example: ``BinaryLowRankCodec(rank=4).dequantize(p).shape`` → ``p.shape``.
        """
        u, v, s1, s2 = self.factors(p)
        return s1.unsqueeze(1) * (u @ v.T) * s2


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def codec_from_meta(p: PackedWeight):
    """The codec object that produced ``p`` (rebuilt from ``p.scheme`` and ``p.meta``) (DESIGN.md §3).

    Example: ``codec_from_meta(MXFP4Codec().quantize(w))`` → an ``MXFP4Codec``.
    """
    m = p.meta
    if p.scheme == "fp4-e2m1":
        return E2M1Codec()
    if p.scheme == "mxfp4":
        return MXFP4Codec(m["block_size"])
    if p.scheme == "nvfp4":
        return NVFP4Codec(m["block_size"])
    if p.scheme == "int8":
        return Int8Codec()
    if p.scheme == "int4":
        return Int4Codec(m["block_size"])
    if p.scheme == "nf4":
        return NF4Codec(m["block_size"])
    if p.scheme == "ternary":
        return TernaryCodec(m["per_channel"])
    if p.scheme == "binary-lowrank":
        return BinaryLowRankCodec(rank=m["rank"], iters=m["iters"], seed=m["seed"])
    raise ConfigError(f"unknown packed scheme {p.scheme!r}; valid: fp4-e2m1, mxfp4, nvfp4, int8, int4, "
                      "nf4, ternary, binary-lowrank")


def dequantize(p: PackedWeight) -> torch.Tensor:
    """Float32 weight of any :class:`PackedWeight` (DESIGN.md §3, per scheme).

    Example: ``dequantize(NF4Codec().quantize(w))`` has ``w``'s shape.
    """
    return codec_from_meta(p).dequantize(p)
