"""The demo report's decoder section: SmolLM2-135M-Instruct (Q4_1 GGUF) beside MiniLM.

MiniLM is an encoder with six layers: its "valley" is its last layer and its sinks sit on [CLS]/[SEP]. The
embedded decoder shows the phenomena lens exists for — a sink on the first token in most layers, a first token
whose norm jumps two orders of magnitude mid-depth, massive activations, an interior compression valley — and
this section puts its numbers next to MiniLM's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decoder_section", "phenomena_lines"]

_SINK_RATE = 0.8  # a layer "has sinks" when at least this fraction of its heads are sink heads


def _largest_massive(sink_result) -> dict | None:
    frame = sink_result.to_frame("massive")
    if frame.empty:
        return None
    row = frame.sort_values("abs_value", ascending=False).iloc[0]
    return {"abs": float(row.abs_value), "ratio": float(row.ratio_to_median), "layer": int(row.layer),
            "dim": int(row.dim), "token": str(row.token), "position": int(row.position),
            "massive": bool(frame["is_massive"].any())}


def phenomena_lines(name: str, sink_result, valley_result) -> dict[str, str]:
    """One short phrase per phenomenon for one model, keyed by ``sinks``, ``norm``, ``massive``, ``valley``.

    Example: ``phenomena_lines("SmolLM2", lens.sinks(run), lens.valley(run))["valley"]``.
    """
    rate = np.asarray(sink_result.sink_rate)
    n_layers = len(rate)
    ratio = np.nanmean(sink_result.first_norm_ratio, axis=1)
    peak = int(np.nanargmax(ratio))
    top = _largest_massive(sink_result)
    massive = (
        f"largest |x| = {top['abs']:.3g} ({top['ratio']:.3g}× the median) at layer {top['layer']}, dim {top['dim']}, "
        f"token {top['token']!r} (position {top['position']})" + ("" if top["massive"] else " — not massive")
        if top else "not recorded"
    )
    v = valley_result
    where = "interior" if 0 < v.valley_layer < n_layers else ("the last layer" if v.valley_layer == n_layers else "the embeddings")
    return {
        "sinks": f"sink rate ≥ {_SINK_RATE} in {int((rate >= _SINK_RATE).sum())} of {n_layers} layers; "
                 f"{len(sink_result.sink_heads)} of {sink_result.mean_sink_score.size} heads are sink heads",
        "norm": f"first-token norm up to {ratio[peak]:.3g}× the median token norm (layer {peak})",
        "massive": massive,
        "valley": f"layer {v.valley_layer} of {n_layers} (depth {v.depth_fraction:.2f}, {where})",
    }


def decoder_section(texts, minilm_sinks, minilm_valley, *, progress: bool = True):
    """Trace SmolLM2 on ``texts`` and build the report section beside MiniLM's results.

    Returns ``(heading, summary text, figures, frames)``; when SmolLM2 cannot be loaded (not cached and
    offline) the text says so and how to fetch it, and figures/frames are empty.
    """
    import lens
    from lens.errors import ModelLoadError

    heading = "A real decoder: SmolLM2-135M-Instruct (Q4_1 GGUF) beside MiniLM"
    try:
        lm = lens.load("smollm2")
    except ModelLoadError as exc:
        return heading, f"SmolLM2 is not available here, so this section is empty:\n{exc}", [], {}
    run = lens.trace(lm, list(texts), batch_size=8, progress=progress)
    sink_result = lens.sinks(run)
    valley_result = lens.valley(run)
    smol = phenomena_lines("SmolLM2", sink_result, valley_result)
    mini = phenomena_lines("MiniLM", minilm_sinks, minilm_valley)
    labels = {"sinks": "attention sinks", "norm": "first-token norm", "massive": "massive activations",
              "valley": "compression valley"}
    lines = [f"SmolLM2-135M-Instruct: {lm.n_layers} layers, d {lm.d_model}, {lm.n_heads} heads ({lm.n_kv_heads} KV), "
             f"weights from {lm.gguf['file']} (sha256 {lm.gguf['sha256'][:12]}…, "
             + ", ".join(f"{t}×{n}" for t, n in lm.gguf["type_counts"].items()) + ")"]
    for key, label in labels.items():
        lines.append(f"{label}: SmolLM2 {smol[key]}")
        lines.append(f"{' ' * len(label)}  MiniLM  {mini[key]}")
    text = "\n".join(lines)
    layers = sink_result.to_frame("layers")
    entropy = valley_result.to_frame()[["layer", "entropy_raw_normalized", "entropy_upper_bound_normalized",
                                        "anisotropy", "first_norm_ratio", "in_valley"]]
    figures = [sink_result.figure("heads"), valley_result.figure(), sink_result.figure("massive")]
    return heading, text, figures, {"per layer (sinks)": layers.round(4), "per layer (valley)": entropy.round(4)}
