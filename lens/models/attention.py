"""The lens attention function: one plug-in point registered with ``transformers.AttentionInterface``.

Modern Hugging Face architectures (BERT, GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Gemma, LLaVA's language
model, …) call ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation](module, query, key, value, mask,
...)`` with post-RoPE queries and keys. ``lens.load`` sets that implementation to ``"lens"`` so that the
function below runs *whatever kernel the model is deployed with* (``module._lens_kernel``; dense SDPA
when unset), also outside any trace. When probes are active (``lens.models.observers``), it asks the kernel
for the statistics of exactly the probabilities that produced the output and hands them over; when
none are, the dense path is Hugging Face's own SDPA call, so an instrumented model costs nothing idle.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from lens.kernels.attention import AttentionStats, attention_with_stats
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from lens.models.observers import active_edits, active_observers

__all__ = ["IMPLEMENTATION", "AttentionKernel", "DenseAttention", "lens_attention_forward", "register"]

IMPLEMENTATION = "lens"


class AttentionKernel(Protocol):
    """A deployed attention kernel. ``with_stats=False`` must return ``(output, None)`` at full speed.

    ``query`` is [B, H, Tq, D]; ``key``/``value`` [B, Hkv, Tk, D]; ``attention_mask`` is Hugging Face's
    mask (bool [B, 1, Tq, Tk], additive float, or None); the output is [B, H, Tq, Dv].
    """

    def __call__(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        is_causal: bool,
        scale: float | None,
        softcap: float | None,
        pattern_heads: tuple[int, ...],
        with_stats: bool,
    ) -> tuple[torch.Tensor, AttentionStats | None]: ...

    def describe(self) -> dict[str, Any]: ...


class DenseAttention:
    """Dense softmax attention: PyTorch SDPA when nothing observes, the streaming kernel when probes do.

    Example: ``lens.load(attention="dense")`` (the default) installs this kernel.
    """

    name = "dense"
    supports_query_weights = True  # the streaming kernel sums per query group (text→image attention share)

    def __call__(self, module, query, key, value, attention_mask, *, is_causal, scale, softcap, pattern_heads, with_stats,
                 query_weights=None):
        if not with_stats:
            if softcap is not None:  # SDPA has no softcap; the streaming kernel does
                out, _ = attention_with_stats(
                    query, key, value, attention_mask=attention_mask, is_causal=is_causal, scale=scale, softcap=softcap
                )
                return out, None
            out, _ = sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scale, is_causal=is_causal
            )
            return out.transpose(1, 2), None
        return attention_with_stats(
            query,
            key,
            value,
            attention_mask=attention_mask,
            is_causal=is_causal,
            scale=scale,
            softcap=softcap,
            pattern_heads=pattern_heads,
            query_weights=query_weights,
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "dense", "kernel": "torch.sdpa (streaming statistics kernel while traced)"}

    def __repr__(self) -> str:
        return "DenseAttention()"


_DENSE = DenseAttention()


def lens_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function Hugging Face models call for attention once ``lens.load`` has set it up.

    Returns ``(output [B, Tq, H, Dv], None)`` like every ``AttentionInterface`` function. Dropout is not
    applied: lens analyses models in eval mode.

    Example::

        model.set_attn_implementation("lens")   # done by lens.load
        model(**batch)                           # runs module._lens_kernel, dense SDPA by default
    """
    kernel: AttentionKernel = getattr(module, "_lens_kernel", None) or _DENSE
    observers = active_observers()
    edits = active_edits()
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    for edit in edits:  # interventions that act inside attention (lens.ScaleAttention): before the kernel
        attention_mask, key, value = edit.edit_inputs(module, query, key, value, attention_mask, bool(is_causal))
    heads: tuple[int, ...] = ()
    extra: dict[str, Any] = {}
    if observers:
        wanted: set[int] = set()
        for observer in observers:
            wanted.update(observer.pattern_heads(module))
            # query groups (a VLM's text queries): only kernels that declare support get them
            weights = getattr(observer, "query_weights", lambda m: None)(module)
            if weights is not None and getattr(kernel, "supports_query_weights", False):
                extra["query_weights"] = weights
        heads = tuple(sorted(wanted))
    out, stats = kernel(
        module,
        query,
        key,
        value,
        attention_mask,
        is_causal=bool(is_causal),
        scale=scaling,
        softcap=kwargs.get("softcap"),
        pattern_heads=heads,
        with_stats=bool(observers),
        **extra,
    )
    if stats is not None:
        for observer in observers:
            observer.on_attention(module, stats)
    out = out.transpose(1, 2)
    for edit in edits:  # interventions on a head's output (lens.Ablate("head", ...)): before o_proj
        out = edit.edit_output(module, out)
    return out.contiguous(), None


_registered = False


def register() -> None:
    """Register ``"lens"`` with transformers' attention and mask interfaces (idempotent).

    The mask function is Hugging Face's SDPA mask builder: boolean masks, and ``None`` whenever a plain
    causal or full mask suffices, so that long unpadded sequences never allocate a T×T mask.

    Example: ``register(); model.set_attn_implementation("lens")``.
    """
    global _registered
    if _registered:
        return
    AttentionInterface.register(IMPLEMENTATION, lens_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
    _registered = True
