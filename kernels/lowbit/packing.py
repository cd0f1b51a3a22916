"""The packed container and bit packing shared by every low-bit codec.

``PackedWeight`` holds the real bytes a deployment keeps; the helpers pack two 4-bit codes per ``uint8``
(element ``2k`` in the low nibble, torchao's order), eight signs per ``uint8`` and five ternary digits
per ``uint8``.
"""


from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

# ----------------------------------------------------------------------------------------------------
# The packed container
# ----------------------------------------------------------------------------------------------------


@dataclass
class PackedWeight:
    """A quantized weight as stored: its tensors are the only bytes kept (docs/definitions.md).

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
        """Bytes of every stored tensor (codes, scales, zero points, padding included) (docs/benchmarks.md).

        Example: ``Int8Codec().quantize(torch.randn(4, 8)).nbytes()`` → ``4·8 + 4·4 = 48``.
        """
        return sum(t.numel() * t.element_size() for t in self.data.values())

    def numel(self) -> int:
        """Number of logical weights ``out · in``, the denominator of :meth:`bits_per_weight` (docs/benchmarks.md).

        Example: ``NF4Codec().quantize(torch.randn(3, 5)).numel()`` → ``15``.
        """
        return math.prod(self.shape)

    def bits_per_weight(self) -> float:
        """Measured rate ``8 · nbytes / numel`` — real bytes, padding and scales included (docs/benchmarks.md).

        Example: ``NVFP4Codec().quantize(torch.randn(128, 256)).bits_per_weight()`` → ``4.5009…``
        (4.5 plus the fp32 per-tensor scale).
        """
        return 8.0 * self.nbytes() / max(1, self.numel())

    def to(self, device: torch.device | str) -> "PackedWeight":
        """The same packed weight with its tensors on ``device`` (docs/definitions.md).

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
    does (docs/definitions.md: formats are stored packed).

    Example: ``pack_nibbles(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))`` → ``tensor([33, 15])``.
    """
    if codes.shape[-1] % 2:
        raise ConfigError(f"pack_nibbles needs an even last dimension, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[..., n]`` bytes → ``[..., 2n]`` codes in ``0..15`` (docs/definitions.md).

    Example: ``unpack_nibbles(torch.tensor([33, 15], dtype=torch.uint8))`` → ``tensor([1, 2, 15, 0])``.
    """
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack a flat boolean tensor eight per byte (element ``8k + j`` → bit ``j``), zero-padding the
    tail (docs/definitions.md: binary signs are bit-packed).

    Example: ``pack_bits(torch.tensor([True, False, True]))`` → ``tensor([5], dtype=torch.uint8)``.
    """
    flat = bits.reshape(-1).to(torch.uint8)
    flat, _ = _pad_last(flat, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    # uint8 sum of distinct powers of two never exceeds 255, so the product-sum is exact in uint8.
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` bits as a boolean tensor (docs/definitions.md).

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
    """Pack ternary values in {−1, 0, 1} five per byte, base 3 (3⁵ = 243 ≤ 256 → 1.6 bits; docs/definitions.md).

    Example: ``pack_trits(torch.tensor([-1, 0, 1, 1, -1]))`` → ``tensor([75], dtype=torch.uint8)``
    (digits 0, 1, 2, 2, 0 → 0·1 + 1·3 + 2·9 + 2·27 + 0·81 = 75).
    """
    flat = (t.reshape(-1).to(torch.int16) + 1)
    flat, _ = _pad_last(flat, 5)  # pad digit 0 decodes to −1 but is cropped by unpack_trits(n)
    powers = torch.tensor(_TRIT_POWERS, dtype=torch.int16, device=flat.device)
    return (flat.view(-1, 5) * powers).sum(dim=1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``n`` ternary values as int8 (docs/definitions.md).

    Example: ``unpack_trits(pack_trits(torch.tensor([1, 0, -1])), 3)`` → ``tensor([1, 0, -1])``.
    """
    lut = _trit_lut(packed.device)
    return lut[packed.long()].reshape(-1)[:n]




