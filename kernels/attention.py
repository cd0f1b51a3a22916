"""Streaming attention that also returns the statistics lens needs (pure torch, imports nothing from lens).

Every interpretability toolkit we know gets attention statistics by asking the model for the full
``[batch, heads, query, key]`` probability tensor. This kernel instead walks the queries in chunks,
computes each chunk's probabilities once, uses them for the output *and* folds them into per-key
sums, and throws them away. Memory is O(chunk · T) instead of O(heads · T²), and the statistics are
those of exactly the probabilities that produced the output.

Definitions implemented here (docs/definitions.md#attention-mass-received):

* ``key_mass[b, h, k] = Σ_{q ∈ Q_k} A[b, h, q, k]`` — the unnormalized column sum over *valid* queries;
* ``query_count[b, k] = |Q_k|`` — how many valid queries the model's own mask lets attend to key ``k``;
* ``uniform_sum[b, k] = Σ_{q ∈ Q_k} 1/|K_q|`` — the same column sum for the *uniform* pattern, where
  each query spreads its attention evenly over the keys ``K_q`` the mask lets it see.

* with ``query_weights`` w [B, G, Tq] (e.g. G groups of queries: all text queries of a VLM, or one query
  each): ``group_key_mass[b, g, h, k] = Σ_q w[b, g, q] A[b, h, q, k]`` and the uniform pattern's counterpart
  ``group_uniform[b, g, k] = Σ_q w[b, g, q] ·1(k ∈ K_q) / |K_q|`` — what those queries put on each key, and what
  they would put on it attending evenly (text→image attention share, mass from one text token).

``key_mass / query_count`` is the mass received ``m[ℓ, h, k]``; for ``k = 0`` it is the sink score.
``uniform_sum / query_count`` is the uniform share ``u[k]`` ("Attention mass received"): the yardstick of
sink tokens and sink heads, read from the model's actual mask — causal, padding, sliding window,
bidirectional blocks — in the same pass, never from an assumed shape.
A query is *valid* when it is a real token: the model's mask lets it attend to itself (the diagonal of
the mask). Padded queries therefore never count, whatever the padding side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionStats", "attention_with_stats", "normalize_mask", "plan_chunks", "unmasked_counts",
           "unmasked_group_uniform"]

# Chunk shape, measured against causal SDPA (12 heads, d 64, 2 cores; our kernel / SDPA time):
#   T = 2048:  64 rows, all heads 1.44×;  128 rows 1.54×;  256 rows 1.73×
#   T = 8192:  256 rows, 2 heads per pass 1.62×;  64 rows, 8 heads 1.71×;  128 rows, all heads 2.3×
#   T = 32768: 256 rows, 1 head per pass 2.0×;  128 rows 2.4×;  512 rows 3.0×  (16 rows: ~3.5×)
# Short keys favour small, cache-resident chunks; long keys favour more rows per pass, because every
# chunk re-reads its heads' keys. About 4 M probabilities per chunk (16 MB in fp32) bounds memory.
# Short sequences (an encoder batch, a corpus scan's windows): when the whole batch's probabilities fit in
# the same ~4 M values, every query row of every head goes in one chunk — one matmul, one softmax, one
# matmul instead of one per 64 rows. Kernel / SDPA, batch 8 with padding, random inputs, 1 thread, min of 7:
#   bidirectional, 12 heads, d 32 (MiniLM):     T = 77: 2.22× → 1.55×;  T = 134: 2.44× → 1.63×
#   causal, 9 query / 3 KV heads, d 64 (SmolLM2): T = 77: 1.80× → 1.61×;  T = 134: 1.98× → 1.33×
# Whole rows of 2 or 4 batch elements at a time, at 8 × 12 × 256², measured no faster than 64-row chunks.
_TARGET_CHUNK_ELEMENTS = 1 << 22
_ROWS_SHORT = 64
_ROWS_LONG = 256


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
    ``uniform_sum``: [B, Tk] float32, Σ_{q∈Q_k} 1/|K_q| under the model's mask (valid queries only); divided
    by ``query_count`` it is the uniform share u[k]. Like ``query_count`` it ignores any sparsity pattern.
    ``group_key_mass``: [B, G, H, Tk] float32, Σ_q w[b, g, q] A[b, h, q, k] for the ``query_weights`` asked
    for, else None; ``group_uniform``: [B, G, Tk] float32, the same for the uniform pattern of the mask.
    """

    key_mass: torch.Tensor
    query_count: torch.Tensor
    query_valid: torch.Tensor
    patterns: torch.Tensor | None = None
    pattern_heads: tuple[int, ...] = ()
    kept_fraction: torch.Tensor | None = None
    uniform_sum: torch.Tensor | None = None
    group_key_mass: torch.Tensor | None = None
    group_uniform: torch.Tensor | None = None


