"""``lens.neurons``: per-neuron statistics, top-k examples and MoE routing of a Run (or a Scan).

Definitions: docs/definitions.md, "Neuron activation" (the MLP hidden activation after the nonlinearity —
after act(gate)·up for gated MLPs — per layer and neuron: mean, std, max, fraction > 0, top-k tokens with
context) and "MoE routing" (router probabilities r[t, e] = softmax over experts; per layer and expert: load,
gate share, mean gate, top tokens by gate; per layer the routing entropy −Σ_e r log r averaged over tokens and
the coefficient of variation of the expert loads).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens.errors import ConfigError
from lens.run import Run

__all__ = ["NeuronResult", "ScanNeuronResult", "neurons", "routing_stats"]


def routing_stats(probs: np.ndarray, experts: np.ndarray, gates: np.ndarray) -> dict[str, np.ndarray]:
    """Routing statistics of one MoE layer from per-token router probabilities [N, E], selected experts [N, k]
    and gates [N, k]: ``load`` [E] (fraction of the N·k routing slots), ``tokens`` [E], ``gate_share`` [E]
    (fraction of the gate mass), ``mean_gate`` [E], ``mean_prob`` [E], ``entropy`` (mean over tokens of
    −Σ_e r log r) and ``load_cv`` (std / mean of ``load``).

    Example: ``routing_stats(run.arrays["moe.probs"][0], run.arrays["moe.experts"][0], run.arrays["moe.gates"][0])``.
    """
    n, e = probs.shape
    counts = np.bincount(experts.reshape(-1), minlength=e)[:e].astype(np.int64)
    gate_mass = np.bincount(experts.reshape(-1), weights=gates.reshape(-1).astype(np.float64), minlength=e)[:e]
    load = counts / max(counts.sum(), 1)
    p = probs.astype(np.float64)
    entropy = float(-(p * np.log(np.clip(p, 1e-300, None))).sum(1).mean()) if n else float("nan")
    return {
        "tokens": counts, "load": load, "gate_share": gate_mass / max(gate_mass.sum(), 1e-30),
        "mean_gate": gate_mass / np.maximum(counts, 1), "mean_prob": p.mean(0) if n else np.zeros(e),
        "entropy": entropy, "load_cv": float(load.std() / max(load.mean(), 1e-30)),
    }


@dataclass
class NeuronResult:
    """Per-neuron statistics (``frame``), top-k examples (``examples``) and MoE routing (``routing``).

    ``frame``: one row per (layer, neuron) — count, mean, std, max, fraction_positive. ``examples``: one row per
    (layer, neuron, rank) — value, sequence, position, token, context. ``routing``: one row per (layer, expert) —
    tokens, load, gate_share, mean_gate, mean_prob, routing_entropy, load_cv (empty for dense models).
    ``top_tokens``: per (layer, expert) the tokens with the highest gates.
    """

    source: Any = field(repr=False)
    frame: Any = field(repr=False)
    examples: Any = field(repr=False)
    routing: Any = field(repr=False)
    top_tokens: Any = field(repr=False)
    by_modality: Any = field(default=None, repr=False)

    def to_frame(self, kind: str = "neurons"):
        """``"neurons"``, ``"examples"``, ``"routing"``, ``"top_tokens"``, or ``"modality"`` (runs with images: one
        row per (layer, neuron, modality text/image) with the same columns as ``"neurons"``, over that modality's
        tokens only).

        Example: ``lens.neurons(run).to_frame().nlargest(10, "max")``.
        """
        frames = {"neurons": self.frame, "examples": self.examples, "routing": self.routing, "top_tokens": self.top_tokens}
        if self.by_modality is not None:
            frames["modality"] = self.by_modality
        elif kind == "modality":
            raise ConfigError("the modality split needs a run with image tokens, traced with the MLP probe: "
                              'lens.trace(vlm, [{"image": ..., "text": ...}], capture=("mlp",))')
        if kind not in frames:
            raise ConfigError(f"kind must be one of {sorted(frames)}; got {kind!r}")
        return frames[kind].copy()

    def neuron(self, layer: int, neuron: int):
        """The top-k examples of one neuron, by rank. Raises ``ConfigError`` for a layer or neuron the run does
        not have (or a model without dense MLP neurons)."""
        f = self.frame
        if not len(f):
            raise ConfigError("this run has no dense MLP neurons (a pure mixture-of-experts model); look at "
                              'to_frame("routing") and to_frame("top_tokens")')
        layers, width = sorted(int(x) for x in f["layer"].unique()), int(f["neuron"].max()) + 1
        ok = all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (layer, neuron))
        if not ok or int(layer) not in layers or not 0 <= int(neuron) < width:
            raise ConfigError(f"no neuron ({layer!r}, {neuron!r}) in this run: layers {layers}, neurons 0..{width - 1}")
        e = self.examples
        return e[(e["layer"] == layer) & (e["neuron"] == neuron)].sort_values("rank").reset_index(drop=True)

    def figure(self):
        """Plotly scatter: max vs fraction > 0 of every neuron, coloured by layer (hover: its top token)."""
        from lens.report.neuron_figures import neurons_figure

        return neurons_figure(self)

    def show(self, **kwargs):
        """A ``TokenView`` of the strongest neuron's activation over the run (needs ``lens-interp[widgets]``)."""
        from lens.widgets import TokenView

        if not len(self.frame):
            raise ConfigError("this run has no dense MLP neurons to show (a pure mixture-of-experts model); look at "
                              'to_frame("routing") and to_frame("top_tokens")')
        best = self.frame.loc[self.frame["max"].idxmax()]
        if not self.source.has("mlp.tracked"):
            raise ConfigError(
                f"to show a neuron's activation per token, trace with track_neurons=[({int(best.layer)}, "
                f"{int(best.neuron)})] and call lens.widgets.TokenView.neuron(run, layer, neuron)"
            )
        return TokenView.neuron(self.source, int(best.layer), int(best.neuron), **kwargs)

    def summary(self) -> str:
        f = self.frame
        if not len(f):
            text = "no dense MLP neurons"
        else:
            best = f.loc[f["max"].idxmax()]
            text = (f"{f['layer'].nunique()} layers × {f['neuron'].nunique()} neurons; strongest L{int(best.layer)}"
                    f"/N{int(best.neuron)} max {best['max']:.3g}; mean fraction > 0 {f['fraction_positive'].mean():.3f}")
        if len(self.routing):
            r = self.routing.groupby("layer").first()
            text += f"; MoE layers {list(r.index)}, routing entropy {r['routing_entropy'].mean():.3f}, load CV {r['load_cv'].mean():.3f}"
        return text

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.summary()})"

    def _repr_html_(self) -> str:
        top = self.frame.nlargest(8, "max") if len(self.frame) else self.frame
        return (f"<div><b>lens.neurons</b> — {html.escape(self.summary())}"
                f"{top.to_html(index=False, float_format=lambda v: f'{v:.4g}')}</div>")


