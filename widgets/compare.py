"""``CompareView``: what changed between two runs (``lens.compare(run_a, run_b)``)."""

from __future__ import annotations

from typing import Any

import numpy as np
import traitlets

from lens.errors import ConfigError
from lens.run import Run

from ._base import LensWidget
from ._data import Index, check_index, check_run, f32, i32, pool_profile

__all__ = ["CompareView", "COMPARE_SERIES"]

_REQUIRED = ("labels", "sink_delta", "entropy_delta", "anisotropy_delta", "hidden_cosine", "hidden_rel_error",
             "kl", "top1_agreement", "run_a", "run_b")
# per-layer series, in the order of `layer_series`' first axis
COMPARE_SERIES = ("entropy_delta", "anisotropy_delta", "hidden_cosine", "hidden_rel_error")


def _optional_float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"CompareResult.{name} must be a number or None; got {value!r}") from exc
    return out if np.isfinite(out) else None


class CompareView(LensWidget):
    """The deltas between two runs of the same inputs: b − a (dense vs deployed, model A vs model B).

    Shows the layer × head grid of ``sink_delta`` (b − a mean sink score; diverging colours, symmetric
    around 0), per-layer curves of ``entropy_delta`` (normalized raw entropy), ``anisotropy_delta``,
    ``hidden_cosine`` and ``hidden_rel_error`` (the last two say "not kept" when all-NaN: trace both runs
    with ``keep_hidden="all"``), and the output agreement ``kl`` / ``top1_agreement`` (language models
    only). Selecting a head shows the mass each token receives in run a and in run b for that head
    (``run.mass_received``), sink tokens (> τ × uniform share) in the warning colour; long sequences are
    max-pooled per pixel, and a standalone export may pool the values into ≤ 2048 bins.

    ``result`` is what ``lens.compare(run_a, run_b)`` returns; any object with the attributes ``labels``,
    ``sink_delta`` [L, H], ``entropy_delta``, ``anisotropy_delta``, ``hidden_cosine``,
    ``hidden_rel_error`` [L+1], ``kl``, ``top1_agreement``, ``run_a`` and ``run_b`` works; its ``notes()``
    (a sparse run that kept every block, i.e. computed dense attention) are shown as warnings. Anything else
    raises ``ConfigError``. Traits Python can read back: ``seq``, ``layer``, ``head``, ``token``.

    Example::

        result = lens.compare(dense_run, deployed_run)
        lens.widgets.CompareView(result)
    """

    _component = "compare_view"
    _selection = ("seq", "layer", "head")
    _float_traits = frozenset({"sink_delta", "layer_series", "mass_a", "mass_b"})

    info = traitlets.Dict().tag(sync=True)
    seq = Index(0).tag(sync=True)
    layer = Index(0).tag(sync=True)
    head = Index(0).tag(sync=True)
    token = Index(-1).tag(sync=True)
    sink_delta = traitlets.Bytes(help="float32 [L, H]: b − a mean sink score").tag(sync=True)
    layer_series = traitlets.Bytes(help="float32 [4, L+1]: COMPARE_SERIES per residual layer").tag(sync=True)
    tokens_a = traitlets.List(traitlets.Unicode()).tag(sync=True)
    tokens_b = traitlets.List(traitlets.Unicode()).tag(sync=True)
    mass_a = traitlets.Bytes().tag(sync=True)
    mass_b = traitlets.Bytes().tag(sync=True)
    sinks_a = traitlets.Bytes(help="int32 sink-token positions in run a").tag(sync=True)
    sinks_b = traitlets.Bytes(help="int32 sink-token positions in run b").tag(sync=True)
    strip_meta = traitlets.Dict().tag(sync=True)

    def __init__(self, result, *, seq: int = 0, layer: int | None = None, head: int | None = None, tau: float = 5.0):
        missing = [name for name in _REQUIRED if not hasattr(result, name)]
        if missing:
            raise ConfigError(
                f"CompareView takes the result of lens.compare(run_a, run_b); a {type(result).__name__} has no "
                f"{', '.join(missing)}"
            )
        run_a = check_run(result.run_a, "CompareView (run_a)")
        run_b = check_run(result.run_b, "CompareView (run_b)")
        for run in (run_a, run_b):
            run.require("attn.key_mass", "attn.query_count", what="CompareView")
        sink_delta = np.asarray(result.sink_delta, dtype=np.float32)
        if sink_delta.ndim != 2:
            raise ConfigError(f"CompareResult.sink_delta must be [layers, heads]; got shape {sink_delta.shape}")
        series = []
        for name in COMPARE_SERIES:
            values = np.asarray(getattr(result, name), dtype=np.float32)
            if values.ndim != 1 or values.shape[0] != sink_delta.shape[0] + 1:
                raise ConfigError(
                    f"CompareResult.{name} must have one value per residual layer ({sink_delta.shape[0] + 1}); "
                    f"got shape {values.shape}"
                )
            series.append(values)
        labels = [str(x) for x in result.labels]
        if len(labels) != 2:
            raise ConfigError(f"CompareResult.labels must name the two runs; got {result.labels!r}")
        if not tau > 0:
            raise ConfigError(f"tau must be > 0; got {tau}")
        n_layers = min(run_a.n_layers, run_b.n_layers, sink_delta.shape[0])
        n_heads = min(run_a.n_heads, run_b.n_heads, sink_delta.shape[1])
        self._run_a, self._run_b, self._tau = run_a, run_b, float(tau)
        self._n_seq = min(run_a.n_sequences, run_b.n_sequences)
        self._shape = (n_layers, n_heads)
        seq = check_index(seq, self._n_seq, "seq", "sequences both runs have")
        if layer is None or head is None:
            magnitude = np.nan_to_num(np.abs(sink_delta[:n_layers, :n_heads]), nan=-1.0)
            layer, head = (int(i) for i in np.unravel_index(np.argmax(magnitude), magnitude.shape))
        hidden = np.stack(series[2:])
        info = {
            "labels": labels,
            "n_layers": int(sink_delta.shape[0]),
            "n_heads": int(sink_delta.shape[1]),
            "series": list(COMPARE_SERIES),
            "kl": _optional_float(result.kl, "kl"),
            "top1_agreement": _optional_float(result.top1_agreement, "top1_agreement"),
            "hidden_kept": bool(np.isfinite(hidden).any()),
            "n_sequences": self._n_seq,
            "lengths": [int(n) for n in run_a.lengths[: self._n_seq]],
            "texts": [t[:80] if isinstance(t, str) else None for t in run_a.texts[: self._n_seq]],
            "tau": self._tau,
            "delta_max": float(np.nanmax(np.abs(sink_delta))) if np.isfinite(sink_delta).any() else 0.0,
            # e.g. a sparse run that kept every block: it computed dense attention, and the view says so
            "notes": [str(n) for n in (result.notes() if callable(getattr(result, "notes", None)) else [])],
        }
        super().__init__(info=info, seq=seq, layer=int(layer), head=int(head), sink_delta=f32(sink_delta),
                         layer_series=f32(np.stack(series)))

    @traitlets.validate("seq", "layer", "head")
    def _check_selection_trait(self, proposal):
        limits = {"seq": self._n_seq, "layer": self._shape[0], "head": self._shape[1]}
        name = proposal["trait"].name
        return check_index(proposal["value"], limits[name], name, f"both runs have {limits[name]}")

    def _validate_selection(self, selection):
        check_index(selection["seq"], self._n_seq, "seq", "sequences both runs have")
        check_index(selection["layer"], self._shape[0], "layer", "layers both runs have")
        check_index(selection["head"], self._shape[1], "head", "heads both runs have")

    def _strip(self, run: Run, selection, hints) -> tuple[np.ndarray, np.ndarray, int]:
        mass = run.mass_received(selection["layer"], selection["head"], selection["seq"])
        # sink tokens: τ × the uniform share under the model's own mask (sliding windows, padding, …)
        sinks = np.nonzero(mass > self._tau * run.uniform_share(selection["layer"], selection["seq"]))[0]
        pooled, block = pool_profile(mass, hints.get("mass_bins"))
        return pooled, sinks, block

    def _derive(self, selection, hints):
        mass_a, sinks_a, block_a = self._strip(self._run_a, selection, hints)
        mass_b, sinks_b, block_b = self._strip(self._run_b, selection, hints)
        seq = selection["seq"]
        tokens_a = self._run_a.token_labels(seq)
        tokens_b = self._run_b.token_labels(seq)
        return {
            "tokens_a": tokens_a,
            "tokens_b": tokens_b,
            "mass_a": f32(mass_a),
            "mass_b": f32(mass_b),
            "sinks_a": i32(sinks_a),
            "sinks_b": i32(sinks_b),
            "strip_meta": {**selection, "block_a": block_a, "block_b": block_b,
                           "T_a": len(tokens_a), "T_b": len(tokens_b), "same_tokens": tokens_a == tokens_b},
        }

    def _export_selections(self):
        return [
            {"seq": s, "layer": l, "head": h}
            for s in range(self._n_seq)
            for l in range(self._shape[0])
            for h in range(self._shape[1])
        ]

    def _export_hints(self, level: int):
        plan = [{}, {"mass_bins": 2048}, {"mass_bins": 512}, {"mass_bins": 128}]
        return plan[level] if level < len(plan) else None

    def _default_title(self) -> str:
        labels = self.info.get("labels", ["a", "b"])
        return f"lens — {labels[1]} vs {labels[0]}"
