"""Planted phenomena: weights chosen so that the right answer is known in closed form.

* A sink head: in a tiny GPT-2, layer 0 head 2 gives token 0 the logit ``log(4q)`` above every other
  key for query q ≥ 1, so every query q ≥ 1 puts exactly 4q/(4q + q) = 0.8 of its attention on token 0
  (query 0 can only see itself). ``lens.sinks`` must report that head — and no other — with sink score
  (1 + 0.8 (T − 1)) / T.
* A massive activation: position 0's embedding is 500·e₇ while the other positions are orthonormal
  vectors orthogonal to e₇ (α = 0 in the bound of docs/definitions.md#massive-activation-bound, flat remaining spectrum), so the raw entropy
  must equal the Queipo-de-Llano bound exactly, and drop far below the same model without the spike.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import build_tiny

import lens

D, HEAD_DIM, SINK_LAYER, SINK_HEAD = 64, 16, 0, 2
FEATURE_Q, FEATURE_K, COMPENSATE = 0, 1, 2


def _unit_variance_row(features: dict[int, float]) -> torch.Tensor:
    """A row with the given features, zero mean and unit (population) variance, so LayerNorm with
    weight 1 and bias 0 leaves it (almost exactly) unchanged."""
    row = torch.zeros(D)
    for dim, value in features.items():
        row[dim] = value
    row[COMPENSATE] = -sum(features.values())
    used = float((row**2).sum())
    assert used < D, "features too large for a unit-variance row"
    free = torch.arange(4, 4 + 60)  # 60 dims in ± pairs: zero sum
    c = math.sqrt((D - used) / 60)
    row[free] = c * torch.tensor([1.0, -1.0] * 30)
    return row


def _plant_sink(model):
    transformer = model.transformer
    transformer.wte.weight.zero_()  # only positions matter
    for p in range(transformer.wpe.weight.shape[0]):
        a = math.log(4 * p) if p >= 1 else 0.0
        b = 1.0 if p == 0 else 0.0
        transformer.wpe.weight[p] = _unit_variance_row({FEATURE_Q: a, FEATURE_K: b}) if p < 64 else 0.0
    block = transformer.h[SINK_LAYER]
    block.ln_1.weight.fill_(1.0)
    block.ln_1.bias.zero_()
    w = block.attn.c_attn.weight  # Conv1D: [in, 3·D] → q | k | v
    bias = block.attn.c_attn.bias
    q_cols = slice(SINK_HEAD * HEAD_DIM, (SINK_HEAD + 1) * HEAD_DIM)
    k_cols = slice(D + SINK_HEAD * HEAD_DIM, D + (SINK_HEAD + 1) * HEAD_DIM)
    w[:, q_cols] = 0.0
    w[:, k_cols] = 0.0
    bias[q_cols] = 0.0
    bias[k_cols] = 0.0
    w[FEATURE_Q, q_cols.start] = math.sqrt(HEAD_DIM)  # cancels the 1/√d scaling: score = a_q · b_k
    w[FEATURE_K, k_cols.start] = 1.0


@pytest.fixture(scope="module")
def planted_sink(tmp_path_factory):
    folder = build_tiny("gpt2", tmp_path_factory.mktemp("planted-sink"), init=_plant_sink)
    return lens.load(folder)


def test_planted_sink_head_is_found_with_its_mass(planted_sink):
    lengths = [40, 33, 47]
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in lengths]
    run = lens.trace(planted_sink, inputs, batch_size=3, progress=False)
    result = lens.sinks(run)
    expected = np.array([(1 + 0.8 * (n - 1)) / n for n in lengths])
    np.testing.assert_allclose(result.sink_score[:, SINK_LAYER, SINK_HEAD], expected, atol=1e-4)
    assert abs(result.mean_sink_score[SINK_LAYER, SINK_HEAD] - 0.8) <= 0.01
    assert result.sink_heads == [(SINK_LAYER, SINK_HEAD)]
    # every query q ≥ 1 of the planted head puts exactly 0.8 on token 0: the kept pattern shows it
    run_p = lens.trace(planted_sink, inputs[:1], keep_patterns=[(SINK_LAYER, SINK_HEAD)], progress=False)
    pattern = run_p.pattern(SINK_LAYER, SINK_HEAD, 0)
    np.testing.assert_allclose(pattern[1:, 0], 0.8, atol=1e-4)
    np.testing.assert_allclose(pattern.sum(1), 1.0, atol=1e-5)
    heads = result.to_frame("heads")
    assert heads.loc[heads["is_sink_head"], ["layer", "head"]].values.tolist() == [[SINK_LAYER, SINK_HEAD]]
    tokens = result.to_frame("sink_tokens")
    planted = tokens[(tokens["layer"] == SINK_LAYER) & (tokens["head"] == SINK_HEAD)]
    assert set(planted["position"]) == {0}


SPIKE_DIM, SPIKE = 7, 500.0


def _orthonormal_rows(n: int, exclude: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D - 1, D - 1, generator=gen, dtype=torch.float64))
    rows = torch.zeros(n, D, dtype=torch.float64)
    keep = [d for d in range(D) if d != exclude]
    rows[:, keep] = basis[:n]
    return rows.float()


def _plant_massive(variant: str):
    def init(model):
        transformer = model.transformer
        transformer.wte.weight.zero_()
        rows = _orthonormal_rows(48, SPIKE_DIM, seed=1)
        if variant == "uneven":  # α = 0 but the other tokens' spectrum is not flat
            rows = rows * torch.linspace(1.0, 5.0, 48)[:, None]
        transformer.wpe.weight.zero_()
        transformer.wpe.weight[1:49] = rows
        first = torch.zeros(D)
        first[SPIKE_DIM] = SPIKE
        if variant == "tilted":  # x₀ leans towards ten other tokens: α > 0
            first = first + 0.3 * SPIKE * rows[:10].sum(0)
        transformer.wpe.weight[0] = first

    return init


def _no_spike(model):
    _plant_massive("tight")(model)
    model.transformer.wpe.weight[0] = _orthonormal_rows(49, SPIKE_DIM, seed=1)[48]


@pytest.mark.parametrize("variant", ["tight", "uneven", "tilted"])
def test_massive_activation_drops_entropy_and_meets_the_bound(variant, tmp_path):
    ids = list(range(3, 3 + 40))
    spiked = lens.load(build_tiny("gpt2", tmp_path / "spiked", init=_plant_massive(variant)))
    flat = lens.load(build_tiny("gpt2", tmp_path / "flat", init=_no_spike))
    run = lens.trace(spiked, ids, progress=False)
    base = lens.trace(flat, ids, progress=False)

    massive = lens.sinks(run).to_frame("massive")
    top = massive[(massive.layer == 0) & (massive["rank"] == 0)].iloc[0]
    assert (top.position, top.dim) == (0, SPIKE_DIM)
    assert top.abs_value == pytest.approx(SPIKE)  # the other rows have no e₇ component: the spike stays 500
    assert top.is_massive  # > 100 and > 1000 × median
    assert lens.sinks(run).first_norm_ratio[0, 0] > 100

    v, v0 = lens.valley(run), lens.valley(base)
    h, h_flat = v.values["entropy_raw"][0, 0], v0.values["entropy_raw"][0, 0]
    assert h < 0.05 * h_flat, "the spike must collapse the raw entropy"
    bound = v.values["entropy_upper_bound"][0, 0]
    # the bounds hold (up to fp32 round-off of the hidden states when they are met with equality)
    assert h <= bound * (1 + 1e-6)
    assert v.values["anisotropy"][0, 0] >= v.values["anisotropy_lower_bound"][0, 0] * (1 - 1e-9)
    assert v.values["sigma1_sq"][0, 0] >= v.values["sigma1_sq_lower_bound"][0, 0] * (1 - 1e-6)
    alpha = v.values["bound_alpha"][0, 0]
    if variant == "tight":
        assert alpha == pytest.approx(0.0, abs=1e-10)
        assert h == pytest.approx(bound, rel=1e-5, abs=1e-7)  # α = 0 and a flat remaining spectrum: equality
        assert v.values["anisotropy"][0, 0] == pytest.approx(v.values["anisotropy_lower_bound"][0, 0], rel=1e-6)
    elif variant == "uneven":
        assert alpha == pytest.approx(0.0, abs=1e-10)
        assert (bound - h) / bound > 0.01  # a bound, visibly not met with equality
    else:
        assert alpha > 0.01
        first_norm_sq = float(run.arrays["resid.norm"][0, 0]) ** 2
        # the other tokens' alignment with x₀ lifts σ₁² above ‖x₀‖², and the bound M + αR accounts for it
        assert v.values["sigma1_sq_lower_bound"][0, 0] > first_norm_sq + 0.1
        assert v.values["sigma1_sq"][0, 0] >= v.values["sigma1_sq_lower_bound"][0, 0] * (1 - 1e-6)
