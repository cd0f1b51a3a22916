"""``lens.compare(...).to_frame("modality")``: two runs of the same inputs compared per (layer, modality).

For a vision-language model the two deployments (dense vs quantized, dense vs sparse) may change the image tokens
and the text tokens differently; this table says where. Per run, per residual layer ℓ = 0..L and modality (text,
image, special; docs/definitions.md#vision-language-models):

* ``tokens`` — how many tokens of that modality the run has;
* ``mass_to_uniform`` — mean over heads and tokens of m[ℓ,h,k] / u[k] (mass received relative to the uniform
  share), and ``sink_token_fraction`` — the fraction of (token, head) pairs with m > τ·u (attention layers
  ℓ < L only; ``lens.analysis.vision.modality_table``);
* ``mean_norm`` — mean ‖X_ℓ[t]‖ over the modality's tokens;
* ``entropy``, ``normalized_entropy``, ``anisotropy`` — the modality's own valley (``lens.valley(run,
  modality=...)``: normalized raw entropy, normalized Skean entropy, p₁, means over sequences; text and image
  only, and only for runs with image tokens);
* ``text_image_share`` — on the text rows: the share of the text queries' attention that goes to image tokens
  (mean over heads and sequences; ``lens.vision``), where both runs recorded it.

Every quantity also has a ``<name>_delta`` column, b − a, 0 on the reference run's rows.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from lens.analysis.valley import MODALITY_SUBSETS, valley
from lens.analysis.vision import MODALITY_NAMES, _text_image_share, modality_table
from lens.run import Run

__all__ = ["modality_columns", "modality_frame", "QUANTITIES"]

#: the compared quantities, in column order (each gets a ``_delta`` column)
QUANTITIES = ("mass_to_uniform", "sink_token_fraction", "mean_norm", "entropy", "normalized_entropy", "anisotropy",
              "text_image_share")


def modality_columns(run: Run, tau: float = 5.0) -> dict[tuple[int, str], dict[str, float]]:
    """{(residual layer, modality): {"tokens": …, quantity: value}} for one run (NaN where not defined)."""
    modality = run.modality
    n_res = int(run.meta["n_layers"]) + 1
    present = [(code, name) for code, name in MODALITY_NAMES.items() if (modality == code).any()]
    out: dict[tuple[int, str], dict[str, float]] = {}
    norms = run.arrays.get("resid.norm")
    for layer in range(n_res):
        for code, name in present:
            sel = modality == code
            row = {q: float("nan") for q in QUANTITIES}
            row["tokens"] = int(sel.sum())
            if norms is not None:
                row["mean_norm"] = float(norms[layer, sel].mean())
            out[(layer, name)] = row
    if "attn.key_mass" in run.arrays:
        table = modality_table(run, tau)
        for layer, name, mass, frac in zip(table["layer"], table["modality"], table["mass_to_uniform"],
                                           table["sink_token_fraction"]):
            out[(layer, name)].update(mass_to_uniform=mass, sink_token_fraction=frac)
    if "resid.spectrum_raw.image" in run.arrays:
        for name in MODALITY_SUBSETS:
            if f"resid.spectrum_raw.{name}" not in run.arrays:
                continue
            v = valley(run, modality=name)
            for column, source in (("entropy", "entropy_raw_normalized"),
                                   ("normalized_entropy", "entropy_normalized_normalized"), ("anisotropy", "anisotropy")):
                for layer, value in enumerate(v.mean(source)):
                    out[(layer, name)][column] = float(value)
    share, _ = _text_image_share(run)
    if share is not None and any(name == "text" for _, name in present):
        with warnings.catch_warnings():  # a sequence without images has no share: NaN, averaged out
            warnings.simplefilter("ignore", RuntimeWarning)
            per_layer = np.nanmean(share.mean(axis=2), axis=0)
        for layer, value in enumerate(per_layer):
            out[(layer, "text")]["text_image_share"] = float(value)
    return out


def modality_frame(run_a: Run, run_b: Run, labels: tuple[str, str], tau: float = 5.0):
    """The long table of ``CompareResult.to_frame("modality")``: one row per (variant, layer, modality)."""
    import pandas as pd

    a, b = modality_columns(run_a, tau), modality_columns(run_b, tau)
    rows: list[dict[str, Any]] = []
    for i, (label, values) in enumerate(((labels[0], a), (labels[1], b))):
        for (layer, name), row in values.items():
            ref = a[(layer, name)]
            entry: dict[str, Any] = {"variant": label, "layer": layer, "modality": name, "tokens": row["tokens"]}
            entry.update({q: row[q] for q in QUANTITIES})
            entry.update({f"{q}_delta": (0.0 if np.isfinite(row[q]) else np.nan) if i == 0 else row[q] - ref[q]
                          for q in QUANTITIES})
            rows.append(entry)
    frame = pd.DataFrame(rows)
    order = {name: j for j, name in enumerate(MODALITY_NAMES.values())}
    frame = frame.sort_values(["variant", "layer", "modality"], key=lambda c: c.map(order) if c.name == "modality"
                              else (c.map({labels[0]: 0, labels[1]: 1}) if c.name == "variant" else c))
    return frame.reset_index(drop=True)
