"""Issue kind 8: a saved Run carries a sha256 per array and of its metadata; loading verifies them.

One flipped bit anywhere in any array's bytes, an edited token string, a dropped array, or a damaged
checksum table raises ``RunFormatError`` naming what changed. Files saved before lens stored checksums
still load, with a ``LensWarning``, and saving them again adds the checksums. ``lens verify`` reports the
same from the command line. A save that cannot happen leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import lens
from lens.errors import LensWarning, RunFormatError


@pytest.fixture(scope="module")
def run(tiny_model_dir):
    lm = lens.load(tiny_model_dir("gpt2"))
    return lens.trace(lm, ["Emoji 😀 and 日本語 text", "Plain text."], keep_patterns=[(1, 2)], keep_hidden=[0, 2],
                      track_neurons=[(0, 3)], progress=False)


def _layout(path: Path) -> tuple[bytes, int, dict]:
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return raw, 8 + header_len, json.loads(raw[8 : 8 + header_len])


def test_every_array_is_verified(run, tmp_path):
    path = run.save(tmp_path / "run.lens")
    raw, data_start, header = _layout(path)
    names = [n for n in header if n != "__metadata__"]
    assert set(names) == set(run.arrays) and len(names) >= 15
    for name in names:
        begin, end = header[name]["data_offsets"]
        if end == begin:
            continue
        flipped = bytearray(raw)
        flipped[data_start + (begin + end) // 2] ^= 0x01  # one bit, in the middle of the array
        bad = tmp_path / "flipped.lens"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(RunFormatError, match=f"array '{name}' do not match their sha256"):
            lens.Run.load(bad)
    back = lens.Run.load(path)
    assert back.tokens == run.tokens and set(back.arrays) == set(run.arrays)


def test_metadata_is_verified(run, tmp_path):
    path = run.save(tmp_path / "run.lens")
    raw, data_start, header = _layout(path)
    # the 8-byte little-endian header length is binary (its bytes need not be UTF-8); every edit below keeps
    # the header's length, so the prefix stays valid
    prefix, text = raw[:8], raw[8:data_start].decode("utf-8")
    assert "Plain text." in text
    edited = tmp_path / "edited.lens"
    edited.write_bytes(prefix + text.replace("Plain text.", "Plain test.").encode("utf-8") + raw[data_start:])
    with pytest.raises(RunFormatError, match="the metadata .* does not match its sha256"):
        lens.Run.load(edited)
    digest = json.loads(header["__metadata__"]["lens.sha256"])["arrays"]["offsets"]["sha256"]
    assert text.count(digest) == 1
    damaged = tmp_path / "table.lens"
    damaged.write_bytes(prefix + text.replace(digest, digest[::-1]).encode("utf-8") + raw[data_start:])
    with pytest.raises(RunFormatError, match="array 'offsets' do not match their sha256"):
        lens.Run.load(damaged)
    unreadable = tmp_path / "unreadable.lens"
    unreadable.write_bytes(prefix + text.replace('\\"arrays\\"', '\\"arrayz\\"').encode("utf-8") + raw[data_start:])
    with pytest.raises(RunFormatError, match="unreadable checksum table"):
        lens.Run.load(unreadable)


def test_dropped_or_extra_arrays_are_caught(run, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    path = run.save(tmp_path / "run.lens")
    with safe_open(str(path), framework="numpy") as fh:
        metadata = fh.metadata()
        arrays = {n: fh.get_tensor(n) for n in fh.keys()}
    del arrays["resid.norm"]
    save_file(arrays, tmp_path / "dropped.lens", metadata=metadata)
    with pytest.raises(RunFormatError, match=r"arrays missing \['resid.norm'\]"):
        lens.Run.load(tmp_path / "dropped.lens")
    arrays["resid.norm"] = run.arrays["resid.norm"].astype(np.float64)  # right bytes? no: another dtype
    save_file(arrays, tmp_path / "dtype.lens", metadata=metadata)
    with pytest.raises(RunFormatError, match="'resid.norm' is float64"):
        lens.Run.load(tmp_path / "dtype.lens")


def test_files_without_checksums_load_with_a_warning(run, tmp_path):
    from safetensors.numpy import save_file

    header = {"schema": "lens.run/1", "tokens": run.tokens, "meta": json.loads(json.dumps(run.meta, default=str))}
    old = tmp_path / "old.lens"
    save_file({k: np.ascontiguousarray(v) for k, v in run.arrays.items()}, old, metadata={"lens": json.dumps(header)})
    with pytest.warns(LensWarning, match="saved without checksums"):
        back = lens.Run.load(old)
    for name in run.arrays:
        np.testing.assert_array_equal(back.arrays[name], run.arrays[name])
    back.save(old)  # saving again adds them
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lens.Run.load(old)


def _cli(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lens", *args], capture_output=True, text=True, env=env, timeout=300)


def test_lens_verify(run, tmp_path):
    good = run.save(tmp_path / "good.lens")
    raw, data_start, header = _layout(good)
    begin, _ = header["attn.key_mass"]["data_offsets"]
    flipped = bytearray(raw)
    flipped[data_start + begin + 3] ^= 0x10
    bad = tmp_path / "bad.lens"
    bad.write_bytes(bytes(flipped))
    result = _cli("verify", str(good))
    assert result.returncode == 0 and "checksums ok" in result.stdout
    result = _cli("verify", str(good), str(bad), str(tmp_path / "missing.lens"))
    assert result.returncode == 1
    assert "OK" in result.stdout and result.stderr.count("FAILED") == 2
    assert "attn.key_mass" in result.stderr and "Traceback" not in result.stderr


def test_failed_saves_leave_nothing(run, tmp_path):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(RunFormatError, match="is a folder"):
        run.save(folder)
    assert list(folder.iterdir()) == []
    if os.path.isdir("/proc/self"):
        with pytest.raises(RunFormatError, match="could not save the run"):
            run.save("/proc/self/run.lens")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFormatError, match="could not save the run"):
        run.save(blocker / "run.lens")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-folder", "file"]
