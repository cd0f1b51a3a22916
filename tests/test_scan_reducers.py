"""Streaming reducers of lens.scan equal a brute-force computation over every activation, for any sharding
merged in any order (docs/definitions.md, "Corpus scans")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scan_support import SCAN_CORPUS, brute_force, reference_state, topk_from_state

import lens
from lens.scan.config import parse_config
from lens.scan.corpus import windows
from lens.scan.reducers import (
    BIN_TO_GROUP,
    EMPTY_DOC,
    HIST_EDGES,
    N_BINS,
    ZERO_BIN,
    bin_edges,
    merge_state,
    moments_merge,
)
from lens.scan.worker import ShardWorker, empty_state


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    torch.set_num_threads(1)
    return lens.load(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def setup(tiny_llama):
    cfg = parse_config(tiny_llama, layers=None, top_k=5, context=(3, 2), samples=2, batch_size=1, max_len=12,
                       stride=8, shard_size=1, epsilon=0.3, tau=5.0, massive_abs=100.0, massive_rel=1000.0,
                       prepend_bos=None)
    worker = ShardWorker(tiny_llama, cfg)
    docs = list(enumerate(SCAN_CORPUS))
    per_doc = [worker.run_shard(i, [d])[0] for i, d in enumerate(docs)]
    ref = reference_state(brute_force(tiny_llama, cfg, SCAN_CORPUS), cfg)
    return tiny_llama, cfg, per_doc, ref


def _partition(n: int, parts: int, rng) -> list[list[int]]:
    cuts = sorted(rng.choice(np.arange(1, n), size=parts - 1, replace=False)) if parts > 1 else []
    bounds = [0, *cuts, n]
    return [list(range(bounds[i], bounds[i + 1])) for i in range(parts)]


@pytest.mark.parametrize("parts", [1, 3, 7])
def test_any_sharding_in_any_order_equals_brute_force(setup, parts):
    lm, cfg, per_doc, ref = setup
    rng = np.random.default_rng(parts)
    for trial in range(2):
        shards = []
        for docs in _partition(len(per_doc), parts, rng):
            state = empty_state(lm, cfg)
            for d in docs:
                state = merge_state(state, per_doc[d], top_k=cfg.top_k, samples=cfg.samples)
            shards.append(state)
        state = empty_state(lm, cfg)
        into = empty_state(lm, cfg)  # the engines' in-place merge gives the same state
        for i in rng.permutation(len(shards)):  # any order
            state = merge_state(state, shards[i], top_k=cfg.top_k, samples=cfg.samples)
            into = merge_state(into, {k: v.copy() for k, v in shards[i].items()}, top_k=cfg.top_k,
                               samples=cfg.samples, inplace=True)
        for key in state:
            np.testing.assert_array_equal(into[key], state[key], err_msg=key)
        assert (state["neuron.count"] == ref["count"]).all()
        np.testing.assert_allclose(state["neuron.mean"], ref["mean"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(state["neuron.m2"] / ref["count"], ref["var"], rtol=1e-8, atol=1e-12)
        np.testing.assert_array_equal(state["neuron.min"], ref["min"])
        np.testing.assert_array_equal(state["neuron.max"], ref["max"])
        np.testing.assert_array_equal(state["neuron.positive"], ref["positive"])
        np.testing.assert_array_equal(state["neuron.hist"], ref["hist"])
        L, M = state["neuron.mean"].shape
        ties = 0
        for l in range(L):
            for m in range(M):
                got = topk_from_state(state, l, m)
                assert got == ref["topk"][(l, m)], (l, m)
                values = [v for v, _, _ in got]
                ties += len(values) - len(set(values))
        assert ties > 100, "the corpus should plant many exact ties"
        # reservoirs: per (neuron, group) the `samples` lowest priorities among its tokens
        for l in range(L):
            for m in range(0, M, 7):
                groups = BIN_TO_GROUP[ref["bins"][l, :, m]]
                for g in range(groups.max() + 1):
                    want = np.sort(ref["priority"][groups == g])[: cfg.samples]
                    got = state["sample.priority"][l, m, g]
                    assert list(got[got < np.iinfo(np.int64).max]) == list(want), (l, m, g)


def test_the_whole_scan_equals_brute_force_too(setup, tmp_path):
    lm, cfg, per_doc, ref = setup
    s = lens.scan(lm, SCAN_CORPUS, out=tmp_path / "s", top_k=5, context=(3, 2), samples=2, batch_size=3, max_len=12,
                  stride=8, shard_size=4, progress=False)
    assert s.tokens == ref["count"] and s.documents == len(SCAN_CORPUS)
    np.testing.assert_allclose(s.arrays["neuron.mean"], ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s.std() ** 2, ref["var"], rtol=1e-4, atol=1e-7)
    assert (s.arrays["neuron.hist"].sum(-1) == ref["count"]).all()
    frame = s.examples(1, 17)
    want = ref["topk"][(1, 17)]
    assert [int(d) for d in frame["doc"]] == [d for _, d, _ in want]  # batching changes no document choice here
    assert (frame["context_ids"].map(len) == 6).all()


def test_histogram_edges_are_fixed_and_cover_every_value():
    lower, upper = bin_edges()
    assert len(lower) == N_BINS and lower[ZERO_BIN] == upper[ZERO_BIN] == 0
    assert np.all(np.diff(lower[np.isfinite(lower)]) >= 0) and np.all(np.diff(upper[np.isfinite(upper)]) >= 0)
    values = torch.tensor([-2e4, -1e4, -3.0, -1e-5, 0.0, 1e-5, 1e-4, 0.5, 3.0, 1e4, 5e4])
    from lens.scan.reducers import hist_bins

    bins = hist_bins(values).numpy()
    for v, b in zip(values.tolist(), bins):
        assert (lower[b] <= v <= upper[b]) if v != 0 else b == ZERO_BIN
    assert len(HIST_EDGES) == 33


def test_chan_merge_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=1000)
    parts = np.split(x, [10, 400, 401])
    n, mean, m2 = 0, 0.0, 0.0
    for p in parts:
        n, mean, m2 = moments_merge(n, mean, m2, len(p), p.mean(), ((p - p.mean()) ** 2).sum())
    assert n == 1000 and np.isclose(mean, x.mean()) and np.isclose(m2 / n, x.var())


def test_compiled_reducers_equal_torch_on_edges_and_extremes():
    """The compiled pass (lens.scan.fused) bins by a 16-bit lookup table: it must equal hist_bins (a binary search
    over the float32 edges) for values at, just above and just below every edge, ±0, ±inf, subnormals, and
    random values over 12 decades; its moments, extremes and per-document best equal numpy's."""
    from lens.scan.fused import reduce_layer
    from lens.scan.reducers import RESERVOIR_GROUPS, hist_bins

    rng = np.random.default_rng(0)
    e = HIST_EDGES
    up, down = np.nextafter(e, np.float32(np.inf)), np.nextafter(e, np.float32(0))
    special = np.concatenate([e, -e, up, -up, down, -down, [0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3e38, -3e38]])
    noise = rng.standard_normal((400, 300)) * 10 ** rng.uniform(-6, 6, (400, 300))
    a = np.concatenate([noise, np.resize(special, 600).reshape(2, 300)]).astype(np.float32)
    finite = np.where(np.isfinite(a), a, 0).astype(np.float32)
    n = a.shape[0]
    doc = np.repeat(np.arange(3), [150, 150, n - 300])
    pos = np.arange(n)
    r = reduce_layer(a, np.arange(n), doc, pos, 3, 2, RESERVOIR_GROUPS, HIST_EDGES, BIN_TO_GROUP, ZERO_BIN, N_BINS)
    bins = hist_bins(torch.from_numpy(a)).numpy()
    want = np.stack([np.bincount(bins[:, m], minlength=N_BINS) for m in range(a.shape[1])])
    np.testing.assert_array_equal(r["hist"], want)
    np.testing.assert_array_equal(r["positive"], (a > 0).sum(0))
    np.testing.assert_array_equal(r["min"], a.min(0))
    np.testing.assert_array_equal(r["max"], a.max(0))
    r = reduce_layer(finite, np.arange(n), doc, pos, 3, 2, RESERVOIR_GROUPS, HIST_EDGES, BIN_TO_GROUP, ZERO_BIN, N_BINS)
    x = finite.astype(np.float64)
    np.testing.assert_allclose(r["mean"], x.mean(0), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(r["m2"], ((x - x.mean(0)) ** 2).sum(0), rtol=1e-9)
    for d in range(3):
        rows = np.flatnonzero(doc == d)
        np.testing.assert_array_equal(r["docbest"][d], rows[np.argmax(finite[rows], axis=0)])  # first maximum wins


@pytest.mark.parametrize("threads", [2, 3])
def test_compiled_reducers_split_over_threads_are_bit_identical(threads):
    """With several torch threads the compiled pass splits the neurons into disjoint ranges run at once; every
    output (moments, extremes, histograms, per-document best, reservoir picks) equals the one-thread pass bit for
    bit, for a neuron count that no split divides evenly."""
    from lens.scan.fused import reduce_layer
    from lens.scan.reducers import RESERVOIR_GROUPS

    rng = np.random.default_rng(1)
    n, m = 257, 64 * threads + 37
    a = (rng.standard_normal((n, m)) * 10 ** rng.uniform(-3, 3, (n, m))).astype(np.float32)
    a[rng.random((n, m)) < 0.2] = 0.0  # ties at zero: the per-document best must still pick the first
    doc = np.sort(rng.integers(0, 5, n))
    pos = np.concatenate([np.arange((doc == d).sum()) for d in range(5)])
    order = rng.permutation(n)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = reduce_layer(a, order, doc, pos, 5, 3, RESERVOIR_GROUPS, HIST_EDGES, BIN_TO_GROUP, ZERO_BIN, N_BINS)
        torch.set_num_threads(threads)
        split = reduce_layer(a, order, doc, pos, 5, 3, RESERVOIR_GROUPS, HIST_EDGES, BIN_TO_GROUP, ZERO_BIN, N_BINS)
    finally:
        torch.set_num_threads(before)
    assert set(one) == set(split)
    for name in one:
        np.testing.assert_array_equal(split[name], one[name], err_msg=name)
    assert (one["chosen"] >= 0).sum() > m  # the reservoirs did pick tokens


@pytest.fixture(scope="module")
def contexts(setup):
    """Every counted token's document context (from the brute force), and the window that counts it."""
    lm, cfg, _, _ = setup
    bf = brute_force(lm, cfg, SCAN_CORPUS)
    ctx = {(int(d), int(p)): list(c) for d, p, c in zip(bf["doc"], bf["pos"], bf["ctx"])}
    worker = ShardWorker(lm, cfg)
    counted_by = {}
    for doc, ids in enumerate(worker.tokenize(SCAN_CORPUS)):
        for w in windows(doc, ids, cfg.max_len, cfg.stride, repeat_first=ids[0] in worker.specials):
            for t in range(w.keep, len(w.ids)):
                counted_by[(doc, w.position(t))] = w
    return ctx, counted_by


def test_contexts_are_the_documents_tokens_wherever_the_windows_were_cut(setup, contexts):
    """Top-k and sample contexts hold the document's tokens around the position — also beside a window's edge,
    where the tokens after it are held only by the next window (found by a new-user trial at stop 24: the
    context was cut from the window, so the after-context of a token at a window's end came back empty and
    continuation windows showed their repeated BOS mid-document); context activations are the counting
    window's own, NaN where only another window holds the token."""
    lm, cfg, per_doc, _ = setup
    ctx, counted_by = contexts
    state = empty_state(lm, cfg)
    for part in per_doc:
        state = merge_state(state, part, top_k=cfg.top_k, samples=cfg.samples)
    before = cfg.context[0]
    L, M = state["neuron.mean"].shape
    at_edges = checked = 0
    for l in range(L):
        for m in range(M):
            live = state["topk.doc"][l, m] != EMPTY_DOC
            for s in np.nonzero(live)[0]:
                d, p = int(state["topk.doc"][l, m, s]), int(state["topk.pos"][l, m, s])
                assert list(state["topk.tokens"][l, m, s]) == ctx[(d, p)], (l, m, s)
                w = counted_by[(d, p)]
                acts = state["topk.acts"][l, m, s]
                for c, q in enumerate(range(p - before, p - before + cfg.width)):
                    inside = w.start <= q < w.start + len(w.ids) - w.prefix
                    assert np.isnan(acts[c]) != inside, (l, m, s, c)
                    at_edges += ctx[(d, p)][c] >= 0 and not inside
                assert acts[before] == state["topk.value"][l, m, s]
                checked += 1
            ok = state["sample.priority"][l, m] < np.iinfo(np.int64).max
            for g, r in zip(*np.nonzero(ok)):
                key = (int(state["sample.doc"][l, m, g, r]), int(state["sample.pos"][l, m, g, r]))
                assert list(state["sample.tokens"][l, m, g, r]) == ctx[key], (l, m, g, r)
    assert checked > 1000 and at_edges > 100, "the corpus should put many examples beside a window's edge"
