"""Issue kinds 2 and 3: every form of a tokenizer's output gives the same Run; every field reaches the model.

* Kind 2 — a tokenizer's output as Python lists (the default), numpy, torch, a ``BatchEncoding``, a plain
  dict, a list of per-text encodings or of fast ``tokenizers.Encoding`` objects, int32 or bool masks,
  right or left padding: the same Run as the unpadded ids, on a decoder that adds BOS (Llama style), one
  that does not (GPT-2) and an encoder (MiniLM). Forms that cannot be read raise ``InputError``.
* Kind 3 — fields the model takes are passed on: the ``token_type_ids`` of sentence pairs (MiniLM, and
  GPT-2, which adds token-type embeddings), ``position_ids``; cross-checked against Hugging Face eager on
  the same inputs. A field the model does not take raises ``ConfigError`` naming it; all-zero token
  types for a model without them carry nothing and are accepted.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import minilm_path

import lens
from lens.errors import ConfigError, EmptyInputError, InputError

TEXTS = ["Attention sinks appear.", "The quick brown fox jumps over the lazy dog again and again."]
COMPARED = ("token_ids", "offsets", "special", "attn.key_mass", "attn.query_count", "attn.uniform_share",
            "resid.norm", "mlp.sum")


def _forms(tok, texts):
    """Every way a user hands over the same tokenized texts."""
    lists = tok(texts, padding=True)
    pt = tok(texts, padding=True, return_tensors="pt")
    return {
        "lists (BatchEncoding)": lists,
        "numpy": tok(texts, padding=True, return_tensors="np"),
        "torch": pt,
        "plain dict of lists": {k: list(v) for k, v in lists.items()},
        "plain dict of tensors": dict(pt.items()),
        "int32 tensors, bool mask": {"input_ids": pt["input_ids"].int(), "attention_mask": pt["attention_mask"].bool()},
        "list of encodings": [tok(t) for t in texts],
        "list of pt encodings": [tok(t, return_tensors="pt") for t in texts],
        "list of tokenizers.Encoding": tok(texts).encodings,
        "informational fields": tok(texts, padding=True, return_special_tokens_mask=True, return_offsets_mapping=True,
                                    return_length=True),
        "list of int lists": [tok(t)["input_ids"] for t in texts],
        "list of numpy rows": [np.asarray(tok(t)["input_ids"]) for t in texts],
        "list of tensors": [torch.tensor(tok(t)["input_ids"]) for t in texts],
    }


def _assert_same_run(run, ref, what):
    assert run.lengths.tolist() == ref.lengths.tolist(), f"{what}: lengths {run.lengths} vs {ref.lengths}"
    assert run.tokens == ref.tokens, what
    for name in COMPARED:
        np.testing.assert_allclose(run.arrays[name], ref.arrays[name], rtol=1e-5, atol=1e-6, err_msg=f"{what}: {name}")


@pytest.fixture(scope="module")
def decoders(tiny_model_dir):
    return {kind: lens.load(tiny_model_dir(kind)) for kind in ("llama", "gpt2")}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "minilm"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_every_form_gives_the_same_run(kind, side, decoders, minilm):
    lm = minilm if kind == "minilm" else decoders[kind]
    tok = lm.tokenizer
    old_side = tok.padding_side
    tok.padding_side = side
    try:
        forms = _forms(tok, TEXTS)
    finally:
        tok.padding_side = old_side
    reference = lens.trace(lm, [tok(t)["input_ids"] for t in TEXTS], progress=False)
    alone = [lens.trace(lm, [tok(t)["input_ids"]], progress=False) for t in TEXTS]
    for s in range(2):  # the reference itself: each sequence as it is alone (padding never counts)
        np.testing.assert_allclose(reference.arrays["attn.key_mass"][..., reference.span(s)],
                                   alone[s].arrays["attn.key_mass"], rtol=1e-5, atol=1e-6)
    for name, value in forms.items():
        run = lens.trace(lm, value, progress=False)
        _assert_same_run(run, reference, f"{kind}/{side}/{name}")
    if kind != "gpt2":  # tokenizers that add their own special tokens: text gives the same ids too
        _assert_same_run(lens.trace(lm, TEXTS, progress=False), reference, f"{kind}: texts")
    padded = lens.trace(lm, forms["torch"], progress=False)
    assert padded.provenance["trace"]["input_form"] == "tokenizer output"
    assert padded.provenance["trace"]["input_padding"] == side


@pytest.mark.parametrize("bad,match", [
    ({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1]]}, "has 2 entries but its input_ids have 3"),
    ({"input_ids": [[5, 6, 7, 8]], "attention_mask": [[1, 0, 1, 1]]}, "a 0 at position 1 between real tokens"),
    ({"input_ids": [[5, 6, 7]], "attention_mask": [[1, 2, 1]]}, "holds 2"),
    ({"input_ids": [[5, 6], [7, 8]], "attention_mask": [[1, 1]]}, "attention_mask has 1 rows but input_ids has 2"),
    ({"input_ids": np.array([[5.0, 6.0]]), "attention_mask": np.array([[1, 1]])}, "dtype float64"),
    ({"input_ids": torch.tensor([[5.0, 6.0]])}, "torch.float32 tensor"),
    ({"input_ids": torch.ones(1, 2, 3, dtype=torch.long)}, r"\[T\] or \[batch, T\]"),
    ({"input_ids": [[5, "6"]]}, "holds a str"),
    ({"input_ids": [[5, 6]], "attention_mask": [[1, 1]], "length": [7]}, "disagrees with its attention_mask"),
    ({"attention_mask": [[1, 1]]}, "needs input_ids"),
    ([{"input_ids": [5, 6]}, "text"], "input 1 is a str"),
    ([{"input_ids": [5, 6]}, {"input_ids": [5], "attention_mask": [1]}], "encoding 1 has fields"),
    ([[5, 6], [7, 10**6]], "outside the vocabulary"),
    (np.array([[1, -3]]), "outside the vocabulary"),
])
def test_unreadable_forms_raise_input_error(bad, match, decoders):
    with pytest.raises(InputError, match=match):
        lens.trace(decoders["llama"], bad, progress=False)


def test_all_padding_row_is_empty_input(decoders):
    with pytest.raises(EmptyInputError, match="input 1 is all padding"):
        lens.trace(decoders["llama"], {"input_ids": [[5, 6], [0, 0]], "attention_mask": [[1, 1], [0, 0]]}, progress=False)


# --------------------------------------------------------------------------------------- kind 3


def _eager(folder, auto=tf.AutoModel):
    return auto.from_pretrained(folder, attn_implementation="eager").eval()


def _compare_with_eager(run, out, mask, atol=2e-5):
    """Sink scores (mass on token 0 over Q_0) and residual norms per real token, eager vs lens."""
    mask = mask.bool()
    for layer, attn in enumerate(out.attentions):
        for s in range(run.n_sequences):
            n = int(run.lengths[s])
            start = int(mask[s].nonzero()[0])
            probs = attn[s, :, start:start + n, start:start + n]
            np.testing.assert_allclose(lens.sinks(run).sink_score[s, layer], probs[:, :, 0].mean(-1).numpy(), atol=atol)
    n_compare = len(out.hidden_states) - 1 if run.causal else len(out.hidden_states)
    for layer in range(n_compare):
        np.testing.assert_allclose(run.arrays["resid.norm"][layer], out.hidden_states[layer][mask].norm(dim=-1).numpy(),
                                   rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sentence_pairs_pass_token_type_ids(minilm, padding_side):
    tok = minilm.tokenizer
    first = ["The cat sat.", "Where is the station?"]
    second = ["It was on the mat, all afternoon.", "Two streets north."]
    old = tok.padding_side
    tok.padding_side = padding_side
    try:
        enc = tok(first, second, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old
    assert enc["token_type_ids"].max() == 1
    run = lens.trace(minilm, enc, progress=False)
    # the reference is right-padded: BERT's absolute positions would count left pads (each pair must be
    # what it is alone, which is what lens reports for either side)
    right = tok(first, second, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = _eager(str(minilm_path()))(**right, output_attentions=True, output_hidden_states=True)
    _compare_with_eager(run, out, right["attention_mask"])
    assert "token_type_ids" in run.provenance["trace"]["model_inputs"]
    # the same pairs given as text: (text_a, text_b) tuples
    as_text = lens.trace(minilm, list(zip(first, second)), progress=False)
    _assert_same_run(as_text, run, "pairs as tuples")
    assert as_text.texts == [list(p) for p in zip(first, second)]
    # without the token types the numbers differ: the test would notice a dropped field
    plain = lens.trace(minilm, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, progress=False)
    assert not np.allclose(plain.arrays["resid.norm"], run.arrays["resid.norm"], rtol=1e-3)


def test_position_ids_are_passed_through(decoders, tiny_model_dir):
    lm = decoders["llama"]
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    positions = 3 * (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # stretched: RoPE distances change
    run = lens.trace(lm, {**enc, "position_ids": positions}, progress=False)
    with torch.no_grad():
        out = _eager(tiny_model_dir("llama"), tf.AutoModelForCausalLM)(
            **enc, position_ids=positions, output_attentions=True, output_hidden_states=True, use_cache=False)
    _compare_with_eager(run, out, enc["attention_mask"])
    default = lens.trace(lm, enc, progress=False)
    assert not np.allclose(default.arrays["attn.key_mass"], run.arrays["attn.key_mass"], atol=1e-4)
    assert run.provenance["trace"]["model_inputs"] == ["input_ids", "attention_mask", "position_ids"]


def test_gpt2_token_type_ids_reach_the_model(decoders, tiny_model_dir):
    """GPT-2 adds wte(token_type_ids) to its embeddings: a field the model takes must not be dropped."""
    lm = decoders["gpt2"]
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    types = enc["attention_mask"].clone()
    types[:, :3] = 0
    run = lens.trace(lm, {**enc, "token_type_ids": types}, progress=False)
    with torch.no_grad():
        out = _eager(tiny_model_dir("gpt2"), tf.AutoModelForCausalLM)(
            **enc, token_type_ids=types, output_attentions=True, output_hidden_states=True, use_cache=False)
    _compare_with_eager(run, out, enc["attention_mask"])


def test_fields_the_model_does_not_take_are_refused_by_name(decoders, minilm):
    llama = decoders["llama"]
    enc = llama.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with pytest.raises(ConfigError, match="'token_type_ids'"):
        lens.trace(llama, {**enc, "token_type_ids": enc["attention_mask"]}, progress=False)
    zeros = lens.trace(llama, {**enc, "token_type_ids": torch.zeros_like(enc["input_ids"])}, progress=False)
    _assert_same_run(zeros, lens.trace(llama, enc, progress=False), "all-zero token types carry nothing")
    with pytest.raises(ConfigError, match="'pixel_values'"):
        lens.trace(minilm, {**minilm.tokenizer("a cat"), "pixel_values": torch.zeros(1, 3, 8, 8)}, progress=False)
    with pytest.raises(ConfigError, match="'my_extra'"):
        lens.trace(minilm, {**minilm.tokenizer("a cat"), "my_extra": [[1, 2, 3, 4]]}, progress=False)
    with pytest.raises(ConfigError, match="inputs_embeds"):
        lens.trace(minilm, {"inputs_embeds": torch.zeros(1, 3, 384)}, progress=False)
    with pytest.raises(InputError, match="token_type_ids of input 0 holds 5"):
        lens.trace(minilm, {**minilm.tokenizer("a cat"), "token_type_ids": [[0, 5, 0, 0]]}, progress=False)
