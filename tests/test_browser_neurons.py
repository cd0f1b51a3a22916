"""NeuronExplorer in a real browser: Debian's chromium (Playwright) against a Panel server on 127.0.0.1, and
the standalone export opened from disk. A click on a table row opens the neuron's page (histogram, top-k
contexts, samples, logit effects) and reaches Python; sorting, paging and the token search are answered by
Python; only one table page and one neuron ever reach the browser."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch
from scan_support import SCAN_CORPUS

import lens
import lens.widgets as lw
from lens.widgets._browser import CHROMIUM, chromium, chromium_available, free_port, panel_server, wait_for_file

_REQUIRED = os.environ.get("LENS_REQUIRE_BROWSER") == "1"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not chromium_available() and not _REQUIRED, reason=f"no chromium at {CHROMIUM}"),
]
EXPLORER = ".lens-neuron-explorer"


@pytest.fixture(scope="module")
def scan_dir(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("browser-scan") / "scan"
    lens.scan(lens.load(tiny_model_dir("gpt2")), SCAN_CORPUS, out=folder, top_k=5, max_len=16, stride=12,
              progress=False)
    return folder


def test_panel_explorer_pages_neurons_on_demand_and_reports_clicks(scan_dir, tmp_path):
    port = free_port()
    out = tmp_path / "seen.json"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f'''
        import json
        from pathlib import Path
        import panel as pn
        import lens, lens.widgets as lw

        explorer = lw.NeuronExplorer(lens.Scan.load({str(scan_dir)!r}), page_size=20)
        component = explorer.to_panel()

        def seen(*events):
            Path({str(out)!r}).write_text(json.dumps({{
                "widget": [explorer.layer, explorer.neuron], "examples": len(explorer.detail.get("examples", [])),
                "sort": explorer.sort, "search": explorer.search, "rows": explorer.table_meta["rows"]}}))

        explorer.observe(seen, names=["layer", "neuron", "sort", "search", "page"])
        pn.serve(component, address="127.0.0.1", port={port}, show=False, threaded=False)
    '''))
    with panel_server(app, port) as url, chromium() as new_page:
        page = new_page(url.rstrip("/"))
        page.page.goto(url)
        p = page.page
        data = page.wait_dataset(EXPLORER, 60, state="ready", rows="20", page="0", sort="max")
        assert int(data["total"]) == 2 * 128
        assert p.locator(f"{EXPLORER} .lens-ne-row").count() == 20  # one page, not the scan
        first = p.locator(f"{EXPLORER} .lens-ne-row").nth(2)
        layer, neuron = first.get_attribute("data-layer"), first.get_attribute("data-neuron")
        first.click()
        page.wait_dataset(EXPLORER, layer=layer, neuron=neuron, examples="5")
        assert p.locator(f"{EXPLORER} .lens-ne-example").count() == 5
        assert p.locator(f"{EXPLORER} .lens-hist rect").count() > 3
        assert p.locator(f"{EXPLORER} .lens-ne-example .lens-chip[style*='background']").count() > 5
        assert "promotes" in p.inner_text(f"{EXPLORER} .lens-ne-logits")
        seen = json.loads(wait_for_file(out, 20, page))
        assert seen["widget"] == [int(layer), int(neuron)] and seen["examples"] == 5
        # sort by clicking a column header, then page
        p.click(f"{EXPLORER} th:has-text('sparsity')")
        page.wait_dataset(EXPLORER, sort="sparsity", page="0")
        p.click(f"{EXPLORER} button[aria-label='next page']")
        page.wait_dataset(EXPLORER, page="1")
        # the token search: only neurons whose top examples contain the token
        token = p.locator(f"{EXPLORER} .lens-ne-example .lens-ne-centre").first.inner_text().replace("␣", " ")
        p.fill(f"{EXPLORER} .lens-search", token)
        p.press(f"{EXPLORER} .lens-search", "Enter")
        import time

        deadline = time.time() + 20
        while time.time() < deadline and page.dataset(EXPLORER)["total"] == "256":
            p.wait_for_timeout(100)
        total = int(page.dataset(EXPLORER)["total"])
        assert 1 <= total < 256
        deadline = time.time() + 20
        while time.time() < deadline:
            seen = json.loads(out.read_text())
            if seen["search"] == token:
                break
            time.sleep(0.2)
        assert seen["rows"] == total
        assert page.errors == [] and page.blocked == []


def test_standalone_export_of_chosen_neurons_works_offline(scan_dir, tmp_path):
    explorer = lw.NeuronExplorer(lens.Scan.load(scan_dir), page_size=10, layer_filter=1, sort="neuron", descending=False)
    path = explorer.to_html(tmp_path / "neurons.html", neurons=[(1, 0), (1, 3)])
    with chromium() as new_page:
        page = new_page(None)  # no origin allowed: any request is blocked
        page.page.goto(path.as_uri())
        page.wait_dataset(EXPLORER, 30, state="ready", rows="10", layer="1", neuron="0", examples="5")
        page.page.click(f'{EXPLORER} .lens-ne-row[data-layer="1"][data-neuron="3"]')
        page.wait_dataset(EXPLORER, layer="1", neuron="3", examples="5")
        assert page.page.locator(f"{EXPLORER} .lens-search").is_disabled()
        assert page.errors == [] and page.blocked == []
