"""The real, pretrained all-MiniLM-L6-v2 against independent references.

* mass received per key and sink scores against Hugging Face's eager ``output_attentions=True`` on a
  padded batch of different lengths (atol 1e-5, fp32);
* raw and normalized entropies against ``torch.linalg.svdvals`` of ``output_hidden_states``
  (relative 1e-4);
* the phenomenon itself: [CLS] is a sink that takes roughly half of all attention in layers 1–4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from conftest import minilm_path

import lens


@pytest.fixture(scope="module")
def run_and_reference(minilm, minilm_texts):
    run = lens.trace(minilm, minilm_texts, batch_size=4, progress=False)
    assert len(set(run.lengths.tolist())) == len(minilm_texts), "lengths must differ so that padding is exercised"
    eager = transformers.AutoModel.from_pretrained(str(minilm_path()), attn_implementation="eager").eval()
    batch = minilm.tokenizer(minilm_texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = eager(**batch, output_attentions=True, output_hidden_states=True)
    return run, out, batch["attention_mask"]


def test_token_ids_match_the_tokenizer(run_and_reference, minilm, minilm_texts):
    run, _, _ = run_and_reference
    for s, text in enumerate(minilm_texts):
        assert run.arrays["token_ids"][run.span(s)].tolist() == minilm.tokenizer(text)["input_ids"]
    assert run.tokens[0][0] == "[CLS]" and run.tokens[0][-1] == "[SEP]"
    assert run.arrays["special"][run.span(0)][[0, -1]].all()


def test_mass_received_matches_eager_output_attentions(run_and_reference):
    run, out, mask = run_and_reference
    sinks = lens.sinks(run)
    for layer, attn in enumerate(out.attentions):
        for s in range(run.n_sequences):
            n = int(mask[s].sum())
            probs = attn[s, :, :n, :n]  # real queries and keys only
            column_sum = probs.sum(1).numpy()
            mass = probs.mean(1).numpy()  # bidirectional: every real query may attend every key
            np.testing.assert_allclose(run.arrays["attn.key_mass"][layer, :, run.span(s)], column_sum, atol=1e-5)
            for head in range(run.n_heads):
                np.testing.assert_allclose(run.mass_received(layer, head, s), mass[head], atol=1e-5)
            np.testing.assert_allclose(sinks.sink_score[s, layer], probs[:, :, 0].mean(1).numpy(), atol=1e-5)
            np.testing.assert_allclose(run.arrays["attn.query_count"][layer, run.span(s)], np.full(n, n))


def test_entropies_match_svdvals(run_and_reference):
    run, out, mask = run_and_reference
    valley = lens.valley(run)
    d = run.meta["d_model"]
    for layer, hidden in enumerate(out.hidden_states):  # BERT: L+1 states, X_0 = embeddings, X_L = last block out
        for s in range(run.n_sequences):
            n = int(mask[s].sum())
            x = hidden[s, :n].double()
            sigma_sq = torch.linalg.svdvals(x) ** 2
            p = sigma_sq / sigma_sq.sum()
            h_raw = float(-(p[p > 0] * p[p > 0].log()).sum())
            assert valley.values["entropy_raw"][layer, s] == pytest.approx(h_raw, rel=1e-4)
            assert valley.values["entropy_raw_normalized"][layer, s] == pytest.approx(h_raw / math.log(min(n, d)), rel=1e-4)
            assert valley.values["anisotropy"][layer, s] == pytest.approx(float(p[0]), rel=1e-4)
            centered = x - x.mean(0, keepdim=True)
            z = centered / centered.norm(dim=1, keepdim=True)
            q = torch.linalg.svdvals(z) ** 2
            q = q / q.sum()
            h_norm = float(-(q[q > 0] * q[q > 0].log()).sum())
            assert valley.values["entropy_normalized"][layer, s] == pytest.approx(h_norm, rel=1e-4)
            # the bound of docs/definitions.md holds on real data
            assert valley.values["entropy_raw"][layer, s] <= valley.values["entropy_upper_bound"][layer, s] + 1e-9
            assert valley.values["anisotropy"][layer, s] >= valley.values["anisotropy_lower_bound"][layer, s] - 1e-9


def test_cls_is_a_real_sink(run_and_reference):
    run, _, _ = run_and_reference
    result = lens.sinks(run)
    per_layer = result.mean_sink_score.mean(1)  # mass on [CLS], averaged over heads
    assert all(0.4 <= per_layer[layer] <= 0.75 for layer in (1, 2, 3, 4)), per_layer
    heads = result.to_frame("heads")
    assert heads["is_sink_head"].sum() >= 24
    sink_tokens = result.to_frame("sink_tokens")
    assert (sink_tokens["position"] == 0).any()
    # [SEP] takes part of the rest: special tokens together get more than [CLS] alone
    assert (result.special_mass.mean(0) >= result.mean_sink_score - 1e-9).all()


def test_alpha_renyi(run_and_reference):
    run, _, _ = run_and_reference
    shannon = lens.valley(run)
    renyi2 = lens.valley(run, alpha=2.0)
    # Rényi entropy decreases with α
    assert (renyi2.values["entropy_normalized"] <= shannon.values["entropy_normalized"] + 1e-9).all()
    spectrum = run.arrays["resid.spectrum_normalized"][3, 0]
    p = spectrum[spectrum > 0] / spectrum.sum()
    assert renyi2.values["entropy_normalized"][3, 0] == pytest.approx(-math.log((p**2).sum()), rel=1e-9)
