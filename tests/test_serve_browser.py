"""The team dashboard in a real browser (Debian's chromium through Playwright) against the session's
``lens serve`` on 127.0.0.1: sign in (a wrong password refused), run MiniLM and watch the job finish, the
SinkMap of the result, two runs compared, a second user who sees the run but cannot delete it; and bad
input through the page — each answered by a message on the page, the server up, the store unchanged."""

from __future__ import annotations

import os
import re
import urllib.request

import pytest

from lens.widgets._browser import CHROMIUM, chromium, chromium_available

_REQUIRED = os.environ.get("LENS_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not chromium_available() and not _REQUIRED, reason=f"no chromium at {CHROMIUM}: apt-get install -y chromium"),
]

TEXTS = "The capital of France is Paris.\nAttention sinks form on the first token of many layers."
# the refused sign-in is answered with HTTP 401, which chromium logs as a console error on that page
_EXPECTED = re.compile(r"status of 401 \(Unauthorized\)")


def errors(page) -> list[str]:
    return [e for e in page.errors if not _EXPECTED.search(e)]


def sign_in(new_page, server, name, password=None):
    page = new_page(server.url)
    p = page.page
    p.goto(f"{server.url}/")
    p.wait_for_selector("form.lens-login")
    p.fill("#username", name)
    p.fill("#password", password or server.passwords[name])
    p.click("#login")
    return page


def signed_in(page, name) -> None:
    page.page.wait_for_selector(".lens-user", timeout=60_000)
    assert f"signed in as {name}" in page.page.inner_text(".lens-user")


def tab(page, title: str) -> None:
    page.page.click(f".lens-tabs .bk-tab:text-is('{title}')")


def message(page, css: str, pattern: str, timeout: float = 30) -> str:
    """Wait until the message area ``css`` shows text matching ``pattern``; return the text."""
    p = page.page
    deadline = timeout * 1000
    waited = 0
    text = ""
    while waited < deadline:
        if p.locator(f"{css}").count():
            text = p.inner_text(css)
            if re.search(pattern, text):
                return text
        p.wait_for_timeout(100)
        waited += 100
    raise TimeoutError(f"{css} never said {pattern!r}; last: {text!r}; page errors: {page.errors}")


def run_job(page, texts: str, weights: str) -> str:
    """Queue a MiniLM job from the New run page, watch it run, return the id of the run that opens."""
    p = page.page
    tab(page, "New run")
    p.wait_for_selector(".lens-texts textarea")
    p.fill(".lens-texts textarea", texts)
    p.select_option(".lens-quant select", label=weights)
    p.press(".lens-texts textarea", "Tab")
    previous = page.dataset(".lens-job").get("job") if p.locator(".lens-job").count() else None
    p.click(".lens-submit button")
    job = previous
    for _ in range(300):  # the new job's status replaces the previous job's
        if p.locator(".lens-job").count():
            job = page.dataset(".lens-job").get("job")
            if job != previous:
                break
        p.wait_for_timeout(100)
    assert job and job != previous, "no job was queued"
    assert re.search(rf"Job {job}: (queued|running|done)", message(page, ".lens-job", job))
    text = message(page, ".lens-runs-message", rf"Run [0-9a-f]{{16}} \(job {job}\) is ready", timeout=180)
    run_id = re.search(r"Run ([0-9a-f]{16})", text).group(1)
    page.wait_dataset(".lens-view-title", 30, view="SinkMap", run=run_id)
    return run_id


