"""``lens.vision``: what a run of a vision-language model says about its image tokens.

Definitions (docs/definitions.md#vision-language-models):

* **modality split** — every token is text, image or special (``run.modality``); mass received relative
  to the uniform share, sink tokens (mass > τ × uniform share) and residual norms are averaged per modality.
* **text→image attention share** of layer ℓ, head h, sequence s: the mean over the text queries after the
  first image token of Σ_{k ∈ image} A[ℓ,h,q,k]; its yardstick is the same sum for the uniform pattern of the
  model's mask (every query spreading evenly over the keys it may see).
* **visual sink tokens** (Kang et al., ICLR 2025, §3): with φ(x) = abs(x) / rms(x), the sink dimensions of
  layer ℓ are those where the first token's φ ≥ τ_φ (τ_φ = 20, the paper's value); an image token is a
  visual sink at layer ℓ when its φ ≥ τ_φ in any sink dimension.
* **high-norm patch tokens** of the vision encoder (Darcet et al., ICLR 2024, §2): vision-tower tokens whose
  norm exceeds ``norm_ratio`` (4) × the median patch norm of the same tile at the same layer, reported with
  their (image, tile, row, col) in the tower's patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lens.errors import ConfigError, RunFormatError
from lens.run import Run

__all__ = ["VisionResult", "vision", "MODALITY_NAMES", "SINK_PHI_TAU", "HIGH_NORM_RATIO"]

#: modality code → name, as in ``run.modality``
MODALITY_NAMES = {0: "text", 1: "image", 2: "special"}
#: Kang et al. (ICLR 2025), §3: a dimension is massive when φ(x) = |x| / rms(x) ≥ 20
SINK_PHI_TAU = 20.0
#: Darcet et al. (ICLR 2024): high-norm tokens have norms far above the rest; "> 4 × the median" here
HIGH_NORM_RATIO = 4.0


def _require_images(run: Run) -> None:
    if "modality" not in run.arrays or not (run.arrays["modality"] == 1).any():
        raise RunFormatError(
            "lens.vision needs a run of a vision-language model with images: lens.trace(vlm, [{'image': img, "
            "'text': lens.image_prompt(vlm)}])"
        )


@dataclass
class VisionResult:
    """Image-token statistics of a run (docs/definitions.md#vision-language-models).

    ``text_image_share[s, ℓ, h]``: mean over text queries (after the first image) of the attention on image keys;
    NaN for sequences without images or without such queries. ``uniform_text_image_share[s, ℓ]``: the same for
    uniform attention under the model's mask. ``visual_sink[ℓ, n]`` (bool, [L+1, N]): image token n is a visual
    sink token at residual layer ℓ (input of block ℓ; ℓ = L the last output); ``sink_dims[ℓ][s]`` the sink
    dimensions found. ``high_norm``: dict of arrays (layer, index, image, tile, row, col, norm, ratio) for the
    vision-tower tokens whose norm exceeds ``norm_ratio`` × the tile's median patch norm.
    """

    run: Run = field(repr=False)
    phi_tau: float
    norm_ratio: float
    tau: float
    text_image_share: np.ndarray | None
    uniform_text_image_share: np.ndarray | None
    visual_sink: np.ndarray | None
    sink_dims: list[list[np.ndarray]] | None
    high_norm: dict[str, np.ndarray] | None

    # -- headline numbers ------------------------------------------------------------------------------
    @property
    def share_per_layer(self) -> np.ndarray:
        """[L] text→image share, averaged over heads and the sequences that have one."""
        if self.text_image_share is None:
            raise RunFormatError("this run has no text→image sums (trace with capture including 'attention')")
        return np.nanmean(self.text_image_share.mean(axis=2), axis=0)

    def visual_sinks(self, layer: int) -> np.ndarray:
        """Flat token indices of the visual sink tokens at residual layer ``layer``."""
        if self.visual_sink is None:
            raise RunFormatError("this run has no sink-dimension values (trace with capture including 'residual')")
        return np.nonzero(self.visual_sink[layer])[0]

    def attention_map(self, layer: int, query: int | None = None, image: int = 0, tile: int = 0) -> np.ndarray:
        """[rows, cols] float: the attention (mean over heads) that one text token puts on each image token of
        ``image`` / ``tile``, laid out on its token grid (NaN where the grid has no token).

        ``query``: the token's position in its sequence, a text token after the image (default: the last one,
        e.g. the prompt's final token, from which the first caption word is predicted). Raises ``ConfigError``
        for a position whose row the run did not keep.

        Example: ``lens.vision(run).attention_map(layer=12)`` — where the last prompt token looks at layer 12.
        """
        run, a = self.run, self.run.arrays
        if "attn.rows" not in a:
            raise RunFormatError("this run kept no attention rows of text queries (trace with capture including 'attention')")
        if not 0 <= image < len(run.images):
            raise ConfigError(f"image must be in [0, {len(run.images)}); got {image}")
        seq = int(run.images[image]["sequence"])
        rows_of_seq = np.nonzero(a["attn.row_sequence"] == seq)[0]
        queries = a["attn.row_query"][rows_of_seq]
        if query is None:
            query = int(queries[-1])
        if query not in queries:
            raise ConfigError(f"query must be a text position after the image in sequence {seq}: one of {queries.tolist()}")
        r = int(rows_of_seq[np.nonzero(queries == query)[0][0]])
        row = a["attn.rows"][layer, a["attn.row_offsets"][r] : a["attn.row_offsets"][r + 1]]
        tile_meta = next(t for t in run.images[image]["tiles"] if t["tile"] == tile)
        n_rows, n_cols = tile_meta["grid"]
        flat = np.nonzero((a["image.index"] == image) & (a["image.tile"] == tile) & (a["image.row"] >= 0))[0]
        out = np.full((n_rows, n_cols), np.nan)
        out[a["image.row"][flat], a["image.col"][flat]] = row[flat - int(run.offsets[seq])]
        return out

    # -- tables ----------------------------------------------------------------------------------------
    def to_frame(self, kind: str = "share"):
        """A pandas DataFrame. ``kind``:

        * ``"share"`` — per (sequence, layer, head): text→image share and its uniform counterpart;
        * ``"modality"`` — per (layer, modality): tokens, mean mass received / uniform share (over heads),
          fraction of (token, head) pairs that are sink tokens, mean residual norm;
        * ``"visual_sinks"`` — per (layer, visual sink token): sequence, position, image, tile, row, col, its
          largest φ in the sink dimensions;
        * ``"high_norm"`` — per high-norm vision-tower token: layer, image, tile, row, col, norm, ratio;
        * ``"encoder_valley"`` — per vision-encoder layer (input of layer v; the last row is the output): the
          matrix entropy of each tile's tokens, raw and normalized (docs/definitions.md#matrix-entropy, divided
          by log min(T, d)), and the anisotropy p₁, averaged over tiles.

        Example: ``lens.vision(run).to_frame("modality").query("layer == 3")``.
        """
        import pandas as pd

        builders = {"share": self._share_frame, "modality": self._modality_frame, "encoder_valley": self._valley_frame,
                    "visual_sinks": self._sinks_frame, "high_norm": lambda: dict(self.high_norm or {})}
        if kind not in builders:
            raise ConfigError(f"kind must be one of {sorted(builders)}; got {kind!r}")
        return pd.DataFrame(builders[kind]())

    def _share_frame(self) -> dict[str, Any]:
        if self.text_image_share is None:
            return {}
        n_seq, n_layers, n_heads = self.text_image_share.shape
        seq, layer, head = np.meshgrid(np.arange(n_seq), np.arange(n_layers), np.arange(n_heads), indexing="ij")
        return {"sequence": seq.ravel(), "layer": layer.ravel(), "head": head.ravel(),
                "text_image_share": self.text_image_share.ravel(),
                "uniform_share": np.repeat(self.uniform_text_image_share, n_heads, axis=1).ravel()}

    def _valley_frame(self) -> dict[str, Any]:
        a = self.run.arrays
        if "vision.entropy_raw" not in a:
            return {}
        import warnings

        with warnings.catch_warnings():  # a layer with no tile (never for a run with images) would be all-NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            return {"layer": np.arange(a["vision.entropy_raw"].shape[0]),
                    "entropy_raw": np.nanmean(a["vision.entropy_raw"], axis=1),
                    "entropy_normalized": np.nanmean(a["vision.entropy_normalized"], axis=1),
                    "anisotropy": np.nanmean(a["vision.anisotropy"], axis=1),
                    "tiles": np.full(a["vision.entropy_raw"].shape[0], a["vision.entropy_raw"].shape[1])}

    def _modality_frame(self) -> dict[str, Any]:
        return modality_table(self.run, self.tau)

    def _sinks_frame(self) -> dict[str, Any]:
        run = self.run
        cols: dict[str, list] = {k: [] for k in ("layer", "sequence", "position", "image", "tile", "row", "col", "phi")}
        if self.visual_sink is None:
            return cols
        seq_of = np.repeat(np.arange(run.n_sequences), run.lengths)
        phi = run.arrays["resid.sink_phi"]
        for layer in range(self.visual_sink.shape[0]):
            for n in np.nonzero(self.visual_sink[layer])[0]:
                s = int(seq_of[n])
                cols["layer"].append(layer)
                cols["sequence"].append(s)
                cols["position"].append(int(n - run.offsets[s]))
                for name in ("image", "tile", "row", "col"):
                    cols[name].append(int(run.arrays[f"image.{name if name != 'image' else 'index'}"][n]))
                cols["phi"].append(float(phi[layer, n][self._dim_mask(layer, s)].max()))
        return cols

    def _dim_mask(self, layer: int, seq: int) -> np.ndarray:
        first = self.run.arrays["resid.sink_phi_first"][layer, seq]
        return first >= self.phi_tau

    # -- views -----------------------------------------------------------------------------------------
    def figure(self, kind: str = "share"):
        """An interactive plotly figure: ``"share"`` (text→image share per layer against uniform attention).

        Example: ``lens.vision(run).figure().write_html("share.html")``.
        """
        if kind != "share":
            raise ConfigError(f"kind must be 'share'; got {kind!r}")
        import plotly.graph_objects as go

        layers = np.arange(len(self.share_per_layer))
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=layers, y=self.share_per_layer, mode="lines+markers", name="text → image"))
        uniform = np.nanmean(self.uniform_text_image_share, axis=0)
        fig.add_trace(go.Scatter(x=layers, y=uniform, mode="lines", name="uniform attention", line={"dash": "dot"}))
        fig.update_layout(title="Attention of text queries on image tokens", xaxis_title="layer",
                          yaxis_title="share of attention", yaxis_range=[0, 1])
        return fig

    def show(self, **kwargs):
        """The image with its patch grid coloured by a statistic (``lens.widgets.PatchOverlay``).

        Example: ``lens.vision(run).show(stat="text_mass", layer=3)``.
        """
        from lens.widgets import PatchOverlay

        return PatchOverlay(self.run, **kwargs)

    def __repr__(self) -> str:
        share = self.share_per_layer if self.text_image_share is not None else np.array([])
        sinks = int(self.visual_sink.any(axis=0).sum()) if self.visual_sink is not None else 0
        n_high = len(self.high_norm["layer"]) if self.high_norm else 0
        shares = " ".join(f"{v:.2f}" for v in share)
        return (f"VisionResult(images={len(self.run.images)}, image_tokens={int((self.run.modality == 1).sum())}, "
                f"text→image share per layer=[{shares}], visual_sink_tokens={sinks}, high_norm_patches={n_high})")

    def _repr_html_(self) -> str:
        from lens._display import html_card

        return html_card("VisionResult", repr(self)[len("VisionResult("):-1], self.to_frame("modality"),
                         lines=["per layer and modality: mass received / uniform share, sink-token fraction, mean norm"])


def modality_table(run: Run, tau: float = 5.0) -> dict[str, Any]:
    """Per (layer, modality): token count, mean ratio of mass received to uniform share (over heads and tokens),
    fraction of (token, head) pairs that are sink tokens (ratio > τ), and the mean residual norm at the block's
    input. Works on any run (text-only runs have text and special tokens only).

    Example: ``pandas.DataFrame(modality_table(run))``.
    """
    run.require("attn.key_mass", "attn.query_count", what="the modality table")
    modality = run.modality
    key_mass, count = run.arrays["attn.key_mass"], run.arrays["attn.query_count"]
    n_layers = key_mass.shape[0]
    uniform = np.concatenate([np.stack([run.uniform_share(layer, s) for layer in range(n_layers)], axis=1)
                              for s in range(run.n_sequences)], axis=0).T  # [L, N]
    mass = np.divide(key_mass, count[:, None], out=np.zeros_like(key_mass), where=count[:, None] > 0)
    ratio = mass / np.maximum(uniform[:, None, :], 1e-30)
    norms = run.arrays.get("resid.norm")
    cols: dict[str, list] = {k: [] for k in ("layer", "modality", "tokens", "mass_to_uniform", "sink_token_fraction",
                                             "mean_norm")}
    for layer in range(n_layers):
        for code, name in MODALITY_NAMES.items():
            sel = modality == code
            if not sel.any():
                continue
            r = ratio[layer][:, sel]
            cols["layer"].append(layer)
            cols["modality"].append(name)
            cols["tokens"].append(int(sel.sum()))
            cols["mass_to_uniform"].append(float(r.mean()))
            cols["sink_token_fraction"].append(float((r > tau).mean()))
            cols["mean_norm"].append(float(norms[layer, sel].mean()) if norms is not None else float("nan"))
    return cols


def _text_image_share(run: Run) -> tuple[np.ndarray | None, np.ndarray | None]:
    if "attn.text_key_mass" not in run.arrays:
        return None, None
    key_mass, uniform = run.arrays["attn.text_key_mass"], run.arrays["attn.text_uniform"]
    n_text = run.arrays["attn.text_count"]
    image = run.modality == 1
    n_layers, n_heads, _ = key_mass.shape
    share = np.full((run.n_sequences, n_layers, n_heads), np.nan)
    uni = np.full((run.n_sequences, n_layers), np.nan)
    for s in range(run.n_sequences):
        sl = run.span(s)
        keys = image[sl]
        if n_text[s] == 0 or not keys.any():
            continue
        share[s] = key_mass[:, :, sl][:, :, keys].sum(-1) / n_text[s]
        uni[s] = uniform[:, sl][:, keys].sum(-1) / n_text[s]
    return share, uni


def _visual_sinks(run: Run, phi_tau: float) -> tuple[np.ndarray | None, list | None]:
    if "resid.sink_phi" not in run.arrays:
        return None, None
    phi, first, dims = run.arrays["resid.sink_phi"], run.arrays["resid.sink_phi_first"], run.arrays["resid.sink_dims"]
    image = run.modality == 1
    n_res = phi.shape[0]
    flags = np.zeros((n_res, phi.shape[1]), dtype=bool)
    found: list[list[np.ndarray]] = []
    for layer in range(n_res):
        per_seq = []
        for s in range(run.n_sequences):
            sl = run.span(s)
            massive = first[layer, s] >= phi_tau  # the sink dimensions D: where the first token is massive
            per_seq.append(dims[layer, s][massive])
            if massive.any():
                flags[layer, sl] = image[sl] & (phi[layer, sl][:, massive] >= phi_tau).any(axis=1)
        found.append(per_seq)
    return flags, found


def _high_norm(run: Run, ratio: float) -> dict[str, np.ndarray] | None:
    if "vision.norm" not in run.arrays:
        return None
    norm = run.arrays["vision.norm"]
    image, tile = run.arrays["vision.image"], run.arrays["vision.tile"]
    row, col = run.arrays["vision.row"], run.arrays["vision.col"]
    patch = row >= 0
    out: dict[str, list] = {k: [] for k in ("layer", "index", "image", "tile", "row", "col", "norm", "ratio")}
    keys = np.unique(np.stack([image, tile], axis=1), axis=0) if len(image) else np.zeros((0, 2), int)
    for i, t in keys:
        sel = np.nonzero((image == i) & (tile == t) & patch)[0]
        if len(sel) < 2:
            continue
        for layer in range(norm.shape[0]):
            values = norm[layer, sel]
            median = float(np.median(values))
            if median <= 0:
                continue
            for j in np.nonzero(values > ratio * median)[0]:
                n = int(sel[j])
                for name, value in (("layer", layer), ("index", n), ("image", int(i)), ("tile", int(t)),
                                    ("row", int(row[n])), ("col", int(col[n])), ("norm", float(values[j])),
                                    ("ratio", float(values[j] / median))):
                    out[name].append(value)
    return {k: np.asarray(v) for k, v in out.items()}


def vision(run: Run, *, phi_tau: float = SINK_PHI_TAU, norm_ratio: float = HIGH_NORM_RATIO, tau: float = 5.0) -> VisionResult:
    """Text→image attention share, visual sink tokens, high-norm vision-encoder patches and the modality split
    of a run of a vision-language model (docs/definitions.md#vision-language-models).

    ``phi_tau``: the massive-φ threshold of Kang et al. (ICLR 2025), 20; ``norm_ratio``: a vision-tower
    patch is high-norm when its norm exceeds this × the median patch norm of its tile (Darcet et al., ICLR
    2024), 4; ``tau``: the sink-token threshold of the modality table (mass > τ × uniform share), 5.

    Raises ``RunFormatError`` for a run without image tokens, ``ConfigError`` for non-positive thresholds.

    Example::

        run = lens.trace(vlm, [{"image": "cat.png", "text": lens.image_prompt(vlm)}])
        v = lens.vision(run)
        v.share_per_layer, v.to_frame("visual_sinks"), v.to_frame("high_norm")
    """
    if phi_tau <= 0 or norm_ratio <= 0 or tau <= 0:
        raise ConfigError(f"thresholds must be > 0; got phi_tau={phi_tau}, norm_ratio={norm_ratio}, tau={tau}")
    _require_images(run)
    share, uniform = _text_image_share(run)
    flags, dims = _visual_sinks(run, phi_tau)
    return VisionResult(run=run, phi_tau=phi_tau, norm_ratio=norm_ratio, tau=tau, text_image_share=share,
                        uniform_text_image_share=uniform, visual_sink=flags, sink_dims=dims,
                        high_norm=_high_norm(run, norm_ratio))
