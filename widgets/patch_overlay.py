"""``PatchOverlay``: an image a vision-language model saw, with its patch grid coloured by a statistic."""

from __future__ import annotations

from typing import Any

import numpy as np
import traitlets

from lens.analysis.vision import HIGH_NORM_RATIO, SINK_PHI_TAU
from lens.errors import ConfigError
from lens.run import Run

from ._base import LensWidget
from ._data import check_run, f32, i32, u8

__all__ = ["PatchOverlay", "STATS"]

#: statistic → (label, grid: "token" = the language model's image tokens, "patch" = the vision tower's patches)
STATS = {
    "mass": ("attention mass received", "token"),
    "text_mass": ("mass from the text queries (mean)", "token"),
    "from_token": ("mass from one text token (head mean)", "token"),
    "norm": ("residual norm ‖x‖", "token"),
    "visual_sink": ("φ in the sink dimensions (visual sink ≥ τ)", "token"),
    "neuron": ("a tracked neuron's activation", "token"),
    "encoder_norm": ("vision-encoder token norm ‖x‖", "patch"),
    "encoder_mass": ("vision-encoder mass received", "patch"),
}
_NEEDS = {"mass": "attn.key_mass", "text_mass": "attn.text_key_mass", "from_token": "attn.rows", "norm": "resid.norm",
          "visual_sink": "resid.sink_phi", "neuron": "mlp.tracked", "encoder_norm": "vision.norm",
          "encoder_mass": "vision.key_mass"}
_USES_HEAD = {"mass", "text_mass", "encoder_mass"}