def unmasked_group_uniform(weights: torch.Tensor, k_len: int, causal: bool) -> torch.Tensor:
    """Σ_q w[b, g, q] ·1(k ∈ K_q) / |K_q| per key, [B, G, Tk] float32, when there is no mask tensor.

    Causal (bottom-right aligned): query q sees keys 0..q+offset, so key k collects w/(q+offset+1) from every
    q ≥ k − offset — a reversed cumulative sum. Bidirectional: every key gets Σ_q w / Tk.

    Example: ``unmasked_group_uniform(torch.ones(1, 1, 2), 2, True)`` → ``[[[1/1 + 1/2, 1/2]]]``.
    """
    batch, groups, q_len = weights.shape
    w = weights.to(torch.float64)
    if not causal:
        return (w.sum(-1, keepdim=True) / k_len).expand(batch, groups, k_len).to(torch.float32).clone()
    offset = k_len - q_len
    per_query = w / (torch.arange(q_len, device=w.device, dtype=torch.float64) + offset + 1)
    suffix = torch.cat([per_query.flip(-1).cumsum(-1).flip(-1), per_query.new_zeros(batch, groups, 1)], dim=-1)
    first_query = (torch.arange(k_len, device=w.device) - offset).clamp(min=0)
    return suffix[..., first_query].to(torch.float32)


