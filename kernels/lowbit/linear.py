"""``QuantLinear``: a drop-in ``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight stays packed in memory.

transformers' GPT-2 ``Conv1D`` is recognised through ``sys.modules`` - a model that contains one has
already imported it - so this module never imports transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .binary import BinaryLowRankCodec
from .config import QuantConfig, _as_config, codec_for, resolve_backend
from .gguf import GGUF_WEIGHT_TYPES, GGUFCodec, fallback_type, gguf_linear
from .layers import (
    _linear_weight,
)
from .packing import PackedWeight
from .registry import dequantize
from .smoothing import (
    _TOKEN_MASK,
    ActStats,
    fake_quant_per_token_int8,
    smoothing_factors,
)

# ----------------------------------------------------------------------------------------------------
# QuantLinear
# ----------------------------------------------------------------------------------------------------








def _tensor_bytes(t: torch.Tensor) -> int:
    # torchao tensor subclasses report the logical (unpacked) size; count their stored inner tensors.
    inner = getattr(t, "tensor_data_names", None)
    if inner is not None:
        total = 0
        for n in list(inner) + list(getattr(t, "optional_tensor_data_names", []) or []):
            v = getattr(t, n, None)
            if isinstance(v, torch.Tensor):
                total += _tensor_bytes(v)
        return total
    return t.numel() * t.element_size()


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``module`` as stored (packed codes count at their
    packed size, torchao tensors at their inner int8 data + scales) — the number lens reports as
    "resident bytes" (docs/benchmarks.md: must match the format's bits/weight within 5%).

    Example: ``resident_bytes(nn.Linear(4, 2))`` → ``40`` (8 + 2 float32).
    """
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


