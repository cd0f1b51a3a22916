"""``quant="keep"``: a GGUF model whose linear layers hold the file's own blocks, packed, not fp32 copies.

``lens.load("model.gguf", quant="keep")`` first loads the model as usual (transformers dequantizes every
tensor; lens's cache makes that fast), then replaces each linear layer whose GGUF tensor is stored in a block
format (Q4_0 … Q8_0, Q2_K … Q6_K) by a ``QuantLinear`` around *that tensor's bytes* — wrapped by
``lens.kernels.lowbit.packed_from_gguf``, never re-quantized — and the token embedding by an embedding that
dequantizes only the rows it looks up. Resident weights then take about the file's size instead of 4–6× it.

Layout: transformers undoes llama.cpp's layout changes while dequantizing (Llama's query/key rows are
permuted for llama.cpp's RoPE; GPT-2's Conv1D weights are transposed). Row permutations move whole block
rows, so they apply to the packed bytes too: lens asks transformers' own tensor processor where each row goes
(by passing it the row indices) and reorders the rows of blocks accordingly. Every kept tensor is then
dequantized by lens's codec and compared with the weight transformers built — they must be equal bit for bit,
or the load fails naming the tensor — so "keep" can never silently change a model.

With ``activations="llama.cpp"`` each kept layer also quantizes its input rows as llama.cpp's CPU matmul does
(the weight type's ``vec_dot_type``), F16/BF16 weights get their input rounded to f16/bf16 (their
``vec_dot_type``), and ``lens.models.llamacpp.LlamaCppAttention`` emulates the f16 KV cache.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from lens.kernels.lowbit import (
    GGUF_WEIGHT_TYPES,
    VEC_DOT_TYPE,
    QuantConfig,
    QuantLinear,
    dequantize_gguf,
    gguf_select_rows,
    packed_from_gguf,
    quantize_activations,
)
from torch import nn

from lens.errors import ConfigError

__all__ = ["KeepGGUF", "PackedEmbedding", "keep_gguf_blocks"]


@dataclass(frozen=True)
class KeepGGUF:
    """The ``quant="keep"`` configuration: the GGUF file's own blocks, optionally with llama.cpp's activations.

    Example: ``KeepGGUF(activations="llama.cpp").describe()["scheme"]`` → ``"keep"``.
    """

    activations: str | None = None
    scheme: str = "keep"

    def describe(self) -> dict[str, Any]:
        return {
            "scheme": "keep",
            "activations": self.activations,
            "definition": "the GGUF file's own block-quantized tensors, packed (llama.cpp ggml-quants.c layouts)"
            + ("; inputs quantized to each type's vec_dot_type as llama.cpp's CPU matmul does, RMSNorm as ggml "
               "computes it" if self.activations else ""),
        }


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` over a packed GGUF table: looks up ids by dequantizing only their rows.

    ``packed``: a ``PackedWeight`` of shape ``(num_embeddings, embedding_dim)`` (e.g. ``token_embd`` in Q8_0),
    shared with a tied output layer when there is one. Output float32 ``[..., embedding_dim]``.
    """

    def __init__(self, packed, padding_idx: int | None = None, embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed
        self.num_embeddings, self.embedding_dim = packed.shape
        self.padding_idx = padding_idx
        self.register_buffer("blocks", packed.data["blocks"], persistent=False)  # counted as resident
        # Gemma's ScaledWordEmbedding multiplies by √d inside the embedding module
        self.register_buffer("embed_scale", None if embed_scale is None else embed_scale.detach().clone(),
                             persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = dequantize_gguf(self.packed, rows=input_ids)  # only the rows looked up, as llama.cpp's get_rows
        return out if self.embed_scale is None else out * self.embed_scale.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, scheme={self.packed.scheme}"


def _processor(architecture: str, config) -> Any:
    """transformers' tensor processor for this GGUF architecture (what it does to a tensor while loading)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    text = getattr(config, "text_config", None) or config
    params = {"num_attention_heads": getattr(text, "num_attention_heads", None),
              "num_key_value_heads": getattr(text, "num_key_value_heads", None)}
    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=params)


def _row_order(processor, name: str, rows: int):
    """Where transformers puts each row of a GGUF matrix: an index array, or None if it keeps the order, or
    ``"transposed"`` when it transposes the matrix (GPT-2's Conv1D weights)."""
    import numpy as np

    index = np.arange(rows, dtype=np.float64)[:, None]
    out = processor.process(weights=index, name=name, tensor_key_mapping={}, parsed_parameters={"tensors": {}})
    moved = np.asarray(out.weights)
    if moved.shape == (1, rows):
        return "transposed"
    order = moved[:, 0].astype(np.int64)
    return None if np.array_equal(order, np.arange(rows)) else order


def _known_embedding(module: nn.Module) -> bool:
    """A plain lookup, or Gemma's lookup × ``embed_scale`` — the embeddings ``PackedEmbedding`` reproduces."""
    return type(module) is nn.Embedding or (type(module).__name__.endswith("ScaledWordEmbedding")
                                            and isinstance(getattr(module, "embed_scale", None), torch.Tensor))


def _hf_weight_map(model, architecture: str) -> dict[str, str]:
    """GGUF tensor name → the model's parameter name, from gguf-py's tensor-name table for the architecture.

    transformers' ``get_gguf_hf_weights_map`` does the same but rebuilds the table for every submodule (seconds
    per call on a 30-layer model); one table covers the dense families lens loads.
    """
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise ConfigError(f"quant='keep': gguf-py has no tensor-name table for architecture {architecture!r}")
    text = getattr(model.config, "text_config", None) or model.config
    table = gguf.get_tensor_name_map(arch, int(text.num_hidden_layers))
    mapping = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        base, _, suffix = name.rpartition(".")
        gguf_base = table.get_name(base)
        if gguf_base is not None:
            mapping.setdefault(f"{gguf_base}.{suffix}", name)
    return mapping


def _tensors(lm, path):
    """``(architecture, [(name, type name, GGUF shape ne, uint8 bytes)])`` of the file: from the layout lens's
    cache recorded for it (no metadata parsing), else read with ``gguf.GGUFReader``."""
    import numpy as np

    from lens.models.gguf import cached_dequantized_folder, manifest_info

    folder = cached_dequantized_folder((lm.gguf or {}).get("sha256", ""))
    info = manifest_info(folder) if folder is not None else None
    if info is not None and info.tensor_layout:
        blob = np.memmap(path, dtype=np.uint8, mode="r")
        return info.architecture, [
            (name, info.tensor_types[name].lower(), shape, blob[offset:offset + n])
            for name, (offset, n, shape) in info.tensor_layout.items()
        ]
    import gguf

    reader = gguf.GGUFReader(str(path))
    architecture = str(reader.fields["general.architecture"].contents())
    return architecture, [(t.name, t.tensor_type.name.lower(), tuple(int(d) for d in t.shape.tolist()), t.data)
                          for t in reader.tensors]


def _round_input_hook(vec_dot_type: str):
    """llama.cpp converts a float weight's input rows to the weight's own type (its ``vec_dot_type``)."""

    def hook(_module, args):
        return (quantize_activations(args[0], vec_dot_type).to(args[0].dtype),) + tuple(args[1:])

    return hook


def keep_gguf_blocks(lm, path, *, activations: str | None = None) -> dict[str, Any]:
    """Replace ``lm``'s linear layers (and token embedding) by the GGUF file's own packed blocks, in place.

    Returns the report recorded in provenance (``quant_report``): tensors kept per type, weights, packed
    weight bytes and bits/weight, the model's resident bytes after, the file's size, tensors left dequantized.
    Raises ``ConfigError`` when a kept tensor does not dequantize to the weight transformers loaded.
    """
    from pathlib import Path

    architecture, tensors = _tensors(lm, path)
    processor = _processor(architecture, lm.model.config)
    name_map = _hf_weight_map(lm.model, architecture)
    model = lm.model
    kept: dict[str, str] = {}
    rounded: dict[str, str] = {}
    left: list[str] = []
    packed_by_tensor: dict[str, Any] = {}
    for tensor_name, type_name, shape, data in tensors:
        hf_name = name_map.get(tensor_name)
        if hf_name is None or not hf_name.endswith(".weight") or len(shape) != 2:
            continue
        module_name = hf_name.removesuffix(".weight")
        module = model.get_submodule(module_name)
        if type_name not in GGUF_WEIGHT_TYPES:
            if activations and type_name in ("f16", "bf16") and isinstance(module, nn.Linear):
                module.register_forward_pre_hook(_round_input_hook(VEC_DOT_TYPE[type_name]))
                rounded[module_name] = type_name
            elif type_name not in ("f32", "f16", "bf16"):
                left.append(f"{tensor_name} ({type_name.upper()})")
            continue
        out_f, in_f = int(shape[1]), int(shape[0])
        packed = packed_from_gguf(data, type_name, (out_f, in_f))
        order = _row_order(processor, tensor_name, out_f)
        if isinstance(order, str):  # transposed into a Conv1D weight [in, out]: the blocks stay [out, in]
            reference = module.weight.detach().T
        else:
            if order is not None:  # whole rows of blocks move; nothing is re-quantized
                packed = gguf_select_rows(packed, torch.from_numpy(order))
            reference = module.weight.detach()
        if not torch.equal(dequantize_gguf(packed), reference.to(torch.float32)):
            raise ConfigError(
                f"quant='keep': the blocks of {tensor_name} do not dequantize to the weight transformers loaded for "
                f"{module_name}; lens cannot keep this file's layout for {architecture!r}. Load it without quant='keep'."
            )
        if isinstance(module, nn.Embedding) and not _known_embedding(module):
            left.append(f"{tensor_name} ({type_name.upper()}; {type(module).__name__} does more than a lookup)")
            continue
        packed_by_tensor[module_name] = packed
        if isinstance(module, nn.Embedding):
            model.set_submodule(module_name, PackedEmbedding(packed, module.padding_idx,
                                                             getattr(module, "embed_scale", None)))
        else:
            bias = getattr(module, "bias", None)
            layer = QuantLinear.from_packed(packed, bias=None if bias is None else bias.detach(),
                                            config=QuantConfig(type_name, activations=activations))
            model.set_submodule(module_name, layer)
        kept[module_name] = type_name
    _keep_tied_head(model, packed_by_tensor, kept, activations)
    if not kept:
        raise ConfigError(f"quant='keep': {path} holds no tensor in a block format lens packs "
                          f"({', '.join(GGUF_WEIGHT_TYPES)}); load it without quant='keep'")
    from lens.kernels.lowbit import resident_bytes

    weights = sum(p.shape[0] * p.shape[1] for p in {id(p): p for p in packed_by_tensor.values()}.values())
    weight_bytes = sum(p.data["blocks"].numel() for p in {id(p): p for p in packed_by_tensor.values()}.values())
    return {
        "kept": len(kept),
        "kept_types": dict(Counter(kept.values())),
        "weights": int(weights),
        "weight_bytes_after": int(weight_bytes),
        "bits_per_weight": 8.0 * weight_bytes / max(weights, 1),
        "model_bytes_after": int(resident_bytes(model)),
        "file_bytes": Path(path).stat().st_size,
        "inputs_rounded": rounded,
        "left_dequantized": left,
        "activations": activations,
    }


def _keep_tied_head(model, packed_by_tensor, kept, activations) -> None:
    """An output layer tied to the embedding (no ``output.weight`` in the file) shares the embedding's blocks,
    as in llama.cpp, which multiplies by ``token_embd`` itself."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inputs = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(head, nn.Linear) or not isinstance(inputs, PackedEmbedding):
        return
    if tuple(head.weight.shape) != (inputs.num_embeddings, inputs.embedding_dim):
        return
    name = next(n for n, m in model.named_modules() if m is head)
    if name in kept:
        return
    if not torch.equal(dequantize_gguf(inputs.packed), head.weight.detach().float()):
        return  # an untied head with its own float weight: leave it
    layer = QuantLinear.from_packed(inputs.packed, bias=None if head.bias is None else head.bias.detach(),
                                    config=QuantConfig(inputs.packed.scheme, activations=activations))
    model.set_submodule(name, layer)
    kept[name] = inputs.packed.scheme
