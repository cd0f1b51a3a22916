"""Benchmark of ``lens.scan`` (docs/definitions.md, "Corpus scans"; targets in the README).

Three figures, each with its baseline measured in the same run, on real text (Python's standard-library
docstrings, ``lens.scan.corpora``) and the embedded all-MiniLM-L6-v2 unless ``--model`` names a folder:

1. **Throughput**: tokens/s of the whole scan (every neuron of every layer, sinks, entropies, massive
   activations, top-k, samples, checkpoints) ÷ tokens/s of the plain forward over the *same* windows and
   batches; with the breakdown forward → + attention probe → + residual probe without spectra → + the exact
   entropy spectra (``lens.trace``) → + neuron reducers → whole ``lens.scan`` (merges, checkpoints, logit effects,
   files), each stage's cost printed as a fraction of the forward's time; and, for reference, the plain forward over the same windows in corpus order (what a
   loop over the corpus would run; the scan batches each shard's windows longest first). Methods alternate,
   fastest of ``--repeats`` each.
2. **Memory**: peak RSS of a whole scan of 10⁴ tokens and of 10⁵ tokens (each in a fresh process, corpus
   streamed from a file; both start with the same longest documents, so both run the largest batch, which
   sets the peak); the ratio should stay near 1 (memory independent of corpus size).
3. **Ray**: the same scan on a local 2-worker Ray cluster (``ray.init(num_cpus=2)``, 1 thread per actor) ÷
   the local engine with 2 threads — equal cores. Cluster start-up is excluded; actor start-up (loading the
   model) is included.

Run: ``lens bench scan`` (``--quick`` for a smoke test, ``--json out.json``, ``--skip-ray``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["run", "format_table", "main"]

_THREADS = int(os.environ.get("LENS_BENCH_THREADS", "2"))  # torch threads of the local runs (the Ray run: 2 × 1)


def _peak_rss() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _load(model: str | None):
    import lens

    return lens.load(model) if model else lens.load()


def _corpus_file(folder: Path, tokens: int, lm) -> Path:
    """A text file of docstrings (one per line), repeated until it holds about ``tokens`` tokens.

    Every corpus starts with the same 8 longest docstrings, so every size holds the largest batch a scan runs
    (batch_size windows of the longest length): that batch sets the peak memory, and the memory figure compares
    corpora, not which documents happen to be in them."""
    from lens.scan.corpora import python_docstrings

    docs = python_docstrings()
    lengths = [len(ids) for ids in lm.tokenizer(docs, add_special_tokens=True, verbose=False)["input_ids"]]
    longest = sorted(range(len(docs)), key=lambda i: -lengths[i])[:8]
    order = longest + [i for i in range(len(docs)) if i not in set(longest)]
    docs, lengths = [docs[i] for i in order], [lengths[i] for i in order]
    path = folder / f"corpus-{tokens}.txt"
    total = 0
    with open(path, "w", encoding="utf-8") as fh:
        i = 0
        while total < tokens:
            fh.write(docs[i % len(docs)] + "\n")
            total += lengths[i % len(docs)]
            i += 1
    return path


def _throughput(model, tokens: int, repeats: int, batch_size: int) -> dict:
    import numpy as np
    import torch

    import lens
    from lens.models.inputs import pad_batch
    from lens.scan.config import parse_config
    from lens.scan.reducers import merge_state
    from lens.scan.worker import ShardWorker, empty_state

    torch.set_num_threads(_THREADS)
    lm = _load(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = _corpus_file(Path(tmp), tokens, lm)
        docs = [line.rstrip("\n") for line in open(path, encoding="utf-8")]
        options = dict(batch_size=batch_size, max_len=None, stride=None, shard_size=64)
        cfg = parse_config(lm, layers=None, top_k=20, context=(8, 4), samples=3, epsilon=0.3, tau=5.0,
                           massive_abs=100.0, massive_rel=1000.0, prepend_bos=None, **options)
        worker = ShardWorker(lm, cfg)
        # the scan's own batches: each shard's windows longest first, batch_size at a time
        from lens.scan.engine import shards

        batches = [b for _, shard in shards(list(enumerate(docs)), cfg.shard_size) for b in worker.batches(shard)]
        all_windows = [w for b in batches for w in b]
        # what a plain loop over the corpus would run: the same windows in corpus order, batch_size at a time
        in_order = sorted(all_windows, key=lambda w: (w.doc, w.start))
        naive = [in_order[i : i + batch_size] for i in range(0, len(in_order), batch_size)]
        n_tokens = sum(len(w.ids) - w.keep for w in all_windows)
        pad = lm.tokenizer.pad_token_id or 0

        @torch.inference_mode()
        def forward(these=batches):
            for ws in these:
                ids, mask = pad_batch([list(w.ids) for w in ws], pad)
                lm.base(input_ids=ids, attention_mask=mask, **({"use_cache": False} if lm.causal else {}))

        def probes(capture=("attention", "residual"), spectra="exact"):
            for ws in batches:
                lens.trace(lm, [list(w.ids) for w in ws], capture=capture, batch_size=len(ws), progress=False,
                           prepend_bos=None, spectra=spectra)

        def reducers():
            state = empty_state(lm, cfg)
            for ws in batches:
                state = merge_state(state, worker._run_batch(ws, state), top_k=cfg.top_k, samples=cfg.samples,
                                    inplace=True)

        def whole():
            with tempfile.TemporaryDirectory() as out:
                lens.scan(lm, str(path), out=Path(out) / "s", progress=False, **options)

        # each stage adds one part of the scan to the one before it, so the differences say where the time goes
        methods = {"forward": forward, "+ attention probe": lambda: probes(("attention",)),
                   "+ residual probe, no spectra": lambda: probes(spectra="none"),
                   "+ entropy spectra": probes, "+ neuron reducers": reducers,
                   "whole lens.scan": whole, "(forward in corpus order)": lambda: forward(naive)}
        times = {name: [] for name in methods}
        for _ in range(repeats):  # interleaved, so load changes on a shared machine hit every method alike
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    best = {name: min(ts) for name, ts in times.items()}
    return {"tokens": n_tokens, "windows": len(all_windows), "batches": len(batches),
            "seconds": best, "tokens_per_s": {k: n_tokens / v for k, v in best.items()},
            "ratio_to_forward": {k: best["forward"] / v for k, v in best.items()}}


def _memory_worker(model, tokens: int, batch_size: int) -> dict:
    import torch

    import lens

    torch.set_num_threads(_THREADS)
    lm = _load(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = _corpus_file(Path(tmp), tokens, lm)
        before = _peak_rss()
        t0 = time.perf_counter()
        s = lens.scan(lm, str(path), out=Path(tmp) / "scan", batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - t0
        return {"tokens": s.tokens, "peak_bytes": _peak_rss(), "peak_before_scan": before, "seconds": seconds}


def _ray_worker(model, tokens: int, batch_size: int) -> dict:
    import torch

    import lens

    lm = _load(model)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = _corpus_file(Path(tmp), tokens, lm)
        torch.set_num_threads(_THREADS)
        t0 = time.perf_counter()
        local = lens.scan(lm, str(path), out=Path(tmp) / "local", batch_size=batch_size, progress=False)
        out["local_s"] = time.perf_counter() - t0
        import ray

        os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            t0 = time.perf_counter()
            remote = lens.scan(lm, str(path), out=Path(tmp) / "ray", batch_size=batch_size, engine="ray", workers=2,
                               threads=1, progress=False)
            out["ray_s"] = time.perf_counter() - t0
        finally:
            ray.shutdown()
        import numpy as np

        def same(a, b) -> bool:
            return all(np.array_equal(a.arrays[k], b.arrays[k]) for k in a.arrays if a.arrays[k].dtype.kind in "iu")

        out["identical_counts"] = same(local, remote)
        # a forward on 2 threads rounds some activations differently from one on 1 thread (the GEMMs split their
        # sums differently), which can move a value across a histogram edge; at the actors' thread count the
        # two engines must agree exactly
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        local1 = lens.scan(lm, str(path), out=Path(tmp) / "local1", batch_size=batch_size, progress=False)
        out["local_1thread_s"] = time.perf_counter() - t0
        out["identical_counts_at_1_thread"] = same(local1, remote)
        out["tokens"] = local.tokens
    return out


def _subprocess(kind: str, model, tokens: int, batch_size: int, timeout: float = 7200, repeats: int = 1) -> dict:
    cmd = [sys.executable, "-m", "lens.bench.scan", "--worker", kind, "--tokens", str(tokens),
           "--batch-size", str(batch_size), "--repeats", str(repeats)] + (["--model", model] if model else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    if proc.returncode != 0:
        return {"skipped": f"failed: {proc.stderr.strip().splitlines()[-1:] }"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(model: str | None = None, tokens: int = 20000, memory_tokens=(10_000, 100_000), ray_tokens: int = 20000,
        repeats: int = 2, batch_size: int = 8, skip_ray: bool = False, only=None) -> dict:
    """All three figures; each in its own process. Example: ``run(tokens=2000, memory_tokens=(1000, 10000))``."""
    result = {"benchmark": "scan", "model": model or "embedded all-MiniLM-L6-v2",
              "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "torch_threads": _THREADS}}
    only = set(only or ("throughput", "memory", "ray"))
    if "throughput" in only:
        result["throughput"] = _subprocess("throughput", model, tokens, batch_size, repeats=repeats) | {"repeats": repeats}
    result["memory"] = [_subprocess("memory", model, n, batch_size) for n in memory_tokens] if "memory" in only else []
    mem = [m for m in result["memory"] if "skipped" not in m]
    if len(mem) == 2:
        result["memory_ratio"] = mem[1]["peak_bytes"] / mem[0]["peak_bytes"]
    if not skip_ray and "ray" in only:
        result["ray"] = _subprocess("ray", model, ray_tokens, batch_size)
        if "ray_s" in result["ray"]:
            result["ray_overhead"] = result["ray"]["ray_s"] / result["ray"]["local_s"]
    return result


def format_table(result: dict) -> str:
    lines = [f"lens bench scan — {result['model']} — {result['machine']['cpus']} CPUs, load {result['machine']['load_average']}"]
    t = result.get("throughput", {"skipped": "not asked for"})
    if "skipped" in t:
        lines.append(f"throughput: skipped ({t['skipped']})")
    else:
        lines.append(f"1. throughput over {t['tokens']:,} tokens ({t['windows']} windows, {t['batches']} batches):")
        seconds, previous = t["seconds"], None
        for name, tps in t["tokens_per_s"].items():
            adds = ""
            if previous is not None and not name.startswith("("):
                adds = f"   adds {(seconds[name] - seconds[previous]) / seconds['forward']:+.2f}× the forward's time"
            lines.append(f"   {name:<30}{tps:>10,.0f} tokens/s  {t['ratio_to_forward'][name]:>6.2f}× the forward{adds}")
            previous = name
        naive = t["tokens_per_s"].get("(forward in corpus order)")
        if naive:
            lines.append(f"   the ratio is to the forward on the scan's own batches (longest windows first); to a plain "
                         f"forward in corpus order the whole scan is {t['tokens_per_s']['whole lens.scan'] / naive:.2f}×")
    lines.append("2. peak memory (fresh process per scan):")
    for m in result["memory"]:
        if "skipped" in m:
            lines.append(f"   skipped: {m['skipped']}")
        else:
            lines.append(f"   {m['tokens']:>9,} tokens: peak RSS {m['peak_bytes'] / 1e6:,.0f} MB ({m['seconds']:.0f} s)")
    if "memory_ratio" in result:
        lines.append(f"   ratio (larger ÷ smaller corpus): {result['memory_ratio']:.3f}")
    if "ray" in result:
        r = result["ray"]
        if "ray_s" in r:
            lines.append(f"3. Ray, 2 actors × 1 thread vs local 2 threads over {r['tokens']:,} tokens: "
                         f"{r['ray_s']:.1f} s vs {r['local_s']:.1f} s → {result['ray_overhead']:.2f}× "
                         f"(counts identical: {r['identical_counts']}; to local on 1 thread, "
                         f"{r['local_1thread_s']:.1f} s: {r['identical_counts_at_1_thread']})")
        else:
            lines.append(f"3. Ray: skipped ({r.get('skipped')})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lens bench scan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=("throughput", "memory", "ray"), help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, default=20000, help="corpus size of the throughput figure")
    parser.add_argument("--memory-tokens", type=int, nargs=2, default=[10_000, 100_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--ray-tokens", type=int, default=20000)
    parser.add_argument("--only", choices=("throughput", "memory", "ray"), nargs="+", help="run only these figures")
    parser.add_argument("--model", default=None, help="a model folder or hub id (default: the embedded MiniLM)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the local runs (default 2; the Ray run uses 2 actors × 1 thread)")
    parser.add_argument("--quick", action="store_true", help="small corpora, for a smoke test")
    parser.add_argument("--json", type=Path, default=Path("bench-scan.json"))
    args = parser.parse_args(argv)
    if args.threads is not None:  # passed to the worker processes through the environment
        global _THREADS
        _THREADS = args.threads
        os.environ["LENS_BENCH_THREADS"] = str(args.threads)
    if args.worker:
        fn = {"throughput": lambda: _throughput(args.model, args.tokens, args.repeats, args.batch_size),
              "memory": lambda: _memory_worker(args.model, args.tokens, args.batch_size),
              "ray": lambda: _ray_worker(args.model, args.tokens, args.batch_size)}[args.worker]
        print(json.dumps(fn()))
        return 0
    if args.quick:
        result = run(args.model, tokens=2000, memory_tokens=(1000, 10000), ray_tokens=2000, repeats=1,
                     batch_size=args.batch_size, skip_ray=args.skip_ray)
    else:
        result = run(args.model, tokens=args.tokens, memory_tokens=tuple(args.memory_tokens), ray_tokens=args.ray_tokens,
                     repeats=args.repeats, batch_size=args.batch_size, skip_ray=args.skip_ray, only=args.only)
    print(format_table(result))
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
