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

__all__ = ["Sparse", "QuantConfig", "SparseAttention", "attention_kernel", "quantize", "long_documents"]

#: The public name of the sparse configuration: ``lens.Sparse(mode="hybrid", topk=0.1, topp=0.9)``.
Sparse = SparseConfig


class SparseAttention:
    """Block-sparse attention as a lens attention kernel (DESIGN §3 "Sparse attention").

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

    def __call__(self, module, query, key, value, attention_mask, *, is_causal, scale, softcap, pattern_heads,
                 with_stats):
        selection = select_blocks(query, key, self.config, attention_mask=attention_mask, is_causal=is_causal,
                                  scale=scale)
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


def quantize(lm, quant, *, calibration=None, progress: bool = False, activations: str | None = None):
    """Replace the linear layers of ``lm``'s model by packed low-bit ``QuantLinear`` layers.

    ``quant``: a scheme name (``"int8"``, ``"int4"``, ``"nf4"``, ``"mxfp4"``, ``"nvfp4"``, ``"ternary"``,
    ``"binary-lowrank"``, ``"w8a8-smooth"``, …) or a ``QuantConfig``. Schemes with SmoothQuant smoothing
    need ``calibration`` texts. Returns (config, report) — both JSON-able through ``describe()``/dict —
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
