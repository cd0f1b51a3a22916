"""``QuantConfig``: which low-bit scheme, block size, backend and activation handling a model gets.

Backends. torchao provides int8 weight-only quantization that runs on CPU (``quantize_`` with
``Int8WeightOnlyConfig``; probed once per process). ``backend="auto"`` uses it for weight-only ``int8``
and lens's own codecs for everything else: torchao's MXFP4/NVFP4 tensors need CUDA (sm100) kernels for
their matmuls, its NF4 tensor uses double-quantized scales, and ternary / binary low-rank do not exist
there - on this CPU lens's codecs are the reference (their MX/NV codes equal torchao's bit for bit).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from ..errors import ConfigError, LensError
from .binary import BinaryLowRankCodec
from .fp4 import MXFP4Codec, NVFP4Codec
from .gguf import ACTIVATION_MODES, GGUF_BITS_PER_WEIGHT, GGUF_WEIGHT_TYPES, GGUFCodec, gguf_type_name
from .gguf_blocks import block_info
from .integer import Int4Codec, Int8Codec, NF4Codec
from .packing import PackedWeight
from .ternary import TernaryCodec

SCHEMES = ("nvfp4", "mxfp4", "int8", "int4", "nf4", "ternary", "binary-lowrank") + GGUF_WEIGHT_TYPES
BACKENDS = ("auto", "lens", "torchao")
_BLOCK_DEFAULT = {"nvfp4": 16, "mxfp4": 32, "int4": 128, "nf4": 64,
                  **{t: block_info(t)[0] for t in GGUF_WEIGHT_TYPES}}
_BLOCK_CHOICES = {"nvfp4": (16,), "mxfp4": (32,), "int4": (32, 64, 128, 256, 512),
                  "nf4": (32, 64, 128, 256), **{t: (block_info(t)[0],) for t in GGUF_WEIGHT_TYPES}}
_DEFAULT_BITS_BUDGET = 0.8

#: Names accepted by :meth:`QuantConfig.from_name` besides the plain scheme names.
PRESETS: dict[str, dict] = {
    "ternary-channel": {"scheme": "ternary", "per_channel": True},
    "w8a8": {"scheme": "int8", "act_bits": 8},
    "w8a8-smooth": {"scheme": "int8", "act_bits": 8, "smooth_alpha": 0.5},
    "w8a8-smooth-modality": {"scheme": "int8", "act_bits": 8, "smooth_alpha": 0.5, "modality_aware": True},
}
_LOWRANK_NAME = re.compile(r"^binary-lowrank[-@:](\d*\.?\d+)(?:bpw|bits)?$")


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize the linear layers of a model (docs/definitions.md#low-bit-formats, #smoothing).

    Fields (``None`` means "the scheme's default" where one exists):

    * ``scheme``: one of ``SCHEMES`` — nvfp4, mxfp4, int8, int4, nf4, ternary, binary-lowrank.
    * ``block_size``: block/group length; nvfp4 16, mxfp4 32 (both fixed by their specs), int4 group
      128 (32–512), nf4 64 (32–256); must stay ``None`` for int8, ternary and binary-lowrank.
    * ``bits_budget``: binary-lowrank bits/weight budget from which the rank is chosen (default 0.8,
      range (0, 2]); ``rank`` fixes the rank instead. ``lowrank_iters`` alternating sweeps (default 6),
      ``seed`` for the randomized SVD of large layers.
    * ``act_bits``: ``None`` (weight-only) or 8 (per-token symmetric int8 fake-quantized activations).
    * ``smooth_alpha``: ``None`` or α in [0, 1] for SmoothQuant (needs ``act_bits=8`` and calibration);
      ``modality_aware=True`` uses separate factors for two token groups (needs ``smooth_alpha``).
    * ``per_channel``: ternary γ per output row instead of per tensor (ternary only).
    * ``backend``: ``"auto"`` (torchao for weight-only int8 if it runs here, lens otherwise), ``"lens"``,
      or ``"torchao"`` (weight-only int8 only).
    * GGUF / llama.cpp types ``q4_0``, ``q4_1``, ``q5_0``, ``q5_1``, ``q8_0``, ``q2_k``, ``q3_k``, ``q4_k``,
      ``q5_k``, ``q6_k`` (and ``iq4_nl``, llama-quantize's fallback): names keep their underscore; the block
      is fixed (32, or 256 for K-quants). ``activations="llama.cpp"`` (GGUF types only, not with
      ``act_bits``) makes ``QuantLinear`` quantize its input as llama.cpp's CPU matmul does (the weight
      type's ``vec_dot_type``: Q8_0, Q8_1 or Q8_K; lens.kernels.lowbit.gguf_activations); ``None`` (default)
      multiplies float activations by the exactly dequantized weight.

    Example::

        cfg = QuantConfig.from_name("nvfp4")
        cfg.block_size                      # 16
        QuantConfig("int4", block_size=64).describe()["nominal_bits_per_weight"]   # 4.375
    """

    scheme: str
    block_size: int | None = None
    bits_budget: float | None = None
    rank: int | None = None
    lowrank_iters: int = 6
    seed: int = 0
    act_bits: int | None = None
    smooth_alpha: float | None = None
    modality_aware: bool = False
    per_channel: bool = False
    backend: str = "auto"
    activations: str | None = None

    def __post_init__(self):
        scheme = str(self.scheme).strip().lower().replace("_", "-")
        if scheme.replace("-", "_") in GGUF_WEIGHT_TYPES:
            scheme = scheme.replace("-", "_")
        elif scheme.replace("-", "_").rsplit("_", 1)[0] in GGUF_WEIGHT_TYPES:
            gguf_type_name(str(self.scheme))  # raises, with the hint q4_k_m (a llama-quantize recipe) → q4_k
        if scheme not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {self.scheme!r}; valid schemes: "
                              f"{', '.join(SCHEMES)} (presets: {', '.join(PRESETS)}, binary-lowrank-<bits>)")
        object.__setattr__(self, "scheme", scheme)
        if scheme in _BLOCK_CHOICES:
            bs = _BLOCK_DEFAULT[scheme] if self.block_size is None else self.block_size
            if bs not in _BLOCK_CHOICES[scheme]:
                raise ConfigError(f"{scheme}: block_size must be one of {_BLOCK_CHOICES[scheme]}, got {bs}")
            object.__setattr__(self, "block_size", int(bs))
        elif self.block_size is not None:
            raise ConfigError(f"{scheme}: block_size does not apply (only to {', '.join(_BLOCK_CHOICES)})")
        if scheme == "binary-lowrank":
            if self.rank is not None:
                if not isinstance(self.rank, int) or self.rank < 1:
                    raise ConfigError(f"binary-lowrank: rank must be an integer ≥ 1, got {self.rank!r}")
                if self.bits_budget is not None:
                    raise ConfigError("binary-lowrank: give either rank or bits_budget, not both")
            else:
                budget = _DEFAULT_BITS_BUDGET if self.bits_budget is None else float(self.bits_budget)
                if not (0.0 < budget <= 2.0):
                    raise ConfigError(f"binary-lowrank: bits_budget must be in (0, 2], got {budget}")
                object.__setattr__(self, "bits_budget", budget)
            if not isinstance(self.lowrank_iters, int) or not (0 <= self.lowrank_iters <= 100):
                raise ConfigError(f"binary-lowrank: lowrank_iters must be an integer in [0, 100], "
                                  f"got {self.lowrank_iters!r}")
        elif self.bits_budget is not None or self.rank is not None:
            raise ConfigError(f"{scheme}: bits_budget/rank apply to binary-lowrank only")
        if self.act_bits not in (None, 8):
            raise ConfigError(f"act_bits must be None (weight-only) or 8, got {self.act_bits!r}")
        if self.smooth_alpha is not None:
            alpha = float(self.smooth_alpha)
            if not (0.0 <= alpha <= 1.0):
                raise ConfigError(f"smooth_alpha must be None or in [0, 1], got {self.smooth_alpha}")
            if self.act_bits is None:
                raise ConfigError("smooth_alpha needs act_bits=8: SmoothQuant migrates activation outliers "
                                  "into the weights, which only matters when activations are quantized")
            object.__setattr__(self, "smooth_alpha", alpha)
        if self.modality_aware and self.smooth_alpha is None:
            raise ConfigError("modality_aware=True needs smooth_alpha (it splits the smoothing factors "
                              "by token group)")
        if self.per_channel and scheme != "ternary":
            raise ConfigError(f"per_channel applies to ternary only (got scheme {scheme!r})")
        if self.activations not in ACTIVATION_MODES:
            raise ConfigError(f"activations must be None or 'llama.cpp', got {self.activations!r}")
        if self.activations is not None:
            if scheme not in GGUF_WEIGHT_TYPES:
                raise ConfigError(f"activations='llama.cpp' emulates llama.cpp's matmul, which exists for GGUF "
                                  f"types only ({', '.join(GGUF_WEIGHT_TYPES)}), not {scheme!r}")
            if self.act_bits is not None:
                raise ConfigError("activations='llama.cpp' already quantizes activations (to Q8_0/Q8_1/Q8_K); "
                                  "leave act_bits=None")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "torchao" and not (scheme == "int8" and self.act_bits is None):
            raise ConfigError("backend='torchao' supports weight-only int8 on CPU only (scheme='int8', "
                              "act_bits=None); use backend='lens' or 'auto' for "
                              f"{scheme}{' with act_bits=8' if self.act_bits else ''}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "QuantConfig":
        """Config for a scheme name or preset (docs/definitions.md), with optional field overrides.

        Names: ``nvfp4``, ``mxfp4``, ``int8``, ``int4``, ``nf4``, ``ternary``, ``binary-lowrank``,
        ``ternary-channel``, ``w8a8`` (int8 + int8 activations), ``w8a8-smooth`` (+ SmoothQuant α 0.5),
        ``w8a8-smooth-modality`` (+ separate factors per token group), ``binary-lowrank-<bits>``
        (e.g. ``binary-lowrank-0.55``). Case and ``_``/``-`` are ignored.

        Example: ``QuantConfig.from_name("int4", block_size=64).block_size`` → ``64``.
        """
        if not isinstance(name, str):
            raise ConfigError(f"a quantization scheme name must be a string, got {type(name).__name__}")
        key = name.strip().lower().replace("_", "-")
        params: dict = {}
        m = _LOWRANK_NAME.match(key)
        if key.replace("-", "_") in GGUF_WEIGHT_TYPES:
            params = {"scheme": key.replace("-", "_")}
        elif key.replace("-", "_").rsplit("_", 1)[0] in GGUF_WEIGHT_TYPES:
            gguf_type_name(name)  # raises with the recipe hint (q4_k_m → q4_k)
        elif key in SCHEMES:
            params = {"scheme": key}
        elif key in PRESETS:
            params = dict(PRESETS[key])
        elif m:
            params = {"scheme": "binary-lowrank", "bits_budget": float(m.group(1))}
        else:
            raise ConfigError(f"unknown quantization scheme {name!r}; valid names: {', '.join(SCHEMES)}, "
                              f"{', '.join(PRESETS)}, binary-lowrank-<bits> (e.g. binary-lowrank-0.55)")
        valid = {f.name for f in fields(cls)}
        unknown = set(overrides) - valid
        if unknown:
            raise ConfigError(f"unknown QuantConfig field(s) {sorted(unknown)}; valid: {sorted(valid)}")
        if "rank" in overrides and "bits_budget" not in overrides:
            params.pop("bits_budget", None)
        params.update(overrides)
        return cls(**params)

    def nominal_bits_per_weight(self) -> float | None:
        """The format's rate for an ``in`` that is a multiple of the block (docs/definitions.md); ``None`` where
        it depends on the layer shape (int8 adds 32/in, binary-lowrank follows the budget per layer).

        Example: ``QuantConfig.from_name("mxfp4").nominal_bits_per_weight()`` → ``4.25``.
        """
        s, b = self.scheme, self.block_size
        if s in GGUF_BITS_PER_WEIGHT:
            return GGUF_BITS_PER_WEIGHT[s]
        return {"nvfp4": 4.5, "mxfp4": 4.25, "int4": 4 + 24 / b if b else None,
                "nf4": 4 + 32 / b if b else None, "ternary": 1.6,
                "binary-lowrank": self.bits_budget, "int8": None}[s]

    def describe(self) -> dict:
        """JSON-able provenance: every field, the nominal rate and the definition (docs/definitions.md) it follows.

        Example: ``QuantConfig.from_name("w8a8-smooth").describe()["smooth_alpha"]`` → ``0.5``.
        """
        d = asdict(self)
        d["nominal_bits_per_weight"] = self.nominal_bits_per_weight()
        d["definition"] = "docs/definitions.md#low-bit-formats" + (
            ", #smoothing" if self.smooth_alpha is not None else "")
        if self.scheme in GGUF_WEIGHT_TYPES:
            d["definition"] = ("docs/definitions.md#gguf-formats (llama.cpp ggml-quants.c; bit-exact with gguf.quants)"
                               + (" + llama.cpp activation quantization" if self.activations else ""))
        return d


def _as_config(config: "QuantConfig | str") -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return QuantConfig.from_name(config)
    raise ConfigError(f"expected a QuantConfig or a scheme name, got {type(config).__name__}")


def codec_for(config: "QuantConfig | str"):
    """The lens codec object implementing ``config``'s weight format (docs/definitions.md).

    Example: ``codec_for("int4").quantize(torch.randn(8, 256)).bits_per_weight()`` → ``4.1875``.
    """
    c = _as_config(config)
    if c.scheme in GGUF_WEIGHT_TYPES:
        return GGUFCodec(c.scheme)
    if c.scheme == "nvfp4":
        return NVFP4Codec(c.block_size)
    if c.scheme == "mxfp4":
        return MXFP4Codec(c.block_size)
    if c.scheme == "int8":
        return Int8Codec()
    if c.scheme == "int4":
        return Int4Codec(c.block_size)
    if c.scheme == "nf4":
        return NF4Codec(c.block_size)
    if c.scheme == "ternary":
        return TernaryCodec(c.per_channel)
    return BinaryLowRankCodec(bits=c.bits_budget, rank=c.rank, iters=c.lowrank_iters, seed=c.seed)


def quantize(w: torch.Tensor, config: "QuantConfig | str") -> PackedWeight:
    """Quantize a weight ``[out, in]`` with lens's codec for ``config`` (docs/definitions.md).

    Example: ``dequantize(quantize(torch.randn(16, 64), "nf4")).shape`` → ``(16, 64)``.
    """
    return codec_for(config).quantize(w)


_TORCHAO_INT8_OK: bool | None = None


def _torchao_int8_works() -> bool:
    # Probed once: torchao is optional and its CPU support varies by version, so "auto" only picks it
    # after a real quantize-and-run on this machine.
    global _TORCHAO_INT8_OK
    if _TORCHAO_INT8_OK is None:
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            lin = nn.Linear(32, 16)
            ref = lin(torch.ones(2, 32))
            quantize_(lin, Int8WeightOnlyConfig())
            out = lin(torch.ones(2, 32))
            _TORCHAO_INT8_OK = bool(torch.isfinite(out).all()) and out.shape == ref.shape
        except Exception:  # ImportError, or any failure of the optional backend on this platform
            _TORCHAO_INT8_OK = False
    return _TORCHAO_INT8_OK


def resolve_backend(config: "QuantConfig | str") -> str:
    """``"torchao"`` or ``"lens"``: which implementation ``config`` runs on here (docs/definitions.md).

    ``auto`` → torchao for weight-only int8 when torchao is installed and runs on this CPU, else lens.

    Example: ``resolve_backend("int8")`` → ``"torchao"`` (with ``lens-interp[quant]`` installed);
    ``resolve_backend("nvfp4")`` → ``"lens"``.
    """
    c = _as_config(config)
    if c.backend == "lens":
        return "lens"
    weight_only_int8 = c.scheme == "int8" and c.act_bits is None
    if c.backend == "torchao":
        if not _torchao_int8_works():
            raise LensError("backend='torchao' needs torchao's int8 weight-only path, which is not "
                            "installed or does not run here; install lens-interp[quant] or use backend='lens'")
        return "torchao"
    return "torchao" if weight_only_int8 and _torchao_int8_works() else "lens"




