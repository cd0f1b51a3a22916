"""``lens bench gguf``: the embedded SmolLM2-135M-Instruct Q4_1 GGUF on lens's GGUF paths, baselines in the same run.

* **load** — seconds for ``lens.load`` of the GGUF file dequantized by transformers (the first load: no cache),
  of the dequantized model from lens's cache (every later load), and of ``quant="keep"`` (the file's own blocks
  kept packed); each in a fresh process (imports not counted), the ratio to the cached load;
* **resident weight bytes** — every parameter and buffer the model holds (shared storage counted once): the
  fp32 model against ``quant="keep"``, beside the GGUF file's size;
* **tokens/s** — a plain forward (``model(input_ids)``, LM head included) and ``lens.trace`` (sinks, massive
  activations, both entropies, MLP statistics) at T = 512 and 2048, alternating, fastest of ``repeats``; the
  trace's cost as a ratio to the forward measured in the same run; for the fp32 and the packed model;
* **KL to llama.cpp** — next-token KL(llama.cpp ‖ lens) on llama.cpp's reference distributions
  (tests/data/llamacpp, or ``--reference``), for the dequantized fp32 model and for ``quant="keep",
  activations="llama.cpp"``; with top-1 agreement.

Run: ``lens bench gguf`` (``--lengths 512 2048``, ``--repeats 3``, ``--json out.json``, ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run", "format_table", "main", "kl_to_reference", "resident_weight_bytes", "QUICK"]

QUICK = {"lengths": (128,), "repeats": 1, "load": False}
_DEFAULT_REFERENCE = Path(__file__).resolve().parents[2] / "tests" / "data" / "llamacpp" / "smollm2_q4_1.safetensors"


def resident_weight_bytes(model) -> int:
    """Bytes of every parameter and buffer of ``model``, each storage counted once (tied weights share one)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def kl_to_reference(lm, reference: dict, *, progress: bool = False) -> dict:
    """Next-token KL(llama.cpp ‖ lens) on the reference's prompts, lens's log-probabilities from ``lens.trace``.

    ``reference``: ``lens.models.llamacpp.load_reference(path)``. Returns ``{"kl": float64 [positions],
    "top1_agreement": fraction, "positions": n}``. Raises ``ConfigError`` when the model's GGUF file is not the
    reference's (compared by sha256). Example: ``kl_to_reference(lens.load("smollm2"), ref)["kl"].mean()``.
    """
    import numpy as np
    import torch

    from lens.capture.trace import trace
    from lens.errors import ConfigError
    from lens.models.llamacpp import coarsened_kl

    want = reference["meta"].get("gguf_sha256")
    have = (lm.gguf or {}).get("sha256")
    if want and have and want != have:
        raise ConfigError(f"the reference is for the GGUF file with sha256 {want[:12]}…, the model's is {have[:12]}…")
    prompts = reference["prompts"]
    ids = [[int(t) for t in p["ids"]] for p in prompts]
    run_ = trace(lm, ids, capture=("logits",), batch_size=1, progress=progress)
    kls, agree = [], []
    for s, p in enumerate(prompts):
        lp = run_.arrays["logits.logprobs"][run_.span(s)]
        kls.append(coarsened_kl(p, lp))
        agree.append(lp.argmax(-1) == p["topk_ids"][:, 0])
    kl = np.concatenate(kls)
    return {"kl": kl, "top1_agreement": float(np.concatenate(agree).mean()), "positions": int(kl.size)}


def _load_worker(mode: str) -> dict:
    import torch

    import lens
    from lens.models.embedded import smollm2_gguf_path

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    path = smollm2_gguf_path(fetch=False)
    # imports are not load time: bring in what every mode needs before the clock starts
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import lens.models.gguf  # noqa: F401
    import lens.models.load  # noqa: F401

    start = time.perf_counter()
    if mode == "dequantize":
        lm = lens.load(path, cache=False)
    elif mode == "cached":
        lm = lens.load("smollm2")
    elif mode == "keep":
        lm = lens.load(path, quant="keep")
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - start
    return {"mode": mode, "seconds": seconds, "resident_weight_bytes": resident_weight_bytes(lm.model)}


def _in_subprocess(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "lens.bench.gguf", "--worker", mode], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load worker {mode!r} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tokens(lm, length: int):
    import torch

    from lens.report.demo import DEMO_TEXTS

    ids: list[int] = []
    while len(ids) < length:
        for text in DEMO_TEXTS:
            ids.extend(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids[:length]])


def _speed(lm, lengths, repeats: int) -> list[dict]:
    import torch

    import lens

    rows = []
    for length in lengths:
        ids = _tokens(lm, length)
        with torch.inference_mode():
            lm.model(ids)  # warm-up
        best_forward = best_trace = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.inference_mode():
                lm.model(ids)
            best_forward = min(best_forward, time.perf_counter() - start)
            start = time.perf_counter()
            lens.trace(lm, ids, progress=False)
            best_trace = min(best_trace, time.perf_counter() - start)
        rows.append({"length": length, "forward_s": best_forward, "trace_s": best_trace,
                     "forward_tokens_per_s": length / best_forward, "trace_tokens_per_s": length / best_trace,
                     "trace_over_forward": best_trace / best_forward})
    return rows


