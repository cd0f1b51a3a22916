"""Mergeable, streaming reducers of ``lens.scan`` (docs/definitions.md, "Corpus scans").

Every reducer is a dict of numpy arrays (its *state*) with a ``merge(a, b)`` that is exact for counts,
histograms, minima, maxima, top-k sets and reservoirs (any partition of the corpus, merged in any order, gives
the same result) and exact up to floating-point rounding for the moments (Chan, Golub & LeVeque 1979,
pairwise update of (count, mean, M2)). States are plain arrays so that a checkpoint is one safetensors file
and a Ray worker's partial result crosses processes without pickle-specific types.

Hand-written because no library offers *mergeable* per-column top-k-with-payload or hash-priority
reservoirs over 10⁴–10⁵ columns at once (datasketches has scalar quantile sketches; numpy/torch have no
exact lexicographic top-k merge).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "HIST_EDGES", "N_BINS", "ZERO_BIN", "bin_edges", "hist_bins", "RESERVOIR_GROUPS", "reservoir_group",
    "moments_merge", "token_priority", "topk_order", "EMPTY_DOC", "merge_state",
]

# -- histogram edges: fixed and model-independent, so that histograms of any shards add exactly -------------
#: |x| edges: 10⁻⁴ … 10⁴, four bins per decade (33 edges, 32 magnitude bins), as float32 — the dtype the
#: activations are binned in, so that an activation equal to an edge lands in the same bin everywhere
HIST_EDGES = (10.0 ** np.linspace(-4, 4, 33)).astype(np.float32)
_N_MAG = len(HIST_EDGES) + 1  # magnitude bins 0..33: 0 = below 1e-4, 33 = at least 1e4
ZERO_BIN = _N_MAG  # bins 0..33 negative (most negative first), 34 = exactly zero, 35..68 positive
N_BINS = 2 * _N_MAG + 1


def bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) value bounds of each of the ``N_BINS`` histogram bins, ascending; the zero bin is [0, 0].

    Negative bins hold ``lower < x ≤ upper``, positive bins ``lower ≤ x < upper``; the outermost bins
    extend to ±∞ and the innermost non-zero bins reach 0 (exclusive).
    """
    edges = HIST_EDGES.astype(np.float64)
    mag_lo = np.concatenate([[0.0], edges])
    mag_hi = np.concatenate([edges, [np.inf]])
    lower = np.concatenate([-mag_hi[::-1], [0.0], mag_lo])
    upper = np.concatenate([-mag_lo[::-1], [0.0], mag_hi])
    return lower, upper


def hist_bins(values, edges_t=None):
    """Histogram bin of every value (torch tensor in, int64 tensor out, same shape)."""
    import torch

    edges = edges_t if edges_t is not None else torch.as_tensor(HIST_EDGES, dtype=values.dtype)
    mag = torch.bucketize(values.abs(), edges, right=True)  # 0..33
    return torch.where(values > 0, ZERO_BIN + 1 + mag, torch.where(values < 0, ZERO_BIN - 1 - mag, ZERO_BIN))


#: quantile-sample groups: sign × |x| decade (<10⁻², 10⁻²–10⁻¹, …, ≥10²); exact zeros get no samples
_GROUP_EDGES = np.array([1e-2, 1e-1, 1.0, 10.0, 100.0])
RESERVOIR_GROUPS = 2 * (len(_GROUP_EDGES) + 1)


def _bin_to_group() -> np.ndarray:
    lower, upper = bin_edges()
    centre = np.where(np.isfinite(lower) & np.isfinite(upper), (lower + upper) / 2, np.where(np.isfinite(lower), lower, upper))
    mag = np.searchsorted(_GROUP_EDGES, np.abs(centre), side="right")
    half = len(_GROUP_EDGES) + 1
    group = np.where(centre > 0, half + mag, half - 1 - mag)
    group[ZERO_BIN] = -1
    return group.astype(np.int64)


BIN_TO_GROUP = _bin_to_group()


