"""The fast paths of capture and deployment against their references (issue: speed on any CPU).

* every sparse execution path (gathered-block SDPA, FlexAttention, dense SDPA) inside a real model,
  against a kernel that runs the eager masked reference on the same selection;
* the dense fallback: a selection that keeps every block runs dense SDPA, and the run's provenance says
  so (and says which paths ran otherwise);
* the residual probe's background reduction (a worker thread, or split over the forward's threads) against the
  same reduction in the forward's thread, and how the split reports errors;
* the default spectra against float64 SVDs of the hidden states: |ΔH| ≤ 1e-3 (normalized by log rank)
  and |Δ anisotropy| ≤ 1e-3 on MiniLM, planted massive activations and the embedded SmolLM2 decoder.

No timing asserts: the speed itself is measured by ``lens bench capture`` and ``lens bench attention``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import CORPUS, build_tiny

import lens
from lens.capture import trace as trace_module
from lens.capture.probes import ResidualProbe
from lens.errors import ConfigError, LensError
from lens.kernels.sparse import SparseConfig, select_blocks, sparse_attention_reference
from lens.models.deploy import SparseAttention

CFG = SparseConfig(mode="hybrid", topk=0.25, topp=0.7, block_q=16, block_k=16)


class _ReferenceKernel:
    """The eager masked reference (float64, every kept pair materialized) as a deployable kernel."""

    def __init__(self, config):
        self.config = config

    def __call__(self, module, query, key, value, attention_mask, *, is_causal, scale, softcap, pattern_heads,
                 with_stats):
        assert not with_stats, "traced here without attention statistics"
        selection = select_blocks(query, key, self.config, attention_mask=attention_mask, is_causal=is_causal,
                                  scale=scale)
        out = sparse_attention_reference(query, key, value, selection, attention_mask=attention_mask,
                                         is_causal=is_causal, scale=scale, softcap=softcap)
        return out, None

    def describe(self):
        return {"kind": "reference"}


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    return build_tiny("gpt2", tmp_path_factory.mktemp("speed-gpt2"))


@pytest.fixture(scope="module")
def long_inputs(gpt2_folder):
    lm = lens.load(gpt2_folder)
    ids = lm.tokenizer(" ".join(CORPUS))["input_ids"]
    return [ids[:200], ids[37:150], ids[5:90]]  # different lengths: a right-padded batch


def _hidden(run) -> np.ndarray:
    return np.stack([run.arrays[f"resid.hidden.{layer}"] for layer in range(run.meta["n_layers"] + 1)])


@pytest.mark.slow
def test_every_execution_path_matches_the_reference_inside_a_model(gpt2_folder, long_inputs):
    reference = lens.trace(lens.load(gpt2_folder, attention=_ReferenceKernel(CFG)), long_inputs,
                           capture=("residual",), keep_hidden="all", batch_size=3, progress=False)
    expected = _hidden(reference)
    for execution in ("gathered", "flex", "auto"):
        lm = lens.load(gpt2_folder, attention=SparseAttention(CFG, execution=execution))
        run = lens.trace(lm, long_inputs, capture=("residual",), keep_hidden="all", batch_size=3, progress=False)
        np.testing.assert_allclose(_hidden(run), expected, atol=2e-4, rtol=1e-4, err_msg=execution)
        executed = run.meta["provenance"]["attention"]["executed"]
        assert sum(executed.values()) == lm.n_layers and "dense" not in executed, executed
        if execution != "auto":
            assert executed == {execution: lm.n_layers}
    # the statistics under sparsity are the same whichever path computed the output
    runs = [lens.trace(lens.load(gpt2_folder, attention=SparseAttention(CFG, execution=e)), long_inputs,
                       capture=("attention",), batch_size=3, progress=False) for e in ("gathered", "flex")]
    np.testing.assert_allclose(runs[0].arrays["attn.key_mass"], runs[1].arrays["attn.key_mass"], atol=1e-5)


def test_dense_fallback_is_recorded_in_provenance(gpt2_folder, long_inputs):
    every = SparseConfig(mode="topk", topk=1.0, block_q=16, block_k=16)
    lm = lens.load(gpt2_folder, attention=every)
    run = lens.trace(lm, long_inputs, keep_hidden="all", batch_size=2, progress=False)
    attention = run.meta["provenance"]["attention"]
    assert attention["executed"] == {"dense": lm.n_layers * 2}  # two batches, every layer dense SDPA
    assert np.all(run.arrays["attn.kept_fraction"] == 1.0)
    dense = lens.trace(lens.load(gpt2_folder), long_inputs, keep_hidden="all", batch_size=2, progress=False)
    np.testing.assert_allclose(_hidden(run), _hidden(dense), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(run.arrays["attn.key_mass"], dense.arrays["attn.key_mass"], atol=1e-4)
    # the counts are the trace's own, not the kernel's lifetime total
    again = lens.trace(lm, long_inputs[:1], progress=False)
    assert again.meta["provenance"]["attention"]["executed"] == {"dense": lm.n_layers}
    # a short input whose selection keeps every block (sink + diagonal cover it) also runs dense
    short = lens.trace(lens.load(gpt2_folder, attention=CFG), long_inputs[0][:20], progress=False)
    assert short.meta["provenance"]["attention"]["executed"] == {"dense": lm.n_layers}
    assert "executed" not in dense.meta["provenance"]["attention"]  # dense SDPA kernels keep no counts


def test_sparse_kernel_rejects_unknown_executions():
    with pytest.raises(ConfigError, match="'auto', 'gathered' or 'flex'"):
        SparseAttention(CFG, execution="dense")
    assert SparseAttention(CFG, execution="gathered").describe()["execution"] == "gathered"


def _synchronous(monkeypatch):
    monkeypatch.setattr(trace_module, "ResidualProbe", functools.partial(ResidualProbe, background=False))


RESIDUAL_ARRAYS = ("resid.norm", "resid.cos2_first", "resid.median_abs", "resid.top_value", "resid.top_position",
                   "resid.top_dim", "resid.spectrum_raw", "resid.spectrum_normalized")


@pytest.fixture(params=[1, 2], ids=["worker-thread", "split-over-2-threads"])
def torch_threads(request):
    """One torch thread (the residual probe reduces in a background worker) or two (it splits each layer's
    sequences over two single-threaded threads at once)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_background_reduction_equals_the_forward_thread(gpt2_folder, long_inputs, minilm, minilm_texts, monkeypatch,
                                                        torch_threads):
    for lm, inputs in ((lens.load(gpt2_folder), long_inputs), (minilm, minilm_texts)):
        background = lens.trace(lm, inputs, capture=("residual",), batch_size=3, keep_hidden=[1], progress=False)
        with monkeypatch.context() as patch:
            _synchronous(patch)
            foreground = lens.trace(lm, inputs, capture=("residual",), batch_size=3, keep_hidden=[1], progress=False)
        for name in RESIDUAL_ARRAYS + ("resid.hidden.1",):
            a, b = background.arrays[name], foreground.arrays[name]
            if a.dtype.kind == "f":
                scale = np.abs(b).max(axis=-1, keepdims=True) if name.startswith("resid.spectrum") else 1.0
                np.testing.assert_allclose(a / np.maximum(scale, 1e-30), b / np.maximum(scale, 1e-30), atol=1e-6,
                                           rtol=1e-5, err_msg=name)
            else:
                np.testing.assert_array_equal(a, b, err_msg=name)
        assert background.meta["provenance"]["trace"]["spectra"] == "exact"


