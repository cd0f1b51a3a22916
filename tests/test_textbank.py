"""lens.TextBank: reservoir sampling, the states it keeps, files, and refusing pickles.

Cross-checks: every bank entry against the hidden state ``lens.trace(..., keep_hidden=...)`` captured for the same
token (an independent capture path); the reservoir's inclusion probabilities against cap / n.
"""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

import lens
from lens.analysis.reservoir import TypeReservoirs
from lens.analysis.textbank import TextBank
from lens.errors import BankFormatError, ConfigError, InputError

BANK_TEXTS = [
    "The red car stopped at the corner.",
    "A blue bird sang in the green tree.",
    "She painted the door red and the window blue.",
    "The circle and the square were drawn in chalk.",
    "A yellow star hung above the small triangle.",
    "The old man walked his dog along the river.",
    "Purple flowers grew beside the orange fence.",
    "The cat sat on the mat near the red ball.",
    "Green leaves fell from the tall tree in autumn.",
    "He drew a triangle, a circle and a star on the board.",
] * 3  # repeated sentences: their contexts must not be stored twice


@pytest.fixture(scope="module")
def minilm_bank(minilm):
    return TextBank.build(minilm, BANK_TEXTS, layers=[2, 6], per_type_cap=3, seed=0, progress=False)


# -- the reservoir -----------------------------------------------------------------------------------------


def test_reservoir_keeps_every_occurrence_with_probability_cap_over_n():
    n, cap, trials = 40, 8, 2000
    hits = np.zeros(n)
    for seed in range(trials):
        res = TypeReservoirs(2, cap, seed)
        for part in np.array_split(np.arange(n), 5):
            res.add(np.full(len(part), 3), (part + 1).astype(np.uint64), np.zeros((len(part), 2), np.float32), part, part)
        kept = res.finish()
        assert len(kept["sentence"]) == cap
        hits[kept["sentence"]] += 1
    p = hits / trials
    # binomial(2000, 0.2): sd 0.009; every occurrence within 5 sd, the mean exactly cap / n
    assert np.all(np.abs(p - cap / n) < 0.045), p
    assert p.mean() == pytest.approx(cap / n)


def test_reservoir_does_not_depend_on_chunking_and_skips_duplicate_contexts():
    rng = np.random.default_rng(0)
    types = rng.integers(0, 6, 300)
    keys = rng.integers(0, 40, 300).astype(np.uint64)  # many repeated contexts
    vectors = rng.standard_normal((300, 3)).astype(np.float32)

    def run(parts, seed=1):
        res = TypeReservoirs(3, 4, seed)
        for part in np.array_split(np.arange(300), parts):
            res.add(types[part], keys[part], vectors[part], part, part)
        return res, res.finish()

    (res1, a), (_, b) = run(1), run(17)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert res1.duplicates > 0
    for t in np.unique(a["token_id"]):
        rows = a["token_id"] == t
        assert rows.sum() <= 4
        assert len(set(keys[a["sentence"][rows]].tolist())) == rows.sum()  # no context twice
    _, other = run(1, seed=2)
    assert not np.array_equal(a["sentence"], other["sentence"])


# -- building ----------------------------------------------------------------------------------------------


def test_bank_entries_are_the_traced_hidden_states(minilm, minilm_bank):
    bank = minilm_bank
    assert bank.layers == (2, 6)
    run = lens.trace(minilm, BANK_TEXTS[:10], capture=("residual",), keep_hidden=[2, 6], progress=False)
    checked = 0
    for row in range(len(bank)):
        s, p, layer = int(bank.sentence[row]), int(bank.position[row]), int(bank.layer[row])
        seq = BANK_TEXTS.index(bank.texts[s])
        want = run.arrays[f"resid.hidden.{layer}"][run.span(seq)][p]
        got = bank.store.rows(row, row + 1)[0].numpy()
        np.testing.assert_allclose(got, want / np.linalg.norm(want), atol=2e-3)
        assert run.arrays["token_ids"][run.span(seq)][p] == bank.token_id[row]
        checked += 1
    assert checked == len(bank) > 100


