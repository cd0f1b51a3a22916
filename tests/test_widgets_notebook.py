"""``notebooks/03_widgets_tour.ipynb`` runs top to bottom in a real python3 kernel (nbclient), and every
widget it shows is a widget view whose state the kernel sent — the state nbclient stores in the notebook
as JupyterLab would."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TOUR = Path(__file__).resolve().parent.parent / "notebooks" / "03_widgets_tour.ipynb"
VIEW = "application/vnd.jupyter.widget-view+json"
STATE = "application/vnd.jupyter.widget-state+json"
COMPONENTS = {"AttentionExplorer", "SinkMap", "ValleyPlot", "TokenView", "CompareView"}


@pytest.mark.slow
def test_widgets_tour_runs_and_shows_every_component(tmp_path):
    work = tmp_path / TOUR.name
    shutil.copy(TOUR, work)
    nb = nbformat.read(work, as_version=4)
    # the kernel works in tmp_path, so the tour's exported HTML lands there, not in the repository
    NotebookClient(nb, timeout=600, kernel_name="python3", store_widget_state=True,
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    stderr = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr"]
    assert not any("Error" in text or "WARNING" in text for text in stderr), stderr

    state = nb.metadata["widgets"][STATE]["state"]
    shown = {o.data[VIEW]["model_id"] for o in outputs if VIEW in o.get("data", {})}
    # other views are progress bars (tqdm while a quantized model loads)
    lens_views = [m for m in shown if state[m]["model_module"] == "anywidget"]
    components = [state[m]["state"]["_anywidget_id"].rsplit(".", 1)[-1] for m in lens_views]
    assert COMPONENTS <= set(components), components
    for model_id in lens_views:
        model = state[model_id]
        # the ESM travels inside the widget state: nothing for the browser to fetch
        esm = model["state"]["_esm"]
        assert "export default { render }" in esm and "https://" not in esm
        # numbers travel as binary buffers, saved base64-encoded beside the JSON state
        assert model.get("buffers"), f"{model_id} has no binary buffers"
    long_views = [state[m] for m in lens_views if state[m]["state"].get("view_meta", {}).get("block") == 2]
    assert long_views, "the 512-token explorer should show 2-token blocks"
    # the export goes to a temporary folder, and the tour leaves nothing in its working folder
    printed = "".join(o.text for o in outputs if o.output_type == "stream" and o.name == "stdout")
    size = re.search(r"attention_explorer\.html (\d+) kB", printed)
    assert size and int(size.group(1)) < 3_000, printed
    assert sorted(p.name for p in tmp_path.iterdir()) == [TOUR.name]
    assert len(json.dumps(nb.metadata["widgets"])) < 4_000_000  # nine widgets, one of them 512 tokens
    # what the cells print or show as text is short and readable: never a widget's raw buffers
    texts = [o.text for o in outputs if o.output_type == "stream"]
    texts += [o.data["text/plain"] for o in outputs if "text/plain" in o.get("data", {})]
    for text in texts:
        assert "b'" not in text and "\\x" not in text, text[:300]
        assert len(text) < 2_000, text[:300]
    # the headline explorer (the first view) shows a kept head: its heatmap, not "not kept"
    first = state[next(o.data[VIEW]["model_id"] for o in outputs if VIEW in o.get("data", {})
                       and state[o.data[VIEW]["model_id"]]["model_module"] == "anywidget")]
    assert first["state"]["view_meta"]["kept"], first["state"]["view_meta"]