def unmasked_counts(
    batch: int, q_len: int, k_len: int, causal: bool, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(|Q_k|, Σ_{q∈Q_k} 1/|K_q|) per key, [B, Tk] float32 each, when there is no mask tensor.

    Causal (bottom-right aligned, offset = Tk − Tq): query q sees keys 0..q+offset, so |K_q| = q + offset + 1
    and key k is seen by queries q ≥ k − offset. Bidirectional: every query sees all Tk keys.

    Example: ``unmasked_counts(1, 3, 3, True)`` → ``([[3, 2, 1]], [[1/1 + 1/2 + 1/3, 1/2 + 1/3, 1/3]])``.
    """
    if not causal:
        count = torch.full((batch, k_len), float(q_len), device=device)
        return count, torch.full((batch, k_len), q_len / k_len, device=device)
    offset = k_len - q_len
    first_query = (torch.arange(k_len, device=device) - offset).clamp(min=0)
    count = (q_len - first_query).to(torch.float32)
    inv = 1.0 / (torch.arange(q_len, device=device, dtype=torch.float64) + offset + 1)
    suffix = torch.cat([inv.flip(0).cumsum(0).flip(0), inv.new_zeros(1)])  # Σ_{q' ≥ q} 1/|K_q'|
    uniform = suffix[first_query].to(torch.float32)
    return count.expand(batch, k_len).clone(), uniform.expand(batch, k_len).clone()


def plan_chunks(
    batch: int, kv_heads: int, group: int, q_len: int, k_len: int, rows: int | None = None
) -> tuple[int, int]:
    """(query rows per chunk, key/value heads per pass) for ``attention_with_stats``.

    Rows: 64 for up to 4096 keys, 256 beyond (unless given) — enough that re-reading a pass's keys for
    every chunk stays cheap next to the chunk's own scores. Heads per pass: as many as keep one chunk of
    scores near 4 M values (16 MB in fp32), at least one — so memory stays bounded at any length while
    short sequences still do all heads in one matmul. The measurements behind this are above.

    When every row of every head of the batch fits in those ~4 M probabilities, one chunk holds them all.

    Example: ``plan_chunks(1, 12, 1, 2048, 2048)`` → ``(64, 12)``; at 32768 tokens → ``(256, 1)``; at 128
    → ``(128, 12)``.
    """
    if rows is None and batch * kv_heads * group * q_len * k_len <= _TARGET_CHUNK_ELEMENTS:
        return q_len, kv_heads
    if rows is None:
        rows = _ROWS_SHORT if k_len <= 4096 else _ROWS_LONG
    rows = max(1, min(rows, q_len))
    per_kv_head = batch * group * rows * k_len
    return rows, max(1, min(kv_heads, _TARGET_CHUNK_ELEMENTS // max(per_kv_head, 1)))


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


# A padded batch (windows of unequal length padded to the longest) spends most of B·T² on padding: at a corpus
# scan's batches, 78 % of the scores. Each element is then computed over the rectangle of its query rows that may
# attend anything × the keys any of them may attend, and rows and keys outside get exactly what the whole batch
# gives them (zero output, zero statistics). Below _MIN_SPAN_ELEMENTS the per-element calls cost more Python
# than they save; above it they are used when they save ≥ 1/4 of the scores.
_MIN_SPAN_ELEMENTS = 1 << 20


def _padding_spans(allowed, query_weights, batch: int, heads: int, q_len: int, k_len: int):
    """Per batch element ``(q0, q1, k0, k1)``: the query rows that may attend some key and the keys some query may
    attend (padding excluded both ways) — or None when the batch is better computed whole."""
    if allowed is None or allowed.shape[0] != batch or batch * heads * q_len * k_len < _MIN_SPAN_ELEMENTS:
        return None
    union = allowed[:, 0] if allowed.shape[1] == 1 else allowed.any(dim=1)  # [B, Tq, Tk] over mask heads
    rows, cols = union.any(dim=2), union.any(dim=1)  # [B, Tq], [B, Tk]

    def bounds(used, n):
        pos = torch.arange(n, device=used.device)
        first = torch.where(used, pos, n).amin(dim=1).tolist()
        last = torch.where(used, pos, -1).amax(dim=1).tolist()
        return [(f, l + 1) if l >= 0 else (0, 0) for f, l in zip(first, last)]

    spans = [q + k for q, k in zip(bounds(rows, q_len), bounds(cols, k_len))]
    area = sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1 in spans)
    return spans if area * 4 <= 3 * batch * q_len * k_len else None


def _per_element(query, key, value, allowed, bias, valid, spans, query_weights, options):
    """``_attention`` of each batch element over its span only, assembled into the batch's shapes. Every row
    outside a span has no allowed key and every key outside it is allowed to none: the whole batch gives them a
    zero output and no probability, and so does this. Statistics count valid queries only, as always."""
    batch, heads, q_len, _ = query.shape
    k_len = key.shape[2]
    device = query.device
    out = torch.zeros(batch, heads, q_len, value.shape[-1], dtype=query.dtype, device=device)
    key_mass = torch.zeros(batch, heads, k_len, dtype=torch.float32, device=device)
    query_count = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    uniform_sum = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    pattern_heads = options["pattern_heads"]
    patterns = (torch.zeros(batch, len(pattern_heads), q_len, k_len, dtype=torch.float32, device=device)
                if pattern_heads else None)
    group_mass = group_uniform = None
    if query_weights is not None:
        group_mass = torch.zeros(batch, query_weights.shape[1], heads, k_len, dtype=torch.float32, device=device)
        group_uniform = torch.zeros(batch, query_weights.shape[1], k_len, dtype=torch.float32, device=device)
    for b, (q0, q1, k0, k1) in enumerate(spans):
        if q1 <= q0 or k1 <= k0:
            continue
        o, st = _attention(
            query[b : b + 1, :, q0:q1], key[b : b + 1, :, k0:k1], value[b : b + 1, :, k0:k1],
            allowed[b : b + 1, :, q0:q1, k0:k1], None if bias is None else bias[b : b + 1, :, q0:q1, k0:k1],
            valid[b : b + 1, q0:q1], False, None if query_weights is None else query_weights[b : b + 1, :, q0:q1],
            **options,
        )
        out[b, :, q0:q1] = o[0]
        key_mass[b, :, k0:k1] = st.key_mass[0]
        query_count[b, k0:k1] = st.query_count[0]
        uniform_sum[b, k0:k1] = st.uniform_sum[0]
        if patterns is not None:
            patterns[b, :, q0:q1, k0:k1] = st.patterns[0]
        if group_mass is not None:
            group_mass[b, :, :, k0:k1] = st.group_key_mass[0]
            group_uniform[b, :, k0:k1] = st.group_uniform[0]
    stats = AttentionStats(key_mass=key_mass, query_count=query_count, query_valid=valid, patterns=patterns,
                           pattern_heads=pattern_heads, uniform_sum=uniform_sum, group_key_mass=group_mass,
                           group_uniform=group_uniform)
    return out, stats


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
    probs_dtype: torch.dtype | None = None,
    query_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AttentionStats]:
    """Softmax attention computed one query chunk at a time, returning the output and AttentionStats.

    Shapes follow ``torch.nn.functional.scaled_dot_product_attention``: query [B, H, Tq, D], key and
    value [B, Hkv, Tk, D] with ``H % Hkv == 0`` (grouped-query attention without copying K/V). The
    output is [B, H, Tq, Dv]. ``attention_mask`` is a Hugging Face mask (see ``normalize_mask``);
    ``is_causal`` applies when there is no mask (bottom-right aligned when Tq < Tk, as with a cache).
    Rows with no allowed key (padding) produce zeros, not NaN. ``probs_dtype`` (e.g. ``torch.float16``)
    rounds the probabilities to that dtype before they multiply the values — as llama.cpp's CPU attention does
    with its f16 KV cache, where ``P·V`` is an f16 dot product — and the statistics are those of the rounded
    probabilities (the ones that produced the output). ``query_weights`` [B, G, Tq] (float) adds the per-group
    column sums ``group_key_mass`` and ``group_uniform`` (see the module docstring).

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
    scale = head_dim**-0.5 if scale is None else scale
    allowed, bias = normalize_mask(attention_mask, q_len, k_len)
    causal = allowed is None and is_causal and q_len > 1
    valid = _query_valid(allowed, batch, q_len, k_len, query.device)
    pattern_heads = tuple(int(h) for h in pattern_heads)
    options = dict(scale=scale, softcap=softcap, pattern_heads=pattern_heads, chunk_size=chunk_size,
                   probs_dtype=probs_dtype)
    spans = _padding_spans(allowed, query_weights, batch, heads, q_len, k_len) if chunk_size is None else None
    if spans is not None:
        return _per_element(query, key, value, allowed, bias, valid, spans, query_weights, options)
    return _attention(query, key, value, allowed, bias, valid, causal, query_weights, **options)


def _attention(query, key, value, allowed, bias, valid, causal, query_weights, *, scale, softcap, pattern_heads,
               chunk_size, probs_dtype):
    """The body of ``attention_with_stats`` once the mask is normalized and the valid queries are known."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    offset = k_len - q_len  # bottom-right alignment of the causal diagonal
    device = query.device
    compute_dtype = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    valid_weight = valid.to(compute_dtype)
    key_mass = torch.zeros(batch, heads, k_len, dtype=torch.float32, device=device)
    if allowed is None:
        query_count, uniform_sum = unmasked_counts(batch, q_len, k_len, causal, device)
    else:
        query_count = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
        uniform_sum = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    patterns = (
        torch.zeros(batch, len(pattern_heads), q_len, k_len, dtype=torch.float32, device=device)
        if pattern_heads
        else None
    )
    rows_per_chunk, kv_per_pass = plan_chunks(batch, kv_heads, group, q_len, k_len, chunk_size)
    whole = rows_per_chunk >= q_len and kv_per_pass >= kv_heads
    out = None if whole else torch.empty(batch, heads, q_len, value.shape[-1], dtype=query.dtype, device=device)
    group_mass = group_uniform = None
    if query_weights is not None:
        query_weights = query_weights.to(device=device, dtype=compute_dtype)
        n_groups = query_weights.shape[1]
        group_mass = torch.zeros(batch, n_groups, heads, k_len, dtype=torch.float32, device=device)
        group_uniform = (
            unmasked_group_uniform(query_weights, k_len, causal) if allowed is None
            else torch.zeros(batch, n_groups, k_len, dtype=torch.float32, device=device)
        )

    # Grouped-query attention: fold the query heads of a group into the row dimension so that one
    # matmul per key/value head serves the whole group, without materializing repeated K/V.
    # contiguous once per call: Hugging Face hands over transposed views ([B, T, H, D] memory), which every
    # chunk's matmul would otherwise copy again (a fifth of a traced forward's time went to those copies)
    key_t = key.to(compute_dtype).transpose(-1, -2).contiguous()  # [B, Hkv, D, Tk]
    value_c = value.to(compute_dtype).contiguous()
    query_g = query.view(batch, kv_heads, group, q_len, head_dim)
    pattern_index = {h: j for j, h in enumerate(pattern_heads)}

    # Head groups outside, query rows inside: each pass re-reads only its own heads' keys, and a chunk
    # of 128+ rows amortizes that read (with 16-row chunks at T = 32768, re-reading K cost more than the
    # attention itself).
    for kv0 in range(0, kv_heads, kv_per_pass):
        kv1 = min(kv0 + kv_per_pass, kv_heads)
        h0, h1 = kv0 * group, kv1 * group
        n_heads = h1 - h0
        mask_heads = (lambda m: m if m.shape[1] == 1 else m[:, h0:h1]) if allowed is not None else None
        kept_here = [(h - h0, pattern_index[h]) for h in pattern_heads if h0 <= h < h1]
        for start in range(0, q_len, rows_per_chunk):
            stop = min(start + rows_per_chunk, q_len)
            rows = stop - start
            k_stop = min(k_len, stop + offset) if causal else k_len
            q_chunk = query_g[:, kv0:kv1, :, start:stop].to(compute_dtype) * scale
            q_chunk = q_chunk.reshape(batch, kv1 - kv0, group * rows, head_dim)
            scores = torch.matmul(q_chunk, key_t[:, kv0:kv1, :, :k_stop]).view(batch, n_heads, rows, k_stop)
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
                mask_chunk = mask_heads(allowed[..., start:stop, :])
                # one additive term of the chunk's (few) mask rows, broadcast over the heads: adding it is ~3×
                # faster than masked_fill_ of every head with a broadcast boolean, and x + 0 == x exactly
                additive = torch.zeros(mask_chunk.shape, dtype=compute_dtype, device=device)
                additive.masked_fill_(~mask_chunk, float("-inf"))
                if bias is not None:
                    additive += mask_heads(bias[..., start:stop, :]).to(compute_dtype)
                scores.add_(additive)
                row_allowed = mask_chunk.any(dim=-1)  # [B|1, 1|h, rows]
                if kv0 == 0:  # |Q_k| does not depend on the head: count it in the first pass only
                    full_chunk = allowed[..., start:stop, :]
                    full_chunk = full_chunk[:, 0] if full_chunk.shape[1] == 1 else full_chunk.any(dim=1)
                    seen = (full_chunk & valid[:, start:stop, None]).to(torch.float32)  # [B, rows, Tk]
                    # one product gives both column sums: Σ_q 1 (= |Q_k|) and Σ_q 1/|K_q| (the uniform
                    # pattern's column sum: each valid query spreads 1 evenly over the keys it sees)
                    n_keys = seen.sum(dim=-1)  # [B, rows] = |K_q| (0 for padding)
                    weights_q = torch.stack([torch.ones_like(n_keys), 1.0 / n_keys.clamp(min=1.0)], dim=1)
                    both = torch.matmul(weights_q, seen)  # [B, 2, Tk]
                    query_count += both[:, 0]
                    uniform_sum += both[:, 1]
                    if group_uniform is not None:
                        spread = query_weights[:, :, start:stop].float() / n_keys.clamp(min=1.0)[:, None, :]
                        group_uniform += torch.matmul(spread, seen)  # [B, G, Tk]
            probs = torch.softmax(scores, dim=-1)
            if row_allowed is not None and not bool(row_allowed.all()):
                probs = probs.masked_fill(~row_allowed[..., None], 0.0)
            if probs_dtype is not None:
                probs = probs.to(probs_dtype).to(compute_dtype)
            probs_kv = probs.view(batch, kv1 - kv0, group * rows, k_stop)
            chunk_out = torch.matmul(probs_kv, value_c[:, kv0:kv1, :k_stop]).view(batch, n_heads, rows, -1)
            if whole:  # one chunk: its product is the output, no copy
                out = chunk_out.to(query.dtype)
            else:
                out[:, h0:h1, start:stop] = chunk_out.to(out.dtype)
            weights = valid_weight[:, None, None, start:stop]  # [B, 1, 1, rows]
            key_mass[:, h0:h1, :k_stop] += torch.matmul(weights, probs).squeeze(-2).float()
            for local, j in kept_here:
                patterns[:, j, start:stop, :k_stop] = probs[:, local].float()
            if group_mass is not None:  # [B, G, rows] × [B, h, rows, k] → [B, G, h, k]
                w_chunk = query_weights[:, :, start:stop]
                group_mass[:, :, h0:h1, :k_stop] += torch.einsum("bgr,bhrk->bghk", w_chunk, probs).float()

    stats = AttentionStats(
        key_mass=key_mass,
        query_count=query_count,
        query_valid=valid,
        patterns=patterns,
        pattern_heads=pattern_heads,
        uniform_sum=uniform_sum,
        group_key_mass=group_mass,
        group_uniform=group_uniform,
    )
    return out, stats
