"""The deployment path: block-sparse attention and low-bit weights applied to a loaded model.

``lens.load(..., attention=lens.Sparse(...), quant="nvfp4")`` calls into here. The kernels themselves live
in ``lens.kernels.sparse`` and ``lens.kernels.lowbit`` (pure torch); this module adapts them to the
attention-function protocol of ``lens.models.attention`` and to Hugging Face models.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch import nn

from lens.kernels.lowbit import QuantConfig, calibrate, quantize_model
from lens.kernels.lowbit.layers import default_include
from lens.kernels.sparse import (
    EXECUTIONS,
    SparseConfig,
    choose_execution,
    select_blocks,
    sparse_attention,
    sparse_attention_with_stats,
)

from lens.errors import ConfigError, LensWarning
from lens.models.llamacpp import use_ggml_norms

__all__ = ["Sparse", "QuantConfig", "SparseAttention", "EveryBlockKeptWarning", "check_every_block_kept",
           "attention_kernel", "quantize", "long_documents", "quant_parts", "vlm_calibration_batches"]

#: The public name of the sparse configuration: ``lens.Sparse(mode="hybrid", topk=0.1, topp=0.9)``.
Sparse = SparseConfig


class SparseAttention:
    """Block-sparse attention as a lens attention kernel (docs/definitions.md#sparse-attention).

    Each call selects blocks from the real post-RoPE queries and keys (mean-pooled block scores, top-k /
    top-p / hybrid, sink block, local window), then computes exactly the kept blocks on one of three
    paths (``lens.kernels.sparse.paths``): dense SDPA when the selection keeps every block the mask
    allows, else gathered-block SDPA or compiled FlexAttention - with ``execution="auto"`` (the
    default), whichever measured faster on this machine for the shape. While traced, the statistics are
    those of the probabilities renormalized over the kept blocks (the text→image attention share of a
    vision-language model too), and the kept fraction per head is reported; the run's provenance records how many calls ran on each path
    (``run.meta["provenance"]["attention"]["executed"]``).

    ``execution``: ``"auto"``, ``"gathered"`` or ``"flex"`` (``"dense"`` is taken automatically, and
    only, when every block is kept). Raises ``ConfigError`` for another value.

    Example::

        lm = lens.load(attention=lens.Sparse(mode="hybrid", topk=0.1, topp=0.95, block_q=64, block_k=64))
        run = lens.trace(lm, texts)
        run.arrays["attn.kept_fraction"]                 # [layers, sequences, heads]
        run.meta["provenance"]["attention"]["executed"]  # e.g. {'gathered': 5, 'dense': 1}
    """

    #: sums per query group from the probabilities of the kept blocks (a VLM's text→image attention share)
    supports_query_weights = True

    def __init__(self, config: SparseConfig, *, compiled: bool = True, execution: str = "auto"):
        if execution not in EXECUTIONS or execution == "dense":
            raise ConfigError(
                f"execution must be 'auto', 'gathered' or 'flex' (dense SDPA runs by itself when a selection "
                f"keeps every block); got {execution!r}"
            )
        self.config = config
        self.compiled = compiled
        self.execution = execution
        #: calls per execution path since this kernel was created (lens.trace reports its own share)
        self.executed: Counter = Counter()
        #: calls since the last ``reset_tally()`` and how many of them kept every allowed block
        self.tally = {"calls": 0, "every_block_kept": 0}

    def reset_tally(self) -> None:
        """Start counting calls afresh (``lens.trace`` does at its start)."""
        self.tally = {"calls": 0, "every_block_kept": 0}

    def __call__(self, module, query, key, value, attention_mask, *, is_causal, scale, softcap, pattern_heads,
                 with_stats, query_weights=None):
        selection = select_blocks(query, key, self.config, attention_mask=attention_mask, is_causal=is_causal,
                                  scale=scale)
        path = choose_execution(query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal,
                                scale=scale, softcap=softcap, compiled=self.compiled, execution=self.execution)
        self.executed[path] += 1
        self.tally["calls"] += 1
        self.tally["every_block_kept"] += int(selection.skipped_fraction() <= 0.0)
        if not with_stats:
            out = sparse_attention(query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal,
                                   scale=scale, softcap=softcap, compiled=self.compiled, execution=path)
            return out, None
        return sparse_attention_with_stats(
            query, key, value, selection, attention_mask=attention_mask, is_causal=is_causal, scale=scale,
            softcap=softcap, pattern_heads=pattern_heads, compiled=self.compiled, execution=path,
            query_weights=query_weights,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "sparse",
            "kernel": "dense SDPA when every block is kept; else gathered-block SDPA or compiled FlexAttention "
                      "(execution=" + repr(self.execution) + ")",
            "execution": self.execution,
            **self.config.describe(),
        }

    def __repr__(self) -> str:
        return f"SparseAttention({self.config!r}, execution={self.execution!r})"


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


def _module_name(model, target) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ConfigError(f"{type(target).__name__} is not a submodule of {type(model).__name__}")


def quant_parts(lm) -> dict[str, str]:
    """The module-name prefixes ``quant=`` replaces layers under: the language model, plus — for a VLM loaded
    with ``deploy_vision=True`` — the vision tower and the projector.

    Example: ``quant_parts(vlm)`` → ``{"language_model": "model.language_model."}``.
    """
    model = lm.model
    parts = {"language_model": _module_name(model, lm.base) + "."}
    if lm.is_vlm and lm.deploy_vision:
        parts["vision_tower"] = _module_name(model, lm.vision_tower) + "."
        projector = _module_name(model, lm.projector) + "."
        if not projector.startswith(parts["vision_tower"]):  # Qwen2-VL's merger lives inside the tower
            parts["projector"] = projector
    return parts


def _include(lm, prefixes) -> Callable[[str, nn.Module], bool]:
    base = default_include(lm.model)
    prefixes = tuple(prefixes)
    return lambda name, module: base(name, module) and name.startswith(prefixes)


def vlm_calibration_batches(lm, calibration) -> tuple[list[dict], list]:
    """Calibration inputs of a VLM (strings and ``{"image": …, "text": …}`` items) → model batches of one
    sequence each and their image-token masks [1, T] (``token_groups`` of ``lens.kernels.lowbit``)."""
    import torch

    from lens.models.inputs import encode
    from lens.models.vision import layout_for

    encoded = encode(lm, list(calibration), truncate=True)
    batches, masks = [], []
    for i, ids in enumerate(encoded.ids):
        extras = (encoded.extras or [None] * len(encoded.ids))[i] or {}
        fields = {name: torch.tensor([rows[i]], dtype=torch.long) for name, rows in encoded.fields.items()}
        batch = {"input_ids": torch.tensor([ids], dtype=torch.long), **fields, **extras}
        layout = layout_for(lm, ids, {**extras, **fields})
        batches.append({k: v.to(lm.device) if hasattr(v, "to") else v for k, v in batch.items()})
        masks.append(torch.from_numpy(layout.image >= 0)[None].to(lm.device))
    return batches, masks


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
    if lm.is_vlm:
        return _quantize_vlm(lm, config, calibration=calibration, progress=progress)
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
    total = sum(p.numel() for p in lm.model.parameters())  # before: quantized layers hold buffers, not parameters
    report = quantize_model(lm.model, config, progress=progress, calibration=stats)
    if getattr(config, "activations", None) is not None:
        report["ggml_norms"] = len(use_ggml_norms(lm.model))
    # provenance keeps the totals; the per-module lists can run to hundreds of names on a real model
    summary = {k: v for k, v in report.items() if k not in ("per_module", "replaced", "config")}
    summary["skipped"] = len(report.get("skipped", []))
    summary.update(_unquantized_fused(lm.model, config.scheme, total))
    return config, summary


def _unquantized_fused(model, scheme: str, total: int) -> dict:
    """Warn about (and count, for provenance) weights ``quant=`` left in full precision because they are not
    linear layers: the fused [experts, out, in] tensors of transformers' MoE blocks (Mixtral, Qwen-MoE, OLMoE),
    which hold most of such a model's weights. ``total``: the model's parameter count before quantization.
    Returns ``{"unquantized_fused": n, "unquantized_fused_share": f}`` (empty when there are none)."""
    fused = [(name, p) for name, p in model.named_parameters() if p.ndim == 3 and p.is_floating_point()]
    if not fused:
        return {}
    share = sum(p.numel() for _, p in fused) / max(total, 1)
    import warnings

    warnings.warn(
        f"quant={scheme!r} replaces linear layers only: {len(fused)} fused 3-D weight tensors (e.g. {fused[0][0]}, "
        f"{share:.0%} of the weights; MoE experts) stay in full precision, so the deployed model is only partly "
        "quantized. Analyses of the experts describe their full-precision weights",
        LensWarning,
        stacklevel=3,
    )
    return {"unquantized_fused": len(fused), "unquantized_fused_share": round(share, 4)}


def _quantize_vlm(lm, config, *, calibration, progress: bool):
    """``quant=`` on a VLM: the language model's layers (and, with ``deploy_vision``, the vision tower's and the
    projector's). Smoothing calibrates on the inputs given — images and text — with the image tokens marked, so
    that the modality-aware variant gets separate factors for image and text tokens; the vision layers see only
    image tokens and get plain SmoothQuant factors."""
    import dataclasses

    parts = quant_parts(lm)
    stats = None
    include_all = _include(lm, parts.values())
    if config.smooth_alpha is not None:
        if not calibration:
            raise ConfigError(
                f"{config.scheme} with SmoothQuant smoothing needs calibration inputs: pass lens.load(..., quant=..., "
                "calibration=[{'image': img, 'text': '<image>…'}, 'some text', …]) — images and text"
            )
        batches, masks = vlm_calibration_batches(lm, calibration)
        if config.modality_aware and not any(bool(m.any()) for m in masks):
            raise ConfigError(
                "modality-aware smoothing calibrates separate factors for image and text tokens, but the calibration "
                "inputs hold no image; add {'image': …, 'text': …} items to calibration="
            )
        stats = calibrate(lm.model, batches, include=include_all, token_masks=masks if config.modality_aware else None)
    report = quantize_model(lm.model, config, progress=progress, calibration=stats,
                            include=_include(lm, [parts["language_model"]]))
    reports = {"language_model": report}
    vision = [p for k, p in parts.items() if k != "language_model"]
    if vision:
        vision_config = dataclasses.replace(config, modality_aware=False) if config.modality_aware else config
        reports["vision"] = quantize_model(lm.model, vision_config, progress=progress, calibration=stats,
                                           include=_include(lm, vision))
    summary = {k: v for k, v in report.items() if k not in ("per_module", "replaced", "config", "skipped")}
    summary["skipped"] = len(report.get("skipped", []))
    summary["parts"] = {}
    for name, rep in reports.items():
        prefixes = [parts["language_model"]] if name == "language_model" else vision
        summary["parts"][name] = {
            "prefixes": prefixes, "scheme": rep["scheme"], "n_replaced": rep["n_replaced"],
            "bits_per_weight": rep["bits_per_weight"], "weight_bytes_before": rep["weight_bytes_before"],
            "weight_bytes_after": rep["weight_bytes_after"],
        }
    summary["n_replaced"] = sum(rep["n_replaced"] for rep in reports.values())
    if stats is not None:
        lm_stats = [st for name, st in stats.items() if name.startswith(parts["language_model"])]
        grouped = [st for st in lm_stats if st.group_amax is not None]
        summary["calibration"] = {
            "inputs": len(calibration), "modality_aware": bool(config.modality_aware),
            "image_tokens": int(max((st.group_tokens[1] for st in grouped), default=0)),
            "text_tokens": int(max((st.group_tokens[0] for st in grouped), default=0)),
        }
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
