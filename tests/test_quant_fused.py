"""``quant=`` on a model whose MoE experts are fused 3-D tensors (transformers' Mixtral, Qwen2-MoE): those are
not linear layers, so the scheme leaves them in full precision — lens says so and records it in provenance
instead of presenting a partly quantized model as quantized (noticed at stop 24: an int8 Mixtral scan equalled
the dense one)."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_scan_moe import _bpe_tokenizer, _config

import lens
from lens.errors import LensWarning


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_folder(request, tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_config(request.param))
    folder = tmp_path_factory.mktemp(f"fused-{request.param}")
    model.save_pretrained(folder)
    _bpe_tokenizer("llama").save_pretrained(folder)
    fused = {n: p.numel() for n, p in model.named_parameters() if p.ndim == 3}
    return folder, fused, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scheme", ["int8", "nvfp4", "int4"])
def test_fused_expert_weights_left_in_full_precision_are_warned_and_recorded(moe_folder, scheme):
    folder, fused, total = moe_folder
    assert fused, "transformers' MoE blocks should hold fused [experts, out, in] weights"
    with pytest.warns(LensWarning, match=rf"{scheme}.*{len(fused)} fused 3-D weight tensors.*full precision"):
        lm = lens.load(folder, quant=scheme)
    report = lm.provenance()["quant_report"]
    assert report["unquantized_fused"] == len(fused)
    assert report["unquantized_fused_share"] == pytest.approx(sum(fused.values()) / total, abs=1e-4)
    kept = {n: p for n, p in lm.model.named_parameters() if n in fused}
    assert len(kept) == len(fused) and all(p.dtype == torch.float32 for p in kept.values())


def test_a_dense_model_quantizes_without_that_warning(tiny_model_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LensWarning)
        lm = lens.load(tiny_model_dir("llama"), quant="int8")
    assert "unquantized_fused" not in lm.provenance()["quant_report"]
