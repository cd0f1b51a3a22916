"""Block-sparse attention for lens: FlexAttention execution, an eager reference, and statistics.

DESIGN.md §3 "Sparse attention" (SpargeAttention, Zhang et al. 2025). Selection lives in
``kernels.sparse_select`` and is re-exported here, so ``from lens.kernels.sparse import ...`` is the one
import users need::

    cfg = SparseConfig(mode="hybrid", topk=0.1, topp=0.9)
    sel = select_blocks(q, k, cfg, attention_mask=mask, is_causal=causal, scale=scale)
    out = sparse_attention(q, k, v, sel, attention_mask=mask, is_causal=causal, scale=scale)
    out, stats = sparse_attention_with_stats(q, k, v, sel, attention_mask=mask, is_causal=causal, scale=scale)

Execution is ``torch.nn.attention.flex_attention`` with a ``BlockMask`` assembled directly from the kept
block indices (``BlockMask.from_kv_blocks``; partial and full tiles listed separately so full tiles skip
the per-element mask), compiled once with ``torch.compile`` (Inductor C++ on CPU, Triton on GPU). It is
never built with ``create_block_mask``: that evaluates a mask function on every element, which DESIGN
measured at 0.5 s (T = 8192) to 4.9 s (T = 16384) — more than the sparse attention itself.

**Compilation.** The compiled function is cached and shared by every call. It is compiled with dynamic
shapes, so a new sequence length or batch size does not recompile; what does (once each) is a new head
count or head dimension, dtype, block size, mask kind or score modification. Cold compilation takes
10–30 s on a 2-core CPU (a few seconds with a warm Inductor cache in ``/tmp/torchinductor_$USER``).
Masks that need a ``[B, H, Tq, Tk]`` lookup (general masks, additive float masks) compile with static
shapes — once per new shape — because Inductor's C++ template miscompiles them under dynamic shapes
(see the note on the mask_mod factories); so does any variant whose dynamic compilation fails, after
one ``RuntimeWarning``. If compilation fails altogether, the call falls back to eager FlexAttention
(and, if even that is unavailable, to the masked reference) with one ``RuntimeWarning``; both fallbacks
materialize each head's score matrix, so they are for small inputs. CPU FlexAttention is inference
only.

**Masks.** Hugging Face masks (bool ``[B, 1, Tq, Tk]``, True = attend, or additive float) and
``is_causal`` (used only when there is no mask, bottom-right aligned) are analysed once by the selection
and reused by execution when the same mask object is passed. Causal and padding masks (each sequence's
real keys one contiguous range, i.e. left or right padding) become a ``mask_mod`` of a few integer
comparisons; any other mask is looked up element by element. Query rows with no allowed key produce
zeros. The ``mask_mod`` is evaluated only on kept blocks that the mask cuts (the causal diagonal,
padding boundaries); kept blocks it allows entirely are listed as full and skip it.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .attention import AttentionStats
from .sparse_select import (
    MODES,
    BlockSelection,
    SparseConfig,
    _analyze_mask,
    _base_blocks,
    _BaseMask,
    make_selection,
    select_blocks,
)

__all__ = [
    "MODES",
    "SparseConfig",
    "BlockSelection",
    "select_blocks",
    "make_selection",
    "sparse_attention",
    "sparse_attention_reference",
    "sparse_attention_with_stats",
    "sparse_element_mask",
    "linear_mix_weight",
]

# Score elements per chunk of the statistics pass (16 MB in fp32), as in kernels.attention.
_TARGET_CHUNK_ELEMENTS = 1 << 22
# Distinct compiled graphs allowed for the shared flex function; see "Compilation" above. Dynamo's
# default (8) is per code object and would soon drop static-shape variants to the unfused eager path.
_RECOMPILE_LIMIT = 128

_state: dict = {"compile_error": None, "eager_error": None, "static_variants": set()}


# ----------------------------------------------------------------------------------------------------
# mask_mod / score_mod factories. Every captured value is a tensor so that Dynamo treats it as a graph
# input: captured Python numbers would be specialized and recompile for every new value. The captured
# tensors are 0-dim or [B] on purpose: Inductor's C++ FlexAttention template (torch 2.13) renames its
# runtime tile-size symbols by plain string replacement ("ks1" also rewrites "ks19"), so a mask_mod
# that brings a new size symbol into the kernel (a [B, Tk] or [B, H, Tq, Tk] lookup) fails to compile
# under dynamic shapes whenever the symbol's number collides. 0-dim values and a [B] lookup (whose size
# is the batch symbol query already has) bring none; they compiled in every shape we tried.


def _causal_mask_mod(causal_offset):
    # the whole mask of unpadded attention; bidirectional attention passes causal_offset = Tk (always
    # true), so one comparison serves both and no flag is evaluated per element
    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + causal_offset

    return mask_mod


def _padded_mask_mod(key_lo, key_hi, causal_offset):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx >= key_lo[b]) & (kv_idx < key_hi[b]) & (kv_idx <= q_idx + causal_offset)

    return mask_mod


def _general_mask_mod(allowed, b_sel, h_sel):
    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[b * b_sel, h * h_sel, q_idx, kv_idx]

    return mask_mod


def _streaming_mask_mod(inner, offset, sink, window):
    def mask_mod(b, h, q_idx, kv_idx):
        near = ((q_idx + offset - kv_idx).abs() < window) | (kv_idx < sink)
        return inner(b, h, q_idx, kv_idx) & near

    return mask_mod


def _bias_score_mod(bias, b_sel, h_sel):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b * b_sel, h * h_sel, q_idx, kv_idx]

    return score_mod


def _softcap_score_mod(cap):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return score_mod


def _softcap_bias_score_mod(cap, bias, b_sel, h_sel):
    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap + bias[b * b_sel, h * h_sel, q_idx, kv_idx]

    return score_mod


def _streaming_params(selection: BlockSelection) -> tuple[int, int]:
    cfg = selection.config
    if cfg.mode == "streaming":
        return cfg.sink_tokens, cfg.window
    return 0, selection.q_len + selection.k_len + 1  # a band wider than any distance: no restriction


def _int(value: int, device) -> torch.Tensor:
    return torch.tensor(int(value), dtype=torch.int64, device=device)


def _block_gate(mask_mod, kept, block_q: int, block_k: int):
    """Also require the element's block to be kept.

    FlexAttention treats the block mask purely as an optimization: its eager (math) implementation
    ignores the block lists and evaluates ``mask_mod`` on every element. Whatever may end up running
    eagerly therefore needs the kept blocks inside ``mask_mod``: the eager fallback, and static-shape
    graphs (Dynamo runs a frame eagerly once its recompile limit is reached). The dynamic-shape kernel
    never visits a dropped block and is spared the extra lookup on its partial blocks.
    """

    def gated(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_idx, kv_idx) & kept[b, h, q_idx // block_q, kv_idx // block_k]

    return gated


def _mask_kind(base: _BaseMask, selection: BlockSelection) -> str:
    kind = ("causal" if base.key_ok is None else "padded") if base.structured else "general"
    return kind + ("+streaming" if selection.config.mode == "streaming" else "")


def _mods(base: _BaseMask, selection: BlockSelection, softcap, device, *, block_gate: bool = False):
    # Evaluated per element of every partial block (each causal row has one or two on the diagonal),
    # so each variant carries only the comparisons its mask needs: at 5% density the diagonal blocks
    # are most of the work, and the general-purpose form measured ~10% slower there.
    causal_offset = _int(base.offset if base.causal else base.k_len, device)
    if base.structured and base.key_ok is None:
        mask_mod = _causal_mask_mod(causal_offset)
    elif base.structured:
        mask_mod = _padded_mask_mod(base.key_lo, base.key_hi, causal_offset)
    else:
        allowed = base.allowed
        mask_mod = _general_mask_mod(allowed, _int(allowed.shape[0] > 1, device), _int(allowed.shape[1] > 1, device))
    if selection.config.mode == "streaming":
        sink, window = _streaming_params(selection)
        mask_mod = _streaming_mask_mod(mask_mod, _int(base.offset, device), _int(sink, device), _int(window, device))
    if block_gate:
        mask_mod = _block_gate(mask_mod, selection.kept, selection.block_q, selection.block_k)
    score_mod = None
    cap = None if softcap is None else torch.tensor(float(softcap), dtype=torch.float32, device=device)
    if base.bias is not None:
        bias = base.bias
        b_sel, h_sel = _int(bias.shape[0] > 1, device), _int(bias.shape[1] > 1, device)
        score_mod = _bias_score_mod(bias, b_sel, h_sel) if cap is None else _softcap_bias_score_mod(cap, bias, b_sel, h_sel)
    elif cap is not None:
        score_mod = _softcap_score_mod(cap)
    return mask_mod, score_mod


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


def _pow2_divisor(n: int, cap: int) -> int:
    d = 1
    while n % (d * 2) == 0 and d * 2 <= cap:
        d *= 2
    return d


def _kernel_options(query: torch.Tensor, selection: BlockSelection) -> dict | None:
    if query.device.type != "cuda":
        return None
    # Triton tiles must divide the sparse blocks (see sparse_select.BLOCK_MULTIPLE); the autotuner's
    # default tile (e.g. 128 rows for half precision) would not divide a 64-row or 80-row block.
    half = query.dtype in (torch.float16, torch.bfloat16)
    big_head = query.shape[-1] > 256
    cap_m = 32 if big_head else (128 if half else 64)
    cap_n = 16 if big_head else 64
    return {"BLOCK_M": _pow2_divisor(selection.block_q, cap_m), "BLOCK_N": _pow2_divisor(selection.block_k, cap_n)}


def _block_mask(selection: BlockSelection, mask_mod, requires_grad: bool):
    from torch.nn.attention.flex_attention import BlockMask

    return BlockMask.from_kv_blocks(
        selection.kv_num_blocks,
        selection.kv_indices,
        selection.full_kv_num_blocks,
        selection.full_kv_indices,
        BLOCK_SIZE=(selection.block_q, selection.block_k),
        mask_mod=mask_mod,
        seq_lengths=(selection.q_len, selection.k_len),
        compute_q_blocks=requires_grad,  # the transposed layout only serves the backward pass
    )


def _compiled_flex(dynamic: bool):
    name = "compiled_dynamic" if dynamic else "compiled_static"
    if _state.get(name) is None:
        from torch.nn.attention.flex_attention import flex_attention

        _state[name] = torch.compile(flex_attention, dynamic=dynamic, fullgraph=True)
    return _state[name]


def _eager_flex(query, key, value, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        # we warn ourselves, once, when we end up here without having been asked to
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(query, key, value, **kwargs)


def _variant(query, key, value, selection, base, softcap) -> tuple:
    """What makes a compiled graph different, apart from sizes."""
    return (
        _mask_kind(base, selection), base.bias is not None, softcap is not None, query.dtype, query.device.type,
        query.shape[1], key.shape[1], query.shape[-1], value.shape[-1], selection.block_q, selection.block_k,
    )


def _run(query, key, value, selection, base, scale, softcap, compiled: bool) -> torch.Tensor:
    requires_grad = query.requires_grad or key.requires_grad or value.requires_grad
    kernel_options = _kernel_options(query, selection)
    enable_gqa = query.shape[1] != key.shape[1]

    def call(fn, block_gate: bool):
        mask_mod, score_mod = _mods(base, selection, softcap, query.device, block_gate=block_gate)
        return fn(
            query, key, value, score_mod=score_mod, block_mask=_block_mask(selection, mask_mod, requires_grad),
            scale=scale, enable_gqa=enable_gqa, kernel_options=kernel_options,
        )

    if compiled and _state["compile_error"] is None:
        variant = _variant(query, key, value, selection, base, softcap)
        errors = []
        # [B, H, Tq, Tk] lookups (general masks, additive biases) never compiled with dynamic shapes in
        # our trials (see the note on mask_mod factories): those go straight to static shapes.
        static_only = variant in _state["static_variants"] or variant[0].startswith("general") or variant[1]
        for dynamic in ([False] if static_only else [True, False]):
            # Dynamo runs a frame eagerly when it gives up on it (recompile limit reached — plausible
            # with static shapes, one graph per length — or errors suppressed), and eager FlexAttention
            # ignores the block lists: then only a block-gated mask_mod keeps the result right.
            gate = not dynamic or bool(torch._dynamo.config.suppress_errors)
            try:
                with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                    out = call(_compiled_flex(dynamic), block_gate=gate)
            except Exception as exc:  # noqa: BLE001 - compiler failures of any kind; judged below
                errors.append(exc)
                continue
            if not dynamic and not static_only:
                # Inductor's C++ FlexAttention template renames its runtime tile-size symbol by plain
                # string replacement ("ks4" also hits "ks45"), so some dynamic-shape graphs do not
                # compile (torch 2.13). Static shapes avoid it, at one compilation per new shape.
                _state["static_variants"].add(variant)
                warnings.warn(
                    "lens sparse attention: the dynamic-shape FlexAttention kernel failed to compile for this "
                    f"configuration ({type(errors[0]).__name__}); compiling per sequence length instead.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return out
        try:
            out = call(_eager_flex, block_gate=True) if _state["eager_error"] is None else None
        except Exception:  # noqa: BLE001
            out = None
        if out is None:
            raise errors[-1]
        # The same call works eagerly, so the compiler (not the input) is at fault: stop trying.
        _state["compile_error"] = f"{type(errors[-1]).__name__}: {errors[-1]}"
        warnings.warn(
            "lens sparse attention: compiled FlexAttention is unavailable here "
            f"({_state['compile_error'][:300]}); using eager FlexAttention, which materializes every "
            "head's score matrix (slow, O(T²) memory).",
            RuntimeWarning,
            stacklevel=3,
        )
        return out
    if _state["eager_error"] is None:
        try:
            return call(_eager_flex, block_gate=True)
        except Exception as exc:  # noqa: BLE001
            _state["eager_error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "lens sparse attention: FlexAttention is unavailable here "
                f"({_state['eager_error'][:300]}); using the masked reference (O(T²) memory).",
                RuntimeWarning,
                stacklevel=3,
            )
    return _reference(query, key, value, selection, base, scale, softcap, return_probs=False, linear=False)[0]


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
) -> torch.Tensor:
    """Block-sparse attention over the kept blocks of ``selection`` (DESIGN.md §3), [B, H, Tq, Dv].

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

    ``compiled=False`` runs eager FlexAttention (debugging; materializes the scores).

    Example::

        q = torch.randn(1, 4, 1024, 64); k = v = torch.randn(1, 2, 1024, 64)
        sel = select_blocks(q, k, SparseConfig(topk=0.2), is_causal=True)
        out = sparse_attention(q, k, v, sel, is_causal=True)      # ≈ SDPA(q, k, v, is_causal=True, enable_gqa=True)
    """
    base = _resolve_base(selection, attention_mask, is_causal, query)
    if key.shape[2] != selection.k_len or query.shape[1] % key.shape[1]:
        raise ValueError(f"key of shape {tuple(key.shape)} does not fit the selection (Tk={selection.k_len})")
    out = _run(query, key, value, selection, base, scale, softcap, compiled)
    if selection.config.linear_fallback:
        out = _mix(out, _linear_branch(query, key, value, selection), selection)
    return out


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
    renormalized over the kept blocks (zeros elsewhere) — the probabilities DESIGN.md §3 defines the
    statistics under sparsity on. Includes the linear fallback when the config asks for it (computed
    element by element, independently of the blockwise implementation). O(T²) memory: tests only.

    Example::

        ref = sparse_attention_reference(q, k, v, sel, is_causal=True)
        torch.testing.assert_close(sparse_attention(q, k, v, sel, is_causal=True), ref, atol=1e-5, rtol=0)
    """
    base = _resolve_base(selection, attention_mask, is_causal, query)
    out, probs = _reference(query, key, value, selection, base, scale, softcap, return_probs=True, linear=True)
    return (out, probs) if return_probs else out


