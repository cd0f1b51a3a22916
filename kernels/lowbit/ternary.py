"""Ternary weights (BitNet b1.58): gamma = mean|W|, W_q = clamp(round(W/gamma), -1, 1), stored as base-3 digits.
"""


from __future__ import annotations

import torch

from .packing import PackedWeight, _check_weight, pack_trits, unpack_trits


class TernaryCodec:
    """Ternary BitNet b1.58 (docs/definitions.md): ``γ = mean |W|``, ``W_q = clamp(round(W / γ), −1, 1)``,
    ``Ŵ = γ · W_q``; γ per tensor (default) or per output row (``per_channel=True``), stored as fp32.

    Codes are packed five per byte in base 3 (1.6 bits/weight) over the flattened weight. A zero γ (all
    zero weights) stores γ = 0 and zero codes. BitNet adds ε = 1e-5 to γ before dividing; the definition in
    docs/definitions.md#ternary (no ε) is used here.

    Example::

        p = TernaryCodec().quantize(torch.tensor([[0.9, -0.1, -2.0, 0.4]]))   # γ = 0.85
        TernaryCodec().dequantize(p)    # [[0.85, 0.0, -0.85, 0.0]]
    """

    scheme = "ternary"

    def __init__(self, per_channel: bool = False):
        self.per_channel = bool(per_channel)

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Quantize a 2-D weight (about 1.6 bits/weight) (docs/definitions.md).

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
        """``γ · W_q``, float32 (docs/definitions.md).

        Example: ``TernaryCodec().dequantize(TernaryCodec().quantize(torch.ones(2, 2)))`` → all ones.
        """
        q = unpack_trits(p.data["codes"], p.numel()).view(p.shape).to(torch.float32)
        g = p.data["gamma"]
        return q * (g.unsqueeze(1) if p.meta["per_channel"] else g)




