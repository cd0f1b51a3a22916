"""Executing a block selection with FlexAttention over a ``BlockMask`` built from the kept blocks.

The ``BlockMask`` is assembled directly from the kept block indices (``BlockMask.from_kv_blocks``;
partial and full tiles listed separately so full tiles skip the per-element mask), compiled once with
``torch.compile`` (Inductor C++ on CPU, Triton on GPU). It is never built with ``create_block_mask``,
which evaluates a mask function on every element (0.5 s at T = 8192, 4.9 s at T = 16384 - more than the
sparse attention itself).

**Compilation.** The compiled function is cached and shared by every call. It is compiled with dynamic
shapes, so a new sequence length or batch size does not recompile; what does (once each) is a new head
count or head dimension, dtype, block size, mask kind or score modification. Masks that need a
``[B, H, Tq, Tk]`` lookup compile with static shapes - once per new shape - because Inductor's C++
template miscompiles them under dynamic shapes (see the note on the mask_mod factories). If compilation
fails altogether, the call falls back to eager FlexAttention (and then to the masked reference) with one
``RuntimeWarning``. CPU FlexAttention is inference only.
"""

from __future__ import annotations

import warnings

import torch

from .masks import _BaseMask
from .reference import _reference
from .selection import BlockSelection, _streaming_params

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




