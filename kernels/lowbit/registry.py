"""From a scheme name to its codec, and back from a packed weight to its codec.
"""


from __future__ import annotations

import torch

from ..errors import ConfigError
from .binary import BinaryLowRankCodec
from .fp4 import E2M1Codec, MXFP4Codec, NVFP4Codec
from .gguf import GGUF_WEIGHT_TYPES, GGUFCodec
from .integer import Int4Codec, Int8Codec, NF4Codec
from .packing import PackedWeight
from .ternary import TernaryCodec

# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def codec_from_meta(p: PackedWeight):
    """The codec object that produced ``p`` (rebuilt from ``p.scheme`` and ``p.meta``) (docs/definitions.md).

    Example: ``codec_from_meta(MXFP4Codec().quantize(w))`` → an ``MXFP4Codec``.
    """
    m = p.meta
    if p.scheme in GGUF_WEIGHT_TYPES:
        return GGUFCodec(p.scheme)
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
                      f"nf4, ternary, binary-lowrank, {', '.join(GGUF_WEIGHT_TYPES)}")


def dequantize(p: PackedWeight) -> torch.Tensor:
    """Float32 weight of any :class:`PackedWeight` (docs/definitions.md, per scheme).

    Example: ``dequantize(NF4Codec().quantize(w))`` has ``w``'s shape.
    """
    return codec_from_meta(p).dequantize(p)


