"""The neuron reducers of one batch in one compiled pass (docs/definitions.md, "Corpus scans").

``lens.scan`` reduces every activation of every scanned layer: moments, min/max, fraction > 0, the fixed-edge
histogram, the best token of every document (for the top-k) and the quantile-sample reservoirs. Written as
torch operations that was ~15 full passes over the [tokens, neurons] matrix per layer (a binary search per
value for the histogram, one-hot ranks and sparse sorts for the reservoirs), 2–4× the forward pass itself.
This module does the same arithmetic in two sweeps of a Numba-compiled loop (values stay in cache, nothing of
size tokens × neurons is allocated except one byte per value for the histogram bin).

Hand-written because no library fuses per-column moments, fixed-edge histograms, per-segment arg-max with a
tie rule and hash-priority reservoirs; Numba (the field's JIT for numpy loops) compiles it, cached on disk.
Every result is exact and deterministic (the same loop order in every engine): counts, histograms, minima,
maxima, arg-maxima and reservoirs equal the brute force bit for bit, and the float64 moments agree with it to
~1e-15 relative.
"""

from __future__ import annotations

import numpy as np

from lens.errors import MissingDependencyError

__all__ = ["reduce_layer"]

_KERNEL = None


def _compile():
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    try:
        import numba
    except ImportError as exc:  # pragma: no cover - numba is in the scan extra
        raise MissingDependencyError(
            f"lens.scan compiles its neuron reducers with Numba ({exc}); install it with pip install 'lens-interp[scan]'"
        ) from exc

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def kernel(a, order, docl, pos, edges, bin_to_group, zero_bin, n_docs, samples,
               mean, m2, mn, mx, positive, hist, docmax, docbest, chosen):  # pragma: no cover - compiled
        n, m_count = a.shape
        n_edges = edges.shape[0]
        bins = np.empty((n, m_count), np.uint8)
        total = np.zeros(m_count, np.float64)
        for i in range(n):
            d = docl[i]
            p = pos[i]
            for m in range(m_count):
                x = a[i, m]
                total[m] += x
                if x < mn[m]:
                    mn[m] = x
                if x > mx[m]:
                    mx[m] = x
                # histogram bin: magnitude = number of edges ≤ |x| (binary search), signed around the zero bin
                ax = abs(x)
                lo, hi = 0, n_edges
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if edges[mid] <= ax:
                        lo = mid + 1
                    else:
                        hi = mid
                if x > 0:
                    b = zero_bin + 1 + lo
                    positive[m] += 1
                elif x < 0:
                    b = zero_bin - 1 - lo
                else:
                    b = zero_bin
                bins[i, m] = b
                hist[m, b] += 1
                # best token of each document: highest value, then lowest position
                best = docbest[d, m]
                if best < 0 or x > docmax[d, m] or (x == docmax[d, m] and p < pos[best]):
                    docmax[d, m] = x
                    docbest[d, m] = i
        for m in range(m_count):
            mean[m] = total[m] / n
        acc = np.zeros(m_count, np.float64)
        for i in range(n):
            for m in range(m_count):
                dx = a[i, m] - mean[m]
                acc[m] += dx * dx
        for m in range(m_count):
            m2[m] = acc[m]
        # reservoirs: visit tokens by priority; each (neuron, group) keeps its first `samples` tokens
        if samples > 0:
            filled = np.zeros((m_count, chosen.shape[1]), np.int64)
            for j in range(n):
                i = order[j]
                for m in range(m_count):
                    g = bin_to_group[bins[i, m]]
                    if g >= 0:
                        f = filled[m, g]
                        if f < samples:
                            chosen[m, g, f] = i
                            filled[m, g] = f + 1
        return 0

    _KERNEL = kernel
    return kernel


def reduce_layer(a: np.ndarray, order: np.ndarray, docl: np.ndarray, pos: np.ndarray, n_docs: int, samples: int,
                 groups: int, edges: np.ndarray, bin_to_group: np.ndarray, zero_bin: int, n_bins: int) -> dict:
    """Every neuron reducer of one layer over the ``N`` counted tokens of a batch.

    ``a``: [N, M] float32 activations (C order). ``order``: [N] int64, the rows by reservoir priority (lowest
    first). ``docl``: [N] int64 document of each row, 0..n_docs−1; ``pos``: [N] int64 its document position.
    ``edges``: float32 |x| histogram edges; ``bin_to_group``: int64 [n_bins] quantile-sample group of a bin
    (−1: none). Returns ``mean``, ``m2`` (float64 [M]), ``min``, ``max`` (float32 [M]), ``positive`` (int64 [M]),
    ``hist`` (int64 [M, n_bins]), ``docmax`` (float32 [n_docs, M]) and ``docbest`` (int64 [n_docs, M], the row of
    each document's best token or −1), ``chosen`` (int64 [M, groups, samples], rows by priority or −1).

    Example: ``reduce_layer(np.ones((2, 3), np.float32), np.arange(2), np.zeros(2, np.int64), np.arange(2), 1, 1,
    RESERVOIR_GROUPS, HIST_EDGES, BIN_TO_GROUP, ZERO_BIN, N_BINS)["hist"]`` counts 2 per neuron in one bin.
    """
    kernel = _compile()
    n, m_count = a.shape
    out = {
        "mean": np.zeros(m_count, np.float64),
        "m2": np.zeros(m_count, np.float64),
        "min": np.full(m_count, np.inf, np.float32),
        "max": np.full(m_count, -np.inf, np.float32),
        "positive": np.zeros(m_count, np.int64),
        "hist": np.zeros((m_count, n_bins), np.int64),
        "docmax": np.full((n_docs, m_count), -np.inf, np.float32),
        "docbest": np.full((n_docs, m_count), -1, np.int64),
        "chosen": np.full((m_count, groups, max(samples, 0)), -1, np.int64),
    }
    kernel(np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(order, dtype=np.int64),
           np.ascontiguousarray(docl, dtype=np.int64), np.ascontiguousarray(pos, dtype=np.int64),
           np.ascontiguousarray(edges, dtype=np.float32), np.ascontiguousarray(bin_to_group, dtype=np.int64),
           int(zero_bin), int(n_docs), int(samples), out["mean"], out["m2"], out["min"], out["max"],
           out["positive"], out["hist"], out["docmax"], out["docbest"], out["chosen"])
    return out
