"""A live llama.cpp (llama-cpp-python), wherever it is installed: the committed reference is what it computes,
and the coarsened KL the reference supports is close to the full-vocabulary KL.

llama-cpp-python is optional (CI tests against the committed reference, tests/test_llamacpp.py); building it
takes minutes and needs ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..."`` on CPUs with AMX (see
tests/data/llamacpp/make_reference.py). These tests are skipped, saying so, where it is not importable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import lens
from lens.models.llamacpp import coarsen, coarsened_kl, load_reference

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional)")

HERE = Path(__file__).parent / "data" / "llamacpp"
pytestmark = pytest.mark.slow


def _script():
    spec = importlib.util.spec_from_file_location("make_reference", HERE / "make_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_reference", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def live(smollm2):
    from lens.models.embedded import smollm2_gguf_path

    script = _script()
    ids = script.prompt_ids(smollm2.tokenizer)
    logits, info = script.llamacpp_logits(smollm2_gguf_path(fetch=False), ids)
    return script, ids, [script.log_softmax(x) for x in logits], info


def test_committed_reference_is_what_llamacpp_computes(live):
    script, ids, logprobs, info = live
    reference = load_reference(HERE / "smollm2_q4_1.safetensors")
    assert [p["ids"].tolist() for p in reference["prompts"]] == ids
    same_build = info["llama_cpp_python"] == reference["meta"]["llama_cpp_python"]
    for lp, prompt in zip(logprobs, reference["prompts"]):
        drift = coarsened_kl(prompt, lp)
        # the same llama.cpp is deterministic; another version may round differently, but not by much
        # float32 log-probabilities in the file: ~1e-7; another llama.cpp may round differently, but not by much
        assert drift.max() < (1e-6 if same_build else 1e-2), (info["llama_cpp_python"], drift.max())


def test_coarsened_kl_is_close_to_full_kl(live, smollm2):
    script, ids, logprobs, _ = live
    run = lens.trace(smollm2, ids, capture=("logits",), batch_size=1, progress=False)
    full, coarse = [], []
    for s, lp in enumerate(logprobs):
        mine = run.arrays["logits.logprobs"][run.span(s)].astype(np.float64)
        full.append((np.exp(lp) * (lp - mine)).sum(-1))
        coarse.append(coarsened_kl(coarsen(lp, script.TOP_K), mine))
    full, coarse = np.concatenate(full), np.concatenate(coarse)
    assert (coarse <= full + 1e-5).all()  # a lower bound (data processing inequality; float32 log-probs) ...
    assert coarse.mean() >= 0.95 * full.mean(), (coarse.mean(), full.mean())  # ... and a tight one
