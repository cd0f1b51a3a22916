"""Low-bit weights for lens: configuration, a packed ``QuantLinear``, calibration and model conversion.

Definitions are those of DESIGN.md §3 "Low-bit formats" (codecs in :mod:`lens.kernels.lowbit_formats`,
re-exported here) and §3 "Smoothing" (SmoothQuant ``s = max|X|^α / max|W|^(1−α)``, α = 0.5, and its
modality-aware variant with separate factors for two token groups).

Backends. torchao provides int8 weight-only quantization that runs on CPU (``quantize_`` with
``Int8WeightOnlyConfig``; probed once per process). ``backend="auto"`` uses it for weight-only ``int8``
and lens's own codecs for everything else: torchao's MXFP4/NVFP4 tensors need CUDA (sm100) kernels for
their matmuls, its NF4 tensor uses double-quantized scales, and ternary / binary low-rank do not exist
there — on this CPU lens's codecs are the reference (their MX/NV codes equal torchao's bit for bit).

Only ``torch`` and the standard library are imported at module level. torchao (the optional
extra ``lens-interp[quant]``) and tqdm (for the progress bar) are imported inside the functions that use
them; transformers' GPT-2 ``Conv1D`` is recognised through ``sys.modules`` — a model that contains one has
already imported it — so this module never imports transformers.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, LensError
from .lowbit_formats import (
    E2M1_VALUES,
    NF4_TABLE,
    BinaryLowRankCodec,
    E2M1Codec,
    Int4Codec,
    Int8Codec,
    MXFP4Codec,
    NF4Codec,
    NVFP4Codec,
    PackedWeight,
    TernaryCodec,
    codec_from_meta,
    dequantize,
    e2m1_decode,
    e2m1_encode,
    pack_bits,
    pack_nibbles,
    pack_trits,
    unpack_bits,
    unpack_nibbles,
    unpack_trits,
)

__all__ = [
    # formats (re-exported)
    "PackedWeight", "E2M1_VALUES", "NF4_TABLE", "e2m1_encode", "e2m1_decode", "pack_nibbles",
    "unpack_nibbles", "pack_bits", "unpack_bits", "pack_trits", "unpack_trits", "E2M1Codec",
    "MXFP4Codec", "NVFP4Codec", "Int8Codec", "Int4Codec", "NF4Codec", "TernaryCodec",
    "BinaryLowRankCodec", "codec_from_meta", "dequantize",
    # this module
    "SCHEMES", "PRESETS", "QuantConfig", "codec_for", "quantize", "resolve_backend",
    "fake_quant_per_token_int8", "smoothing_factors", "ActStats", "calibrate", "token_groups",
    "QuantLinear", "default_include", "select_linear_modules", "quantize_model", "resident_bytes",
]

SCHEMES = ("nvfp4", "mxfp4", "int8", "int4", "nf4", "ternary", "binary-lowrank")
BACKENDS = ("auto", "lens", "torchao")
_BLOCK_DEFAULT = {"nvfp4": 16, "mxfp4": 32, "int4": 128, "nf4": 64}
_BLOCK_CHOICES = {"nvfp4": (16,), "mxfp4": (32,), "int4": (32, 64, 128, 256, 512),
                  "nf4": (32, 64, 128, 256)}
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
    """How to quantize the linear layers of a model (DESIGN.md §3 "Low-bit formats", "Smoothing").

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

    def __post_init__(self):
        scheme = str(self.scheme).lower().replace("_", "-")
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
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "torchao" and not (scheme == "int8" and self.act_bits is None):
            raise ConfigError("backend='torchao' supports weight-only int8 on CPU only (scheme='int8', "
                              "act_bits=None); use backend='lens' or 'auto' for "
                              f"{scheme}{' with act_bits=8' if self.act_bits else ''}")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "QuantConfig":
        """Config for a scheme name or preset (DESIGN.md §3), with optional field overrides.

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
        if key in SCHEMES:
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
        """The format's rate for an ``in`` that is a multiple of the block (DESIGN.md §3); ``None`` where
        it depends on the layer shape (int8 adds 32/in, binary-lowrank follows the budget per layer).

        Example: ``QuantConfig.from_name("mxfp4").nominal_bits_per_weight()`` → ``4.25``.
        """
        s, b = self.scheme, self.block_size
        return {"nvfp4": 4.5, "mxfp4": 4.25, "int4": 4 + 24 / b if b else None,
                "nf4": 4 + 32 / b if b else None, "ternary": 1.6,
                "binary-lowrank": self.bits_budget, "int8": None}[s]

    def describe(self) -> dict:
        """JSON-able provenance: every field, the nominal rate and the definition (DESIGN.md §3) it follows.

        Example: ``QuantConfig.from_name("w8a8-smooth").describe()["smooth_alpha"]`` → ``0.5``.
        """
        d = asdict(self)
        d["nominal_bits_per_weight"] = self.nominal_bits_per_weight()
        d["definition"] = "DESIGN.md §3 Low-bit formats" + (" + Smoothing" if self.smooth_alpha is not None
                                                             else "")
        return d


def _as_config(config: "QuantConfig | str") -> QuantConfig:
    if isinstance(config, QuantConfig):
        return config
    if isinstance(config, str):
        return QuantConfig.from_name(config)
    raise ConfigError(f"expected a QuantConfig or a scheme name, got {type(config).__name__}")


def codec_for(config: "QuantConfig | str"):
    """The lens codec object implementing ``config``'s weight format (DESIGN.md §3).

    Example: ``codec_for("int4").quantize(torch.randn(8, 256)).bits_per_weight()`` → ``4.1875``.
    """
    c = _as_config(config)
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
    """Quantize a weight ``[out, in]`` with lens's codec for ``config`` (DESIGN.md §3).

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
    """``"torchao"`` or ``"lens"``: which implementation ``config`` runs on here (DESIGN.md §3).

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


# ----------------------------------------------------------------------------------------------------
# Activations: per-token int8, smoothing, calibration
# ----------------------------------------------------------------------------------------------------


def fake_quant_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 fake quantization (DESIGN.md §3 activation quantization for W8A8):
    ``scale_t = max_j |x[t, j]| / 127``, ``x̂ = clamp(round(x / scale_t), −127, 127) · scale_t``, in fp32.

    Example: ``fake_quant_per_token_int8(torch.tensor([[1.0, 0.3]]))`` → ``[[1.0, 0.2992…]]`` (38/127).
    """
    xf = x.to(torch.float32)
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(xf / safe).clamp(-127, 127) * scale


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant factors per input channel (DESIGN.md §3 "Smoothing"):
    ``s_j = max|X_j|^α / max_o |W[o, j]|^(1−α)``, with both maxima and ``s`` floored at 1e-5 (as the
    SmoothQuant reference does) so that dead channels cannot produce 0 or ∞.

    Example: ``smoothing_factors(torch.tensor([16.0]), torch.tensor([[4.0]]))`` → ``tensor([2.])``.
    """
    w_amax = weight.detach().abs().amax(dim=0).to(torch.float32).clamp_min(1e-5)
    a = act_amax.to(device=w_amax.device, dtype=torch.float32).clamp_min(1e-5)  # stats live on CPU
    return (a.pow(alpha) / w_amax.pow(1.0 - alpha)).clamp_min(1e-5)


_TOKEN_MASK: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("lens_token_mask",
                                                                                 default=None)


@contextlib.contextmanager
def token_groups(mask: torch.Tensor | None):
    """Mark token group 1 (e.g. visual tokens of a VLM) for the forward passes inside the block.

    ``mask`` is boolean with the shape of the layer inputs without the feature dim (``[batch, seq]``).
    :func:`calibrate` records per-group activation maxima while it is set, and :class:`QuantLinear` with
    modality-aware smoothing smooths the marked tokens with group 1's factors and the others with group
    0's (text) before quantizing them (DESIGN.md §3 "Smoothing", MASQuant-style).

    Example::

        with token_groups(pixel_token_mask):
            model(**inputs)
    """
    tok = _TOKEN_MASK.set(None if mask is None else mask.to(torch.bool))
    try:
        yield
    finally:
        _TOKEN_MASK.reset(tok)


@dataclass
class ActStats:
    """Calibration statistics of one linear layer's input for SmoothQuant (DESIGN.md §3 "Smoothing"):
    per-channel ``max |X|`` over all tokens (``amax``) and, when token masks were given and matched the
    layer's input, per group (``group_amax[g]``, ``g = 0`` unmarked/text, ``1`` marked/visual) with token
    counts.

    Example: ``stats["encoder.layer.0.attention.self.query"].amax.shape`` → ``(384,)``.
    """

    amax: torch.Tensor
    tokens: int = 0
    group_amax: torch.Tensor | None = None
    group_tokens: tuple[int, int] = (0, 0)
    groups_matched: bool = True

    def to_dict(self) -> dict:
        """JSON-able summary (channel maxima as lists) (DESIGN.md §3).

        Example: ``json.dumps(stats[name].to_dict())``.
        """
        return {"amax": self.amax.tolist(), "tokens": self.tokens,
                "group_amax": None if self.group_amax is None else self.group_amax.tolist(),
                "group_tokens": list(self.group_tokens)}


def _call_model(model: nn.Module, batch):
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def calibrate(model: nn.Module, batches: Iterable, *, include: Callable[[str, nn.Module], bool] | None = None,
              token_masks: Iterable[torch.Tensor | None] | None = None, progress: bool = False
              ) -> dict[str, ActStats]:
    """Collect per-channel input maxima of the layers :func:`quantize_model` would replace, for
    SmoothQuant (DESIGN.md §3 "Smoothing").

    ``batches`` yields model inputs (a mapping → ``model(**batch)``, a tuple → ``model(*batch)``, a
    tensor → ``model(batch)``). ``token_masks``, parallel to ``batches``, marks group-1 tokens (visual
    tokens of a VLM) per batch; for layers whose input is not ``mask.shape + (in,)`` (e.g. a vision tower
    seeing patches) the grouping is dropped and ``groups_matched`` is False. Pad tokens count as
    activations too: pass masks or unpadded batches if that matters.

    Example::

        stats = calibrate(model, [tok(s, return_tensors="pt") for s in sentences])
        report = quantize_model(model, QuantConfig.from_name("w8a8-smooth"), calibration=stats)
    """
    targets = select_linear_modules(model, include)
    acc: dict[str, dict] = {}

    def make_hook(name: str, in_features: int):
        def hook(_mod, args):
            x = args[0].detach()
            flat = x.reshape(-1, in_features).abs().to(torch.float32)
            a = acc.setdefault(name, {"amax": torch.zeros(in_features), "tokens": 0,
                                      "g": torch.zeros(2, in_features), "gt": [0, 0], "matched": True})
            if flat.shape[0]:
                a["amax"] = torch.maximum(a["amax"], flat.amax(0).cpu())
            a["tokens"] += flat.shape[0]
            mask = _TOKEN_MASK.get()
            if mask is None:
                return
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                a["matched"] = False
                return
            m = mask.reshape(-1).to(flat.device)
            for g, sel in ((0, ~m), (1, m)):
                n = int(sel.sum())
                if n:
                    a["g"][g] = torch.maximum(a["g"][g], flat[sel].amax(0).cpu())
                    a["gt"][g] += n
        return hook

    handles = [mod.register_forward_pre_hook(make_hook(name, _in_out(mod)[0])) for name, mod in targets]
    masks = iter(token_masks) if token_masks is not None else None
    any_mask = False
    try:
        bar = _progress(list(batches), progress, "calibrate")
        with torch.no_grad():
            for batch in bar:
                mask = next(masks, None) if masks is not None else None
                any_mask = any_mask or mask is not None
                with token_groups(mask):
                    _call_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, a in acc.items():
        grouped = any_mask and a["matched"] and sum(a["gt"]) > 0
        out[name] = ActStats(a["amax"], a["tokens"], a["g"] if grouped else None,
                             tuple(a["gt"]) if grouped else (0, 0), a["matched"])
    return out


# ----------------------------------------------------------------------------------------------------
# QuantLinear
# ----------------------------------------------------------------------------------------------------


def _conv1d_type():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _in_out(module: nn.Module) -> tuple[int, int]:
    conv = _conv1d_type()
    if conv is not None and isinstance(module, conv):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores [in, out]
    return module.in_features, module.out_features


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, str]:
    conv = _conv1d_type()
    if conv is not None and isinstance(module, conv):
        return module.weight.detach().t(), "Conv1D"
    return module.weight.detach(), "Linear"


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
    "resident bytes" (DESIGN.md §4: must match the format's bits/weight within 5%).

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
    """A linear layer whose weight is kept only in packed low-bit form (DESIGN.md §3 "Low-bit formats").

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
    the ``out × in`` matrix. The ``torchao`` backend wraps an ``nn.Linear`` converted by torchao's
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
        when ``config.smooth_alpha`` is set (DESIGN.md §3 "Smoothing").

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
        packed = codec_for(cfg).quantize(w)
        return cls(in_f, out_f, config=cfg, packed=packed, bias=bias, smooth=smooth, group_smooth=group,
                   source=source)

    @classmethod
    def from_module(cls, module: nn.Module, config: "QuantConfig | str", *,
                    stats: ActStats | None = None) -> "QuantLinear":
        """Build from an ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (weight stored ``[in, out]``);
        the format is DESIGN.md §3's for ``config``.

        Example: ``QuantLinear.from_module(model.transformer.h[0].attn.c_attn, "nvfp4")``.
        """
        weight, source = _linear_weight(module)
        return cls.from_weight(weight, getattr(module, "bias", None), config, stats=stats, source=source)

    # -- storage ------------------------------------------------------------------------------------

    @property
    def packed(self) -> PackedWeight | None:
        """The stored :class:`PackedWeight` (DESIGN.md §3; views of this module's buffers), None on torchao.

        Example: ``dequantize(q.packed)`` is the weight the forward uses (with smoothing folded in).
        """
        if self.ao_linear is not None:
            return None
        return PackedWeight(self._scheme, (self.out_features, self.in_features),
                            {k: getattr(self, f"q_{k}") for k in self._packed_names}, dict(self._meta))

    @property
    def backend(self) -> str:
        """``"lens"`` or ``"torchao"`` (DESIGN.md §3).

        Example: ``QuantLinear.from_module(nn.Linear(4, 4), "nvfp4").backend`` → ``"lens"``.
        """
        return "torchao" if self.ao_linear is not None else "lens"

    def weight_bytes(self) -> int:
        """Stored bytes of the weight alone — codes, scales, zero points; no bias or smoothing (DESIGN.md §4).

        Example: ``QuantLinear.from_module(nn.Linear(128, 64), "mxfp4").weight_bytes()`` → ``4352``.
        """
        if self.ao_linear is not None:
            return _tensor_bytes(self.ao_linear.weight)
        return self.packed.nbytes()

    def resident_bytes(self) -> int:
        """Every byte this layer keeps: packed weight + full-precision bias + smoothing factors (DESIGN.md §4).

        Example: ``QuantLinear.from_module(nn.Linear(128, 64), "mxfp4").resident_bytes()`` → ``4352 + 256``.
        """
        return resident_bytes(self)

    def bits_per_weight(self) -> float:
        """Measured weight storage rate ``8 · weight_bytes / (out · in)`` (DESIGN.md §3, §4).

        Example: ``QuantLinear.from_module(nn.Linear(128, 64), "mxfp4").bits_per_weight()`` → ``4.25``.
        """
        return 8.0 * self.weight_bytes() / (self.in_features * self.out_features)

    def dequantized_weight(self, *, unsmoothed: bool = True) -> torch.Tensor:
        """The weight ``Ŵ`` (DESIGN.md §3) this layer represents, float32 ``[out, in]``, built on demand.

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
        """``F.linear(act(x), Ŵ_stored, bias)`` — see the class docstring for ``act`` (DESIGN.md §3).

        Example: ``QuantLinear.from_module(nn.Linear(8, 4), "int8")(torch.ones(3, 8)).shape`` → ``(3, 4)``.
        """
        if self.ao_linear is not None:
            return self.ao_linear(x)
        h = self._activation(x)
        bias = None if self.bias is None else self.bias.to(h.dtype)
        if self._scheme == "binary-lowrank":
            u, v, s1, s2 = BinaryLowRankCodec.factors(self.packed)
            y = ((h * s2.to(h.dtype)) @ v.to(h.dtype)) @ (u * s1.unsqueeze(1)).to(h.dtype).T
            return y if bias is None else y + bias
        return F.linear(h, dequantize(self.packed).to(h.dtype), bias)

    def extra_repr(self) -> str:
        extra = f", act_bits={self.config.act_bits}" if self.config.act_bits else ""
        extra += f", smooth_alpha={self.config.smooth_alpha}" if self.smooth is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self._scheme}, backend={self.backend}, bits_per_weight={self.bits_per_weight():.3f}"
                f"{extra}")


# ----------------------------------------------------------------------------------------------------
# Model conversion
# ----------------------------------------------------------------------------------------------------


def default_include(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The default layer filter of :func:`quantize_model` (which layers get DESIGN.md §3 low-bit weights):
    every linear layer except the LM head (the model's ``get_output_embeddings()``, or a module named
    ``lm_head``) and any layer whose weight is tied to an ``nn.Embedding`` (embeddings themselves are never
    linear layers, so they stay as they are).

    Example: ``default_include(gpt2)("lm_head", gpt2.lm_head)`` → ``False``.
    """
    skip: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            skip.add(id(out))
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def include(name: str, module: nn.Module) -> bool:
        if id(module) in skip or name.rsplit(".", 1)[-1] == "lm_head":
            return False
        return id(getattr(module, "weight", None)) not in emb

    return include


