"""GGUF files through ``lens.load``: every family transformers reads from GGUF and lens has a row for.

For each family a tiny random model is written with ``gguf``'s ``GGUFWriter`` (several GGML types in one file:
Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, F16 and F32, quantized by ``gguf.quantize``), loaded through ``lens.load(file)``,
and compared with the *same weights* loaded from safetensors: the HF model whose parameters are the values the
file encodes (``gguf.dequantize`` of each block, in HF's layout). Hidden states, attention statistics and
logits must agree; the original (unquantized) weights must not — the file really is quantized.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import _bpe_tokenizer, tiny_config
from gguf_support import write_gguf

import lens
from lens.errors import ModelLoadError, UnsupportedModelError
from lens.models.gguf import gguf_supported_architectures, read_gguf_info

QTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "F16", "F32")
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks appear on the first token of many layers."]


def _config(kind: str):
    common = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128)
    if kind == "qwen3":
        # transformers reads no head_dim from a qwen3 GGUF file and takes Qwen3's default (128), as real Qwen3 has
        return tf.Qwen3Config(vocab_size=320, max_position_embeddings=256, num_key_value_heads=2, head_dim=128, **common)
    if kind == "gemma3":
        return tf.Gemma3TextConfig(vocab_size=320, max_position_embeddings=256, num_key_value_heads=2, head_dim=16,
                                   sliding_window=8, **common)
    if kind == "gpt2":
        # transformers maps a gpt2 file's context length to n_ctx, not n_positions: GPT-2's own 1024 loads
        return tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=1024, vocab_size=320, bos_token_id=0,
                             eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return tiny_config(kind)


@pytest.fixture(scope="session")
def gguf_family(tmp_path_factory):
    """``gguf_family(kind)`` → (gguf path, reference folder, original folder, tensor types), built once."""
    built = {}

    def get(kind):
        if kind not in built:
            folder = tmp_path_factory.mktemp(f"gguf-{kind}")
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(_config(kind)).eval()
            tokenizer = _bpe_tokenizer("gpt2" if kind == "gpt2" else "llama")
            model.save_pretrained(folder / "original")
            tokenizer.save_pretrained(folder / "original")
            path = folder / f"tiny-{kind}.gguf"
            reference, types = write_gguf(model, tokenizer, path, QTYPES, add_bos=kind != "gpt2")
            model.load_state_dict(reference)
            model.save_pretrained(folder / "reference")
            tokenizer.save_pretrained(folder / "reference")
            built[kind] = (path, folder / "reference", folder / "original", types)
        return built[kind]

    return get


def _logits(lm, texts):
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
            out.append(lm.model(ids).logits[0])
    return out


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_family_equals_dequantized_safetensors(kind, gguf_family):
    path, reference, original, types = gguf_family(kind)
    assert len(set(types.values()) - {"F32"}) >= 5, "the file should mix several GGML types"
    lm = lens.load(path)
    ref = lens.load(reference)
    orig = lens.load(original)
    assert lm.family.name == ref.family.name
    # same tokens from the tokenizer rebuilt out of the file's metadata
    for text in TEXTS:
        assert lm.tokenizer(text)["input_ids"] == ref.tokenizer(text)["input_ids"]
    run = lens.trace(lm, TEXTS, keep_hidden="all", progress=False)
    run_ref = lens.trace(ref, TEXTS, keep_hidden="all", progress=False)
    for layer in range(lm.n_layers + 1):
        np.testing.assert_allclose(run.arrays[f"resid.hidden.{layer}"], run_ref.arrays[f"resid.hidden.{layer}"],
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run.arrays["attn.key_mass"], run_ref.arrays["attn.key_mass"], rtol=1e-5, atol=1e-6)
    deltas = []
    for a, b, c in zip(_logits(lm, TEXTS), _logits(ref, TEXTS), _logits(orig, TEXTS)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        deltas.append(float((a - c).abs().max()))
    assert max(deltas) > 1e-3, "the quantized file should not reproduce the unquantized weights"
    # provenance: the file's hash and its per-tensor types
    gguf = run.provenance["gguf"]
    assert gguf["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert gguf["tensor_types"] == types
    assert gguf["type_counts"] == dict(collections.Counter(types.values()))
    assert run.provenance["source"] == "gguf" and run.provenance["revision"] == f"sha256:{gguf['sha256']}"


def test_gguf_folder_with_gguf_file_and_cache(gguf_family, tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    path, reference, _, types = gguf_family("llama")
    by_folder = lens.load(path.parent, gguf_file=path.name)
    assert by_folder.gguf["sha256"] == read_gguf_info(path).sha256
    assert not (tmp_path / "cache").exists(), "a user's GGUF file is not cached unless asked"
    cached = lens.load(path, cache=True)
    entry = tmp_path / "cache" / "gguf-dequantized" / cached.gguf["sha256"]
    assert (entry / "model.safetensors").is_file() and (entry / "lens-gguf.json").is_file()
    again = lens.load(path)  # an existing entry is used without asking
    assert again.gguf == cached.gguf == by_folder.gguf
    from lens.models.gguf import manifest_info

    assert manifest_info(entry).tensor_layout == read_gguf_info(path).tensor_layout  # where each tensor's bytes are
    fresh = lens.load(path, cache=False)  # dequantized from the file again, the entry ignored
    assert fresh.gguf == again.gguf
    ids = torch.tensor([by_folder.tokenizer(TEXTS[1])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, by_folder.model(ids).logits, rtol=0, atol=0)


def test_gguf_info_reports_types(gguf_family):
    path, _, _, types = gguf_family("qwen2")
    info = read_gguf_info(path)
    assert info.tensor_types == types and info.architecture == "qwen2" and info.model_type == "qwen2"
    frame = info.to_frame("types")
    assert set(frame["type"]) == set(types.values())
    assert frame["share"].sum() == pytest.approx(1.0)
    assert "Q4_1" in repr(info) and info.sha256[:12] in repr(info)


def _minimal_gguf(path, arch: str):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch", ["phi3", "starcoder2", "bert", "gptneox", "gemma"])
def test_gguf_unsupported_architecture_raises(arch, tmp_path):
    path = _minimal_gguf(tmp_path / f"{arch}.gguf", arch)
    with pytest.raises(UnsupportedModelError) as info:
        lens.load(path)
    message = str(info.value)
    assert arch in message and "llama" in message  # names the file's architecture and what lens loads


def test_gguf_supported_architectures_cover_the_families():
    assert {"llama", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2"} <= set(gguf_supported_architectures())


def test_gguf_bad_files_raise_model_load_error(tmp_path, gguf_family):
    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        lens.load(tmp_path / "missing.gguf")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file")
    with pytest.raises(ModelLoadError, match="magic"):
        lens.load(not_gguf)
    path, *_ = gguf_family("llama")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError):
        lens.load(truncated)
    with pytest.raises(lens.ConfigError):
        lens.load(object(), gguf_file="x.gguf")
