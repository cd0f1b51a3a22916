"""Issue kind 6: ``NumericalError`` names exactly the non-finite inputs and the right place.

A NaN or infinity is named where it first appears in the residual stream — "the embeddings", "the
output of block ℓ", "the output of block L−1 — the final hidden state" — and only for the inputs whose
real tokens carry it, across batches. Padding belongs to no input: a non-finite ``<pad>`` embedding
(which lens's own batching puts there) changes nothing, the batch traces exactly like each text alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_tiny

import lens
from lens.errors import NumericalError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks.", "Massive activations are rare."]


def _load(kind, tmp_path, init):
    return lens.load(build_tiny(kind, tmp_path / kind, init=init))


def _embedding(model):
    return model.get_input_embeddings().weight


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_padding_embedding_changes_nothing(kind, value, tmp_path):
    from conftest import _bert_tokenizer, _bpe_tokenizer

    tok = _bert_tokenizer() if kind == "bert" else _bpe_tokenizer("gpt2" if kind == "gpt2" else "llama")
    pad = tok.pad_token_id

    def poison(model):
        _embedding(model)[pad] = value

    lm = _load(kind, tmp_path, poison)
    batched = lens.trace(lm, TEXTS, progress=False)
    for s, text in enumerate(TEXTS):
        alone = lens.trace(lm, text, progress=False)
        for name in ("attn.key_mass", "attn.uniform_share", "resid.norm", "resid.spectrum_raw"):
            np.testing.assert_allclose(batched.arrays[name][..., batched.span(s)] if name != "resid.spectrum_raw"
                                       else batched.arrays[name][:, s, : alone.arrays[name].shape[-1]],
                                       alone.arrays[name][..., :] if name != "resid.spectrum_raw"
                                       else alone.arrays[name][:, 0], rtol=1e-4, atol=1e-5, err_msg=f"{s} {name}")
    only_attention = lens.trace(lm, TEXTS, capture=("attention",), progress=False)
    np.testing.assert_allclose(only_attention.arrays["attn.key_mass"], batched.arrays["attn.key_mass"], rtol=1e-6)


def test_only_the_inputs_with_non_finite_tokens_are_named(tmp_path):
    from conftest import _bpe_tokenizer

    tok = _bpe_tokenizer("gpt2")
    rare = tok("!")["input_ids"][0]  # a token only TEXTS[1] + "!" contains
    assert all(rare not in tok(t)["input_ids"] for t in TEXTS)

    def poison(model):
        _embedding(model)[rare] = float("nan")

    lm = _load("gpt2", tmp_path, poison)
    inputs = [TEXTS[0], TEXTS[1] + "!", TEXTS[2]]
    with pytest.raises(NumericalError) as info:
        lens.trace(lm, inputs, progress=False, prepend_bos=True)
    message = str(info.value)
    position = 1 + len(tok(TEXTS[1])["input_ids"])  # after the BOS and the text
    assert f"for input 1 (from token {position})" in message
    assert "input 0" not in message and "input 2" not in message
    assert message.startswith("the embeddings — the input of block 0 (residual layer 0)")
    assert "the other inputs of this batch are finite" in message
    # one sequence per batch: the input number is still the user's
    with pytest.raises(NumericalError, match=r"for input 1 \(from token"):
        lens.trace(lm, inputs, batch_size=1, progress=False)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("block,place", [
    (0, "the output of block 0 — the input of block 1 (residual layer 1)"),
    (1, "the output of block 1 — the final hidden state (residual layer 2)"),
])
def test_the_place_is_named_right(kind, block, place, tmp_path):
    def poison(model):
        blocks = model.transformer.h if kind == "gpt2" else model.model.layers
        mlp_in = blocks[block].mlp.c_fc.weight if kind == "gpt2" else blocks[block].mlp.up_proj.weight
        mlp_in[3, 7] = float("nan")

    lm = _load(kind, tmp_path, poison)
    for capture in (("attention", "residual", "mlp"), ("attention",), ("mlp",)):
        with pytest.raises(NumericalError) as info:
            lens.trace(lm, TEXTS, capture=capture, progress=False)
        message = str(info.value)
        assert message.startswith(place), message
        assert "input 0" in message and "input 1" in message and "input 2" in message
        assert "layer 3" not in message and "entering" not in message


def test_inf_in_attention_weight(tmp_path):
    def poison(model):
        model.transformer.h[0].attn.c_attn.weight[0, 0] = float("inf")

    lm = _load("gpt2", tmp_path, poison)
    with pytest.raises(NumericalError, match="the output of block 0"):
        lens.trace(lm, TEXTS[:2], progress=False)


def test_non_finite_log_probabilities(tmp_path):
    def poison(model):
        model.lm_head.weight[5] = float("nan")  # untied head row: only the logits see it

    def untie(model):
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        poison(model)

    lm = _load("llama", tmp_path, untie)
    run = lens.trace(lm, TEXTS[:2], progress=False)  # the backbone alone is finite
    assert np.isfinite(run.arrays["resid.norm"]).all()
    with pytest.raises(NumericalError, match=r"log-probabilities .* input\(s\) \[0, 1\]"):
        lens.trace(lm, TEXTS[:2], capture=("attention", "logits"), progress=False)