def select_linear_modules(model: nn.Module, include: Callable[[str, nn.Module], bool] | None = None
                          ) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``nn.Linear`` / GPT-2 ``Conv1D`` layers that pass ``include`` (default:
    :func:`default_include`) — the layers DESIGN.md §3 formats apply to. Already-quantized layers are
    never selected.

    Example: ``select_linear_modules(bert)[0][0]`` → ``'encoder.layer.0.attention.self.query'``.
    """
    include = include if include is not None else default_include(model)
    conv = _conv1d_type()
    kinds = (nn.Linear,) if conv is None else (nn.Linear, conv)
    return [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, kinds) and not isinstance(m, QuantLinear) and include(n, m)]


def _progress(items, enabled: bool, desc: str):
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm  # a dependency of lens-interp, imported lazily to keep kernels light
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_model(model: nn.Module, config: "QuantConfig | str", *,
                   include: Callable[[str, nn.Module], bool] | None = None, progress: bool = True,
                   calibration: Mapping[str, ActStats] | None = None) -> dict:
    """Replace the linear layers of a (Hugging Face) model in place by :class:`QuantLinear`
    (DESIGN.md §3 "Low-bit formats"); returns a JSON-able report.

    ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` are converted; by default the LM head and layers
    tied to embeddings are skipped (``include(name, module)`` overrides the choice). ``calibration`` (from
    :func:`calibrate`) is required for SmoothQuant configs.

    Report keys: ``config`` (``describe()``), ``backend``, ``replaced`` (names), ``n_replaced``,
    ``skipped`` (linear layers left in full precision), ``weights`` (count), ``bytes_before`` /
    ``bytes_after`` (resident bytes of the replaced layers, bias included), ``weight_bytes_before`` /
    ``weight_bytes_after``, ``bits_per_weight`` (``8 · weight_bytes_after / weights``),
    ``model_bytes_before`` / ``model_bytes_after`` (all parameters and buffers), ``per_module``.

    Example::

        report = quantize_model(model, "nvfp4")
        report["bits_per_weight"], report["model_bytes_after"] / report["model_bytes_before"]
    """
    cfg = _as_config(config)
    targets = select_linear_modules(model, include)
    all_linear = select_linear_modules(model, lambda n, m: True)
    if cfg.smooth_alpha is not None and calibration is None:
        raise ConfigError("smooth_alpha is set: pass calibration=calibrate(model, batches)")
    backend = resolve_backend(cfg)
    model_before = resident_bytes(model)
    per_module: dict[str, dict] = {}
    bytes_before = bytes_after = wbytes_before = wbytes_after = weights = 0
    with torch.no_grad():
        for name, mod in _progress(targets, progress, f"quantize {cfg.scheme}"):
            stats = calibration.get(name) if calibration is not None else None
            q = QuantLinear.from_module(mod, cfg, stats=stats)
            before = resident_bytes(mod)
            wb = _tensor_bytes(mod.weight)
            _set_submodule(model, name, q)
            n = q.in_features * q.out_features
            after = q.resident_bytes()
            bytes_before += before
            bytes_after += after
            wbytes_before += wb
            wbytes_after += q.weight_bytes()
            weights += n
            per_module[name] = {"shape": [q.out_features, q.in_features], "source": q.source,
                                "backend": q.backend, "bits_per_weight": q.bits_per_weight(),
                                "resident_bytes": after, "bytes_before": before}
    replaced = list(per_module)
    return {
        "config": cfg.describe(),
        "scheme": cfg.scheme,
        "backend": backend,
        "replaced": replaced,
        "n_replaced": len(replaced),
        "skipped": [n for n, _ in all_linear if n not in per_module],
        "weights": weights,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "weight_bytes_before": wbytes_before,
        "weight_bytes_after": wbytes_after,
        "bits_per_weight": 8.0 * wbytes_after / weights if weights else None,
        "model_bytes_before": model_before,
        "model_bytes_after": resident_bytes(model),
        "per_module": per_module,
    }
