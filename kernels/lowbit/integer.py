"""Integer formats: int8 per-channel symmetric, int4 group-wise asymmetric and NF4 (bitsandbytes' table).
"""


from __future__ import annotations

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
# Integer formats
# ----------------------------------------------------------------------------------------------------


class Int8Codec:
    """int8 per-channel symmetric (docs/definitions.md): ``scale_o = max_i |W[o, i]| / 127``,
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
        """Quantize a 2-D weight row by row; an all-zero row stores scale 0 and zero codes (docs/definitions.md).

        Example: ``Int8Codec().quantize(torch.randn(384, 1536)).bits_per_weight()`` → ``8.0208…``.
        """
        w = _check_weight(w, self.scheme)
        scale = w.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.round(w / safe.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        return PackedWeight(self.scheme, tuple(w.shape), {"codes": codes, "scales": scale}, {})

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``q · scale`` per row, float32 (docs/definitions.md).

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
    """int4 group-wise asymmetric (docs/definitions.md): groups of ``group_size`` (128) along ``in`` per row.

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
        """Quantize a 2-D weight group by group (docs/definitions.md).

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
        """``(q − z) · scale`` per group, float32, cropped to the logical shape (docs/definitions.md).

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
    """NF4 (docs/definitions.md): the bitsandbytes 16-level table, absmax blocks of 64 over the flattened weight.

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
        """Quantize a 2-D weight over its flattened blocks (docs/definitions.md).

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
        """``table[index] · absmax``, float32, in the logical shape (docs/definitions.md).

        Example: ``NF4Codec().dequantize(NF4Codec().quantize(torch.ones(1, 64)))`` → all ones.
        """
        bs = p.meta["block_size"]
        vals = NF4_TABLE.to(p.data["codes"].device)[unpack_nibbles(p.data["codes"]).long()]
        vals = vals.view(-1, bs) * p.data["absmax"].unsqueeze(1)
        return vals.reshape(-1)[: p.numel()].view(p.shape)




