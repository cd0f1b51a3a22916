"""The numerical building blocks of the valley and the massive-activation statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lens.analysis.valley import massive_activation_bound
from lens.capture.spectra import center_and_normalize_rows, entropy_from_spectrum, lower_median, renyi_entropy, squared_singular_values


@pytest.mark.parametrize("shape", [(10, 4), (4, 10), (300, 64)])
def test_squared_singular_values_match_svdvals(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(squared_singular_values(x).numpy(), (torch.linalg.svdvals(x.double()) ** 2).numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "values",
    [
        torch.randn(300_001, generator=torch.Generator().manual_seed(0)).abs(),
        torch.randn(2048 * 768, generator=torch.Generator().manual_seed(1)).abs(),
        torch.zeros(100_000),
        torch.randint(0, 3, (200_000,), generator=torch.Generator().manual_seed(2)).float(),  # massive ties
        torch.cat([torch.zeros(70_000), torch.full((70_001,), 5.0)]),
        torch.arange(100_000, dtype=torch.float32).flip(0),
        torch.tensor([3.0, 1.0, 2.0, 4.0]),
        torch.tensor([7.0]),
        torch.tensor([2.0, float("inf"), 1.0, float("inf")]),
        (torch.randn(5_001, generator=torch.Generator().manual_seed(5)) * 100).half(),
        (torch.randn(5_000, generator=torch.Generator().manual_seed(6)) * 100).bfloat16(),
        torch.randn(4_097, generator=torch.Generator().manual_seed(7), dtype=torch.float64),
    ],
)
def test_lower_median_equals_torch_median(values):
    got = lower_median(values)
    assert got.dtype == values.dtype and got == values.median()


@pytest.mark.parametrize("where", [0, 2_500, 4_999])
def test_lower_median_of_values_with_a_nan_is_nan_like_torch_median(where):
    values = torch.rand(5_000, generator=torch.Generator().manual_seed(8))
    values[where] = float("nan")
    assert torch.isnan(values.median()) and torch.isnan(lower_median(values))


def test_entropy_definitions():
    assert renyi_entropy(np.full(4, 0.25)) == pytest.approx(math.log(4))
    assert renyi_entropy(np.full(4, 0.25), alpha=2.0) == pytest.approx(math.log(4))  # uniform: every α agrees
    p = np.array([0.7, 0.2, 0.1])
    assert renyi_entropy(p, 2.0) == pytest.approx(-math.log((p**2).sum()))
    assert renyi_entropy(p, 0.5) > renyi_entropy(p, 1.0) > renyi_entropy(p, 2.0)
    h, p1 = entropy_from_spectrum(np.array([3.0, 1.0, 0.0]))
    assert p1 == 0.75 and h == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_normalized_rows_are_centered_unit_vectors():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(3)) + 4.0
    z = center_and_normalize_rows(x)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(50))
    same = center_and_normalize_rows(torch.ones(3, 4))  # every row equals the mean: zeros, not NaN
    assert torch.isfinite(same).all() and (same == 0).all()


def test_bound_worked_example():
    # x0 = (10, 0), x1 = (0, 1), x2 = (0, 1): M = 100, R = 2, α = 0, c = 50, p = 50/51
    bound = massive_activation_bound(np.array([10.0, 1.0, 1.0]), np.array([1.0, 0.0, 0.0]), rank=2)
    assert bound["p"] == pytest.approx(50 / 51)
    # rank 2: H ≤ −p log p − (1−p) log(1−p) + (1−p) log 1, and the true spectrum is (100, 2): equality
    p = 100 / 102
    assert bound["entropy_upper"] == pytest.approx(-(p * math.log(p) + (1 - p) * math.log(1 - p)))


def test_lower_median_on_a_structured_layer_selects_without_torch_median(monkeypatch):
    """A flattened [T, d] layer whose columns differ in scale, selected by NumPy alone (no torch.median call)."""
    gen = torch.Generator().manual_seed(4)
    layer = torch.randn(2048, 768, generator=gen) * torch.linspace(0.01, 10, 768)
    values = layer.reshape(-1).abs()
    expected = values.median()
    calls = []
    original = torch.Tensor.median
    monkeypatch.setattr(torch.Tensor, "median", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    assert lower_median(values) == expected
    assert not calls, "lower_median fell back to torch.median on a CPU float tensor"
