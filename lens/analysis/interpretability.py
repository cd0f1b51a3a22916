"""Automatic interpretability of visual tokens on a known answer (docs/definitions.md, "Automatic
interpretability of visual tokens").

For images generated with known contents (the demo VLM's scenes), an image token that covers the object is
**interpretable at layer ℓ by method M** when one of its top-k (k = 5) readings — LatentLens neighbours,
embedding-lens tokens or logit-lens tokens (``lens.visual_tokens``) — is the object's colour word or shape word
or one of a fixed list of synonyms (``lens.models.toyvlm.SYNONYMS``). A reading is compared after
normalization: the byte-level space markers ("Ġ", "▁") and surrounding whitespace and punctuation removed,
lower-cased; a word split into several sub-word tokens does not match (stated, not repaired).

The table reports, per method and layer, the fraction of object tokens that are interpretable. The paper's
ordering to compare against (Krojer et al. 2026, v1, judged by an LLM on 10 VLMs): LatentLens ≈ 72%,
embedding lens ≈ 30%, logit lens ≈ 23%.

**Chance** for LatentLens: a neighbour whose label were drawn at random from the searched bank layers would name
the object with probability p = (entries whose token is one of its words) / (entries); k independent draws hit
with 1 − (1 − p)^k, averaged over the object tokens. The control ``bank.shuffled_labels()`` (labels permuted
within each layer, vectors untouched) must score near this chance.

Example::

    vt = lens.visual_tokens(run, bank, k=5)
    result = interpretability(vt, words)            # words[i]: the set naming image token i's object, or empty
    result.to_frame()
"""

from __future__ import annotations

import html
import string
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from lens.errors import ConfigError

__all__ = ["interpretability", "InterpretabilityResult", "normalize_word", "latentlens_chance"]

_STRIP = string.whitespace + string.punctuation + "“”‘’«»…"


def normalize_word(token: str) -> str:
    """A token string as compared with the answer words: ``" Red,"`` → ``"red"``, ``"Ġcircle"`` → ``"circle"``."""
    return token.replace("Ġ", " ").replace("▁", " ").strip(_STRIP).lower()


def latentlens_chance(bank, words: Sequence[set[str]], k: int, bank_layers: Sequence[int] | None = None) -> float:
    """Mean over object tokens of 1 − (1 − p)^k, with p the fraction of searched bank entries naming the
    object (see the module docstring)."""
    rows = np.ones(len(bank), dtype=bool) if bank_layers is None else np.isin(bank.layer, np.asarray(bank_layers))
    ids, counts = np.unique(bank.token_id[rows], return_counts=True)
    normalized = [normalize_word(bank.vocab.get(int(t), "")) for t in ids]
    total = counts.sum()
    chances = []
    for answer in words:
        if not answer:
            continue
        p = counts[[w in answer for w in normalized]].sum() / total if total else 0.0
        chances.append(1.0 - (1.0 - p) ** k)
    return float(np.mean(chances)) if chances else float("nan")


@dataclass(repr=False)
class InterpretabilityResult:
    """Fraction of object tokens interpretable per method and layer.

    ``counts[(method, layer)] = (interpretable, object_tokens)``; ``chance`` (LatentLens, see the module
    docstring); ``label`` names the bank or setting (e.g. "shuffled labels" for the control).
    """

    counts: dict[tuple[str, int], tuple[int, int]]
    k: int
    chance: float | None = None
    label: str = ""
    meta: dict = field(default_factory=dict)

    def fraction(self, method: str, layer: int) -> float:
        hit, total = self.counts[(method, layer)]
        return hit / total if total else float("nan")

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for m, _ in self.counts))

    @property
    def layers(self) -> list[int]:
        return sorted({layer for _, layer in self.counts})

    def to_frame(self):
        """One row per (method, layer): ``method``, ``layer``, ``interpretable``, ``object_tokens``,
        ``fraction``, ``chance`` (LatentLens only), ``setting``."""
        import pandas as pd

        rows = [{"method": m, "layer": layer, "interpretable": hit, "object_tokens": total,
                 "fraction": hit / total if total else float("nan"),
                 "chance": self.chance if m == "latentlens" else None, "setting": self.label}
                for (m, layer), (hit, total) in self.counts.items()]
        return pd.DataFrame(rows)

    def table(self):
        """Fractions as a method × layer table (pandas)."""
        return self.to_frame().pivot(index="method", columns="layer", values="fraction").loc[self.methods]

    def figure(self):
        """Plotly line chart: fraction interpretable against layer, one line per method, chance dotted."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for m in self.methods:
            fig.add_trace(go.Scatter(x=self.layers, y=[self.fraction(m, x) for x in self.layers], mode="lines+markers",
                                     name=m))
        if self.chance is not None:
            fig.add_hline(y=self.chance, line_dash="dot", annotation_text="LatentLens chance")
        fig.update_layout(title=f"Interpretable object tokens (top-{self.k}){' — ' + self.label if self.label else ''}",
                          xaxis_title="layer", yaxis_title="fraction interpretable", yaxis_range=[0, 1])
        return fig

    def best(self) -> dict[str, tuple[int, float]]:
        """Per method, the layer with the highest fraction and that fraction."""
        out = {}
        for m in self.methods:
            layer = max(self.layers, key=lambda x: self.fraction(m, x))
            out[m] = (layer, self.fraction(m, layer))
        return out

    def __repr__(self) -> str:
        n = next(iter(self.counts.values()))[1] if self.counts else 0
        best = ", ".join(f"{m} {f:.0%} (layer {layer})" for m, (layer, f) in self.best().items())
        chance = f", chance {self.chance:.0%}" if self.chance is not None else ""
        label = f" [{self.label}]" if self.label else ""
        return f"InterpretabilityResult({n} object tokens, top-{self.k}; best: {best}{chance}){label}"

    def _repr_html_(self) -> str:
        return f"<b>{html.escape(repr(self))}</b>" + self.table().to_html(float_format=lambda v: f"{v:.0%}")


def interpretability(vt, words: Sequence[set[str] | None], *, label: str = "", chance: bool = True) -> InterpretabilityResult:
    """Fraction of object tokens of ``vt`` (a ``VisualTokens``) interpretable per method and layer.

    ``words``: one entry per image token of ``vt`` — the set of words naming the object it covers (normalized
    as ``normalize_word``), or empty/None for a token that covers no object (it is left out).
    Raises ``ConfigError`` when ``words`` does not have one entry per token or names no object at all.

    Example: ``interpretability(vt, [scene.words() if i in scene.token_indices else set() for i in range(36)])``.
    """
    if len(words) != len(vt):
        raise ConfigError(f"words has {len(words)} entries but there are {len(vt)} image tokens; give one per token")
    answers = [{normalize_word(w) for w in (ws or ())} for ws in words]
    objects = [i for i, a in enumerate(answers) if a]
    if not objects:
        raise ConfigError("no image token covers an object (every entry of words is empty)")
    counts = {}
    for method in vt.methods:
        for layer in vt.layers:
            read = vt.words(method, layer)
            hit = sum(1 for i in objects if any(normalize_word(w) in answers[i] for w in read[i]))
            counts[(method, layer)] = (hit, len(objects))
    level = latentlens_chance(vt.bank, [answers[i] for i in objects], vt.k) if chance and "latentlens" in vt.methods else None
    return InterpretabilityResult(counts, vt.k, level, label, {"search": vt.search})
