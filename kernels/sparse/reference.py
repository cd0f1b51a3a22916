"""The eager masked reference of block-sparse attention: every kept (query, key) pair materialized.

For tests and small inputs only (O(T^2) memory); also the last fallback when FlexAttention is unavailable.
"""

from __future__ import annotations

import torch

from .linear import linear_mix_weight
from .masks import _analyze_mask, _BaseMask
from .selection import BlockSelection, _resolve_base, _streaming_params


def sparse_element_mask(
    selection: BlockSelection, *, attention_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """The (query, key) pairs the sparse kernel attends, materialized: bool [B, H, Tq, Tk].

    Kept blocks expanded to elements ∧ the base mask ∧ (streaming mode) the sink + window pattern. For
    tests and small inputs only (O(T²) memory).

    Example: ``sparse_element_mask(sel, is_causal=True).float().mean()``.
    """
    device = selection.kept.device
    base = selection._base
    if base is None or not base.matches(attention_mask, is_causal):
        base = _analyze_mask(attention_mask, is_causal, selection.kept.shape[0], selection.q_len, selection.k_len, device)
    return _element_mask(selection, base)


def _element_mask(selection: BlockSelection, base: _BaseMask) -> torch.Tensor:
    device = selection.kept.device
    q_len, k_len = selection.q_len, selection.k_len
    kept = selection.kept.repeat_interleave(selection.block_q, dim=2).repeat_interleave(selection.block_k, dim=3)
    kept = kept[..., :q_len, :k_len]
    q_pos = torch.arange(q_len, device=device)[:, None] + base.offset
    k_pos = torch.arange(k_len, device=device)[None, :]
    if base.structured:
        allowed = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
        if base.key_ok is not None:
            allowed = allowed & base.key_ok[:, None, None, :]
        if base.causal:
            allowed = allowed & (k_pos <= q_pos)
    else:
        allowed = base.allowed
    sink, window = _streaming_params(selection)
    pattern = (k_pos < sink) | ((q_pos - k_pos).abs() < window)
    return kept & allowed & pattern


def _reference(query, key, value, selection, base, scale, softcap, *, return_probs: bool, linear: bool):
    heads, kv_heads = query.shape[1], key.shape[1]
    group = heads // kv_heads
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    mask = _element_mask(selection, base)
    q = query.double()
    k = key.double().repeat_interleave(group, dim=1)
    v = value.double().repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if base.bias is not None:
        scores = scores + base.bias.double()
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key → zeros
    out = torch.matmul(probs, v)
    if linear and selection.config.linear_fallback:
        # element-level linear attention over the same blocks, independent of the blockwise sums
        skipped = (selection.allowed_full & ~selection.kept)
        skipped = skipped.repeat_interleave(selection.block_q, dim=2).repeat_interleave(selection.block_k, dim=3)
        skipped = skipped[..., : selection.q_len, : selection.k_len]
        weights = torch.matmul(torch.softmax(q, dim=-1), torch.softmax(k, dim=-1).transpose(-1, -2)) * skipped
        total = weights.sum(dim=-1, keepdim=True)
        lin = torch.where(total > 0, torch.matmul(weights, v) / total.clamp(min=1e-300), torch.zeros_like(out))
        w = linear_mix_weight(selection).double().repeat_interleave(selection.block_q, dim=-1)[..., : selection.q_len, None]
        out = (1 - w) * out + w * lin
    return out.to(query.dtype), (probs.float() if return_probs else None)


def sparse_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    *,
    attention_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    return_probs: bool = False,
):
    """Eager masked reference for :func:`sparse_attention`: the element mask materialized, float64 math.

    Returns the output [B, H, Tq, Dv] in the query's dtype, or ``(output, probs)`` with
    ``return_probs=True``, where ``probs`` [B, H, Tq, Tk] float32 are the softmax probabilities
    renormalized over the kept blocks (zeros elsewhere) — the probabilities docs/definitions.md defines the
    statistics under sparsity on. Includes the linear fallback when the config asks for it (computed
    element by element, independently of the blockwise implementation). O(T²) memory: tests only.

    Example::

        ref = sparse_attention_reference(q, k, v, sel, is_causal=True)
        torch.testing.assert_close(sparse_attention(q, k, v, sel, is_causal=True), ref, atol=1e-5, rtol=0)
    """
    base = _resolve_base(selection, attention_mask, is_causal, query)
    out, probs = _reference(query, key, value, selection, base, scale, softcap, return_probs=True, linear=True)
    return (out, probs) if return_probs else out


