"""``lens.compare``: the same inputs under two configurations (dense vs deployed, model A vs model B)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens.analysis.sinks import sinks
from lens.analysis.valley import valley
from lens.errors import ConfigError, LensError
from lens.run import Run

__all__ = ["CompareResult", "compare"]


def _label(run: Run) -> str:
    prov = run.provenance
    attn = prov.get("attention") or {}
    kind = attn.get("kind", "dense")
    if kind != "dense":
        params = attn.get("mode") or attn.get("preset") or ""
        kind = f"{kind} {params}".strip()
    quant = (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None
    return kind + (f" + {quant}" if quant else "")


@dataclass
class CompareResult:
    """Per layer/head and per layer differences between two runs of the same inputs (b − a).

    ``sink_delta [L, H]``: sink-score change. ``entropy_delta``, ``normalized_entropy_delta``,
    ``anisotropy_delta [L+1]``: valley quantities' change. ``hidden_cosine [L+1]``: mean over tokens of
    cos(X_a[t], X_b[t]); ``hidden_rel_error [L+1]``: ‖X_b − X_a‖_F / ‖X_a‖_F (NaN for layers whose hidden
    states either run did not keep). ``kl``: mean over tokens of KL(p_a ‖ p_b) of the next-token
    distributions and ``top1_agreement`` the fraction of tokens whose argmax agrees (language models traced
    with ``capture`` including ``"logits"``; None otherwise). ``density_b [L, H]``: the fraction of
    allowed blocks run b's sparse kernel computed (NaN for dense).
    """

    run_a: Run = field(repr=False)
    run_b: Run = field(repr=False)
    labels: tuple[str, str]
    sink_a: np.ndarray
    sink_b: np.ndarray
    sink_delta: np.ndarray
    entropy_a: np.ndarray
    entropy_b: np.ndarray
    entropy_delta: np.ndarray
    normalized_entropy_delta: np.ndarray
    anisotropy_a: np.ndarray
    anisotropy_b: np.ndarray
    anisotropy_delta: np.ndarray
    hidden_cosine: np.ndarray
    hidden_rel_error: np.ndarray
    kl: float | None
    top1_agreement: float | None
    kl_per_token: np.ndarray | None
    density_b: np.ndarray
    valley_layers: tuple[int, int]

    def to_frame(self, kind: str = "layers"):
        """``"layers"`` (one row per residual layer), ``"heads"`` (per layer and head) or ``"tokens"``
        (per-token KL, language models only).

        Example: ``lens.compare(dense, sparse).to_frame("heads").sort_values("sink_delta")``.
        """
        import pandas as pd

        if kind == "layers":
            n_res = len(self.entropy_a)
            density = np.full(n_res, np.nan)
            if np.isfinite(self.density_b).any():
                density[: self.density_b.shape[0]] = np.nanmean(self.density_b, axis=1)
            return pd.DataFrame(
                {
                    "layer": np.arange(n_res),
                    f"entropy_{self.labels[0]}": self.entropy_a,
                    f"entropy_{self.labels[1]}": self.entropy_b,
                    "entropy_delta": self.entropy_delta,
                    "normalized_entropy_delta": self.normalized_entropy_delta,
                    f"anisotropy_{self.labels[0]}": self.anisotropy_a,
                    f"anisotropy_{self.labels[1]}": self.anisotropy_b,
                    "anisotropy_delta": self.anisotropy_delta,
                    "hidden_cosine": self.hidden_cosine,
                    "hidden_rel_error": self.hidden_rel_error,
                    "block_density": density,
                }
            )
        if kind == "heads":
            n_layers, n_heads = self.sink_delta.shape
            layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
            return pd.DataFrame(
                {
                    "layer": layer.ravel(),
                    "head": head.ravel(),
                    f"sink_{self.labels[0]}": self.sink_a.ravel(),
                    f"sink_{self.labels[1]}": self.sink_b.ravel(),
                    "sink_delta": self.sink_delta.ravel(),
                    "block_density": self.density_b.ravel(),
                }
            )
        if kind == "tokens":
            if self.kl_per_token is None:
                raise ConfigError("per-token KL needs both runs traced with capture=(..., 'logits') on a language model")
            run = self.run_a
            seq = np.repeat(np.arange(run.n_sequences), run.lengths)
            pos = np.concatenate([np.arange(n) for n in run.lengths])
            return pd.DataFrame(
                {"sequence": seq, "position": pos, "token": [t for toks in run.tokens for t in toks], "kl": self.kl_per_token}
            )
        raise ConfigError(f"kind must be 'layers', 'heads' or 'tokens'; got {kind!r}")

    def figure(self):
        """Sink-score change per head, entropy and anisotropy of both runs, and hidden-state agreement.

        Example: ``lens.compare(dense, nvfp4).figure().write_html("compare.html")``.
        """
        from lens.report import figures

        return figures.compare_figure(self)

    def summary(self) -> str:
        """A few lines for a terminal."""
        a, b = self.labels
        worst = np.unravel_index(np.nanargmax(np.abs(self.sink_delta)), self.sink_delta.shape)
        lines = [
            f"{b} vs {a}: largest sink-score change {self.sink_delta[worst]:+.3f} (layer {worst[0]}, head {worst[1]}); "
            f"mean |Δ sink| {np.nanmean(np.abs(self.sink_delta)):.4f}",
            f"entropy change per layer (normalized raw): " + " ".join(f"{d:+.3f}" for d in self.entropy_delta),
            f"valley layer {self.valley_layers[0]} → {self.valley_layers[1]}",
        ]
        if np.isfinite(self.hidden_rel_error).any():
            lines.append(
                f"hidden states: cosine ≥ {np.nanmin(self.hidden_cosine):.4f}, relative error ≤ "
                f"{np.nanmax(self.hidden_rel_error):.4f} over layers"
            )
        if self.kl is not None:
            lines.append(f"next token: KL {self.kl:.4f} nats, top-1 agreement {self.top1_agreement:.3f}")
        if np.isfinite(self.density_b).any():
            lines.append(f"{b} computed {np.nanmean(self.density_b):.1%} of the allowed attention blocks")
        return "\n".join(lines)


def _hidden_agreement(run_a: Run, run_b: Run) -> tuple[np.ndarray, np.ndarray]:
    n_res = int(run_a.meta["n_layers"]) + 1
    cosine = np.full(n_res, np.nan)
    rel = np.full(n_res, np.nan)
    for layer in range(n_res):
        key = f"resid.hidden.{layer}"
        if key in run_a.arrays and key in run_b.arrays:
            xa = run_a.arrays[key].astype(np.float64)
            xb = run_b.arrays[key].astype(np.float64)
            na = np.linalg.norm(xa, axis=1)
            nb = np.linalg.norm(xb, axis=1)
            cos = (xa * xb).sum(1) / np.maximum(na * nb, 1e-30)
            cosine[layer] = float(cos.mean())
            rel[layer] = float(np.linalg.norm(xb - xa) / max(np.linalg.norm(xa), 1e-30))
    return cosine, rel


def compare(run_a: Run, run_b: Run, *, epsilon: float = 0.3) -> CompareResult:
    """Compare two runs of the *same inputs* under two configurations (b − a everywhere).

    Reports per layer/head sink-score deltas (DESIGN §3 sink score), per-layer entropy, normalized
    entropy and anisotropy deltas (``lens.valley``), hidden-state cosine and relative error per layer
    (for layers traced with ``keep_hidden``), the achieved block density of a sparse run, and for
    language models traced with ``capture`` including ``"logits"``: mean next-token KL(a ‖ b) and top-1
    agreement.

    Example::

        dense = lens.trace(lens.load(), texts, keep_hidden="all")
        sparse = lens.trace(lens.load(attention=lens.Sparse(topp=0.9)), texts, keep_hidden="all")
        lens.compare(dense, sparse).to_frame()
    """
    if not isinstance(run_a, Run) or not isinstance(run_b, Run):
        raise ConfigError("lens.compare takes two lens.Run objects (from lens.trace or lens.Run.load)")
    ha, hb = run_a.provenance.get("input_sha256"), run_b.provenance.get("input_sha256")
    if ha != hb or not np.array_equal(run_a.arrays["token_ids"], run_b.arrays["token_ids"]):
        raise LensError(
            "lens.compare needs two runs of the same inputs (their token ids differ); trace the same texts "
            "with both configurations"
        )
    if run_a.meta["n_layers"] != run_b.meta["n_layers"] or run_a.meta["n_heads"] != run_b.meta["n_heads"]:
        raise LensError("lens.compare needs runs of models with the same number of layers and heads")
    sa, sb = sinks(run_a, epsilon=epsilon), sinks(run_b, epsilon=epsilon)
    va, vb = valley(run_a), valley(run_b)
    cosine, rel = _hidden_agreement(run_a, run_b)
    kl = top1 = kl_tokens = None
    if "logits.logprobs" in run_a.arrays and "logits.logprobs" in run_b.arrays:
        la = run_a.arrays["logits.logprobs"].astype(np.float64)
        lb = run_b.arrays["logits.logprobs"].astype(np.float64)
        kl_tokens = (np.exp(la) * (la - lb)).sum(1)
        kl = float(kl_tokens.mean())
        top1 = float((la.argmax(1) == lb.argmax(1)).mean())
    density = np.full(sa.mean_sink_score.shape, np.nan)
    if "attn.kept_fraction" in run_b.arrays:
        density = np.nanmean(run_b.arrays["attn.kept_fraction"], axis=1)
    labels = (_label(run_a), _label(run_b))
    if labels[0] == labels[1]:
        labels = (labels[0] + " (a)", labels[1] + " (b)")
    ea, eb = va.mean("entropy_raw_normalized"), vb.mean("entropy_raw_normalized")
    aa, ab = va.mean("anisotropy"), vb.mean("anisotropy")
    return CompareResult(
        run_a=run_a,
        run_b=run_b,
        labels=labels,
        sink_a=sa.mean_sink_score,
        sink_b=sb.mean_sink_score,
        sink_delta=sb.mean_sink_score - sa.mean_sink_score,
        entropy_a=ea,
        entropy_b=eb,
        entropy_delta=eb - ea,
        normalized_entropy_delta=vb.mean("entropy_normalized_normalized") - va.mean("entropy_normalized_normalized"),
        anisotropy_a=aa,
        anisotropy_b=ab,
        anisotropy_delta=ab - aa,
        hidden_cosine=cosine,
        hidden_rel_error=rel,
        kl=kl,
        top1_agreement=top1,
        kl_per_token=kl_tokens,
        density_b=density,
        valley_layers=(va.valley_layer, vb.valley_layer),
    )
