"""Which execution path computes a block selection: dense SDPA, gathered-block SDPA or FlexAttention.

Every path computes exactly the kept blocks (∧ the base mask ∧ the streaming pattern); they differ only
in speed, and which is fastest depends on the CPU and the shape:

* ``"dense"`` - PyTorch's fused SDPA over the whole base mask, when the selection keeps every block the
  mask allows (and no streaming pattern cuts inside blocks): then sparse attention *is* dense attention,
  and the dense kernel is the fastest way to compute it. The model's own mask is applied as is.
* ``"gathered"`` - each query block's kept key/value blocks copied side by side and run through the fused
  SDPA kernel, rows of equal block count batched (``kernels.sparse.gathered``).
* ``"flex"`` - compiled FlexAttention over a ``BlockMask`` built from the kept blocks
  (``kernels.sparse.flex``); the only path for soft-capping and additive float masks.

``"auto"`` takes ``"dense"`` whenever it applies; otherwise, where both other paths can compute the call,
it **measures** them at the first call of each shape (device, dtype, heads, head dim, mask kind, block
sizes, sequence length and density rounded to buckets) and keeps the faster for that shape in this
process: on a 2-core AVX-512/AMX Xeon, compiled FlexAttention with every causal block kept ran at
0.30-0.40 of SDPA's speed, while gathered blocks ran at SDPA's speed per block; on other CPUs
FlexAttention is closer to SDPA, and the measurement decides. ``execution_choices()`` shows the choices.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..attention import attention_with_stats
from .flex import _mask_kind, _run
from .gathered import gathered_attention, gathered_supported
from .masks import _BaseMask
from .selection import BlockSelection, _resolve_base, _streaming_params

__all__ = ["EXECUTIONS", "choose_execution", "execution_choices", "keeps_every_block"]

EXECUTIONS = ("auto", "dense", "gathered", "flex")

_choices: dict[tuple, dict] = {}


def keeps_every_block(selection: BlockSelection) -> bool:
    """True when the selection computes every (query, key) pair the base mask allows: dense attention.

    Every allowed block is kept, and no streaming pattern cuts inside the blocks.

    Example: ``keeps_every_block(select_blocks(q, k, SparseConfig(topk=1.0), is_causal=True))`` → True.
    """
    if selection.config.mode == "streaming":
        sink, window = _streaming_params(selection)
        if window <= selection.q_len + selection.k_len:
            return False
    return bool(torch.equal(selection.kept, selection.allowed))


def execution_choices() -> dict[tuple, dict]:
    """The per-shape choices ``"auto"`` measured in this process: key → {path, seconds per candidate}.

    Example: ``list(execution_choices().values())[0]["path"]`` → ``'gathered'``.
    """
    return {key: dict(value) for key, value in _choices.items()}


def _shape_key(query, key, value, selection: BlockSelection, base: _BaseMask, softcap) -> tuple:
    density = float(selection.kept.sum()) / max(1.0, float(selection.allowed.sum()))
    return (
        query.device.type, query.dtype, query.shape[1], key.shape[1], query.shape[-1], value.shape[-1],
        _mask_kind(base, selection), base.bias is not None, softcap is not None,
        selection.block_q, selection.block_k,
        round(math.log2(max(1, query.shape[0] * selection.q_len * selection.k_len)) * 2) / 2,  # ±19% in B·Tq·Tk
        round(density * 20) / 20,  # 5% density buckets
    )


def _dense(query, key, value, selection, base, attention_mask, is_causal, scale, softcap):
    if softcap is not None:
        out, _ = attention_with_stats(query, key, value, attention_mask=attention_mask, is_causal=is_causal,
                                      scale=scale, softcap=softcap)
        return out
    mask = attention_mask
    if mask is not None and mask.dim() == 2:  # a [B, Tk] padding mask, as kernels.attention accepts it
        mask = mask[:, None, None, :].bool()
    if mask is not None:
        mask = mask[..., -selection.q_len:, -selection.k_len:]
    elif is_causal and selection.q_len != selection.k_len:
        # lens aligns the causal diagonal bottom-right (queries after a cache); SDPA's is_causal is top-left
        mask = torch.ones(selection.q_len, selection.k_len, dtype=torch.bool, device=query.device).tril(
            diagonal=selection.k_len - selection.q_len)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=bool(is_causal and mask is None and selection.q_len > 1),
        scale=scale, enable_gqa=query.shape[1] != key.shape[1],
    )
    if mask is not None:
        # a row with no allowed key is zeros (as in every lens kernel), never SDPA's NaN
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        row_any = allowed.any(dim=-1, keepdim=True)  # [B|1, H|1, Tq, 1]
        if not bool(row_any.all()):
            out = out.masked_fill(~row_any, 0.0)
    return out


def run_execution(path, query, key, value, selection, base, attention_mask, is_causal, scale, softcap, compiled):
    """Compute the selection with ``path`` (``"dense"``, ``"gathered"`` or ``"flex"``): [B, H, Tq, Dv]."""
    if path == "dense":
        return _dense(query, key, value, selection, base, attention_mask, is_causal, scale, softcap)
    if path == "gathered":
        return gathered_attention(query, key, value, selection, base, scale)[0]
    if path == "flex":
        return _run(query, key, value, selection, base, scale, softcap, compiled)
    raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}; got {path!r}")


def choose_execution(
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
) -> str:
    """The path that computes this call: ``"dense"``, ``"gathered"`` or ``"flex"``.

    ``"dense"`` when :func:`keeps_every_block` (whatever ``execution`` asks: the result is the same and
    the dense kernel is the fastest way to it); the only applicable path when one of the others cannot
    compute the call (soft-capping or an additive float mask: ``"flex"``); the requested path when
    ``execution`` names one; otherwise (``"auto"``) the faster of
    ``"gathered"`` and ``"flex"`` measured on this machine at the first call of each shape bucket (each
    warmed up once, then timed twice, interleaved; minimum kept). ``compiled=False`` never measures:
    eager FlexAttention is a debugging path, so ``"gathered"`` is taken where it applies.

    Pass the same ``attention_mask``/``is_causal``/``scale``/``softcap`` as to :func:`sparse_attention`.

    Example::

        path = choose_execution(q, k, v, sel, is_causal=True)     # e.g. 'gathered'
    """
    if execution not in EXECUTIONS:
        raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}; got {execution!r}")
    base = _resolve_base(selection, attention_mask, is_causal, query)
    return _choose(query, key, value, selection, base, attention_mask, is_causal, scale, softcap, compiled,
                   execution)


def _choose(query, key, value, selection, base, attention_mask, is_causal, scale, softcap, compiled,
            execution="auto") -> str:
    if keeps_every_block(selection):
        return "dense"
    if execution == "flex" or not gathered_supported(query, value, base, softcap):
        return "flex"
    if execution == "gathered" or not compiled:
        return "gathered"
    shape = _shape_key(query, key, value, selection, base, softcap)
    known = _choices.get(shape)
    if known is not None:
        return known["path"]
    candidates = ("gathered", "flex")
    seconds = {path: math.inf for path in candidates}
    with torch.no_grad():
        for path in candidates:  # warm-up: compiles FlexAttention once per variant
            run_execution(path, query, key, value, selection, base, attention_mask, is_causal, scale, softcap, True)
        for _ in range(2):
            for path in candidates:
                start = time.perf_counter()
                run_execution(path, query, key, value, selection, base, attention_mask, is_causal, scale, softcap,
                              True)
                seconds[path] = min(seconds[path], time.perf_counter() - start)
    best = min(candidates, key=lambda p: seconds[p])
    _choices[shape] = {"path": best, "seconds": seconds}
    return best
