"""Block selection: which (query block, key block) tiles a sparse kernel computes.

Definitions (docs/definitions.md "Sparse attention"; SpargeAttention, Zhang et al. 2025):

* mean-pool Q in blocks of ``block_q`` rows and K in blocks of ``block_k`` rows;
* block self-similarity = mean pairwise cosine of the rows inside a block; a block below
  ``sim_threshold`` is not represented by its mean, so it is always computed (a query block: its whole
  row; a key block: its whole column) and a key block of that kind takes no part in the scoring;
* block scores ``P = softmax(pooled_Q . pooled_K^T . scale)`` over the key blocks the model's own mask
  (causal and padding) allows for that query block;
* per query block keep top-k (a fraction of the allowed key blocks), top-p (the smallest set whose
  cumulative P reaches p) or hybrid (the union), plus the sink block and a local diagonal window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .config import SparseConfig
from .masks import (
    _analyze_mask,
    _base_blocks,
    _BaseMask,
    _block_bounds,
    _streaming_blocks,
)

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
    """Choose the (query block, key block) tiles to compute, as docs/definitions.md#sparse-attention defines.

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


def _streaming_params(selection: BlockSelection) -> tuple[int, int]:
    cfg = selection.config
    if cfg.mode == "streaming":
        return cfg.sink_tokens, cfg.window
    return 0, selection.q_len + selection.k_len + 1  # a band wider than any distance: no restriction


def _resolve_base(selection: BlockSelection, attention_mask, is_causal: bool, query: torch.Tensor) -> _BaseMask:
    batch, heads, q_len, _ = query.shape
    if (q_len, batch, heads) != (selection.q_len, selection.kept.shape[0], selection.kept.shape[1]):
        raise ValueError(
            f"selection was made for B={selection.kept.shape[0]}, H={selection.kept.shape[1]}, Tq={selection.q_len}; "
            f"got query of shape {tuple(query.shape)}"
        )
    base = selection._base
    if base is not None and base.matches(attention_mask, is_causal):
        return base
    base = _analyze_mask(attention_mask, is_causal, batch, selection.q_len, selection.k_len, query.device)
    base_any, base_all = _base_blocks(base, selection.block_q, selection.block_k, query.device)
    if not (torch.equal(base_any.expand_as(selection.allowed), selection.allowed)
            and torch.equal(base_all.expand_as(selection.allowed), selection.allowed_full)):
        raise ValueError(
            "the attention mask / is_causal passed here differ from those the selection was made with; "
            "call select_blocks (or make_selection) with the same mask"
        )
    return base
