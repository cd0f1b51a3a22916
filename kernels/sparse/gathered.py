"""Executing a block selection through the fused dense kernel: gathered key/value blocks, batched SDPA.

Every (batch, head, query block) *row* of a selection keeps some key blocks. This path copies each row's
kept key/value blocks next to each other and runs PyTorch's fused CPU flash-attention kernel
(``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel behind ``scaled_dot_product_attention``)
over them, many rows per call: rows with the same number of kept blocks form one batch, so top-k (a
fixed count per row) needs no padding and top-p rows are grouped by their count instead of being padded.

Each row's kept blocks are split in two parts, and each part is one softmax over its keys:

* **full** blocks (the base mask allows every element, the streaming pattern covers them) run without a
  mask - the kernel's fastest form;
* **partial** blocks (the diagonal of a causal mask, padding edges, a ragged last block, the streaming
  window's edges, general masks) run with an additive element mask built from the base mask.

The kernel returns each row's log-sum-exp ``L`` beside its output ``o``, so the two parts combine exactly:
``L = log(e^L_full + e^L_part)``, ``o = e^(L_full − L)·o_full + e^(L_part − L)·o_part`` - one softmax over
exactly the kept elements, the same probabilities FlexAttention normalizes over.

Why it exists: on CPUs where Inductor's FlexAttention template is slow (measured: 0.30-0.40 of SDPA's
speed with every causal block kept, on a 2-core AVX-512/AMX Xeon), sparse attention could not pay off
above ~35% density; the gathered path inherits SDPA's own speed per computed block, minus the copy of
the kept key/value blocks. The copies go into small reused buffers (``_GATHER_BYTES``): fresh large
allocations cost more in page faults than the copy itself (measured 250 ms against 48 ms for 126 MB).

Not supported here (the caller falls back to FlexAttention): ``softcap`` and additive float masks
(the fused kernel takes neither per element on full blocks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .masks import _BaseMask
from .selection import BlockSelection, _flex_layout, _streaming_params

__all__ = ["gathered_attention", "gathered_supported"]

# Bytes of gathered keys per kernel call (values take as much again), in two buffers reused call after
# call. Fewer, larger calls matter on a busy machine: every call is a parallel region whose threads
# must all be scheduled (with 4 MB, 2 threads ran 4x slower than 1 thread on a loaded 2-core host).
_GATHER_BYTES = 16 << 20


def _flash(query, key, value, mask, scale):
    """(output, log-sum-exp) of the fused CPU kernel; other devices get the same two from SDPA's math."""
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, False, attn_mask=mask, scale=scale
        )
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask.float()
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).nan_to_num_(0.0)
    return torch.matmul(probs, value.float()).to(query.dtype), lse


def _numpy(t: torch.Tensor):
    # numpy has no bfloat16: copy 16-bit floats as int16 (the bytes are what matters)
    return (t.view(torch.int16) if t.element_size() == 2 else t).detach().numpy()


