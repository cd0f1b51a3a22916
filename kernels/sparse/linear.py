"""The SLA-style linear branch: a cheap linear-attention estimate of the skipped blocks, mixed in by weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import _BaseMask
from .selection import BlockSelection

# ----------------------------------------------------------------------------------------------------
# Linear fallback (SLA-style)


def _key_counts(selection: BlockSelection, base: _BaseMask, device) -> torch.Tensor:
    """Real keys per key block, [B, nKb] float (padding excluded, ragged last block counted exactly)."""
    bk = selection.block_k
    n_k = selection.kept.shape[-1]
    valid = base.key_valid
    if valid is None:
        valid = torch.ones(selection.kept.shape[0], selection.k_len, dtype=torch.bool, device=device)
    return F.pad(valid.float(), (0, n_k * bk - selection.k_len)).view(-1, n_k, bk).sum(dim=-1)


def linear_mix_weight(selection: BlockSelection) -> torch.Tensor:
    """Weight of the linear branch per query block, [B, H, nQb] in [0, 1] (SLA-style fallback).

    The pooled block scores estimate each block's share of the softmax mass:
    ``m[i, j] = n_j · exp(l[i, j])`` with ``l`` the scaled pooled logits and ``n_j`` the real keys of key
    block j (a first-order estimate: exp of the mean score). With K = kept blocks and L = skipped blocks
    the base mask allows entirely, the weight is ``Σ_L m / (Σ_K m + Σ_L m)``.

    Example: ``linear_mix_weight(select_blocks(q, k, SparseConfig(linear_fallback=True)))``.
    """
    if selection.block_logits is None:
        raise ValueError("this selection was made without linear_fallback; it has no block scores")
    base = selection._base
    logits = selection.block_logits
    linear = selection.allowed_full & ~selection.kept
    used = selection.kept | linear
    counts = _key_counts(selection, base, logits.device)[:, None, None, :]
    peak = logits.masked_fill(~used, float("-inf")).amax(dim=-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    mass = torch.exp(logits - peak) * counts
    kept_mass = (mass * selection.kept).sum(dim=-1)
    linear_mass = (mass * linear).sum(dim=-1)
    total = kept_mass + linear_mass
    return torch.where(total > 0, linear_mass / total.clamp(min=1e-30), torch.zeros_like(total))


def _linear_branch(query, key, value, selection: BlockSelection) -> torch.Tensor | None:
    """Linear attention over the skipped, entirely allowed key blocks of each query block; [B, H, Tq, Dv].

    φ = softmax over the feature dimension, applied to Q and K (SLA). Per key block j the sums
    ``S_j = Σ_k φ(k_k) v_kᵀ`` and ``z_j = Σ_k φ(k_k)`` are formed once; a query block adds up those of its
    skipped blocks with one matmul against the skipped-block indicator, and row q gets
    ``φ(q)ᵀ S / φ(q)ᵀ z``. Skipped blocks that the base mask allows only in part (the causal diagonal,
    padding boundaries) are left out, so the branch never sees a key the model's mask forbids.
    """
    linear = selection.allowed_full & ~selection.kept
    if not bool(linear.any()):
        return None
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    group = heads // kv_heads
    bq, bk = selection.block_q, selection.block_k
    n_q, n_k = linear.shape[-2:]
    phi_q = F.pad(torch.softmax(query.float(), dim=-1), (0, 0, 0, n_q * bq - q_len)).view(batch, heads, n_q, bq, dim)
    # padding rows are added after φ so that they are zero (φ of a zero row is not zero)
    phi_k = F.pad(torch.softmax(key.float(), dim=-1), (0, 0, 0, n_k * bk - k_len)).view(batch, kv_heads, n_k, bk, dim)
    v = F.pad(value.float(), (0, 0, 0, n_k * bk - k_len)).view(batch, kv_heads, n_k, bk, dim_v)
    state = torch.matmul(phi_k.transpose(-1, -2), v).reshape(batch, kv_heads, n_k, dim * dim_v)
    norm = phi_k.sum(dim=-2)  # [B, Hkv, nKb, D]
    indicator = linear.float().reshape(batch, kv_heads, group * n_q, n_k)
    state_q = torch.matmul(indicator, state).view(batch, heads, n_q, dim, dim_v)
    norm_q = torch.matmul(indicator, norm).view(batch, heads, n_q, dim, 1)
    numerator = torch.matmul(phi_q, state_q)
    denominator = torch.matmul(phi_q, norm_q)
    out = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), torch.zeros_like(numerator))
    return out.reshape(batch, heads, n_q * bq, dim_v)[:, :, :q_len]


def _mix(out: torch.Tensor, linear: torch.Tensor | None, selection: BlockSelection) -> torch.Tensor:
    if linear is None:
        return out
    weight = linear_mix_weight(selection).repeat_interleave(selection.block_q, dim=-1)[..., : selection.q_len, None]
    return ((1.0 - weight) * out.float() + weight * linear).to(out.dtype)