class PatchOverlay(LensWidget):
    """The image (or one tile of it) as the model saw it, its grid of image tokens — or of the vision
    encoder's patches — coloured by a statistic at a chosen layer (docs/definitions.md#vision-language-models).

    Statistics (``stat``): ``"mass"`` — attention mass received m[ℓ,h,k] by each image token (head ``head``, or
    the mean over heads with ``head=-1``; cells > τ × the uniform share are outlined as sink tokens);
    ``"text_mass"`` — the mass the text queries after the image put on it (mean over those queries);
    ``"from_token"`` — the mass one text token (``query``, its position in the sequence) puts on it, head mean;
    ``"norm"`` — the residual norm entering block ℓ; ``"visual_sink"`` — its largest φ = abs(x)/rms(x) in the
    sink dimensions of the first token, visual sinks (φ ≥ τ_φ = 20, Kang et al. ICLR 2025) outlined;
    ``"neuron"`` — the activation of a neuron passed to ``lens.trace(..., track_neurons=...)`` (``neuron`` is
    its index in that list); ``"encoder_norm"`` / ``"encoder_mass"`` — the vision tower's own token norms and
    attention mass on its patch grid, high-norm patches (> 4 × the tile's median, Darcet et al. ICLR 2024)
    outlined. Clicking a cell (or arrows + Enter) selects it: ``patch`` (its index, row-major, −1: none) is
    readable from Python and the panel lists its token, value and flags.

    Example::

        run = lens.trace(vlm, [{"image": img, "text": lens.image_prompt(vlm)}])
        lens.widgets.PatchOverlay(run, stat="from_token", layer=12)     # or lens.vision(run).show()
    """

    _component = "patch_overlay"
    _selection = ("image", "tile", "stat", "layer", "head", "query", "neuron")
    _float_traits = frozenset({"values", "details"})

    info = traitlets.Dict().tag(sync=True)
    image = traitlets.Int(0).tag(sync=True)
    tile = traitlets.Int(0).tag(sync=True)
    stat = traitlets.Unicode("mass").tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(-1, help="-1: mean over heads").tag(sync=True)
    query = traitlets.Int(-1, help="position of the text token for stat='from_token'").tag(sync=True)
    neuron = traitlets.Int(-1, help="index into the run's tracked neurons for stat='neuron'").tag(sync=True)
    patch = traitlets.Int(-1, help="the selected cell, row-major (-1: none)").tag(sync=True)
    pixels = traitlets.Bytes(help="uint8 [H, W, 3] of the tile").tag(sync=True)
    values = traitlets.Bytes(help="float32 [rows × cols]; NaN where no token").tag(sync=True)
    flags = traitlets.Bytes(help="uint8 [rows × cols]: outlined cells").tag(sync=True)
    cell_tokens = traitlets.Bytes(help="int32 [rows × cols]: token position in the sequence (vision tokens: index)").tag(sync=True)
    details = traitlets.Bytes(help="float32 [rows × cols × k] for the click panel").tag(sync=True)
    grid_meta = traitlets.Dict().tag(sync=True)

    def __init__(self, run: Run, *, image: int = 0, tile: int = 0, stat: str = "mass", layer: int | None = None,
                 head: int = -1, query: int | None = None, neuron: int = -1):
        run = check_run(run, "PatchOverlay")
        if "modality" not in run.arrays or not run.images:
            raise ConfigError("PatchOverlay shows the images of a vision-language model's run: "
                              "lens.trace(vlm, [{'image': img, 'text': lens.image_prompt(vlm)}])")
        self._run = run
        self._queries = self._text_queries()
        stats = {name: {"label": label, "grid": grid, "layers": self._n_layers(name), "head": name in _USES_HEAD,
                        "query": name == "from_token", "neuron": name == "neuron"}
                 for name, (label, grid) in STATS.items() if _NEEDS[name] in run.arrays}
        images = [{"sequence": int(m["sequence"]), "tiles": [{"tile": int(t["tile"]), "role": t["role"],
                   "grid": t["grid"], "patch_grid": t["patch_grid"]} for t in m["tiles"]]} for m in run.images]
        tokens = {str(s): [[int(q), label] for q, label in qs] for s, qs in self._queries.items()}
        info = {"model": str(run.provenance.get("model_id", "?")), "stats": stats, "images": images,
                "n_heads": run.n_heads, "vision_heads": int(run.meta.get("vision", {}).get("n_heads", 0)),
                "queries": tokens, "neurons": [list(map(int, p)) for p in run.meta.get("tracked_neurons", [])],
                "tau": SINK_PHI_TAU, "norm_ratio": HIGH_NORM_RATIO}
        if query is None:
            query = self._default_query(image)
        if layer is None:
            layer = max(0, stats.get(stat, {"layers": 1})["layers"] // 2)
        super().__init__(info=info, image=image, tile=tile, stat=stat, layer=layer, head=head,
                         query=query if stat == "from_token" else -1, neuron=neuron if stat == "neuron" else -1)

    # -- facts of the run ---------------------------------------------------------------------------------
    def _n_layers(self, stat: str) -> int:
        arrays = self._run.arrays
        return int(arrays[_NEEDS[stat]].shape[0]) if stat != "neuron" else 1

    def _text_queries(self) -> dict[int, list[tuple[int, str]]]:
        run = self._run
        if "attn.rows" not in run.arrays:
            return {}
        out: dict[int, list[tuple[int, str]]] = {}
        for seq, q in zip(run.arrays["attn.row_sequence"].tolist(), run.arrays["attn.row_query"].tolist()):
            out.setdefault(seq, []).append((q, run.token_labels(seq)[q]))
        return out

    def _default_query(self, image: int) -> int:
        if not 0 <= image < len(self._run.images):
            return -1
        queries = self._queries.get(int(self._run.images[image]["sequence"]), [])
        return queries[-1][0] if queries else -1

    # -- selection ------------------------------------------------------------------------------------------
    def _on_selection(self, change) -> None:
        """Changing the statistic or the image from Python keeps the rest of the selection valid (layer clamped,
        head / query / neuron reset where the statistic does not use them), then derives once."""
        if getattr(self, "_normalizing", False):
            return
        if change.name in ("stat", "image", "tile"):
            self._normalizing = True
            try:
                self._normalize()
            finally:
                self._normalizing = False
        self._refresh()

    def _normalize(self) -> None:
        stat = self.stat
        if stat not in STATS or _NEEDS[stat] not in self._run.arrays:
            return  # _refresh names the problem
        self.layer = min(max(self.layer, 0), self._n_layers(stat) - 1)
        if stat not in _USES_HEAD:
            self.head = -1
        elif stat == "encoder_mass" and self.head >= int(self._run.meta["vision"]["n_heads"]):
            self.head = -1
        if stat == "from_token":
            seq = int(self._run.images[self.image]["sequence"]) if 0 <= self.image < len(self._run.images) else -1
            if self.query not in [q for q, _ in self._queries.get(seq, [])]:
                self.query = self._default_query(self.image)
        else:
            self.query = -1
        self.neuron = max(self.neuron, 0) if stat == "neuron" else -1

    def _validate_selection(self, selection: dict[str, Any]) -> None:
        run = self._run
        image, tile, stat = selection["image"], selection["tile"], selection["stat"]
        if not 0 <= image < len(run.images):
            raise ConfigError(f"image must be in [0, {len(run.images)}); got {image}")
        tiles = [t["tile"] for t in run.images[image]["tiles"]]
        if tile not in tiles:
            raise ConfigError(f"image {image} has tiles {tiles}; got tile={tile}")
        if stat not in STATS:
            raise ConfigError(f"stat must be one of {sorted(STATS)}; got {stat!r}")
        if _NEEDS[stat] not in run.arrays:
            raise ConfigError(f"stat {stat!r} needs {_NEEDS[stat]}, which this run did not capture")
        if not 0 <= selection["layer"] < self._n_layers(stat):
            raise ConfigError(f"layer must be in [0, {self._n_layers(stat)}) for {stat!r}; got {selection['layer']}")
        heads = run.n_heads if stat != "encoder_mass" else int(run.meta["vision"]["n_heads"])
        if not -1 <= selection["head"] < heads:
            raise ConfigError(f"head must be -1 (mean) or in [0, {heads}); got {selection['head']}")
        if stat == "from_token":
            seq = int(run.images[image]["sequence"])
            allowed = [q for q, _ in self._queries.get(seq, [])]
            if selection["query"] not in allowed:
                raise ConfigError(f"query must be the position of a text token after the image: one of {allowed}")
        if stat == "neuron" and not 0 <= selection["neuron"] < len(run.meta.get("tracked_neurons", [])):
            raise ConfigError("stat='neuron' needs a neuron traced with lens.trace(..., track_neurons=[(layer, n)]) "
                              "and neuron= its index in that list")

    def _derive(self, selection: dict[str, Any], hints: dict[str, Any]) -> dict[str, Any]:
        run = self._run
        image, tile, stat, layer = selection["image"], selection["tile"], selection["stat"], selection["layer"]
        meta = next(t for t in run.images[image]["tiles"] if t["tile"] == tile)
        seq = int(run.images[image]["sequence"])
        if STATS[stat][1] == "token":
            rows, cols = meta["grid"]
            cells, where = self._token_cells(image, tile, rows, cols)
            values, flags, details, names = self._token_values(selection, seq, cells, where)
        else:
            rows, cols = meta["patch_grid"]
            cells, where = self._patch_cells(image, tile, rows, cols)
            values, flags, details, names = self._patch_values(selection, cells, where)
        pixels = run.image_pixels(image, tile)
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        if stat in ("mass", "text_mass", "from_token"):
            lo = 0.0
        return {
            "pixels": u8(pixels), "values": f32(values), "flags": u8(flags), "cell_tokens": i32(cells),
            "details": f32(details),
            "grid_meta": {"image": image, "tile": tile, "stat": stat, "layer": layer, "head": selection["head"],
                          "query": selection["query"], "neuron": selection["neuron"], "rows": int(rows), "cols": int(cols),
                          "height": int(pixels.shape[0]), "width": int(pixels.shape[1]), "vmin": lo,
                          "vmax": hi if hi > lo else lo + 1e-9, "label": STATS[stat][0], "detail_names": names,
                          "sequence": seq},
        }

    def _token_cells(self, image: int, tile: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        """Per cell: the token's position in its sequence (−1: none) and its flat index in the run."""
        a = self._run.arrays
        flat = np.nonzero((a["image.index"] == image) & (a["image.tile"] == tile) & (a["image.row"] >= 0))[0]
        cells = np.full(rows * cols, -1, dtype=np.int64)
        where = np.full(rows * cols, -1, dtype=np.int64)
        seq = int(self._run.images[image]["sequence"])
        cell = a["image.row"][flat] * cols + a["image.col"][flat]
        cells[cell], where[cell] = flat - int(self._run.offsets[seq]), flat
        return cells, where

    def _patch_cells(self, image: int, tile: int, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
        a = self._run.arrays
        flat = np.nonzero((a["vision.image"] == image) & (a["vision.tile"] == tile) & (a["vision.row"] >= 0))[0]
        cells = np.full(rows * cols, -1, dtype=np.int64)
        inside = (a["vision.row"][flat] < rows) & (a["vision.col"][flat] < cols)
        flat = flat[inside]
        cells[a["vision.row"][flat] * cols + a["vision.col"][flat]] = flat
        return cells, cells.copy()

    def _token_values(self, sel, seq: int, cells, where):
        run, a = self._run, self._run.arrays
        layer, head, stat = sel["layer"], sel["head"], sel["stat"]
        ok = where >= 0
        values = np.full(len(where), np.nan)
        flags = np.zeros(len(where), dtype=np.uint8)
        n = where[ok]

        def mass(layer_: int) -> np.ndarray:
            km = a["attn.key_mass"][layer_][:, n]
            km = km.mean(0) if head < 0 else km[head]
            return km / np.maximum(a["attn.query_count"][layer_, n], 1)

        if stat == "mass":
            values[ok] = mass(layer)
            uniform = a["attn.uniform_share"][layer, n] if "attn.uniform_share" in a else np.full(len(n), np.nan)
            flags[ok] = values[ok] > 5.0 * uniform
        elif stat == "text_mass":
            km = a["attn.text_key_mass"][layer][:, n]
            values[ok] = (km.mean(0) if head < 0 else km[head]) / max(int(a["attn.text_count"][seq]), 1)
        elif stat == "from_token":
            r = int(np.nonzero((a["attn.row_sequence"] == seq) & (a["attn.row_query"] == sel["query"]))[0][0])
            row = a["attn.rows"][layer, a["attn.row_offsets"][r] : a["attn.row_offsets"][r + 1]]
            values[ok] = row[cells[ok]]
        elif stat == "norm":
            values[ok] = a["resid.norm"][layer, n]
        elif stat == "visual_sink":
            phi = self._phi(layer, seq, n)
            values[ok] = phi
            flags[ok] = phi >= SINK_PHI_TAU
        elif stat == "neuron":
            values[ok] = a["mlp.tracked"][sel["neuron"], n]
        details = np.full((len(where), 3), np.nan)
        lm_layer = min(layer, run.n_layers - 1)
        if "attn.key_mass" in a:
            details[ok, 0] = mass(lm_layer)
        if "resid.norm" in a:
            details[ok, 1] = a["resid.norm"][min(layer, a["resid.norm"].shape[0] - 1), n]
        if "resid.sink_phi" in a:
            details[ok, 2] = self._phi(min(layer, a["resid.sink_phi"].shape[0] - 1), seq, n)
        return values, flags, details, [f"mass received (layer {lm_layer}, {'mean over heads' if head < 0 else f'head {head}'})",
                                        "residual norm", "φ in the sink dimensions"]

    def _phi(self, layer: int, seq: int, n: np.ndarray) -> np.ndarray:
        a = self._run.arrays
        dims = a["resid.sink_phi_first"][layer, seq] >= SINK_PHI_TAU
        if not dims.any():
            return np.zeros(len(n))
        return a["resid.sink_phi"][layer][n][:, dims].max(axis=1)

    def _patch_values(self, sel, cells, where):
        a = self._run.arrays
        layer, head, stat = sel["layer"], sel["head"], sel["stat"]
        ok = where >= 0
        n = where[ok]
        values = np.full(len(where), np.nan)
        norm_layer = min(layer, a["vision.norm"].shape[0] - 1)
        norms = a["vision.norm"][norm_layer, n]
        median = float(np.median(norms)) if len(norms) else 0.0
        if stat == "encoder_norm":
            values[ok] = norms
        else:
            km = a["vision.key_mass"][layer][:, n]
            values[ok] = (km.mean(0) if head < 0 else km[head]) / np.maximum(a["vision.query_count"][layer, n], 1)
        flags = np.zeros(len(where), dtype=np.uint8)
        flags[ok] = norms > HIGH_NORM_RATIO * median if median > 0 else 0
        details = np.full((len(where), 3), np.nan)
        details[ok, 0] = norms
        details[ok, 1] = norms / median if median > 0 else np.nan
        mass_layer = min(layer, a["vision.key_mass"].shape[0] - 1)
        details[ok, 2] = a["vision.key_mass"][mass_layer][:, n].mean(0) / np.maximum(a["vision.query_count"][mass_layer, n], 1)
        return values, flags, details, [f"encoder norm (layer {norm_layer})", "norm / tile median",
                                        "encoder mass received (head mean)"]

    # -- export -----------------------------------------------------------------------------------------------
    def _export_hints(self, level: int):
        """A standalone file holds every image; if that is too large, the current image only; then the current
        image and statistic only."""
        plan = [{}, {"scope": "image"}, {"scope": "stat"}]
        return plan[level] if level < len(plan) else None

    def _build_html(self, hints, title, precision, sequences) -> str:
        self._export_scope = hints.get("scope")
        try:
            return super()._build_html(hints, title, precision, sequences)
        finally:
            self._export_scope = None

    def _export_selections(self):
        """Every image, tile, statistic and layer (fewer when the file would be too large: see
        ``_export_hints``); heads only as the mean, every text query for ``from_token``, every tracked neuron."""
        scope = getattr(self, "_export_scope", None)
        out = []
        for image, meta in enumerate(self._run.images):
            if scope and image != self.image:
                continue
            seq = int(meta["sequence"])
            for t in meta["tiles"]:
                for stat, spec in self.info["stats"].items():
                    if scope == "stat" and stat != self.stat:
                        continue
                    queries = [q for q, _ in self._queries.get(seq, [])] if spec["query"] else [-1]
                    neurons = range(len(self.info["neurons"])) if spec["neuron"] else [-1]
                    for layer in range(spec["layers"]):
                        for q in queries:
                            for nrn in neurons:
                                out.append({"image": image, "tile": t["tile"], "stat": stat, "layer": layer, "head": -1,
                                            "query": q, "neuron": nrn})
        current = self._current_selection()
        if current not in out:
            out.append(current)
        return out

    def _default_title(self) -> str:
        return f"lens — image patches of {self.info.get('model', '?')}"