def reservoir_group(bins):
    """Quantile-sample group (0..RESERVOIR_GROUPS−1, −1 for exact zeros) of histogram bins (torch)."""
    import torch

    return torch.as_tensor(BIN_TO_GROUP, device=bins.device)[bins]


def group_bounds() -> list[tuple[float, float]]:
    """(lower, upper) |value| bounds of each quantile-sample group, signed, ascending."""
    half = len(_GROUP_EDGES) + 1
    mags = list(zip(np.concatenate([[0.0], _GROUP_EDGES]), np.concatenate([_GROUP_EDGES, [np.inf]])))
    neg = [(-hi, -lo) for lo, hi in reversed(mags)]
    pos = [(lo, hi) for lo, hi in mags]
    assert len(neg) == half
    return neg + pos


# -- priorities: a hash of (document, position), the same in every engine and partition --------------------
_MASK63 = np.uint64((1 << 63) - 1)


def token_priority(doc: np.ndarray, pos: np.ndarray, seed: int = 0) -> np.ndarray:
    """63-bit splitmix64 hash of (document, position): the reservoir priority of a token (lower wins).

    Sampling by a hash rather than a random stream makes reservoirs a pure function of the corpus: any
    sharding, engine or resume point keeps exactly the same samples.
    """
    with np.errstate(over="ignore"):
        z = (doc.astype(np.uint64) << np.uint64(32)) ^ pos.astype(np.uint64) ^ np.uint64(seed)
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & _MASK63).astype(np.int64)


# -- moments ------------------------------------------------------------------------------------------------
def moments_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise merge of (count, mean, M2); arrays broadcast, counts may be 0."""
    n = n_a + n_b
    safe = np.where(n > 0, n, 1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / safe)
    m2 = m2_a + m2_b + delta * delta * (n_a * n_b / safe)
    return n, np.where(n > 0, mean, 0.0), np.where(n > 0, m2, 0.0)


# -- top-k order ----------------------------------------------------------------------------------------------
EMPTY_DOC = np.iinfo(np.int64).max  # an empty top-k slot: value −inf, document "after every document"


def topk_order(value: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Indices along the last axis sorting by (value desc, document asc, position asc)."""
    idx = np.argsort(pos, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, np.argsort(np.take_along_axis(doc, idx, -1), axis=-1, kind="stable"), -1)
    neg = -np.take_along_axis(value, idx, -1)
    return np.take_along_axis(idx, np.argsort(neg, axis=-1, kind="stable"), -1)


def _merge_topk(a: dict, b: dict, prefix: str, k: int, per_doc: bool, inplace: bool = False) -> dict:
    """Top-k of the union (value desc, document asc, position asc; one entry per document when ``per_doc``: a
    document both sides hold keeps its better entry). Both sides are sorted (every state is a merge result or
    a worker's sorted partial), so the selection is a compiled two-pointer merge (``lens.scan.fused``) equal to
    a stable sort of the concatenation; payloads are copied once, never concatenated."""
    from lens.scan.fused import gather_pair, topk_select

    va, vb = a[prefix + "value"], b[prefix + "value"]
    nd = va.ndim
    lead, ka = va.shape[:-1], va.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    pair = lambda key: np.concatenate([a[key].reshape(rows, -1), b[key].reshape(rows, -1)], axis=1)
    sel, dead = topk_select(pair(prefix + "value"), pair(prefix + "doc"), pair(prefix + "pos"), ka, k, per_doc, EMPTY_DOC)
    out = {}
    for key in a:
        if key.startswith(prefix):
            x, y = a[key], b[key]
            out[key] = gather_pair(x.reshape((rows,) + x.shape[nd - 1 :]), y.reshape((rows,) + y.shape[nd - 1 :]),
                                   sel, inplace).reshape(lead + (k,) + x.shape[nd:])
    if dead.any():  # a document's later entry, kept only as an empty slot
        dead = dead.reshape(lead + (k,))
        out[prefix + "value"] = np.where(dead, -np.inf, out[prefix + "value"]).astype(va.dtype)
        out[prefix + "doc"] = np.where(dead, EMPTY_DOC, out[prefix + "doc"])
    return out


