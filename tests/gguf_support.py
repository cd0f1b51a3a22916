"""Writing tiny Hugging Face models as GGUF files with the ``gguf`` package's ``GGUFWriter``, for tests.

``write_gguf(model, tokenizer, path, arch, qtypes)`` writes what llama.cpp's ``convert_hf_to_gguf.py`` would
write for these architectures (tensor names from ``gguf.get_tensor_name_map``; llama/mistral query and key
rows permuted the way llama.cpp expects; GPT-2's Conv1D weights transposed to [out, in]; Gemma's RMSNorm
weights stored as 1 + w), quantizing 2-D weights with ``gguf.quantize`` to the types given in turn. It also
returns the *reference* state dict: every HF parameter as the file encodes it (the dequantized blocks, the
norm offset undone in float32), so that the same weights can be saved as safetensors and loaded the usual way.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# transformers' model_type → llama.cpp architecture written in general.architecture
ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
        "gemma3_text": "gemma3", "gpt2": "gpt2"}
_FLOAT_TYPES = {"F32", "F16", "BF16"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Llama's q/k projections (it rotates interleaved pairs; HF rotates halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _encode(gguf, array: np.ndarray, qtype: str):
    """(data for GGUFWriter.add_tensor, raw_dtype or None, the values the file encodes as float32)."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == "F32":
        return a, None, a
    if qtype == "F16":
        h = a.astype(np.float16)
        return h, None, h.astype(np.float32)
    t = gguf.GGMLQuantizationType[qtype]
    q = gguf.quantize(a, t)
    return q, t, gguf.dequantize(q, t).astype(np.float32).reshape(a.shape)


def _tokenizer_metadata(writer, tokenizer, add_bos: bool) -> None:
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    specials = {t["id"]: t["content"] for t in data.get("added_tokens", [])}
    for i, content in specials.items():
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
        tokens[i] = content
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(add_bos)


def _hparams(writer, config, model_type: str) -> None:
    if model_type == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", 10000.0)
    writer.add_rope_freq_base(float(theta))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if model_type in ("llama", "mistral"):
        writer.add_rope_dimension_count(head_dim)
    if model_type.startswith("gemma"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(config.sliding_window)
    writer.add_vocab_size(config.vocab_size)


def write_gguf(model, tokenizer, path: Path, qtypes=("F32",), *, add_bos: bool = False, name: str = "tiny"):
    """Write ``model`` (a tiny HF causal LM) and ``tokenizer`` (byte-level BPE) as a GGUF file at ``path``.

    ``qtypes``: GGML type names assigned to the 2-D weights in turn (norms, biases and 1-D tensors stay F32).
    Returns ``(reference_state_dict, tensor_types)`` — the HF parameters as the file encodes them, and the
    type written per GGUF tensor.
    """
    import gguf

    config = model.config
    model_type = config.model_type
    arch = ARCH[model_type]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("Mistral tiny" if model_type == "mistral" else name)  # as llama.cpp names them: loads as llama
    _hparams(writer, config, model_type)
    _tokenizer_metadata(writer, tokenizer, add_bos)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(arch_enum, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head = getattr(config, "num_attention_heads", None)
    n_kv = getattr(config, "num_key_value_heads", None)
    reference: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    turn = 0
    for hf_name, param in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith(".attn.bias") or hf_name.endswith(".masked_bias"):  # GPT-2's causal-mask buffers
            continue
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        assert gguf_base is not None, f"no GGUF name for {hf_name}"
        gguf_name = f"{gguf_base}.{suffix}"
        w = param.detach().float().numpy()
        conv1d = model_type == "gpt2" and w.ndim == 2 and any(k in gguf_name for k in ("attn_qkv", "attn_output", "ffn_up", "ffn_down"))
        if conv1d:
            w = w.T  # GGUF keeps [out, in]; HF's Conv1D keeps [in, out]
        permuted = None
        if model_type in ("llama", "mistral") and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            permuted = n_head if "attn_q" in gguf_name else n_kv
            w = _permute(w, permuted)
        norm_offset = model_type.startswith("gemma") and "norm.weight" in gguf_name
        if norm_offset:
            w = w + np.float32(1.0)
        qtype = "F32"
        if w.ndim == 2 and w.shape[-1] % 32 == 0 and "norm" not in gguf_name:
            qtype = qtypes[turn % len(qtypes)]
            turn += 1
        data, raw_dtype, encoded = _encode(gguf, w, qtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
        types[gguf_name] = qtype
        # the reference: what a reader of the file gets back, in HF's layout
        if norm_offset:
            encoded = encoded - np.float32(1.0)
        if permuted is not None:
            n = permuted
            encoded = encoded.reshape(n, encoded.shape[0] // n // 2, 2, *encoded.shape[1:]).swapaxes(2, 1).reshape(encoded.shape)
        if conv1d:
            encoded = encoded.T
        reference[hf_name] = torch.from_numpy(np.ascontiguousarray(encoded)).to(param.dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if tied and "lm_head.weight" in model.state_dict():
        reference["lm_head.weight"] = reference[next(k for k in reference if k.endswith("embed_tokens.weight") or k.endswith("wte.weight"))]
    return reference, types
