"""``lens demo``'s decoder section: SmolLM2's sinks, massive activations and interior valley beside MiniLM."""

from __future__ import annotations

import pytest
from conftest import SMOLLM2_TEXTS

from lens.report.demo import run_demo


@pytest.mark.slow
def test_demo_shows_the_decoder_beside_minilm(smollm2, tmp_path, capsys):
    path = run_demo(tmp_path / "report.html", texts=SMOLLM2_TEXTS, deploy=False, progress=False)
    out = capsys.readouterr().out
    html = path.read_text()
    assert "A real decoder: SmolLM2-135M-Instruct (Q4_1 GGUF) beside MiniLM" in html
    for phrase in ("attention sinks: SmolLM2 sink rate", "massive activations: SmolLM2 largest |x|",
                   "compression valley: SmolLM2 layer 12 of 30", "interior", "MiniLM  layer 6 of 6"):
        assert phrase in out, phrase
    assert "sha256 b179c9523d0e" in out and "Q4_1×210" in out


def test_demo_without_the_decoder_says_how_to_fetch_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LENS_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("LENS_OFFLINE", "1")
    path = run_demo(tmp_path / "report.html", texts=SMOLLM2_TEXTS[:2], deploy=False, progress=False)
    assert "lens models fetch smollm2" in capsys.readouterr().out
    assert "SmolLM2 is not available here" in path.read_text()
