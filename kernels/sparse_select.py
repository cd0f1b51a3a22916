"""Block selection for block-sparse attention (pure torch; imports nothing from lens).

This module decides *which* (query block, key block) tiles a sparse kernel computes; ``kernels.sparse``
executes the decision with FlexAttention. The definitions are those of DESIGN.md §3 "Sparse attention"
(SpargeAttention, Zhang et al. 2025):

* mean-pool Q in blocks of ``block_q`` rows and K in blocks of ``block_k`` rows;
* block self-similarity = mean pairwise cosine of the rows inside a block; a block below
  ``sim_threshold`` is not represented by its mean, so it is always computed (a query block: its whole
  row; a key block: its whole column) and a key block of that kind takes no part in the scoring;
* block scores ``P̂ = softmax(pooled_Q · pooled_Kᵀ · scale)`` over the key blocks the model's own mask
  (causal and padding) allows for that query block;
* per query block keep top-k (a fraction of the allowed key blocks), top-p (the smallest set whose
  cumulative P̂ reaches p) or hybrid (the union), plus the sink block and a local diagonal window.

The model's own mask is called the *base* mask throughout: it is the mask dense attention would use, and
sparsity only ever removes (query, key) pairs from it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import normalize_mask
from .errors import ConfigError

__all__ = ["SparseConfig", "BlockSelection", "select_blocks", "make_selection", "MODES"]

MODES = ("topk", "topp", "hybrid", "streaming")

# Block sizes must be multiples of this. FlexAttention's Triton kernel walks a sparse block with tiles of
# BLOCK_M query rows and BLOCK_N key rows and statically asserts SPARSE_Q_BLOCK_SIZE % BLOCK_M == 0 and
# SPARSE_KV_BLOCK_SIZE % BLOCK_N == 0 (flex_attention.py.jinja); the tiles are powers of two and at least
# 16 (tl.dot's minimum). A multiple of 16 is therefore the weakest condition under which *some* legal tile
# divides the block, and kernels.sparse picks that tile explicitly on GPU. The CPU (Inductor C++) kernel
# uses the sparse blocks themselves as its tiles, where multiples of 16 keep the 16-lane fp32 vectors full.
BLOCK_MULTIPLE = 16


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SparseConfig:
    """How block-sparse attention chooses its blocks (DESIGN.md §3 "Sparse attention").

    ``mode``: ``"topk"``, ``"topp"``, ``"hybrid"`` (union of both) or ``"streaming"`` (StreamingLLM:
    sink tokens + a recent window, no scoring; build it with :meth:`streaming`).
    ``topk``: fraction in (0, 1] of the key blocks the base mask allows for a query block; at least one
    block is kept (``ceil(topk · allowed)``).
    ``topp``: cumulative block probability in (0, 1] to reach.
    ``block_q`` / ``block_k``: query / key rows per block, positive multiples of 16.
    ``sim_threshold``: in [-1, 1]; blocks whose mean pairwise cosine is below it are always computed.
    -1 disables the check (a mean pairwise cosine is never below -1) and skips its cost.
    ``keep_sink_block``: always keep the first key block the base mask allows (the attention sink).
    ``local_blocks``: ``w >= 0``; keep the key blocks within ``w`` blocks of the diagonal (``w = 1`` keeps
    exactly the blocks the diagonal crosses, which guarantees every causal query row at least itself).
    ``linear_fallback``: approximate the skipped blocks with linear attention instead of dropping them
    (SLA-style; see ``kernels.sparse``).
    ``sink_tokens`` / ``window``: token counts used only by the streaming mode.

    Example::

        cfg = SparseConfig(mode="hybrid", topk=0.1, topp=0.9)          # defaults: blocks 128 x 64
        SparseConfig(topk=0)                                           # ConfigError: topk must be in (0, 1]
        SparseConfig.streaming(sink_tokens=4, window=1024).describe()["mode"]   # 'streaming'
    """

    mode: str = "hybrid"
    topk: float = 0.1
    topp: float = 0.9
    block_q: int = 128
    block_k: int = 64
    sim_threshold: float = -1.0
    keep_sink_block: bool = True
    local_blocks: int = 1
    linear_fallback: bool = False
    sink_tokens: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"SparseConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("topk", "topp"):
            value = getattr(self, name)
            if not _is_real(value) or not (0.0 < value <= 1.0):
                what = "a fraction of the allowed key blocks" if name == "topk" else "a cumulative block probability"
                raise ConfigError(f"SparseConfig.{name} must be in (0, 1] ({what}); got {value!r}")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 or value % BLOCK_MULTIPLE:
                raise ConfigError(
                    f"SparseConfig.{name} must be a positive multiple of {BLOCK_MULTIPLE} (16, 32, 48, ...): "
                    f"FlexAttention tiles each sparse block with power-of-two tiles of at least 16 rows, which "
                    f"must divide the block; got {value!r}"
                )
        if not _is_real(self.sim_threshold) or not (-1.0 <= self.sim_threshold <= 1.0):
            raise ConfigError(
                f"SparseConfig.sim_threshold must be in [-1, 1] (a mean cosine similarity); got {self.sim_threshold!r}"
            )
        for name in ("keep_sink_block", "linear_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"SparseConfig.{name} must be True or False; got {getattr(self, name)!r}")
        if not _is_int(self.local_blocks) or self.local_blocks < 0:
            raise ConfigError(f"SparseConfig.local_blocks must be an integer >= 0; got {self.local_blocks!r}")
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ConfigError(f"SparseConfig.sink_tokens must be an integer >= 0; got {self.sink_tokens!r}")
        if not _is_int(self.window) or self.window < 1:
            raise ConfigError(f"SparseConfig.window must be an integer >= 1 (tokens); got {self.window!r}")

    @classmethod
    def streaming(
        cls, sink_tokens: int = 4, window: int = 1024, *, block_q: int = 128, block_k: int = 64,
        linear_fallback: bool = False,
    ) -> SparseConfig:
        """StreamingLLM preset (DESIGN.md §3): the first ``sink_tokens`` keys plus a window of recent keys.

        A query at position ``q`` (bottom-right aligned, as in causal attention with a cache) keeps key
        ``k`` when ``k < sink_tokens`` or ``|q − k| < window``, intersected with the base mask — so for a
        causal model exactly the keys ``q − window < k ≤ q``. Nothing is scored; the kernel computes the
        blocks this pattern touches and masks the rest of them element by element.

        Example: ``SparseConfig.streaming(sink_tokens=4, window=256).mode`` → ``'streaming'``.
        """
        return cls(
            mode="streaming", sink_tokens=sink_tokens, window=window, block_q=block_q, block_k=block_k,
            keep_sink_block=False, local_blocks=0, linear_fallback=linear_fallback,
        )

    def describe(self) -> dict:
        """A short JSON-able description for run provenance.

        Example: ``SparseConfig().describe()`` → ``{'kind': 'sparse', 'mode': 'hybrid', 'topk': 0.1, ...}``.
        """
        out = {"kind": "sparse", "mode": self.mode, "block_q": self.block_q, "block_k": self.block_k}
        if self.mode == "streaming":
            out.update(sink_tokens=self.sink_tokens, window=self.window)
        else:
            if self.mode in ("topk", "hybrid"):
                out["topk"] = self.topk
            if self.mode in ("topp", "hybrid"):
                out["topp"] = self.topp
            out.update(
                sim_threshold=self.sim_threshold, keep_sink_block=self.keep_sink_block,
                local_blocks=self.local_blocks,
            )
        out["linear_fallback"] = self.linear_fallback
        return out


# ----------------------------------------------------------------------------------------------------
# The base mask


@dataclass(eq=False)
class _BaseMask:
    """The model's own mask, reduced to the cheapest exact form.

    ``structured`` masks are ``key_ok[b, k] ∧ (k ≤ q + offset if causal)`` where each sequence's real
    keys are one contiguous range ``key_lo[b] ≤ k < key_hi[b]``: no mask, ``is_causal``, and every
    Hugging Face padding mask (left or right padding, causal or bidirectional). They need O(T) memory and
    give an O(T) block analysis. Anything else (packed sequences, sliding windows, per-head masks,
    padding with holes) is ``general`` and kept as the boolean tensor it came as.
    """

    source: object  # weak reference to the attention_mask this was built from, or None (no mask)
    is_causal_arg: bool
    batch: int
    q_len: int
    k_len: int
    offset: int  # bottom-right alignment of the causal diagonal: key k is "now" for query k - offset
    structured: bool
    causal: bool
    key_ok: torch.Tensor | None  # [B, Tk] bool; None = every key is a real token
    allowed: torch.Tensor | None  # general masks only: [Bm, Hm, Tq, Tk] bool
    bias: torch.Tensor | None  # additive float mask with non-zero allowed entries, [Bm, Hm, Tq, Tk]
    query_valid: torch.Tensor  # [B, Tq] bool, the mask diagonal (as kernels.attention defines it)
    key_valid: torch.Tensor | None  # [B, Tk] bool: keys some query may attend; None = all
    key_lo: torch.Tensor | None = None  # [B] int64: structured masks' real keys are key_lo <= k < key_hi
    key_hi: torch.Tensor | None = None

    def matches(self, attention_mask, is_causal: bool) -> bool:
        same = attention_mask is None if self.source is None else self.source() is attention_mask
        return same and self.is_causal_arg == bool(is_causal)


def _chunk_rows(batch: int, heads: int, k_len: int) -> int:
    # about 16 M booleans per chunk of a materialized mask
    return max(1, (1 << 24) // max(1, batch * heads * k_len))


# The last mask analysed. A Hugging Face model hands every layer the same mask object, and the analysis
# of a materialized mask is O(B·T²): once per forward pass is enough. The tensor's version counter
# invalidates the entry on in-place edits; inference-mode tensors have none, so they are not cached.
_last_analysis: list = [None]


def _analyze_mask(attention_mask, is_causal: bool, batch: int, q_len: int, k_len: int, device) -> _BaseMask:
    if attention_mask is None or attention_mask.is_inference():
        return _analyze_mask_uncached(attention_mask, is_causal, batch, q_len, k_len, device)
    key = (attention_mask._version, bool(is_causal), batch, q_len, k_len, str(device))
    entry = _last_analysis[0]
    if entry is not None and entry[1]() is attention_mask and entry[0] == key:
        return entry[2]
    base = _analyze_mask_uncached(attention_mask, is_causal, batch, q_len, k_len, device)
    _last_analysis[0] = (key, weakref.ref(attention_mask), base)
    return base


def _analyze_mask_uncached(attention_mask, is_causal, batch, q_len, k_len, device) -> _BaseMask:
    allowed, bias = normalize_mask(attention_mask, q_len, k_len)
    offset = k_len - q_len
    source = None if attention_mask is None else weakref.ref(attention_mask)
    common = dict(source=source, is_causal_arg=bool(is_causal), batch=batch, q_len=q_len,
                  k_len=k_len, offset=offset, bias=bias)
    if allowed is None:
        # kernels.attention applies is_causal only when there is no mask; so do we.
        return _BaseMask(structured=True, causal=bool(is_causal), key_ok=None, allowed=None,
                         query_valid=torch.ones(batch, q_len, dtype=torch.bool, device=device),
                         key_valid=None, **common)
    allowed = allowed.to(device)
    if bias is not None:
        bias = bias.to(device)
        common["bias"] = bias
    # query validity exactly as kernels.attention: the diagonal, any head; all valid if not square
    if q_len == k_len:
        query_valid = torch.diagonal(allowed, dim1=-2, dim2=-1).any(dim=1).expand(batch, q_len).clone()
    else:
        query_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device)
    heads_m = allowed.shape[1]
    key_ok = torch.zeros(allowed.shape[0], k_len, dtype=torch.bool, device=device)
    rows = _chunk_rows(allowed.shape[0], heads_m, k_len)
    for start in range(0, q_len, rows):
        key_ok |= allowed[..., start:start + rows, :].any(dim=-2).any(dim=1)
    # a fresh tensor, not a view: Dynamo guards a view's base, and a view here but not elsewhere recompiles
    key_ok = key_ok.expand(batch, k_len).clone()
    # Is the mask key_ok ∧ causal, or key_ok alone? One chunked comparison each decides it exactly.
    k_idx = torch.arange(k_len, device=device)
    candidates = [True, False]
    for start in range(0, q_len, rows):
        chunk = allowed[..., start:start + rows, :]
        q_idx = torch.arange(start, start + chunk.shape[-2], device=device)[:, None] + offset
        key_part = key_ok[:, None, None, :] if chunk.shape[0] == batch else key_ok[:1, None, None, :]
        for causal in list(candidates):
            expected = key_part & (k_idx[None, :] <= q_idx) if causal else key_part.expand_as(chunk)
            if not torch.equal(chunk, expected.expand_as(chunk)):
                candidates.remove(causal)
        if not candidates:
            break
    if candidates:
        # the kernel's mask_mod encodes padding as one range per sequence (see kernels.sparse)
        positions = torch.arange(k_len, device=device)
        any_key = key_ok.any(dim=-1)
        key_lo = torch.where(any_key, torch.where(key_ok, positions, k_len).amin(dim=-1), 0)
        key_hi = torch.where(any_key, torch.where(key_ok, positions, -1).amax(dim=-1) + 1, 0)
        contiguous = (positions >= key_lo[:, None]) & (positions < key_hi[:, None])
        if torch.equal(contiguous, key_ok):
            return _BaseMask(structured=True, causal=candidates[0], key_ok=key_ok, allowed=None,
                             query_valid=query_valid, key_valid=key_ok, key_lo=key_lo, key_hi=key_hi, **common)
    return _BaseMask(structured=False, causal=False, key_ok=None, allowed=allowed.contiguous(),
                     query_valid=query_valid, key_valid=key_ok, **common)


def _block_bounds(length: int, block: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.arange(0, length, block, device=device)
    stops = torch.clamp(starts + block, max=length) - 1
    return starts, stops  # first and last position of every block


def _base_blocks(base: _BaseMask, block_q: int, block_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-level view of the base mask: (any, all) of the in-range elements, [B|1, H|1, nQb, nKb]."""
    q0, q1 = _block_bounds(base.q_len, block_q, device)
    k0, k1 = _block_bounds(base.k_len, block_k, device)
    n_q, n_k = q0.numel(), k0.numel()
    if base.structured:
        if base.key_ok is None:
            first_valid = k0[None, :]
            fully_valid = torch.ones(1, n_k, dtype=torch.bool, device=device)
            any_valid = fully_valid
        else:
            pad = n_k * block_k - base.k_len
            ok = F.pad(base.key_ok, (0, pad)).view(-1, n_k, block_k)
            positions = torch.arange(n_k * block_k, device=device).view(n_k, block_k)
            big = torch.iinfo(torch.int64).max
            first_valid = torch.where(ok, positions, big).amin(dim=-1)  # [B, nKb]
            sizes = (k1 - k0 + 1)[None, :]
            fully_valid = ok.sum(dim=-1) == sizes
            any_valid = ok.any(dim=-1)
        if base.causal:
            any_ = first_valid[:, None, :] <= (q1 + base.offset)[None, :, None]
            all_ = fully_valid[:, None, :] & (k1[None, None, :] <= (q0 + base.offset)[None, :, None])
        else:
            any_ = any_valid[:, None, :].expand(-1, n_q, -1)
            all_ = fully_valid[:, None, :].expand(-1, n_q, -1)
        return any_[:, None], all_[:, None]
    allowed = base.allowed
    bm, hm = allowed.shape[:2]
    pad_k = n_k * block_k - base.k_len
    any_out = torch.empty(bm, hm, n_q, n_k, dtype=torch.bool, device=device)
    all_out = torch.empty_like(any_out)
    step = max(1, _chunk_rows(bm, hm, base.k_len) // block_q)
    for i in range(0, n_q, step):
        rows = allowed[..., i * block_q:(i + step) * block_q, :]
        c = (rows.shape[-2] + block_q - 1) // block_q
        pad_q = c * block_q - rows.shape[-2]
        # out-of-range positions count as allowed for "all" and as forbidden for "any"
        as_all = F.pad(rows, (0, pad_k, 0, pad_q), value=True).view(bm, hm, c, block_q, n_k, block_k)
        as_any = F.pad(rows, (0, pad_k, 0, pad_q), value=False).view(bm, hm, c, block_q, n_k, block_k)
        any_out[:, :, i:i + c] = as_any.any(dim=5).any(dim=3)
        all_out[:, :, i:i + c] = as_all.all(dim=5).all(dim=3)
    return any_out, all_out


def _streaming_blocks(config: SparseConfig, q_len: int, k_len: int, offset: int, device):
    """Blocks the streaming pattern touches (any) and covers entirely (all), [nQb, nKb]."""
    q0, q1 = _block_bounds(q_len, config.block_q, device)
    k0, k1 = _block_bounds(k_len, config.block_k, device)
    qa, qb = (q0 + offset)[:, None], (q1 + offset)[:, None]
    ka, kb = k0[None, :], k1[None, :]
    w = config.window
    sink_any = ka < config.sink_tokens
    sink_all = kb < config.sink_tokens
    # distance between the intervals [qa, qb] and [ka, kb]; the band needs |q - k| < w
    gap = torch.clamp(torch.maximum(ka - qb, qa - kb), min=0)
    band_any = gap < w
    band_all = torch.maximum((qa - ka).abs(), (qb - kb).abs()).maximum((qa - kb).abs()).maximum((qb - ka).abs()) < w
    return sink_any | band_any, sink_all | band_all


# ----------------------------------------------------------------------------------------------------
# Pooling and self-similarity


def _pool(x: torch.Tensor, block: int, weights: torch.Tensor | None, want_sim: bool):
    """Mean of every block of rows (over ``weights``-valid rows) and, if asked, its self-similarity.

    ``x`` [B, Hx, T, D]; ``weights`` [B, T] bool or None. Returns pooled [B, Hx, n, D] float32 and
    similarity [B, Hx, n] (or None). Self-similarity is the mean cosine over *distinct* pairs of valid,
    non-zero rows, computed as (‖Σ x̂ᵢ‖² − n) / (n(n − 1)) without forming the Gram matrix; blocks with
    fewer than two such rows count as perfectly similar (their mean represents them exactly).
    """
    batch, heads, length, dim = x.shape
    n = (length + block - 1) // block
    pad = n * block - length
    xf = x.float()
    if pad:
        xf = F.pad(xf, (0, 0, 0, pad))
    xb = xf.view(batch, heads, n, block, dim)
    if weights is None and not pad:
        pooled = xb.mean(dim=3)
        w = None
    else:
        if weights is None:
            w = torch.ones(1, length, device=x.device)
        else:
            w = weights.float()
        w = F.pad(w, (0, pad)).view(w.shape[0], 1, n, 1, block)
        count = w.sum(dim=-1).clamp(min=1.0)  # [B|1, 1, n, 1]
        pooled = (torch.matmul(w, xb).squeeze(-2)) / count
    if not want_sim:
        return pooled, None
    norms = xb.norm(dim=-1, keepdim=True)
    unit = xb / norms.clamp(min=1e-12)
    nonzero = (norms.squeeze(-1) > 0).float()  # [B, Hx, n, block]
    if w is not None:
        valid = nonzero * w.squeeze(-2)
    else:
        valid = nonzero
    summed = torch.matmul(valid.unsqueeze(-2), unit).squeeze(-2)  # [B, Hx, n, D]
    count = valid.sum(dim=-1)
    sq = (summed * summed).sum(dim=-1)
    sim = (sq - count) / (count * (count - 1)).clamp(min=1.0)
    sim = torch.where(count >= 2, sim, torch.ones_like(sim))
    return pooled, sim


def _expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hkv, ...] → [B, H, ...] following repeat_kv's head order (query head h uses kv head h // G)."""
    kv_heads = x.shape[1]
    if kv_heads == heads:
        return x
    group = heads // kv_heads
    return x.unsqueeze(2).expand(x.shape[0], kv_heads, group, *x.shape[2:]).reshape(x.shape[0], heads, *x.shape[2:])


