"""LatentLens search over text banks: exact search against brute-force numpy, the global merge against the
latentlens package's own search, approximate (FAISS IVF) recall against exact on a real SmolLM2 bank, the
logit and embedding lenses against the model's own logits and numpy, and the errors for bad input.

Ties (docs/definitions.md, "Visual tokens / LatentLens"): results are ordered by cosine descending, then by
bank row ascending. The brute-force reference is float64 numpy; rows whose cosines differ by less than the
float32 rounding of the search (1e-5) may be ordered differently, and are compared as sets.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lens
from lens.analysis.ivf import IVFIndex
from lens.analysis.search import VectorStore, exact_topk, recall_at_k, refine_topk
from lens.analysis.textbank import TextBank, sample_corpus
from lens.errors import BankMismatchError, ConfigError, InputError, LensError


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, rows: np.ndarray | None = None):
    """float64 numpy: cosine of normalized queries with every row, sorted by (score desc, row asc)."""
    q = queries.astype(np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    rows = np.arange(len(vectors)) if rows is None else rows
    scores = q @ vectors[rows].astype(np.float64).T
    order = np.lexsort((np.broadcast_to(rows, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), rows[order]


def assert_same_neighbours(got_scores, got_ids, want_scores, want_ids, tol=1e-5):
    np.testing.assert_allclose(got_scores, want_scores, atol=tol)
    for gs, gi, ws, wi in zip(got_scores, got_ids, want_scores, want_ids):
        gaps = np.abs(np.diff(ws)) > tol  # positions whose order float32 cannot blur
        clear = np.r_[True, gaps] & np.r_[gaps, ws[-1] - tol > -np.inf]
        np.testing.assert_array_equal(gi[clear], wi[clear])
        assert set(gi[np.abs(gs - ws[-1]) > tol].tolist()) <= set(wi.tolist())


@pytest.fixture(scope="module")
def minilm_bank(minilm):
    return TextBank.build(minilm, sample_corpus()[:120], layers=[2, 4, 6], per_type_cap=20, seed=0, progress=False)


@pytest.fixture(scope="module")
def smollm2_bank(smollm2):
    return TextBank.build(smollm2, sample_corpus()[:240], layers=[4, 12], per_type_cap=20, seed=0, progress=False)


# -- exact search -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_exact_search_equals_brute_force_numpy(minilm_bank, dtype):
    bank = minilm_bank.astype(dtype)
    vectors = bank.store.rows(0, len(bank)).numpy()  # the stored rows, as float32
    rng = np.random.default_rng(0)
    queries = np.concatenate([vectors[rng.choice(len(bank), 20)] + 0.05 * rng.standard_normal((20, bank.d_model)),
                              rng.standard_normal((5, bank.d_model))]).astype(np.float32)
    for k in (1, 5, 37):
        found = bank.search(queries, k=k)
        want_s, want_i = brute_force(vectors, queries, k)
        assert_same_neighbours(found.scores, found.ids, want_s, want_i)
    # several chunks: the streamed merge gives the same answer as one block
    s1, i1 = exact_topk(bank.store, queries, 7, chunk_rows=97)
    s2, i2 = exact_topk(bank.store, queries, 7, chunk_rows=10**6)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_exact_ties_are_ordered_by_row():
    # one-hot queries read one coordinate of each row exactly: equal coordinates are exact ties
    d, n = 8, 600
    rng = np.random.default_rng(1)
    vectors = rng.choice([0.0, 0.25, 0.5, 1.0], size=(n, d)).astype(np.float16)
    store = VectorStore("float16", vectors)
    queries = np.eye(d, dtype=np.float32)
    scores, ids = exact_topk(store, queries, k=40, chunk_rows=64)
    for j in range(d):
        want = np.lexsort((np.arange(n), -vectors[:, j].astype(np.float64)))[:40]
        np.testing.assert_array_equal(ids[j], want)  # equal values: smaller row first, across chunk borders
        assert len(np.unique(scores[j])) < 40  # the case really has ties


def test_global_top_k_is_merged_across_bank_layers(minilm_bank):
    bank = minilm_bank
    vectors = bank.store.rows(0, len(bank)).numpy()
    queries = vectors[::50] + 0.1
    found = bank.search(queries, k=5)
    assert len(np.unique(bank.layer[found.ids])) > 1  # neighbours come from several layers
    want_s, want_i = brute_force(vectors, queries, 5)
    assert_same_neighbours(found.scores, found.ids, want_s, want_i)
    only = bank.search(queries, k=5, layers=[4])
    a, b = bank.layer_range(4)
    want_s, want_i = brute_force(vectors, queries, 5, rows=np.arange(a, b))
    assert_same_neighbours(only.scores, only.ids, want_s, want_i)
    frame = found.to_frame()
    assert list(frame.columns[:4]) == ["query", "rank", "cosine", "token"]
    assert frame["context"].str.contains(r"\[\[").all()
    assert "Neighbours(" in repr(found)


def test_merge_matches_the_latentlens_package(minilm_bank):
    latentlens = pytest.importorskip("latentlens")  # installed with --no-deps (it requires torchvision)
    bank = minilm_bank
    layers_data = {}
    for layer in bank.layers:
        a, b = bank.layer_range(layer)
        layers_data[layer] = {"embeddings": bank.store.rows(a, b).float(),
                              "metadata": [{"token_id": int(t), "position": int(p)} for t, p in
                                           zip(bank.token_id[a:b], bank.position[a:b])]}
    index = latentlens.ContextualIndex(layers_data)
    queries = bank.store.rows(0, len(bank)).numpy()[::40] + 0.2
    theirs = index.search(torch.from_numpy(queries), top_k=5)
    ours = bank.search(queries, k=5)
    for q, neighbours in enumerate(theirs):
        np.testing.assert_allclose([n.similarity for n in neighbours], ours.scores[q], atol=1e-5)
        assert [n.contextual_layer for n in neighbours][:1] == [int(bank.layer[ours.ids[q, 0]])]
        assert [n.token_id for n in neighbours][:1] == [int(bank.token_id[ours.ids[q, 0]])]


# -- approximate search -------------------------------------------------------------------------------


def _held_out_queries(smollm2) -> np.ndarray:
    """SmolLM2's states of held-out sentences (not in the bank) at two of the bank's layers."""
    held_out = sample_corpus()[4000:4012]
    run = lens.trace(smollm2, held_out, capture=("residual",), keep_hidden=[4, 12], progress=False)
    return np.concatenate([run.arrays["resid.hidden.4"], run.arrays["resid.hidden.12"]])


@pytest.mark.slow
def test_approximate_recall_at_5_on_a_real_smollm2_bank(smollm2, smollm2_bank, tmp_path):
    """Recall@5 of the IVF search against exact search on the same (int8) bank — what the index loses — and
    against exact search on the float16 bank — what the index and int8 storage lose together."""
    pytest.importorskip("faiss")
    bank16 = smollm2_bank
    bank = bank16.astype("int8")
    assert len(bank) > 4000
    queries = _held_out_queries(smollm2)
    exact = bank.search(queries, k=5)
    exact16 = bank16.search(queries, k=5)
    index = bank.build_index()
    approx = bank.search(queries, k=5, method="approximate")
    recall, recall16 = recall_at_k(approx.ids, exact.ids), recall_at_k(approx.ids, exact16.ids)
    print(f"recall@5 = {recall:.4f} vs exact int8, {recall16:.4f} vs exact float16; exact int8 vs float16 "
          f"{recall_at_k(exact.ids, exact16.ids):.4f} (nlist {index.nlist}, nprobe {index.nprobe}, {len(bank)} "
          f"entries, {len(queries)} queries)")
    assert recall >= 0.97 and recall16 >= 0.95
    # every score returned is the cosine of that row as stored; scanning every list is exact search
    vectors = bank.store.rows(0, len(bank)).numpy()
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(approx.scores, np.take_along_axis(qn @ vectors.T, approx.ids, 1), atol=1e-4)
    everything = bank.search(queries, k=5, method="approximate", nprobe=index.nlist)
    assert recall_at_k(everything.ids, exact.ids) >= 0.999
    one_layer = bank.search(queries, k=5, method="approximate", layers=[12])
    assert set(bank.layer[one_layer.ids].ravel().tolist()) == {12}
    # int8 lists + row ids: about half the bytes of the float16 vectors; saved and loaded with the bank
    assert index.nbytes < 0.55 * bank16.store.nbytes
    folder = bank.save(tmp_path / "bank")
    back = TextBank.load(tmp_path / "bank")
    assert back.index is not None and back.index.nlist == index.nlist
    np.testing.assert_array_equal(back.search(queries, k=5, method="approximate").ids, approx.ids)
    # the index's lists are the bank's own int8 rows: the file holds them once (found by a fresh-user trial)
    from safetensors import safe_open

    vectors_file = next(p for p in folder.iterdir() if p.name.startswith("vectors-"))
    with safe_open(str(vectors_file), framework="numpy") as fh:
        assert "ivf.codes" not in fh.keys() and "codes" in fh.keys()
    assert vectors_file.stat().st_size < 0.6 * bank16.store.nbytes + (bank16.lenses.nbytes if bank16.lenses else 0) + 2**20
    mapped = TextBank.load(tmp_path / "bank", mmap=True)
    np.testing.assert_array_equal(mapped.search(queries, k=5, method="approximate").ids, approx.ids)
    assert repr(index).startswith(f"IVFIndex({len(bank)} rows in {index.nlist} int8 lists") and len(repr(index)) < 120
    # an index whose lists are not the bank's rows (trained on the float16 bank) still saves its own
    other = bank16._replace(index=IVFIndex.train(bank16.store, seed=0))
    assert not other.index.shares_rows_of(other.store)
    again = TextBank.load(other.save(tmp_path / "fp16"))
    np.testing.assert_array_equal(again.search(queries, k=5, method="approximate").ids,
                                  other.search(queries, k=5, method="approximate").ids)


@pytest.mark.slow
def test_approximate_search_rescored_on_float16_rows_memory_mapped(smollm2, smollm2_bank, tmp_path):
    """A float16 bank with an int8 index: candidates from the int8 lists, rescored against the bank's float16
    rows — recall against float16 exact search is then limited only by the candidates, not by int8 rounding
    (which alone reorders near-ties: ~0.97), and the scores are exact search's. Loaded with ``mmap=True``,
    the rows stay in the file and only the index is in memory."""
    pytest.importorskip("faiss")
    bank = TextBank.load(smollm2_bank.save(tmp_path / "src"))._replace(index=None)
    queries = _held_out_queries(smollm2)
    exact = bank.search(queries, k=5)
    index = bank.build_index()
    assert index.codes.kind == "int8" and index.nbytes < 0.55 * bank.store.nbytes
    approx = bank.search(queries, k=5, method="approximate")
    recall = recall_at_k(approx.ids, exact.ids)
    int8_only = index.search(queries, 5)[1]
    every = bank.search(queries, k=5, method="approximate", nprobe=index.nlist)
    every8 = index.search(queries, 5, nprobe=index.nlist)[1]
    print(f"recall@5 vs exact float16 at nprobe {index.nprobe} / all {index.nlist} lists: rescored on float16 rows "
          f"{recall:.4f} / {recall_at_k(every.ids, exact.ids):.4f}, on the int8 codes {recall_at_k(int8_only, exact.ids):.4f}"
          f" / {recall_at_k(every8, exact.ids):.4f} ({len(queries)} queries)")
    # what is left is the lists not probed: with every list probed, the rescored search is exact search
    assert recall_at_k(every.ids, exact.ids) >= 0.999 > recall_at_k(every8, exact.ids)
    assert recall >= recall_at_k(int8_only, exact.ids)
    same = approx.ids == exact.ids
    np.testing.assert_allclose(approx.scores[same], exact.scores[same], rtol=0, atol=1e-6)
    bank.save(tmp_path / "bank")
    mapped = TextBank.load(tmp_path / "bank", mmap=True)
    assert isinstance(mapped.store.data, np.memmap) and not isinstance(mapped.index.codes.data, np.memmap)
    np.testing.assert_array_equal(mapped.search(queries, k=5, method="approximate").ids, approx.ids)
    np.testing.assert_array_equal(mapped.search(queries, k=5).ids, exact.ids)
    with pytest.raises(ConfigError, match="rescore holds"):
        index.search(queries, 5, rescore=bank.store.subset(np.arange(10)))


@pytest.mark.slow
def test_refined_int8_scan_equals_exact_search_on_a_real_smollm2_bank(smollm2, smollm2_bank):
    """method="refine": every row scored in int8 integer arithmetic, the best 40 re-ranked on the float16 rows —
    the same neighbours and scores as exact float16 search (a plain int8 search reorders near-ties), per layer
    too; on an int8 bank it equals exact int8 search."""
    bank = smollm2_bank
    queries = _held_out_queries(smollm2)
    exact = bank.search(queries, k=5)
    refined = bank.search(queries, k=5, method="refine")
    assert refined.method == "refine" and bank.codes is not None and bank.codes.kind == "int8"
    assert recall_at_k(refined.ids, exact.ids) >= 0.999
    np.testing.assert_allclose(refined.scores, exact.scores, rtol=0, atol=1e-5)
    plain8 = exact_topk(bank.codes, queries, 5)[1]
    print(f"recall@5 vs exact float16: refined {recall_at_k(refined.ids, exact.ids):.4f}, plain int8 "
          f"{recall_at_k(plain8, exact.ids):.4f} ({len(queries)} queries, {len(bank)} entries)")
    one = bank.search(queries, k=5, method="refine", layers=[12])
    np.testing.assert_array_equal(one.ids, bank.search(queries, k=5, layers=[12]).ids)
    bank8 = bank.astype("int8")
    np.testing.assert_array_equal(bank8.search(queries, k=5, method="refine").ids, bank8.search(queries, k=5).ids)
    with pytest.raises(ConfigError, match="int8 codes"):
        refine_topk(bank.store, bank.store, queries, 5)


# -- the vocabulary lenses ----------------------------------------------------------------------------


def test_logit_lens_at_the_last_layer_is_the_models_own_prediction(smollm2, smollm2_bank):
    lenses = smollm2_bank.lenses
    assert lenses is not None and lenses.norm is not None and lenses.norm.kind == "rms"
    text = "The capital of France is"
    run = lens.trace(smollm2, [text], capture=("residual",), keep_hidden=[smollm2.n_layers], progress=False)
    hidden = run.arrays[f"resid.hidden.{smollm2.n_layers}"]
    ids, logprobs = lenses.logit_lens(hidden, k=5)
    enc = smollm2.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        logits = smollm2.model(**enc).logits[0].float()
    want = torch.log_softmax(logits, -1)
    top = torch.topk(want, 5, dim=-1)
    np.testing.assert_array_equal(ids[:, 0], top.indices[:, 0].numpy())
    np.testing.assert_allclose(logprobs[:, 0], top.values[:, 0].numpy(), atol=0.05)


def test_embedding_lens_equals_numpy(smollm2, smollm2_bank):
    lenses = smollm2_bank.lenses
    emb = smollm2.model.get_input_embeddings().weight.detach().float().numpy()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    hidden = emb[rng.choice(len(emb), 6)] + 0.01 * rng.standard_normal((6, emb.shape[1])).astype(np.float32)
    ids, cos = lenses.embedding_lens(hidden, k=3)
    h = hidden / np.linalg.norm(hidden, axis=1, keepdims=True)
    want = np.argsort(-(h @ unit.T), axis=1)[:, :3]
    np.testing.assert_array_equal(ids[:, 0], want[:, 0])
    np.testing.assert_allclose(cos[:, 0], np.take_along_axis(h @ unit.T, want[:, :1], 1)[:, 0], atol=2e-3)


# -- bad input ----------------------------------------------------------------------------------------


def test_bank_from_another_model_is_refused(minilm_bank, smollm2_run):
    with pytest.raises(BankMismatchError, match="TextBank.build"):
        lens.visual_tokens(smollm2_run, minilm_bank)


def test_bank_from_same_shape_other_weights_is_refused(tmp_path):
    from tests.conftest import build_tiny

    a = lens.load(str(build_tiny("llama", tmp_path / "a", seed=0)))
    b = lens.load(str(build_tiny("llama", tmp_path / "b", seed=1)))
    texts = ["the red car", "a blue bird sang", "green leaves fell"]
    bank = TextBank.build(a, texts, layers=[1], progress=False)
    run = lens.trace(b, texts, capture=("residual",), keep_hidden=[1], progress=False)
    with pytest.raises(BankMismatchError, match="different weights"):
        lens.visual_tokens(run, bank)
    same = lens.trace(a, texts, capture=("residual",), keep_hidden=[1], progress=False)
    with pytest.raises(InputError, match="no image tokens"):  # same model passes the check, then: text only
        lens.visual_tokens(same, bank)


def test_run_without_image_tokens_and_bad_k_are_refused(smollm2, smollm2_bank, smollm2_run):
    with pytest.raises(InputError, match="image"):
        lens.visual_tokens(smollm2_run, smollm2_bank)
    queries = smollm2_bank.store.rows(0, 2).numpy()
    for k in (0, len(smollm2_bank) + 1):
        with pytest.raises(ConfigError, match="k="):
            smollm2_bank.search(queries, k=k)
    a, b = smollm2_bank.layer_range(4)
    with pytest.raises(ConfigError, match=f"{b - a}"):
        smollm2_bank.search(queries, k=b - a + 1, layers=[4])
    with pytest.raises(ConfigError, match="not in this bank"):
        smollm2_bank.search(queries, k=5, layers=[7])
    with pytest.raises(ConfigError, match="dimensions"):
        smollm2_bank.search(np.zeros((2, 384), np.float32), k=5)
    assert issubclass(BankMismatchError, LensError)


@pytest.mark.slow
def test_a_query_guide_finds_the_lists_of_image_token_neighbours_the_centroids_miss(smollm2, smollm2_bank, tmp_path):
    """Image-token queries of the demo VLM are far from the text states' centroids: at equal nprobe, adding
    the lists of the nearest *sample* image tokens' neighbours (other scenes than the evaluated ones) finds
    neighbours the centroid order misses; the guide is saved with the bank and refused for another width."""
    pytest.importorskip("faiss")
    from lens.bench.visual import scene_states
    from lens.models import toyvlm

    model, processor = toyvlm.load()
    model.eval()
    sample, _, _ = scene_states(model, processor, toyvlm.make_scenes(6, 101, stream=1), smollm2_bank.layers)
    evaluated, _, _ = scene_states(model, processor, toyvlm.make_scenes(4, 202, stream=1), smollm2_bank.layers)
    bank = smollm2_bank.astype("int8")
    queries = np.concatenate([evaluated[x] for x in bank.layers])
    exact = bank.search(queries, k=5)
    plain = bank.build_index(nprobe=2)
    unguided = recall_at_k(bank.search(queries, k=5, method="approximate").ids, exact.ids)
    index = bank.build_index(nprobe=2, queries=np.concatenate([sample[x] for x in bank.layers]))
    assert index.guide_queries.shape == (6 * 36 * len(bank.layers), bank.d_model)
    assert np.array_equal(index.centroids, plain.centroids)  # the same lists: only the probing differs
    guided = bank.search(queries, k=5, method="approximate")
    recall = recall_at_k(guided.ids, exact.ids)
    off = recall_at_k(bank.search(queries, k=5, method="approximate", guide=0).ids, exact.ids)
    print(f"recall@5 vs exact int8 at nprobe 2 of {index.nlist} lists: centroids only {unguided:.4f}, with the "
          f"guide {recall:.4f} ({len(queries)} image-token queries)")
    assert off == unguided and recall >= 0.95 and recall > unguided + 0.05
    bank.save(tmp_path / "bank")
    back = TextBank.load(tmp_path / "bank")
    np.testing.assert_array_equal(back.index.guide_lists, index.guide_lists)
    np.testing.assert_array_equal(back.search(queries, k=5, method="approximate").ids, guided.ids)
    with pytest.raises(ConfigError, match="dimensions"):
        bank.build_index(queries=np.ones((3, bank.d_model + 1), np.float32))


def test_bad_queries_and_search_options_get_clear_errors(minilm_bank):
    """Found by a fresh-user trial: NaN queries returned punctuation as neighbours, nprobe=0 and guide=-1 were
    accepted, guide=5 on an index without a guide was ignored, and == on two banks raised numpy's ValueError."""
    pytest.importorskip("faiss")
    from lens.errors import NumericalError

    bank = minilm_bank
    q = bank.store.rows(0, 3).numpy().copy()
    q[1, 4] = np.nan
    for method in ("exact", "refine", "approximate"):
        with pytest.raises(NumericalError, match=r"queries \[1\] hold NaN"):
            bank.search(q, k=3, method=method)
    q[1, 4] = np.inf
    with pytest.raises(NumericalError):
        bank.search(q, k=3)
    good = bank.store.rows(0, 3).numpy()
    bank.build_index()
    with pytest.raises(ConfigError, match="nprobe must be"):
        bank.search(good, k=3, method="approximate", nprobe=0)
    with pytest.raises(ConfigError, match="guide must be"):
        bank.search(good, k=3, method="approximate", guide=-1)
    with pytest.raises(ConfigError, match="no query guide"):
        bank.search(good, k=3, method="approximate", guide=5)
    with pytest.raises(NumericalError):
        bank.build_index(queries=np.full((2, bank.d_model), np.nan, np.float32))
    assert (bank == bank) and not (bank == bank.astype("int8"))
