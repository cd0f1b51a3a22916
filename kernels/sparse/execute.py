"""Public entry points: sparse attention, its eager masked reference, and its statistics in one pass.

Statistics under sparsity are those of the renormalized probabilities over the kept blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import AttentionStats
from .flex import _TARGET_CHUNK_ELEMENTS
from .linear import _linear_branch, _mix
from .gathered import gathered_supported
from .paths import EXECUTIONS, _choose, keeps_every_block, run_execution
from .masks import _BaseMask
from .selection import BlockSelection, _resolve_base, _streaming_params

# ----------------------------------------------------------------------------------------------------
# Public execution


def sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    compiled: bool = True,
    execution: str = "auto",
) -> torch.Tensor:
    """Block-sparse attention over the kept blocks of ``selection`` (docs/definitions.md), [B, H, Tq, Dv].

    Shapes as in ``scaled_dot_product_attention``: query [B, H, Tq, D], key/value [B, Hkv, Tk, D|Dv],
    ``H % Hkv == 0`` (FlexAttention's ``enable_gqa``; K/V are not repeated). Pass the same
    ``attention_mask``/``is_causal``/``scale`` as to :func:`select_blocks`. Within a kept block the base
    mask applies element by element; rows with no allowed key are zeros. ``softcap`` applies
    ``cap·tanh(s/cap)`` to the scaled scores (before an additive float mask, as kernels.attention does).

    With ``config.linear_fallback`` the output is the SLA-style mixture
    ``o = (1 − w)·o_sparse + w·o_linear`` where ``o_sparse`` is softmax attention renormalized over the
    kept blocks, ``o_linear`` is linear attention (φ = softmax over features) over the skipped blocks the
    base mask allows entirely, and ``w`` (per query block, :func:`linear_mix_weight`) is their estimated
    share of the softmax mass. Both branches are normalized, so ``w`` is the only coupling. This is
    training-free: it helps where the skipped attention is diffuse (the linear branch's smooth weights
    are then right), and measured no gain on all-MiniLM-L6-v2, whose skipped mass φ(q)·φ(k) ranks poorly;
    SLA fine-tunes a projection of this branch, which an analysis tool cannot.

    ``execution`` picks how the kept blocks are computed - every path computes exactly them, only the
    speed differs (``kernels.sparse.paths``): ``"dense"`` (SDPA; only when the selection keeps every
    block), ``"gathered"`` (each query block's kept key/value blocks gathered into batched SDPA calls),
    ``"flex"`` (compiled FlexAttention over a ``BlockMask``), or ``"auto"``: dense when every block is
    kept, else the faster of the other two measured on this machine per shape (:func:`choose_execution`).
    ``compiled=False`` runs FlexAttention eagerly (debugging; materializes the scores).

    Example::

        q = torch.randn(1, 4, 1024, 64); k = v = torch.randn(1, 2, 1024, 64)
        sel = select_blocks(q, k, SparseConfig(topk=0.2), is_causal=True)
        out = sparse_attention(q, k, v, sel, is_causal=True)      # ≈ SDPA(q, k, v, is_causal=True, enable_gqa=True)
    """
    base = _resolve_base(selection, attention_mask, is_causal, query)
    if key.shape[2] != selection.k_len or query.shape[1] % key.shape[1]:
        raise ValueError(f"key of shape {tuple(key.shape)} does not fit the selection (Tk={selection.k_len})")
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}; got {execution!r}")
    if execution == "auto":
        execution = _choose(query, key, value, selection, base, attention_mask, is_causal, scale, softcap, compiled)
    elif execution == "dense" and not keeps_every_block(selection):
        raise ValueError("execution='dense' computes every allowed pair; this selection skips blocks")
    elif execution == "gathered" and not gathered_supported(query, value, base, softcap):
        raise ValueError("execution='gathered' supports neither softcap, additive float masks nor Dv != D; "
                         "use 'flex' or 'auto'")
    out = run_execution(execution, query, key, value, selection, base, attention_mask, is_causal, scale, softcap,
                        compiled)
    if selection.config.linear_fallback:
        out = _mix(out, _linear_branch(query, key, value, selection), selection)
    return out










# ----------------------------------------------------------------------------------------------------
# Statistics


def _mask_counts(base: _BaseMask, device, query_weights: torch.Tensor | None = None):
    """(|Q_k|, Σ_{q∈Q_k} 1/|K_q|, group uniform) under the base mask (valid queries only), [B, Tk] float32 each
    — and with ``query_weights`` w [B, G, Tq], Σ_{q∈Q_k} w[b, g, q] / |K_q| [B, G, Tk] (else None).

    The same quantities kernels.attention counts: the model's mask defines them, never the sparsity
    pattern, so a sparse run's uniform share (and text→image yardstick) is the dense run's. Structured masks
    (causal and/or one contiguous range of real keys) in O(T); any other mask (sliding windows, bidirectional
    blocks) chunked.
    """
    batch, q_len, k_len = base.batch, base.q_len, base.k_len
    valid = base.query_valid.float()
    w = query_weights.double() if query_weights is not None else None
    group = None
    if base.structured:
        ok = base.key_ok.float() if base.key_ok is not None else torch.ones(batch, k_len, device=device)
        if base.causal:
            # query q sees the real keys k ≤ q + offset; key k is seen by the valid queries q ≥ k - offset
            seen_by_query = ok.cumsum(-1)[:, (torch.arange(q_len, device=device) + base.offset).clamp(max=k_len - 1)]
            inv = torch.where(seen_by_query > 0, valid / seen_by_query.clamp(min=1.0), 0.0).double()
            first = (torch.arange(k_len, device=device) - base.offset).clamp(0, q_len)
            zero = torch.zeros(batch, 1, device=device)
            count = torch.cat([valid.flip(-1).cumsum(-1).flip(-1), zero], dim=-1)[:, first]
            uniform = torch.cat([inv.flip(-1).cumsum(-1).flip(-1), zero.double()], dim=-1)[:, first].float()
            if w is not None:
                spread = w * inv[:, None, :]  # [B, G, Tq]: what each query puts on every key it sees
                suffix = torch.cat([spread.flip(-1).cumsum(-1).flip(-1), spread.new_zeros(*spread.shape[:2], 1)], dim=-1)
                group = suffix[..., first].float()
        else:
            n_keys = ok.sum(dim=-1, keepdim=True)
            count = valid.sum(dim=-1, keepdim=True).expand(batch, k_len)
            uniform = (valid / n_keys.clamp(min=1.0)).sum(dim=-1, keepdim=True).expand(batch, k_len)
            if w is not None:
                per_key = (w * (valid / n_keys.clamp(min=1.0)).double()[:, None, :]).sum(-1, keepdim=True)
                group = per_key.float().expand(-1, -1, k_len)
        if group is not None:
            group = (group * ok[:, None, :]).contiguous()
        return (count * ok).contiguous(), (uniform * ok).contiguous(), group
    allowed = base.allowed
    count = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    uniform = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    if w is not None:
        group = torch.zeros(batch, w.shape[1], k_len, dtype=torch.float32, device=device)
    rows = max(1, (1 << 24) // max(1, batch * allowed.shape[1] * k_len))
    for start in range(0, q_len, rows):
        chunk = allowed[..., start:start + rows, :]
        counted = (chunk & base.query_valid[:, None, start:start + rows, None]).any(dim=1)  # [B, rows, Tk]
        count += counted.sum(dim=1, dtype=torch.float32)
        seen = counted.float()
        n_keys = seen.sum(dim=-1, keepdim=True)
        inv = torch.where(n_keys > 0, 1.0 / n_keys.clamp(min=1.0), 0.0)
        uniform += torch.matmul(inv.transpose(1, 2), seen).squeeze(1)
        if w is not None:  # [B, G, rows] × [B, rows, Tk]
            group += torch.matmul(w[:, :, start:start + rows].float() * inv.transpose(1, 2), seen)
    return count, uniform, group


def _stats(query, key, selection: BlockSelection, base: _BaseMask, scale, softcap, pattern_heads, chunk_size,
           query_weights=None):
    """Statistics of the kept-block probabilities, visiting only kept blocks, chunked over query blocks.

    Each query block gathers its kept key blocks (padded to the chunk's largest count; padding slots are
    masked), so work and memory scale with the kept blocks, not with T². Probabilities are recomputed
    here because the CPU kernel cannot return its log-sum-exp; they are the same softmax over the same
    elements (kept blocks ∧ base mask ∧ pattern) that the kernel normalizes over. ``query_weights``
    [B, G, Tq] folds the same probabilities into per-group column sums (``group_key_mass``), chunk by chunk.
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    bq, bk = selection.block_q, selection.block_k
    n_q, n_k = selection.kept.shape[-2:]
    device = query.device
    scale = dim**-0.5 if scale is None else scale
    k_pad = n_k * bk
    qp = F.pad(query.float(), (0, 0, 0, n_q * bq - q_len)).view(batch, heads, n_q, bq, dim)
    kp = F.pad(key.float(), (0, 0, 0, k_pad - k_len)).view(batch, kv_heads, n_k, bk, dim)
    valid = F.pad(base.query_valid.float(), (0, n_q * bq - q_len)).view(batch, 1, n_q, 1, bq)
    key_mass = torch.zeros(batch, heads, k_pad, dtype=torch.float32, device=device)
    pattern_heads = tuple(int(h) for h in pattern_heads)
    patterns = (
        torch.zeros(batch, len(pattern_heads), q_len, k_len, dtype=torch.float32, device=device)
        if pattern_heads else None
    )
    kept = selection.kept
    counts = kept.sum(dim=-1)
    order = torch.sort(kept.to(torch.int8), dim=-1, descending=True, stable=True).indices
    max_kept = int(counts.max()) if counts.numel() else 0
    sink, window = _streaming_params(selection)
    streaming = selection.config.mode == "streaming"
    key_ok = None
    if base.structured and base.key_ok is not None:
        key_ok = F.pad(base.key_ok, (0, k_pad - k_len), value=False)
    b_ix = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h_ix = (torch.arange(heads, device=device) // group).view(1, heads, 1, 1)
    offsets = torch.arange(bk, device=device)
    group_mass = wp = None
    if query_weights is not None:
        n_groups = query_weights.shape[1]
        group_mass = torch.zeros(batch, n_groups, heads, k_pad, dtype=torch.float32, device=device)
        wp = F.pad(query_weights.float(), (0, n_q * bq - q_len)).view(batch, n_groups, n_q, bq)
    # the per-group sums hold G / bq times a chunk's probabilities: fewer query blocks per chunk then
    spread = max(1.0, wp.shape[1] / bq) if wp is not None else 1.0
    if chunk_size:
        step = max(1, int(chunk_size) // bq)
    else:
        step = max(1, int(_TARGET_CHUNK_ELEMENTS // (spread * max(1, batch * heads * bq * max(1, max_kept) * bk))))
    for i0 in range(0, n_q if max_kept else 0, step):
        i1 = min(n_q, i0 + step)
        c = i1 - i0
        width = int(counts[:, :, i0:i1].max())
        if width == 0:
            continue
        idx = order[:, :, i0:i1, :width].long()  # [B, H, c, M]
        slot_ok = torch.arange(width, device=device) < counts[:, :, i0:i1, None]
        k_sel = kp[b_ix, h_ix, idx]  # [B, H, c, M, bk, D]
        scores = torch.matmul(qp[:, :, i0:i1], k_sel.view(batch, heads, c, width * bk, dim).transpose(-1, -2))
        scores.mul_(scale)  # [B, H, c, bq, M·bk]
        pos = (idx[..., None] * bk + offsets).view(batch, heads, c, 1, width * bk)
        ok = slot_ok[..., None].expand(-1, -1, -1, -1, bk).reshape(batch, heads, c, 1, width * bk) & (pos < k_len)
        now = torch.arange(i0 * bq, i1 * bq, device=device).view(c, bq, 1) + base.offset
        if base.structured:
            if key_ok is not None:
                ok = ok & key_ok[b_ix[..., None], pos]
            if base.causal:
                ok = ok & (pos <= now)
        else:
            rows = base.allowed[..., i0 * bq:i1 * bq, :]
            rows = F.pad(rows, (0, k_pad - k_len, 0, c * bq - rows.shape[-2]), value=False)
            rows = rows.expand(batch, heads, -1, -1).reshape(batch, heads, c, bq, k_pad)
            ok = ok & torch.gather(rows, -1, pos.expand(-1, -1, -1, bq, -1))
        if streaming:
            ok = ok & ((pos < sink) | ((now - pos).abs() < window))
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if base.bias is not None:
            bias = base.bias[..., i0 * bq:i1 * bq, :].float()
            bias = F.pad(bias, (0, k_pad - k_len, 0, c * bq - bias.shape[-2]))
            bias = bias.expand(batch, heads, -1, -1).reshape(batch, heads, c, bq, k_pad)
            scores = scores + torch.gather(bias, -1, pos.expand(-1, -1, -1, bq, -1))
        scores = scores.masked_fill(~ok, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # rows with no allowed key → zeros
        column = torch.matmul(valid[:, :, i0:i1], probs)  # Σ over valid queries, [B, H, c, 1, M·bk]
        flat_pos = pos.reshape(batch, heads, -1)
        key_mass.scatter_add_(-1, flat_pos, column.reshape(batch, heads, -1))
        if group_mass is not None:  # Σ_q w[b, g, q] P[b, h, q, k] over this chunk's rows: [B, G, H, c, M·bk]
            sums = torch.einsum("bgcr,bhcrm->bghcm", wp[:, :, i0:i1], probs)
            index = flat_pos[:, None].expand(-1, group_mass.shape[1], -1, -1)
            group_mass.scatter_add_(-1, index, sums.reshape(*index.shape))
        if patterns is not None:
            r0, r1 = i0 * bq, min(i1 * bq, q_len)
            sub = probs[:, list(pattern_heads)].reshape(batch, len(pattern_heads), c * bq, width * bk)
            where = pos[:, list(pattern_heads)].expand(-1, -1, -1, bq, -1).reshape(sub.shape)
            rows_out = torch.zeros(batch, len(pattern_heads), c * bq, k_pad, device=device)
            rows_out.scatter_(-1, where, sub)  # positions within a row are distinct: kept blocks differ
            patterns[:, :, r0:r1] = rows_out[:, :, : r1 - r0, :k_len]
    query_count, uniform_sum, group_uniform = _mask_counts(base, device, query_weights)
    return AttentionStats(
        key_mass=key_mass[..., :k_len].contiguous(),
        query_count=query_count,
        uniform_sum=uniform_sum,
        query_valid=base.query_valid,
        patterns=patterns,
        pattern_heads=pattern_heads,
        kept_fraction=selection.kept_fraction.float(),
        group_key_mass=group_mass[..., :k_len].contiguous() if group_mass is not None else None,
        group_uniform=group_uniform,
    )


def sparse_attention_with_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    pattern_heads: tuple[int, ...] | list[int] = (),
    chunk_size: int | None = None,
    compiled: bool = True,
    execution: str = "auto",
    query_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Sparse attention plus the same ``AttentionStats`` as ``kernels.attention.attention_with_stats``.

    The output is the deployed kernel's (:func:`sparse_attention`, on the ``execution`` path). The statistics are
    those of docs/definitions.md under sparsity — the softmax probabilities renormalized over the kept blocks:
    ``key_mass[b, h, k]`` = Σ over valid queries of those probabilities; ``query_count[b, k]`` = |Q_k|
    and ``uniform_sum[b, k]`` = Σ_{q∈Q_k} 1/|K_q| under the *base* mask (so dense and sparse runs share one
    denominator and one uniform share); ``query_valid`` from the
    mask diagonal; ``patterns`` [B, len(pattern_heads), Tq, Tk] for the heads asked for (the only
    O(T²) tensor, and only then); ``kept_fraction`` [B, H] from the selection. They are computed in a
    second pass that visits only the kept blocks, chunked over query blocks (``chunk_size`` query rows,
    rounded down to whole blocks), in O(T) memory beyond one chunk. With ``linear_fallback`` the
    statistics describe the softmax branch (the linear branch has no per-key probabilities).
    ``query_weights`` w [B, G, Tq] adds, as ``attention_with_stats`` does, ``group_key_mass[b, g, h, k]`` =
    Σ_q w[b, g, q] P[b, h, q, k] of those same probabilities (e.g. a VLM's text queries: the text→image
    attention share the model really had under sparsity) and ``group_uniform`` [B, G, Tk] under the base mask,
    folded in chunk by chunk like ``key_mass`` (no Tq × Tk tensor).

    Example::

        out, stats = sparse_attention_with_stats(q, k, v, sel, is_causal=True, pattern_heads=(0,))
        sink = stats.key_mass[..., 0] / stats.query_count[:, None, 0]      # sink score per head
    """
    out = sparse_attention(
        query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal, scale=scale,
        softcap=softcap, compiled=compiled, execution=execution,
    )
    base = _resolve_base(selection, attention_mask, is_causal, query)
    with torch.no_grad():
        stats = _stats(query, key, selection, base, scale, softcap, pattern_heads, chunk_size, query_weights)
    return out, stats


