"""``ScanConfig``: the validated options of one ``lens.scan`` call, recorded in its manifest."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lens.errors import ConfigError

__all__ = ["ScanConfig", "parse_config"]


@dataclass(frozen=True)
class ScanConfig:
    """What a scan reduces and how it cuts the corpus (see :func:`lens.scan.scan` for each option)."""

    layers: tuple[int, ...]
    top_k: int = 20
    context: tuple[int, int] = (8, 4)
    samples: int = 3
    batch_size: int = 8
    max_len: int = 512
    stride: int = 384
    shard_size: int = 64
    epsilon: float = 0.3
    tau: float = 5.0
    massive_abs: float = 100.0
    massive_rel: float = 1000.0
    top_k_massive: int = 10
    moe_layers: tuple[int, ...] = ()
    prepend_bos: bool | None = None
    #: the interventions applied in every forward pass, as their ``describe()`` dicts (JSON, for Ray actors)
    interventions: tuple[dict, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def positional(self) -> bool:
        """Whether an intervention depends on positions: then every document must fit in one window."""
        from lens.capture.interventions import from_description, is_positional

        return any(is_positional(from_description(d)) for d in self.interventions)

    @property
    def width(self) -> int:
        return self.context[0] + 1 + self.context[1]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["context"] = list(self.context)
        out["moe_layers"] = list(self.moe_layers)
        out["interventions"] = [dict(d) for d in self.interventions]
        return out

    def identity(self) -> dict[str, Any]:
        """The options that change the result (a resumed scan must match them exactly)."""
        out = self.to_json()
        out.pop("extra", None)
        return out


def parse_config(lm, *, layers, top_k, context, samples, batch_size, max_len, stride, shard_size, epsilon, tau,
                 massive_abs, massive_rel, prepend_bos, interventions=()) -> ScanConfig:
    """Check every option against the model before any work; ``ConfigError`` names the fix."""
    from lens.capture.moe import moe_layers

    n_mlp = len(lm.mlp_out_modules)
    if layers is None or (isinstance(layers, str) and layers == "all"):
        chosen = tuple(range(n_mlp))
    else:
        if isinstance(layers, numbers.Integral) and not isinstance(layers, bool):  # int, numpy integers
            chosen = (int(layers),)
        elif isinstance(layers, (str, bytes, bool)) or not hasattr(layers, "__iter__"):
            # a string would be read digit by digit ("12" → layers 1 and 2)
            raise ConfigError(f"layers must be 'all', a layer number or a list of them, e.g. layers=[0, 3]; got {layers!r}")
        else:
            try:
                chosen = tuple(_layer_number(x) for x in layers)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"layers must be layer numbers, e.g. layers=[0, 3]; got {layers!r}") from exc
        for layer in chosen:
            if not 0 <= layer < lm.n_layers:
                raise ConfigError(f"layers names layer {layer}; this model has layers 0..{lm.n_layers - 1}")
            if layer >= n_mlp:
                raise ConfigError(f"layer {layer} has no dense MLP neurons ({lm.family.name}); leave layers= unset")
        chosen = tuple(sorted(set(chosen)))
    top_k, samples = _whole("top_k", top_k, 1), _whole("samples", samples, 0)
    batch_size, shard_size = _whole("batch_size", batch_size, 1), _whole("shard_size", shard_size, 1)
    max_len = None if max_len is None else _whole("max_len", max_len, 2)
    stride = None if stride is None else _whole("stride", stride, 1)
    epsilon, tau = _real("epsilon", epsilon), _real("tau", tau)
    massive_abs, massive_rel = _real("massive_abs", massive_abs), _real("massive_rel", massive_rel)
    if massive_abs < 0 or massive_rel < 0:
        raise ConfigError(f"massive_abs and massive_rel are thresholds ≥ 0 (Sun et al.: 100 and 1000); got "
                          f"{massive_abs} and {massive_rel}")
    if prepend_bos is not None:
        if not isinstance(prepend_bos, (bool, np.bool_)):
            raise ConfigError(f"prepend_bos must be None (the family's default), True or False; got {prepend_bos!r}")
        prepend_bos = bool(prepend_bos)
    if not 0.0 < float(epsilon) <= 1.0:  # the sink-score threshold, as lens.sinks checks it (a share of attention)
        raise ConfigError(f"epsilon (the sink-score threshold) must be in (0, 1]; got {epsilon}")
    if not float(tau) > 0:
        raise ConfigError(f"tau (a sink token's mass over the uniform share) must be > 0; got {tau}")
    if isinstance(context, (str, bytes)) or not hasattr(context, "__len__") or len(context) != 2:
        raise ConfigError(f"context must be (tokens before, tokens after), e.g. (8, 4); got {context!r}")
    before, after = _whole("context[0]", context[0], 0), _whole("context[1]", context[1], 0)
    if before < 0 or after < 0:
        raise ConfigError(f"context counts must be ≥ 0; got {context!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1; got {batch_size}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be ≥ 1 document; got {shard_size}")
    limit = min(int(lm.max_positions), 10**6)
    max_len = limit if max_len is None else int(max_len)
    if not 2 <= max_len <= limit:
        raise ConfigError(f"max_len must be in 2..{limit} (the model's positions); got {max_len}")
    stride = max(1, (3 * max_len) // 4) if stride is None else int(stride)
    if not 1 <= stride <= max_len:
        raise ConfigError(f"stride must be in 1..max_len={max_len}; got {stride}")
    edits = _parse_interventions(lm, interventions, max_len)
    return ScanConfig(
        layers=chosen, top_k=int(top_k), context=(before, after), samples=int(samples), batch_size=int(batch_size),
        max_len=max_len, stride=stride, shard_size=int(shard_size), epsilon=float(epsilon), tau=float(tau),
        massive_abs=float(massive_abs), massive_rel=float(massive_rel), moe_layers=tuple(moe_layers(lm)),
        prepend_bos=prepend_bos, interventions=edits,
    )


def _whole(name: str, value, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum``; ``ConfigError`` for floats, strings, booleans and None (no silent cuts)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be a whole number ≥ {minimum}; got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be ≥ {minimum}; got {value}")
    return int(value)


def _real(name: str, value) -> float:
    """``value`` as a finite float; ``ConfigError`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def _layer_number(x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"not a layer number: {x!r}")
    return int(x)


def _parse_interventions(lm, interventions, max_len: int) -> tuple[dict, ...]:
    """Check interventions against the model before any work; keep their JSON descriptions.

    A ``Patch`` needs a source run of the same inputs, which a streamed corpus has no counterpart for.
    """
    import numpy as np

    from lens.capture.interventions import (
        Ablate,
        Clamp,
        Interventions,
        Patch,
        ScaleAttention,
    )

    specs = list(interventions or ())
    for spec in specs:
        if isinstance(spec, Patch):
            raise ConfigError("a scan cannot patch activations: a Patch needs a source run of the same inputs. "
                              "Trace the documents you want to patch with lens.trace(..., interventions=[Patch(...)])")
        if not isinstance(spec, (Ablate, Clamp, ScaleAttention)):
            raise ConfigError(f"interventions takes lens.Ablate, lens.Clamp or lens.ScaleAttention objects; got {spec!r}")
    if specs:  # layers, heads, dims and values checked against the model on one window of the longest length
        Interventions(lm, specs, np.array([max_len]), [[0] * max_len])
    return tuple(spec.describe() for spec in specs)
