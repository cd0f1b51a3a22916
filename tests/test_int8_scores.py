"""The int8 scan of LatentLens's refine search: oneDNN's int8 GEMM with the queries packed once
(``lens.kernels.lowbit.Int8QueryScorer``) against exact integer arithmetic, and the group-maximum candidate
selection of ``lens.analysis.search.int8_candidates`` against a brute-force top-depth over every row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lens.analysis.search import VectorStore, int8_candidates, normalize_queries
from lens.kernels.errors import ConfigError
from lens.kernels.lowbit.int8_scores import Int8QueryScorer


def _exact(rows: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    return (rows.to(torch.int64) @ queries.to(torch.int64).T).to(torch.float64)


@pytest.mark.parametrize("backend", [None, "int_mm"])
@pytest.mark.parametrize("q,d,n", [(1, 8, 1), (3, 64, 10), (288, 576, 1000), (17, 1024, 33)])
def test_scores_equal_exact_integer_dot_products(backend, q, d, n):
    g = torch.Generator().manual_seed(q * 1000 + d + n)
    queries = torch.randint(-127, 128, (q, d), generator=g, dtype=torch.int8)
    rows = torch.randint(-127, 128, (n, d), generator=g, dtype=torch.int8)
    scorer = Int8QueryScorer(queries, backend=backend)
    got = scorer.scores(rows)
    assert got.dtype == torch.float32 and got.shape == (n, q)
    assert torch.equal(got.double(), _exact(rows, queries))


def test_extreme_codes_are_exact_and_the_kernel_is_the_packed_one_where_torch_has_it():
    d = 1024  # the largest dimension whose dot products all fit float32 exactly
    queries = torch.stack([torch.full((d,), 127), torch.full((d,), -127), torch.full((d,), -128)]).to(torch.int8)
    rows = torch.stack([torch.full((d,), -128), torch.full((d,), 127), torch.zeros(d)]).to(torch.int8)
    scorer = Int8QueryScorer(queries)
    assert torch.equal(scorer.scores(rows).double(), _exact(rows, queries))
    if torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack"):
        assert scorer.backend == "onednn"


def test_bad_operands_get_a_config_error():
    with pytest.raises(ConfigError, match="int8"):
        Int8QueryScorer(torch.zeros(2, 4))
    scorer = Int8QueryScorer(torch.zeros(2, 4, dtype=torch.int8))
    with pytest.raises(ConfigError, match=r"int8 \[n, 4\]"):
        scorer.scores(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ConfigError, match="backend"):
        Int8QueryScorer(torch.zeros(2, 4, dtype=torch.int8), backend="cuda")


@pytest.mark.parametrize("chunk_rows,group", [(4096, 32), (700, 8), (97, 4), (50, 32)])
def test_group_selection_keeps_exactly_the_best_rows_of_the_int8_pass(chunk_rows, group):
    """Blocks of every shape — whole groups, a ragged tail, blocks too small to group, ranges starting and
    ending mid-block — keep the same top-``depth`` rows as sorting every row's int8 score."""
    g = np.random.default_rng(chunk_rows + group)
    n, d, depth = 3001, 48, 12
    vectors = g.standard_normal((n, d)).astype(np.float32)
    vectors[:, 3] *= 30  # a massive-activation dimension, as real hidden states have
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = VectorStore.from_float(vectors, "int8")
    q = normalize_queries(g.standard_normal((9, d)))
    ranges = [(5, 1203), (1500, 3001)]
    got = int8_candidates(store, q, depth, ranges=ranges, chunk_rows=chunk_rows, group=group).numpy()
    prepared = store.prepare(q)
    q_int = torch.round(prepared / (prepared.abs().amax(1, keepdim=True) / 127)).clamp(-127, 127).to(torch.int8)
    rows = np.r_[np.arange(*ranges[0]), np.arange(*ranges[1])]
    scores = _exact(torch.from_numpy(store.data[rows]), q_int).numpy().T * store.scales[rows].astype(np.float64)
    for i in range(len(q)):
        want = rows[np.argsort(-scores[i], kind="stable")[:depth]]
        kth = np.sort(scores[i])[::-1][depth - 1]
        assert np.sum(scores[i] >= kth) == depth, "the test needs a strict depth-th score"
        assert set(got[i].tolist()) == set(want.tolist())


def test_structured_rotation_is_orthogonal_reproducible_and_spreads_a_massive_coordinate():
    from lens.analysis.search import structured_rotation

    for d in (1, 7, 384, 576):
        r = structured_rotation(d, 0).double()
        np.testing.assert_allclose((r @ r.T).numpy(), np.eye(d), atol=1e-5)
    a, b = structured_rotation(576, 0), structured_rotation(576, 0)
    assert torch.equal(a, b) and not torch.equal(a, structured_rotation(576, 1))
    # a massive activation — all of a row's energy in one dimension — is spread over every dimension
    spread = a.abs().amax(dim=1)  # row i of the matrix = where coordinate i goes
    assert float(spread.max()) < 6 / np.sqrt(576)


def test_centred_rotated_int8_keeps_more_neighbours_of_anisotropic_states_than_per_dimension_scales():
    """States that share a large common direction and carry a massive dimension (as real hidden states do):
    centring + rotation keeps more of the float32 top-5 than per-dimension scales, and rows stay unit."""
    from lens.analysis.search import exact_topk, recall_at_k

    g = np.random.default_rng(0)
    n, d = 20000, 96
    common = g.standard_normal(d)
    x = 0.3 * g.standard_normal((n, d)) + common  # cosine with the common direction ≈ 0.85
    x[:, 5] += 8 * g.random(n)  # a massive activation of varying size
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = g.standard_normal((200, d)) * 0.3 + common
    truth = exact_topk(VectorStore("float16", x.astype(np.float32)), q, 5)[1]  # float32 rows, exact
    new = VectorStore.from_float(x, "int8")
    old = VectorStore.from_float(x, "int8", dim_scales=np.abs(x).max(axis=0))
    np.testing.assert_allclose(np.linalg.norm(new.rows(0, n).numpy(), axis=1), 1.0, atol=1e-5)
    rms = {name: float(np.sqrt(((st.rows(0, n).numpy() - x) ** 2).mean())) for name, st in (("new", new), ("old", old))}
    r_new, r_old = recall_at_k(exact_topk(new, q, 5)[1], truth), recall_at_k(exact_topk(old, q, 5)[1], truth)
    print(f"rms error {rms}; recall@5 vs float32: centred+rotated {r_new:.4f}, per-dimension scales {r_old:.4f}")
    assert rms["new"] < 0.7 * rms["old"] and r_new >= r_old
    # exact search on the int8 store reports cosines with its (unit) reconstructions
    s, i = exact_topk(new, q[:3], 5)
    np.testing.assert_allclose(s, np.einsum("qd,qkd->qk", q[:3] / np.linalg.norm(q[:3], axis=1, keepdims=True),
                                            new.take(i).numpy()), atol=1e-5)
