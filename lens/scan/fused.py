"""The compiled loops of ``lens.scan``: neuron reducers, contexts and merges (docs/definitions.md, "Corpus scans").

``lens.scan`` reduces every activation of every scanned layer: moments, min/max, fraction > 0, the fixed-edge
histogram, the best token of every document (for the top-k) and the quantile-sample reservoirs. Written as
torch operations that was ~15 full passes over the [tokens, neurons] matrix per layer (a binary search per
value for the histogram, one-hot ranks and sparse sorts for the reservoirs) — more than the forward pass
itself — and every merge sorted [neurons, 2k] three times. Here: ``reduce_layer`` does the reducers in two
sweeps of a compiled loop (nothing of size tokens × neurons is allocated except one byte per value for the
histogram bin); ``fill_topk`` writes the top-k entries with their contexts, ``merge_samples`` merges the reservoir candidates
straight into the state; ``topk_select`` /
``reservoir_select`` merge two sorted states by two pointers and ``gather_pair`` moves their payloads.

Hand-written because no library fuses per-column moments, fixed-edge histograms, per-segment arg-max with a
tie rule and hash-priority reservoirs; Numba (the field's JIT for numpy loops) compiles it, cached on disk.
Every result is exact and deterministic (the same loop order in every engine): counts, histograms, minima,
maxima, arg-maxima and reservoirs equal the brute force bit for bit, and the float64 moments agree with it to
~1e-15 relative.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from lens.capture.background import parallel_threads, run_parallel
from lens.errors import MissingDependencyError

__all__ = ["reduce_layer", "fill_topk", "merge_samples", "topk_select", "reservoir_select",
           "gather_pair"]

def _numba():
    try:
        import numba
    except ImportError as exc:  # pragma: no cover - numba is in the scan extra
        raise MissingDependencyError(
            f"lens.scan compiles its neuron reducers with Numba ({exc}); install it with pip install 'lens-interp[scan]'"
        ) from exc
    return numba


@functools.cache  # compiled once per process (and cached on disk by Numba)
def _compile():
    numba = _numba()

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def kernel(a, bits, order, docl, pos, cell_low, cell_edge, bin_to_group, zero_bin, n_docs, samples,
               mean, m2, mn, mx, positive, hist, docmax, docbest, chosen):  # pragma: no cover - compiled
        n, m_count = a.shape
        bins = np.empty((n, m_count), np.uint8)
        total = np.zeros(m_count, np.float64)
        low = cell_low.astype(np.int32)
        edge = cell_edge.astype(np.uint32)  # 2³¹ (no edge in the cell) still fits, above every |x| pattern
        zb = np.int32(zero_bin)
        for i in range(n):
            ai = a[i]
            bi = bits[i]
            row = bins[i]
            for m in range(m_count):  # moments and extremes: a sweep LLVM vectorizes
                x = ai[m]
                total[m] += x
                if x < mn[m]:
                    mn[m] = x
                if x > mx[m]:
                    mx[m] = x
            for m in range(m_count):
                # histogram bin, branch-free so that it vectorizes too (3× faster than with branches): magnitude =
                # number of edges ≤ |x|, read from the top 16 bits of |x| (a table of 32768 cells, each holding at
                # most one edge, see _cells), signed around the zero bin (NaN and ±0 land in it)
                x = ai[m]
                u = bi[m] & np.uint32(0x7FFFFFFF)
                c = u >> np.uint32(16)
                lo = low[c] + np.int32(u >= edge[c])
                sign = np.int32(x > 0) - np.int32(x < 0)
                positive[m] += x > 0
                row[m] = np.uint8(zb + sign * (np.int32(1) + lo))
            for m in range(m_count):
                hist[m, row[m]] += 1
            d = docl[i]
            p = pos[i]
            for m in range(m_count):  # best token of each document: highest value, then lowest position
                x = ai[m]
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

    return kernel


_CELLS = None


def _cells(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each value of the top 16 bits of a non-negative float32 (sign bit clear: 32768 cells): how many edges
    lie at or below the cell's smallest value, and the bit pattern of the one edge strictly inside the cell (2³¹:
    none). Consecutive edges differ by 10^¼, far more than a cell's relative width 2⁻⁷, so a cell holds at most
    one: ``count(edges ≤ |x|) = low[c] + (bits(|x|) ≥ edge[c])`` exactly, for every float32 including ±inf."""
    global _CELLS
    key = edges.tobytes()
    if _CELLS is not None and _CELLS[0] == key:
        return _CELLS[1], _CELLS[2]
    e_bits = np.asarray(edges, dtype=np.float32).view(np.uint32).astype(np.int64)
    assert np.all(np.diff(e_bits) > 1 << 16), "histogram edges closer than a lookup cell"
    starts = np.arange(1 << 15, dtype=np.int64) << 16
    low = np.searchsorted(e_bits, starts, side="right").astype(np.int64)  # edges ≤ the cell's first value
    inside = np.searchsorted(e_bits, starts + (1 << 16), side="left")  # edges below the next cell
    edge = np.full(1 << 15, 1 << 31, dtype=np.int64)
    has = inside > low
    edge[has] = e_bits[low[has]]
    _CELLS = (key, low, edge)
    return low, edge


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
    a = np.ascontiguousarray(a, dtype=np.float32)
    low, edge = _cells(np.asarray(edges, dtype=np.float32))
    args = (a, a.view(np.uint32), np.ascontiguousarray(order, dtype=np.int64),
            np.ascontiguousarray(docl, dtype=np.int64), np.ascontiguousarray(pos, dtype=np.int64),
            low, edge, np.ascontiguousarray(bin_to_group, dtype=np.int64),
            int(zero_bin), int(n_docs), int(samples), out["mean"], out["m2"], out["min"], out["max"],
            out["positive"], out["hist"], out["docmax"], out["docbest"], out["chosen"])
    # as many neuron ranges as torch has threads, run at once (the kernel releases the GIL). Each range gets its
    # own contiguous copy of its columns: the same loop on a column range of the full array ran 1.7× slower on
    # one thread (LLVM no longer vectorized it). Every neuron goes through the same loop either way, so the
    # results are bit-identical
    threads = min(parallel_threads(), m_count // 64)
    if threads <= 1:
        kernel(*args)
        return out
    cuts = [m_count * t // threads // 16 * 16 for t in range(threads)] + [m_count]
    run_parallel(_reduce_range, list(itertools.pairwise(cuts)), kernel, args, out)
    return out


def _reduce_range(cut: tuple[int, int], kernel, args: tuple, out: dict) -> None:
    """``kernel`` on the neurons ``cut[0]..cut[1]−1`` alone, written into ``out``."""
    lo, hi = cut
    a = np.ascontiguousarray(args[0][:, lo:hi])
    bits = a.view(np.uint32)
    part = {name: np.ascontiguousarray(v[..., lo:hi] if name in ("docmax", "docbest") else v[lo:hi])
            for name, v in out.items()}
    kernel(a, bits, *args[2:11], part["mean"], part["m2"], part["min"], part["max"], part["positive"],
           part["hist"], part["docmax"], part["docbest"], part["chosen"])
    for name, v in part.items():
        if name in ("docmax", "docbest"):
            out[name][:, lo:hi] = v
        else:
            out[name][lo:hi] = v


@functools.cache
def _compile_merge():
    numba = _numba()

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def topk_select(value, doc, pos, ka, k, per_doc, empty_doc, sel, dead):  # pragma: no cover - compiled
        rows, width = value.shape
        buf_pos = np.empty(width, np.int64)
        buf_idx = np.empty(width, np.int64)
        for r in range(rows):
            i, j, n = 0, ka, 0
            while n < k and (i < ka or j < width):
                if j >= width:
                    c = i
                elif i >= ka:
                    c = j
                else:
                    va, vb = value[r, i], value[r, j]
                    if va > vb or (va == vb and (doc[r, i] < doc[r, j] or (doc[r, i] == doc[r, j] and pos[r, i] <= pos[r, j]))):
                        c = i
                    else:
                        c = j
                if c == i:
                    i += 1
                else:
                    j += 1
                if doc[r, c] == empty_doc and value[r, c] == -np.inf:
                    break  # both sides sorted: only empty slots remain
                if per_doc:
                    seen = False
                    for q in range(n):
                        if doc[r, sel[r, q]] == doc[r, c]:
                            seen = True
                            break
                    if seen:
                        continue
                sel[r, n] = c
                dead[r, n] = False
                n += 1
            if n < k:
                # the rest, as a stable sort by (value, doc, position) orders them: empty slots and the
                # later entry of a document both sides hold (marked empty), by position, then by index
                m = 0
                for c in range(width):
                    taken = False
                    for q in range(n):
                        if sel[r, q] == c:
                            taken = True
                            break
                    if not taken:
                        p = pos[r, c]
                        t = m
                        while t > 0 and buf_pos[t - 1] > p:
                            buf_pos[t] = buf_pos[t - 1]
                            buf_idx[t] = buf_idx[t - 1]
                            t -= 1
                        buf_pos[t] = p
                        buf_idx[t] = c
                        m += 1
                for q in range(k - n):
                    sel[r, n + q] = buf_idx[q]
                    dead[r, n + q] = True
        return 0

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def reservoir_select(priority, ka, r_keep, sel):  # pragma: no cover - compiled
        rows, width = priority.shape
        for r in range(rows):
            i, j = 0, ka
            for n in range(r_keep):
                if j >= width or (i < ka and priority[r, i] <= priority[r, j]):
                    sel[r, n] = i
                    i += 1
                else:
                    sel[r, n] = j
                    j += 1
        return 0

    return topk_select, reservoir_select


def topk_select(value: np.ndarray, doc: np.ndarray, pos: np.ndarray, ka: int, k: int, per_doc: bool,
                empty_doc: int) -> tuple[np.ndarray, np.ndarray]:
    """Which ``k`` of two sorted top-k lists, concatenated along the last axis (the first ``ka`` from one side),
    the merge keeps: exactly the first ``k`` of a stable sort by (value desc, document asc, position asc) after a
    document held by both sides lost its later entry. Returns (indices [R, k] int64, whether each kept entry is
    such a lost duplicate or an empty slot that must read as empty [R, k] bool); inputs are [R, width].

    Example: ``topk_select(np.array([[3., 1., 2.]], np.float32), np.array([[0, 1, 0]]), np.zeros((1, 3), np.int64),
    2, 2, True, EMPTY_DOC)`` keeps indices [0, 1]: document 0's second entry (2.0) is a duplicate.
    """
    select, _ = _compile_merge()
    rows = value.shape[0]
    sel = np.zeros((rows, k), np.int64)
    dead = np.zeros((rows, k), np.bool_)
    select(np.ascontiguousarray(value, dtype=np.float32), np.ascontiguousarray(doc, dtype=np.int64),
           np.ascontiguousarray(pos, dtype=np.int64), int(ka), int(k), bool(per_doc), int(empty_doc), sel, dead)
    return sel, dead


def reservoir_select(priority: np.ndarray, ka: int, r: int) -> np.ndarray:
    """The ``r`` lowest of two ascending priority lists concatenated along the last axis (the first ``ka`` from
    one side; ties keep that side first, as a stable sort does): indices [R, r] int64 into the concatenation."""
    _, select = _compile_merge()
    sel = np.zeros((priority.shape[0], r), np.int64)
    select(np.ascontiguousarray(priority, dtype=np.int64), int(ka), int(r), sel)
    return sel


@functools.cache
def _compile_fill():
    numba = _numba()

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def context(d, p, doc_tokens, doc_offset, before, width, out):  # pragma: no cover - compiled
        # the document's tokens around position p (−1 beyond its ends), wherever its windows were cut
        off, n = doc_offset[d], doc_offset[d + 1] - doc_offset[d]
        for c in range(width):
            q = p - before + c
            out[c] = doc_tokens[off + q] if 0 <= q < n else -1

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def topk(docmax, docbest, doc_ids, empty_doc, pos, rows, act, T, prefix, lengths, doc_tokens, doc_offset, before,
             width, out_value, out_doc, out_pos, out_row, out_tokens, out_acts):  # pragma: no cover - compiled
        D, M = docmax.shape
        w = out_value.shape[1]
        order = np.empty(D, np.int64)
        for m in range(M):
            # documents by (value desc, document asc), absent ones last in document order (a stable insertion sort)
            for d in range(D):
                t = d
                present = docbest[d, m] >= 0
                while t > 0:
                    e = order[t - 1]
                    if not present or (docbest[e, m] >= 0 and docmax[e, m] >= docmax[d, m]):
                        break
                    order[t] = e
                    t -= 1
                order[t] = d
            for s in range(w):
                d = order[s]
                i = docbest[d, m]
                if i >= 0:
                    out_value[m, s] = docmax[d, m]
                    out_doc[m, s] = doc_ids[d]
                    out_pos[m, s] = pos[i]
                    row = rows[i]
                    p = pos[i]
                else:  # fewer documents than slots: an empty entry (its context is read, never shown)
                    out_value[m, s] = -np.inf
                    out_doc[m, s] = empty_doc
                    out_pos[m, s] = 0
                    row = rows[0]
                    p = pos[0]
                out_row[m, s] = row
                context(d, p, doc_tokens, doc_offset, before, width, out_tokens[m, s])
                # activations only where this window computed them: its document tokens (not the repeated
                # prefix); context tokens held only by other windows get NaN
                b, t = row // T, row % T
                for c in range(width):
                    col = t - before + c
                    out_acts[m, s, c] = act[b * T + col, m] if prefix[b] <= col < lengths[b] else np.nan

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def merge_samples(chosen, a, priority, doc, pos, docl, doc_tokens, doc_offset, before, width,
                      st_priority, st_value, st_doc, st_pos, st_tokens):  # pragma: no cover - compiled
        M, G, R = chosen.shape
        r = st_priority.shape[2]
        src = np.empty(r, np.int64)  # ≥ 0: a slot of the state; < 0: −1 − the batch candidate
        keep_priority = np.empty(r, np.int64)
        keep_value = np.empty(r, np.float32)
        keep_doc = np.empty(r, np.int64)
        keep_pos = np.empty(r, np.int64)
        keep_tokens = np.empty((r, width), np.int32)
        for m in range(M):
            for g in range(G):
                i, j, changed = 0, 0, False
                for n in range(r):
                    from_state = True
                    if j < R and chosen[m, g, j] >= 0:  # ties keep the state's entry first, as a stable merge does
                        if i >= r or st_priority[m, g, i] > priority[chosen[m, g, j]]:
                            from_state = False
                    if from_state:
                        src[n] = i
                        changed = changed or i != n
                        i += 1
                    else:
                        src[n] = -1 - j
                        changed = True
                        j += 1
                if not changed:
                    continue
                for n in range(r):
                    s = src[n]
                    if s >= 0:
                        keep_priority[n] = st_priority[m, g, s]
                        keep_value[n] = st_value[m, g, s]
                        keep_doc[n] = st_doc[m, g, s]
                        keep_pos[n] = st_pos[m, g, s]
                        for c in range(width):
                            keep_tokens[n, c] = st_tokens[m, g, s, c]
                for n in range(r):
                    s = src[n]
                    if s >= 0:
                        st_priority[m, g, n] = keep_priority[n]
                        st_value[m, g, n] = keep_value[n]
                        st_doc[m, g, n] = keep_doc[n]
                        st_pos[m, g, n] = keep_pos[n]
                        for c in range(width):
                            st_tokens[m, g, n, c] = keep_tokens[n, c]
                    else:
                        t = chosen[m, g, -1 - s]
                        st_priority[m, g, n] = priority[t]
                        st_value[m, g, n] = a[t, m]
                        st_doc[m, g, n] = doc[t]
                        st_pos[m, g, n] = pos[t]
                        context(docl[t], pos[t], doc_tokens, doc_offset, before, width, st_tokens[m, g, n])

    return topk, merge_samples


def merge_samples(chosen, a, priority, doc, pos, docl, doc_tokens, doc_offset, before: int, width: int,
                  state: dict) -> None:
    """Merge one layer's batch reservoir candidates straight into the state's reservoirs, in place.

    ``chosen`` [M, G, r_b] counted-token indices by priority (−1: none), as ``reduce_layer`` returns them;
    ``docl`` [N] each counted token's document index into ``doc_offset`` [D + 1], the offsets of the batch's
    documents' whole token ids in ``doc_tokens`` (int64; contexts are cut from the document, not the window);
    ``state`` holds that layer's ``priority``, ``value``, ``doc``, ``pos`` [M, G, r] and ``tokens`` [M, G, r, C]
    slices. The result equals ``merge_state`` of the state with the batch's partial reservoirs (the ``r``
    lowest priorities, ties to the state) — without building those partials, whose contexts mostly lose.
    """
    _, merge = _compile_fill()
    merge(chosen, a, priority, doc, pos, docl, doc_tokens, doc_offset, int(before), int(width),
          state["priority"], state["value"], state["doc"], state["pos"], state["tokens"])


def fill_topk(docmax, docbest, doc_ids, empty_doc: int, pos, rows, act, T: int, prefix, lengths, doc_tokens, doc_offset,
              before: int, width: int, out: dict) -> np.ndarray:
    """The batch's top-k entries of one layer, sorted by (value desc, document asc), with their contexts.

    ``docmax``/``docbest`` [D, M]: each document's best value and its counted-token index (−1: the document has
    no token here); ``doc_ids`` [D] int64: the ascending document ids those rows stand for; ``pos``, ``rows``
    (flat b·T + t) per counted token; ``act`` [B·T, M] float32; ``prefix``, ``lengths`` [B] int64: each window's
    repeated leading tokens and its length; ``doc_tokens``/``doc_offset`` [D + 1]: the D documents' whole token
    ids (int64), concatenated. Writes the first w = ``out["value"].shape[1]`` documents into ``out``'s ``value``,
    ``doc``, ``pos`` [M, w] and ``tokens``, ``acts`` [M, w, C]: the tokens are the document's around the
    position (−1 beyond its ends, wherever its windows were cut), the activations those this window computed
    (NaN for context held only by other windows). Returns the flat rows [M, w] of the entries (for their
    attention flags).
    """
    topk, _ = _compile_fill()
    flat_rows = np.empty(out["value"].shape, np.int64)
    topk(docmax, docbest, np.ascontiguousarray(doc_ids, dtype=np.int64), int(empty_doc), pos, rows, act, int(T),
         np.ascontiguousarray(prefix, dtype=np.int64), np.ascontiguousarray(lengths, dtype=np.int64),
         np.ascontiguousarray(doc_tokens, dtype=np.int64), np.ascontiguousarray(doc_offset, dtype=np.int64),
         int(before), int(width), out["value"], out["doc"], out["pos"], flat_rows, out["tokens"], out["acts"])
    return flat_rows


@functools.cache
def _compile_gather():
    numba = _numba()

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def gather(a, b, sel, out, inplace):  # pragma: no cover - compiled
        R, k = sel.shape
        ka, X = a.shape[1], a.shape[2]
        row = np.empty((ka, X), a.dtype)
        for r in range(R):
            src = a[r]
            first = 0
            if inplace:  # out is a: the slots before the first one the merge changes stay as they are
                while first < k and sel[r, first] == first:
                    first += 1
                if first == k:
                    continue
                for s in range(first, ka):  # later slots only ever read slots at or after `first`
                    for x in range(X):
                        row[s, x] = a[r, s, x]
                src = row
            for q in range(first, k):
                s = sel[r, q]
                if s < ka:
                    for x in range(X):
                        out[r, q, x] = src[s, x]
                else:
                    for x in range(X):
                        out[r, q, x] = b[r, s - ka, x]
        return 0

    return gather


def gather_pair(a: np.ndarray, b: np.ndarray, sel: np.ndarray, inplace: bool = False) -> np.ndarray:
    """``concatenate([a, b], axis=1)`` taken along axis 1 at ``sel`` [R, k], without the concatenation.

    ``a`` [R, ka, ...], ``b`` [R, kb, ...] of one dtype; returns [R, k, ...]. A compiled row copy: the merges
    move every payload (context tokens and activations) this way. ``inplace`` (needs ``k == ka`` and a
    writable C-contiguous ``a``) writes into ``a`` and skips the rows the selection leaves unchanged.
    """
    gather = _compile_gather()
    R, k = sel.shape
    tail = a.shape[2:]
    x = int(np.prod(tail)) if tail else 1
    inplace = inplace and k == a.shape[1] and a.flags.c_contiguous and a.flags.writeable
    out = a if inplace else np.empty((R, k) + tail, dtype=a.dtype)
    gather(a.reshape(R, a.shape[1], x) if inplace else np.ascontiguousarray(a).reshape(R, a.shape[1], x),
           np.ascontiguousarray(b, dtype=a.dtype).reshape(R, b.shape[1], x), np.ascontiguousarray(sel, dtype=np.int64),
           out.reshape(R, k, x), inplace)
    return out
