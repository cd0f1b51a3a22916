"""Where each image token of a vision-language model sits, and how its vision tower orders its tokens.

docs/definitions.md "Vision-language models": image tokens are the language-model positions that carry
projected visual features — ``mm_token_type_ids == 1`` where the processor returns them, else
``input_ids == image_token_id`` of the family row. Each records (image, tile, row, col) in the token grid the
processor used. One *layout* function per way of cutting images (the family row names it in ``layout``):

=============  =========================================================================================
layout         image tokens
=============  =========================================================================================
``llava``      one block per image, row-major over (crop / patch)²; with feature strategy "full" the
               block starts with CLIP's CLS (row = col = −1)
``gemma3``     one block per image (pan-and-scan crops: one block each), row-major over the
               √mm_tokens_per_image² average-pooled grid; attended bidirectionally within the block
``qwen2_vl``   one block per image, row-major over ``image_grid_thw`` after the m × m spatial merge
               (tile = temporal index)
``idefics3``   one block per tile (``<row_i_col_j>``), row-major over the pixel-shuffled grid, then the
               global image (Idefics3, SmolVLM)
``llava_next`` the base image (tile 0) then the unpadded high-resolution grid (tile 1) with one
               ``image_newline`` token closing each row (col = −1)
=============  =========================================================================================

A layout also returns each tile's pixels as the model saw them (the processor's output un-normalized, kept
small for views) and the vision tower's token order (:class:`VisionPlan`), so that the vision tower's own
statistics land on the same (image, tile, row, col).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from lens.errors import InputError

__all__ = ["Tile", "VisionPlan", "SequenceLayout", "LAYOUTS", "layout_for", "image_token_mask", "THUMBNAIL_SIDE"]

#: longest side, in pixels, of the tile images a run keeps for views
THUMBNAIL_SIDE = 224


@dataclass
class Tile:
    """One tile (or whole image) the model saw: its place, its token grid and its pixels.

    ``image``: the image's index within its sequence; ``tile``: the tile's index within the image;
    ``role``: ``"image"`` (the whole image), ``"tile"`` (a crop of a split image; ``position`` = its
    (row, col) in the split), ``"global"`` (the downscaled whole image after the tiles), ``"base"`` /
    ``"highres"`` (LLaVA-NeXT), ``"frame"`` (a temporal slice). ``grid``: (rows, cols) of its image tokens;
    ``patch_grid``: (rows, cols) of the vision tower's patches; ``patch_offset``: where ``pixels`` begins in
    that patch grid (LLaVA-NeXT's high-resolution view drops the padding: (top, left) > 0), else (0, 0);
    ``pixels``: H × W × 3 uint8, the processor's output un-normalized and shrunk to at most ``THUMBNAIL_SIDE`` px.
    """

    image: int
    tile: int
    role: str
    grid: tuple[int, int]
    patch_grid: tuple[int, int]
    position: tuple[int, int] | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    patch_offset: tuple[int, int] = (0, 0)

    def describe(self) -> dict[str, Any]:
        return {"image": self.image, "tile": self.tile, "role": self.role, "grid": list(self.grid),
                "patch_grid": list(self.patch_grid), "patch_offset": list(self.patch_offset),
                "position": list(self.position) if self.position else None}


@dataclass
class VisionPlan:
    """The vision tower's tokens of one sequence in a canonical order, and how the tower orders them.

    Canonical order: tile by tile (``tiles`` of the layout), each tile's prefix tokens (CLIP's CLS:
    row = col = −1) then its patches row-major. ``tile``/``row``/``col``: [V] int32 per canonical token.
    ``hidden_index``: for the rows of a vision layer's hidden state flattened to [rows, d] in the model's
    order, the canonical index of each. ``calls[layer]``: for each call of that layer's attention function
    (in order), an int array [B, T] giving the canonical index of each of its batch rows' tokens.
    """

    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    hidden_index: np.ndarray
    calls: list[list[np.ndarray]]


@dataclass
class SequenceLayout:
    """Image tokens of one sequence: per token (image, tile, row, col) (−1 where not an image token), the
    tiles and the vision plan."""

    image: np.ndarray
    tile: np.ndarray
    row: np.ndarray
    col: np.ndarray
    tiles: list[Tile]
    vision: VisionPlan | None

    @property
    def n_images(self) -> int:
        return len({t.image for t in self.tiles})


# -- helpers ------------------------------------------------------------------------------------------------


def image_token_mask(lm, ids: np.ndarray, inputs: dict[str, Any]) -> np.ndarray:
    """[T] bool: the image tokens of one sequence — ``mm_token_type_ids == 1`` if the processor returned
    them, else ``input_ids == image_token_id`` (docs/definitions.md "Vision-language models")."""
    types = inputs.get("mm_token_type_ids")
    if types is not None:
        return np.asarray(types).reshape(-1)[: len(ids)] == 1
    return np.asarray(ids) == lm.image_token_id


def _unnormalize(lm, pixels: torch.Tensor) -> np.ndarray:
    """[C, H, W] processor output → H × W × 3 uint8 as the model saw it, shrunk to ``THUMBNAIL_SIDE``."""
    from PIL import Image

    proc = getattr(lm.processor, "image_processor", None)
    x = pixels.detach().float().cpu().numpy()
    if getattr(proc, "do_normalize", True):
        mean = np.asarray(getattr(proc, "image_mean", None) or [0.0] * x.shape[0], dtype=np.float32)
        std = np.asarray(getattr(proc, "image_std", None) or [1.0] * x.shape[0], dtype=np.float32)
        mean = np.broadcast_to(mean, (x.shape[0],)) if mean.size in (1, x.shape[0]) else mean[: x.shape[0]]
        std = np.broadcast_to(std, (x.shape[0],)) if std.size in (1, x.shape[0]) else std[: x.shape[0]]
        x = x * std[:, None, None] + mean[:, None, None]
    if getattr(proc, "do_rescale", True):
        x = x / float(getattr(proc, "rescale_factor", 1 / 255) or 1 / 255)
    x = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    if x.shape[0] == 1:
        x = np.repeat(x, 3, axis=0)
    image = Image.fromarray(np.ascontiguousarray(x[:3].transpose(1, 2, 0)), "RGB")
    if max(image.size) > THUMBNAIL_SIDE:
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _blocks(mask: np.ndarray) -> list[np.ndarray]:
    """Positions of each maximal run of True in ``mask``."""
    positions = np.nonzero(mask)[0]
    if not len(positions):
        return []
    breaks = np.nonzero(np.diff(positions) > 1)[0] + 1
    return np.split(positions, breaks)


def _empty(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.full(n, -1, dtype=np.int32) for _ in range(4))  # type: ignore[return-value]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


def _plain_plan(tiles: list[Tile], prefix: int, n_layers: int, rows: list[int] | None = None) -> VisionPlan:
    """Canonical order = the tower's order: one forward row per tile, ``prefix`` tokens then patches row-major,
    one attention call per layer with every tile as a batch row."""
    rows = list(range(len(tiles))) if rows is None else rows
    tile_ix, row_ix, col_ix = [], [], []
    for t in rows:
        ph, pw = tiles[t].patch_grid
        tile_ix.append(np.full(prefix + ph * pw, t, dtype=np.int32))
        row_ix.append(np.concatenate([np.full(prefix, -1), np.repeat(np.arange(ph), pw)]).astype(np.int32))
        col_ix.append(np.concatenate([np.full(prefix, -1), np.tile(np.arange(pw), ph)]).astype(np.int32))
    sizes = {len(x) for x in tile_ix}
    _check(len(sizes) <= 1, "the vision tower's tiles of one sequence have different patch grids; lens expects one")
    n = sizes.pop() if sizes else 0
    index = np.arange(len(rows) * n, dtype=np.int64)
    return VisionPlan(np.concatenate(tile_ix) if tile_ix else np.zeros(0, np.int32),
                      np.concatenate(row_ix) if row_ix else np.zeros(0, np.int32),
                      np.concatenate(col_ix) if col_ix else np.zeros(0, np.int32),
                      index, [[index.reshape(len(rows), n)] for _ in range(n_layers)])


# -- layouts ------------------------------------------------------------------------------------------------


def _layout_llava(lm, ids: np.ndarray, inputs: dict[str, Any]) -> SequenceLayout:
    pixels = inputs["pixel_values"]
    n_images = int(pixels.shape[0])
    ps = int(lm.vision_config.patch_size)
    gh, gw = int(pixels.shape[-2]) // ps, int(pixels.shape[-1]) // ps
    strategy = getattr(lm.config, "vision_feature_select_strategy", "default")
    prefix = 1 if strategy == "full" else 0
    mask = image_token_mask(lm, ids, inputs)
    positions = np.nonzero(mask)[0]
    per_image = prefix + gh * gw
    _check(len(positions) == n_images * per_image,
           f"the text has {len(positions)} image tokens but {n_images} image(s) of {per_image} tokens each were given; "
           "give one image placeholder per image")
    image, tile, row, col = _empty(len(ids))
    tiles = []
    for i in range(n_images):
        pos = positions[i * per_image : (i + 1) * per_image]
        image[pos], tile[pos] = i, 0
        k = np.arange(gh * gw)
        row[pos] = np.concatenate([np.full(prefix, -1), k // gw])
        col[pos] = np.concatenate([np.full(prefix, -1), k % gw])
        tiles.append(Tile(i, 0, "image", (gh, gw), (gh, gw), None, _unnormalize(lm, pixels[i])))
    plan = _plain_plan(tiles, int(lm.vision_family.vision_prefix), lm.vision_n_layers)
    return SequenceLayout(image, tile, row, col, tiles, plan)


def _layout_gemma3(lm, ids: np.ndarray, inputs: dict[str, Any]) -> SequenceLayout:
    pixels = inputs["pixel_values"]
    per_block = int(lm.config.mm_tokens_per_image)
    side = int(round(per_block**0.5))
    ps = int(lm.vision_config.patch_size)
    ph, pw = int(pixels.shape[-2]) // ps, int(pixels.shape[-1]) // ps
    blocks = _blocks(image_token_mask(lm, ids, inputs))
    _check(len(blocks) == int(pixels.shape[0]) and all(len(b) == per_block for b in blocks),
           f"the text has {len(blocks)} image block(s) for {int(pixels.shape[0])} image(s); give one image "
           "placeholder per image")
    image, tile, row, col = _empty(len(ids))
    tiles = []
    for i, pos in enumerate(blocks):
        k = np.arange(per_block)
        image[pos], tile[pos], row[pos], col[pos] = i, 0, k // side, k % side
        tiles.append(Tile(i, 0, "image", (side, side), (ph, pw), None, _unnormalize(lm, pixels[i])))
    return SequenceLayout(image, tile, row, col, tiles, _plain_plan(tiles, 0, lm.vision_n_layers))


def _layout_idefics3(lm, ids: np.ndarray, inputs: dict[str, Any]) -> SequenceLayout:
    pixels = inputs["pixel_values"]
    pixels = pixels.reshape(-1, *pixels.shape[-3:])
    nb = pixels[0].numel()
    real = [t for t in range(pixels.shape[0]) if int((pixels[t] == 0.0).sum()) != nb]  # the model drops padding tiles
    scale = int(lm.config.scale_factor)
    ps = int(lm.vision_config.patch_size)
    ph, pw = int(pixels.shape[-2]) // ps, int(pixels.shape[-1]) // ps
    gh, gw = ph // scale, pw // scale
    blocks = _blocks(image_token_mask(lm, ids, inputs))
    tok = lm.tokenizer
    global_id = tok.convert_tokens_to_ids(getattr(tok, "global_image_token", None) or "<global-img>")
    _check(len(blocks) == len(real) and all(len(b) == gh * gw for b in blocks),
           f"the text has {len(blocks)} image-token block(s) but the processor made {len(real)} tile(s); give one "
           "image placeholder per image and let the processor expand it")
    image, tile, row, col = _empty(len(ids))
    tiles = []
    current, index_in_image = 0, 0
    for b, (pos, pixel_row) in enumerate(zip(blocks, real)):
        before = ids[max(0, pos[0] - 2) : pos[0]]
        is_global = bool(global_id is not None and global_id in before)
        marker = lm.tokenizer.convert_ids_to_tokens(int(before[-1])) if len(before) else ""
        position = None
        if not is_global and isinstance(marker, str) and marker.startswith("<row_"):
            parts = marker.strip("<>").split("_")  # row_i_col_j
            position = (int(parts[1]) - 1, int(parts[3]) - 1)
        k = np.arange(gh * gw)
        image[pos], tile[pos], row[pos], col[pos] = current, index_in_image, k // gw, k % gw
        role = "global" if is_global else ("tile" if position is not None else "image")
        tiles.append(Tile(current, index_in_image, role, (gh, gw), (ph, pw), position, _unnormalize(lm, pixels[pixel_row])))
        index_in_image += 1
        if is_global:  # the global image closes an image
            current, index_in_image = current + 1, 0
    return SequenceLayout(image, tile, row, col, tiles, _plain_plan(tiles, 0, lm.vision_n_layers))


def _qwen_pixels(pixels: torch.Tensor, t: int, h: int, w: int, m: int, channels: int, tp: int, ps: int) -> torch.Tensor:
    """Invert the Qwen2-VL image processor's patch flattening for one image: [t·h·w, C·tp·ps·ps] → [C, h·ps, w·ps]
    (first temporal frame). The processor orders patches (t, h/m, w/m, m, m) and each patch (C, tp, ps, ps)."""
    x = pixels.reshape(t, h // m, w // m, m, m, channels, tp, ps, ps)[:, :, :, :, :, :, 0]
    x = x.permute(0, 5, 1, 3, 6, 2, 4, 7).reshape(t, channels, h * ps, w * ps)
    return x[0]


def _layout_qwen2_vl(lm, ids: np.ndarray, inputs: dict[str, Any]) -> SequenceLayout:
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    grid_thw = inputs["image_grid_thw"].reshape(-1, 3).long().cpu()
    vcfg = lm.vision_config
    m = int(vcfg.spatial_merge_size)
    mask = image_token_mask(lm, ids, inputs)
    positions = np.nonzero(mask)[0]
    counts = [int(t * h * w) // (m * m) for t, h, w in grid_thw.tolist()]
    _check(len(positions) == sum(counts),
           f"the text has {len(positions)} image tokens but the processor's image_grid_thw gives {sum(counts)}; give "
           "one image placeholder per image and let the processor expand it")
    image, tile, row, col = _empty(len(ids))
    tiles: list[Tile] = []
    pixels = inputs["pixel_values"]
    channels = int(getattr(vcfg, "in_chans", None) or getattr(vcfg, "in_channels", 3))
    tp, ps = int(vcfg.temporal_patch_size), int(vcfg.patch_size)
    start_tok = start_px = 0
    tile_of: list[int] = []  # tile index (within the sequence) of each frame, in order
    for i, (t, h, w) in enumerate(grid_thw.tolist()):
        lh, lw = h // m, w // m
        pos = positions[start_tok : start_tok + counts[i]]
        k = np.arange(counts[i])
        image[pos], tile[pos] = i, k // (lh * lw)
        row[pos], col[pos] = (k % (lh * lw)) // lw, k % lw
        frame = _qwen_pixels(pixels[start_px : start_px + t * h * w].float(), t, h, w, m, channels, tp, ps)
        for f in range(t):
            tile_of.append(len(tiles))
            tiles.append(Tile(i, f, "image" if t == 1 else "frame", (lh, lw), (h, w), None, _unnormalize(lm, frame)))
        start_tok += counts[i]
        start_px += t * h * w
    # the vision tower: tokens in the processor's order, (h, w) from transformers' own position ids
    hw = get_vision_position_ids(grid_thw, m).numpy()  # [N, 2] per token, processor order
    frame_sizes = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    frame_of = np.repeat(np.arange(len(frame_sizes)), frame_sizes)
    tile_ix = np.asarray(tile_of, dtype=np.int32)[frame_of]
    widths = np.asarray([tiles[j].patch_grid[1] for j in tile_of], dtype=np.int64)[frame_of]
    offsets = np.concatenate([[0], np.cumsum(frame_sizes)])[:-1][frame_of]
    canonical = offsets + hw[:, 0] * widths + hw[:, 1]  # row-major within each frame
    order = np.argsort(canonical)
    plan_tile, plan_row, plan_col = tile_ix[order], hw[order, 0].astype(np.int32), hw[order, 1].astype(np.int32)
    cu = get_vision_cu_seqlens(grid_thw).tolist()
    full_calls = [canonical[a:b][None, :] for a, b in zip(cu[:-1], cu[1:])]
    visual = lm.vision_tower
    if hasattr(visual, "fullatt_block_indexes"):  # Qwen2.5-VL: windows, and the tower's own token permutation
        from transformers.vision_utils import get_vision_window_index

        window_index, cu_window = get_vision_window_index(grid_thw, m, int(vcfg.window_size), ps)
        unit = m * m
        permuted = (window_index.numpy()[:, None] * unit + np.arange(unit)).reshape(-1)
        hidden_index = canonical[permuted]
        cu_window = cu_window.tolist()
        window_calls = [hidden_index[a:b][None, :] for a, b in zip(cu_window[:-1], cu_window[1:])]
        full_calls = [hidden_index[a:b][None, :] for a, b in zip(cu[:-1], cu[1:])]
        full = set(int(x) for x in visual.fullatt_block_indexes)
        calls = [full_calls if layer in full else window_calls for layer in range(lm.vision_n_layers)]
    else:
        hidden_index = canonical
        calls = [full_calls for _ in range(lm.vision_n_layers)]
    plan = VisionPlan(plan_tile, plan_row, plan_col, hidden_index.astype(np.int64), calls)
    return SequenceLayout(image, tile, row, col, tiles, plan)


def _layout_llava_next(lm, ids: np.ndarray, inputs: dict[str, Any]) -> SequenceLayout:
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    pixels = inputs["pixel_values"]  # [n_images, n_crops, C, S, S]
    sizes = inputs["image_sizes"].reshape(-1, 2).tolist()
    ps = int(lm.vision_config.patch_size)
    side = int(lm.vision_config.image_size) // ps
    strategy = getattr(lm.config, "vision_feature_select_strategy", "default")
    _check(strategy == "default", "LLaVA-NeXT with vision_feature_select_strategy='full' is not supported by lens")
    positions = np.nonzero(image_token_mask(lm, ids, inputs))[0]
    image, tile, row, col = _empty(len(ids))
    tiles: list[Tile] = []
    start = 0
    for i, (height, width) in enumerate(sizes):
        gh_tiles, gw_tiles = get_anyres_image_grid_shape((height, width), lm.config.image_grid_pinpoints,
                                                        int(lm.vision_config.image_size))
        # the model's own unpadding, applied to an index grid: which cells of the tiled feature map survive
        index = torch.arange(gh_tiles * side * gw_tiles * side, dtype=torch.float32).view(1, gh_tiles * side, gw_tiles * side)
        kept = unpad_image(index, (height, width))[0]
        ch, cw = kept.shape
        n = side * side + ch * (cw + 1)
        pos = positions[start : start + n]
        _check(len(pos) == n, f"image {i}: the text has {len(positions) - start} image tokens left but LLaVA-NeXT "
               f"needs {n}; give one image placeholder per image")
        k = np.arange(side * side)
        image[pos], tile[pos[: side * side]] = i, 0
        row[pos[: side * side]], col[pos[: side * side]] = k // side, k % side
        rest = pos[side * side :].reshape(ch, cw + 1)
        tile[rest] = 1
        row[rest] = np.arange(ch)[:, None]
        col[rest] = np.concatenate([np.tile(np.arange(cw), (ch, 1)), np.full((ch, 1), -1)], axis=1)
        crops = pixels[i]
        tiles.append(Tile(i, 0, "base", (side, side), (side, side), None, _unnormalize(lm, crops[0])))
        # the high-resolution view: the crops stitched back, cut to the unpadded region
        grid = crops[1 : 1 + gh_tiles * gw_tiles].reshape(gh_tiles, gw_tiles, *crops.shape[1:])
        stitched = grid.permute(2, 0, 3, 1, 4).reshape(crops.shape[1], gh_tiles * crops.shape[-2], gw_tiles * crops.shape[-1])
        top, left = divmod(int(kept[0, 0]), gw_tiles * side)  # where the unpadded region starts, in patches
        view = stitched[:, top * ps : (top + ch) * ps, left * ps : (left + cw) * ps]
        tiles.append(Tile(i, 1, "highres", (ch, cw), (gh_tiles * side, gw_tiles * side), None, _unnormalize(lm, view),
                          (top, left)))
        start += n
    plan = _llava_next_plan(lm, tiles, pixels, sizes, side)
    return SequenceLayout(image, tile, row, col, tiles, plan)


def _llava_next_plan(lm, tiles: list[Tile], pixels: torch.Tensor, sizes, side: int) -> VisionPlan:
    """The tower sees every crop (base image first) as a batch row: CLS + side² patches. Canonical order:
    base tile's tokens, then the high-resolution tile's patches row-major over the whole crop grid."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    tile_ix, row_ix, col_ix, index_rows = [], [], [], []
    n_crop_tokens = 1 + side * side
    canonical = 0
    for i, (height, width) in enumerate(sizes):
        gh_tiles, gw_tiles = get_anyres_image_grid_shape((height, width), lm.config.image_grid_pinpoints,
                                                        int(lm.vision_config.image_size))
        base_tile, high_tile = 2 * i, 2 * i + 1
        # base crop: CLS then patches
        tile_ix.append(np.full(n_crop_tokens, base_tile))
        row_ix.append(np.concatenate([[-1], np.repeat(np.arange(side), side)]))
        col_ix.append(np.concatenate([[-1], np.tile(np.arange(side), side)]))
        index_rows.append(np.arange(canonical, canonical + n_crop_tokens))
        canonical += n_crop_tokens
        # high-resolution crops: canonical = one CLS per crop, then patches row-major over the whole grid
        n_crops = gh_tiles * gw_tiles
        cls_start = canonical
        patch_start = canonical + n_crops
        big_w = gw_tiles * side
        tile_ix.append(np.full(n_crops + n_crops * side * side, high_tile))
        row_ix.append(np.concatenate([np.full(n_crops, -1), np.repeat(np.arange(gh_tiles * side), big_w)]))
        col_ix.append(np.concatenate([np.full(n_crops, -1), np.tile(np.arange(big_w), gh_tiles * side)]))
        for c in range(n_crops):
            tr, tc = divmod(c, gw_tiles)
            r = tr * side + np.arange(side)[:, None]
            cc = tc * side + np.arange(side)[None, :]
            index_rows.append(np.concatenate([[cls_start + c], (patch_start + r * big_w + cc).reshape(-1)]))
        canonical = patch_start + n_crops * side * side
    index = np.stack(index_rows).astype(np.int64)
    return VisionPlan(np.concatenate(tile_ix).astype(np.int32), np.concatenate(row_ix).astype(np.int32),
                      np.concatenate(col_ix).astype(np.int32), index.reshape(-1),
                      [[index] for _ in range(lm.vision_n_layers)])


