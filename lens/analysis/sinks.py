"""``lens.sinks``: attention sinks, massive activations and first-token norms (docs/definitions.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens._display import html_card, short_model
from lens.errors import ConfigError
from lens.run import Run, plain_uniform_share

__all__ = ["SinkResult", "sinks", "uniform_share"]


def uniform_share(length: int, causal: bool) -> np.ndarray:
    """The uniform share of a *plain* mask (no padding, no window): what each key would receive if every
    query attended uniformly to the keys it may see.

    Bidirectional: ``1/T`` for every key. Causal: key k is seen by queries q ≥ k, each spreading over
    q + 1 keys, so ``u[k] = (1/(T−k)) Σ_{q=k}^{T−1} 1/(q+1)``. Sink tokens are keys whose mass exceeds
    τ times their uniform share (docs/definitions.md#sink-tokens). A run's own share, measured from the model's
    actual mask (sliding windows, bidirectional blocks, padding), is ``run.uniform_share(layer, seq)``:
    use that for a traced run.

    Example: ``uniform_share(4, causal=False)`` → ``[0.25, 0.25, 0.25, 0.25]``.
    """
    return plain_uniform_share(length, causal)


@dataclass
class SinkResult:
    """Attention sinks and massive activations of a run. Arrays are per sequence; frames aggregate.

    ``sink_score[s, ℓ, h]``: mean over the queries that may see token 0 (Q_0) of A[ℓ,h,q,0] — the mass
    received by the first token (Gu et al. 2025; for causal models this is also the Queipo-de-Llano et al.
    sink score).
    ``uniform_first[s, ℓ]``: u[0], the share token 0 would get if every query attended uniformly to the keys
    the model's mask lets it see (1/T for an encoder; ≈ ln(T)/T causal; ≈ 0.52 for a window of 4).
    ``special_mass[s, ℓ, h]``: mass received by all special tokens together (encoders: [CLS] + [SEP]).
    ``is_sink_head[ℓ, h]``: sink score (averaged over sequences) ≥ ε *and* ≥ 2 × u[0] (averaged likewise) —
    a head whose queries see only a few keys is not a sink head by chance.
    ``sink_rate[ℓ]``: fraction of the layer's heads that are sink heads.
    ``first_norm[ℓ, s]`` / ``first_norm_ratio[ℓ, s]``: ‖X_ℓ[0]‖ and its ratio to the median norm of the
    other tokens, for residual layers 0..L.
    """

    run: Run = field(repr=False)
    epsilon: float
    tau: float
    massive_abs: float
    massive_rel: float
    sink_score: np.ndarray
    special_mass: np.ndarray
    sink_rate: np.ndarray
    uniform_first: np.ndarray
    is_sink_head: np.ndarray
    first_norm: np.ndarray
    first_norm_ratio: np.ndarray

    @property
    def mean_sink_score(self) -> np.ndarray:
        """[L, H] sink score averaged over sequences (each sequence weighs the same)."""
        return self.sink_score.mean(axis=0)

    @property
    def sink_heads(self) -> list[tuple[int, int]]:
        """(layer, head) pairs that are sink heads (``is_sink_head``)."""
        layers, heads = np.nonzero(self.is_sink_head)
        return list(zip(layers.tolist(), heads.tolist()))

    def sink_head_mask(self, seq: int | None = None) -> np.ndarray:
        """[L, H] bool: sink heads over the whole run (``seq=None``, same as ``is_sink_head``) or of one
        sequence (its own sink score ≥ ε and ≥ 2 × its own u[0]).

        Example: ``lens.sinks(run).sink_head_mask(seq=1).sum()`` — sink heads of sequence 1.
        """
        if seq is None:
            return self.is_sink_head
        score = self.sink_score[seq]
        return (score >= self.epsilon) & (score >= 2.0 * self.uniform_first[seq][:, None])

    def sink_tokens(self, layer: int, head: int, seq: int = 0) -> np.ndarray:
        """Positions of the sink tokens of one head in one sequence: keys whose mass received exceeds τ × their
        uniform share u[k] under the model's mask (docs/definitions.md#sink-tokens).

        Example: ``lens.sinks(run).sink_tokens(0, 3)`` → ``array([0])``.
        """
        run = self.run
        mass = run.mass_received(layer, head, seq)
        return np.nonzero(mass > self.tau * run.uniform_share(layer, seq))[0]

    # -- tidy tables ------------------------------------------------------------------------------
    def to_frame(self, kind: str = "heads"):
        """A pandas DataFrame. ``kind``:

        * ``"heads"`` — one row per (layer, head): sink score (mean, min, max over sequences), special-token
          mass, the uniform share of token 0, whether it is a sink head (score ≥ ε and ≥ 2× that share);
        * ``"layers"`` — sink rate, mean and max sink score, first-token norm ratio, largest |activation|
          and its ratio to the median;
        * ``"tokens"`` — one row per (sequence, layer, head, key): token label, continuation flag, mass
          received, column sum, |Q_k|, uniform share under the model's mask, ratio, sink-token flag (large:
          L·H·N rows);
        * ``"sink_tokens"`` — only the rows of ``"tokens"`` flagged as sink tokens;
        * ``"massive"`` — the top-|x| entries per (layer, sequence) with position, dimension, token,
          ratio to the median, and whether they pass both massive-activation thresholds;
        * ``"norms"`` — first-token norm, median norm of the others and their ratio per (layer, sequence);
        * ``"modality"`` — per (layer, modality: text / image / special): tokens, mean mass received / uniform
          share, fraction of (token, head) pairs that are sink tokens, mean residual norm
          (docs/definitions.md#vision-language-models).

        Example: ``lens.sinks(run).to_frame("layers")``.
        """
        import pandas as pd

        builders = {
            "heads": self._heads_frame,
            "layers": self._layers_frame,
            "tokens": lambda: self._tokens_frame(only_sinks=False),
            "sink_tokens": lambda: self._tokens_frame(only_sinks=True),
            "massive": self._massive_frame,
            "norms": self._norms_frame,
            "modality": self._modality_frame,
        }
        if kind not in builders:
            raise ConfigError(f"kind must be one of {sorted(builders)}; got {kind!r}")
        return pd.DataFrame(builders[kind]())

    def _heads_frame(self) -> dict[str, Any]:
        n_layers, n_heads = self.sink_score.shape[1:]
        layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
        score = self.sink_score
        return {
            "layer": layer.ravel(),
            "head": head.ravel(),
            "sink_score": score.mean(0).ravel(),
            "sink_score_min": score.min(0).ravel(),
            "sink_score_max": score.max(0).ravel(),
            "special_mass": self.special_mass.mean(0).ravel(),
            "uniform_share_first": np.repeat(self.uniform_first.mean(0), n_heads),
            "is_sink_head": self.is_sink_head.ravel(),
        }

    def _layers_frame(self) -> dict[str, Any]:
        run = self.run
        n_layers = self.sink_score.shape[1]
        top = np.abs(run.arrays["resid.top_value"][:, :, 0]) if run.has("resid.top_value") else None
        median = run.arrays["resid.median_abs"] if run.has("resid.median_abs") else None
        out: dict[str, Any] = {
            "layer": np.arange(n_layers),
            "sink_rate": self.sink_rate,
            "mean_sink_score": self.mean_sink_score.mean(1),
            "max_sink_score": self.mean_sink_score.max(1),
        }
        if top is not None:
            # residual layer ℓ is the input of block ℓ, the one whose attention is reported on this row
            out["first_norm_ratio"] = self.first_norm_ratio[:n_layers].mean(1)
            out["max_abs_activation"] = top[:n_layers].max(1)
            out["max_to_median"] = (top / np.maximum(median, 1e-30))[:n_layers].max(1)
        return out

    def _tokens_frame(self, only_sinks: bool) -> dict[str, Any]:
        run = self.run
        key_mass = run.arrays["attn.key_mass"]
        count = run.arrays["attn.query_count"]
        n_layers, n_heads, _ = key_mass.shape
        columns: dict[str, list] = {k: [] for k in (
            "sequence", "layer", "head", "position", "token", "continuation", "special", "mass", "column_sum",
            "query_count", "uniform_share", "ratio_to_uniform", "is_sink_token")}
        continuation = run.arrays.get("continuation", np.zeros(run.arrays["token_ids"].shape, dtype=bool))
        for seq in range(run.n_sequences):
            sl = run.span(seq)
            uniform = np.stack([run.uniform_share(layer, seq) for layer in range(n_layers)])  # [L, T]
            col = key_mass[:, :, sl]
            cnt = count[:, None, sl]
            mass = np.divide(col, cnt, out=np.zeros_like(col), where=cnt > 0)
            ratio = mass / np.maximum(uniform[:, None, :], 1e-30)
            flags = ratio > self.tau
            select = flags if only_sinks else np.ones_like(flags)
            layer, head, pos = np.nonzero(select)
            columns["sequence"].append(np.full(len(pos), seq))
            columns["layer"].append(layer)
            columns["head"].append(head)
            columns["position"].append(pos)
            toks = np.asarray(run.tokens[seq], dtype=object)
            columns["token"].append(toks[pos])
            columns["continuation"].append(continuation[sl][pos])
            columns["special"].append(run.arrays["special"][sl][pos])
            columns["mass"].append(mass[layer, head, pos])
            columns["column_sum"].append(col[layer, head, pos])
            columns["query_count"].append(np.broadcast_to(cnt, col.shape)[layer, head, pos])
            columns["uniform_share"].append(uniform[layer, pos])
            columns["ratio_to_uniform"].append(ratio[layer, head, pos])
            columns["is_sink_token"].append(flags[layer, head, pos])
        return {k: (np.concatenate(v) if v else np.array([])) for k, v in columns.items()}

    def _massive_frame(self) -> dict[str, Any]:
        run = self.run
        run.require("resid.top_value", "resid.median_abs", what="the massive-activation table")
        values = run.arrays["resid.top_value"]
        positions = run.arrays["resid.top_position"]
        dims = run.arrays["resid.top_dim"]
        median = run.arrays["resid.median_abs"]
        n_res, n_seq, k = values.shape
        layer, seq, rank = np.meshgrid(np.arange(n_res), np.arange(n_seq), np.arange(k), indexing="ij")
        med = median[layer, seq]
        magnitude = np.abs(values)
        ratio = magnitude / np.maximum(med, 1e-30)
        pos = positions.ravel()
        tokens = [run.tokens[s][p] if p >= 0 else "" for s, p in zip(seq.ravel(), pos)]
        return {
            "layer": layer.ravel(),
            "sequence": seq.ravel(),
            "rank": rank.ravel(),
            "value": values.ravel(),
            "abs_value": magnitude.ravel(),
            "position": pos,
            "dim": dims.ravel(),
            "token": tokens,
            "median_abs": med.ravel(),
            "ratio_to_median": ratio.ravel(),
            "is_massive": ((magnitude > self.massive_abs) & (ratio > self.massive_rel)).ravel(),
        }

    def _modality_frame(self) -> dict[str, Any]:
        from lens.analysis.vision import modality_table

        return modality_table(self.run, self.tau)

    def _norms_frame(self) -> dict[str, Any]:
        n_res, n_seq = self.first_norm.shape
        layer, seq = np.meshgrid(np.arange(n_res), np.arange(n_seq), indexing="ij")
        return {
            "layer": layer.ravel(),
            "sequence": seq.ravel(),
            "first_norm": self.first_norm.ravel(),
            "first_norm_ratio": self.first_norm_ratio.ravel(),
        }

    # -- figures ----------------------------------------------------------------------------------
    def figure(self, kind: str = "heads"):
        """An interactive plotly figure. ``kind``: ``"heads"`` (layer × head sink-score heatmap),
        ``"massive"`` (largest |activation| / median per layer, log scale) or ``"norms"`` (first-token norm
        ratio per layer).

        Example: ``lens.sinks(run).figure().write_html("sinks.html")``.
        """
        from lens.report import figures

        if kind == "heads":
            return figures.sink_heatmap(self)
        if kind == "massive":
            return figures.massive_curve(self)
        if kind == "norms":
            return figures.norm_curve(self)
        raise ConfigError(f"kind must be 'heads', 'massive' or 'norms'; got {kind!r}")

    def show(self, **kwargs):
        """The interactive sink map (``lens.widgets.SinkMap``; needs ``lens-interp[widgets]``): the layer × head
        sink scores, and the mass each token receives from the head you select.

        Example: ``lens.sinks(run).show()``.
        """
        from lens.widgets import SinkMap  # views sit above the core; imported only when asked

        return SinkMap(self, **kwargs)

    def __repr__(self) -> str:
        score = self.mean_sink_score
        best = np.unravel_index(np.argmax(score), score.shape)
        return (
            f"SinkResult({short_model(self.run.provenance.get('model_id'))}, {self.sink_score.shape[0]} sequences, "
            f"{score.shape[0]} layers × {score.shape[1]} heads: {len(self.sink_heads)} sink heads (s ≥ {self.epsilon:g}), "
            f"strongest L{best[0]}H{best[1]} {score[best]:.2f})"
        )

    def _repr_html_(self) -> str:
        frame = self.to_frame("layers")
        lines = self.summary().splitlines()
        return html_card("SinkResult", repr(self)[len("SinkResult("):-1], frame, lines=lines[1:2])

    def summary(self) -> str:
        """A few lines for a terminal: sink heads, sink rate per layer, the largest activation."""
        score = self.mean_sink_score
        lines = [f"sink heads (score ≥ {self.epsilon} and ≥ 2× uniform): {len(self.sink_heads)} of {score.size}"]
        best = np.unravel_index(np.argmax(score), score.shape)
        lines.append(f"strongest sink: layer {best[0]} head {best[1]} puts {score[best]:.2f} of its attention on token 0")
        lines.append("sink rate per layer: " + " ".join(f"{r:.2f}" for r in self.sink_rate))
        return "\n".join(lines)


def sinks(
    run: Run,
    *,
    epsilon: float = 0.3,
    tau: float = 5.0,
    massive_abs: float = 100.0,
    massive_rel: float = 1000.0,
) -> SinkResult:
    """Attention sinks, sink tokens, massive activations and first-token norms of a run (docs/definitions.md).

    Definitions (docs/definitions.md): mass received ``m[ℓ,h,k] = (1/|Q_k|) Σ_{q∈Q_k} A[ℓ,h,q,k]``
    (``run.mass_received``); uniform share ``u[k] = (1/|Q_k|) Σ_{q∈Q_k} 1/|K_q|`` under the model's actual
    mask (``run.uniform_share``: causal, padding, sliding window, bidirectional blocks); sink score
    ``s[ℓ,h]`` = mean over Q_0 of ``A[ℓ,h,q,0]`` (Gu et al., ICLR 2025); a sink head has ``s ≥ ε`` (ε = 0.3)
    and ``s ≥ 2·u[0]``; sink rate of a layer = fraction of its heads that are sink heads; sink tokens =
    keys whose mass exceeds τ× their uniform share (τ = 5), per head; massive activations (Sun et al., COLM 2024) = entries of X_ℓ with
    ``|x| > massive_abs`` and ``|x| > massive_rel × median(|X_ℓ|)`` — tiny models never reach 100, so
    the ratio to the median is always reported.

    Example::

        result = lens.sinks(run)
        result.to_frame("heads").query("is_sink_head")
        result.figure()
    """
    if not 0 < epsilon <= 1:
        raise ConfigError(f"epsilon must be in (0, 1]; got {epsilon}")
    if tau <= 0:
        raise ConfigError(f"tau must be > 0; got {tau}")
    run.require("attn.key_mass", "attn.query_count", what="lens.sinks")
    key_mass = run.arrays["attn.key_mass"]
    count = run.arrays["attn.query_count"]
    special = run.arrays["special"]
    n_layers, n_heads, _ = key_mass.shape
    n_seq = run.n_sequences
    sink_score = np.zeros((n_seq, n_layers, n_heads))
    special_mass = np.zeros((n_seq, n_layers, n_heads))
    uniform_first = np.zeros((n_seq, n_layers))
    for seq in range(n_seq):
        sl = run.span(seq)
        col = key_mass[:, :, sl].astype(np.float64)
        cnt = count[:, None, sl].astype(np.float64)
        mass = np.divide(col, cnt, out=np.zeros_like(col), where=cnt > 0)
        sink_score[seq] = mass[:, :, 0]
        special_mass[seq] = mass[:, :, special[sl]].sum(-1)
        uniform_first[seq] = [run.uniform_share(layer, seq)[0] for layer in range(n_layers)]
    mean_score = sink_score.mean(0)
    is_sink_head = (mean_score >= epsilon) & (mean_score >= 2.0 * uniform_first.mean(0)[:, None])
    sink_rate = is_sink_head.mean(1)

    if run.has("resid.norm"):
        norms = run.arrays["resid.norm"]
        first = np.zeros((norms.shape[0], n_seq))
        ratio = np.full((norms.shape[0], n_seq), np.nan)
        for seq in range(n_seq):
            sl = run.span(seq)
            first[:, seq] = norms[:, sl.start]
            if sl.stop - sl.start > 1:
                others = np.median(norms[:, sl.start + 1 : sl.stop], axis=1)
                ratio[:, seq] = first[:, seq] / np.maximum(others, 1e-30)
    else:
        first = ratio = np.full((n_layers + 1, n_seq), np.nan)
    return SinkResult(
        run=run,
        epsilon=epsilon,
        tau=tau,
        massive_abs=massive_abs,
        massive_rel=massive_rel,
        sink_score=sink_score,
        special_mass=special_mass,
        sink_rate=sink_rate,
        uniform_first=uniform_first,
        is_sink_head=is_sink_head,
        first_norm=first,
        first_norm_ratio=ratio,
    )
