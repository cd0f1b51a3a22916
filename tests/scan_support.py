"""Shared helpers of the scan tests: a brute-force reference computed straight from the Hugging Face model."""

from __future__ import annotations

import numpy as np
import torch

import lens

from lens.scan.corpus import windows
from lens.scan.reducers import EMPTY_DOC, HIST_EDGES, N_BINS, ZERO_BIN, token_priority

# Documents repeat on purpose: identical documents give bit-identical activations (each window runs alone,
# batch_size=1), so the top-k tie rule (value desc, document asc, position asc) is exercised for real.
SCAN_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Attention sinks appear on the first token of many transformer layers.",
    "The quick brown fox jumps over the lazy dog.",
    "Massive activations are rare but very large values in the residual stream.",
    "A compression valley is a range of layers where the representation entropy dips.",
    "Attention sinks appear on the first token of many transformer layers.",
    "Numbers like 3.14159 and 2026 and punctuation: commas, semicolons; dashes - and (parentheses).",
    "Sparse attention skips blocks whose scores are small, keeping the sink and a local window.",
    "Low-bit weights store four bits per value with a shared scale for each small block.",
    "The quick brown fox jumps over the lazy dog.",
    "Researchers open notebooks, load a model, and look at what it does inside. " * 3,
]


@torch.no_grad()
def brute_force(lm, cfg, corpus: list[str]) -> dict[str, np.ndarray]:
    """Every counted activation of every scanned layer, from plain HF forwards of each window alone."""
    from lens.scan.worker import ShardWorker

    worker = ShardWorker(lm, cfg)
    acts = {layer: [] for layer in cfg.layers}
    docs, poss, ctx_ids = [], [], []
    captured = {}
    hooks = [lm.mlp_out_modules[layer].register_forward_pre_hook(
        lambda m, a, layer=layer: captured.__setitem__(layer, a[0][0].float().clone())) for layer in cfg.layers]
    try:
        for doc, ids in enumerate(worker.tokenize(corpus)):
            first_special = ids[0] in worker.specials
            for w in windows(doc, ids, cfg.max_len, cfg.stride, repeat_first=first_special):
                # the same forward pass as the scan (the attention kernel with statistics), one window alone;
                # only the reduction differs: here every activation is kept
                lens.trace(lm, [list(w.ids)], capture=("attention", "residual"), progress=False, prepend_bos=None)
                for layer in cfg.layers:
                    acts[layer].append(captured[layer][w.keep :].numpy())
                for t in range(w.keep, len(w.ids)):
                    docs.append(doc)
                    poss.append(w.position(t))
                    # the document's tokens around the position, wherever the windows were cut
                    lo, hi = w.position(t) - cfg.context[0], w.position(t) + cfg.context[1]
                    ctx_ids.append([ids[q] if 0 <= q < len(ids) else -1 for q in range(lo, hi + 1)])
    finally:
        for h in hooks:
            h.remove()
    return {"acts": np.stack([np.concatenate(acts[l]) for l in cfg.layers]), "doc": np.array(docs),
            "pos": np.array(poss), "ctx": np.array(ctx_ids)}


def reference_state(bf: dict, cfg) -> dict[str, object]:
    """Moments, histograms, top-k sets (python sort with the tie rule) and reservoirs from all activations."""
    a = bf["acts"].astype(np.float64)  # [L, N, M]
    L, N, M = a.shape
    mag = np.searchsorted(HIST_EDGES, np.abs(a), side="right")
    bins = np.where(a > 0, ZERO_BIN + 1 + mag, np.where(a < 0, ZERO_BIN - 1 - mag, ZERO_BIN))
    hist = np.zeros((L, M, N_BINS), np.int64)
    for l in range(L):
        for m in range(M):
            hist[l, m] = np.bincount(bins[l, :, m], minlength=N_BINS)
    f32 = bf["acts"]
    topk = {}
    for l in range(L):
        for m in range(M):
            best = {}
            for i in range(N):
                d, p, v = int(bf["doc"][i]), int(bf["pos"][i]), float(f32[l, i, m])
                if d not in best or (-v, p) < (-best[d][0], best[d][1]):
                    best[d] = (v, p)
            ranked = sorted(((v, d, p) for d, (v, p) in best.items()), key=lambda x: (-x[0], x[1], x[2]))
            topk[(l, m)] = ranked[: cfg.top_k]
    prio = token_priority(bf["doc"], bf["pos"])
    return {"count": N, "mean": a.mean(1), "var": a.var(1), "min": f32.min(1), "max": f32.max(1),
            "positive": (a > 0).sum(1), "hist": hist, "topk": topk, "priority": prio, "bins": bins}


def topk_from_state(state, l, m):
    live = state["topk.doc"][l, m] != EMPTY_DOC
    return [(float(v), int(d), int(p)) for v, d, p in zip(state["topk.value"][l, m][live], state["topk.doc"][l, m][live],
                                                          state["topk.pos"][l, m][live])]
