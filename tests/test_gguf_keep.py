"""``quant="keep"``: a GGUF file's own blocks kept packed (lens.kernels.lowbit's codecs), and GGUF schemes on any model.

For every family, the tiny GGUF files of tests/test_gguf_load.py loaded with ``quant="keep"`` must give the same
outputs as the dequantized model (the packed blocks dequantize bit for bit to transformers' weights — Llama's
permuted query/key rows and GPT-2's transposed Conv1D weights included) while holding the quantized tensors
packed. On SmolLM2, resident weights must be about the file's size, not the fp32 model's 5.6×.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf_load import FAMILIES, TEXTS, gguf_family  # noqa: F401  (the session fixture)

import lens
from lens.bench.gguf import resident_weight_bytes
from lens.errors import ConfigError
from lens.kernels.lowbit import QuantLinear
from lens.models.gguf_keep import PackedEmbedding


@pytest.mark.parametrize("kind", FAMILIES)
def test_keep_equals_dequantized(kind, gguf_family):
    path, _, _, types = gguf_family(kind)
    dense = lens.load(path)
    kept = lens.load(path, quant="keep")
    packed_types = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}
    n_packed = sum(t in packed_types for t in types.values())
    report = kept.quant_report
    assert report["kept"] >= n_packed and report["left_dequantized"] == []
    assert any(isinstance(m, QuantLinear) for m in kept.model.modules())
    assert resident_weight_bytes(kept.model) < resident_weight_bytes(dense.model)
    for text in TEXTS:
        ids = torch.tensor([dense.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            torch.testing.assert_close(kept.model(ids).logits, dense.model(ids).logits, rtol=1e-4, atol=1e-4)
    run = lens.trace(kept, TEXTS, progress=False, capture=("attention", "residual", "logits"))
    assert run.provenance["quant"]["scheme"] == "keep"
    assert run.provenance["gguf"]["tensor_types"] == types


def test_keep_reads_blocks_through_the_cached_layout(gguf_family, tmp_path, monkeypatch):
    """With a cache entry, quant="keep" maps the file's bytes from the recorded layout instead of parsing the
    metadata again — and gets the same layers."""
    import gguf

    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    path, *_ = gguf_family("qwen2")
    parsed = lens.load(path, quant="keep")
    lens.load(path, cache=True)
    calls = []
    real = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: calls.append(a) or real(*a, **k))
    from_layout = lens.load(path, quant="keep")
    assert calls == [], "the cached layout should make the metadata parse unnecessary"
    assert from_layout.quant_report["kept_types"] == parsed.quant_report["kept_types"]
    ids = torch.tensor([parsed.tokenizer(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(from_layout.model(ids).logits, parsed.model(ids).logits, rtol=0, atol=0)


def test_keep_smollm2_resident_bytes_near_file_size(smollm2):
    from lens.models.embedded import smollm2_gguf_path

    kept = lens.load("smollm2", quant="keep")
    size = smollm2_gguf_path(fetch=False).stat().st_size
    resident = resident_weight_bytes(kept.model)
    dense = resident_weight_bytes(smollm2.model)
    assert 0.9 * size < resident < 1.02 * size, (resident, size)
    assert dense > 5 * resident
    report = kept.quant_report
    assert report["kept_types"] == {"q4_1": 210, "q8_0": 2}  # token_embd serves the embedding and the tied head
    assert isinstance(kept.model.get_input_embeddings(), PackedEmbedding)
    head = kept.model.get_output_embeddings()
    assert head.packed.data["blocks"].data_ptr() == kept.model.get_input_embeddings().blocks.data_ptr()
    ids = torch.tensor([smollm2.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        a, b = kept.model(ids).logits, smollm2.model(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-4)
    assert a[0, -1].argmax() == b[0, -1].argmax()


def test_keep_needs_a_gguf_file(tiny_model_dir):
    with pytest.raises(ConfigError, match="keep"):
        lens.load(tiny_model_dir("llama"), quant="keep")
    with pytest.raises(ConfigError, match="llama.cpp"):
        lens.load(tiny_model_dir("llama"), activations="llama.cpp")
    with pytest.raises(ConfigError):
        lens.load(tiny_model_dir("llama"), quant="q8_0", activations="llama.cpp", attention="streaming")


def test_gguf_schemes_on_a_dense_model_compare_with_its_gguf_file(gguf_family):
    """A dense model quantized to a GGUF type by lens, beside the same weights from a GGUF file, in lens.compare."""
    path, reference, _, _ = gguf_family("llama")
    from_file = lens.load(path, quant="keep")
    requantized = lens.load(reference, quant="q8_0")
    assert requantized.quant.scheme == "q8_0"
    a = lens.trace(from_file, TEXTS, keep_hidden="all", progress=False)
    b = lens.trace(requantized, TEXTS, keep_hidden="all", progress=False)
    result = lens.compare(a, b)
    assert np.isfinite(result.hidden_cosine).all() and np.nanmin(result.hidden_cosine) > 0.9
    emulated = lens.load(reference, quant="q4_0", activations="llama.cpp")
    assert emulated.provenance()["attention"]["kv_cache"] == "f16"
    assert emulated.provenance()["quant"]["activations"] == "llama.cpp"
