"""``lens.valley``: layer-wise matrix entropy, anisotropy and the massive-activation bound (docs/definitions.md)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens.errors import ConfigError, RunFormatError
from lens.run import Run
from lens.capture.spectra import entropy_from_spectrum

__all__ = ["ValleyResult", "valley", "massive_activation_bound"]


def massive_activation_bound(norms: np.ndarray, cos2_first: np.ndarray, rank: int) -> dict[str, float]:
    """Queipo-de-Llano et al., Theorem 1, for one matrix X with rows x_i (docs/definitions.md#massive-activation-bound).

    With ``M = ‖x₀‖²``, ``R = Σ_{i≠0} ‖x_i‖²``, ``α = (1/R) Σ_{i≠0} ‖x_i‖² cos²θ_i`` (θ_i: angle between
    x_i and x₀), ``c = M/R`` and ``p = (c + α)/(c + 1)``: ``σ₁² ≥ M + αR``, ``p₁ ≥ p`` and
    ``H ≤ −p log p − (1 − p) log(1 − p) + (1 − p) log(r − 1)`` with r the rank (here ``min(T, d)``, the
    largest rank X can have, which keeps the bound valid whatever the numerical rank). When
    ``p ≤ 1/r`` the bound is the trivial ``log r``.

    Example: ``massive_activation_bound(np.array([10., 1., 1.]), np.array([1., 0., 0.]), 3)["p"]`` → 0.98.
    """
    sq = np.asarray(norms, dtype=np.float64) ** 2
    big_m = float(sq[0])
    rest = float(sq[1:].sum())
    if rest <= 0:
        return {"M": big_m, "R": rest, "alpha": float("nan"), "c": float("inf"), "p": 1.0,
                "sigma1_sq_lower": big_m, "entropy_upper": 0.0}
    alpha = float((sq[1:] * np.asarray(cos2_first[1:], dtype=np.float64)).sum() / rest)
    c = big_m / rest
    p = (c + alpha) / (c + 1.0)
    p = min(max(p, 0.0), 1.0)
    if rank <= 1:
        upper = 0.0
    elif p <= 1.0 / rank:
        upper = math.log(rank)
    else:
        upper = -p * math.log(p) - ((1 - p) * math.log(1 - p) if p < 1 else 0.0) + (1 - p) * math.log(rank - 1)
    return {"M": big_m, "R": rest, "alpha": alpha, "c": c, "p": p, "sigma1_sq_lower": big_m + alpha * rest,
            "entropy_upper": upper}


_PER_LAYER = (
    "entropy_raw",
    "entropy_raw_normalized",
    "entropy_normalized",
    "entropy_normalized_normalized",
    "anisotropy",
    "effective_rank",
    "anisotropy_lower_bound",
    "entropy_upper_bound",
    "entropy_upper_bound_normalized",
    "sigma1_sq",
    "sigma1_sq_lower_bound",
    "bound_alpha",
    "bound_c",
    "first_norm",
    "first_norm_ratio",
)


#: Columns of the compact table (notebook display and the demo report): frame column → heading.
_TABLE = {
    "layer": "layer",
    "entropy_raw_normalized": "raw entropy ÷ log r",
    "entropy_upper_bound_normalized": "bound on it",
    "entropy_normalized_normalized": "normalized entropy ÷ log r",
    "anisotropy": "anisotropy p₁",
    "anisotropy_lower_bound": "bound on p₁",
    "effective_rank": "effective rank",
    "first_norm_ratio": "first-token norm ratio",
}


@dataclass
class ValleyResult:
    """Per residual layer ℓ = 0..L and per sequence: entropies, anisotropy, effective rank, the bound.

    ``values[name]`` is an array [L+1, S] (float64) for every name in ``ValleyResult.columns``;
    ``mean(name)`` averages over sequences. ``valley_layer`` is the argmin of the mean normalized raw
    entropy, ``depth_fraction = valley_layer / L``, and ``valley_range`` the contiguous layers around it
    whose entropy stays below halfway between the minimum and the lower of the two ends (the dip).
    ``interior`` is True only when the minimum lies strictly between the embeddings (ℓ = 0) and the
    output (ℓ = L): a minimum at either end is a trend, not a valley, and ``summary()``, the figure and
    the report then say "no interior valley" and describe the trend (``trend()``).
    ``modality``: None for every token, or ``"image"`` / ``"text"`` when the result describes only those tokens
    (``lens.valley(run, modality=...)``; the bound's reference row is then the subset's largest-norm token).
    Definitions: docs/definitions.md#compression-valley.

    Example::

        v = lens.valley(run)
        v                     # ValleyResult(all-MiniLM-L6-v2, 16 sequences, layers 0–6: no interior valley …)
        v.interior, v.valley_layer, v.trend()
    """

    run: Run = field(repr=False)
    alpha: float
    values: dict[str, np.ndarray] = field(repr=False)
    valley_layer: int
    depth_fraction: float
    valley_range: tuple[int, int]
    interior: bool | None = None
    modality: str | None = None

    columns = _PER_LAYER

    def __post_init__(self) -> None:
        if self.interior is None:
            n_layers = self.values["entropy_raw"].shape[0] - 1
            self.interior = bool(0 < self.valley_layer < n_layers)

    @property
    def n_layers(self) -> int:
        """L: the number of blocks (residual layers are 0..L)."""
        return int(self.values["entropy_raw"].shape[0] - 1)

    def trend(self) -> str:
        """How the mean normalized raw entropy moves from the embeddings to the output, in words.

        Example: ``"falls monotonically from 0.91 at the embeddings to 0.62 at the output (layer 6), lowest at
        the output"``.
        """
        h = self.mean("entropy_raw_normalized")
        finite = h[np.isfinite(h)]
        if finite.size < 2:
            return "cannot be described: fewer than two layers have a finite entropy"
        steps = np.diff(finite)
        direction = "falls" if finite[-1] < finite[0] else "rises"
        monotonic = bool(np.all(steps <= 0) if direction == "falls" else np.all(steps >= 0))
        text = (
            f"{direction}{' monotonically' if monotonic else ''} from {h[0]:.3f} at the embeddings to "
            f"{h[-1]:.3f} at the output (layer {self.n_layers})"
        )
        if not self.interior:
            text += ", lowest at the embeddings" if self.valley_layer == 0 else ", lowest at the output"
        return text

    def headline(self) -> str:
        """One line: where the valley is, or that there is no interior valley and the trend."""
        of = f"{self.modality} tokens: " if self.modality else ""
        if not self.interior:
            return f"{of}no interior valley: normalized raw entropy {self.trend()}"
        lo, hi = self.valley_range
        return (
            f"{of}compression valley at layer {self.valley_layer} of {self.n_layers} (depth {self.depth_fraction:.2f}, "
            f"layers {lo}–{hi})"
        )

    def mean(self, name: str) -> np.ndarray:
        """[L+1] mean over sequences of one per-layer quantity, e.g. ``result.mean("anisotropy")``
        (NaN at a layer where no sequence has a value, e.g. a modality split of one-token subsets)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(self.values[name], axis=1)

    def to_frame(self, kind: str = "layers", *, per_sequence: bool = False):
        """A pandas DataFrame. ``kind``:

        * ``"layers"`` — one row per residual layer (mean over sequences), or per (layer, sequence) with
          ``per_sequence=True``; columns ``layer``, every name in ``ValleyResult.columns``, ``depth`` and
          ``in_valley``;
        * ``"modality"`` — the same per (layer, modality) for a run of a vision-language model with images:
          ``modality`` is ``"all"`` (every token: this result when it is not itself split), ``"text"`` and
          ``"image"`` (``lens.valley(run, modality=...)``, same ``alpha``), each with its own ``in_valley``.
          Raises ``RunFormatError`` for a run without image tokens.

        Example: ``lens.valley(run).to_frame()[["layer", "entropy_raw_normalized", "entropy_upper_bound_normalized"]]``;
        ``lens.valley(vlm_run).to_frame("modality").pivot(index="layer", columns="modality", values="anisotropy")``.
        """
        import pandas as pd

        if kind == "modality":
            parts = [] if self.modality is not None else [("all", self)]
            parts += [(m, valley(self.run, alpha=self.alpha, modality=m)) for m in MODALITY_SUBSETS]
            frames = []
            for name, result in parts:
                frame = result.to_frame(per_sequence=per_sequence)
                frame.insert(1 + int(per_sequence), "modality", name)
                frames.append(frame)
            return pd.concat(frames, ignore_index=True)
        if kind != "layers":
            raise ConfigError(f"kind must be 'layers' or 'modality'; got {kind!r}")
        n_res, n_seq = self.values["entropy_raw"].shape
        n_layers = n_res - 1
        if per_sequence:
            layer, seq = np.meshgrid(np.arange(n_res), np.arange(n_seq), indexing="ij")
            data: dict[str, Any] = {"layer": layer.ravel(), "sequence": seq.ravel()}
            data.update({k: v.ravel() for k, v in self.values.items()})
        else:
            data = {"layer": np.arange(n_res)}
            data.update({k: self.mean(k) for k in self.values})
        frame = pd.DataFrame(data)
        frame["depth"] = frame["layer"] / max(n_layers, 1)
        frame["in_valley"] = frame["layer"].between(*self.valley_range)
        return frame

    def figure(self):
        """Entropy (raw and normalized) with its upper bound, anisotropy with its lower bound, and the
        first-token norm ratio, per layer, with the valley marked.

        Example: ``lens.valley(run).figure().show()``.
        """
        from lens.report import figures

        return figures.valley_figure([self])

    def show(self, *others: "ValleyResult", labels=None):
        """The interactive valley plot (``lens.widgets.ValleyPlot``; needs ``lens-interp[widgets]``), with any
        ``others`` overlaid.

        Example: ``lens.valley(dense_run).show(lens.valley(deployed_run), labels=["dense", "deployed"])``.
        """
        from lens.widgets import ValleyPlot  # views sit above the core; imported only when asked

        return ValleyPlot(self, *others, labels=labels)

    def summary(self) -> str:
        """A few lines for a terminal: the valley (or that there is none, and the trend), the entropy at
        its minimum against both ends, and the anisotropy there with its bound."""
        h = self.mean("entropy_raw_normalized")
        at = self.valley_layer
        anisotropy = (f"anisotropy {self.mean('anisotropy')[at]:.3f} at layer {at} "
                      f"(bound ≥ {self.mean('anisotropy_lower_bound')[at]:.3f})")
        if not self.interior:
            return f"{self.headline()}\n{anisotropy}"
        return (
            f"{self.headline()}\n"
            f"normalized raw entropy {h[at]:.3f} at layer {at} vs {h[0]:.3f} at the embeddings and {h[-1]:.3f} at "
            f"the output; {anisotropy}"
        )

    # -- notebook and terminal display ------------------------------------------------------------------
    def __repr__(self) -> str:
        model = str(self.run.provenance.get("model_id", "?")).split("/")[-1]
        where = (
            f"valley at layer {self.valley_layer} (depth {self.depth_fraction:.2f})"
            if self.interior
            else f"no interior valley (minimum at layer {self.valley_layer})"
        )
        h = self.mean("entropy_raw_normalized")
        of = f", {self.modality} tokens" if self.modality else ""
        return (
            f"ValleyResult({model}{of}, {self.run.n_sequences} sequences, layers 0–{self.n_layers}: {where}; "
            f"normalized raw entropy {h[0]:.3f} → {h[self.valley_layer]:.3f} → {h[-1]:.3f})"
        )

    def _repr_html_(self) -> str:
        from lens._display import html_card

        frame = self.to_frame()[list(_TABLE)].rename(columns=_TABLE)
        return html_card(repr(self).split("(", 1)[0], self.headline(), frame,
                         highlight_rows=[self.valley_layer] if self.interior else [])


def _valley_range(h: np.ndarray, argmin: int) -> tuple[int, int]:
    ends = min(h[0], h[-1])
    if not np.isfinite(ends) or ends <= h[argmin]:
        return argmin, argmin
    cut = h[argmin] + 0.5 * (ends - h[argmin])
    lo = hi = argmin
    while lo > 0 and h[lo - 1] <= cut:
        lo -= 1
    while hi < len(h) - 1 and h[hi + 1] <= cut:
        hi += 1
    return lo, hi


#: the modalities ``lens.valley(run, modality=...)`` splits by (image inputs; docs/definitions.md#vision-language-models)
MODALITY_SUBSETS = ("text", "image")
_MODALITY_CODES = {"text": 0, "image": 1}


def _fill(values: dict[str, np.ndarray], layer: int, seq: int, raw: np.ndarray, normalized: np.ndarray,
          norms: np.ndarray, cos2: np.ndarray, d_model: int, alpha: float) -> None:
    """Every per-layer quantity of one matrix X (its spectra, its rows' norms and cos² to its reference row,
    which comes first)."""
    length = len(norms)
    rank = min(length, d_model)
    log_rank = math.log(rank) if rank > 1 else float("nan")
    h_raw, p1 = entropy_from_spectrum(raw[:rank], 1.0)
    h_norm, _ = entropy_from_spectrum(normalized[:rank], alpha)
    bound = massive_activation_bound(norms, cos2, rank)
    row = values
    row["entropy_raw"][layer, seq] = h_raw
    row["entropy_raw_normalized"][layer, seq] = h_raw / log_rank
    row["entropy_normalized"][layer, seq] = h_norm
    row["entropy_normalized_normalized"][layer, seq] = h_norm / log_rank
    row["anisotropy"][layer, seq] = p1
    row["effective_rank"][layer, seq] = math.exp(h_raw) if np.isfinite(h_raw) else np.nan
    row["anisotropy_lower_bound"][layer, seq] = bound["p"]
    row["entropy_upper_bound"][layer, seq] = bound["entropy_upper"]
    row["entropy_upper_bound_normalized"][layer, seq] = bound["entropy_upper"] / log_rank
    row["sigma1_sq"][layer, seq] = raw[0]
    row["sigma1_sq_lower_bound"][layer, seq] = bound["sigma1_sq_lower"]
    row["bound_alpha"][layer, seq] = bound["alpha"]
    row["bound_c"][layer, seq] = bound["c"]
    row["first_norm"][layer, seq] = norms[0]
    if length > 1:
        row["first_norm_ratio"][layer, seq] = norms[0] / max(float(np.median(norms[1:])), 1e-30)


def _modality_values(run: Run, modality: str, alpha: float) -> dict[str, np.ndarray]:
    """The per-layer quantities of the ``modality`` rows of every sequence (NaN where a sequence has none)."""
    if modality not in MODALITY_SUBSETS:
        raise ConfigError(f"modality must be one of {MODALITY_SUBSETS} or None (every token); got {modality!r}")
    key = f"resid.spectrum_raw.{modality}"
    if key not in run.arrays:
        if "modality" not in run.arrays or not (run.arrays["modality"] == 1).any():
            raise RunFormatError(
                f"lens.valley(run, modality={modality!r}) splits a run of a vision-language model with images by "
                "modality, and this run has no image tokens; use lens.valley(run) for every token"
            )
        raise RunFormatError(
            f"this run has no per-modality spectra ({key}): it was traced before lens recorded them, or without "
            "capture 'residual'; trace it again with lens.trace(vlm, items)"
        )
    a = run.arrays
    raw, normalized = a[key], a[f"resid.spectrum_normalized.{modality}"]
    reference, cos2 = a[f"resid.reference.{modality}"], a["resid.cos2_reference"]
    norms = a["resid.norm"]
    code = _MODALITY_CODES[modality]
    d_model = int(run.meta["d_model"])
    n_res, n_seq = raw.shape[:2]
    values = {name: np.full((n_res, n_seq), np.nan) for name in _PER_LAYER}
    for seq in range(n_seq):
        sl = run.span(seq)
        rows = sl.start + np.nonzero(run.modality[sl] == code)[0]
        if not len(rows):
            continue
        for layer in range(n_res):
            ref = int(reference[layer, seq])
            order = np.concatenate([[ref], rows[rows != ref]])  # the reference row first, as the bound reads it
            _fill(values, layer, seq, raw[layer, seq], normalized[layer, seq], norms[layer, order], cos2[layer, order],
                  d_model, alpha)
    return values


def valley(run: Run, *, alpha: float = 1.0, modality: str | None = None) -> ValleyResult:
    """Matrix entropy of the residual stream per layer and the compression valley (docs/definitions.md).

    Raw entropy (Queipo-de-Llano et al.): ``p_j = σ_j²/‖X‖_F²``, ``H = −Σ p_j log p_j``, also divided
    by ``log min(T, d)``; anisotropy ``p_1``; effective rank ``exp(H)``. Normalized entropy (Skean et al.):
    the same on the Gram matrix of centered, row-normalized X, as α-Rényi entropy (``alpha``; 1 = Shannon).
    Beside them, the massive-activation bound (``massive_activation_bound``): the lower bound on p_1 and
    the upper bound on H that the first token's norm alone implies — the explanation of *why* a valley
    appears when one token's norm explodes.

    ``modality``: ``None`` (every token), or ``"image"`` / ``"text"`` for a run of a vision-language model with
    images: X is then only that modality's rows of each sequence (special tokens such as BOS belong to
    neither), T their number, and the bound's reference row x₀ is the subset's largest-norm token at that
    layer instead of the first token (Theorem 1 holds for any row; the largest-norm one is the massive
    activation it explains, e.g. a visual sink) — ``first_norm`` / ``first_norm_ratio`` then describe that
    token (docs/definitions.md#vision-language-models). A sequence without such tokens is NaN. All modalities
    in one table: ``lens.valley(run).to_frame("modality")``.

    The valley is the argmin layer of the mean normalized raw entropy; ``interior`` says whether it lies
    strictly inside (docs/definitions.md#compression-valley). Raises ``ConfigError`` for ``alpha ≤ 0`` or an
    unknown ``modality``, and ``RunFormatError`` for a run traced without the residual probe, or split by
    modality without image tokens.

    Example::

        v = lens.valley(run)
        v.interior, v.valley_layer, v.depth_fraction
        print(v.summary())
        v.to_frame()
        lens.valley(vlm_run, modality="image").mean("entropy_raw_normalized")   # the image tokens' valley
    """
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0 (1 = Shannon); got {alpha}")
    if (run.meta.get("provenance", {}).get("trace") or {}).get("spectra") == "none":
        raise RunFormatError("lens.valley needs the entropy spectra, and this run was traced with spectra='none'; "
                             "trace again with spectra='exact' (the default)")
    run.require("resid.spectrum_raw", "resid.spectrum_normalized", "resid.norm", "resid.cos2_first", what="lens.valley")
    if modality is not None:
        values = _modality_values(run, modality, alpha)
    else:
        raw = run.arrays["resid.spectrum_raw"]
        normalized = run.arrays["resid.spectrum_normalized"]
        norms = run.arrays["resid.norm"]
        cos2 = run.arrays["resid.cos2_first"]
        d_model = int(run.meta["d_model"])
        n_res, n_seq = raw.shape[:2]
        values = {name: np.full((n_res, n_seq), np.nan) for name in _PER_LAYER}
        for seq in range(n_seq):
            sl = run.span(seq)
            for layer in range(n_res):
                _fill(values, layer, seq, raw[layer, seq], normalized[layer, seq], norms[layer, sl], cos2[layer, sl],
                      d_model, alpha)
    n_res = values["entropy_raw"].shape[0]
    with warnings.catch_warnings():  # a modality no sequence has at some layer is all-NaN there
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_h = np.nanmean(values["entropy_raw_normalized"], axis=1)
    if np.all(np.isnan(mean_h)):
        argmin = 0
    else:
        argmin = int(np.nanargmin(mean_h))
    n_layers = n_res - 1
    return ValleyResult(
        run=run,
        alpha=alpha,
        values=values,
        valley_layer=argmin,
        depth_fraction=argmin / max(n_layers, 1),
        valley_range=_valley_range(mean_h, argmin),
        interior=bool(0 < argmin < n_layers),
        modality=modality,
    )
