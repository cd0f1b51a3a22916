"""Nearest-neighbour search over a text bank: exact (chunked matmul + top-k) and approximate (FAISS IVF).

docs/definitions.md, "Visual tokens / LatentLens": a query (a hidden state) is compared by cosine with every
entry of every bank layer and the neighbours are **merged into one global top-k** (Krojer et al. 2026). Because
every entry is a row of one matrix, the merge is simply the top-k over the union of the searched layers' rows —
the same set the paper's per-layer top-k followed by a cross-layer merge gives (``latentlens.ContextualIndex.search``).

Exact search streams the bank in chunks of rows (``chunk_rows``), so its memory is ``O(queries × (chunk + k))``
whatever the bank size; scores are float32 dot products of the L2-normalized query with the stored rows (float16
rows, or int8 codes × per-row scale, both widened to float32). **Ties**: results are ordered by score
descending, then by bank row ascending; rows with equal float32 scores are ordered by row.

Approximate search (``IVFIndex``): FAISS k-means (``faiss.Kmeans``, spherical) splits the bank into ``nlist``
inverted lists; a query scans the ``nprobe`` lists whose centroids are closest (``faiss.IndexFlatIP``), and the
candidates' scores are computed from the bank's own rows — so every score it returns is exact, and only
neighbours in unscanned lists can be missed. The lists are FAISS's clustering over lens's own storage (the
int8 rows of a quantized bank are not copied into a second FAISS-owned code book); recall against exact is
measured by ``IVFIndex.recall`` and reported by ``lens bench search``.

Example::

    store = VectorStore.from_float(vectors)               # [n, d] unit rows
    scores, ids = exact_topk(store, queries, k=5)         # [q, 5] float32, [q, 5] int64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lens.errors import ConfigError, MissingDependencyError

__all__ = ["VectorStore", "exact_topk", "normalize_queries", "merge_topk", "IVFIndex", "recall_at_k"]

DTYPES = ("float16", "int8")


@dataclass
class VectorStore:
    """The bank's unit vectors: float16 rows, or int8 codes with a float32 scale per row.

    int8 rows come from ``lens.kernels.lowbit.Int8Codec`` (per-row symmetric, ``scale = max|x| / 127``,
    round half to even); the stored scale is then divided by the norm of the dequantized row, so that every
    dequantized row has unit norm again and a dot product is a cosine. 8 + 32/d bits per value.
    """

    kind: str
    data: np.ndarray  # [n, d] float16 or int8
    scales: np.ndarray | None = None  # [n] float32 (int8 only)

    @classmethod
    def from_float(cls, vectors: np.ndarray, kind: str = "float16", *, chunk_rows: int = 65536) -> "VectorStore":
        """Store unit vectors ``[n, d]`` as ``kind`` ("float16" or "int8")."""
        if kind not in DTYPES:
            raise ConfigError(f"bank dtype must be one of {DTYPES}; got {kind!r}")
        vectors = np.asarray(vectors)
        if kind == "float16":
            return cls("float16", vectors.astype(np.float16, copy=False))
        from lens.kernels.lowbit import Int8Codec

        codec = Int8Codec()
        n, d = vectors.shape
        codes = np.empty((n, d), dtype=np.int8)
        scales = np.empty(n, dtype=np.float32)
        for start in range(0, n, chunk_rows):
            x = torch.from_numpy(np.ascontiguousarray(vectors[start : start + chunk_rows], dtype=np.float32))
            packed = codec.quantize(x)
            deq = codec.dequantize(packed)
            norm = deq.norm(dim=1)
            scale = packed.data["scales"] / torch.where(norm > 0, norm, torch.ones_like(norm))
            codes[start : start + len(x)] = packed.data["codes"].numpy()
            scales[start : start + len(x)] = scale.numpy()
        return cls("int8", codes, scales)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a float32 tensor ``[stop − start, d]``."""
        x = torch.from_numpy(self.data[start:stop]).float()
        if self.scales is not None:
            x.mul_(torch.from_numpy(self.scales[start:stop]).unsqueeze(1))
        return x

    def take(self, ids: np.ndarray) -> torch.Tensor:
        """Rows ``ids`` (any shape) as float32 ``[*ids.shape, d]``."""
        ids = np.asarray(ids, dtype=np.int64)
        x = torch.from_numpy(self.data[ids.reshape(-1)]).float()
        if self.scales is not None:
            x.mul_(torch.from_numpy(self.scales[ids.reshape(-1)]).unsqueeze(1))
        return x.reshape(*ids.shape, self.dim)

    def astype(self, kind: str) -> "VectorStore":
        """The same vectors stored as ``kind`` (int8 → float16 widens the dequantized rows)."""
        if kind == self.kind:
            return self
        if self.kind == "int8":
            return VectorStore("float16", np.concatenate(
                [self.rows(s, min(s + 65536, len(self))).numpy().astype(np.float16) for s in range(0, len(self), 65536)]
            ) if len(self) else np.zeros((0, self.dim), np.float16))
        return VectorStore.from_float(self.data, kind)

    def subset(self, ids: np.ndarray) -> "VectorStore":
        return VectorStore(self.kind, self.data[ids], None if self.scales is None else self.scales[ids])


