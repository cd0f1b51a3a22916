"""The deployment path: block-sparse attention and low-bit weights applied to a loaded model.

``lens.load(..., attention=lens.Sparse(...), quant="nvfp4")`` calls into here. The kernels themselves live
in ``lens.kernels.sparse`` and ``lens.kernels.lowbit`` (pure torch); this module adapts them to the
attention-function protocol of ``lens.models.attention`` and to Hugging Face models.
"""

from __future__ import annotations

from typing import Any

from lens.kernels.lowbit import QuantConfig, calibrate, quantize_model
from lens.kernels.sparse import (
    SparseConfig,
    select_blocks,
    sparse_attention,
    sparse_attention_with_stats,
)

from lens.errors import ConfigError
from lens.models.llamacpp import use_ggml_norms

__all__ = ["Sparse", "QuantConfig", "SparseAttention", "EveryBlockKeptWarning", "check_every_block_kept",
           "attention_kernel", "quantize", "long_documents"]

#: The public name of the sparse configuration: ``lens.Sparse(mode="hybrid", topk=0.1, topp=0.9)``.
Sparse = SparseConfig


class SparseAttention:
    """Block-sparse attention as a lens attention kernel (docs/definitions.md#sparse-attention).

    Each call selects blocks from the real post-RoPE queries and keys (mean-pooled block scores, top-k /
    top-p / hybrid, sink block, local window), then runs the compiled FlexAttention kernel over the kept
    blocks. While traced, the statistics are those of the probabilities renormalized over the kept
    blocks, and the kept fraction per head is reported.

    Example::

        lm = lens.load(attention=lens.Sparse(mode="hybrid", topk=0.1, topp=0.95, block_q=64, block_k=64))
        run = lens.trace(lm, texts)
        run.arrays["attn.kept_fraction"]     # [layers, sequences, heads]
    """

    def __init__(self, config: SparseConfig, *, compiled: bool = True):
        self.config = config
        self.compiled = compiled
        #: calls since the last ``reset_tally()`` and how many of them kept every allowed block
        self.tally = {"calls": 0, "every_block_kept": 0}

    def reset_tally(self) -> None:
        """Start counting calls afresh (``lens.trace`` does at its start)."""
        self.tally = {"calls": 0, "every_block_kept": 0}

    def __call__(self, module, query, key, value, attention_mask, *, is_causal, scale, softcap, pattern_heads,
                 with_stats):
        selection = select_blocks(query, key, self.config, attention_mask=attention_mask, is_causal=is_causal,
                                  scale=scale)
        self.tally["calls"] += 1
        self.tally["every_block_kept"] += int(selection.skipped_fraction() <= 0.0)
        if not with_stats:
            out = sparse_attention(query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal,
                                   scale=scale, softcap=softcap, compiled=self.compiled)
            return out, None
        return sparse_attention_with_stats(
            query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal, scale=scale,
            softcap=softcap, pattern_heads=pattern_heads, compiled=self.compiled,
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": "sparse", "kernel": "torch flex_attention (compiled) over a BlockMask", **self.config.describe()}

    def __repr__(self) -> str:
        return f"SparseAttention({self.config!r})"


class EveryBlockKeptWarning(UserWarning):
    """A sparse attention configuration kept every block for the inputs it saw: it computed dense attention."""


def check_every_block_kept(lm, *, warn: bool = True) -> bool | None:
    """After a forward pass (``lens.trace`` calls this): whether ``lm``'s sparse kernel kept every allowed
    block in every call since its tally was reset — then it computed exactly dense attention, which a user
    who asked for sparsity must hear. Warns ``EveryBlockKeptWarning`` (with what to change) when ``warn``.
    Returns None for dense attention or when the kernel keeps no tally.

    Example: ``lens.trace(lens.load(attention=lens.Sparse(block_q=64)), ["Short."])`` warns: one block.
    """
    kernel = getattr(lm, "attention_kernel", None)
    tally = getattr(kernel, "tally", None)
    if not tally or not tally.get("calls"):
        return None
    everything = tally["every_block_kept"] == tally["calls"]
    if everything and warn:
        import warnings

        config = getattr(kernel, "config", None)
        blocks = f" (blocks of {config.block_q} × {config.block_k} tokens)" if config is not None else ""
        warnings.warn(
            f"the sparse attention configuration kept every attention block for these inputs{blocks}, so the model "
            "computed dense attention and any comparison with dense shows only rounding. Sparsity needs sequences "
            "several blocks long: use longer inputs (e.g. lens.models.deploy.long_documents(texts) with "
            "truncate=True) or smaller block_q/block_k.",
            EveryBlockKeptWarning,
            stacklevel=4,  # the caller of lens.trace (through torch's inference_mode wrapper)
        )
    return everything


def attention_kernel(spec) -> SparseAttention:
    """Turn an ``attention=`` argument into a kernel: a ``lens.Sparse`` config, a kernel object, or the
    name ``"streaming"`` (StreamingLLM preset).

    Example: ``attention_kernel(lens.Sparse(topk=0.2))``.
    """
    if isinstance(spec, SparseConfig):
        return SparseAttention(spec)
    if isinstance(spec, str) and spec.lower() == "streaming":
        return SparseAttention(SparseConfig.streaming())
    if callable(spec) and hasattr(spec, "describe"):
        return spec
    raise ConfigError(
        f"attention must be 'dense', 'streaming', a lens.Sparse(...) configuration or a kernel object with "
        f"__call__ and describe(); got {spec!r}"
    )


def quantize(lm, quant, *, calibration=None, progress: bool | None = None, activations: str | None = None):
    """Replace the linear layers of ``lm``'s model by packed low-bit ``QuantLinear`` layers.

    ``quant``: a scheme name (``"int8"``, ``"int4"``, ``"nf4"``, ``"mxfp4"``, ``"nvfp4"``, ``"ternary"``,
    ``"binary-lowrank"``, ``"w8a8-smooth"``, …) or a ``QuantConfig``. Schemes with SmoothQuant smoothing
    need ``calibration`` texts. ``progress``: a bar over the layers (None: only in a terminal or notebook).
    Returns (config, report) — both JSON-able through ``describe()``/dict —
    for the run's provenance.

    ``"keep"`` (a model loaded from a GGUF file): keep the file's own blocks packed instead of the
    dequantized weights (``lens.models.gguf_keep``). ``activations="llama.cpp"`` (GGUF types and ``"keep"``):
    quantize layer inputs as llama.cpp's CPU matmul does.

    Example: ``config, report = quantize(lm, "nvfp4"); report["bits_per_weight"]``.
    """
    if isinstance(quant, str) and quant.strip().lower() == "keep":
        from lens.models.gguf_keep import KeepGGUF, keep_gguf_blocks

        if not getattr(lm, "gguf_path", None):
            raise ConfigError(
                "quant='keep' keeps a GGUF file's own blocks: load a .gguf file (lens.load('model.gguf', quant='keep')) "
                "or the embedded 'smollm2'; for other models give a scheme such as quant='q4_k'"
            )
        report = keep_gguf_blocks(lm, lm.gguf_path, activations=activations)
        if activations is not None:
            report["ggml_norms"] = len(use_ggml_norms(lm.model))
        return KeepGGUF(activations=activations), report
    config = quant if isinstance(quant, QuantConfig) else QuantConfig.from_name(str(quant))
    if activations is not None and getattr(config, "activations", None) != activations:
        import dataclasses

        config = dataclasses.replace(config, activations=activations)
    stats = None
    if config.smooth_alpha is not None:
        if not calibration:
            raise ConfigError(
                f"{config.scheme} with SmoothQuant smoothing needs calibration activations: pass "
                "lens.load(..., quant=..., calibration=['a few', 'representative texts'])"
            )
        from lens.models.inputs import encode, pad_batch

        encoded = encode(lm, list(calibration), truncate=True)
        pad_id = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
        batches = []
        for i in range(0, len(encoded.ids), 8):
            ids, mask = pad_batch(encoded.ids[i : i + 8], pad_id)
            batches.append({"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device)})
        stats = calibrate(lm.model, batches)
    report = quantize_model(lm.model, config, progress=progress, calibration=stats)
    if getattr(config, "activations", None) is not None:
        report["ggml_norms"] = len(use_ggml_norms(lm.model))
    # provenance keeps the totals; the per-module lists can run to hundreds of names on a real model
    summary = {k: v for k, v in report.items() if k not in ("per_module", "replaced", "config")}
    summary["skipped"] = len(report.get("skipped", []))
    return config, summary


def long_documents(texts, n_documents: int = 4, words: int = 600) -> list[str]:
    """Join short texts into ``n_documents`` long ones (each rotating through all texts), so that sparse
    attention has several blocks per sequence to choose from; trace them with ``truncate=True``.

    Example: ``lens.trace(lm, long_documents(texts), truncate=True)``.
    """
    documents = []
    for start in range(n_documents):
        order = texts[start:] + texts[:start]
        doc: list[str] = []
        while sum(len(t.split()) for t in doc) < words:
            doc.extend(order)
        documents.append(" ".join(doc))
    return documents
