"""Streaming attention that also returns the statistics lens needs (pure torch, imports nothing from lens).

Every interpretability toolkit we know gets attention statistics by asking the model for the full
``[batch, heads, query, key]`` probability tensor. This kernel instead walks the queries in chunks,
computes each chunk's probabilities once, uses them for the output *and* folds them into per-key
sums, and throws them away. Memory is O(chunk · T) instead of O(heads · T²), and the statistics are
those of exactly the probabilities that produced the output.

Definitions implemented here (DESIGN.md §3, "Attention mass received"):

* ``key_mass[b, h, k] = Σ_{q ∈ Q_k} A[b, h, q, k]`` — the unnormalized column sum over *valid* queries;
* ``query_count[b, k] = |Q_k|`` — how many valid queries the model's own mask lets attend to key ``k``.

``key_mass / query_count`` is the mass received ``m[ℓ, h, k]``; for ``k = 0`` it is the sink score.
A query is *valid* when it is a real token: the model's mask lets it attend to itself (the diagonal of
the mask). Padded queries therefore never count, whatever the padding side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionStats", "attention_with_stats", "normalize_mask", "default_chunk_size"]

# About 4 M probabilities per chunk (16 MB in fp32): large enough that the matmuls stay efficient, small
# enough that a chunk stays near the caches. Measured with `lens bench capture` (see the closing notes).
_TARGET_CHUNK_ELEMENTS = 1 << 22


@dataclass
class AttentionStats:
    """Per-call attention statistics for one layer.

    ``key_mass``: [B, H, Tk] float32, Σ over valid queries of the probabilities each key receives.
    ``query_count``: [B, Tk] float32, the number of valid queries allowed to attend each key (the model's
    mask — causal and padding — not any sparsity pattern, so that dense and sparse runs share one
    denominator).
    ``query_valid``: [B, Tq] bool, which queries are real tokens.
    ``patterns``: [B, len(pattern_heads), Tq, Tk] float32 for the heads asked for, else None.
    ``kept_fraction``: [B, H] float32 fraction of the allowed (query, key) blocks that a sparse kernel
    computed; None for dense attention.
    """

    key_mass: torch.Tensor
    query_count: torch.Tensor
    query_valid: torch.Tensor
    patterns: torch.Tensor | None = None
    pattern_heads: tuple[int, ...] = ()
    kept_fraction: torch.Tensor | None = None


def default_chunk_size(batch: int, heads: int, keys: int) -> int:
    """Query rows per chunk so that one chunk of scores holds about 4 M values.

    Example: ``default_chunk_size(1, 12, 2048)`` → 256 (a multiple of 64, at least 16).
    """
    rows = _TARGET_CHUNK_ELEMENTS // max(1, batch * heads * keys)
    rows = max(16, min(4096, rows))
    return rows if rows < 64 else (rows // 64) * 64


def normalize_mask(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Split a Hugging Face attention mask into (allowed: bool or None, bias: float or None).

    Hugging Face passes either a boolean ``[B, 1|H, Tq, Tk]`` mask (True = may attend), an additive float
    mask (0 or a very negative number), or None. A float mask is kept as a bias *and* turned into a
    boolean view (entries above half the dtype's minimum count as allowed) so that query validity and
    ``|Q_k|`` are defined the same way for both.

    Example: ``normalize_mask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 3, 3)`` → (that mask, None).
    """
    if attention_mask is None:
        return None, None
    if attention_mask.dim() == 2:  # [B, Tk] padding mask
        attention_mask = attention_mask[:, None, None, :].expand(-1, 1, q_len, -1)
    attention_mask = attention_mask[..., -q_len:, -k_len:]
    if attention_mask.dtype == torch.bool:
        return attention_mask, None
    threshold = torch.finfo(attention_mask.dtype).min / 2
    allowed = attention_mask > threshold
    bias = attention_mask if bool((attention_mask[allowed] != 0).any()) else None
    return allowed, bias