def test_spectra_none_skips_the_eigen_solves_and_says_what_is_missing(minilm, minilm_texts):
    run = lens.trace(minilm, minilm_texts, capture=("residual",), spectra="none", progress=False)
    assert "resid.spectrum_raw" not in run.arrays and "resid.norm" in run.arrays
    assert run.meta["provenance"]["trace"]["spectra"] == "none"
    with pytest.raises(LensError, match="spectra='exact'"):
        lens.valley(run)
    with pytest.raises(ConfigError, match="'exact'"):
        lens.trace(minilm, minilm_texts, spectra="slq", progress=False)


# ---------------------------------------------------------------------- the default spectra's error


def _reference_entropies(x: np.ndarray) -> tuple[float, float, float]:
    """(raw H / log r, anisotropy, normalized H / log r) from float64 SVDs (docs/definitions.md, "Matrix entropy")."""
    x = torch.from_numpy(x).double()
    rank = min(x.shape)

    def entropy(s):
        p = s**2 / (s**2).sum()
        p = p[p > 0]
        return float(-(p * p.log()).sum()) / math.log(rank), float(p.max())

    h_raw, p1 = entropy(torch.linalg.svdvals(x))
    centered = x - x.mean(0, keepdim=True)
    rows = centered / centered.norm(dim=1, keepdim=True).clamp_min(1e-300)
    h_norm, _ = entropy(torch.linalg.svdvals(rows))
    return h_raw, p1, h_norm


