"""``lens.visual_tokens``: what each image token means inside the language model, read three ways
(docs/definitions.md, "Visual tokens / LatentLens"):

* **LatentLens** (Krojer et al. 2026): the global top-k contextual text tokens of a ``lens.TextBank`` by cosine,
  merged over the bank's layers — each neighbour with its token, sentence, position and bank layer;
* **logit lens** (nostalgebraist 2020): the top-k tokens of ``softmax(W_U · norm_final(X_ℓ[t]))``;
* **embedding lens**: the top-k rows of the input embedding matrix by cosine with X_ℓ[t].

The two baselines read the model's final norm, unembedding and input embedding from the bank (built with
``lenses=True``, the default), so the function is pure: a run and a bank in, a table out.

The run must come from a vision-language model traced with images and ``keep_hidden=[...]`` (the image
tokens are ``run.arrays["modality"] == 1``; their grid cell is ``image.index``/``image.row``/``image.col``).
``VisualTokens.from_states`` reads hidden states that were computed elsewhere (e.g. a Hugging Face forward
with ``output_hidden_states=True``) with the same code.

Example::

    run = lens.trace(vlm, [{"image": img, "text": prompt}], keep_hidden=[8, 16])
    vt = lens.visual_tokens(run, bank, k=5)
    vt.to_frame().query("method == 'latentlens' and rank == 0")
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from lens.errors import ConfigError, InputError, MissingDependencyError

__all__ = ["visual_tokens", "VisualTokens", "METHODS", "IMAGE_MODALITY"]

#: the three readings, in the order of the paper's comparison
METHODS = ("latentlens", "embedding_lens", "logit_lens")
#: ``run.arrays["modality"]`` code of an image token (lens.capture.vision: text 0, image 1, special 2)
IMAGE_MODALITY = 1


@dataclass(repr=False)
class VisualTokens:
    """Top-k readings of image tokens at a few layers, by up to three methods (see the module docstring).

    ``tokens``: one dict of arrays ``[n]`` describing the queried tokens — ``token`` (index in the run),
    ``sequence``, ``position``, ``image``, ``row``, ``col``. ``layers``: the residual layers read.
    ``ids[method][layer]`` int64 ``[n, k]`` (bank rows for LatentLens, vocabulary ids for the baselines) and
    ``scores[method][layer]`` float32 ``[n, k]`` (cosine; log-probability for the logit lens).
    """

    bank: Any
    tokens: dict[str, np.ndarray]
    layers: tuple[int, ...]
    k: int
    ids: dict[str, dict[int, np.ndarray]]
    scores: dict[str, dict[int, np.ndarray]]
    search: str = "exact"
    notes: dict[str, str] = field(default_factory=dict)
    run: Any = None  # the Run read by lens.visual_tokens (for .show())

    # -- computing ----------------------------------------------------------------------------------------
    @classmethod
    def from_states(cls, states: dict[int, np.ndarray], tokens: dict[str, np.ndarray], bank, *, k: int = 5,
                    method: str = "exact", baselines: bool = True, bank_layers: Sequence[int] | None = None,
                    nprobe: int | None = None) -> "VisualTokens":
        """Read hidden states ``states[ℓ]`` ``[n, d]`` (X_ℓ of the ``n`` tokens described by ``tokens``).

        Raises ``ConfigError`` (k, layers, dimensions), ``InputError`` (no tokens).
        """
        layers = tuple(sorted(int(x) for x in states))
        n = len(next(iter(tokens.values()))) if tokens else 0
        if n == 0 or not layers:
            raise InputError("no image tokens to read; trace a vision-language model with an image")
        if not 1 <= int(k) <= len(bank):
            raise ConfigError(f"k={k} but the bank holds {len(bank)} entries; ask for 1 ≤ k ≤ {len(bank)}")
        ids: dict[str, dict[int, np.ndarray]] = {m: {} for m in METHODS}
        scores: dict[str, dict[int, np.ndarray]] = {m: {} for m in METHODS}
        notes: dict[str, str] = {}
        lenses = bank.lenses if baselines else None
        if baselines and lenses is None:
            notes["baselines"] = "the bank was built with lenses=False: no logit or embedding lens"
        elif lenses is not None and (lenses.unembedding is None or lenses.norm is None):
            notes["logit_lens"] = f"no logit lens: {lenses.logit_lens_unavailable}"
        for layer in layers:
            x = np.asarray(states[layer], dtype=np.float32)
            if x.shape != (n, bank.d_model):
                raise ConfigError(f"states[{layer}] has shape {x.shape}; expected ({n}, {bank.d_model})")
            found = bank.search(x, k=k, layers=bank_layers, method=method, nprobe=nprobe)
            ids["latentlens"][layer], scores["latentlens"][layer] = found.ids, found.scores
            if lenses is not None:
                ids["embedding_lens"][layer], scores["embedding_lens"][layer] = lenses.embedding_lens(x, k)
                if "logit_lens" not in notes:
                    ids["logit_lens"][layer], scores["logit_lens"][layer] = lenses.logit_lens(x, k)
        ids = {m: v for m, v in ids.items() if v}
        scores = {m: v for m, v in scores.items() if v}
        return cls(bank, {key: np.asarray(v) for key, v in tokens.items()}, layers, int(k), ids, scores,
                   method if method == "exact" else "approximate", notes)

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(m for m in METHODS if m in self.ids)

    def __len__(self) -> int:
        return int(len(self.tokens["token"]))

    def words(self, method: str, layer: int) -> list[list[str]]:
        """The top-k token strings ``[n][k]`` of one method at one layer."""
        ids = self.ids[method][layer]
        if method == "latentlens":
            flat = self.bank.token(ids.reshape(-1))
        else:
            flat = self._vocab_strings(ids.reshape(-1))
        return [flat[i * self.k : (i + 1) * self.k] for i in range(ids.shape[0])]

    def _vocab_strings(self, ids: np.ndarray) -> list[str]:
        vocab = self.bank.vocab  # every id of the vocabulary when the bank carries the lenses
        return [vocab.get(int(i), "") for i in ids]

    def to_frame(self):
        """One row per (token, layer, method, rank): ``token`` (index in the run), ``sequence``, ``position``,
        ``image``, ``row``, ``col``, ``layer``, ``method``, ``rank`` (0 = best), ``neighbour`` (token string),
        ``neighbour_id``, ``score`` (cosine; log-probability for the logit lens), and for LatentLens
        ``bank_layer``, ``sentence``, ``bank_position``, ``context`` (its sentence with the token in [[ ]])."""
        import pandas as pd

        frames = []
        n, k = len(self), self.k
        for method in self.methods:
            for layer in self.layers:
                ids = self.ids[method][layer].reshape(-1)
                part = {name: np.repeat(values, k) for name, values in self.tokens.items()}
                part.update(layer=np.full(n * k, layer), method=method, rank=np.tile(np.arange(k), n))
                part["score"] = self.scores[method][layer].reshape(-1)
                if method == "latentlens":
                    bank = self.bank
                    part.update(neighbour=bank.token(ids), neighbour_id=bank.token_id[ids], bank_layer=bank.layer[ids],
                                sentence=bank.sentence[ids], bank_position=bank.position[ids],
                                context=[bank.context(int(r)) for r in ids])
                else:
                    part.update(neighbour=self._vocab_strings(ids), neighbour_id=ids)
                frames.append(pd.DataFrame(part))
        return pd.concat(frames, ignore_index=True)

    def top(self, token: int, layer: int | None = None) -> dict[str, list[str]]:
        """The top-k strings of every method for the ``token``-th image token (at ``layer``, default the first)."""
        layer = self.layers[0] if layer is None else int(layer)
        return {m: self.words(m, layer)[token] for m in self.methods}

    def token_at(self, image: int, row: int, col: int, tile: int = 0) -> int | None:
        """Index (into this result) of the image token at grid cell (row, col) of ``image``/``tile``; None if none."""
        t = self.tokens
        hit = (t["image"] == image) & (t["row"] == row) & (t["col"] == col)
        if "tile" in t:
            hit &= t["tile"] == tile
        found = np.flatnonzero(hit)
        return int(found[0]) if len(found) else None

    def neighbours_html(self, index: int) -> str:
        """An HTML table of every method's top-k for image token ``index``, one row per layer."""
        head = "".join(f"<th>{html.escape(m)}</th>" for m in self.methods)
        rows = []
        for layer in self.layers:
            cells = []
            for m in self.methods:
                words = self.words(m, layer)[index]
                if m == "latentlens":
                    ids = self.ids[m][layer][index]
                    words = [f"<span title='{html.escape(self.bank.context(int(r)))}'>{html.escape(w)}</span>"
                             for w, r in zip(words, ids)]
                else:
                    words = [html.escape(w) for w in words]
                cells.append(f"<td>{' · '.join(words)}</td>")
            rows.append(f"<tr><th>layer {layer}</th>{''.join(cells)}</tr>")
        t = self.tokens
        where = f"image {t['image'][index]}, row {t['row'][index]}, col {t['col'][index]} (token {t['position'][index]})"
        return f"<b>{html.escape(where)}</b><table><tr><th></th>{head}</tr>{''.join(rows)}</table>"

    def show(self, *, image: int = 0, stat: str = "norm", layer: int | None = None):
        """The image in a ``lens.widgets.PatchOverlay`` (coloured by ``stat`` at ``layer``); clicking a patch
        lists its token's top-k by every method at every layer read (hover a LatentLens neighbour for its
        sentence). Needs the result of ``lens.visual_tokens(run, ...)`` (it keeps the run) and ipywidgets.

        Example: ``lens.visual_tokens(run, bank, layers=[8]).show(stat="mass")``.
        """
        if self.run is None:
            raise ConfigError("show() needs the run: compute the result with lens.visual_tokens(run, bank)")
        try:
            import ipywidgets
        except ImportError as exc:
            raise MissingDependencyError(
                'show() draws the image with widgets: pip install "lens-interp[widgets]" (to_frame() needs nothing more)'
            ) from exc
        from lens.widgets import PatchOverlay

        overlay = PatchOverlay(self.run, image=image, stat=stat, layer=self.layers[0] if layer is None else layer)
        panel = ipywidgets.HTML("<i>click a patch to list its neighbours</i>")

        def update(change=None) -> None:
            cell, cols = int(overlay.patch), int(overlay.grid_meta.get("cols", 1))
            index = None if cell < 0 else self.token_at(int(overlay.image), cell // cols, cell % cols, int(overlay.tile))
            panel.value = ("<i>click a patch to list its neighbours</i>" if index is None
                           else self.neighbours_html(index))

        overlay.observe(update, names=["patch", "image", "tile"])
        box = ipywidgets.VBox([overlay, panel])
        box.overlay, box.panel = overlay, panel  # for programmatic use and tests
        return box

    def __repr__(self) -> str:
        first = self.top(0)
        shown = "; ".join(f"{m}: {', '.join(repr(w) for w in ws[:3])}" for m, ws in first.items())
        return (f"VisualTokens({len(self)} image tokens, layers={list(self.layers)}, k={self.k}, "
                f"methods={list(self.methods)}, search={self.search}; token 0 at layer {self.layers[0]}: {shown})")

    def _repr_html_(self) -> str:
        layer = self.layers[0]
        head = "".join(f"<th>{html.escape(m)}</th>" for m in self.methods)
        rows = []
        for i in range(min(len(self), 8)):
            cells = "".join(f"<td>{html.escape(', '.join(self.words(m, layer)[i]))}</td>" for m in self.methods)
            where = f"img {self.tokens['image'][i]} ({self.tokens['row'][i]}, {self.tokens['col'][i]})"
            rows.append(f"<tr><td>{html.escape(where)}</td>{cells}</tr>")
        more = f"<p>… {len(self) - 8} more image tokens; .to_frame() has them all</p>" if len(self) > 8 else ""
        return (f"<b>lens.visual_tokens</b>: {len(self)} image tokens, layers {list(self.layers)}, top-{self.k} "
                f"(showing layer {layer})<table><tr><th>patch</th>{head}</tr>{''.join(rows)}</table>{more}")


def _image_tokens(run) -> dict[str, np.ndarray]:
    arrays = run.arrays
    if "modality" not in arrays:
        raise InputError(
            "this run has no image tokens (it records no modality: a text-only trace). Trace a vision-language "
            "model with an image, e.g. lens.trace(vlm, [{'image': img, 'text': prompt}], keep_hidden=[8, 16])"
        )
    rows = np.flatnonzero(np.asarray(arrays["modality"]) == IMAGE_MODALITY)
    if len(rows) == 0:
        raise InputError(
            "this run has no image tokens: none of its sequences holds an image. Trace the model with an image "
            "and a text that contains its image token"
        )
    starts = np.asarray(run.offsets)
    sequence = np.searchsorted(starts, rows, side="right") - 1
    out = {"token": rows, "sequence": sequence, "position": rows - starts[sequence]}
    for name in ("image", "tile", "row", "col"):
        key = f"image.{'index' if name == 'image' else name}"
        out[name] = np.asarray(arrays[key])[rows] if key in arrays else np.full(len(rows), -1)
    return out


def visual_tokens(run, bank, k: int = 5, layers: Sequence[int] | int | None = None, *, method: str = "exact",
                  baselines: bool = True, bank_layers: Sequence[int] | None = None,
                  nprobe: int | None = None) -> VisualTokens:
    """The top-``k`` readings of every image token of ``run`` at ``layers`` by LatentLens (``bank``), the
    embedding lens and the logit lens (docs/definitions.md, "Visual tokens / LatentLens"; Krojer et al. 2026).

    ``run``: a ``lens.Run`` of a vision-language model traced with images and ``keep_hidden`` covering
    ``layers`` (default: every kept layer). ``bank``: a ``lens.TextBank`` built with the run's language model.
    ``method``: "exact" or "approximate" (FAISS IVF; ``nprobe`` lists per query). ``bank_layers``: the bank
    layers searched (default all; their neighbours are merged into one global top-k).

    Returns ``VisualTokens`` (``.to_frame()``, ``.words(method, layer)``). Raises ``BankMismatchError`` when the
    bank comes from another model (layer count, width or weights differ), ``InputError`` when the run holds no
    image tokens, ``ConfigError`` when ``k`` exceeds the bank or a layer was not kept.

    Example: ``lens.visual_tokens(run, lens.TextBank.load("banks/smollm2"), k=5, layers=[8]).to_frame()``.
    """
    from lens.analysis.textbank import check_same_model

    check_same_model(bank.model, run.meta)
    tokens = _image_tokens(run)
    kept = sorted(int(name.rsplit(".", 1)[1]) for name in run.arrays if name.startswith("resid.hidden."))
    if layers is None:
        layers = kept
    chosen = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(x) for x in layers]
    missing = [x for x in chosen if x not in kept]
    if missing or not chosen:
        want = sorted(set(chosen) | set(kept)) or list(bank.layers)  # nothing kept: the bank's layers are the natural ask
        raise ConfigError(
            f"the run kept no hidden states at layers {missing or chosen or '(none asked)'} (it kept {kept or 'none'}); "
            f"trace again with keep_hidden={want}, e.g. lens.trace(vlm, inputs, keep_hidden={want})"
        )
    states = {layer: np.asarray(run.arrays[f"resid.hidden.{layer}"])[tokens["token"]] for layer in chosen}
    result = VisualTokens.from_states(states, tokens, bank, k=k, method=method, baselines=baselines,
                                      bank_layers=bank_layers, nprobe=nprobe)
    result.run = run
    return result
