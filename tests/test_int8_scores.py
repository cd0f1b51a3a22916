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