LAYOUTS: dict[str, Callable[..., SequenceLayout]] = {
    "llava": _layout_llava,
    "llava_next": _layout_llava_next,
    "qwen2_vl": _layout_qwen2_vl,
    "idefics3": _layout_idefics3,
    "gemma3": _layout_gemma3,
}


def layout_for(lm, ids, inputs: dict[str, Any]) -> SequenceLayout:
    """The layout of one sequence: ``ids`` its token ids ([T]), ``inputs`` the processor's tensors for it alone
    (batch of one). Raises ``InputError`` when the image tokens do not match the images.

    Example: ``layout_for(lm, ids, processor(images=[img], text=[t], return_tensors="pt"))``.
    """
    ids = np.asarray(ids)
    if "pixel_values" not in inputs:
        n = len(ids)
        image, tile, row, col = _empty(n)
        _check(not image_token_mask(lm, ids, inputs).any(),
               "the text contains image tokens but no image was given; pass {'image': ..., 'text': ...}")
        return SequenceLayout(image, tile, row, col, [], None)
    try:
        return LAYOUTS[lm.vision_family.layout](lm, ids, inputs)
    except InputError:
        raise
    except (RuntimeError, ValueError, IndexError, KeyError) as exc:
        # a processor output edited by hand (pixels cut, grids or ids changed) no longer fits together
        raise InputError(
            f"the image inputs do not fit together for a {lm.vision_family.name} model ({type(exc).__name__}: {exc}); "
            "pass the processor's output unchanged, or {'image': ..., 'text': ...} items and let lens run the processor"
        ) from exc