def _worst_error(run) -> dict:
    valley = lens.valley(run)
    worst = {"entropy_raw": 0.0, "anisotropy": 0.0, "entropy_normalized": 0.0}
    for layer in range(run.meta["n_layers"] + 1):
        hidden = run.arrays[f"resid.hidden.{layer}"]
        for seq in range(run.n_sequences):
            h_raw, p1, h_norm = _reference_entropies(hidden[run.span(seq)])
            got = valley.values
            worst["entropy_raw"] = max(worst["entropy_raw"], abs(got["entropy_raw_normalized"][layer, seq] - h_raw))
            worst["anisotropy"] = max(worst["anisotropy"], abs(got["anisotropy"][layer, seq] - p1))
            worst["entropy_normalized"] = max(worst["entropy_normalized"],
                                              abs(got["entropy_normalized_normalized"][layer, seq] - h_norm))
    return worst


def _planted_massive_lm(tmp_path):
    from test_planted import _plant_massive

    return lens.load(build_tiny("gpt2", tmp_path / "massive", init=_plant_massive("tilted")))


def _smollm2():
    try:
        return lens.load("smollm2")
    except LensError as exc:  # the embedded decoder is added by another change; until then, say so
        pytest.skip(f"the embedded SmolLM2 decoder is not available here: {str(exc)[:120]}")


@pytest.mark.parametrize("source", ["minilm", "planted_massive", "smollm2"])
def test_default_spectra_error_against_float64_svd(source, minilm, minilm_texts, tmp_path):
    """The stated error of the default spectra: exact eigenvalues of the fp32 Gram matrices, so the
    entropies and the anisotropy agree with float64 SVDs of the hidden states to fp32 round-off
    (measured ≤ 1e-5); the issue's bound is 1e-3 (normalized entropy) and 1e-3 (anisotropy)."""
    if source == "minilm":
        lm, inputs = minilm, minilm_texts
    elif source == "planted_massive":
        lm, inputs = _planted_massive_lm(tmp_path), [list(range(3, 43)), list(range(3, 30))]
    else:
        lm = _smollm2()
        inputs = ["The capital of France is Paris, and the capital of Germany is Berlin.",
                  "Attention sinks and massive activations appear in most decoders."]
    run = lens.trace(lm, inputs, capture=("residual",), keep_hidden="all", progress=False)
    assert run.meta["provenance"]["trace"]["spectra"] == "exact"
    worst = _worst_error(run)
    assert worst["entropy_raw"] <= 1e-3 and worst["entropy_normalized"] <= 1e-3, worst
    assert worst["anisotropy"] <= 1e-3, worst
    if source == "planted_massive":
        # the spike is ~500 against unit rows: fp32 Gram matrices still give the entropy to 1e-5
        assert max(worst.values()) <= 1e-4, worst


def test_run_parallel_waits_for_every_group_and_raises_the_earliest_error(torch_threads):
    import threading
    import time

    from lens.capture.background import run_parallel

    done, seen = [], []

    def work(group):
        seen.append((group, torch.get_num_threads(), torch.is_inference_mode_enabled(), threading.get_ident()))
        if group in (1, 3):
            time.sleep(0.05 if group == 1 else 0.0)  # the later group fails first in time
            raise ValueError(f"group {group}")
        done.append(group)

    with pytest.raises(ValueError, match="group 1"):
        run_parallel(work, [0, 1, 2, 3, 4])
    assert sorted(done) == [0, 2, 4]  # every other group still ran to the end
    assert all(threads == 1 and inference for _, threads, inference, _ in seen)
    used = {ident for *_, ident in seen}
    assert (threading.get_ident() in used) == (torch_threads == 1)  # one thread: the caller's own
    assert torch.get_num_threads() == torch_threads  # the caller keeps its threads