class ScanNeuronResult(NeuronResult):
    """``lens.neurons(scan)``: the tables of a ``NeuronResult`` over a whole corpus, read from the scan.

    ``frame`` is ``scan.to_frame()`` and ``routing`` ``scan.routing_frame()`` (in memory). ``examples`` (one row
    per (layer, neuron, rank), the columns of ``Scan.examples``: value, doc, position, token_id, token,
    context_ids, context_tokens, context_acts, mass, is_sink, massive_ratio) and ``top_tokens`` (one row per
    (layer, expert, rank), the columns of ``Scan.top_tokens``) are read from the scan's Parquet files the first
    time they are asked for; :meth:`neuron` reads only that neuron's rows. ``to_frame("experts")`` gives the MoE
    expert neurons (``scan.expert_neurons_frame()``).

    Example::

        result = lens.neurons(lens.Scan.load("scans/minilm"))
        result.neuron(3, 42)                    # == scan.examples(3, 42)
        result.to_frame("examples").query("token == ' Paris'")
        result.show()                           # the NeuronExplorer, opened on the strongest neuron
    """

    def __init__(self, scan):
        super().__init__(scan, scan.to_frame(), None, scan.routing_frame(), None)

    def _table(self, name: str, key: str):
        import pandas as pd

        path = self.source._parquet(f"{name}.parquet")
        if path is None:
            return pd.DataFrame()
        import pyarrow.parquet as pq

        frame = pq.read_table(path).to_pandas()
        return frame.sort_values(["layer", key, "rank"], kind="stable").reset_index(drop=True)

    @property
    def examples(self):
        if self._examples is None:
            self._examples = self._table("examples", "neuron")
        return self._examples

    @examples.setter
    def examples(self, value) -> None:
        self._examples = value

    @property
    def top_tokens(self):
        if self._top_tokens is None:
            self._top_tokens = self._table("routing", "expert")
        return self._top_tokens

    @top_tokens.setter
    def top_tokens(self, value) -> None:
        self._top_tokens = value

    def to_frame(self, kind: str = "neurons"):
        """``"neurons"``, ``"examples"``, ``"routing"``, ``"top_tokens"`` or ``"experts"`` (MoE expert neurons:
        one row per (layer, expert, neuron) over the tokens routed to that expert). Raises ``ConfigError`` for
        another ``kind`` (a scan has no ``"modality"`` split: trace a run for that)."""
        if kind == "experts":
            return self.source.expert_neurons_frame()
        if kind == "modality":
            raise ConfigError('a scan has no split by modality; trace a run instead: lens.neurons(lens.trace(vlm, '
                              '[{"image": ..., "text": ...}], capture=("mlp",))).to_frame("modality")')
        if kind not in ("neurons", "examples", "routing", "top_tokens"):
            raise ConfigError(f"kind must be one of ['examples', 'experts', 'neurons', 'routing', 'top_tokens']; got {kind!r}")
        return super().to_frame(kind)

    def neuron(self, layer: int, neuron: int):
        """The top-k examples of one neuron over the corpus (``scan.examples(layer, neuron)``: reads only its rows).

        Raises ``ConfigError`` for a layer that was not scanned, a neuron that does not exist, or a scan without
        dense MLP neurons (a pure-MoE model: see ``to_frame("experts")`` and ``scan.top_tokens(layer, expert)``).
        """
        if not self.source.n_neurons:
            raise ConfigError("this scan has no dense MLP neurons (a pure mixture-of-experts model); its expert neurons "
                              'are in to_frame("experts") and the top tokens per expert in scan.top_tokens(layer, expert)')
        return self.source.examples(layer, neuron)

    def figure(self):
        """Plotly scatter: max vs fraction > 0 of every neuron, coloured by layer (hover: its top token; reads only
        the rank-0 examples)."""
        from types import SimpleNamespace

        from lens.report.neuron_figures import neurons_figure

        top = self._examples
        if top is None:
            path = self.source._parquet("examples.parquet")
            if path is None:
                top = self.examples
            else:
                import pyarrow.parquet as pq

                top = pq.read_table(path, columns=["layer", "neuron", "rank", "token"],
                                    filters=[("rank", "=", 0)]).to_pandas()
        return neurons_figure(SimpleNamespace(frame=self.frame, examples=top))

    def show(self, **kwargs):
        """The ``NeuronExplorer`` widget over the scan (needs ``lens-interp[widgets]``), opened on the neuron with
        the highest max — of ``layer=`` when only it is given, the layer where ``neuron=`` peaks when only that is
        given, or exactly ``layer=`` and ``neuron=``; other keywords go to ``NeuronExplorer``.

        Raises ``ConfigError`` for a scan without dense MLP neurons (a pure-MoE model: use
        ``to_frame("experts")`` and ``to_frame("routing")``).
        """
        if not self.source.n_neurons:
            raise ConfigError("this scan has no dense MLP neurons to show (a pure mixture-of-experts model); look at "
                              'lens.neurons(scan).to_frame("experts") and to_frame("routing") instead')
        from lens.widgets import NeuronExplorer

        frame = self.frame
        if "layer" in kwargs and "neuron" not in kwargs:  # the strongest neuron of that layer
            frame = frame[frame["layer"] == kwargs["layer"]]
        elif "neuron" in kwargs and "layer" not in kwargs:  # that neuron in the layer where it peaks
            frame = frame[frame["neuron"] == kwargs["neuron"]]
        if "layer" not in kwargs or "neuron" not in kwargs:
            if not len(frame):
                raise ConfigError(f"no scanned neuron matches {kwargs}; layers {self.source.layers}, neurons "
                                  f"0..{self.source.n_neurons - 1}")
            best = frame.loc[frame["max"].idxmax()]
            kwargs.update(layer=int(best.layer), neuron=int(best.neuron))
        return NeuronExplorer(self.source, **kwargs)


