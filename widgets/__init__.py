"""Interactive views of lens runs: anywidget components that also run in Panel and as standalone HTML.

Every component ships its own ES module inside the wheel (``lens/widgets/static``; no CDN, no require.js,
nothing fetched at render time), sends numbers as binary buffers, aggregates long sequences in Python,
follows the JupyterLab theme, and is keyboard accessible.

| widget | what it shows |
|---|---|
| ``AttentionExplorer`` | layer × head grid by sink score → any head's token × token pattern (``run.show()``) |
| ``SinkMap`` | sink-score heatmap → mass each token receives (``lens.sinks(run).show()``) |
| ``ValleyPlot`` | entropy, anisotropy, first-token norm per layer, several runs (``lens.valley(run).show()``) |
| ``TokenView`` | text coloured by any per-token value (a neuron, the mass received…) |
| ``CompareView`` | the deltas of ``lens.compare(run_a, run_b)`` |
| ``NeuronExplorer`` | the neurons of a corpus scan: table, search by token, a page per neuron (``scan.show()``) |
| ``PatchOverlay`` | an image a VLM saw, its patch grid coloured by mass, text→image mass, norm, visual sinks… (``lens.vision(run).show()``) |

Each has ``to_html(path)`` (one offline file) and ``to_panel()`` (the same ESM in a Panel app), and traits
Python can read back and link (``seq``, ``layer``, ``head``, ``token``).

Example::

    import lens, ipywidgets
    run = lens.trace(lens.load(), ["The cat sat on the mat."], keep_patterns=[(0, 3)])
    explorer = lens.widgets.AttentionExplorer(run)
    sink_map = lens.widgets.SinkMap(run, layer=explorer.layer, head=explorer.head)  # start equal: the link moves neither
    ipywidgets.link((explorer, "layer"), (sink_map, "layer"))
    ipywidgets.VBox([sink_map, explorer])
"""

try:  # the widgets are an optional extra: say how to get them rather than fail on a bare import error
    import anywidget  # noqa: F401
    import ipywidgets  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in environments without the extra
    from lens.errors import MissingDependencyError

    raise MissingDependencyError(
        f"lens.widgets needs anywidget and ipywidgets ({exc}); install them with pip install 'lens-interp[widgets]'"
    ) from exc

from ._base import LensWidget
from .attention import AttentionExplorer
from .compare import CompareView
from .neuron_explorer import NeuronExplorer
from .patch_overlay import PatchOverlay
from .sinkmap import SinkMap
from .tokens import TokenView
from .valley_plot import ValleyPlot

__all__ = ["AttentionExplorer", "SinkMap", "ValleyPlot", "TokenView", "CompareView", "NeuronExplorer", "PatchOverlay", "LensWidget"]