def _merge_reservoir(a: dict, b: dict, prefix: str, r: int, inplace: bool = False) -> dict:
    """The ``r`` lowest priorities of two ascending reservoirs (ties keep ``a`` first, as a stable sort does)."""
    from lens.scan.fused import gather_pair, reservoir_select

    pa = a[prefix + "priority"]
    nd = pa.ndim
    lead, ka = pa.shape[:-1], pa.shape[-1]
    rows = int(np.prod(lead)) if lead else 1
    pri = np.concatenate([pa.reshape(rows, -1), b[prefix + "priority"].reshape(rows, -1)], axis=1)
    sel = reservoir_select(pri, ka, r)
    out = {}
    for key in a:
        if key.startswith(prefix):
            x, y = a[key], b[key]
            out[key] = gather_pair(x.reshape((rows,) + x.shape[nd - 1 :]), y.reshape((rows,) + y.shape[nd - 1 :]),
                                   sel, inplace).reshape(lead + (r,) + x.shape[nd:])
    return out


def merge_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, top_k: int, samples: int,
                inplace: bool = False) -> dict[str, np.ndarray]:
    """Merge two partial scan states (see :mod:`lens.scan.state` for the keys).

    Neither input is modified unless ``inplace``: then ``a``'s writable arrays are reused for the result (the
    engines, which drop the previous state anyway), and top-k and reservoir rows that ``b`` cannot change are
    not touched at all. The result is the same either way.
    """
    if not a:
        return dict(b)
    if not b:
        return dict(a)
    out: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for group in _GROUPS:
        if group["count"] not in a:
            continue
        n, mean, m2 = moments_merge(a[group["count"]], a[group["mean"]], a[group["m2"]],
                                    b[group["count"]], b[group["mean"]], b[group["m2"]])
        out[group["count"]], out[group["mean"]], out[group["m2"]] = n, mean, m2
        done.update((group["count"], group["mean"], group["m2"]))
    for prefix in ("topk.", "route_topk."):
        if prefix + "value" in a:
            out.update(_merge_topk(a, b, prefix, top_k if prefix == "topk." else a[prefix + "value"].shape[-1],
                                   per_doc=prefix == "topk.", inplace=inplace))
            done.update(k for k in a if k.startswith(prefix))
    if "sample.priority" in a and "sample.priority" in b:
        out.update(_merge_reservoir(a, b, "sample.", samples, inplace=inplace))
    elif "sample.priority" in a:  # a batch's partial state: its samples went straight into its shard's state
        out.update({k: v for k, v in a.items() if k.startswith("sample.")})
    elif "sample.priority" in b:
        out.update({k: v for k, v in b.items() if k.startswith("sample.")})
    done.update(k for k in a if k.startswith("sample."))
    for key, va in a.items():
        if key in done:
            continue
        vb = b[key]
        into = va if inplace and va.flags.writeable and va.shape == np.broadcast_shapes(va.shape, vb.shape) else None
        if key.endswith(".min"):
            out[key] = np.minimum(va, vb, out=into)
        elif key.endswith(".max"):
            out[key] = np.maximum(va, vb, out=into)
        else:  # counts, histograms, sums
            out[key] = np.add(va, vb, out=into)
    return out


#: (count, mean, M2) triples merged with Chan et al.'s update
_GROUPS = [
    {"count": "neuron.count", "mean": "neuron.mean", "m2": "neuron.m2"},
    {"count": "expert_neuron.count", "mean": "expert_neuron.mean", "m2": "expert_neuron.m2"},
    {"count": "seq.count", "mean": "seq.mean", "m2": "seq.m2"},
    {"count": "sink.count", "mean": "sink.mean", "m2": "sink.m2"},
]