# ----------------------------------------------------------------------------------------------------
# Statistics


def _query_count(base: _BaseMask, device) -> torch.Tensor:
    """|Q_k| under the base mask (valid queries only), [B, Tk] float32 — as kernels.attention counts it."""
    batch, q_len, k_len = base.batch, base.q_len, base.k_len
    valid = base.query_valid.float()
    if base.structured:
        if base.causal:
            # queries q with q + offset >= k: a suffix of the rows
            suffix = torch.cat([valid.flip(-1).cumsum(-1).flip(-1), torch.zeros(batch, 1, device=device)], dim=-1)
            first = (torch.arange(k_len, device=device) - base.offset).clamp(0, q_len)
            count = suffix[:, first]
        else:
            count = valid.sum(dim=-1, keepdim=True).expand(batch, k_len)
        if base.key_ok is not None:
            count = count * base.key_ok.float()
        return count.contiguous()
    allowed = base.allowed
    count = torch.zeros(batch, k_len, dtype=torch.float32, device=device)
    rows = max(1, (1 << 24) // max(1, batch * allowed.shape[1] * k_len))
    for start in range(0, q_len, rows):
        chunk = allowed[..., start:start + rows, :]
        counted = (chunk & base.query_valid[:, None, start:start + rows, None]).any(dim=1)
        count += counted.sum(dim=1, dtype=torch.float32)
    return count


def _stats(query, key, selection: BlockSelection, base: _BaseMask, scale, softcap, pattern_heads, chunk_size):
    """Statistics of the kept-block probabilities, visiting only kept blocks, chunked over query blocks.

    Each query block gathers its kept key blocks (padded to the chunk's largest count; padding slots are
    masked), so work and memory scale with the kept blocks, not with T². Probabilities are recomputed
    here because the CPU kernel cannot return its log-sum-exp; they are the same softmax over the same
    elements (kept blocks ∧ base mask ∧ pattern) that the kernel normalizes over.
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
    if chunk_size:
        step = max(1, int(chunk_size) // bq)
    else:
        step = max(1, _TARGET_CHUNK_ELEMENTS // max(1, batch * heads * bq * max(1, max_kept) * bk))
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
        if patterns is not None:
            r0, r1 = i0 * bq, min(i1 * bq, q_len)
            sub = probs[:, list(pattern_heads)].reshape(batch, len(pattern_heads), c * bq, width * bk)
            where = pos[:, list(pattern_heads)].expand(-1, -1, -1, bq, -1).reshape(sub.shape)
            rows_out = torch.zeros(batch, len(pattern_heads), c * bq, k_pad, device=device)
            rows_out.scatter_(-1, where, sub)  # positions within a row are distinct: kept blocks differ
            patterns[:, :, r0:r1] = rows_out[:, :, : r1 - r0, :k_len]
    return AttentionStats(
        key_mass=key_mass[..., :k_len].contiguous(),
        query_count=_query_count(base, device),
        query_valid=base.query_valid,
        patterns=patterns,
        pattern_heads=pattern_heads,
        kept_fraction=selection.kept_fraction.float(),
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
) -> tuple[torch.Tensor, AttentionStats]:
    """Sparse attention plus the same ``AttentionStats`` as ``kernels.attention.attention_with_stats``.

    The output is the deployed kernel's (:func:`sparse_attention`, FlexAttention). The statistics are
    those of DESIGN.md §3 under sparsity — the softmax probabilities renormalized over the kept blocks:
    ``key_mass[b, h, k]`` = Σ over valid queries of those probabilities; ``query_count[b, k]`` = |Q_k|
    under the *base* mask (so dense and sparse runs share one denominator); ``query_valid`` from the
    mask diagonal; ``patterns`` [B, len(pattern_heads), Tq, Tk] for the heads asked for (the only
    O(T²) tensor, and only then); ``kept_fraction`` [B, H] from the selection. They are computed in a
    second pass that visits only the kept blocks, chunked over query blocks (``chunk_size`` query rows,
    rounded down to whole blocks), in O(T) memory beyond one chunk. With ``linear_fallback`` the
    statistics describe the softmax branch (the linear branch has no per-key probabilities).

    Example::

        out, stats = sparse_attention_with_stats(q, k, v, sel, is_causal=True, pattern_heads=(0,))
        sink = stats.key_mass[..., 0] / stats.query_count[:, None, 0]      # sink score per head
    """
    out = sparse_attention(
        query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal, scale=scale,
        softcap=softcap, compiled=compiled,
    )
    base = _resolve_base(selection, attention_mask, is_causal, query)
    with torch.no_grad():
        stats = _stats(query, key, selection, base, scale, softcap, pattern_heads, chunk_size)
    return out, stats