def test_bank_caps_types_skips_specials_and_first_positions(minilm, minilm_bank):
    bank = minilm_bank
    frame = bank.to_frame()
    assert frame.groupby(["layer", "token_id"]).size().max() <= 3
    special = set(minilm.tokenizer.all_special_ids)
    assert not set(bank.token_id.tolist()) & special
    assert bank.position.min() >= 1
    norms = np.linalg.norm(bank.store.rows(0, len(bank)).numpy(), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    # the word's text is where the offsets say
    for row in np.flatnonzero(frame["token"].str.fullmatch("red").to_numpy())[:5]:
        assert "[[red]]" in bank.context(int(row)).lower()
    # a repeated sentence adds no second copy of its contexts (bidirectional: same sequence, same position)
    keys = frame[["layer", "sentence", "position"]].drop_duplicates()
    assert len(keys) == len(frame)
    assert bank.meta["duplicates_skipped"]["2"] > 0
    assert "entries=" in repr(bank) and "cap=3" in repr(bank)


def test_build_is_deterministic_by_seed_and_independent_of_chunks(minilm, minilm_bank):
    again = TextBank.build(minilm, BANK_TEXTS, layers=[2, 6], per_type_cap=3, seed=0, chunk_size=7, batch_size=3,
                           lenses=False, progress=False)
    for name in ("layer", "token_id", "position"):
        np.testing.assert_array_equal(getattr(again, name), getattr(minilm_bank, name))
    assert [again.texts[s] for s in again.sentence] == [minilm_bank.texts[s] for s in minilm_bank.sentence]
    np.testing.assert_allclose(again.store.data.astype(np.float32), minilm_bank.store.data.astype(np.float32), atol=2e-3)
    other = TextBank.build(minilm, BANK_TEXTS, layers=[2, 6], per_type_cap=3, seed=1, lenses=False, progress=False)
    assert [other.texts[s] for s in other.sentence] != [minilm_bank.texts[s] for s in minilm_bank.sentence]


def test_build_streams_a_file_and_a_generator(minilm, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(BANK_TEXTS[:10] + ["", "   "]) + "\n", encoding="utf-8")
    from_file = TextBank.build(minilm, path, layers=[3], per_type_cap=2, lenses=False, progress=False)
    from_gen = TextBank.build(minilm, (t for t in BANK_TEXTS[:10]), layers=[3], per_type_cap=2, lenses=False, progress=False)
    np.testing.assert_array_equal(from_file.token_id, from_gen.token_id)
    assert from_file.meta["n_empty"] == 2 and from_file.meta["corpus"]["kind"] == "text file"


@pytest.mark.parametrize("kwargs, error", [
    ({"layers": [7]}, ConfigError),
    ({"layers": []}, ConfigError),
    ({"layers": [1], "per_type_cap": 0}, ConfigError),
    ({"layers": [1], "dtype": "int4"}, ConfigError),
])
def test_build_refuses_bad_options(minilm, kwargs, error):
    with pytest.raises(error) as info:
        TextBank.build(minilm, BANK_TEXTS[:2], progress=False, **kwargs)
    assert "layers" in str(info.value) or "cap" in str(info.value) or "dtype" in str(info.value)


@pytest.mark.parametrize("corpus", ["no such file.txt", 42, ["a fine text", 3], ["", "  "]])
def test_build_refuses_bad_corpora(minilm, corpus):
    with pytest.raises(InputError):
        TextBank.build(minilm, corpus, layers=[1], progress=False)


# -- files -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_save_load_round_trip(minilm_bank, tmp_path, dtype):
    bank = minilm_bank.astype(dtype)
    bank.save(tmp_path / "bank")
    back = TextBank.load(tmp_path / "bank")
    assert back.dtype == dtype and len(back) == len(bank)
    np.testing.assert_array_equal(back.store.data, bank.store.data)
    for name in ("layer", "token_id", "sentence", "position"):
        np.testing.assert_array_equal(getattr(back, name), getattr(bank, name))
    assert back.texts == bank.texts and back.vocab == bank.vocab and back.model == bank.model
    assert back.context(5) == bank.context(5)
    q = bank.store.rows(0, 4).numpy()
    np.testing.assert_array_equal(back.search(q, k=3).ids, bank.search(q, k=3).ids)
    if dtype == "int8":  # int8 + one float32 scale per row (+ the mean; the rotation is a seed): about half the bytes
        per_entry = bank.store.nbytes - bank.store.mean.nbytes
        assert per_entry / minilm_bank.store.nbytes < 0.51
        np.testing.assert_array_equal(back.store.mean, bank.store.mean)
        assert back.store.rotation == bank.store.rotation is not None and back.store.dim_scales is None
        np.testing.assert_array_equal(back.store.rows(0, 9).numpy(), bank.store.rows(0, 9).numpy())


def test_an_int8_bank_of_the_older_per_dimension_layout_still_loads_and_searches(minilm_bank, tmp_path):
    """Banks saved before the rotation hold ``dim_scales``; they load and search exactly as they were saved."""
    import dataclasses

    from lens.analysis.search import VectorStore

    vectors = minilm_bank.store.rows(0, len(minilm_bank)).numpy()
    dims = np.abs(vectors).max(axis=0)
    old = dataclasses.replace(minilm_bank, store=VectorStore.from_float(vectors, "int8", dim_scales=dims))
    assert old.store.mean is None and old.store.rotation is None
    old.save(tmp_path / "old")
    back = TextBank.load(tmp_path / "old")
    np.testing.assert_array_equal(back.store.dim_scales, old.store.dim_scales)
    assert back.store.mean is None and back.store.rotation is None
    np.testing.assert_allclose(np.linalg.norm(back.store.rows(0, len(back)).numpy(), axis=1), 1.0, atol=1e-5)
    q = vectors[::53]
    np.testing.assert_array_equal(back.search(q, k=5).ids, old.search(q, k=5).ids)


def test_int8_bank_keeps_unit_rows_and_neighbours(minilm_bank):
    q8 = minilm_bank.astype("int8")
    rows = q8.store.rows(0, len(q8)).numpy()
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    ref = minilm_bank.store.rows(0, len(q8)).numpy()
    assert np.abs(rows - ref).max() < 0.01
    queries = ref[::97]
    from lens.analysis.search import recall_at_k

    assert recall_at_k(q8.search(queries, k=5).ids, minilm_bank.search(queries, k=5).ids) >= 0.95


def test_save_replaces_a_bank_atomically_and_load_verifies_checksums(minilm_bank, tmp_path):
    folder = tmp_path / "bank"
    minilm_bank.save(folder)
    minilm_bank.astype("int8").save(folder)  # a second save replaces the first, leaving no stale file
    names = sorted(os.listdir(folder))
    assert len(names) == 4 and "bank.json" in names
    assert TextBank.load(folder).dtype == "int8"
    manifest = json.loads((folder / "bank.json").read_text())
    vectors = folder / manifest["files"]["vectors"]["name"]
    original = vectors.read_bytes()
    data = bytearray(original)
    data[-3] ^= 0xFF
    vectors.write_bytes(bytes(data))
    with pytest.raises(BankFormatError, match="sha256"):
        TextBank.load(folder)
    vectors.write_bytes(original)
    assert TextBank.load(folder).dtype == "int8"
    (folder / manifest["files"]["texts"]["name"]).unlink()
    with pytest.raises(BankFormatError, match="missing"):
        TextBank.load(folder)
    with pytest.raises(BankFormatError, match="no text bank"):
        TextBank.load(tmp_path / "nothing here")
    (tmp_path / "other").mkdir()
    with pytest.raises(BankFormatError, match="not a lens text bank"):
        TextBank.load(tmp_path / "other")


class _Tripwire:
    """Unpickling this object writes a file: the test proves lens never unpickles."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_latentlens_bank_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"
    folder = tmp_path / "latentlens-bank"
    (folder / "layer_8").mkdir(parents=True)
    # the latentlens package's layout: metadata.json + layer_N/embeddings_cache.pt written by torch.save
    (folder / "metadata.json").write_text(json.dumps({"layers": [8], "hidden_dim": 4}))
    torch.save({"embeddings": torch.zeros(2, 4, dtype=torch.float16), "metadata": [_Tripwire(marker)]},
               folder / "layer_8" / "embeddings_cache.pt")
    with pytest.raises(BankFormatError) as info:
        TextBank.load(folder)
    assert "lens.TextBank.build" in str(info.value) and "pickle" in str(info.value)
    with pytest.raises(BankFormatError, match="pickle"):
        TextBank.load(folder / "layer_8" / "embeddings_cache.pt")
    raw = tmp_path / "bank.pkl"
    raw.write_bytes(pickle.dumps(_Tripwire(marker)))
    with pytest.raises(BankFormatError, match="pickle"):
        TextBank.load(raw)
    assert not marker.exists()