def _take(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = source[index[i]]`` (rows of 2-D or 3-D tensors).

    On CPU this is numpy's single-threaded take: a gather is a sequence of row copies that gains
    little from threads, and each of torch's parallel copies is a parallel region whose threads must
    all be scheduled - on a busy 2-core machine ``index_select`` with 2 threads ran 7x slower than
    with 1 (1.76 s against 0.24 s for one layer at T = 8192).
    """
    if source.device.type != "cpu":
        return torch.index_select(source, 0, index, out=out)
    np.take(_numpy(source), _numpy(index), axis=0, out=_numpy(out))
    return out


def _put(target: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> None:
    """``target[index[i]] = values[i]`` along the first dimension (single-threaded on CPU, as ``_take``)."""
    if target.device.type != "cpu":
        target.index_copy_(0, index, values)
        return
    _numpy(target)[_numpy(index)] = _numpy(values.contiguous())


def _flash_causal(query, key, value, scale):
    """Causal (top-left) attention of equal-length rows: (output [R, bq, Dv], lse [R, bq] float32)."""
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, True, scale=scale
        )
    else:
        n = query.shape[-2]
        tri = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        mask = torch.zeros(n, n, dtype=query.dtype, device=query.device).masked_fill_(~tri, float("-inf"))
        out, lse = _flash(query, key, value, mask, scale)
    return out.squeeze(1), lse.squeeze(1).float()


def _diagonal_only(partial: torch.Tensor, selection: BlockSelection, base: _BaseMask) -> bool:
    """Whether the partial blocks are exactly every row's causal diagonal square (no padding, Tq = Tk).

    Then query block i's partial key blocks are those covering keys [i·bq, (i+1)·bq), and inside them
    the base mask is plain causal: the kernel's own causal form applies to the contiguous slice.
    """
    bq, bk = selection.block_q, selection.block_k
    if not (base.structured and base.causal and base.key_ok is None and base.offset == 0
            and selection.config.mode != "streaming" and bq % bk == 0):
        return False
    n_q, n_k = partial.shape[-2:]
    ratio = bq // bk
    first = torch.arange(n_q, device=partial.device) * ratio
    j = torch.arange(n_k, device=partial.device)
    diagonal = (j[None, :] >= first[:, None]) & (j[None, :] < first[:, None] + ratio)
    return bool(torch.equal(partial, diagonal.expand_as(partial)))


def gathered_supported(query: torch.Tensor, value: torch.Tensor, base: _BaseMask, softcap) -> bool:
    """Whether :func:`gathered_attention` computes this call exactly (else use FlexAttention).

    Example: ``gathered_supported(q, v, sel._base, None)`` → True for causal or padded masks without softcap.
    """
    return (
        softcap is None
        and base.bias is None
        and value.shape[-1] == query.shape[-1]  # the fused kernel needs Dv == D
        and query.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    )


def _row_parts(selection: BlockSelection) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, partial) kept blocks per row, [B, H, nQb, nKb] bool; a ragged last key block is partial."""
    full = selection.full
    if selection.k_len % selection.block_k:
        ragged = torch.zeros_like(full)
        ragged[..., -1] = True
        full = full & ~ragged
    return full, selection.kept & ~full


def _element_mask(base: _BaseMask, selection: BlockSelection, rows, blocks, dtype, device, heads):
    """Additive mask [n, 1, bq, c·bk] (0 = attend, −inf = not) for rows × their gathered key blocks."""
    bq, bk = selection.block_q, selection.block_k
    n_q = selection.kept.shape[2]
    b = rows // (heads * n_q)
    h = (rows // n_q) % heads
    i = rows % n_q
    q_pos = (i * bq)[:, None] + torch.arange(bq, device=device)  # [n, bq] (query index, no offset)
    k_pos = (blocks * bk)[..., None] + torch.arange(bk, device=device)  # [n, c, bk]
    k_pos = k_pos.reshape(rows.shape[0], -1)  # [n, c·bk]
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    ok = (kp < selection.k_len) & (qp < selection.q_len)
    if base.structured:
        if base.key_ok is not None:
            ok = ok & (kp >= base.key_lo[b][:, None, None]) & (kp < base.key_hi[b][:, None, None])
        if base.causal:
            ok = ok & (kp <= qp + base.offset)
    else:
        allowed = base.allowed
        b_sel = b if allowed.shape[0] > 1 else torch.zeros_like(b)
        h_sel = h if allowed.shape[1] > 1 else torch.zeros_like(h)
        qc = qp.clamp(max=selection.q_len - 1)
        kc = kp.clamp(max=selection.k_len - 1)
        ok = ok & allowed[b_sel[:, None, None], h_sel[:, None, None], qc, kc]
    if selection.config.mode == "streaming":
        sink, window = _streaming_params(selection)
        ok = ok & ((kp < sink) | ((qp + base.offset - kp).abs() < window))
    mask = torch.zeros(ok.shape, dtype=dtype, device=device).masked_fill_(~ok, float("-inf"))
    return mask[:, None], ok.any(dim=-1)


def _chunks(q_rows, k_blocks, v_blocks, part, selection, base, scale, heads, kv_heads, masked):
    """Yield ``(rows, output [n, bq, Dv], lse [n, bq] float32)`` over the rows of ``part`` with ≥ 1 block.

    Rows with the same number of kept blocks are batched into one kernel call (several calls when
    their gathered keys would pass ``_GATHER_BYTES``); a row's blocks keep ascending key order.
    """
    n_rows, bq, dim = q_rows.shape
    bk = selection.block_k
    dv = v_blocks.shape[-1] // bk
    n_q, n_k = part.shape[-2:]
    device, dtype = q_rows.device, q_rows.dtype
    counts, indices = _flex_layout(part)  # kept block indices first, ascending
    counts = counts.reshape(-1).long()
    indices = indices.reshape(n_rows, n_k).long()
    group = heads // kv_heads
    rows_all = torch.arange(n_rows, device=device)
    kv_row = ((rows_all // (heads * n_q)) * kv_heads + (rows_all // n_q) % heads // group) * n_k  # first kv block
    sorted_counts, order = torch.sort(counts, stable=True)
    values, sizes = torch.unique_consecutive(sorted_counts, return_counts=True)
    start = 0
    k_buf = v_buf = None
    for c, size in zip(values.tolist(), sizes.tolist()):
        rows_c = order[start:start + size]
        start += size
        if c == 0:
            continue
        per_call = max(1, _GATHER_BYTES // (c * bk * dim * q_rows.element_size()))
        for r0 in range(0, size, per_call):
            rows = rows_c[r0:r0 + per_call]
            n = rows.shape[0]
            blocks = indices[rows, :c]
            flat = (kv_row[rows, None] + blocks).reshape(-1)
            need = n * c
            if k_buf is None or k_buf.shape[0] < need:
                k_buf = torch.empty(max(need, per_call * c), bk * dim, dtype=dtype, device=device)
                v_buf = torch.empty(max(need, per_call * c), bk * dv, dtype=dtype, device=device)
            keys = _take(k_blocks, flat, k_buf[:need]).view(n, 1, c * bk, dim)
            vals = _take(v_blocks, flat, v_buf[:need]).view(n, 1, c * bk, dv)
            queries = _take(q_rows, rows, torch.empty(n, bq, dim, dtype=dtype, device=device)).view(n, 1, bq, dim)
            mask, row_any = (None, None)
            if masked:
                mask, row_any = _element_mask(base, selection, rows, blocks, dtype, device, heads)
            o, l = _flash(queries, keys, vals, mask, scale)
            l = l.view(n, bq).float()
            if row_any is not None:
                # the fused kernel reports L = 0 (and zeros) for a row without any allowed key
                l = l.masked_fill(~row_any, float("-inf"))
            yield rows, o.view(n, bq, dv), l


def _partial_part(q_rows, k, v, k_blocks, v_blocks, partial, selection, base, scale, heads, kv_heads):
    """Output [R, bq, Dv] and lse [R, bq] of every row over its partial blocks (zeros and −inf if none)."""
    n_rows, bq, dim = q_rows.shape
    batch, n_q, dv = k.shape[0], partial.shape[2], v.shape[-1]
    if _diagonal_only(partial, selection, base):
        # causal without padding: each row's partial blocks are its own diagonal square, a contiguous
        # slice of K/V that the kernel's own causal form computes without a mask or a copy
        group = heads // kv_heads
        extra = n_q * bq - k.shape[2]  # the diagonal of a ragged last query block reaches past the keys
        k_diag = (F.pad(k, (0, 0, 0, extra)) if extra > 0 else k[:, :, : n_q * bq]).unsqueeze(2)
        v_diag = (F.pad(v, (0, 0, 0, extra)) if extra > 0 else v[:, :, : n_q * bq]).unsqueeze(2)
        k_diag = k_diag.expand(batch, kv_heads, group, n_q * bq, dim).reshape(n_rows, 1, bq, dim)
        v_diag = v_diag.expand(batch, kv_heads, group, n_q * bq, dv).reshape(n_rows, 1, bq, dv)
        return _flash_causal(q_rows.view(n_rows, 1, bq, dim), k_diag, v_diag, scale)
    out = torch.zeros(n_rows, bq, dv, dtype=q_rows.dtype, device=q_rows.device)
    lse = torch.full((n_rows, bq), float("-inf"), dtype=torch.float32, device=q_rows.device)
    for rows, o, l in _chunks(q_rows, k_blocks, v_blocks, partial, selection, base, scale, heads, kv_heads, True):
        _put(out, rows, o)
        _put(lse, rows, l)
    return out, lse


def gathered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    selection: BlockSelection,
    base: _BaseMask,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over exactly the kept blocks (∧ the base mask ∧ the streaming pattern), batched SDPA.

    ``query`` [B, H, Tq, D], ``key``/``value`` [B, Hkv, Tk, D] (grouped-query heads share their kv
    head's blocks; nothing is repeated). Returns ``(output [B, H, Tq, D] in the query's dtype,
    lse [B, H, Tq] float32)``: the natural-log normalizer of every row's softmax (−inf for a row with
    no allowed key, whose output is zeros - as FlexAttention and the masked reference define it).

    Example::

        sel = select_blocks(q, k, SparseConfig(topk=0.1), is_causal=True)
        out, lse = gathered_attention(q, k, v, sel, sel._base, None)
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    bq, bk = selection.block_q, selection.block_k
    n_q, n_k = selection.kept.shape[-2:]
    scale = dim**-0.5 if scale is None else float(scale)
    q = F.pad(query, (0, 0, 0, n_q * bq - q_len)) if n_q * bq != q_len else query
    k = F.pad(key, (0, 0, 0, n_k * bk - k_len)) if n_k * bk != k_len else key
    v = F.pad(value, (0, 0, 0, n_k * bk - k_len)) if n_k * bk != k_len else value
    q_rows = q.contiguous().view(batch * heads * n_q, bq, dim)
    k_blocks = k.contiguous().view(batch * kv_heads * n_k, bk * dim)
    v_blocks = v.contiguous().view(batch * kv_heads * n_k, bk * value.shape[-1])
    full, partial = _row_parts(selection)
    o_part, l_part = _partial_part(q_rows, k, v, k_blocks, v_blocks, partial, selection, base, scale, heads,
                                   kv_heads)
    o_full = torch.empty_like(o_part)
    l_full = torch.full_like(l_part, float("-inf"))
    for rows, o, l in _chunks(q_rows, k_blocks, v_blocks, full, selection, base, scale, heads, kv_heads, False):
        _put(o_full, rows, o)
        _put(l_full, rows, l)
    empty = torch.nonzero(full.reshape(-1, full.shape[-1]).any(dim=-1).logical_not_()).flatten()
    o_full.index_fill_(0, empty, 0.0)
    # one softmax over both parts: L = log(e^L_full + e^L_part), o = Σ e^(L_x − L)·o_x (zeros, −inf: no key)
    lse = torch.logaddexp(l_full, l_part)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_full = torch.exp(l_full - safe).unsqueeze_(-1)
    w_part = torch.exp(l_part - safe).unsqueeze_(-1)
    if o_part.dtype == torch.float32:
        out = torch.addcmul(o_part.mul_(w_part), o_full, w_full)
    else:
        out = torch.addcmul(o_part.float().mul_(w_part), o_full.float(), w_full).to(o_part.dtype)
    out = out.view(batch, heads, n_q * bq, -1)[:, :, :q_len]
    lse = lse.view(batch, heads, n_q * bq)[:, :, :q_len]
    return out, lse