def test_a_team_signs_in_runs_minilm_opens_compares_and_respects_ownership(team_server):
    store = team_server.store
    with chromium() as new_page:
        ana = sign_in(new_page, team_server, "ana", "not-the-password")
        assert "Wrong user name or password" in ana.page.inner_text(".lens-login .error")
        assert ana.page.url.endswith("/login")
        ana.page.fill("#password", team_server.passwords["ana"])
        ana.page.click("#login")
        signed_in(ana, "ana")

        dense = run_job(ana, TEXTS, "full precision")
        sink_map = ".lens-view .lens-sink-map"
        ana.wait_dataset(sink_map, 30, state="ready")
        assert ana.canvas_ink(f"{sink_map} .lens-headgrid canvas") > 1000
        assert ana.page.locator(f"{sink_map} .lens-chip").count() > 5
        entry = store.entry(dense)
        assert (entry.owner, entry.n_inputs, entry.quant) == ("ana", 2, "")

        # the other views of the same run
        ana.page.click(".lens-view-kind button:text-is('ValleyPlot')")
        ana.wait_dataset(".lens-view-title", 30, view="ValleyPlot", run=dense)
        ana.page.wait_for_selector(".lens-view .lens-valley-plot svg >> nth=2", timeout=30_000)
        assert ana.page.locator(".lens-view .lens-valley-plot svg").count() == 3
        ana.page.click(".lens-view-kind button:text-is('AttentionExplorer')")
        ana.wait_dataset(".lens-view .lens-attention-explorer", 30, state="ready", kept="true")

        # the same texts on int8 weights, then the two compared
        quantized = run_job(ana, TEXTS, "int8")
        assert store.entry(quantized).quant == "int8"
        for run_id in (dense, quantized):
            ana.page.click(f".lens-runs-table .tabulator-row:has-text('{run_id}') input[aria-label='Select Row']")
        ana.page.click(".lens-compare button")
        compare = ".lens-view .lens-compare-view"
        ana.wait_dataset(compare, 60, state="ready")
        assert ana.canvas_ink(f"{compare} .lens-headgrid canvas") > 1000
        title = ana.page.inner_text(".lens-view-title")
        assert "CompareView" in title and dense in title and quantized in title and "int8" in title

        # the other pages: a stored scan, the vision runs, the admin page
        from serve_support import fake_scan

        scan = store.save_scan(fake_scan(team_server.root / "scan-src"), owner="ana", tags="corpus")
        tab(ana, "Scans")
        row = f".lens-scan-table .tabulator-row:has-text('{scan.id}')"
        ana.page.wait_for_selector(row, timeout=30_000)
        ana.page.click(f"{row} .tabulator-cell[tabulator-field='id']")
        ana.page.click(".lens-scans-open button")
        ana.page.wait_for_selector(f"text=Scan {scan.id}", timeout=30_000)
        assert "twelve documents" in ana.page.inner_text(".lens-scans-view")
        # random bytes stand in for the scan's files: where the neuron explorer is installed, the page says it
        # cannot open them, and still shows what the store knows
        import importlib.util

        if importlib.util.find_spec("duckdb") and importlib.util.find_spec("pyarrow"):
            ana.page.wait_for_selector("text=The neuron explorer cannot open this scan", timeout=30_000)
        tab(ana, "Vision")
        ana.page.wait_for_selector("text=vision-language", timeout=30_000)
        tab(ana, "Admin")
        ana.page.wait_for_selector(".lens-admin-workers .tabulator-row", timeout=30_000)
        assert "minilm:none/int8" in ana.page.inner_text(".lens-admin-workers .tabulator-tableholder")
        assert "transformers modelling modules imported: 0" in ana.page.inner_text(".lens-admin-process-facts")
        tab(ana, "Runs")

        # bo, a member, sees ana's run but cannot delete it
        bo = sign_in(new_page, team_server, "bo")
        signed_in(bo, "bo")
        bo.page.wait_for_selector(f".lens-runs-table .tabulator-row:has-text('{dense}')", timeout=30_000)
        bo.page.fill(".lens-run-id input", dense)
        bo.page.press(".lens-run-id input", "Enter")
        bo.wait_dataset(".lens-view-title", 30, view="SinkMap", run=dense)
        bo.wait_dataset(".lens-view .lens-sink-map", 30, state="ready")
        bo.page.click(".lens-delete button")
        text = message(bo, ".lens-runs-message", "may not delete")
        assert f"bo may not delete the run {dense}: it belongs to ana" in text
        assert store.entry(dense).owner == "ana" and store.load_run(dense, verify=True)
        assert "Admin" not in bo.page.inner_text(".lens-tabs .bk-header")
        assert "Admin" in ana.page.inner_text(".lens-tabs .bk-header")

        for page in (ana, bo):
            assert errors(page) == [], errors(page)
            assert page.blocked == [], page.blocked


def _snapshot(store):
    return ([e.id for e in store.entries()], store.jobs.counts(), store.version())


def test_bad_input_gets_a_message_on_the_page_and_changes_nothing(team_server, tmp_path):
    store = team_server.store
    big = tmp_path / "big.txt"
    big.write_bytes(b"one input per line\n" * (10 * 1024 * 1024 // 19 + 1))  # 10 MB
    fake_image = tmp_path / "cat.png"
    fake_image.write_text("this is not a picture of a cat")
    before = _snapshot(store)
    with chromium() as new_page:
        bo = sign_in(new_page, team_server, "bo")
        signed_in(bo, "bo")
        p = bo.page

        # empty text
        tab(bo, "New run")
        p.wait_for_selector(".lens-texts textarea")
        p.fill(".lens-texts textarea", "   \n\n  ")
        p.press(".lens-texts textarea", "Tab")
        p.click(".lens-submit button")
        message(bo, ".lens-new-message", "Not queued: there is no text to analyse")

        # a 10 MB upload
        p.set_input_files(".lens-upload input[type=file]", str(big))
        message(bo, ".lens-new-message", r"Upload refused: big\.txt is 10\.\d MB; uploads are limited to 2\.0 MB", timeout=60)
        p.click(".lens-submit button")
        message(bo, ".lens-new-message", "Upload refused")

        # a file that is not an image, given as the image
        p.set_input_files(".lens-image input[type=file]", str(fake_image))
        message(bo, ".lens-new-message", r"Image refused: cat\.png is not an image")

        # run ids that do not exist, typed and in the address
        tab(bo, "Runs")
        for bad in ("0123456789abcdef", "../../etc/passwd"):
            p.fill(".lens-run-id input", bad)
            p.press(".lens-run-id input", "Enter")
            message(bo, ".lens-runs-message", "There is no run with id")
        p.goto(f"{team_server.url}/?run=..%2F..%2Fetc%2Fpasswd")
        message(bo, ".lens-runs-message", "There is no run with id")
        assert "root:" not in p.content()

        assert errors(bo) == [], errors(bo)
        assert bo.blocked == []
    with urllib.request.urlopen(f"{team_server.url}/liveness", timeout=10) as response:
        assert response.status == 200  # the server is up
    assert team_server.proc.poll() is None
    assert _snapshot(store) == before  # nothing queued, stored or deleted
    assert store.verify().ok