class QuantLinear(nn.Module):
    """A linear layer whose weight is kept only in packed low-bit form (docs/definitions.md#low-bit-formats).

    ``forward(x) = F.linear(act(x), dequantize(packed), bias)``: the weight is dequantized on every call
    and dropped afterwards (nothing weight-sized is cached); the bias stays in full precision. With
    ``act_bits=8`` the input is fake-quantized per token (int8 symmetric) first; with SmoothQuant the
    factors ``s`` are folded into the stored weight (``W · diag(s)``) and the input is divided by ``s``
    before its quantization. In a deployed LLM ``1/s`` would be folded into the preceding norm; here it
    is applied in this layer so that any linear can be smoothed.

    Modality-aware smoothing (MASQuant-style): the weight is stored once, smoothed with the joint factors
    ``s`` (SmoothQuant's, from all calibration tokens); each token is smoothed with its own group's factors
    ``s_g`` (``g = 1`` where the :func:`token_groups` mask is set, else 0), int8-quantized, and rescaled by
    ``s_g / s`` before the matmul. The activation error is thus that of per-modality smoothing and the
    weight error exactly SmoothQuant's. MASQuant instead folds each modality's factors into the weight and
    reconciles the two weights with a low-rank SVD compensation (CMC) so that integer kernels need no
    per-token rescale; that compensation is not implemented here. Without a mask every token uses ``s``.

    Binary low-rank weights are applied as ``((x ⊙ s2) V) Uᵀ ⊙ s1`` — the same product without building
    the ``out × in`` matrix. GGUF weights (``q4_0`` … ``q6_k``) keep llama.cpp's block bytes and are
    dequantized in row chunks inside the matmul (``lens.kernels.lowbit.gguf.gguf_linear``); with
    ``QuantConfig(..., activations="llama.cpp")`` the input is quantized as llama.cpp's CPU matmul does.
    :meth:`from_packed` wraps bytes read from a GGUF file without re-quantizing them. The ``torchao`` backend wraps an ``nn.Linear`` converted by torchao's
    ``quantize_(…, Int8WeightOnlyConfig())``.

    Example::

        q = QuantLinear.from_module(nn.Linear(384, 1536), QuantConfig.from_name("nvfp4"))
        q(torch.randn(2, 7, 384)).shape      # (2, 7, 1536)
        q.bits_per_weight()                  # 4.5009…
    """

    def __init__(self, in_features: int, out_features: int, *, config: QuantConfig,
                 packed: PackedWeight | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, group_smooth: torch.Tensor | None = None,
                 ao_linear: nn.Module | None = None, source: str = "Linear"):
        super().__init__()
        if (packed is None) == (ao_linear is None):
            raise ConfigError("QuantLinear needs exactly one of packed (lens codec) or ao_linear (torchao)")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.config = config
        self.source = source
        self.ao_linear = ao_linear
        self._packed_names: tuple[str, ...] = ()
        self._scheme = config.scheme
        self._meta: dict = {}
        if packed is not None:
            if tuple(packed.shape) != (self.out_features, self.in_features):
                raise ConfigError(f"packed weight shape {packed.shape} ≠ [out, in] = "
                                  f"{[self.out_features, self.in_features]}")
            self._scheme, self._meta = packed.scheme, dict(packed.meta)
            self._packed_names = tuple(packed.data)
            for k, v in packed.data.items():
                self.register_buffer(f"q_{k}", v)
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.bias = None  # torchao's module owns its bias
        self.register_buffer("smooth", None if smooth is None else smooth.detach().to(torch.float32))
        self.register_buffer("group_smooth",
                             None if group_smooth is None else group_smooth.detach().to(torch.float32))

    # -- construction -------------------------------------------------------------------------------

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, config: "QuantConfig | str", *,
                    stats: ActStats | None = None, source: str = "Linear") -> "QuantLinear":
        """Build from a weight ``[out, in]`` (and bias); ``stats`` from :func:`calibrate` is required
        when ``config.smooth_alpha`` is set (docs/definitions.md#smoothing).

        Example: ``QuantLinear.from_weight(torch.randn(8, 32), None, "int4")``.
        """
        cfg = _as_config(config)
        out_f, in_f = weight.shape
        smooth = group = None
        w = weight.detach()
        if cfg.smooth_alpha is not None:
            if stats is None:
                raise ConfigError("smooth_alpha is set but no calibration statistics were given for this "
                                  "layer: run calibrate(model, batches) and pass calibration=… ")
            if cfg.modality_aware:
                if stats.group_amax is None:
                    raise ConfigError("modality_aware=True needs calibration with token_masks that match "
                                      "this layer's input (calibrate(..., token_masks=...))")
                per_group = []
                for g in (0, 1):
                    # A group with no calibration tokens borrows the joint statistics.
                    amax = stats.group_amax[g] if stats.group_tokens[g] > 0 else stats.amax
                    per_group.append(smoothing_factors(amax, w, cfg.smooth_alpha))
                group = torch.stack(per_group)
            smooth = smoothing_factors(stats.amax, w, cfg.smooth_alpha)
            w = w.to(torch.float32) * smooth
        if resolve_backend(cfg) == "torchao":
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
            lin.weight = nn.Parameter(w.contiguous().clone(), requires_grad=False)
            if bias is not None:
                lin.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            quantize_(lin, Int8WeightOnlyConfig())
            return cls(in_f, out_f, config=cfg, ao_linear=lin, source=source)
        if cfg.scheme in GGUF_WEIGHT_TYPES:
            # llama-quantize's rule: a K-quant row that is not a multiple of 256 goes to its fallback type.
            packed = GGUFCodec(fallback_type(cfg.scheme, in_f)).quantize(w)
        else:
            packed = codec_for(cfg).quantize(w)
        return cls(in_f, out_f, config=cfg, packed=packed, bias=bias, smooth=smooth, group_smooth=group,
                   source=source)

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None,
                    config: "QuantConfig | str | None" = None, *, source: str = "gguf") -> "QuantLinear":
        """A layer around an already packed weight — e.g. a GGUF file's own blocks from
        :func:`~lens.kernels.lowbit.gguf.packed_from_gguf` — with no re-quantization (``quant="keep"``).

        ``config`` defaults to ``QuantConfig(packed.scheme)``; pass ``QuantConfig("q4_1",
        activations="llama.cpp")`` to emulate llama.cpp's activation quantization. Its scheme must be the
        packed weight's; SmoothQuant and ``act_bits`` need the float weight, so they are rejected here.
        Raises ``ConfigError`` otherwise. The weight tensors are used as they are (not copied).

        Example::

            p = packed_from_gguf(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())))
            q = QuantLinear.from_packed(p, config=QuantConfig(p.scheme, activations="llama.cpp"))
            q(torch.randn(2, p.shape[1])).shape     # (2, out)
        """
        if not isinstance(packed, PackedWeight):
            raise ConfigError(f"from_packed needs a PackedWeight, got {type(packed).__name__}")
        cfg = _as_config(packed.scheme if config is None else config)
        if cfg.scheme != packed.scheme:
            raise ConfigError(f"config scheme {cfg.scheme!r} does not match the packed weight's "
                              f"{packed.scheme!r}")
        if cfg.smooth_alpha is not None or cfg.act_bits is not None:
            raise ConfigError("from_packed: smoothing and act_bits need the float weight; use from_weight")
        out_f, in_f = packed.shape
        if bias is not None and tuple(bias.shape) != (out_f,):
            raise ConfigError(f"bias has shape {tuple(bias.shape)}, expected ({out_f},)")
        return cls(in_f, out_f, config=cfg, packed=packed, bias=bias, source=source)

    @classmethod
    def from_module(cls, module: nn.Module, config: "QuantConfig | str", *,
                    stats: ActStats | None = None) -> "QuantLinear":
        """Build from an ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``);
        the format is the one docs/definitions.md gives for ``config``.

        Example: ``QuantLinear.from_module(model.transformer.h[0].attn.c_attn, "nvfp4")``.
        """
        weight, source = _linear_weight(module)
        return cls.from_weight(weight, getattr(module, "bias", None), config, stats=stats, source=source)

    # -- storage ------------------------------------------------------------------------------------

    @property
    def packed(self) -> PackedWeight | None:
        """The stored :class:`PackedWeight` (docs/definitions.md; views of this module's buffers), None on torchao.

        Example: ``dequantize(q.packed)`` is the weight the forward uses (with smoothing folded in).
        """
        if self.ao_linear is not None:
            return None
        return PackedWeight(self._scheme, (self.out_features, self.in_features),
                            {k: getattr(self, f"q_{k}") for k in self._packed_names}, dict(self._meta))

    @property
    def backend(self) -> str:
        """``"lens"`` or ``"torchao"`` (docs/definitions.md).

        Example: ``QuantLinear.from_module(nn.Linear(4, 4), "nvfp4").backend`` → ``"lens"``.
        """
        return "torchao" if self.ao_linear is not None else "lens"

    def weight_bytes(self) -> int:
        """Stored bytes of the weight alone — codes, scales, zero points; no bias or smoothing (docs/benchmarks.md).

        Example: ``QuantLinear.from_module(nn.Linear(128, 64), "mxfp4").weight_bytes()`` → ``4352``.
        """
        if self.ao_linear is not None:
            return _tensor_bytes(self.ao_linear.weight)
        return self.packed.nbytes()

    def resident_bytes(self) -> int:
        """Every byte this layer keeps: packed weight + full-precision bias + smoothing factors (docs/benchmarks.md).

        Example: ``QuantLinear.from_module(nn.Linear(128, 64), "mxfp4").resident_bytes()`` → ``4352 + 256``.
        """
        return resident_bytes(self)

    def bits_per_weight(self) -> float:
        """Measured weight storage rate ``8 · weight_bytes / (out · in)`` (docs/definitions.md, docs/benchmarks.md).

        Example: ``QuantLinear.from_module(nn.Linear(128, 64), "mxfp4").bits_per_weight()`` → ``4.25``.
        """
        return 8.0 * self.weight_bytes() / (self.in_features * self.out_features)

    def dequantized_weight(self, *, unsmoothed: bool = True) -> torch.Tensor:
        """The weight ``Ŵ`` (docs/definitions.md) this layer represents, float32 ``[out, in]``, built on demand.

        With ``unsmoothed=True`` (default) SmoothQuant's folded factors are divided out, so ``Ŵ`` is
        comparable with the original weight.

        Example: ``((q.dequantized_weight() - W) ** 2).sum() / (W ** 2).sum()`` is the weight relative MSE.
        """
        if self.ao_linear is not None:
            w = self.ao_linear.weight.dequantize().to(torch.float32)
        else:
            w = dequantize(self.packed)
        if unsmoothed and self.smooth is not None:
            w = w / self.smooth
        return w

    # -- forward ------------------------------------------------------------------------------------

    def _activation(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.act_bits is None:
            return x
        if self.smooth is None:
            return fake_quant_per_token_int8(x).to(x.dtype)
        s_tok = self.smooth
        if self.group_smooth is not None:
            mask = _TOKEN_MASK.get()
            if mask is not None:
                if tuple(mask.shape) != tuple(x.shape[:-1]):
                    raise ConfigError(f"token_groups mask has shape {tuple(mask.shape)} but this layer's "
                                      f"input is {tuple(x.shape)}; the mask must be input.shape[:-1]")
                s_tok = torch.where(mask.to(x.device).unsqueeze(-1), self.group_smooth[1],
                                    self.group_smooth[0])
        xq = fake_quant_per_token_int8(x.to(torch.float32) / s_tok)
        return (xq * (s_tok / self.smooth)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(act(x), Ŵ_stored, bias)`` — see the class docstring for ``act`` (docs/definitions.md).

        Example: ``QuantLinear.from_module(nn.Linear(8, 4), "int8")(torch.ones(3, 8)).shape`` → ``(3, 4)``.
        """
        if self.ao_linear is not None:
            return self.ao_linear(x)
        h = self._activation(x)
        bias = None if self.bias is None else self.bias.to(h.dtype)
        if self._scheme in GGUF_WEIGHT_TYPES:
            return gguf_linear(h, self.packed, self.bias, activations=self.config.activations)
        if self._scheme == "binary-lowrank":
            u, v, s1, s2 = BinaryLowRankCodec.factors(self.packed)
            y = ((h * s2.to(h.dtype)) @ v.to(h.dtype)) @ (u * s1.unsqueeze(1)).to(h.dtype).T
            return y if bias is None else y + bias
        return F.linear(h, dequantize(self.packed).to(h.dtype), bias)

    def extra_repr(self) -> str:
        extra = f", act_bits={self.config.act_bits}" if self.config.act_bits else ""
        extra += f", smooth_alpha={self.config.smooth_alpha}" if self.smooth is not None else ""
        extra += f", activations={self.config.activations}" if self.config.activations else ""
        scheme = self._scheme
        if scheme != self.config.scheme:
            scheme += f" (llama-quantize's fallback for {self.config.scheme})"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={scheme}, backend={self.backend}, bits_per_weight={self.bits_per_weight():.3f}"
                f"{extra}")




