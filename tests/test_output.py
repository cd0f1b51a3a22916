"""What a user sees: progress bars only when someone is watching, quiet third-party bars, short reprs and
HTML cards instead of arrays, tidy compare frames, honest valley and sparse messages, files written with the
umask's permissions."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import lens
from lens.analysis.valley import ValleyResult
from lens.models.deploy import EveryBlockKeptWarning, long_documents
from lens.progress import progress_bar, quiet_libraries

TEXTS = ["The cat sat on the mat.", "Attention sinks form on the first token of many layers, surprisingly.", "Hi!"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- progress -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream, progress, shown", [
    (io.StringIO, None, False),      # a file or a pipe: tqdm's own rule hides the bar
    (_Terminal, None, True),         # a terminal: shown
    (io.StringIO, True, True),       # forced on
    (_Terminal, False, False),       # forced off
])
def test_progress_bars_follow_tqdm_rules_unless_forced(stream, progress, shown):
    out = stream()
    for _ in progress_bar(range(3), progress=progress, file=out, desc="work", mininterval=0):
        pass
    assert ("work" in out.getvalue()) == shown, out.getvalue()


def test_progress_must_be_none_or_a_bool():
    with pytest.raises(lens.ConfigError, match="None"):
        progress_bar(range(2), progress="yes")


def test_quiet_libraries_silences_transformers_and_restores_the_users_choice():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with quiet_libraries():
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # a user who switched them off keeps them off
    try:
        with quiet_libraries():
            pass
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.enable_progress_bar()


def test_trace_load_and_quantization_are_silent_when_not_watched(minilm, capfd):
    lens.trace(minilm, TEXTS)
    lens.load(quant="int4")
    captured = capfd.readouterr()
    assert captured.out == "" and "\r" not in captured.err and "Loading weights" not in captured.err, captured


def test_forced_progress_shows_lens_bars_and_never_transformers_bars(minilm, capfd):
    lens.load(quant="int4", progress=True)   # the load's stages and the quantization, one bar each
    lens.trace(minilm, TEXTS, progress=True)
    err = capfd.readouterr().err
    assert "lens.load all-MiniLM-L6-v2" in err and "quantize int4" in err and "lens.trace" in err, err
    assert "Loading weights" not in err


@pytest.mark.slow
def test_lens_demo_into_a_pipe_writes_only_the_summary_and_the_report_path(tmp_path):
    """``lens demo > log.txt``: no progress bars, no carriage returns, no foreign output — and the report is
    written with the umask's permissions."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "lens", "demo", "--out", str(tmp_path / "report.html")], cwd=tmp_path, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1800, preexec_fn=lambda: os.umask(0o022),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    assert "\r" not in out.stdout and "\r" not in out.stderr
    for noise in ("Loading weights", "it/s", "lens.trace", "lens.load", "%|"):
        assert noise not in out.stdout and noise not in out.stderr, noise
    expected = (
        "model: ", "inputs: ", "sink heads ", "strongest sink", "sink rate per layer", "compression valley at",
        "no interior valley", "normalized raw entropy", "anisotropy", "massive activations", "sparse hybrid",
        "nvfp4:", "int4:", "ternary:", "(sparse attention on", "report written to",
        # the embedded decoder beside MiniLM
        "SmolLM2-135M-Instruct: ", "attention sinks: SmolLM2", "first-token norm: SmolLM2",
        "massive activations: SmolLM2", "compression valley: SmolLM2", "MiniLM ",
    )
    assert all(line.startswith(expected) for line in lines), [l for l in lines if not l.startswith(expected)]
    assert lines[-1].startswith("report written to") and str(tmp_path / "report.html") in lines[-1]
    assert sum(line.startswith(("no interior valley", "compression valley at")) for line in lines) == 1
    report = (tmp_path / "report.html")
    assert report.stat().st_mode & 0o777 == 0o644
    text = report.read_text()
    assert "entropy_normalized_normalized" not in text and "DESIGN" not in text
    assert "docs/definitions.md" in text


# -- reprs --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def results(minilm):
    run = lens.trace(minilm, TEXTS, keep_hidden="all", keep_patterns=[(0, 0)], progress=False)
    other = lens.trace(lens.load(quant="int4"), TEXTS, keep_hidden="all", progress=False)
    return {
        "run": run, "model": minilm, "sinks": lens.sinks(run), "valley": lens.valley(run),
        "compare": lens.compare(run, other),
    }


@pytest.mark.parametrize("name, headline", [
    ("run", r"sequences=3, tokens=\d+"),
    ("model", r"layers=6, heads=12"),
    ("sinks", r"\d+ sink heads \(s ≥ 0.3\), strongest L\d+H\d+ 0\.\d\d"),
    ("valley", r"layers 0–6: (valley at layer \d|no interior valley \(minimum at layer \d\))"),
    ("compare", r"dense → dense \+ int4: max \|Δ sink\| \d\.\d{3}"),
])
def test_every_public_result_has_a_short_repr_and_an_html_card(results, name, headline):
    obj = results[name]
    text = repr(obj)
    assert "\n" not in text and len(text) < 240, text
    assert re.search(headline, text), text
    assert "array(" not in text and "[[" not in text
    assert str(obj) == text or name == "model"
    page = obj._repr_html_()
    assert "<table" in page and len(page) < 20_000
    assert "array(" not in page and "dtype=" not in page
    assert "<script" not in page.lower()


