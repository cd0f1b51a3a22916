"""The model's own (*base*) mask, analysed once: causal, padding or general, and its allowed blocks.

Sparsity only ever removes (query, key) pairs from the base mask - the mask dense attention would use.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import normalize_mask
from .config import SparseConfig

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