# ----------------------------------------------------------------------------------------------------
# The selection


@dataclass(eq=False)
class BlockSelection:
    """The kept blocks of one attention call, ready for ``kernels.sparse``.

    ``kept``: [B, H, nQb, nKb] bool, the (query block, key block) tiles the kernel computes.
    ``full``: [B, H, nQb, nKb] bool, the kept tiles the base mask allows entirely (and, in streaming
    mode, the pattern covers entirely): the kernel skips per-element masking on them.
    ``allowed``: [B, H, nQb, nKb] bool, the tiles the base mask (causal + padding) allows at all.
    ``allowed_full``: [B, H, nQb, nKb] bool, the tiles the base mask allows entirely.
    ``kept_fraction``: [B, H] float32, kept tiles / allowed tiles.
    ``is_causal``: the ``is_causal`` argument the selection was made with (with ``attention_mask``,
    execution must be given the same two; the mask object is remembered privately for reuse).
    ``block_logits``: [B, H, nQb, nKb] float32 pooled scores (scaled), kept only when the linear
    fallback needs them to weigh the skipped mass.
    The ``kv_*`` tensors are the same selection in FlexAttention's ``BlockMask`` layout (int32; partial
    and full tiles listed separately), built here so that selection time includes them.

    Example::

        sel = select_blocks(q, k, SparseConfig(topk=0.25), is_causal=True)
        sel.kept.shape, float(sel.density)
    """

    kept: torch.Tensor
    full: torch.Tensor
    allowed: torch.Tensor
    kept_fraction: torch.Tensor
    config: SparseConfig
    q_len: int
    k_len: int
    is_causal: bool
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    full_kv_num_blocks: torch.Tensor
    full_kv_indices: torch.Tensor
    block_logits: torch.Tensor | None = None
    allowed_full: torch.Tensor | None = None
    _base: _BaseMask | None = field(default=None, repr=False)

    @property
    def block_q(self) -> int:
        return self.config.block_q

    @property
    def block_k(self) -> int:
        return self.config.block_k

    @property
    def density(self) -> torch.Tensor:
        """Kept tiles / allowed tiles over the whole call (0-dim float tensor)."""
        return self.kept.sum().float() / self.allowed.sum().clamp(min=1).float()

    def skipped_fraction(self) -> float:
        """1 − density, as a Python float. Example: ``sel.skipped_fraction()`` → 0.8."""
        return 1.0 - float(self.density)


