"""The weights fingerprint of a scan (what ``resume=True`` compares) on deployments whose weights are tensor
subclasses: torchao's ``Int8Tensor`` (``quant="int8"``) has no byte view and no reshape, and ``lens.scan``
used to crash on it before reading a document. Found at stop 24; these tests fail on that code."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_scan_engines import OPTIONS, assert_same_scan

import lens
from lens.errors import CorpusError, ScanError
from lens.scan.run_scan import _hash_tensor, model_identity

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks appear on the first token.",
          "Massive activations sit in a few fixed dimensions.", "A valley forms in the middle layers."]


def _int8(folder, bump: float = 0.0):
    """``folder``'s model with ``quant="int8"``; ``bump`` is added to one MLP weight before quantizing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    if bump:
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[0, 0] += bump
    return lens.load(model, tokenizer=AutoTokenizer.from_pretrained(folder), quant="int8")


@pytest.fixture(scope="module")
def llama_dir(tiny_model_dir):
    torch.set_num_threads(1)
    return tiny_model_dir("llama")


def test_int8_deployment_is_fingerprinted_by_its_quantized_weights(llama_dir):
    a, same, moved = _int8(llama_dir), _int8(llama_dir), _int8(llama_dir, bump=0.5)
    kinds = {type(t).__name__ for t in a.model.state_dict().values()}
    assert "Int8Tensor" in kinds  # the case at hand: weights that are torchao subclasses
    ids = [model_identity(m)["weights_sha256"] for m in (a, same, moved)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert model_identity(lens.load(llama_dir))["weights_sha256"] != ids[0]  # dense ≠ int8


def test_int8_scan_runs_and_resumes_only_with_the_same_weights(llama_dir, tmp_path):
    a = _int8(llama_dir)
    out = tmp_path / "partial"
    with pytest.raises(CorpusError, match="not text"):
        lens.scan(a, [*CORPUS, 42, "after the bad item"], out=out, **OPTIONS)
    assert (out / "checkpoint.safetensors").exists()
    fixed = [*CORPUS, "42", "after the bad item"]
    with pytest.raises(ScanError, match="different model"):
        lens.scan(_int8(llama_dir, bump=0.5), fixed, out=out, resume=True, **OPTIONS)
    done = lens.scan(_int8(llama_dir), fixed, out=out, resume=True, **OPTIONS)
    assert done.tokens > 0 and done.manifest["model"]["quant"]
    assert_same_scan(done, lens.scan(a, fixed, out=tmp_path / "whole", **OPTIONS))


def _digest(tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, "w", tensor)
    return h.hexdigest()


def test_nested_subclasses_hash_by_their_inner_tensors_and_metadata():
    from torch.testing._internal.two_tensor import (
        TwoTensor,  # PyTorch's reference wrapper subclass
    )

    x, y = torch.arange(6.0).reshape(2, 3), torch.ones(2, 3)
    inner = TwoTensor(x, y)
    assert _digest(TwoTensor(x, y)) == _digest(TwoTensor(x.clone(), y.clone()))
    assert _digest(TwoTensor(x, y)) != _digest(TwoTensor(x, y + 1e-3))
    assert _digest(TwoTensor(x, y)) != _digest(TwoTensor(y, x))
    nested = TwoTensor(inner, TwoTensor(y, y))
    assert _digest(nested) != _digest(TwoTensor(TwoTensor(x, y), TwoTensor(y, x)))
    assert _digest(nested) == _digest(TwoTensor(TwoTensor(x, y), TwoTensor(y, y)))
    assert _digest(x) == hashlib.sha256(x.numpy().tobytes()).hexdigest()  # plain tensors: their bytes, as before


def test_a_tensor_whose_bytes_cannot_be_read_is_a_scan_error_naming_the_weight():
    class Opaque(torch.Tensor):  # a subclass without __tensor_flatten__ whose every op fails
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(f"{func.__name__} is not implemented")

    weight = torch.ones(3).as_subclass(Opaque)
    with pytest.raises(ScanError, match=r"'layers.0.weight'.*dequantize"):
        _hash_tensor(hashlib.sha256(), "layers.0.weight", weight)
