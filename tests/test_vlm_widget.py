"""PatchOverlay: the numbers it colours the grid with (against the run and against HF eager attention), its
errors, Panel, and a real browser (Debian's chromium via Playwright) on the standalone export and in Panel."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from vlm_support import sample_image

import lens
import lens.widgets as lw
from lens.errors import ConfigError
from lens.models.multimodal import placeholder
from lens.widgets._browser import chromium, chromium_available, free_port, panel_server, wait_for_file


@pytest.fixture(scope="module")
def llava(tiny_vlm_dir):
    folder = tiny_vlm_dir("llava")
    lm = lens.load(folder)
    item = {"image": sample_image(7), "text": f"Look {placeholder(lm)} at the cat on the mat."}
    run = lens.trace(lm, [item], track_neurons=[(1, 5)], progress=False)
    return folder, lm, item, run


def _grid(widget) -> np.ndarray:
    meta = widget.grid_meta
    return np.frombuffer(widget.values, dtype=np.float32).reshape(meta["rows"], meta["cols"])


def test_cells_hold_the_runs_numbers_at_their_grid_positions(llava):
    _, lm, _, run = llava
    image = np.nonzero(run.modality == 1)[0]
    rows, cols = run.arrays["image.row"][image], run.arrays["image.col"][image]
    w = lw.PatchOverlay(run, stat="mass", layer=1, head=2)
    np.testing.assert_allclose(_grid(w)[rows, cols], run.mass_received(1, 2, 0)[image], rtol=1e-6)
    w.stat, w.head = "norm", -1
    np.testing.assert_allclose(_grid(w)[rows, cols], run.arrays["resid.norm"][1, image], rtol=1e-6)
    w.stat = "neuron"  # layer clamped to the one tracked-neuron "layer", neuron 0
    assert (w.layer, w.neuron, w.head) == (0, 0, -1)
    np.testing.assert_allclose(_grid(w)[rows, cols], run.arrays["mlp.tracked"][0, image], rtol=1e-6)
    w.stat, w.layer = "encoder_norm", 2  # the neuron selection is reset with the statistic
    patches = np.nonzero(run.arrays["vision.row"] >= 0)[0]
    pr, pc = run.arrays["vision.row"][patches], run.arrays["vision.col"][patches]
    np.testing.assert_allclose(_grid(w)[pr, pc], run.arrays["vision.norm"][2, patches], rtol=1e-6)
    assert w.grid_meta["rows"] == 4 and len(w.pixels) == w.grid_meta["height"] * w.grid_meta["width"] * 3


def test_mass_from_one_text_token_equals_eager_attention(llava):
    folder, lm, item, run = llava
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    processed = lm.processor(images=[Image.fromarray(item["image"])], text=[item["text"]], return_tensors="pt")
    with torch.no_grad():
        attn = ref(**processed, output_attentions=True, use_cache=False).attentions
    image = np.nonzero(processed["input_ids"][0].numpy() == lm.config.image_token_id)[0]
    side = 4
    for query in (int(image[-1]) + 1, int(processed["input_ids"].shape[1]) - 1):
        w = lw.PatchOverlay(run, stat="from_token", layer=1, query=query)
        expected = attn[1][0].double().mean(0)[query, image].numpy()
        np.testing.assert_allclose(_grid(w).ravel(), expected, rtol=1e-4, atol=1e-7)
        assert w.grid_meta["rows"] == side


def test_flags_mark_the_planted_high_norm_patch(llava):
    _, lm, item, _ = llava
    token = 1 + 6  # after CLS: patch 6 = row 1, col 2

    def plant(module, args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[0, token] *= 50.0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = lm.vision_blocks[0].register_forward_hook(plant)
    try:
        run = lens.trace(lm, [item], progress=False)
    finally:
        handle.remove()
    w = lw.PatchOverlay(run, stat="encoder_norm", layer=1)
    flags = np.frombuffer(w.flags, dtype=np.uint8).reshape(4, 4)
    assert flags.sum() == 1 and flags[1, 2] == 1


def test_bad_selections_and_runs_are_refused(llava, minilm):
    _, _, _, run = llava
    with pytest.raises(ConfigError, match="vision-language"):
        lw.PatchOverlay(lens.trace(minilm, ["No image here."], progress=False))
    w = lw.PatchOverlay(run)
    for trait, value, needle in [("stat", "nope", "stat must be"), ("image", 3, "image must"), ("head", 99, "head must")]:
        with pytest.raises(ConfigError, match=needle):
            setattr(w, trait, value)
        w = lw.PatchOverlay(run)
    with pytest.raises(ConfigError, match="text token"):
        lw.PatchOverlay(run, stat="from_token", query=0)
    assert "PatchOverlay(" in repr(w) and "kB to the browser" in repr(w)
    assert type(lens.vision(run).show()).__name__ == "PatchOverlay"
    component = w.to_panel()
    assert component.stat == "mass" and len(component.values) == len(w.values)


# as in test_browser_widgets: CI sets LENS_REQUIRE_BROWSER=1, where a missing chromium fails instead of skipping
_REQUIRED = os.environ.get("LENS_REQUIRE_BROWSER") == "1"


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not chromium_available() and not _REQUIRED, reason="no chromium: apt-get install -y chromium")
def test_standalone_export_draws_the_image_and_answers_clicks_offline(llava, tmp_path, scheme):
    _, _, _, run = llava
    path = lw.PatchOverlay(run, stat="mass", layer=1).to_html(tmp_path / "patches.html")
    sel = ".lens-patch-overlay"
    with chromium() as new_page:
        page = new_page(None, color_scheme=scheme)  # no origin: any request is blocked and recorded
        page.page.goto(path.as_uri())
        page.wait_dataset(sel, 30, state="ready", stat="mass", layer="1")
        canvas = f"{sel} canvas.lens-patch-canvas"
        assert page.canvas_ink(canvas) > 1000
        before = page.canvas_hash(canvas)
        box = page.page.locator(canvas).bounding_box()
        page.page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.3)  # row 1, col 2
        assert "row 1, col 2" in page.page.inner_text(f"{sel} .lens-patch-detail")
        page.page.select_option(f"{sel} select[aria-label='statistic']", "encoder_norm")
        page.wait_dataset(sel, 10, state="ready", stat="encoder_norm")
        assert page.canvas_hash(canvas) != before
        page.page.fill(f"{sel} input[aria-label='layer']", "0")
        page.page.dispatch_event(f"{sel} input[aria-label='layer']", "input")
        page.wait_dataset(sel, 10, state="ready", layer="0")
        page.page.focus(canvas)
        page.page.keyboard.press("ArrowRight")
        page.page.keyboard.press("Enter")
        assert "encoder patch row" in page.page.inner_text(f"{sel} .lens-patch-detail")
        assert page.errors == [] and page.blocked == []


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not chromium_available() and not _REQUIRED, reason="no chromium: apt-get install -y chromium")
def test_panel_serves_the_overlay_and_reports_the_clicked_patch_to_python(llava, tmp_path):
    _, _, _, run = llava
    run.save(tmp_path / "vlm.lens")
    port = free_port()
    out = tmp_path / "seen.json"
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(f'''
        import json
        from pathlib import Path
        import panel as pn
        import lens, lens.widgets as lw

        overlay = lw.PatchOverlay(lens.Run.load({str(tmp_path / "vlm.lens")!r}), stat="text_mass", layer=0)
        component = overlay.to_panel()

        def seen(*events):
            Path({str(out)!r}).write_text(json.dumps({{"patch": overlay.patch, "layer": overlay.layer,
                                                       "rendered_layer": overlay.grid_meta["layer"]}}))

        component.param.watch(seen, ["patch", "layer"])
        pn.serve(component, address="127.0.0.1", port={port}, show=False, threaded=False)
    '''))
    sel = ".lens-patch-overlay"
    with panel_server(app, port) as url, chromium() as new_page:
        page = new_page(url.rstrip("/"))
        page.page.goto(url)
        page.wait_dataset(sel, 60, state="ready", stat="text_mass", layer="0")
        canvas = f"{sel} canvas.lens-patch-canvas"
        assert page.canvas_ink(canvas) > 1000
        before = page.canvas_hash(canvas)
        page.page.fill(f"{sel} input[aria-label='layer']", "1")
        page.page.dispatch_event(f"{sel} input[aria-label='layer']", "input")
        page.wait_dataset(sel, 20, state="ready", layer="1")
        assert page.canvas_hash(canvas) != before
        box = page.page.locator(canvas).bounding_box()
        page.page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.9)  # row 3, col 3
        seen = json.loads(wait_for_file(out, 20, page))
        deadline = 0
        while seen.get("patch") != 15 and deadline < 40:
            page.page.wait_for_timeout(250)
            seen, deadline = json.loads(out.read_text()), deadline + 1
        assert seen == {"patch": 15, "layer": 1, "rendered_layer": 1}
        assert page.errors == [] and page.blocked == []


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(not chromium_available() and not _REQUIRED, reason="no chromium: apt-get install -y chromium")
def test_jupyterlab_renders_the_overlay_and_round_trips_a_click(llava, tmp_path):
    from lens.widgets._browser import jupyterlab, lab_run_all, write_notebook

    _, _, _, run = llava
    run.save(tmp_path / "vlm.lens")
    cells = [
        "import json\nfrom pathlib import Path\nimport lens, lens.widgets as lw\n"
        "overlay = lw.PatchOverlay(lens.Run.load('vlm.lens'), stat='mass', layer=1)\n"
        "overlay.observe(lambda c: Path('patch.json').write_text(json.dumps({'patch': overlay.patch, 'stat': overlay.stat})),"
        " names=['patch', 'stat'])\noverlay",
        "Path('done.json').write_text('1')",
    ]
    write_notebook(tmp_path / "vlm.ipynb", cells)
    sel = ".lens-patch-overlay"
    with jupyterlab(tmp_path) as url, chromium() as new_page:
        page = new_page(url)
        lab_run_all(page, url, "vlm.ipynb")
        wait_for_file(tmp_path / "done.json", 180, page)
        page.wait_dataset(sel, 60, state="ready", stat="mass", layer="1")
        canvas = f"{sel} canvas.lens-patch-canvas"
        assert page.canvas_ink(canvas) > 1000
        page.page.select_option(f"{sel} select[aria-label='statistic']", "from_token")
        page.wait_dataset(sel, 20, state="ready", stat="from_token")
        box = page.page.locator(canvas).bounding_box()
        page.page.mouse.click(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.9)  # row 3, col 0
        deadline = 0
        seen = {}
        while seen.get("patch") != 12 and deadline < 80:
            page.page.wait_for_timeout(250)
            if (tmp_path / "patch.json").is_file():
                seen = json.loads((tmp_path / "patch.json").read_text())
            deadline += 1
        assert seen == {"patch": 12, "stat": "from_token"}
        assert "row 3, col 0" in page.page.inner_text(f"{sel} .lens-patch-detail")
        assert page.errors == [] and page.blocked == []


def test_a_large_export_keeps_the_current_image_then_the_current_statistic(llava):
    _, lm, item, _ = llava
    run = lens.trace(lm, [item] * 6, progress=False)
    w = lw.PatchOverlay(run, image=2, stat="norm")
    key = lambda image, stat: f'"[{image},0,\\"{stat}\\",'  # a selection's key in the file's table
    full = w.to_html()
    assert key(0, "mass") in full and key(2, "mass") in full
    smaller = w.to_html(max_bytes=len(full.encode()) - 1)
    assert key(0, "mass") not in smaller and key(2, "mass") in smaller and key(2, "norm") in smaller
    tiny = w.to_html(max_bytes=len(smaller.encode()) - 1)
    assert key(2, "mass") not in tiny and key(2, "norm") in tiny
    with pytest.raises(ConfigError, match="max_bytes"):
        w.to_html(max_bytes=1000)
