"""``lens.compare``: the same inputs under two configurations (dense vs deployed, model A vs model B)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens.analysis.sinks import sinks
from lens.analysis.valley import valley
from lens.errors import ConfigError, LensError
from lens.run import Run

__all__ = ["CompareResult", "compare", "every_block_kept"]


def _label(run: Run) -> str:
    prov = run.provenance
    attn = prov.get("attention") or {}
    kind = attn.get("kind", "dense")
    if kind != "dense":
        params = attn.get("mode") or attn.get("preset") or ""
        kind = f"{kind} {params}".strip()
    quant = (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None
    edits = [_edit_label(e) for e in (prov.get("trace") or {}).get("interventions") or []]
    return kind + (f" + {quant}" if quant else "") + "".join(f" + {e}" for e in edits)


def _edit_label(edit: dict) -> str:
    """A short name for an intervention in provenance, e.g. ``ablate mlp L11 @[0]``."""
    where = f"@{edit['positions']}" if edit.get("positions") is not None else ""
    kind = edit.get("type", "?")
    if kind == "ablate":
        head = f"H{edit['head']}" if edit.get("head") is not None else ""
        return f"ablate {edit.get('site')} L{edit.get('layer')}{head}{where}".strip()
    if kind == "scale_attention":
        return f"attention×{edit.get('factor')} L{edit.get('layer')} keys {edit.get('keys')}"
    return f"{kind} L{edit.get('layer')}{where}"


@dataclass
class CompareResult:
    """Per layer/head and per layer differences between two runs of the same inputs (b − a).

    ``labels``: the two variants' names (``"dense"``, ``"dense + nvfp4"``, ``"sparse hybrid"``, …).
    ``sink_delta [L, H]``: sink-score change. ``entropy_delta``, ``normalized_entropy_delta``,
    ``anisotropy_delta [L+1]``: valley quantities' change. ``hidden_cosine [L+1]``: mean over tokens of
    cos(X_a[t], X_b[t]); ``hidden_rel_error [L+1]``: ‖X_b − X_a‖_F / ‖X_a‖_F (NaN for layers whose hidden
    states either run did not keep). ``kl``: mean over tokens of KL(p_a ‖ p_b) of the next-token
    distributions and ``top1_agreement`` the fraction of tokens whose argmax agrees (language models traced
    with ``capture`` including ``"logits"``; None otherwise). ``density_a``, ``density_b [L, H]``: the
    fraction of allowed blocks each run's sparse kernel computed (NaN for dense). ``every_block_kept``:
    for each run, whether it used a sparse configuration that kept every block for these inputs — then it
    computed exactly dense attention, and the comparison says so.

    Example::

        result = lens.compare(dense_run, nvfp4_run)
        result                      # CompareResult(dense → dense + nvfp4: max |Δ sink| 0.012 …)
        result.to_frame()           # long format: one row per (variant, layer)
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
    normalized_entropy_a: np.ndarray | None = None
    normalized_entropy_b: np.ndarray | None = None
    density_a: np.ndarray | None = None
    valley_interior: tuple[bool, bool] = (True, True)
    every_block_kept: tuple[bool, bool] = (False, False)
    tau: float = 5.0

    def to_frame(self, kind: str = "layers"):
        """A tidy pandas DataFrame in long format: the variant's name is in the ``variant`` column, every
        other column is a snake_case identifier, and columns with no value at all are left out.

        * ``"layers"`` — one row per (variant, residual layer): ``entropy`` (normalized raw entropy),
          ``normalized_entropy``, ``anisotropy``, ``block_density`` (sparse runs), and the change against
          the reference ``labels[0]`` (``entropy_delta``, ``normalized_entropy_delta``, ``anisotropy_delta``,
          ``hidden_cosine``, ``hidden_rel_error``; 0, 0, 0, 1, 0 on the reference's own rows);
        * ``"heads"`` — one row per (variant, layer, head): ``sink_score``, ``sink_delta``, ``block_density``;
        * ``"tokens"`` — per-token next-token ``kl`` of variant b against a (language models traced with
          ``capture=(..., "logits")``; ``ConfigError`` otherwise);
        * ``"modality"`` — one row per (variant, residual layer, modality: text / image / special): ``tokens``,
          ``mass_to_uniform`` and ``sink_token_fraction`` (τ = ``tau``), ``mean_norm``, the modality's own valley
          (``entropy``, ``normalized_entropy``, ``anisotropy``; ``lens.valley(run, modality=...)``, runs with
          images) and, on the text rows, ``text_image_share``; each with its change ``<name>_delta`` (b − a,
          0 on the reference's rows). See ``lens.analysis.compare_modality`` and
          docs/definitions.md#vision-language-models.

        Example: ``lens.compare(dense, sparse).to_frame("heads").query("variant != 'dense'")``;
        ``lens.compare(dense_vlm_run, int8_vlm_run).to_frame("modality").query("modality == 'image'")``.
        """
        import pandas as pd

        if kind == "modality":
            from lens.analysis.compare_modality import modality_frame

            return _drop_empty(modality_frame(self.run_a, self.run_b, self.labels, self.tau))

        if kind == "layers":
            n_res = len(self.entropy_a)
            layers = np.arange(n_res)
            hidden = np.isfinite(self.hidden_cosine)
            frames = []
            for i, label in enumerate(self.labels):
                density = self.density_a if i == 0 else self.density_b
                per_layer = np.full(n_res, np.nan)
                if density is not None and np.isfinite(density).any():
                    per_layer[: density.shape[0]] = np.nanmean(density, axis=1)
                ref = i == 0
                frames.append(pd.DataFrame({
                    "variant": label,
                    "layer": layers,
                    "entropy": self.entropy_a if ref else self.entropy_b,
                    "normalized_entropy": _or_nan(self.normalized_entropy_a if ref else self.normalized_entropy_b, n_res),
                    "anisotropy": self.anisotropy_a if ref else self.anisotropy_b,
                    "block_density": per_layer,
                    "entropy_delta": np.zeros(n_res) if ref else self.entropy_delta,
                    "normalized_entropy_delta": np.zeros(n_res) if ref else self.normalized_entropy_delta,
                    "anisotropy_delta": np.zeros(n_res) if ref else self.anisotropy_delta,
                    "hidden_cosine": np.where(hidden, 1.0, np.nan) if ref else self.hidden_cosine,
                    "hidden_rel_error": np.where(hidden, 0.0, np.nan) if ref else self.hidden_rel_error,
                }))
            return _drop_empty(pd.concat(frames, ignore_index=True))
        if kind == "heads":
            n_layers, n_heads = self.sink_delta.shape
            layer, head = np.meshgrid(np.arange(n_layers), np.arange(n_heads), indexing="ij")
            frames = []
            for i, label in enumerate(self.labels):
                density = self.density_a if i == 0 else self.density_b
                frames.append(pd.DataFrame({
                    "variant": label,
                    "layer": layer.ravel(),
                    "head": head.ravel(),
                    "sink_score": (self.sink_a if i == 0 else self.sink_b).ravel(),
                    "sink_delta": (np.zeros(self.sink_delta.size) if i == 0 else self.sink_delta.ravel()),
                    "block_density": _or_nan(density, self.sink_delta.shape).ravel(),
                }))
            return _drop_empty(pd.concat(frames, ignore_index=True))
        if kind == "tokens":
            if self.kl_per_token is None:
                raise ConfigError("per-token KL needs both runs traced with capture=(..., 'logits') on a language model")
            run = self.run_a
            seq = np.repeat(np.arange(run.n_sequences), run.lengths)
            pos = np.concatenate([np.arange(n) for n in run.lengths])
            return pd.DataFrame({"variant": self.labels[1], "sequence": seq, "position": pos,
                                 "token": [t for toks in run.tokens for t in toks], "kl": self.kl_per_token})
        raise ConfigError(f"kind must be 'layers', 'heads', 'tokens' or 'modality'; got {kind!r}")

    def figure(self):
        """Sink-score change per head, entropy and anisotropy of both runs, and hidden-state agreement.

        Example: ``lens.compare(dense, nvfp4).figure().write_html("compare.html")``.
        """
        from lens.report import figures

        return figures.compare_figure(self)

    def notes(self) -> list[str]:
        """Warnings a reader of this comparison must see (a sparse run that computed every block)."""
        out = []
        for label, kept in zip(self.labels, self.every_block_kept):
            if kept:
                out.append(
                    f"{label} kept every attention block for these inputs: it computed dense attention, so "
                    "any difference from dense is rounding. Use longer inputs or smaller blocks (block_q, block_k)."
                )
        return out

    def summary(self) -> str:
        """A few lines for a terminal."""
        a, b = self.labels
        worst = np.unravel_index(np.nanargmax(np.abs(self.sink_delta)), self.sink_delta.shape)
        lines = [
            f"{b} vs {a}: largest sink-score change {self.sink_delta[worst]:+.3f} (layer {worst[0]}, head {worst[1]}); "
            f"mean |Δ sink| {np.nanmean(np.abs(self.sink_delta)):.4f}",
            f"entropy change per layer (normalized raw): " + " ".join(f"{d:+.3f}" for d in self.entropy_delta),
            self._valley_line(),
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
        if "modality" in self.run_a.arrays and (self.run_a.arrays["modality"] == 1).any():
            lines.append(self._modality_line())
        lines.extend(self.notes())
        return "\n".join(lines)

    def _modality_line(self) -> str:
        """Image tokens against text tokens: the largest change of each, over layers (``to_frame("modality")``)."""
        frame = self.to_frame("modality")
        changed = frame[frame["variant"] == self.labels[1]]
        parts = []
        for name in ("image", "text"):
            rows = changed[changed["modality"] == name]
            bits = [f"{column.removesuffix('_delta')} {rows[column].abs().max():.3g}"
                    for column in ("mean_norm_delta", "entropy_delta", "mass_to_uniform_delta", "text_image_share_delta")
                    if column in rows and rows[column].notna().any()]
            if bits:
                parts.append(f"{name} tokens max |Δ| " + ", ".join(bits))
        return "; ".join(parts) + " (to_frame('modality'))"

    def _valley_line(self) -> str:
        def where(layer, interior):
            return f"layer {layer}" if interior else f"none (minimum at layer {layer})"

        (la, lb), (ia, ib) = self.valley_layers, self.valley_interior
        if (la, ia) == (lb, ib):
            return f"interior valley: {where(la, ia)} in both"
        return f"interior valley: {where(la, ia)} → {where(lb, ib)}"

    def __repr__(self) -> str:
        a, b = self.labels
        parts = [f"max |Δ sink| {np.nanmax(np.abs(self.sink_delta)):.3f}",
                 f"max |Δ entropy| {np.nanmax(np.abs(self.entropy_delta)):.3f}"]
        if np.isfinite(self.hidden_rel_error).any():
            parts.append(f"hidden rel. error ≤ {np.nanmax(self.hidden_rel_error):.3f}")
        if self.kl is not None:
            parts.append(f"KL {self.kl:.4f}")
        if np.isfinite(self.density_b).any():
            parts.append(f"{np.nanmean(self.density_b):.0%} of blocks")
        if any(self.every_block_kept):
            parts.append("every block kept: dense")
        return f"CompareResult({a} → {b}: {', '.join(parts)})"

    def _repr_html_(self) -> str:
        from lens._display import html_card

        frame = self.to_frame("layers")
        frame = frame[frame["variant"] == self.labels[1]].drop(columns="variant")
        return html_card("CompareResult", repr(self)[len("CompareResult("):-1], frame,
                         lines=self.notes() + [f"rows: {self.labels[1]} against {self.labels[0]}, per residual layer"])


def _or_nan(values, shape) -> np.ndarray:
    return np.full(shape, np.nan) if values is None else np.asarray(values, dtype=np.float64)


def _drop_empty(frame):
    """Leave out columns that hold no value at all (e.g. block_density when neither run is sparse)."""
    empty = [c for c in frame.columns if frame[c].isna().all()]
    return frame.drop(columns=empty)


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


def compare(run_a: Run, run_b: Run, *, epsilon: float = 0.3, tau: float = 5.0) -> CompareResult:
    """Compare two runs of the *same inputs* under two configurations (b − a everywhere).

    Reports per layer/head sink-score deltas (docs/definitions.md sink score), per-layer entropy, normalized
    entropy and anisotropy deltas (``lens.valley``), hidden-state cosine and relative error per layer
    (for layers traced with ``keep_hidden``), the achieved block density of a sparse run, and for
    language models traced with ``capture`` including ``"logits"``: mean next-token KL(a ‖ b) and top-1
    agreement. For runs of a vision-language model, ``to_frame("modality")`` splits the comparison by
    modality (text / image / special tokens; ``tau`` is its sink-token threshold, m > τ·u).

    Example::

        dense = lens.trace(lens.load(), texts, keep_hidden="all")
        sparse = lens.trace(lens.load(attention=lens.Sparse(topp=0.9)), texts, keep_hidden="all")
        lens.compare(dense, sparse).to_frame()

    Two ``Scan`` objects (``lens.scan``) of the same corpus compare neuron by neuron instead: top-k overlap
    (Jaccard), histogram distance, mean shift and the neurons that moved most (``ScanCompareResult``).
    """
    if getattr(run_a, "__lens_scan__", False) is True:  # a Scan knows how to compare itself (lens.scan)
        return run_a.compare(run_b)
    if not isinstance(run_a, Run) or not isinstance(run_b, Run):
        raise ConfigError("lens.compare takes two lens.Run objects (from lens.trace or lens.Run.load)")
    ha, hb = run_a.provenance.get("input_sha256"), run_b.provenance.get("input_sha256")
    if ha != hb or not np.array_equal(run_a.arrays["token_ids"], run_b.arrays["token_ids"]):
        raise LensError(
            "lens.compare needs two runs of the same inputs (their token ids differ); trace the same texts "
            "with both configurations"
        )
    if tau <= 0:
        raise ConfigError(f"tau must be > 0; got {tau}")
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
    density_a, density_b = (_density(run, sa.mean_sink_score.shape) for run in (run_a, run_b))
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
        density_b=density_b,
        valley_layers=(va.valley_layer, vb.valley_layer),
        normalized_entropy_a=va.mean("entropy_normalized_normalized"),
        normalized_entropy_b=vb.mean("entropy_normalized_normalized"),
        density_a=density_a,
        valley_interior=(bool(va.interior), bool(vb.interior)),
        every_block_kept=(every_block_kept(run_a), every_block_kept(run_b)),
        tau=tau,
    )


def _density(run: Run, shape) -> np.ndarray:
    if "attn.kept_fraction" in run.arrays:
        return np.nanmean(run.arrays["attn.kept_fraction"], axis=1)
    return np.full(shape, np.nan)


def every_block_kept(run: Run) -> bool:
    """Whether ``run`` used a sparse configuration that computed every allowed block for its inputs — that
    is, dense attention (read from the trace's record, or from ``attn.kept_fraction``).

    Example: ``every_block_kept(lens.trace(lens.load(attention=lens.Sparse()), ["Short."]))`` → True.
    """
    sparse = (run.provenance.get("attention") or {}).get("kind") == "sparse"
    if not sparse:
        return False
    recorded = run.meta.get("sparse_every_block_kept")
    if recorded is not None:
        return bool(recorded)
    kept = run.arrays.get("attn.kept_fraction")
    return kept is not None and bool(np.all(kept[np.isfinite(kept)] >= 1.0 - 1e-6))
