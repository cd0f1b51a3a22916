"""``SinkMap``: the layer × head sink-score heatmap, driving a strip of the mass each token receives."""

from __future__ import annotations

import numpy as np
import traitlets

from lens.analysis.sinks import SinkResult, sinks
from lens.errors import ConfigError
from lens.run import Run

from ._base import LensWidget
from ._data import Index, check_index, check_run, f32, i32, pool_profile, u8

__all__ = ["SinkMap"]

_METRICS = {"first": "sink score (mass on token 0)", "special": "mass on all special tokens"}


class SinkMap(LensWidget):
    """Layer × head heatmap of sink scores; selecting a head shows the mass every token receives from it.

    Built from a ``Run`` (``lens.sinks(run)`` is computed with its defaults) or a ``SinkResult`` (its ε and
    τ are used). Cells are coloured by the sink score s[ℓ,h] of the selected sequence (docs/definitions.md: mean over
    queries of A[ℓ,h,q,0]) or, with ``metric="special"``, by the mass on all special tokens (encoders:
    [CLS] + [SEP]); heads with s ≥ ε are outlined. The strip below shows m[ℓ,h,k] for every key k
    (``run.mass_received``), sink tokens (mass > τ × the uniform share) outlined. Up to 512 tokens the strip
    is a row of token chips; longer sequences are drawn as bars, max-pooled per pixel (a standalone export
    may also pool the values themselves, into ≤ 4096 bins). Grid, strip and every cell are keyboard
    focusable (arrows, Enter).

    Traits Python can read back: ``seq``, ``layer``, ``head``, ``token`` (last token clicked, −1: none)
    and ``metric``.

    Example::

        result = lens.sinks(run)
        sink_map = lens.widgets.SinkMap(result)         # or result.show(); opens on the strongest sink head
        # linked to an explorer: open on the explorer's head, so that the link moves neither view
        sink_map = lens.widgets.SinkMap(result, layer=explorer.layer, head=explorer.head)
        ipywidgets.link((explorer, "layer"), (sink_map, "layer"))
    """

    _component = "sink_map"
    _selection = ("seq", "metric", "layer", "head")
    _float_traits = frozenset({"scores", "mass"})

    info = traitlets.Dict().tag(sync=True)
    seq = Index(0).tag(sync=True)
    layer = Index(0).tag(sync=True)
    head = Index(0).tag(sync=True)
    token = Index(-1).tag(sync=True)
    metric = traitlets.Unicode("first", help="'first' (token 0) or 'special' (all special tokens)").tag(sync=True)
    scores = traitlets.Bytes(help="float32 [L, H] of the chosen metric for the selected sequence").tag(sync=True)
    outline = traitlets.Bytes(help="uint8 [L, H]: sink heads (score ≥ ε) in the selected sequence").tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode()).tag(sync=True)
    special = traitlets.Bytes().tag(sync=True)
    mass = traitlets.Bytes(help="float32: mass each token receives in the selected head").tag(sync=True)
    sink_keys = traitlets.Bytes(help="int32 positions of sink tokens").tag(sync=True)
    strip_meta = traitlets.Dict().tag(sync=True)

    def __init__(self, source: Run | SinkResult, *, seq: int = 0, layer: int | None = None, head: int | None = None,
                 metric: str = "first"):
        if isinstance(source, SinkResult):
            result = source
        elif isinstance(source, Run):
            result = sinks(check_run(source, "SinkMap"))
        else:
            raise ConfigError(
                f"SinkMap takes a lens.Run or the lens.sinks(run) result; got {type(source).__name__}. "
                "Example: lens.widgets.SinkMap(lens.sinks(run))"
            )
        run = check_run(result.run, "SinkMap")
        if metric not in _METRICS:
            raise ConfigError(f"metric must be one of {sorted(_METRICS)}; got {metric!r}")
        self._result = result
        self._run = run
        seq = check_index(seq, run.n_sequences, "seq", f"the run has {run.n_sequences} sequences")
        if layer is None or head is None:
            score = result.mean_sink_score
            if layer is not None:
                layer = check_index(layer, run.n_layers, "layer", "layers of the run")
                head = int(np.argmax(score[layer]))
            elif head is not None:
                head = check_index(head, run.n_heads, "head", "heads of the run")
                layer = int(np.argmax(score[:, head]))
            else:
                layer, head = (int(i) for i in np.unravel_index(np.argmax(score), score.shape))
        prov = run.provenance
        info = {
            "model": str(prov.get("model_id", "?")),
            "n_layers": run.n_layers,
            "n_heads": run.n_heads,
            "n_sequences": run.n_sequences,
            "lengths": [int(n) for n in run.lengths],
            "texts": [t[:80] if isinstance(t, str) else None for t in run.texts],
            "causal": run.causal,
            "epsilon": float(result.epsilon),
            "tau": float(result.tau),
            "metrics": _METRICS,
            "chip_limit": 512,
        }
        super().__init__(info=info, seq=seq, layer=layer, head=head, metric=metric)

    @traitlets.validate("seq", "layer", "head")
    def _check_selection_trait(self, proposal):
        limits = {"seq": self._run.n_sequences, "layer": self._run.n_layers, "head": self._run.n_heads}
        name = proposal["trait"].name
        return check_index(proposal["value"], limits[name], name, f"the run has {limits[name]}")

    @traitlets.validate("metric")
    def _check_metric(self, proposal):
        if proposal["value"] not in _METRICS:
            raise ConfigError(f"metric must be one of {sorted(_METRICS)}; got {proposal['value']!r}")
        return proposal["value"]

    def _validate_selection(self, selection):
        check_index(selection["seq"], self._run.n_sequences, "seq", "sequences of the run")
        check_index(selection["layer"], self._run.n_layers, "layer", "layers of the run")
        check_index(selection["head"], self._run.n_heads, "head", "heads of the run")
        if selection["metric"] not in _METRICS:
            raise ConfigError(f"metric must be one of {sorted(_METRICS)}; got {selection['metric']!r}")

    def _derive(self, selection, hints):
        run, result = self._run, self._result
        seq, layer, head = selection["seq"], selection["layer"], selection["head"]
        score = result.sink_score[seq] if selection["metric"] == "first" else result.special_mass[seq]
        mass = run.mass_received(layer, head, seq)
        length = mass.shape[0]
        sink_keys = result.sink_tokens(layer, head, seq)  # τ × the uniform share under the model's own mask
        pooled, block = pool_profile(mass, hints.get("mass_bins"))
        return {
            "scores": f32(score),
            "outline": u8(result.sink_head_mask(seq)),  # score ≥ ε and ≥ 2 × u[0] of this sequence
            "tokens": run.token_labels(seq),
            "special": u8(run.arrays["special"][run.span(seq)]),
            "mass": f32(pooled),
            "sink_keys": i32(sink_keys),
            "strip_meta": {"seq": seq, "layer": layer, "head": head, "T": length, "block": block,
                           "score": float(result.sink_score[seq, layer, head])},
        }

    def _export_selections(self):
        run = self._run
        return [
            {"seq": s, "metric": m, "layer": l, "head": h}
            for s in range(run.n_sequences)
            for m in _METRICS
            for l in range(run.n_layers)
            for h in range(run.n_heads)
        ]

    def _export_hints(self, level: int):
        plan = [{}, {"mass_bins": 4096}, {"mass_bins": 1024}, {"mass_bins": 256}]
        return plan[level] if level < len(plan) else None

    def _default_title(self) -> str:
        return f"lens — attention sinks of {self.info.get('model', '?')}"
