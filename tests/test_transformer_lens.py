"""TransformerLens interop: a TransformerBridge goes into lens.load and both keep working."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import lens

bridge_module = pytest.importorskip("transformer_lens.model_bridge")


@pytest.mark.parametrize("kind", ["gpt2", "qwen2"])
def test_bridge_gives_the_same_run_and_keeps_working(kind, tiny_model_dir):
    folder = tiny_model_dir(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    bridge = bridge_module.TransformerBridge.boot_transformers(str(folder), hf_model=hf, tokenizer=tokenizer, device="cpu")
    ids = torch.tensor([tokenizer("Attention sinks appear on the first token.")["input_ids"]])
    logits_before, cache_before = bridge.run_with_cache(ids)

    lm = lens.load(bridge)
    assert lm.source == "transformer_lens.TransformerBridge"
    # weights are shared, not copied
    assert lm.model.get_input_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    run = lens.trace(lm, ids, progress=False)
    reference = lens.trace(lens.load(folder), ids, progress=False)
    for name in ("attn.key_mass", "resid.norm", "resid.spectrum_raw", "mlp.sum"):
        np.testing.assert_allclose(run.arrays[name], reference.arrays[name], rtol=1e-5, atol=1e-6, err_msg=name)

    # the bridge is untouched: same logits, and its own pattern hooks still see the same probabilities
    logits_after, cache_after = bridge.run_with_cache(ids)
    torch.testing.assert_close(logits_after, logits_before)
    pattern = cache_after["blocks.0.attn.hook_pattern"][0]
    torch.testing.assert_close(pattern, cache_before["blocks.0.attn.hook_pattern"][0])
    # and lens's streaming column sums equal the bridge's materialized patterns
    np.testing.assert_allclose(run.arrays["attn.key_mass"][0], pattern.sum(1).numpy(), atol=1e-5)
