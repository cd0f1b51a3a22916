"""The ``lens`` command: ``lens demo`` (the main job) and ``lens bench <name>``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

__all__ = ["main"]

# name → (module, what it measures). Every benchmark measures its baseline in the same run.
BENCHMARKS = {
    "capture": ("lens.bench.capture", "streaming capture vs plain forward, HF eager and TransformerLens"),
    "attention": ("lens.bench.attention", "block-sparse attention vs dense causal SDPA"),
    "quant": ("lens.bench.quant", "low-bit weight formats vs fp32 on MiniLM"),
    "widgets": ("lens.bench.widgets", "widget interaction latency in a real browser"),
}


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        print("usage: lens bench {" + ",".join(BENCHMARKS) + "} [options]\n")
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<10} {what}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(BENCHMARKS[name][0])
    if hasattr(module, "main"):
        return int(module.main(rest) or 0)
    parser = argparse.ArgumentParser(prog=f"lens bench {name}")
    parser.add_argument("--json", type=Path, default=Path(f"bench-{name}.json"))
    parser.add_argument("--quick", action="store_true", help="the smallest configuration, for a smoke test")
    args = parser.parse_args(rest)
    kwargs = getattr(module, "QUICK", {}) if args.quick else {}
    result = module.run(**kwargs)
    print(module.format_table(result))
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nJSON written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lens`` console script.

    Example: ``lens demo --out report.html`` or ``lens bench capture --lengths 1024 2048``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lens", description="Attention sinks, massive activations and compression valleys, on the deployed path."
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="the embedded MiniLM, offline: trace, summarize, write an HTML report")
    demo.add_argument("--out", type=Path, default=Path("lens-report.html"), help="where to write the report")
    demo.add_argument("--no-deploy", action="store_true", help="skip the dense-vs-deployed section")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS), add_help=False)
    sub.add_parser("version", help="print versions")
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "demo":
        from lens.report.demo import run_demo

        run_demo(args.out, deploy=not args.no_deploy, progress=not args.quiet)
        return 0
    if args.command == "version":
        import torch
        import transformers

        import lens

        print(f"lens {lens.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