def _flex_layout(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [.., nKb] bool → (counts int32, indices int32), kept indices first in ascending order.

    A compaction (cumulative count → scatter) rather than a sort: O(n) per row. Entries past a row's
    count are unspecified in FlexAttention's format; here they are 0 or leftover indices.
    """
    n = mask.shape[-1]
    slot = torch.cumsum(mask, dim=-1) - 1
    slot = torch.where(mask, slot, n)  # unkept columns all land in a spare slot that is cut off
    out = torch.zeros(mask.shape[:-1] + (n + 1,), dtype=torch.int32, device=mask.device)
    columns = torch.arange(n, dtype=torch.int32, device=mask.device).expand(mask.shape)
    out.scatter_(-1, slot, columns)
    return mask.sum(dim=-1, dtype=torch.int32), out[..., :n]


def _finish(
    kept: torch.Tensor, base: _BaseMask, base_any: torch.Tensor, base_all: torch.Tensor,
    config: SparseConfig, heads: int, block_logits: torch.Tensor | None,
) -> BlockSelection:
    batch = base.batch
    shape = (batch, heads) + tuple(base_any.shape[-2:])
    allowed = base_any.expand(shape)
    full_allowed = base_all.expand(shape)
    kept = kept.expand(shape) & allowed
    if config.mode == "streaming":
        _, pattern_all = _streaming_blocks(config, base.q_len, base.k_len, base.offset, kept.device)
        full = kept & full_allowed & pattern_all
    else:
        full = kept & full_allowed
    kept = kept.contiguous()
    full = full.contiguous()
    n_allowed = allowed.sum(dim=(-1, -2)).float()
    kept_fraction = kept.sum(dim=(-1, -2)).float() / n_allowed.clamp(min=1.0)
    kv_num, kv_idx = _flex_layout(kept & ~full)
    full_num, full_idx = _flex_layout(full)
    return BlockSelection(
        kept=kept, full=full, allowed=allowed, kept_fraction=kept_fraction, config=config,
        q_len=base.q_len, k_len=base.k_len, is_causal=base.is_causal_arg,
        kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num, full_kv_indices=full_idx,
        block_logits=block_logits, allowed_full=full_allowed, _base=base,
    )


def _local_window(config: SparseConfig, q_len: int, k_len: int, offset: int, device) -> torch.Tensor:
    q0, q1 = _block_bounds(q_len, config.block_q, device)
    n_k = (k_len + config.block_k - 1) // config.block_k
    lo = torch.div(q0 + offset, config.block_k, rounding_mode="floor") - (config.local_blocks - 1)
    hi = torch.div(q1 + offset, config.block_k, rounding_mode="floor") + (config.local_blocks - 1)
    j = torch.arange(n_k, device=device)[None, :]
    return (j >= lo[:, None]) & (j <= hi[:, None])


def _top_count(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The ``count`` largest entries of every row (ties go to the lower index, as a stable sort would).

    ``torch.topk`` finds the threshold (the count-th largest value) without sorting whole rows; entries
    above it are kept and entries equal to it fill the remaining places in index order.
    """
    width = int(count.max()) if count.numel() else 0
    if width == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = torch.topk(scores, width, dim=-1, sorted=True).values
    threshold = torch.gather(top, -1, (count - 1).clamp(min=0)[..., None])
    above = scores > threshold
    tied = scores == threshold
    room = count[..., None] - above.sum(dim=-1, keepdim=True)
    kept = above | (tied & (torch.cumsum(tied, dim=-1) <= room))
    return kept & (count[..., None] > 0)


def _pooled_logits(query, key, config, base, scale, want_sim):
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    q_weights = None if base.key_ok is None and base.structured else base.query_valid
    pooled_q, sim_q = _pool(query, config.block_q, q_weights, want_sim)
    pooled_k, sim_k = _pool(key, config.block_k, base.key_valid, want_sim)
    group = heads // kv_heads
    n_q = pooled_q.shape[2]
    # grouped-query attention: a group's query heads share one matmul against their kv head
    logits = torch.matmul(
        pooled_q.reshape(batch, kv_heads, group * n_q, dim), pooled_k.transpose(-1, -2)
    ).view(batch, heads, n_q, -1) * scale
    return logits, sim_q, sim_k


def select_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    config: SparseConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> BlockSelection:
    """Choose the (query block, key block) tiles to compute, as DESIGN.md §3 "Sparse attention" defines.

    ``query`` [B, H, Tq, D], ``key`` [B, Hkv, Tk, D] with ``H % Hkv == 0`` (K is never repeated: a group
    of query heads is scored against its kv head in one matmul). ``attention_mask`` is a Hugging Face
    mask (bool True = attend, or additive float; see ``kernels.attention.normalize_mask``); ``is_causal``
    applies when there is no mask, bottom-right aligned. ``scale`` defaults to 1/√D. T need not be a
    multiple of the block sizes: the last block is ragged and pooled over its real rows.

    Steps: (1) mean-pool Q per ``block_q`` rows and K per ``block_k`` rows, over real tokens only
    (padding is excluded by the mask); (2) if ``sim_threshold > -1``, blocks whose mean pairwise cosine is
    below it are forced (query block → whole row, key block → whole column) and key blocks of that kind
    are left out of the scoring; (3) ``P̂ = softmax(pooled_Q · pooled_Kᵀ · scale)`` over the key blocks
    the base mask allows (causal at block level; fully padded key blocks are never allowed, so never
    kept); (4) per query block keep ``ceil(topk · allowed)`` blocks (topk), the smallest prefix of P̂
    sorted descending whose sum reaches ``topp`` (topp), or the larger of the two prefixes — which is
    their union (hybrid); (5) add the sink block (the first allowed key block) and the local window.
    Streaming mode replaces (1)–(5) by the StreamingLLM pattern (see ``SparseConfig.streaming``).

    Example::

        q, k = torch.randn(1, 4, 1024, 64), torch.randn(1, 2, 1024, 64)       # GQA, 2 kv heads
        sel = select_blocks(q, k, SparseConfig(mode="topk", topk=0.2), is_causal=True)
        sel.kept.shape            # torch.Size([1, 4, 8, 16])
        sel.kept_fraction         # [1, 4], about 0.2 plus sink and diagonal blocks
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    if key.shape[0] != batch or key.shape[-1] != dim:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    if not isinstance(config, SparseConfig):
        raise ConfigError(f"config must be a SparseConfig; got {type(config).__name__}")
    scale = dim**-0.5 if scale is None else float(scale)
    device = query.device
    with torch.no_grad():
        base = _analyze_mask(attention_mask, is_causal, batch, q_len, k_len, device)
        base_any, base_all = _base_blocks(base, config.block_q, config.block_k, device)
        shape = (batch, heads) + tuple(base_any.shape[-2:])
        allowed = base_any.expand(shape)
        n_q, n_k = shape[-2:]

        if config.mode == "streaming":
            pattern_any, _ = _streaming_blocks(config, q_len, k_len, base.offset, device)
            block_logits = None
            if config.linear_fallback:
                block_logits, _, _ = _pooled_logits(query, key, config, base, scale, False)
            return _finish(allowed & pattern_any, base, base_any, base_all, config, heads, block_logits)

        want_sim = config.sim_threshold > -1.0
        logits, sim_q, sim_k = _pooled_logits(query, key, config, base, scale, want_sim)
        scoreable = allowed
        forced = torch.zeros(shape, dtype=torch.bool, device=device)
        if want_sim:
            low_q = (sim_q < config.sim_threshold)[..., :, None]  # [B, H, nQb, 1]
            low_k = _expand_kv_heads(sim_k < config.sim_threshold, heads)[..., None, :]  # [B, H, 1, nKb]
            forced = forced | low_q | low_k
            scoreable = scoreable & ~low_k

        n_scoreable = scoreable.sum(dim=-1)
        count = torch.zeros_like(n_scoreable)
        if config.mode in ("topk", "hybrid"):
            n_allowed = allowed.sum(dim=-1).double()
            # the epsilon keeps float products like 0.1 · 20 from rounding up to an extra block
            count = torch.ceil(config.topk * n_allowed - 1e-9).long().clamp(min=1)
        if config.mode == "topk":
            # P̂ is monotone in the logits within a row, so top-k needs neither the softmax nor a sort
            count = torch.minimum(count, n_scoreable)
            kept = _top_count(logits.masked_fill(~scoreable, float("-inf")), count) & scoreable
        else:
            # float64: counts compare cumulative sums with p, and float32 rounding would move blocks in
            # and out of the set at exact boundaries
            probs = torch.softmax(logits.double().masked_fill(~scoreable, float("-inf")), dim=-1).nan_to_num(0.0)
            order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
            cumulative = torch.cumsum(torch.gather(probs, -1, order), dim=-1)
            p_count = (cumulative < config.topp - 1e-12).sum(dim=-1) + 1
            count = torch.minimum(torch.maximum(count, p_count), n_scoreable)
            ranked = torch.arange(n_k, device=device) < count[..., None]
            kept = torch.zeros(shape, dtype=torch.bool, device=device).scatter(-1, order, ranked) & scoreable
        kept |= forced
        if config.keep_sink_block:
            first = allowed.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first allowed key block
            kept |= torch.zeros_like(kept).scatter(-1, first, True)
        if config.local_blocks:
            kept |= _local_window(config, q_len, k_len, base.offset, device)
        return _finish(
            kept, base, base_any, base_all, config, heads,
            logits.float() if config.linear_fallback else None,
        )


def make_selection(
    kept: torch.Tensor,
    config: SparseConfig,
    *,
    q_len: int,
    k_len: int,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    query: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    scale: float | None = None,
) -> BlockSelection:
    """Wrap an explicit block pattern (e.g. a custom or random one) as a BlockSelection.

    ``kept`` is [B, H, nQb, nKb] bool (or broadcastable to it) with nQb = ceil(q_len / block_q) and
    nKb = ceil(k_len / block_k); it is intersected with the base mask. ``query``/``key`` are needed only
    when ``config.linear_fallback`` is set (to compute the pooled scores that weigh the skipped mass).

    Example::

        kept = torch.rand(1, 4, 4, 8) < 0.5
        sel = make_selection(kept, SparseConfig(), q_len=512, k_len=512, is_causal=True)
    """
    batch, heads = kept.shape[0], kept.shape[1]
    device = kept.device
    with torch.no_grad():
        base = _analyze_mask(attention_mask, is_causal, batch, q_len, k_len, device)
        base_any, base_all = _base_blocks(base, config.block_q, config.block_k, device)
        if tuple(kept.shape[-2:]) != tuple(base_any.shape[-2:]):
            raise ValueError(
                f"kept has {tuple(kept.shape[-2:])} blocks, but T=({q_len}, {k_len}) with blocks "
                f"({config.block_q}, {config.block_k}) gives {tuple(base_any.shape[-2:])}"
            )
        logits = None
        if config.linear_fallback:
            if query is None or key is None:
                raise ValueError("make_selection needs query and key when config.linear_fallback is set")
            scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
            logits, _, _ = _pooled_logits(query, key, config, base, scale, False)
        return _finish(kept.bool(), base, base_any, base_all, config, heads, logits)