def _context(run: Run, flat: int, before: int, after: int) -> tuple[int, int, str, list[str]]:
    seq = int(np.searchsorted(run.offsets, flat, side="right") - 1)
    pos = flat - int(run.offsets[seq])
    toks = run.tokens[seq]
    return seq, pos, toks[pos], toks[max(0, pos - before) : pos + after + 1]


def _neuron_frame(s, sumsq, mx, positive, count):
    """One row per (layer, neuron): count, mean, std (population), max, fraction_positive from streaming sums;
    ``count`` per layer. A layer with no tokens gives NaN statistics."""
    import pandas as pd

    L, M = s.shape
    n = np.asarray(count, dtype=np.float64)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, s / np.maximum(n, 1), np.nan)
        std = np.sqrt(np.maximum(sumsq / np.maximum(n, 1) - mean**2, 0)) if sumsq is not None else np.full_like(mean, np.nan)
        positive = np.where(n > 0, positive / np.maximum(n, 1), np.nan)
    return pd.DataFrame({
        "layer": np.repeat(np.arange(L), M), "neuron": np.tile(np.arange(M), L),
        "count": np.repeat(np.asarray(count, dtype=np.int64), M), "mean": mean.reshape(-1), "std": std.reshape(-1),
        "max": np.where(np.isfinite(mx), mx, np.nan).reshape(-1), "fraction_positive": positive.reshape(-1),
    })