def normalize_queries(queries) -> torch.Tensor:
    """Queries ``[q, d]`` (or ``[d]``) as L2-normalized float32 rows; zero rows stay zero."""
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries).float()
    if q.dim() == 1:
        q = q.unsqueeze(0)
    if q.dim() != 2:
        raise ConfigError(f"queries must be [n, d] or [d]; got shape {tuple(q.shape)}")
    norm = q.norm(dim=1, keepdim=True)
    return q / torch.where(norm > 0, norm, torch.ones_like(norm))


def _order(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first ``k`` by (score desc, id asc). ``scores``/``ids``: [q, m]; padding ids are −1."""
    by_id = torch.argsort(ids, dim=1, stable=True)
    s, i = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = torch.argsort(s, dim=1, descending=True, stable=True)
    return s.gather(1, by_score)[:, :k], i.gather(1, by_score)[:, :k]


def merge_topk(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], k: int):
    """Merge two ``(scores, ids)`` candidate lists into the top ``k`` (score desc, id asc)."""
    return _order(torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=1), k)


def _chunk_topk(scores: torch.Tensor, offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` of one chunk's ``[q, n]`` scores with ties resolved by smaller row id (exactly)."""
    kk = min(k, scores.shape[1])
    vals, idx = torch.topk(scores, kk, dim=1)  # torch.topk does not promise which of equal values it keeps
    kth = vals[:, -1:]
    ties = (scores >= kth).sum(dim=1) > kk
    ids = idx + offset
    if bool(ties.any()):
        for r in torch.nonzero(ties).flatten().tolist():
            cand = torch.nonzero(scores[r] >= kth[r, 0]).flatten()  # ascending ids
            order = torch.argsort(scores[r, cand], descending=True, stable=True)[:kk]
            vals[r], ids[r] = scores[r, cand[order]], cand[order] + offset
    return vals, ids


def exact_topk(store: VectorStore, queries, k: int, *, ranges: Sequence[tuple[int, int]] | None = None,
               chunk_rows: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` bank rows for each query by cosine, over the row ``ranges`` (default: all rows).

    ``queries``: ``[q, d]`` (normalized here). Returns ``scores`` float32 ``[q, k]`` (descending) and ``ids``
    int64 ``[q, k]`` (ties: smaller row first). Memory: ``O(q × chunk_rows)`` for the score block.
    Raises ``ConfigError`` when the ranges hold fewer than ``k`` rows or the dimensions differ.

    Example: ``exact_topk(store, torch.randn(3, store.dim), k=5)``.
    """
    q = normalize_queries(queries)
    if q.shape[1] != store.dim:
        raise ConfigError(f"queries have {q.shape[1]} dimensions but the bank's rows have {store.dim}")
    ranges = [(0, len(store))] if ranges is None else [(int(a), int(b)) for a, b in ranges if b > a]
    total = sum(b - a for a, b in ranges)
    if k < 1 or k > total:
        raise ConfigError(f"k={k} but the searched part of the bank holds {total} entries; ask for 1 ≤ k ≤ {total}")
    best_s = torch.full((q.shape[0], 0), -torch.inf)
    best_i = torch.full((q.shape[0], 0), -1, dtype=torch.long)
    for start, stop in ranges:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            scores = q @ store.rows(a, b).T
            best_s, best_i = merge_topk((best_s, best_i), _chunk_topk(scores, a, k), k)
    return best_s.numpy(), best_i.numpy()


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / k (both ``[q, k]`` id arrays)."""
    found, truth = np.asarray(found), np.asarray(truth)
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size) if truth.size else float("nan")


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise MissingDependencyError(
            "approximate search needs FAISS: pip install 'lens-interp[latent]' (or pip install faiss-cpu); "
            "exact search (method='exact') needs nothing more"
        ) from exc
    return faiss


@dataclass
class IVFIndex:
    """Inverted lists over a bank's rows (see the module docstring): ``centroids`` ``[nlist, d]`` float32,
    ``order`` ``[n]`` int64 (bank rows grouped by list) and ``list_offsets`` ``[nlist + 1]``.

    Build it with ``IVFIndex.train(store)``; search with ``search(store, queries, k, nprobe=...)``.
    """

    centroids: np.ndarray
    order: np.ndarray
    list_offsets: np.ndarray
    nprobe: int = 16

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.centroids.nbytes + self.order.nbytes + self.list_offsets.nbytes)

    @classmethod
    def train(cls, store: VectorStore, *, nlist: int | None = None, nprobe: int | None = None, seed: int = 0,
              sample: int = 262144, niter: int = 20, chunk_rows: int = 65536) -> "IVFIndex":
        """Cluster the bank with FAISS's spherical k-means and assign every row to its nearest centroid.

        ``nlist`` defaults to ≈ 4·√n (FAISS's guideline range is 4·√n … 16·√n); k-means trains on at most
        ``sample`` rows drawn with ``seed``. ``nprobe`` (lists scanned per query) defaults to ``max(1, nlist // 16)``.
        """
        faiss = _faiss()
        n, d = len(store), store.dim
        if n == 0:
            raise ConfigError("cannot index an empty bank")
        nlist = int(nlist or max(1, min(n // 39, round(4 * np.sqrt(n)))))
        nlist = max(1, min(nlist, n))
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(n, size=min(n, max(sample, nlist * 39)), replace=False))
        train = np.ascontiguousarray(store.take(pick).numpy(), dtype=np.float32)
        kmeans = faiss.Kmeans(d, nlist, niter=niter, spherical=True, seed=int(seed), verbose=False,
                              min_points_per_centroid=1, max_points_per_centroid=max(256, len(train) // nlist + 1))
        kmeans.train(train)
        centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        quantizer = faiss.IndexFlatIP(d)
        quantizer.add(centroids)
        assign = np.empty(n, dtype=np.int64)
        for a in range(0, n, chunk_rows):
            x = np.ascontiguousarray(store.rows(a, min(a + chunk_rows, n)).numpy())
            assign[a : a + len(x)] = quantizer.search(x, 1)[1][:, 0]
        order = np.argsort(assign, kind="stable")
        offsets = np.searchsorted(assign[order], np.arange(nlist + 1)).astype(np.int64)
        return cls(centroids, order.astype(np.int64), offsets, int(nprobe or max(1, nlist // 16)))

    def search(self, store: VectorStore, queries, k: int, *, nprobe: int | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` (scores exact for the rows returned; ids ordered like ``exact_topk``).

        ``allowed``: optional boolean mask ``[n]`` of the rows that may be returned (e.g. some bank layers).
        Rows are scanned list by list for the queries that probe that list; memory is O(queries × k × nprobe).
        """
        faiss = _faiss()
        q = normalize_queries(queries)
        nprobe = int(nprobe or self.nprobe)
        nprobe = max(1, min(nprobe, self.nlist))
        quantizer = faiss.IndexFlatIP(store.dim)
        quantizer.add(self.centroids)
        probes = quantizer.search(np.ascontiguousarray(q.numpy()), nprobe)[1]  # [nq, nprobe]
        nq = q.shape[0]
        cand_s = torch.full((nq, nprobe * k), -torch.inf)
        cand_i = torch.full((nq, nprobe * k), -1, dtype=torch.long)
        pairs_list = probes.reshape(-1)
        pairs_query = np.repeat(np.arange(nq), nprobe)
        pairs_slot = np.tile(np.arange(nprobe), nq)
        by_list = np.argsort(pairs_list, kind="stable")
        bounds = np.flatnonzero(np.r_[True, pairs_list[by_list][1:] != pairs_list[by_list][:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            sel = by_list[a:b]
            lst = int(pairs_list[sel[0]])
            rows = self.order[self.list_offsets[lst] : self.list_offsets[lst + 1]]
            if allowed is not None:
                rows = rows[allowed[rows]]
            if len(rows) == 0:
                continue
            rows = np.sort(rows)
            qs = torch.from_numpy(pairs_query[sel])
            scores = q[qs] @ store.take(rows).T
            vals, idx = _chunk_topk(scores, 0, k)
            ids = torch.from_numpy(rows)[idx]
            slots = torch.from_numpy(pairs_slot[sel])
            cols = (slots * k).unsqueeze(1) + torch.arange(vals.shape[1]).unsqueeze(0)
            cand_s[qs.unsqueeze(1), cols] = vals
            cand_i[qs.unsqueeze(1), cols] = ids
        s, i = _order(cand_s, cand_i, k)
        return s.numpy(), i.numpy()