def run(lengths=(512, 2048), repeats: int = 3, progress: bool = True, load: bool = True,
        reference: str | os.PathLike | None = None) -> dict:
    """Measure everything in the module docstring; returns a JSON-able dict (``format_table`` prints it)."""
    import torch

    import lens
    from lens.models.embedded import smollm2_gguf_path
    from lens.models.llamacpp import load_reference

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    path = smollm2_gguf_path(fetch=False)
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
        "gguf_file": {"name": path.name, "bytes": path.stat().st_size},
    }
    if load:
        loads = []
        for mode in ("dequantize", "cached", "keep"):
            if progress:
                print(f"lens bench gguf: load ({mode}) in a fresh process …", file=sys.stderr, flush=True)
            loads.append(_in_subprocess(mode))
        cached = next(r["seconds"] for r in loads if r["mode"] == "cached")
        for r in loads:
            r["over_cached"] = r["seconds"] / cached
        result["load"] = loads
    models = {"fp32 (dequantized)": lens.load("smollm2"), "keep (packed Q4_1/Q8_0)": lens.load(path, quant="keep")}
    result["resident"] = {name: resident_weight_bytes(lm.model) for name, lm in models.items()}
    result["speed"] = {}
    for name, lm in models.items():
        if progress:
            print(f"lens bench gguf: tokens/s, {name} …", file=sys.stderr, flush=True)
        result["speed"][name] = _speed(lm, lengths, repeats)
    ref_path = Path(reference) if reference else _DEFAULT_REFERENCE
    if ref_path.is_file():
        ref = load_reference(ref_path)
        emulated = lens.load(path, quant="keep", activations="llama.cpp")
        result["kl"] = {"reference": str(ref_path), "llama_cpp_python": ref["meta"].get("llama_cpp_python")}
        for name, lm in (("fp32 (dequantized)", models["fp32 (dequantized)"]),
                         ("keep + llama.cpp activations, f16 KV", emulated)):
            kl = kl_to_reference(lm, ref)
            result["kl"][name] = {"mean": float(kl["kl"].mean()), "max": float(kl["kl"].max()),
                                  "top1_agreement": kl["top1_agreement"], "positions": kl["positions"]}
    else:
        result["kl"] = {"skipped": f"no llama.cpp reference at {ref_path} (run from a checkout, or pass --reference)"}
    return result


def format_table(result: dict) -> str:
    """The measurements as aligned text tables, ratios beside their baselines."""
    m = result["machine"]
    lines = [f"lens bench gguf — {result['gguf_file']['name']} ({result['gguf_file']['bytes'] / 1e6:.1f} MB); "
             f"{m['cpus']} CPUs, {m['threads']} threads, torch {m['torch']}"]
    if "load" in result:
        lines += ["", "load (fresh process)            seconds   × cached   resident weights"]
        for r in result["load"]:
            lines.append(f"  {r['mode']:<28} {r['seconds']:>8.2f}   {r['over_cached']:>7.1f}×   "
                         f"{r['resident_weight_bytes'] / 1e6:>8.1f} MB")
    file_bytes = result["gguf_file"]["bytes"]
    lines += ["", "resident weight bytes           MB        × file"]
    for name, b in result["resident"].items():
        lines.append(f"  {name:<28} {b / 1e6:>8.1f}   {b / file_bytes:>6.2f}×")
    lines += ["", "tokens/s                        T      forward tok/s   lens.trace tok/s   trace ÷ forward"]
    for name, rows in result["speed"].items():
        for r in rows:
            lines.append(f"  {name:<28} {r['length']:>5}   {r['forward_tokens_per_s']:>12.0f}   "
                         f"{r['trace_tokens_per_s']:>15.0f}   {r['trace_over_forward']:>12.2f}×")
    kl = result.get("kl", {})
    if "skipped" in kl:
        lines += ["", f"KL to llama.cpp: skipped — {kl['skipped']}"]
    elif kl:
        lines += ["", f"KL(llama.cpp ‖ lens), next token, llama-cpp-python {kl.get('llama_cpp_python')}:"
                      "   mean       max       top-1"]
        for name, v in kl.items():
            if isinstance(v, dict):
                lines.append(f"  {name:<40} {v['mean']:.2e}  {v['max']:.2e}  {v['top1_agreement']:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lens bench gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-load", action="store_true", help="skip the load-time measurements")
    parser.add_argument("--reference", type=Path, default=None, help="llama.cpp's reference .safetensors")
    parser.add_argument("--json", type=Path, default=Path("bench-gguf.json"))
    parser.add_argument("--quick", action="store_true", help="the smallest configuration, for a smoke test")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_load_worker(args.worker)))
        return 0
    kwargs = dict(QUICK) if args.quick else {"lengths": tuple(args.lengths), "repeats": args.repeats,
                                              "load": not args.no_load}
    result = run(reference=args.reference, **kwargs)
    print(format_table(result))
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
