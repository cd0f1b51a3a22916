"""Bad input gets a clear LensError that says what to do, and nothing else breaks."""

from __future__ import annotations

import time

import pytest
import torch

import lens
from lens.errors import (
    ConfigError,
    EmptyInputError,
    InputError,
    InputTooLongError,
    LensError,
    ModelLoadError,
    NumericalError,
    UnsupportedModelError,
)


@pytest.mark.parametrize("bad", ["", "   \n\t", [], ["fine", ""]])
def test_empty_inputs(minilm, bad):
    with pytest.raises(EmptyInputError) as info:
        lens.trace(minilm, bad, progress=False)
    assert isinstance(info.value, LensError)


def test_wrong_input_types(minilm):
    with pytest.raises(InputError, match="cannot read inputs"):
        lens.trace(minilm, 42, progress=False)
    with pytest.raises(InputError, match="not a string"):
        lens.trace(minilm, ["ok", 3.5], progress=False)
    with pytest.raises(InputError, match="outside the vocabulary"):
        lens.trace(minilm, torch.tensor([101, 10**7]), progress=False)
    with pytest.raises(InputError, match="integer"):
        lens.trace(minilm, torch.randn(3, 4), progress=False)


def test_oversized_input_raises_or_truncates(minilm):
    text = ("The attention sink absorbs the mass that other tokens do not need. " * 1500)[:100_000]
    assert len(text) == 100_000
    with pytest.raises(InputTooLongError) as info:
        lens.trace(minilm, ["short one", text], progress=False)
    message = str(info.value)
    assert "input 1" in message and "512" in message and "truncate=True" in message
    run = lens.trace(minilm, ["short one", text], truncate=True, progress=False)
    assert run.lengths.tolist()[1] == 512
    assert run.meta["truncated"] == [False, True]
    assert run.tokens[1][-1] == "[SEP]", "the tokenizer's truncation keeps the closing [SEP]"
    assert run.provenance["trace"]["truncate"] is True


def test_unknown_model_offline_is_fast_and_helpful():
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as info:
        lens.load("no-such-org/no-such-model-xyz")
    assert time.perf_counter() - start < 30  # offline: no network retries (a sanity bound, not a benchmark)
    message = str(info.value)
    assert "local folder" in message or "lens.load('./" in message
    assert "no-such-model-xyz" in message


def test_folder_without_weights(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_dir("gpt2"), folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelLoadError, match="weights"):
        lens.load(folder)


def test_unsupported_architecture(tmp_path):
    import transformers

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100)
    transformers.T5Model(config).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="register_family"):
        lens.load(tmp_path)


def test_not_a_model():
    with pytest.raises(ModelLoadError, match="does not know what to do"):
        lens.load(object())
    with pytest.raises(ModelLoadError, match="empty model name"):
        lens.load("  ")


def test_loaded_model_without_tokenizer():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ModelLoadError, match="tokenizer="):
        lens.load(model)


def test_nan_activations(tiny_model_dir, tmp_path):
    from conftest import build_tiny

    def poison(model):
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")

    lm = lens.load(build_tiny("gpt2", tmp_path / "nan", init=poison))
    with pytest.raises(NumericalError, match="layer 1") as info:
        lens.trace(lm, "Numbers break here.", progress=False)
    assert "float32" in str(info.value)
    # the probes were detached: the model still runs and can be traced once repaired
    with torch.no_grad():
        lm.model.transformer.h[0].mlp.c_fc.weight[0, 0] = 0.0
    assert lens.trace(lm, "Numbers work again.", progress=False).n_sequences == 1
    assert not lm.blocks[0]._forward_pre_hooks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"keep_patterns": [(9, 0)]}, "valid layers are 0..5"),
        ({"keep_patterns": [(0, 12)]}, "valid heads are 0..11"),
        ({"capture": ("attention", "gradients")}, "subset of"),
        ({"capture": ("attention", "logits")}, "language-model head"),  # MiniLM is an encoder
        ({"batch_size": 0}, "batch_size"),
        ({"track_neurons": [(0, 99999)]}, "neurons 0..1535"),
        ({"keep_hidden": [7]}, "0..6"),
    ],
)
def test_bad_trace_options(minilm, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        lens.trace(minilm, "fine text", progress=False, **kwargs)


def test_bad_load_options():
    with pytest.raises(ConfigError, match="dtype"):
        lens.load(dtype="float8")


def test_analysis_of_partial_capture(minilm):
    run = lens.trace(minilm, "only residual", capture=("residual",), progress=False)
    with pytest.raises(LensError, match="did not capture"):
        lens.sinks(run)
    assert lens.valley(run).valley_layer >= 0