def test_html_cards_escape_what_they_show(results):
    run = results["run"]
    run.meta["texts"] = ["<script>alert(1)</script>"] + list(run.texts[1:])
    try:
        assert "<script>alert" not in run._repr_html_()
    finally:
        run.meta["texts"] = list(TEXTS)


# -- compare frames -----------------------------------------------------------------------------------------

def test_compare_frames_are_long_format_with_identifier_columns(results, minilm):
    result = results["compare"]
    for kind in ("layers", "heads"):
        frame = result.to_frame(kind)
        assert all(re.fullmatch(r"[a-z][a-z0-9_]*", c) for c in frame.columns), list(frame.columns)
        assert set(frame["variant"]) == {"dense", "dense + int4"}
        assert not any(frame[c].isna().all() for c in frame.columns)
        assert "block_density" not in frame.columns  # neither run is sparse
    layers = result.to_frame()
    b = layers[layers["variant"] == "dense + int4"]
    np.testing.assert_allclose(b["entropy_delta"], result.entropy_delta)
    np.testing.assert_allclose(b["entropy"] - layers[layers["variant"] == "dense"]["entropy"].to_numpy(),
                               result.entropy_delta, atol=1e-12)
    # the reference compared with itself: no change, perfect agreement
    a = layers[layers["variant"] == "dense"]
    assert (a["entropy_delta"] == 0).all() and (a["hidden_cosine"] == 1).all()
    pivot = layers.pivot(index="layer", columns="variant", values="anisotropy")
    assert list(pivot.columns) == ["dense", "dense + int4"]


# -- the valley ---------------------------------------------------------------------------------------------

def _valley_of(curve, run) -> ValleyResult:
    n = len(curve)
    values = {name: np.full((n, 1), 0.5) for name in ValleyResult.columns}
    values["entropy_raw_normalized"] = np.asarray(curve, dtype=float)[:, None]
    argmin = int(np.argmin(curve))
    return ValleyResult(run=run, alpha=1.0, values=values, valley_layer=argmin, depth_fraction=argmin / (n - 1),
                        valley_range=(argmin, argmin))


@pytest.mark.parametrize("curve, interior, words", [
    ([0.9, 0.8, 0.7, 0.6], False, "falls monotonically from 0.900 at the embeddings to 0.600 at the output (layer 3), lowest at the output"),
    ([0.5, 0.6, 0.8, 0.9], False, "rises monotonically from 0.500 at the embeddings to 0.900 at the output (layer 3), lowest at the embeddings"),
    ([0.9, 0.7, 0.8, 0.6], False, "falls from 0.900"),
    ([0.9, 0.4, 0.6, 0.8], True, None),
])
def test_a_minimum_at_either_end_is_no_interior_valley(results, curve, interior, words):
    result = _valley_of(curve, results["run"])
    assert result.interior is interior
    assert result.valley_layer == int(np.argmin(curve))  # kept: the argmin, an int
    summary = result.summary()
    if interior:
        assert summary.startswith("compression valley at layer 1 of 3") and "no interior" not in summary
    else:
        assert summary.startswith("no interior valley: normalized raw entropy " + words)
        assert "no interior valley" in repr(result)


def test_minilm_has_no_interior_valley_and_every_view_says_so(results):
    """all-MiniLM-L6-v2's entropy falls to the last layer: the valley is a trend, and the summary, the
    figure, the report table and the widget say "no interior valley"."""
    valley = results["valley"]
    assert not valley.interior and valley.valley_layer == 6
    assert "no interior valley" in valley.summary()
    fig = valley.figure()
    assert any("no interior valley" in (a.text or "") for a in fig.layout.annotations)
    assert not fig.layout.shapes  # no shaded valley, no marker line
    from lens.report.demo import valley_table

    table = valley_table(valley)
    assert "valley" not in table.columns and "entropy_normalized_normalized" not in table.columns


# -- sparse attention that keeps every block ----------------------------------------------------------------

@pytest.mark.slow
def test_sparse_that_keeps_every_block_warns_and_compare_says_so(minilm):
    sparse = lens.load(attention=lens.Sparse(mode="hybrid", topk=0.1, topp=0.9, block_q=64, block_k=64))
    with pytest.warns(EveryBlockKeptWarning, match="kept every attention block") as caught:
        short = lens.trace(sparse, TEXTS, progress=False)    # every sentence fits in one 64-token block
    ours = [w for w in caught if w.category is EveryBlockKeptWarning]
    assert len(ours) == 1 and Path(ours[0].filename).name == Path(__file__).name  # at the caller's lens.trace
    assert short.meta["sparse_every_block_kept"] is True
    result = lens.compare(lens.trace(minilm, TEXTS, progress=False), short)
    assert result.every_block_kept == (False, True)
    assert "computed dense attention" in result.summary() and "every block kept" in repr(result)
    assert any("dense attention" in line for line in result.notes())
    # the same configuration on documents several blocks long skips blocks: no warning
    documents = long_documents(TEXTS, n_documents=2, words=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EveryBlockKeptWarning)
        long = lens.trace(sparse, documents, truncate=True, progress=False)
    assert long.meta["sparse_every_block_kept"] is False
    assert lens.compare(lens.trace(minilm, documents, truncate=True, progress=False), long).notes() == []
    # dense runs carry no such record
    assert "sparse_every_block_kept" not in lens.trace(minilm, TEXTS[:1], progress=False).meta


