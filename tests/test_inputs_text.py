"""Issue kinds 4, 5 and 7: text lens cannot encode, readable labels for split characters, and BOS.

* Kind 4 — any input no tokenizer can encode (lone surrogates, high or low, in a list or in a sentence
  pair, bytes, None, numbers) raises ``InputError`` naming the input's index and what is wrong; a
  tokenizer that fails on one input is named by index too.
* Kind 5 — byte-level BPE splits a character into byte tokens that decode alone to '�'. Every token gets
  a readable label, ids stay exact, and the labels concatenate to the tokenizer's own ``decode`` of all
  ids (the reference); frames and views show them. Checked on a GPT-2-style and a Llama-style byte-level
  tokenizer over CJK, emoji sequences, accents and Arabic, and on WordPiece (unchanged labels).
* Kind 7 — ``prepend_bos`` means "position 0 is (not) BOS" whatever the tokenizer does (TransformerLens),
  for strings, pairs and token ids; provenance records what really happened.
"""

from __future__ import annotations

import numpy as np
import pytest

import lens
from lens.errors import ConfigError, InputError
from lens.run import CONTINUATION_MARK

HARD_TEXTS = [
    "日本語のテキスト",
    "I ❤️ 🦊 and 👩‍👩‍👧 (a ZWJ family) 🇫🇷",
    "naïve café, Ångström, e\u0301\u0301",
    "مرحبا بالعالم",
    "Plain ASCII for contrast.",
]


@pytest.fixture(scope="module")
def models(tiny_model_dir, minilm):
    return {"gpt2": lens.load(tiny_model_dir("gpt2")), "llama": lens.load(tiny_model_dir("llama")), "minilm": minilm}


# ------------------------------------------------------------------------------------------- kind 4


@pytest.mark.parametrize("kind", ["gpt2", "llama", "minilm"])
@pytest.mark.parametrize("inputs,index,match", [
    ("ok \ud800 ok", 0, r"lone surrogate \(U\+D800\) at character 3"),
    (["fine", "also fine", "bad \udc80 tail"], 2, r"lone surrogate \(U\+DC80\) at character 4"),
    (["fine", ("question?", "answer \udfff")], 1, r"input 1 \(second text of the pair\) contains a lone surrogate"),
    (["fine", b"bytes"], 1, "is bytes, not text"),
    (["fine", None], 1, "is a NoneType, not a string"),
    (["fine", 3.5], 1, "is a float, not a string"),
    (["fine", ["a", "b", "c"]], 1, "a sentence pair has exactly two"),
])
def test_unencodable_inputs_are_named(models, kind, inputs, index, match):
    with pytest.raises(InputError, match=match) as info:
        lens.trace(models[kind], inputs, progress=False)
    assert f"input {index}" in str(info.value)


def test_a_tokenizer_failure_names_the_input(models, monkeypatch):
    lm = models["gpt2"]
    real = type(lm.tokenizer).__call__

    def picky(self, text, *args, **kwargs):
        texts = text if isinstance(text, list) else [text]
        if any("FORBIDDEN" in t for t in texts):
            raise ValueError("this tokenizer refuses the word FORBIDDEN")
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(type(lm.tokenizer), "__call__", picky)
    with pytest.raises(InputError, match=r"cannot encode input 2 \(ValueError: this tokenizer refuses"):
        lens.trace(lm, ["one", "two", "a FORBIDDEN word", "four"], progress=False)


# ------------------------------------------------------------------------------------------- kind 5


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_byte_level_labels_are_readable_and_exact(models, kind):
    lm = models[kind]
    tok = lm.tokenizer
    run = lens.trace(lm, HARD_TEXTS, progress=False, prepend_bos=False)
    split = 0
    for s, text in enumerate(HARD_TEXTS):
        ids = run.arrays["token_ids"][run.span(s)].tolist()
        assert ids == [t for t in tok(text)["input_ids"] if t != tok.bos_token_id], "ids stay exact"
        labels = run.tokens[s]
        assert not any("\ufffd" in label for label in labels), labels
        assert "".join(labels) == tok.decode(ids) == text, "labels concatenate to the tokenizer's own decode"
        flags = run.arrays["continuation"][run.span(s)]
        assert [label == "" for label in labels] == flags.tolist()
        split += int(flags.sum())
        shown = run.token_labels(s)
        assert all(x == CONTINUATION_MARK for x, c in zip(shown, flags) if c) and "" not in shown
    assert split > 20, "the texts must really split characters into byte tokens"
    frame = lens.sinks(run).to_frame("tokens")
    assert not frame.token.str.contains("\ufffd").any()
    assert frame.continuation.sum() == split * run.n_layers * run.n_heads
    assert run.to_frame().continuation.sum() == split


