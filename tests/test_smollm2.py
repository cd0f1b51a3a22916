"""The embedded decoder, SmolLM2-135M-Instruct (Q4_1 GGUF): the phenomena lens exists for, on a real model.

Traced by lens, SmolLM2 shows what tiny random models cannot: attention sinks on the first token in most layers,
a first token whose norm is two orders of magnitude above the others' from layer 12 on, massive activations
(|x| ≈ 2·10⁴, ≈ 10⁴× the median) and a compression valley in mid-depth. The sink scores are cross-checked
against Hugging Face's eager attention (``output_attentions``) on the same weights and token ids.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import transformers
from conftest import SMOLLM2_TEXTS

import lens
from lens.models.embedded import SMOLLM2_FILE, smollm2_folder, smollm2_gguf_path


def test_smollm2_is_the_verified_file(smollm2):
    path = smollm2_gguf_path(fetch=False)
    assert path.stat().st_size == SMOLLM2_FILE.member_size
    assert smollm2.gguf["sha256"] == SMOLLM2_FILE.member_sha256
    assert smollm2.gguf["type_counts"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert smollm2.gguf["tensor_types"]["token_embd.weight"] == "Q8_0"
    assert (smollm2.n_layers, smollm2.d_model, smollm2.n_heads, smollm2.n_kv_heads) == (30, 576, 9, 3)
    manifest = json.loads((smollm2_folder(fetch=False) / "lens-gguf.json").read_text())
    assert manifest["gguf"]["sha256"] == SMOLLM2_FILE.member_sha256
    assert smollm2.provenance()["source"] == "embedded"


def test_smollm2_answers(smollm2):
    """The dequantized model is the real instruct model, not noise: it answers a factual question."""
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in smollm2.tokenizer.decode(out[0, ids.shape[1]:])


def test_smollm2_phenomena(smollm2_run):
    run = smollm2_run
    sinks = lens.sinks(run)
    n_layers = run.meta["n_layers"]
    middle = sinks.sink_rate[n_layers // 4 : 3 * n_layers // 4 + 1]
    # attention sinks: most heads of the middle layers put ≥ 0.3 of their attention on token 0
    assert middle.mean() >= 0.8 and (middle >= 0.8).mean() >= 0.8, sinks.sink_rate
    # the first token's norm is far above the others' in some layer (≈ 160× from layer 12 on)
    ratio = np.nanmin(sinks.first_norm_ratio, axis=1)  # the weakest sequence
    assert ratio.max() >= 50, ratio
    # massive activations (Sun et al.): |x| > 100 and > 1000× the median, on the first token
    massive = sinks.to_frame("massive")
    hits = massive[massive["is_massive"]]
    assert len(hits) and hits["abs_value"].max() > 1e4 and set(hits["position"]) == {0}
    # an interior compression valley, well below both ends
    valley = lens.valley(run)
    h = valley.mean("entropy_raw_normalized")
    assert 2 <= valley.valley_layer <= n_layers - 2, valley.valley_layer
    assert h[valley.valley_layer] < 0.5 * min(h[0], h[-1]), h
    # the massive-activation bound holds and is tight in the valley (Queipo-de-Llano et al.)
    bound = valley.mean("entropy_upper_bound_normalized")
    assert np.all(h <= bound + 1e-6)
    assert bound[valley.valley_layer] - h[valley.valley_layer] < 0.01


def test_smollm2_sink_scores_match_hf_eager(smollm2, smollm2_run):
    """Sink scores from lens's streaming kernel = mean over queries of HF eager's A[ℓ, h, q, 0]."""
    eager = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_folder(fetch=False)),
                                                              attn_implementation="eager").eval()
    sinks = lens.sinks(smollm2_run)
    for seq in range(len(SMOLLM2_TEXTS)):
        ids = torch.from_numpy(smollm2_run.arrays["token_ids"][smollm2_run.span(seq)])[None]
        with torch.no_grad():
            attentions = eager(ids, output_attentions=True).attentions
        reference = np.stack([a[0, :, :, 0].mean(-1).numpy() for a in attentions])  # [L, H]
        np.testing.assert_allclose(sinks.sink_score[seq], reference, atol=2e-4)
