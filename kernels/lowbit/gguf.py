"""GGUF / llama.cpp weight formats in lens: the packed codecs, wrapping a GGUF file's own bytes, and the
matmul with llama.cpp's activation quantization (pure torch; definitions: docs/definitions.md "GGUF").

The contract the model side (``lens.load(..., quant="keep")``, provenance, ``lens bench gguf``) relies on:

* :data:`GGUF_TYPES` — ``("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")``:
  the scheme names, lower case, everywhere (``QuantConfig("q4_k")``, ``lens.load(model, quant="q4_k")``,
  provenance). :func:`gguf_type_name` maps ``gguf.GGMLQuantizationType`` members, their integer ids and
  spellings such as ``"Q4_K"`` to these names; :func:`to_gguf_type` maps back.
* A packed GGUF weight is a :class:`PackedWeight` with ``scheme`` = the type name, ``shape = (out, in)``
  and one tensor, ``data["blocks"]``: uint8 ``[out, in / block · block bytes]`` — llama.cpp's block bytes,
  row by row, exactly as a GGUF file stores the tensor; resident bytes are the format's bits/weight
  (:data:`GGUF_BITS_PER_WEIGHT`: Q4_0 4.5, Q4_1 5.0, Q5_0 5.5, Q5_1 6.0, Q8_0 8.5, Q2_K 2.625,
  Q3_K 3.4375, Q4_K 4.5, Q5_K 5.5, Q6_K 6.5625).
* :func:`packed_from_gguf` ``(raw, type_name, shape) -> PackedWeight`` wraps a GGUF tensor's bytes with no
  re-quantization. **Dimension order**: GGUF lists ``ne[0]`` first, the fastest dimension, which for a
  linear weight is ``in``; ``GGUFReader`` reports ``tensor.shape`` in that order, i.e. ``(in, out)``, so
  pass ``shape=tuple(reversed(tensor.shape))``. :func:`gguf_bytes` gives the bytes back (for ``GGUFWriter``).
* ``QuantLinear.from_packed(packed, bias=None, config=None)`` builds a layer from it; ``QuantConfig("q4_1",
  activations="llama.cpp")`` makes its forward quantize the input as llama.cpp's CPU matmul does
  (:mod:`.gguf_activations`: :data:`VEC_DOT_TYPE`, :func:`quantize_activations`).
* Rows: ``in`` must be a multiple of the block (32, or 256 for K-quants) — GGUF cannot store anything
  else, so the codecs raise ``ConfigError`` rather than pad. When a *model* is quantized,
  ``QuantLinear.from_weight`` follows llama-quantize instead and stores an incompatible K-quant layer in
  llama.cpp's fallback type (:data:`LLAMA_QUANTIZE_FALLBACK`: Q2_K/Q3_K → IQ4_NL, Q4_K → Q5_0,
  Q5_K → Q5_1, Q6_K → Q8_0); a row that is not a multiple of 32 (llama.cpp would keep it in F16) raises.

Every GGUF codec dequantizes bit for bit as the ``gguf`` package's ``gguf.quants.dequantize`` (the reference
transformers uses) and quantizes as llama.cpp's reference ``quantize_row_*_ref`` (bit for bit with
``gguf.quants.quantize`` for the legacy types it implements). Dequantization is vectorized over blocks and
walks the weight in row chunks, so a large matrix exists in float32 only as one chunk at a time inside the
matmul.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import gguf_kquants, gguf_legacy
from .gguf_activations import VEC_DOT_TYPE, emulated_linear, quantize_activations
from .gguf_blocks import GGML_TYPE_TABLE, block_info
from .packing import PackedWeight, _check_weight

#: The GGUF weight types lens packs, quantizes and multiplies, as lens's scheme names.
GGUF_TYPES: tuple[str, ...] = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
#: Further weight types lens reads and writes only because llama-quantize falls back to them.
GGUF_FALLBACK_TYPES: tuple[str, ...] = ("iq4_nl",)
GGUF_WEIGHT_TYPES: tuple[str, ...] = GGUF_TYPES + GGUF_FALLBACK_TYPES
#: Nominal bits/weight of each type: 8 · block bytes / block length (exact for whole rows).
GGUF_BITS_PER_WEIGHT: dict[str, float] = {t: 8.0 * block_info(t)[1] / block_info(t)[0]
                                          for t in GGUF_WEIGHT_TYPES}
#: llama-quantize's replacement for a K-quant whose rows are not a multiple of 256 (``llama_tensor_get_type``).
LLAMA_QUANTIZE_FALLBACK: dict[str, str] = {"q2_k": "iq4_nl", "q3_k": "iq4_nl", "q4_k": "q5_0",
                                           "q5_k": "q5_1", "q6_k": "q8_0"}
#: Weights dequantized per chunk (float32 elements) in the matmul and in :func:`dequantize_gguf`.
CHUNK_WEIGHTS = 1 << 22

_DEQUANT = {**gguf_legacy.DEQUANTIZE, **gguf_kquants.DEQUANTIZE}
_QUANT = {**gguf_legacy.QUANTIZE, **gguf_kquants.QUANTIZE}
_SPLIT = {**gguf_legacy.SPLIT, **gguf_kquants.SPLIT}
_ID_TO_NAME = {v[2]: k for k, v in GGML_TYPE_TABLE.items()}


# ----------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------


def gguf_type_name(t) -> str:
    """lens's name of a GGUF weight type given as a name (``"Q4_K"``, ``"q4_k"``), a
    ``gguf.GGMLQuantizationType`` member or its integer id.

    Raises ``ConfigError`` for types lens has no codec for (F32/F16/BF16 are not packed formats; IQ2…IQ4_XS,
    TQ*, MXFP4 are not implemented), naming the valid ones.

    Example: ``gguf_type_name(gguf.GGMLQuantizationType.Q4_K)`` → ``"q4_k"``; ``gguf_type_name(3)`` → ``"q4_1"``.
    """
    if isinstance(t, str):
        name = t.strip().lower().replace("-", "_")
    elif hasattr(t, "name") and hasattr(t, "value"):  # an IntEnum member such as GGMLQuantizationType.Q4_K
        name = str(t.name).lower()
    elif isinstance(t, numbers.Integral):
        name = _ID_TO_NAME.get(int(t), f"ggml type id {int(t)}")
    else:
        raise ConfigError(f"a GGUF type must be a name, a GGMLQuantizationType or an id, got {type(t).__name__}")
    if name not in GGUF_WEIGHT_TYPES:
        hint = ""
        if name.endswith(("_s", "_m", "_l", "_xs")) and name.rsplit("_", 1)[0] in GGUF_TYPES:
            hint = (f" ({t!r} names a llama-quantize recipe that mixes types per tensor; the per-tensor "
                    f"type is {name.rsplit('_', 1)[0]!r})")
        raise ConfigError(f"unsupported GGUF weight type {t!r}{hint}; lens packs "
                          f"{', '.join(GGUF_WEIGHT_TYPES)}")
    return name


def gguf_type_id(name: str) -> int:
    """ggml's integer type id (``enum ggml_type``, what a GGUF file stores) of a lens type name.

    Example: ``gguf_type_id("q4_k")`` → ``12``.
    """
    return GGML_TYPE_TABLE[gguf_type_name(name)][2]


def to_gguf_type(name: str):
    """The ``gguf.GGMLQuantizationType`` member of a lens type name (imports the optional ``gguf`` package).

    Example: ``to_gguf_type("q6_k")`` → ``<GGMLQuantizationType.Q6_K: 14>``.
    """
    try:
        import gguf
    except ImportError as e:  # the package is in the lens-interp[quant] extra
        raise ConfigError("the gguf package is not installed: pip install 'lens-interp[quant]'") from e
    return gguf.GGMLQuantizationType(gguf_type_id(name))


def fallback_type(type_name: str, in_features: int) -> str:
    """The type llama-quantize stores a weight with ``in_features`` columns in when ``type_name`` is asked
    for: the type itself when ``in`` is a multiple of its block, else :data:`LLAMA_QUANTIZE_FALLBACK`.

    Raises ``ConfigError`` when no GGUF type fits (``in`` not a multiple of 32: llama.cpp keeps F16).

    Example: ``fallback_type("q4_k", 384)`` → ``"q5_0"``; ``fallback_type("q4_k", 1536)`` → ``"q4_k"``.
    """
    t = gguf_type_name(type_name)
    if in_features % block_info(t)[0] == 0:
        return t
    fb = LLAMA_QUANTIZE_FALLBACK.get(t)
    if fb is None or in_features % block_info(fb)[0]:
        raise ConfigError(f"{t}: a row of {in_features} weights is not a multiple of {block_info(t)[0]}"
                          f"{'' if fb is None else f' nor of {block_info(fb)[0]} ({fb})'}, so no GGUF block "
                          "type can hold it (llama.cpp keeps such tensors in F16); leave the layer out with "
                          "include=…")
    return fb


# ----------------------------------------------------------------------------------------------------
# The codec
# ----------------------------------------------------------------------------------------------------


def _check_shape(t: str, shape) -> tuple[int, int]:
    try:
        out_f, in_f = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"{t}: shape must be (out, in), got {shape!r}") from None
    bs = block_info(t)[0]
    if out_f < 1 or in_f < 1 or in_f % bs:
        hint = (" — GGUF lists ne[0] (= in) first: pass (out, in) = tuple(reversed(tensor.shape))"
                if out_f % bs == 0 and in_f % bs else "")
        raise ConfigError(f"{t}: shape (out, in) = {(out_f, in_f)} needs in ≥ 1 to be a multiple of the "
                          f"{bs}-weight block{hint}")
    return out_f, in_f


class GGUFCodec:
    """One GGUF weight type as a lens codec: ``quantize`` a float weight ``[out, in]`` into llama.cpp's
    block bytes, ``dequantize`` them bit-exactly as ``gguf.quants.dequantize``.

    ``in`` must be a multiple of the block (32; 256 for K-quants), else ``ConfigError``.

    Example::

        p = GGUFCodec("q4_k").quantize(torch.randn(64, 512))
        p.data["blocks"].shape, p.bits_per_weight()      # (torch.Size([64, 288]), 4.5)
        GGUFCodec("q4_k").dequantize(p).shape            # (64, 512)
    """

    def __init__(self, type_name: str):
        self.scheme = gguf_type_name(type_name)
        self.block_size, self.type_size = block_info(self.scheme)

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """llama.cpp's reference quantization of a 2-D weight (float32 arithmetic; see the module docs).

        Example: ``GGUFCodec("q8_0").quantize(torch.randn(8, 64)).nbytes()`` → ``8 · 2 · 34 = 544``.
        """
        w = _check_weight(w, self.scheme)
        out_f, in_f = _check_shape(self.scheme, w.shape)
        rows = max(1, (CHUNK_WEIGHTS // 4) // in_f)  # the K-quant searches keep ~10 temporaries per weight
        fn = _QUANT[self.scheme]
        with _one_thread():
            parts = [fn(w[r0:r0 + rows].reshape(-1, self.block_size)).reshape(-1, in_f // self.block_size
                                                                              * self.type_size)
                     for r0 in range(0, out_f, rows)]
        blocks = torch.cat(parts, dim=0)
        if self.scheme == "iq4_nl":
            blocks = gguf_legacy.fill_stale_iq4nl(blocks.reshape(-1, self.type_size),
                                                  w.reshape(-1, self.block_size)).reshape(blocks.shape)
        return _packed(self.scheme, (out_f, in_f), blocks)

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """Float32 ``[out, in]`` weight, bit for bit as ``gguf.quants.dequantize`` of the same bytes.

        Example: ``GGUFCodec("q4_0").dequantize(GGUFCodec("q4_0").quantize(torch.zeros(2, 32)))`` → zeros.
        """
        return dequantize_gguf(p)


@contextlib.contextmanager
def _one_thread():
    # llama.cpp's searches run element position by element position: thousands of small torch ops per
    # chunk. Each intra-op parallel region costs more than it saves there (and 10–50× more on a loaded
    # machine, where the second OpenMP thread waits for a core), so the quantizers run on one thread.
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _packed(t: str, shape: tuple[int, int], blocks: torch.Tensor) -> PackedWeight:
    bs, ts, tid = GGML_TYPE_TABLE[t]
    return PackedWeight(t, shape, {"blocks": blocks}, {"block_size": bs, "type_size": ts, "ggml_type": tid})


def _row_chunks(p: PackedWeight, rows: int | None = None) -> Iterator[tuple[int, int, torch.Tensor]]:
    out_f, in_f = p.shape
    rows = rows or max(1, CHUNK_WEIGHTS // in_f)
    blocks = p.data["blocks"]
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        yield r0, r1, blocks[r0:r1]


def dequantize_gguf(p: PackedWeight, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """Float32 weight ``[out, in]`` of a packed GGUF weight, bit-exact with ``gguf.quants.dequantize``,
    built chunk by chunk into one output tensor — or only some rows: ``rows`` a slice (→ ``[k, in]``) or an
    integer index tensor of any shape (→ ``[*rows.shape, in]``; an embedding lookup, as llama.cpp's
    ``get_rows`` dequantizes just the rows it gathers).

    Raises ``ConfigError`` for a non-GGUF weight or a slice with a step.

    Example: ``dequantize_gguf(p, rows=torch.tensor([[1, 5, 5]]))`` → ``[1, 3, in]`` (three token embeddings).
    """
    t = gguf_type_name(p.scheme)
    out_f, in_f = _check_shape(t, p.shape)
    fn, ts = _DEQUANT[t], block_info(t)[1]
    blocks = p.data["blocks"]
    lead: tuple[int, ...] | None = None
    if isinstance(rows, slice):
        r = range(out_f)[rows]
        if r.step != 1:
            raise ConfigError("dequantize_gguf: rows must be a contiguous slice or an index tensor")
        blocks = blocks[r.start:r.stop]
    elif rows is not None:
        idx = torch.as_tensor(rows, device=blocks.device)
        if idx.is_floating_point() or idx.dtype == torch.bool:
            raise ConfigError(f"dequantize_gguf: rows must hold integer indices, got {idx.dtype}")
        lead = tuple(idx.shape)
        blocks = blocks.index_select(0, idx.reshape(-1).long())
    n = blocks.shape[0]
    out = torch.empty(n, in_f, dtype=torch.float32, device=blocks.device)
    step = max(1, CHUNK_WEIGHTS // in_f)
    for r0 in range(0, n, step):
        b = blocks[r0:r0 + step]
        out[r0:r0 + b.shape[0]] = fn(b.reshape(-1, ts)).reshape(b.shape[0], in_f)
    return out if lead is None else out.reshape(*lead, in_f)


def gguf_select_rows(p: PackedWeight, index: torch.Tensor) -> PackedWeight:
    """The packed weight with its rows reordered / selected (``W[index]``), exactly — blocks never span
    rows. For checkpoints whose GGUF row order differs from the model's: transformers un-permutes llama's
    ``attn_q``/``attn_k`` rows (``LlamaTensorProcessor._reverse_permute_weights``); applying that same
    function to ``np.arange(out)[:, None]`` gives the ``index`` that does it on the packed bytes.

    Example: ``gguf_select_rows(p, torch.arange(p.shape[0]).flip(0))`` → the rows in reverse order.
    """
    t = gguf_type_name(p.scheme)
    idx = torch.as_tensor(index, device=p.data["blocks"].device).reshape(-1).long()
    return _packed(t, (len(idx), p.shape[1]), p.data["blocks"].index_select(0, idx))


def packed_from_gguf(raw, type_name, shape) -> PackedWeight:
    """Wrap the block bytes of one GGUF tensor as a :class:`PackedWeight` — no re-quantization.

    ``raw``: the tensor's bytes as a numpy ``uint8`` array (``GGUFReader(...).tensors[i].data``, any shape
    holding ``out · in / block · block bytes`` bytes; it is copied, since the reader's arrays are read-only
    memory maps of the file) or a torch ``uint8`` tensor (used as is). ``type_name``: ``"q4_1"``, ``"Q4_1"``,
    a ``GGMLQuantizationType`` or its id (:func:`gguf_type_name`). ``shape``: ``(out, in)`` — the **reverse**
    of GGUF's ``ne`` order / ``GGUFReader``'s ``tensor.shape``.

    Raises ``ConfigError`` for an unsupported type, a shape whose ``in`` is not a multiple of the block
    (with a hint when the order looks reversed) or a byte count that does not match.

    Example::

        r = gguf.GGUFReader(path)
        t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
        p = packed_from_gguf(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())))
        q = QuantLinear.from_packed(p)
    """
    t = gguf_type_name(type_name)
    out_f, in_f = _check_shape(t, shape)
    bs, ts = block_info(t)
    row_bytes = in_f // bs * ts
    if isinstance(raw, torch.Tensor):
        if raw.dtype != torch.uint8:
            raise ConfigError(f"{t}: raw GGUF bytes must be uint8, got {raw.dtype}")
        blocks = raw
    else:
        import numpy as np  # torch's own dependency; only needed for file bytes

        arr = np.asarray(raw)
        if arr.dtype != np.uint8:
            raise ConfigError(f"{t}: raw GGUF bytes must be a uint8 array, got {arr.dtype}")
        blocks = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
    if blocks.numel() != out_f * row_bytes:
        raise ConfigError(f"{t}: {blocks.numel()} bytes do not hold a {(out_f, in_f)} weight "
                          f"({out_f} rows × {row_bytes} bytes = {out_f * row_bytes})")
    return _packed(t, (out_f, in_f), blocks.reshape(out_f, row_bytes))


def gguf_bytes(p: PackedWeight):
    """The packed weight's bytes as a numpy ``uint8 [out, row bytes]`` array — what ``GGUFWriter.add_tensor
    (name, array, raw_dtype=to_gguf_type(p.scheme))`` writes.

    Example: ``writer.add_tensor("blk.0.attn_q.weight", gguf_bytes(p), raw_dtype=to_gguf_type(p.scheme))``.
    """
    gguf_type_name(p.scheme)
    return p.data["blocks"].detach().cpu().contiguous().numpy()


# ----------------------------------------------------------------------------------------------------
# The matmul
# ----------------------------------------------------------------------------------------------------

ACTIVATION_MODES = (None, "llama.cpp")


def gguf_linear(x: torch.Tensor, p: PackedWeight, bias: torch.Tensor | None = None, *,
                activations: str | None = None) -> torch.Tensor:
    """``y = x Ŵᵀ + b`` for a packed GGUF weight, dequantized in row chunks (≤ ``CHUNK_WEIGHTS`` float32
    weights at a time), ``[..., in] → [..., out]``.

    ``activations=None``: ``F.linear`` in ``x``'s dtype with the gguf-exact ``Ŵ``.
    ``activations="llama.cpp"``: llama.cpp's CPU matmul — the input is quantized to the weight type's
    :data:`VEC_DOT_TYPE` and the product is taken as ggml's integer dot products define it (Q8_1's
    ``m · s`` term, Q8_K's minimum through ``bsums``; see :mod:`.gguf_activations` for what is and is not
    emulated); computed in float32, returned in ``x``'s dtype.

    Example: ``gguf_linear(torch.randn(3, 64), GGUFCodec("q4_1").quantize(torch.randn(8, 64)),
    activations="llama.cpp").shape`` → ``(3, 8)``.
    """
    t = gguf_type_name(p.scheme)
    out_f, in_f = _check_shape(t, p.shape)
    if x.shape[-1] != in_f:
        raise ConfigError(f"{t}: input has {x.shape[-1]} features, the weight expects {in_f}")
    if activations not in ACTIVATION_MODES:
        raise ConfigError(f"activations must be None or 'llama.cpp', got {activations!r}")
    fn, ts = _DEQUANT[t], block_info(t)[1]

    def dequant_chunks():
        for r0, r1, b in _row_chunks(p):
            yield r0, r1, fn(b.reshape(-1, ts)).reshape(r1 - r0, in_f)

    if activations is None:
        if out_f * in_f <= CHUNK_WEIGHTS:
            w = next(dequant_chunks())[2]
            return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
        x2 = x.reshape(-1, in_f)
        out = torch.empty(x2.shape[0], out_f, dtype=x.dtype, device=x.device)
        for r0, r1, w in dequant_chunks():
            out[:, r0:r1] = F.linear(x2, w.to(x.dtype))
        if bias is not None:
            out += bias.to(x.dtype)
        return out.reshape(*x.shape[:-1], out_f)

    split_fn = _SPLIT.get(t)

    def split_chunks():
        for r0, r1, b in _row_chunks(p):
            scaled, offs = split_fn(b.reshape(-1, ts))
            yield r0, r1, scaled.reshape(r1 - r0, in_f), offs.reshape(r1 - r0, -1)

    y = emulated_linear(x.to(torch.float32), t, out_f, dequant_chunks,
                        split_chunks if split_fn is not None else None)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


__all__ = [
    "GGUF_TYPES", "GGUF_FALLBACK_TYPES", "GGUF_WEIGHT_TYPES", "GGUF_BITS_PER_WEIGHT", "LLAMA_QUANTIZE_FALLBACK",
    "VEC_DOT_TYPE", "GGUFCodec", "gguf_type_name", "gguf_type_id", "to_gguf_type", "fallback_type",
    "packed_from_gguf", "gguf_bytes", "dequantize_gguf", "gguf_select_rows", "gguf_linear",
    "quantize_activations",
]
