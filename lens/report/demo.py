"""``lens demo``: the main job — the embedded MiniLM and the embedded decoder SmolLM2, offline, from sentences to
an HTML report."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

__all__ = ["DEMO_TEXTS", "run_demo", "valley_table"]

# Varied on purpose: short and long, prose, code, numbers, lists, questions, another language — sinks and
# the valley should be robust to all of them, and the report shows the spread.
DEMO_TEXTS = [
    "The cat sat on the mat and watched the rain.",
    "Attention sinks are tokens that receive a large share of attention regardless of their meaning.",
    "def softmax(x): return np.exp(x - x.max()) / np.exp(x - x.max()).sum()",
    "In 2024, the model processed 1,048,576 tokens in 3.7 seconds on 8 GPUs.",
    "Why do transformers put so much attention on the first token?",
    "Buy milk, eggs, flour, butter, sugar and two lemons.",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Paris is the capital of France; Berlin is the capital of Germany; Rome is the capital of Italy.",
    "She said: \"I will be there at noon,\" but nobody believed her.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "ERROR 404: the requested resource /api/v2/users/17 was not found on this server.",
    "Compression valleys appear where representations collapse onto a few directions in the middle layers.",
    "Once upon a time, in a village between two rivers, there lived a clockmaker who never slept.",
    "The derivative of x squared is two x, and the integral of one over x is the log of x.",
    "Sparse attention keeps the blocks that matter and skips the rest, trading exactness for speed.",
    "Hello!",
]


def run_demo(out: str | Path = "lens-report.html", *, texts=None, deploy: bool = True, decoder: bool = True,
             progress: bool | None = None) -> Path:
    """Load the embedded model, trace the demo sentences, print a summary and write the HTML report.

    ``decoder=True`` adds the embedded decoder SmolLM2-135M-Instruct beside MiniLM (its sinks, massive
    activations and interior valley; fetched into lens's cache on first use — ``lens models fetch``).
    ``deploy=True`` adds the deployment section (sparse attention and low-bit weights against dense)
    when the deployment kernels are available. Standard output gets only the summary lines and the report's
    path; progress bars go to standard error and only when it is a terminal (``progress=None``; True or False
    to force). Returns the report's path.

    Example: ``lens.report.demo.run_demo("report.html")`` (what ``lens demo`` runs).
    """
    import lens
    from lens.report.html import Report

    started = time.perf_counter()
    texts = list(texts or DEMO_TEXTS)
    lm = lens.load(progress=progress)
    run = lens.trace(lm, texts, batch_size=8, keep_patterns=[(2, h) for h in range(lm.n_heads)], keep_hidden="all",
                     progress=progress)
    sink_result = lens.sinks(run)
    valley_result = lens.valley(run)

    massive = sink_result.to_frame("massive")
    top = massive.sort_values("ratio_to_median", ascending=False).iloc[0]
    n_massive = int(massive["is_massive"].sum())
    summary = "\n".join(
        [
            f"model: {lm!r}",
            f"inputs: {run.n_sequences} sentences, {int(run.lengths.sum())} tokens",
            sink_result.summary(),
            valley_result.summary(),
            (
                f"massive activations (|x| > {sink_result.massive_abs:g} and > {sink_result.massive_rel:g}× median): "
                f"{n_massive}; largest ratio {top.ratio_to_median:.0f}× the median (|x| = {top.abs_value:.2f}, layer "
                f"{int(top.layer)}, token {top.token!r}, dim {int(top.dim)})"
            ),
        ]
    )
    print("\n" + summary + "\n", flush=True)

    report = Report(
        "lens demo — attention sinks and compression valleys",
        subtitle=f"{lm.model_id} · {run.n_sequences} sentences · lens {lens.__version__}",
    )
    report.section("Summary", text=summary)
    report.section(
        "Attention sinks",
        note="Mass on the first token ([CLS]) per layer and head, averaged over sentences; outlined cells are sink heads "
        f"(score ≥ {sink_result.epsilon}). Computed inside the attention kernel, streaming — no n×n tensor kept.",
        figures=[sink_result.figure("heads")],
        frames={"per layer": sink_result.to_frame("layers")},
    )
    report.section(
        "Compression valley",
        note="Matrix entropy of the residual stream per layer (raw: Queipo-de-Llano et al.; normalized: Skean et al.) "
        "beside the upper bound implied by the first token's norm alone (docs/definitions.md#massive-activation-bound). "
        "r = min(T, d), the largest rank the token matrix can have.",
        figures=[valley_result.figure()],
        frames={"per layer": valley_table(valley_result)},
    )
    report.section(
        "Massive activations and token norms",
        figures=[sink_result.figure("massive"), sink_result.figure("norms")],
        frames={"largest entries": massive.sort_values("ratio_to_median", ascending=False).head(12)},
    )
    if decoder:
        from lens.report.decoder import decoder_section

        heading, text, figures, frames = decoder_section(texts, sink_result, valley_result, progress=progress)
        print(text + "\n", flush=True)
        report.section(heading, text=text, figures=figures, frames=frames,
                       note="Same sentences, traced by lens on the embedded decoder (its GGUF weights dequantized by "
                       "transformers' GGUF loader). Sinks: mass on the first token per layer and head; the valley plot "
                       "puts the measured matrix entropy beside the bound implied by the first token's norm alone.")
    if deploy:
        section = _deployment_section(lm, texts, run, progress)
        if section is not None:
            heading, text, figures, frames = section
            print(text + "\n", flush=True)
            report.section(heading, text=text, figures=figures, frames=frames)
    report.section("Provenance", text=_pretty(run.provenance))
    path = report.write(out)
    print(f"report written to {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s")
    return path


def valley_table(result):
    """The valley per residual layer with readable headings (the columns of ``ValleyResult``'s notebook
    table), the valley layer marked — narrow enough for a 1400-px page.

    Example: ``valley_table(lens.valley(run))``.
    """
    from lens.analysis.valley import _TABLE

    frame = result.to_frame()[list(_TABLE)].rename(columns=_TABLE)
    if result.interior:
        frame["valley"] = ["◀ minimum" if layer == result.valley_layer else ("in valley" if inside else "")
                           for layer, inside in zip(frame["layer"], result.to_frame()["in_valley"])]
    return frame.round(4)


def _deployment_section(lm, texts, dense_run, progress):
    """Dense against the deployed variants (sparse attention, low-bit weights)."""
    from lens.report.deployment import demo_section

    return demo_section(lm, texts, dense_run, progress=progress)


def _pretty(obj, indent: int = 0) -> str:
    pad = "  " * indent
    if isinstance(obj, dict):
        return "\n".join(
            f"{pad}{k}:" + ("\n" + _pretty(v, indent + 1) if isinstance(v, (dict, list)) and v else f" {v}")
            for k, v in obj.items()
        )
    if isinstance(obj, list):
        return "\n".join(f"{pad}- {np.asarray(v).tolist() if isinstance(v, np.ndarray) else v}" for v in obj)
    return f"{pad}{obj}"