def _query_valid(allowed: torch.Tensor | None, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    if allowed is None or q_len != k_len:
        return torch.ones(batch, q_len, dtype=torch.bool, device=device)
    diag = torch.diagonal(allowed, dim1=-2, dim2=-1)  # [B|1, 1|H, T]
    return diag.any(dim=1).expand(batch, q_len)


def attention_with_stats(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    pattern_heads: tuple[int, ...] | list[int] = (),
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Softmax attention computed one query chunk at a time, returning the output and AttentionStats.

    Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: query [B, H, Tq, D], key and
    value [B, Hkv, Tk, D] with ``H % Hkv == 0`` (grouped-query attention without copying K/V). The
    output is [B, H, Tq, Dv]. ``attention_mask`` is a Hugging Face mask (see ``normalize_mask``);
    ``is_causal`` applies when there is no mask (bottom-right aligned when Tq < Tk, as with a cache).
    Rows with no allowed key (padding) produce zeros, not NaN.

    Example::

        q = k = v = torch.randn(1, 2, 5, 8)
        out, stats = attention_with_stats(q, k, v, is_causal=True)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
        stats.key_mass[0, :, 0]            # Σ_q A[q, 0] per head
        stats.query_count[0]               # tensor([5., 4., 3., 2., 1.])
    """
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads})")
    group = heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    allowed, bias = normalize_mask(attention_mask, q_len, k_len)
    causal = allowed is None and is_causal and q_len > 1
    offset = k_len - q_len  # bottom-right alignment of the causal diagonal
    device = query.device
    compute_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype

    valid = _query_valid(allowed, batch, q_len, k_len, device)
    valid_weight = valid.to(compute_dtype)
    key_mass = torch.zeros(batch, heads, k_len, dtype=torch.float32, device=device)
    if allowed is None:
        if causal:
            first_query = (torch.arange(k_len, device=device) - offset).clamp(min=0)
            query_count = (q_len - first_query).to(torch.float32).expand(batch, k_len).clone()
        else:
            query_count = torch.full((batch, k_len), float(q_len), device=device)
    else:
        query_count = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    pattern_heads = tuple(int(h) for h in pattern_heads)
    patterns = (
        torch.zeros(batch, len(pattern_heads), q_len, k_len, dtype=torch.float32, device=device)
        if pattern_heads
        else None
    )
    out = torch.empty(batch, heads, q_len, value.shape[-1], dtype=query.dtype, device=device)

    # Grouped-query attention: fold the query heads of a group into the row dimension so that one
    # matmul per key/value head serves the whole group, without materializing repeated K/V.
    key_t = key.to(compute_dtype).transpose(-1, -2)  # [B, Hkv, D, Tk]
    value_c = value.to(compute_dtype)
    chunk = chunk_size or default_chunk_size(batch, heads, k_len)

    for start in range(0, q_len, chunk):
        stop = min(start + chunk, q_len)
        rows = stop - start
        k_stop = min(k_len, stop + offset) if causal else k_len
        q_chunk = query[:, :, start:stop].to(compute_dtype) * scale
        q_chunk = q_chunk.reshape(batch, kv_heads, group * rows, head_dim)
        scores = torch.matmul(q_chunk, key_t[..., :k_stop]).view(batch, heads, rows, k_stop)
        if softcap is not None:
            scores = torch.tanh(scores / softcap).mul_(softcap)
        if causal:
            # only the diagonal band of this chunk is cut: keys start+offset+1 .. k_stop
            band_start = start + offset + 1
            if band_start < k_stop:
                q_idx = torch.arange(start, stop, device=device)[:, None] + offset
                k_idx = torch.arange(band_start, k_stop, device=device)[None, :]
                scores[..., band_start:k_stop].masked_fill_(k_idx > q_idx, float("-inf"))
        row_allowed = None
        if allowed is not None:
            mask_chunk = allowed[..., start:stop, :]
            if bias is not None:
                scores = scores + bias[..., start:stop, :].to(compute_dtype)
            scores.masked_fill_(~mask_chunk, float("-inf"))
            row_allowed = mask_chunk.any(dim=-1)  # [B|1, 1|H, rows]
            counted = (mask_chunk & valid[:, None, start:stop, None]).any(dim=1)  # [B, rows, Tk]
            query_count += counted.sum(dim=1, dtype=torch.float32)
        probs = torch.softmax(scores, dim=-1)
        if row_allowed is not None and not bool(row_allowed.all()):
            probs = probs.masked_fill(~row_allowed[..., None], 0.0)
        probs_kv = probs.view(batch, kv_heads, group * rows, k_stop)
        out[:, :, start:stop] = (
            torch.matmul(probs_kv, value_c[:, :, :k_stop]).view(batch, heads, rows, -1).to(out.dtype)
        )
        weights = valid_weight[:, None, None, start:stop]  # [B, 1, 1, rows]
        key_mass[..., :k_stop] += torch.matmul(weights, probs).squeeze(-2).float()
        if patterns is not None:
            patterns[:, :, start:stop, :k_stop] = probs[:, list(pattern_heads)].float()

    stats = AttentionStats(
        key_mass=key_mass,
        query_count=query_count,
        query_valid=valid,
        patterns=patterns,
        pattern_heads=pattern_heads,
    )
    return out, stats