def test_compare_view_shows_the_every_block_note(results):
    lw = pytest.importorskip("lens.widgets")
    result = results["compare"]
    result.every_block_kept = (False, True)
    try:
        view = lw.CompareView(result)
        assert any("computed dense attention" in n for n in view.info["notes"])
    finally:
        result.every_block_kept = (False, False)
    assert lw.CompareView(result).info["notes"] == []


# -- files get the umask's permissions ---------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_written_by_lens_get_the_umasks_permissions(results, tmp_path, umask, mode, monkeypatch):
    import lens.atomic

    old = os.umask(umask)
    monkeypatch.setattr(lens.atomic, "_UMASK", None)  # read the umask afresh
    try:
        from lens.report.html import Report

        written = [
            results["run"].save(tmp_path / "run.lens"),
            Report("t").write(tmp_path / "report.html"),
        ]
        lw = pytest.importorskip("lens.widgets")
        written.append(lw.AttentionExplorer(results["run"]).to_html(tmp_path / "explorer.html"))
    finally:
        os.umask(old)
        lens.atomic._UMASK = None
    for path in written:
        assert Path(path).stat().st_mode & 0o777 == mode, path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explorer.html", "report.html", "run.lens"]  # no temp left


# -- loading without network --------------------------------------------------------------------------------

@pytest.fixture
def counting_hub():
    """A real HTTP server on 127.0.0.1 standing in for the hub: it counts the requests that reach it."""
    import http.server
    import threading

    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(404)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", ["gpt2", "EleutherAI/pythia-160m", "someone/private-model"])
def test_offline_load_fails_at_once_with_the_installed_clients_advice(name, counting_hub, monkeypatch):
    """HF_HUB_OFFLINE known: the cache only, no request to the hub (so no retries), and advice that names
    the download command this huggingface_hub installs."""
    from lens.models import hub

    endpoint, hits = counting_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    with pytest.raises(lens.ModelLoadError) as caught:
        lens.load(name)
    message = str(caught.value)
    assert "HF_HUB_OFFLINE is set" in message
    folder = name.split("/")[-1]
    assert f"{hub.download_command(name)}" in message and f"lens.load('./{folder}')" in message
    assert hits == [], "an offline load must not ask the hub anything"


def test_no_network_is_detected_by_a_cheap_probe(monkeypatch):
    import socket

    from lens.models import hub

    with socket.socket() as s:  # a port nothing listens on: connection refused at once
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    monkeypatch.setattr(hub, "_probes", {})
    reason = hub.offline_reason()
    assert reason and reason.startswith(f"no network: 127.0.0.1:{closed} cannot be reached")
    with pytest.raises(lens.ModelLoadError, match="no network"):
        lens.load("gpt2")


def test_a_reachable_endpoint_is_not_called_offline(counting_hub, monkeypatch):
    from lens.models import hub

    endpoint, _ = counting_hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(hub, "_probes", {})
    assert hub.offline_reason() is None


def test_download_advice_follows_the_installed_hub_client(monkeypatch):
    from importlib import metadata

    from lens.models import hub

    class Dist:
        def __init__(self, scripts):
            self.entry_points = [metadata.EntryPoint(n, "x:y", "console_scripts") for n in scripts]

    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(["hf", "tiny-agents"]))
    assert hub.download_command("gpt2") == "hf download gpt2 --local-dir ./gpt2"
    monkeypatch.setattr(metadata, "distribution", lambda name: Dist(["huggingface-cli"]))  # before 0.34
    assert hub.download_command("org/m") == "huggingface-cli download org/m --local-dir ./m"


# -- widget reprs -------------------------------------------------------------------------------------------

def test_widget_reprs_never_show_raw_buffers(results):
    lw = pytest.importorskip("lens.widgets")
    run = results["run"]
    views = [lw.AttentionExplorer(run), lw.SinkMap(run), lw.ValleyPlot(run), lw.TokenView.mass(run, 0, 0),
             lw.CompareView(results["compare"])]
    for view in views:
        text = repr(view)
        assert "b'" not in text and "\\x" not in text and len(text) < 200, text
        assert text.startswith(type(view).__name__ + "(") and "kB to the browser" in text
    assert "layer=" in repr(views[0]) and "head=" in repr(views[0])
    pytest.importorskip("panel")
    import panel as pn

    column = pn.Column("# Attention", views[0].to_panel())
    text = repr(column)
    assert "b'" not in text and "\\x" not in text and len(text) < 400, text
