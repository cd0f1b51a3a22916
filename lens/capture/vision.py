"""What a trace of a vision-language model records besides the text-model probes.

* :class:`VisionProbe` — the vision tower's own attention, fed by the same lens attention function (mass
  received, |Q_k| and the uniform share of every patch token, per vision layer and head) and its residual
  stream norms (forward hooks), written at each token's canonical place (image, tile, row, col; see
  ``lens.models.vision.VisionPlan``).
* :class:`SinkDimProbe` — for visual attention sinks (Kang et al., ICLR 2025): per language-model layer, the
  dimensions where the first token's RMS-normalized hidden state φ(x) = |x| / rms(x) is largest, and every
  token's φ in those dimensions.
* :func:`query_groups` — the text queries whose attention the language model's probe sums per key
  (text→image attention share, mass from one text token; docs/definitions.md "Vision-language models").
* :func:`modality_arrays` — per token: modality, image, tile, row, col; per image: its tiles and pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lens.capture.spectra import center_and_normalize_rows, entropy_from_spectrum, squared_singular_values
from lens.errors import CaptureError

__all__ = ["VisionProbe", "SinkDimProbe", "query_groups", "modality_arrays", "TEXT", "IMAGE", "SPECIAL",
           "MODALITIES", "SINK_DIMS"]

TEXT, IMAGE, SPECIAL = 0, 1, 2
#: modality codes of ``Run.arrays["modality"]``
MODALITIES = {TEXT: "text", IMAGE: "image", SPECIAL: "special"}
#: dimensions of the first token kept per layer for the visual-sink test (papers report 1–4 sink dimensions)
SINK_DIMS = 8


def modality_of(special: np.ndarray, image: np.ndarray) -> np.ndarray:
    """[T] uint8: image (1) where the layout says so, else special (2) for special tokens, else text (0)."""
    out = np.where(np.asarray(special, dtype=bool), SPECIAL, TEXT).astype(np.uint8)
    out[np.asarray(image) >= 0] = IMAGE
    return out


def query_groups(modality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(share_queries, row_queries) of one sequence: the text queries after its first image token (whose mean
    mass on image keys is the text→image share), and every non-image query after it (whose head-mean attention
    rows a run keeps, for "mass from a chosen token"). Empty when the sequence has no image.

    Example: modality [2, 0, 1, 1, 0, 2] → (array([4]), array([4, 5])).
    """
    image = np.nonzero(modality == IMAGE)[0]
    if not len(image):
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    after = np.arange(int(image[0]) + 1, len(modality))
    rows = after[modality[after] != IMAGE]
    return rows[modality[rows] == TEXT], rows


def modality_arrays(lm, encoded, layouts: list, offsets: np.ndarray) -> tuple[dict[str, np.ndarray], list[dict]]:
    """Per-token modality and image coordinates (run-level image numbering) and per-image metadata with the
    tiles' pixels (``image.pixels.<image>.<tile>``)."""
    n = int(offsets[-1])
    arrays = {name: np.full(n, -1, dtype=np.int32) for name in ("image.index", "image.tile", "image.row", "image.col")}
    modality = np.zeros(n, dtype=np.uint8)
    images: list[dict[str, Any]] = []
    for seq, layout in enumerate(layouts):
        sl = slice(int(offsets[seq]), int(offsets[seq + 1]))
        special = np.asarray(encoded.special[seq], dtype=bool)
        if layout is None:
            modality[sl] = modality_of(special, np.full(len(special), -1))
            continue
        first = len(images)
        modality[sl] = modality_of(special, layout.image)
        arrays["image.index"][sl] = np.where(layout.image >= 0, layout.image + first, -1)
        arrays["image.tile"][sl], arrays["image.row"][sl], arrays["image.col"][sl] = layout.tile, layout.row, layout.col
        described = (encoded.images[seq] if encoded.images else []) or []
        for local in sorted({t.image for t in layout.tiles}):
            index = first + local
            tiles = [t for t in layout.tiles if t.image == local]
            positions = np.nonzero(layout.image == local)[0]
            entry = {"sequence": seq, "index_in_sequence": local, "n_tokens": int(len(positions)),
                     "first_token": int(positions[0]) if len(positions) else -1,
                     "tiles": [t.describe() for t in tiles]}
            if local < len(described):
                entry["source"] = described[local]
            images.append(entry)
            for t in tiles:
                if t.pixels is not None:
                    arrays[f"image.pixels.{index}.{t.tile}"] = np.ascontiguousarray(t.pixels, dtype=np.uint8)
    arrays["modality"] = modality
    return arrays, images


