"""``AttentionExplorer``: every head of a run at a glance, and any head's token × token pattern on demand."""

from __future__ import annotations

import math

import numpy as np
import traitlets

from lens.errors import ConfigError
from lens.run import Run

from ._base import LensWidget
from ._data import Index, check_index, check_run, f16, f32, i32, pool_pattern, pool_profile, u8

__all__ = ["AttentionExplorer"]


class AttentionExplorer(LensWidget):
    """A layer × head grid of thumbnails coloured by sink score; click a head to see its attention.

    * Grid: one cell per head, coloured by its sink score s[ℓ,h] (mean over queries of A[ℓ,h,q,0], docs/definitions.md,
      for the selected sequence); the thumbnail inside is the mass each key receives, max-pooled into
      ``thumb_bins`` bins; a corner triangle marks heads whose full pattern the run kept.
    * Detail: for a kept head, the token × token heatmap (queries down, keys across) with token labels when
      they fit; hover shows the query and key tokens and the probability; sink keys (mass received above
      τ × the uniform share, docs/definitions.md) are marked above their column. For a head the run did not keep,
      the mass each key receives (``run.mass_received``) with instructions to keep it
      (``keep_patterns=[(layer, head)]``).
    * Under both, the mass received by every key, sink keys highlighted.

    Long sequences: the pattern is block-pooled in Python to at most ``max_cells × max_cells`` (default
    256: T ≤ 256 is sent exactly; above, blocks of ⌈T/256⌉ tokens, max and mean per block) — a 4096-token
    head sends 2 × 256² half floats (pooled values, 3 significant digits; exact patterns stay float32), not
    16M numbers. Clicking a pooled block (or Enter on it) asks Python for that
    region at full resolution, ``tile_size × tile_size`` tokens (default 48) with their labels. The per-key mass is
    sent at full resolution (T numbers) and max-pooled per pixel in the browser. The static export pools
    further when needed to fit its size budget (256 → 128 → 64 → 32 cells, mass into 2048 → 1024 → 512
    bins). A single-token run shows a 1 × 1 pattern. A run traced without ``"attention"`` in ``capture``
    raises ``RunFormatError``; anything but a ``Run`` raises ``ConfigError``.

    Traits Python can read back (and set): ``seq``, ``layer``, ``head``, ``token`` (key position clicked in
    the heatmap or the strip, −1 for none) and ``query`` (query position, −1).

    Example::

        run = lens.trace(lens.load(), ["The cat sat on the mat."], keep_patterns=[(0, 3), (2, 5)])
        explorer = lens.widgets.AttentionExplorer(run)     # or run.show()
        explorer                                           # display it in a notebook
        explorer.layer, explorer.head                      # the head clicked last
        explorer.to_html("attention.html")                 # one offline file
    """

    _component = "attention_explorer"
    _selection = ("seq", "layer", "head")
    _float_traits = frozenset({"scores", "thumbs", "mass", "view", "tile"})

    info = traitlets.Dict(help="run description: shape, kept heads, thresholds").tag(sync=True)
    seq = Index(0, help="selected sequence").tag(sync=True)
    layer = Index(0, help="selected layer").tag(sync=True)
    head = Index(0, help="selected head").tag(sync=True)
    token = Index(-1, help="selected key position (−1: none)").tag(sync=True)
    query = Index(-1, help="selected query position (−1: none)").tag(sync=True)
    scores = traitlets.Bytes(help="float32 [L, H]: sink score of every head in the selected sequence").tag(sync=True)
    thumbs = traitlets.Bytes(help="float32 [L, H, bins]: max-pooled mass received per key bin").tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode(), help="tokens of the selected sequence").tag(sync=True)
    special = traitlets.Bytes(help="uint8 [T]: special-token flags").tag(sync=True)
    mass = traitlets.Bytes(help="float32: mass each key receives in the selected head").tag(sync=True)
    sink_keys = traitlets.Bytes(help="int32: positions of the sink keys of the selected head").tag(sync=True)
    view = traitlets.Bytes(help="[2, nq, nk] block max then block mean of the pattern; float32, or half floats "
                                "when pooled (view_meta['dtype'])").tag(sync=True)
    view_meta = traitlets.Dict(help="what `view` holds: selection, kept, T, block, nq, nk").tag(sync=True)
    tile_request = traitlets.Dict(help="browser → Python: {q0, k0} of a full-resolution tile").tag(sync=True)
    tile = traitlets.Bytes(help="float32 [nq, nk]: full-resolution tile").tag(sync=True)
    tile_meta = traitlets.Dict(help="what `tile` holds").tag(sync=True)

    def __init__(
        self,
        run: Run,
        *,
        layer: int | None = None,
        head: int | None = None,
        seq: int = 0,
        max_cells: int = 256,
        tile_size: int = 48,
        thumb_bins: int = 16,
        tau: float = 5.0,
        epsilon: float = 0.3,
    ):
        run = check_run(run, "AttentionExplorer")
        run.require("attn.key_mass", "attn.query_count", what="AttentionExplorer")
        for name, value, low in (("max_cells", max_cells, 8), ("tile_size", tile_size, 4), ("thumb_bins", thumb_bins, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer ≥ {low}; got {value!r}")
        if not tau > 0 or not 0 < epsilon <= 1:
            raise ConfigError(f"tau must be > 0 and epsilon in (0, 1]; got tau={tau}, epsilon={epsilon}")
        self._run = run
        self._kept = set(run.kept_patterns())
        self._max_cells = max_cells
        self._tile_size = tile_size
        self._thumb_bins = thumb_bins
        self._tau = float(tau)
        self._epsilon = float(epsilon)
        self._seq_cache: tuple[int, dict] | None = None
        seq = check_index(seq, run.n_sequences, "seq", f"the run has {run.n_sequences} sequences")
        if layer is None or head is None:
            layer, head = self._default_head(seq, layer, head)
        prov = run.provenance
        info = {
            "model": str(prov.get("model_id", "?")),
            "attention": str((prov.get("attention") or {}).get("kind", "dense")),
            "quant": (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None,
            "n_layers": run.n_layers,
            "n_heads": run.n_heads,
            "n_sequences": run.n_sequences,
            "lengths": [int(n) for n in run.lengths],
            "texts": [t[:80] if isinstance(t, str) else None for t in run.texts],
            "causal": run.causal,
            "epsilon": self._epsilon,
            "tau": self._tau,
            "kept": [list(p) for p in sorted(self._kept)],
            "max_cells": max_cells,
            "tile_size": tile_size,
            "thumb_bins": thumb_bins,
        }
        super().__init__(info=info, seq=seq, layer=layer, head=head)

    # -- selection --------------------------------------------------------------------------------------
    @traitlets.validate("seq", "layer", "head")
    def _check_selection_trait(self, proposal):
        limits = {"seq": self._run.n_sequences, "layer": self._run.n_layers, "head": self._run.n_heads}
        name = proposal["trait"].name
        return check_index(proposal["value"], limits[name], name, f"the run has {limits[name]}")

    def _validate_selection(self, selection):
        check_index(selection["seq"], self._run.n_sequences, "seq", "sequences of the run")
        check_index(selection["layer"], self._run.n_layers, "layer", "layers of the run")
        check_index(selection["head"], self._run.n_heads, "head", "heads of the run")

    def _default_head(self, seq: int, layer: int | None, head: int | None) -> tuple[int, int]:
        scores = self._seq_data(seq)["_scores"]
        candidates = [(l, h) for l, h in self._kept] or [
            (l, h) for l in range(self._run.n_layers) for h in range(self._run.n_heads)
        ]
        if layer is not None:
            layer = check_index(layer, self._run.n_layers, "layer", "layers of the run")
            candidates = [(l, h) for l, h in candidates if l == layer] or [(layer, h) for h in range(self._run.n_heads)]
        if head is not None:
            head = check_index(head, self._run.n_heads, "head", "heads of the run")
            candidates = [(l, h) for l, h in candidates if h == head] or [(l, head) for l in range(self._run.n_layers)]
        return max(candidates, key=lambda p: (scores[p], -p[0], -p[1]))

    def _seq_data(self, seq: int) -> dict:
        """Per-sequence arrays shared by every head (cached for the last sequence asked)."""
        if self._seq_cache and self._seq_cache[0] == seq:
            return self._seq_cache[1]
        run = self._run
        sl = run.span(seq)
        col = run.arrays["attn.key_mass"][:, :, sl].astype(np.float32)
        count = run.arrays["attn.query_count"][:, None, sl].astype(np.float32)
        mass = np.divide(col, count, out=np.zeros_like(col), where=count > 0)  # [L, H, T]
        length = mass.shape[-1]
        bins = min(self._thumb_bins, length)
        block = math.ceil(length / bins)
        bins = math.ceil(length / block)
        padded = np.pad(mass, ((0, 0), (0, 0), (0, bins * block - length)))
        thumbs = padded.reshape(*mass.shape[:2], bins, block).max(-1)
        data = {
            "_mass": mass,
            "_scores": mass[:, :, 0],
            "_thumb_bins": bins,
            "scores": f32(mass[:, :, 0]),
            "thumbs": f32(thumbs),
            "tokens": run.token_labels(seq),
            "special": u8(run.arrays["special"][sl]),
        }
        self._seq_cache = (seq, data)
        return data

    def _derive(self, selection, hints):
        seq, layer, head = selection["seq"], selection["layer"], selection["head"]
        run = self._run
        data = self._seq_data(seq)
        mass = data["_mass"][layer, head]
        length = mass.shape[0]
        # sink tokens: τ × the uniform share under the model's own mask (sliding windows, padding, …)
        sink_keys = np.nonzero(mass > self._tau * run.uniform_share(layer, seq))[0]
        pooled_mass, mass_block = pool_profile(mass, hints.get("mass_bins"))
        meta = {
            "seq": seq, "layer": layer, "head": head, "T": length, "kept": (layer, head) in self._kept,
            "mass_block": mass_block, "sink_score": float(mass[0]), "thumb_bins": data["_thumb_bins"],
            "block": 0, "nq": 0, "nk": 0, "vmax": None, "dtype": "f32",
        }
        view = b""
        if meta["kept"]:
            block_max, block_mean, block = pool_pattern(
                run.pattern(layer, head, seq), hints.get("cells", self._max_cells), run.causal
            )
            both = np.stack([block_max, block_mean])
            # Pooled blocks are aggregates shown to 3 significant digits: half floats halve the message
            # (the kernel round trip grows with it) and the saved notebook. The exact pattern (block 1)
            # stays float32. The static export asks for float32 and applies its own half-float encoding.
            half = block > 1 and hints.get("view_dtype", "auto") == "auto"
            view = f16(both) if half else f32(both)
            finite = block_max[np.isfinite(block_max)]
            meta.update(block=block, nq=block_max.shape[0], nk=block_max.shape[1], dtype="f16" if half else "f32",
                        vmax=float(finite.max()) if finite.size else 1.0)
        return {
            "scores": data["scores"],
            "thumbs": data["thumbs"],
            "tokens": data["tokens"],
            "special": data["special"],
            "mass": f32(pooled_mass),
            "sink_keys": i32(sink_keys),
            "view": view,
            "view_meta": meta,
            "tile": b"",
            "tile_meta": {},
        }

    # -- full-resolution tiles ----------------------------------------------------------------------
    @traitlets.observe("tile_request")
    def _on_tile_request(self, change) -> None:
        request = change.new
        if not request:
            return
        seq, layer, head = self.seq, self.layer, self.head
        meta = {"seq": seq, "layer": layer, "head": head, "rev": request.get("rev")}
        if (layer, head) not in self._kept:
            meta["error"] = f"layer {layer} head {head} was not kept; trace with keep_patterns=[({layer}, {head})]"
            self._set_synced({"tile": b"", "tile_meta": meta})
            return
        length = int(self._run.lengths[seq])
        size = min(self._tile_size, length)
        try:
            q0 = min(max(int(request.get("q0", 0)), 0), length - size)
            k0 = min(max(int(request.get("k0", 0)), 0), length - size)
        except (TypeError, ValueError):
            meta["error"] = f"a tile request needs integer q0 and k0; got {request!r}"
            self._set_synced({"tile": b"", "tile_meta": meta})
            return
        tile = np.array(self._run.pattern(layer, head, seq)[q0 : q0 + size, k0 : k0 + size], dtype=np.float32)
        if self._run.causal:
            q = np.arange(q0, q0 + size)[:, None]
            k = np.arange(k0, k0 + size)[None, :]
            tile[k > q] = np.nan  # keys no query here may attend: drawn as masked, not as zero
        finite = tile[np.isfinite(tile)]
        meta.update(q0=q0, k0=k0, nq=size, nk=size, vmax=float(finite.max()) if finite.size else 1.0)
        self._set_synced({"tile": f32(tile), "tile_meta": meta})

    # -- export ---------------------------------------------------------------------------------------
    def _export_selections(self):
        run = self._run
        return [
            {"seq": s, "layer": l, "head": h}
            for s in range(run.n_sequences)
            for l in range(run.n_layers)
            for h in range(run.n_heads)
        ]

    def _export_hints(self, level: int):
        plan = [{}, {"cells": 128, "mass_bins": 2048}, {"cells": 64, "mass_bins": 1024}, {"cells": 32, "mass_bins": 512}]
        if level >= len(plan):
            return None
        hints = dict(plan[level], view_dtype="f32")
        if "cells" in hints:
            hints["cells"] = min(hints["cells"], self._max_cells)
        return hints

    def _default_title(self) -> str:
        return f"lens — attention of {self.info.get('model', '?')}"
