"""The deployment path through the public API: lens.load(attention=..., quant=...) and lens.compare."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lens
from lens.errors import ConfigError, LensError
from lens.kernels.lowbit import QuantLinear
from lens.models.deploy import EveryBlockKeptWarning

TEXTS = [
    "Attention sinks appear on the first token.",
    "Sparse attention skips blocks whose scores are small, keeping the sink and a local window of recent tokens.",
    "The quick brown fox.",
]


@pytest.fixture(scope="module")
def dense_minilm_run(minilm):
    return lens.trace(minilm, TEXTS, keep_hidden="all", progress=False)


@pytest.mark.parametrize("scheme, bits", [("nvfp4", 4.5), ("int4", 4.1875), ("int8", 8.0625), ("ternary", 1.6)])
def test_quantized_minilm_is_what_gets_traced(scheme, bits, dense_minilm_run):
    lm = lens.load(quant=scheme)
    replaced = [m for m in lm.model.modules() if isinstance(m, QuantLinear)]
    assert len(replaced) == 6 * 6 + 1  # q, k, v, attention out, intermediate, output per layer + pooler
    prov = lm.provenance()
    assert prov["quant"]["scheme"] == scheme
    # resident weight bytes match the format's bits/weight within 5% (docs/benchmarks.md)
    assert prov["quant_report"]["bits_per_weight"] == pytest.approx(bits, rel=0.05)
    assert prov["quant_report"]["weight_bytes_after"] < prov["quant_report"]["weight_bytes_before"] * bits / 32 * 1.05

    # the MLP probe reads the quantized model's own activations (after GELU, input of the packed layer)
    seen = {}
    handle = lm.model.encoder.layer[3].intermediate.register_forward_hook(lambda m, a, o: seen.setdefault("act", o))
    run = lens.trace(lm, TEXTS[:1], keep_hidden="all", progress=False)
    handle.remove()
    act = seen["act"][0]
    np.testing.assert_allclose(run.arrays["mlp.max"][3], act.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
    assert run.provenance["quant"]["scheme"] == scheme

    full = lens.trace(lm, TEXTS, keep_hidden="all", progress=False)
    result = lens.compare(dense_minilm_run, full)
    assert result.labels == ("dense", f"dense + {scheme}")
    assert np.all(result.hidden_rel_error[1:] > 0), "quantized weights must change the hidden states"
    if scheme in ("nvfp4", "int8", "int4"):
        assert np.nanmin(result.hidden_cosine) > 0.9
        assert np.nanmax(np.abs(result.sink_delta)) < 0.2
    if scheme == "int8":
        assert np.nanmax(result.hidden_rel_error) < 0.05


def test_sparse_keeping_every_block_equals_dense(tiny_model_dir):
    """With top-k = 1 the sparse kernel computes every allowed block: the run equals the dense one."""
    folder = tiny_model_dir("qwen2")  # GQA, RoPE, causal; the batch is padded
    dense = lens.trace(lens.load(folder), TEXTS, batch_size=3, keep_patterns=[(1, 2)], progress=False)
    config = lens.Sparse(mode="topk", topk=1.0, block_q=16, block_k=16, keep_sink_block=True, local_blocks=1)
    sparse_lm = lens.load(folder, attention=config)
    with pytest.warns(EveryBlockKeptWarning, match="computed dense attention"):  # and the user is told
        sparse = lens.trace(sparse_lm, TEXTS, batch_size=3, keep_patterns=[(1, 2)], progress=False)
    assert sparse.meta["sparse_every_block_kept"] is True
    for name in ("attn.key_mass", "attn.query_count", "resid.norm", "mlp.sum"):
        np.testing.assert_allclose(sparse.arrays[name], dense.arrays[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(sparse.pattern(1, 2, 1), dense.pattern(1, 2, 1), atol=1e-5)
    np.testing.assert_allclose(sparse.arrays["attn.kept_fraction"], 1.0)
    assert sparse.provenance["attention"]["kind"] == "sparse"
    assert sparse.provenance["attention"]["topk"] == 1.0


def test_sparse_run_reports_density_and_stays_normalized(tiny_model_dir):
    folder = tiny_model_dir("llama")
    ids = torch.randint(3, 300, (2, 96), generator=torch.Generator().manual_seed(0))
    config = lens.Sparse(mode="topk", topk=0.3, block_q=16, block_k=16, keep_sink_block=True, local_blocks=1)
    lm = lens.load(folder, attention=config)
    run = lens.trace(lm, ids, keep_patterns=[(0, 1)], progress=False)
    kept = run.arrays["attn.kept_fraction"]
    assert kept.shape == (lm.n_layers, 2, lm.n_heads)
    assert np.all((kept > 0) & (kept < 1)), "a 30% top-k must skip blocks at T = 96"
    pattern = run.pattern(0, 1, 0)
    np.testing.assert_allclose(pattern.sum(1), 1.0, atol=1e-5)  # renormalized over kept blocks
    skipped = (pattern == 0) & np.tril(np.ones_like(pattern, dtype=bool))
    assert skipped.any(), "some causal entries were skipped"
    # the column sums are those of the same renormalized probabilities
    np.testing.assert_allclose(run.arrays["attn.key_mass"][0, 1, run.span(0)], pattern.sum(0), atol=1e-5)
    # outside a trace the model runs the same sparse kernel (deployed path), and gives finite logits
    with torch.no_grad():
        assert torch.isfinite(lm.model(ids).logits).all()


def test_compare_language_models_kl_and_top1(tiny_model_dir):
    folder = tiny_model_dir("gpt2")
    dense_lm = lens.load(folder)
    int4_lm = lens.load(folder, quant="int4")
    dense = lens.trace(dense_lm, TEXTS, capture=("attention", "residual", "logits"), keep_hidden="all", progress=False)
    int4 = lens.trace(int4_lm, TEXTS, capture=("attention", "residual", "logits"), keep_hidden="all", progress=False)
    same = lens.compare(dense, dense)
    assert same.kl == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0
    result = lens.compare(dense, int4)
    # independent reference: the two models' own logits on the same tokens
    ids = torch.tensor([dense.arrays["token_ids"][dense.span(1)].tolist()])
    with torch.no_grad():
        pa = torch.log_softmax(dense_lm.model(ids).logits[0].double(), -1)
        pb = torch.log_softmax(int4_lm.model(ids).logits[0].double(), -1)
    kl_ref = (pa.exp() * (pa - pb)).sum(-1).numpy()
    np.testing.assert_allclose(result.kl_per_token[dense.span(1)], kl_ref, rtol=1e-3, atol=1e-6)
    assert result.kl > 0
    assert result.top1_agreement == pytest.approx(
        float((np.concatenate([result.run_a.arrays["logits.logprobs"].argmax(1)]) ==
               result.run_b.arrays["logits.logprobs"].argmax(1)).mean()))
    frame = result.to_frame("tokens")
    assert len(frame) == int(dense.lengths.sum())
    assert set(result.to_frame("heads").columns) >= {"layer", "head", "sink_delta"}
    result.figure()


def test_compare_refuses_different_inputs(dense_minilm_run, minilm):
    other = lens.trace(minilm, TEXTS[:2], progress=False)
    with pytest.raises(LensError, match="same inputs"):
        lens.compare(dense_minilm_run, other)
    with pytest.raises(ConfigError):
        lens.compare(dense_minilm_run, "not a run")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: lens.Sparse(topk=0), r"\(0, 1\]"),
        (lambda: lens.Sparse(topp=1.5), r"\(0, 1\]"),
        (lambda: lens.Sparse(block_q=24), "multiple of 16"),
        (lambda: lens.Sparse(mode="random"), "topk, topp, hybrid"),
        (lambda: lens.load(attention="bogus"), "lens.Sparse"),
        (lambda: lens.load(quant="fp3"), "nvfp4"),
        (lambda: lens.load(quant="w8a8-smooth"), "calibration"),
    ],
)
def test_invalid_deployment_configs(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_smoothquant_with_calibration(minilm):
    lm = lens.load(quant="w8a8-smooth", calibration=TEXTS)
    run = lens.trace(lm, TEXTS[:1], progress=False)
    assert run.provenance["quant"]["smooth_alpha"] == 0.5 and run.provenance["quant"]["act_bits"] == 8
    assert np.isfinite(run.arrays["attn.key_mass"]).all()