class VisionProbe:
    """The vision tower's attention statistics and residual norms at each token's canonical place.

    Arrays (Nv = vision tokens of the run, canonical order per sequence): ``vision.key_mass`` [Lv, Hv, Nv]
    (Σ_{q∈Q_k} A), ``vision.query_count`` [Lv, Nv] (|Q_k|), ``vision.uniform_share`` [Lv, Nv] (u[k] under the
    tower's own mask), ``vision.norm`` [Lv+1, Nv] (‖x‖ entering layer v; Lv: the last layer's output, before any
    final norm), ``vision.sequence``/``vision.image``/``vision.tile``/``vision.row``/``vision.col`` [Nv] int32
    (row = col = −1 for prefix tokens such as CLIP's CLS); the encoder's valley per tile t (all its tokens,
    prefix included): ``vision.entropy_raw`` / ``vision.entropy_normalized`` [Lv+1, tiles] (matrix entropy of
    the raw and of the centered, row-normalized tokens, divided by log min(T, d)), ``vision.anisotropy``
    [Lv+1, tiles] (p₁), and ``vision.tile_sequence`` / ``vision.tile_image`` / ``vision.tile_tile`` [tiles].
    """

    def __init__(self, lm, layouts: list, image_offsets: list[int]):
        self.lm = lm
        self.n_layers, self.n_heads = lm.vision_n_layers, lm.vision_n_heads
        self.plans, self.starts = [], []
        total = 0
        meta = {k: [] for k in ("sequence", "image", "tile", "row", "col")}
        for seq, layout in enumerate(layouts):
            plan = layout.vision if layout is not None else None
            self.plans.append(plan)
            self.starts.append(total)
            if plan is None:
                continue
            n = len(plan.tile)
            tiles = layout.tiles
            meta["sequence"].append(np.full(n, seq))
            meta["image"].append(np.asarray([tiles[t].image + image_offsets[seq] for t in plan.tile]))
            meta["tile"].append(np.asarray([tiles[t].tile for t in plan.tile]))
            meta["row"].append(plan.row)
            meta["col"].append(plan.col)
            total += n
        self.total = total
        self.meta = {k: (np.concatenate(v) if v else np.zeros(0)).astype(np.int32) for k, v in meta.items()}
        self.key_mass = np.zeros((self.n_layers, self.n_heads, total), dtype=np.float32)
        self.query_count = np.zeros((self.n_layers, total), dtype=np.float32)
        self.uniform_share = np.zeros((self.n_layers, total), dtype=np.float32)
        self.norm = np.zeros((self.n_layers + 1, total), dtype=np.float32)
        # the encoder's valley: matrix entropy of each tile's tokens per layer (docs/definitions.md#matrix-entropy)
        self.tile_index: list[dict[int, int]] = []
        tile_meta = {k: [] for k in ("sequence", "image", "tile")}
        for seq, layout in enumerate(layouts):
            plan = layout.vision if layout is not None else None
            slots: dict[int, int] = {}
            for t in (sorted(set(plan.tile.tolist())) if plan is not None else []):
                slots[t] = len(tile_meta["tile"])
                tile_meta["sequence"].append(seq)
                tile_meta["image"].append(layout.tiles[t].image + image_offsets[seq])
                tile_meta["tile"].append(layout.tiles[t].tile)
            self.tile_index.append(slots)
        self.tile_meta = {k: np.asarray(v, dtype=np.int32) for k, v in tile_meta.items()}
        n_tiles = len(self.tile_meta["tile"])
        self.entropy_raw = np.full((self.n_layers + 1, n_tiles), np.nan)
        self.anisotropy = np.full((self.n_layers + 1, n_tiles), np.nan)
        self.entropy_normalized = np.full((self.n_layers + 1, n_tiles), np.nan)
        self.handles: list = []
        self.current: int | None = None
        self.calls: dict[int, int] = {}

    # -- the batch: one sequence at a time -----------------------------------------------------------
    def begin(self, sequence: int | None) -> None:
        self.current = sequence if sequence is not None and self.plans[sequence] is not None else None
        self.calls = {}

    def end(self) -> None:
        if self.current is None:
            return
        plan = self.plans[self.current]
        for layer in range(self.n_layers):
            expected = len(plan.calls[layer])
            if self.calls.get(layer, 0) != expected:
                raise CaptureError(
                    f"the vision tower's layer {layer} called the lens attention function {self.calls.get(layer, 0)} "
                    f"time(s), but this image needs {expected}; its attention does not go through transformers' "
                    "AttentionInterface as its family row expects. Trace with capture=('residual', 'mlp') or report it"
                )

    # -- the attention function -------------------------------------------------------------------------
    def pattern_heads(self, module) -> tuple[int, ...]:
        return ()

    def on_attention(self, module, stats) -> None:
        layer = self.lm.vision_layer_of_attention.get(id(module))
        if layer is None or self.current is None:
            return
        plan = self.plans[self.current]
        call = self.calls.get(layer, 0)
        self.calls[layer] = call + 1
        if call >= len(plan.calls[layer]):
            return  # counted (and reported) in end()
        index = plan.calls[layer][call]  # [B, T] canonical
        if tuple(index.shape) != tuple(stats.key_mass.shape[::2]):
            raise CaptureError(
                f"vision layer {layer}, call {call}: the attention function saw {tuple(stats.key_mass.shape[::2])} "
                f"(batch, tokens) but the image layout expects {tuple(index.shape)}"
            )
        flat = self.starts[self.current] + index.reshape(-1)
        mass = stats.key_mass.float().cpu().numpy()  # [B, H, T]
        self.key_mass[layer][:, flat] = mass.transpose(1, 0, 2).reshape(mass.shape[1], -1)
        count = stats.query_count.float()
        self.query_count[layer, flat] = count.cpu().numpy().reshape(-1)
        if stats.uniform_sum is not None:
            self.uniform_share[layer, flat] = (stats.uniform_sum.float() / count.clamp(min=1.0)).cpu().numpy().reshape(-1)

    # -- residual norms -------------------------------------------------------------------------------
    def attach(self) -> None:
        for layer, block in enumerate(self.lm.vision_blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre(layer), with_kwargs=True))
        if self.lm.vision_blocks:
            self.handles.append(self.lm.vision_blocks[-1].register_forward_hook(self._post(self.n_layers)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre(self, layer: int):
        def hook(module, args, kwargs):
            self.observe(layer, args[0] if args else kwargs.get("hidden_states"))

        return hook

    def _post(self, layer: int):
        def hook(module, args, output):
            self.observe(layer, output[0] if isinstance(output, (tuple, list)) else output)

        return hook

    @torch.no_grad()
    def observe(self, layer: int, hidden: torch.Tensor | None) -> None:
        if self.current is None or hidden is None:
            return
        plan = self.plans[self.current]
        rows = hidden.reshape(-1, hidden.shape[-1])
        if rows.shape[0] != len(plan.hidden_index):
            raise CaptureError(
                f"the vision tower's layer {layer} holds {rows.shape[0]} tokens but the image layout expects "
                f"{len(plan.hidden_index)}"
            )
        flat = self.starts[self.current] + plan.hidden_index
        self.norm[layer, flat] = rows.float().norm(dim=-1).cpu().numpy()
        tiles = torch.as_tensor(plan.tile[plan.hidden_index])
        for t, slot in self.tile_index[self.current].items():
            x = rows[tiles == t].float()
            if x.shape[0] < 2:
                continue
            s2 = squared_singular_values(x).cpu().numpy()
            h, p1 = entropy_from_spectrum(s2)
            scale = np.log(min(x.shape))
            self.entropy_raw[layer, slot], self.anisotropy[layer, slot] = h / scale, p1
            gram = squared_singular_values(center_and_normalize_rows(x)).cpu().numpy()
            self.entropy_normalized[layer, slot] = entropy_from_spectrum(gram)[0] / scale

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"vision.key_mass": self.key_mass, "vision.query_count": self.query_count,
               "vision.uniform_share": self.uniform_share, "vision.norm": self.norm}
        out.update({f"vision.{k}": v for k, v in self.meta.items()})
        out.update({"vision.entropy_raw": self.entropy_raw, "vision.entropy_normalized": self.entropy_normalized,
                    "vision.anisotropy": self.anisotropy})
        out.update({f"vision.tile_{k}": v for k, v in self.tile_meta.items()})
        return out


class SinkDimProbe:
    """Per language-model layer and sequence: the ``SINK_DIMS`` dimensions where the first token's
    φ(x) = |x| / rms(x) is largest (``resid.sink_dims`` [L+1, S, m], ``resid.sink_phi_first`` [L+1, S, m]) and
    every token's φ in them (``resid.sink_phi`` [L+1, N, m]) — what ``lens.visual_sinks`` tests (Kang et al.,
    ICLR 2025, §3: sink dimensions are those where BOS is massive; a visual sink token is an image token massive in
    them too). X_ℓ as the residual probe reads it (the input of block ℓ; ℓ = L the last block's output)."""

    def __init__(self, lm, n_tokens: int, n_sequences: int):
        self.lm = lm
        n = lm.n_layers + 1
        m = min(SINK_DIMS, lm.d_model)
        self.dims = np.full((n, n_sequences, m), -1, dtype=np.int64)
        self.first = np.zeros((n, n_sequences, m), dtype=np.float32)
        self.phi = np.zeros((n, n_tokens, m), dtype=np.float32)
        self.batch = None
        self.handles: list = []

    def begin(self, batch) -> None:
        self.batch = batch

    def attach(self) -> None:
        for layer, block in enumerate(self.lm.blocks):
            self.handles.append(block.register_forward_pre_hook(
                lambda mod, args, kwargs, layer=layer: self.observe(layer, args[0] if args else kwargs.get("hidden_states")),
                with_kwargs=True))
        self.handles.append(self.lm.blocks[-1].register_forward_hook(
            lambda mod, args, out: self.observe(self.lm.n_layers, out[0] if isinstance(out, (tuple, list)) else out)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @torch.no_grad()
    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        batch = self.batch
        m = self.dims.shape[-1]
        for row, (seq, n, start) in enumerate(zip(batch.sequences, batch.lengths, batch.starts)):
            x = hidden[row, :n].float()
            rms = x.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(torch.finfo(torch.float32).tiny)
            phi = x.abs() / rms
            top = phi[0].topk(m)
            self.dims[layer, seq] = top.indices.cpu().numpy()
            self.first[layer, seq] = top.values.cpu().numpy()
            self.phi[layer, start : start + n] = phi[:, top.indices].cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        return {"resid.sink_dims": self.dims, "resid.sink_phi_first": self.first, "resid.sink_phi": self.phi}
