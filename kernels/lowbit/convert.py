"""Converting a whole model: choose its linear layers and replace them by ``QuantLinear``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError
from .config import QuantConfig, _as_config, resolve_backend
from .layers import (
    _progress,
    _set_submodule,
    select_linear_modules,
)
from .linear import QuantLinear, _tensor_bytes, resident_bytes
from .smoothing import ActStats

# ----------------------------------------------------------------------------------------------------
# Model conversion
# ----------------------------------------------------------------------------------------------------










def quantize_model(model: nn.Module, config: "QuantConfig | str", *,
                   include: Callable[[str, nn.Module], bool] | None = None, progress: bool | None = None,
                   calibration: Mapping[str, ActStats] | None = None) -> dict:
    """Replace the linear layers of a (Hugging Face) model in place by :class:`QuantLinear`
    (docs/definitions.md#low-bit-formats); returns a JSON-able report.

    ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` are converted; by default the LM head and layers
    tied to embeddings are skipped (``include(name, module)`` overrides the choice). ``calibration`` (from
    :func:`calibrate`) is required for SmoothQuant configs.

    Report keys: ``config`` (``describe()``), ``backend``, ``replaced`` (names), ``n_replaced``,
    ``skipped`` (linear layers left in full precision), ``weights`` (count), ``bytes_before`` /
    ``bytes_after`` (resident bytes of the replaced layers, bias included), ``weight_bytes_before`` /
    ``weight_bytes_after``, ``bits_per_weight`` (``8 · weight_bytes_after / weights``),
    ``model_bytes_before`` / ``model_bytes_after`` (all parameters and buffers), ``per_module`` (each with
    the ``scheme`` it is stored in), ``fallbacks`` (layers stored in llama-quantize's fallback type because
    a GGUF K-quant cannot hold their rows: name → stored scheme).

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
                                "scheme": q.packed.scheme if q.packed is not None else cfg.scheme,
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
        # Layers stored in another scheme than asked: llama-quantize's fallback for K-quant rows that are
        # not a multiple of 256 (lens.kernels.lowbit.gguf.LLAMA_QUANTIZE_FALLBACK).
        "fallbacks": {n: m["scheme"] for n, m in per_module.items() if m["scheme"] != cfg.scheme},
    }