def neurons(source, *, context: tuple[int, int] = (8, 4)) -> NeuronResult:
    """Neuron statistics of a ``Run`` (``lens.trace`` with ``"mlp"`` captured) or of a ``Scan``.

    For a Run: per layer and neuron the mean, std (population), max and fraction > 0 over every real token,
    and the top-k tokens (``top_k_neurons`` of the trace) with ``context`` = (before, after) tokens around
    them; for MoE models also the routing per (layer, expert) and the top tokens by gate. For a Scan: the same
    tables over the whole corpus (a :class:`ScanNeuronResult`: ``scan.to_frame()``, ``scan.routing_frame()``, the
    scan's top-k examples and top tokens by gate read from its Parquet files on demand, and its expert neurons).

    Raises ``RunFormatError`` when the run has no MLP statistics (trace with capture including ``"mlp"``).

    Example::

        run = lens.trace(lens.load(), ["The cat sat.", "Paris is in France."])
        result = lens.neurons(run)
        result.to_frame().nlargest(5, "max")
        result.neuron(3, 42)
    """
    import pandas as pd

    if getattr(source, "__lens_scan__", False):
        return ScanNeuronResult(source)
    if not isinstance(source, Run):
        raise ConfigError(f"lens.neurons takes a Run (lens.trace(..., capture=(..., 'mlp'))) or a Scan (lens.scan(...), "
                          f"lens.Scan.load(folder)); got {type(source).__name__}")
    if (isinstance(context, (str, bytes)) or not hasattr(context, "__len__") or len(context) != 2
            or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in context)):
        raise ConfigError(f"context must be (tokens before, tokens after) ≥ 0, e.g. (8, 4); got {context!r}")
    run: Run = source
    moe = run.has("moe.probs")
    if not moe:
        run.require("mlp.sum", "mlp.max", "mlp.positive", "mlp.count", what="lens.neurons")
    rows: list[dict] = []
    frame = pd.DataFrame(columns=["layer", "neuron", "count", "mean", "std", "max", "fraction_positive"])
    by_modality = None  # runs with images: the same per (layer, neuron) over text and over image tokens
    examples = pd.DataFrame(columns=["layer", "neuron", "rank", "value", "sequence", "position", "token", "context"])
    if run.has("mlp.sum"):
        a = run.arrays
        frame = _neuron_frame(a["mlp.sum"], a.get("mlp.sumsq"), a["mlp.max"], a["mlp.positive"],
                              np.full(a["mlp.sum"].shape[0], a["mlp.count"][0]))
        if run.has("mlp.sum.image"):
            parts = []
            for name in ("text", "image"):
                part = _neuron_frame(*(a[f"mlp.{key}.{name}"] for key in ("sum", "sumsq", "max", "positive", "count")))
                part.insert(2, "modality", name)
                parts.append(part)
            by_modality = pd.concat(parts, ignore_index=True)
        values, flat = run.arrays["mlp.top_value"], run.arrays["mlp.top_token"]
        layer, neuron, rank = np.nonzero(flat >= 0)
        for l, m, r in zip(layer.tolist(), neuron.tolist(), rank.tolist()):
            seq, pos, tok, ctx = _context(run, int(flat[l, m, r]), *context)
            rows.append({"layer": l, "neuron": m, "rank": r, "value": float(values[l, m, r]), "sequence": seq,
                         "position": pos, "token": tok, "context": ctx})
        if rows:
            examples = pd.DataFrame(rows)
    routing = pd.DataFrame()
    top_tokens = pd.DataFrame()
    if moe:
        probs, experts, gates = run.arrays["moe.probs"], run.arrays["moe.experts"], run.arrays["moe.gates"]
        layers = run.arrays["moe.layers"]
        parts, tops = [], []
        for i, layer in enumerate(layers.tolist()):
            st = routing_stats(probs[i], experts[i], gates[i])
            E = probs.shape[2]
            parts.append(pd.DataFrame({
                "layer": layer, "expert": np.arange(E), "tokens": st["tokens"], "load": st["load"],
                "gate_share": st["gate_share"], "mean_gate": st["mean_gate"], "mean_prob": st["mean_prob"],
                "routing_entropy": st["entropy"], "load_cv": st["load_cv"],
            }))
            for e in range(E):
                where = np.nonzero(experts[i] == e)
                order = np.argsort(-gates[i][where], kind="stable")[:5]
                for r, j in enumerate(order):
                    flat_t = int(where[0][j])
                    seq, pos, tok, _ = _context(run, flat_t, 0, 0)
                    tops.append({"layer": layer, "expert": e, "rank": r, "gate": float(gates[i][where][j]),
                                 "sequence": seq, "position": pos, "token": tok})
        routing = pd.concat(parts, ignore_index=True)
        top_tokens = pd.DataFrame(tops)
    return NeuronResult(run, frame, examples, routing, top_tokens, by_modality)
