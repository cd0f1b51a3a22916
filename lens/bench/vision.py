"""Benchmark of tracing a vision-language model: what the image-aware capture costs over the plain forward.

On the demo VLM ``toy-shapes-vlm`` (a LLaVA: 4-layer CLIP tower + SmolLM2-135M, 50 tokens of which 36 are
image tokens), one image + prompt per forward, in one run and interleaved (A, B, C, D, A, B, …; fastest of
``repeats`` each):

* ``plain``: the same Hugging Face model loaded with PyTorch SDPA attention, ``model.model(**inputs)``;
* ``lens, no trace``: the lens-loaded model (lens's attention function, dense kernel, no observer);
* ``trace attention``: ``lens.trace(capture=("attention",))`` — mass received of every head and key in the
  language model and the vision tower, the text→image sums and the text queries' attention rows;
* ``trace all``: the default capture (attention, residual with spectra, MLP neurons, the vision tower's norms
  and the sink dimensions).

Ratios are to ``plain`` measured in the same run (this machine is shared: quote ratios, not seconds).

Run: ``lens bench vision`` or ``python -m lens.bench.vision`` (``--repeats 5``, ``--json out.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from lens.atomic import atomic_write_text

__all__ = ["run_benchmark", "format_table", "main"]


def _fastest(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_benchmark(repeats: int = 5) -> dict:
    """Time the four ways (module docstring) interleaved; returns seconds, ratios to ``plain`` and the machine.

    Raises ``ModelLoadError`` when SmolLM2 is not in lens's cache (``lens models fetch``).
    Example: ``run_benchmark(repeats=3)["ratio"]["trace all"]``.
    """
    import transformers

    import lens
    from lens.models import toyvlm
    from lens.models.toyvlm.build import build_folder

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    vlm = lens.load("toy-shapes-vlm", progress=False)
    plain = transformers.AutoModelForImageTextToText.from_pretrained(build_folder(), attn_implementation="sdpa").eval()
    scene = toyvlm.make_scene(0)
    item = {"image": scene.image, "text": lens.image_prompt(vlm)}
    inputs = vlm.processor(images=scene.image, text=item["text"], return_tensors="pt")

    @torch.inference_mode()
    def run_plain():
        plain.model(**inputs, use_cache=False)

    @torch.inference_mode()
    def run_lens():
        vlm.model.model(**inputs, use_cache=False)

    ways = {
        "plain": run_plain,
        "lens, no trace": run_lens,
        "trace attention": lambda: lens.trace(vlm, [item], capture=("attention",), progress=False),
        "trace all": lambda: lens.trace(vlm, [item], progress=False),
    }
    for fn in ways.values():  # warm-up
        fn()
    seconds = {name: float("inf") for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            seconds[name] = min(seconds[name], _fastest(fn, 1))
    return {
        "model": "toy-shapes-vlm", "tokens": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == vlm.image_token_id).sum()), "repeats": repeats,
        "seconds": seconds, "ratio": {name: s / seconds["plain"] for name, s in seconds.items()},
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
    }


def format_table(result: dict) -> str:
    """The result as a plain-text table (seconds and ratio to the plain forward)."""
    lines = [f"{result['model']}: {result['tokens']} tokens ({result['image_tokens']} image tokens), "
             f"fastest of {result['repeats']}, interleaved",
             f"{'way':<18} {'seconds':>9} {'× plain':>8}"]
    for name, s in result["seconds"].items():
        lines.append(f"{name:<18} {s:>9.4f} {result['ratio'][name]:>8.2f}")
    m = result["machine"]
    lines.append(f"machine: {m['cpus']} cpus, {m['threads']} threads, {m['processor']}, torch {m['torch']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``lens bench vision [--repeats N] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="lens bench vision", description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the result as JSON here")
    args = parser.parse_args(argv)
    result = run_benchmark(repeats=args.repeats)
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
        print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