def test_labels_keep_replacement_for_bytes_that_form_no_character(models):
    lm = models["gpt2"]
    tok = lm.tokenizer
    ids = tok("日本")["input_ids"]
    cut = ids[:-1]  # the last character loses its last byte: its bytes decode to '�' and nothing else
    run = lens.trace(lm, [cut], progress=False)
    assert "".join(run.tokens[0]) == tok.decode(cut)
    assert run.tokens[0][:3] == ["日", "", ""] and "\ufffd" in "".join(run.tokens[0][3:])


def test_wordpiece_labels_are_unchanged(models):
    run = lens.trace(models["minilm"], ["The cat sat.", "naïve café 日本"], progress=False)
    tok = models["minilm"].tokenizer
    for s in range(2):
        ids = run.arrays["token_ids"][run.span(s)].tolist()
        assert run.tokens[s] == [tok.decode([t]) for t in ids]
    assert run.tokens[0] == ["[CLS]", "the", "cat", "sat", ".", "[SEP]"]
    assert not run.arrays["continuation"].any()


def test_views_show_the_labels(models):
    pytest.importorskip("anywidget")
    from lens.widgets import AttentionExplorer, SinkMap, TokenView

    run = lens.trace(models["gpt2"], HARD_TEXTS[:2], progress=False)
    explorer = AttentionExplorer(run, layer=0, head=0, seq=1)
    sink_map = SinkMap(run, seq=1)
    view = TokenView.mass(run, 0, 0, seq=1)
    for widget in (explorer, sink_map, view):
        assert list(widget.tokens) == run.token_labels(1)
    assert "\ufffd" not in "".join(run.token_labels(1))


# ------------------------------------------------------------------------------------------- kind 7


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("prepend_bos", [None, True, False])
@pytest.mark.parametrize("form", ["str", "list", "pair"])
def test_prepend_bos_means_position_zero(models, kind, prepend_bos, form):
    lm = models[kind]
    bos = lm.tokenizer.bos_token_id
    inputs = {"str": "Attention sinks.", "list": ["Attention sinks.", "A second one"],
              "pair": [("Attention sinks.", "A second one")]}[form]
    run = lens.trace(lm, inputs, prepend_bos=prepend_bos, progress=False)
    want = prepend_bos is not False
    for s in range(run.n_sequences):
        ids = run.arrays["token_ids"][run.span(s)]
        assert bool(ids[0] == bos) is want, run.tokens[s]
        assert ids[1] != bos, "never a second BOS"
    trace = run.provenance["trace"]
    assert trace["prepend_bos"] is want and trace["prepend_bos_requested"] is prepend_bos


def test_prepend_bos_on_token_ids_and_what_provenance_records(models):
    lm = models["llama"]
    bos = lm.tokenizer.bos_token_id
    with_bos = lm.tokenizer("Attention sinks.")["input_ids"]
    without = with_bos[1:]
    mixed = lens.trace(lm, [with_bos, without], progress=False)  # ids as given
    assert mixed.provenance["trace"]["prepend_bos"] == [True, False]
    for flag in (True, False):
        run = lens.trace(lm, lm.tokenizer(["Attention sinks.", "Two"], padding=True, return_tensors="pt"),
                         prepend_bos=flag, progress=False)
        firsts = [run.arrays["token_ids"][run.span(s)][0] == bos for s in range(2)]
        assert firsts == [flag, flag] and run.provenance["trace"]["prepend_bos"] is flag
    same = lens.trace(lm, [without], prepend_bos=True, progress=False)
    assert same.arrays["token_ids"].tolist() == with_bos


def test_text_that_starts_with_bos_keeps_it_and_says_so(models):
    lm = models["llama"]
    run = lens.trace(lm, "<s>Hello there", prepend_bos=False, progress=False)
    assert run.tokens[0][0] == "<s>" and run.provenance["trace"]["prepend_bos"] is True


def test_bos_for_an_encoder(models):
    with pytest.raises(ConfigError, match="has no BOS token"):
        lens.trace(models["minilm"], "The cat sat.", prepend_bos=True, progress=False)
    run = lens.trace(models["minilm"], "The cat sat.", prepend_bos=False, progress=False)
    assert run.tokens[0][0] == "[CLS]" and run.provenance["trace"]["prepend_bos"] is False


def test_truncation_with_bos_changes(models):
    lm = models["llama"]
    long = "attention sinks appear on the first token " * 60
    run = lens.trace(lm, [long, "short"], truncate=True, prepend_bos=False, progress=False)
    assert run.lengths[0] <= lm.max_positions and run.meta["truncated"] == [True, False]
    assert run.arrays["token_ids"][0] != lm.tokenizer.bos_token_id
    np.testing.assert_array_equal(run.arrays["continuation"], False)
