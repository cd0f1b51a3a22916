"""Approximate nearest-neighbour search over a text bank: an inverted-file (IVF) index whose lists hold the
bank's rows **contiguously, as int8 codes with a scale per row** (and per dimension, see
``lens.analysis.search.VectorStore``) (docs/definitions.md, "Visual tokens /
LatentLens").

Clustering is FAISS's (``faiss.Kmeans``, spherical k-means on a seeded sample; rows assigned to their nearest
centroid with ``faiss.IndexFlatIP``). The lists are then stored by lens, not by FAISS: each list is one
contiguous block of int8 rows (``lens.kernels.lowbit.Int8Codec``, per-row symmetric, rescaled so every row has
unit norm), so that a query batch scores a probed list with one dense matrix product over a slice — no gather,
no per-row decode loop — and a bank searched only approximately needs no other copy of its vectors
(576 + 4 bytes per 576-dimensional entry, plus 8 for its bank row: 0.51 × a float16 bank).

Search: per query the ``nprobe`` lists with the highest centroid cosine; every row of those lists is scored —
for int8 lists first in integer arithmetic (the query quantized to int8 per row, ``torch._int_mm``: exact int32
dot products, AMX/VNNI where the CPU has them), keeping the best candidates, which are then rescored exactly
against the bank's own rows (``rescore``: ``TextBank.search`` passes its float16 or int8 store, which may be
memory-mapped) — and the top-k by (score desc, bank row asc) among them is returned. The scores are then those
exact search gives; a neighbour is missed only when it lies in an unprobed list or was not among the candidates.
Rescoring against the int8 codes instead caps recall against float16 exact search (~0.97 on SmolLM2 states,
whose 5th and 6th neighbours are often within 10⁻³ of each other). Recall against exact search is measured,
never assumed (``recall_at_k``; ``lens bench search``; the tests).

Example::

    index = IVFIndex.train(bank.store, nlist=1024)
    scores, ids = index.search(queries, k=5, nprobe=32)     # [q, 5] float32, [q, 5] int64 bank rows
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lens.analysis.search import VectorStore, _chunk_topk, _order, exact_topk, normalize_queries
from lens.errors import ConfigError, MissingDependencyError

__all__ = ["IVFIndex"]


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
    """Inverted lists over a bank (see the module docstring).

    ``centroids`` ``[nlist, d]`` float32 (unit rows); ``list_offsets`` ``[nlist + 1]`` int64: list ``j`` is rows
    ``list_offsets[j]:list_offsets[j + 1]`` of ``codes`` (a ``VectorStore``, list order) and of ``order``
    (``[n]`` int64, the bank row of each). ``nprobe``: lists scanned per query by default.

    **Query guide** (optional, ``train(queries=...)``): ``guide_queries`` ``[t, d]`` float16 (unit rows) — sample
    queries of the kind that will be asked, e.g. image tokens of a few images — and ``guide_lists`` ``[t, g]``
    int32, the lists holding each one's exact ``g`` nearest rows. A query then also scans the lists of its
    ``guide`` nearest sample queries' neighbours. Queries from another distribution than the bank (image tokens
    against text states) have neighbours whose lists their centroid cosines rank poorly; the neighbours of
    similar queries point at them instead — the idea of query-guided indexes for out-of-distribution queries
    (RoarGraph, Chen et al., VLDB 2024), applied to inverted lists.
    """

    centroids: np.ndarray
    order: np.ndarray
    list_offsets: np.ndarray
    codes: VectorStore
    nprobe: int = 32
    guide_queries: np.ndarray | None = None
    guide_lists: np.ndarray | None = None

    def __repr__(self) -> str:
        guide = f", guide of {len(self.guide_queries)} sample queries" if self.guide_queries is not None else ""
        return (f"IVFIndex({len(self)} rows in {self.nlist} {self.codes.kind} lists, nprobe {self.nprobe}{guide}, "
                f"{self.nbytes / 2**20:.1f} MB)")

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    def __len__(self) -> int:
        return int(len(self.order))

    @property
    def nbytes(self) -> int:
        """Bytes of everything approximate search reads: codes, scales, bank rows, centroids, offsets, guide."""
        guide = sum(a.nbytes for a in (self.guide_queries, self.guide_lists) if a is not None)
        return int(self.codes.nbytes + self.order.nbytes + self.centroids.nbytes + self.list_offsets.nbytes + guide)

    @classmethod
    def train(cls, store: VectorStore, *, nlist: int | None = None, nprobe: int | None = None, seed: int = 0,
              sample: int = 65536, niter: int = 20, dtype: str = "int8", chunk_rows: int = 65536,
              queries=None, guide_k: int = 10) -> "IVFIndex":
        """Cluster ``store`` (the bank's unit rows) and lay its rows out list by list as ``dtype`` codes.

        ``nlist`` defaults to ≈ √n (FAISS's guideline for IVF: between √n and 16·√n lists; fewer lists keep
        training fast on CPU); k-means runs ``niter`` iterations on at most ``sample`` rows drawn with ``seed``
        (and at least 39 per list). ``nprobe`` defaults to ``max(8, nlist // 8)``. ``queries``: optional sample
        queries ``[t, d]`` for the query guide (their exact ``guide_k`` nearest rows are found once, here).
        Raises ``ConfigError`` for an empty bank or sample queries of another width, ``MissingDependencyError``
        without FAISS.
        """
        faiss = _faiss()
        n, d = len(store), store.dim
        if n == 0:
            raise ConfigError("cannot index an empty bank")
        nlist = int(nlist or max(1, min(n // 39, round(np.sqrt(n)))))
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
        order = np.argsort(assign, kind="stable").astype(np.int64)
        offsets = np.searchsorted(assign[order], np.arange(nlist + 1)).astype(np.int64)
        if store.kind == dtype:
            codes = store.subset(order)
        else:
            shared = {}
            if dtype == "int8":  # one mean and one rotation for the whole index (VectorStore's int8 layout)
                total = np.zeros(d, dtype=np.float64)
                for a in range(0, n, chunk_rows):
                    total += store.rows(a, min(a + chunk_rows, n)).double().sum(dim=0).numpy()
                shared = {"mean": (total / n).astype(np.float32), "rotation": 0}
            parts = [VectorStore.from_float(store.take(order[a : a + chunk_rows]).numpy(), dtype, **shared)
                     for a in range(0, n, chunk_rows)]
            codes = VectorStore(dtype, np.concatenate([p.data for p in parts]),
                                None if parts[0].scales is None else np.concatenate([p.scales for p in parts]),
                                None, shared.get("mean"), shared.get("rotation"))
        index = cls(centroids, order, offsets, codes, int(nprobe or max(8, nlist // 8)))
        if queries is not None:
            index.set_guide(store, queries, k=guide_k)
        return index

    def set_guide(self, store: VectorStore, queries, *, k: int = 10) -> None:
        """Attach a query guide: ``queries`` ``[t, d]`` (sample queries) and the lists of their exact ``k``
        nearest rows of ``store`` (the bank this index covers). Raises ``ConfigError`` for another width or an
        empty sample."""
        q = normalize_queries(queries)
        if q.dim() != 2 or q.shape[1] != self.codes.dim or len(store) != len(self.order):
            raise ConfigError(f"guide queries must be [t, {self.codes.dim}] for this index's bank; got {tuple(q.shape)}")
        if q.shape[0] == 0:
            raise ConfigError("the query guide needs at least one sample query")
        _, rows = exact_topk(store, q, min(int(k), len(store)))
        list_of = np.empty(len(self.order), dtype=np.int32)
        for j in range(self.nlist):
            list_of[self.order[self.list_offsets[j] : self.list_offsets[j + 1]]] = j
        self.guide_queries = q.numpy().astype(np.float16)
        self.guide_lists = list_of[rows]

    def search(self, queries, k: int, *, nprobe: int | None = None, allowed: np.ndarray | None = None,
               rescore: VectorStore | None = None, depth: int | None = None,
               guide: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k``: ``scores`` float32 ``[q, k]`` (descending) and bank rows ``ids`` int64 ``[q, k]``
        (−1 where the probed lists held fewer than ``k`` allowed rows).

        ``allowed``: optional boolean mask ``[n]`` over bank rows (e.g. some bank layers). ``rescore``: the bank's
        own rows (a ``VectorStore`` indexed by bank row, e.g. its float16 rows, possibly memory-mapped): the best
        ``depth`` candidates of the int8 pass (default max(8k, 40)) are rescored against them, so the scores are
        those exact search returns and a true neighbour is missed only when it was not a candidate — int8 rows
        alone tie-break differently where neighbours lie within ~10⁻³ of each other. ``guide``: with a query
        guide, the number of nearest sample queries whose neighbours' lists are scanned too (default 20; 0 turns
        the guide off). Memory: O(queries × k × lists scanned) for the candidates plus one list's scores at a time.
        """
        q = normalize_queries(queries)
        if q.shape[1] != self.codes.dim:
            raise ConfigError(f"queries have {q.shape[1]} dimensions but the index holds {self.codes.dim}")
        if nprobe is not None and int(nprobe) < 1:
            raise ConfigError(f"nprobe must be ≥ 1 (lists scanned per query); got {nprobe}")
        if guide is not None and int(guide) < 0:
            raise ConfigError(f"guide must be ≥ 0 (sample queries whose neighbours' lists are scanned); got {guide}")
        if guide and self.guide_queries is None:
            raise ConfigError("this index has no query guide: build it with build_index(queries=sample_states) "
                              "(IVFIndex.train(..., queries=...)), or leave guide unset")
        nprobe = max(1, min(int(nprobe or self.nprobe), self.nlist))
        nq = q.shape[0]
        probes = torch.topk(q @ torch.from_numpy(self.centroids).T, nprobe, dim=1).indices.numpy()  # [nq, nprobe]
        probes = self._guided(q, probes, 20 if guide is None else int(guide))  # [nq, P], −1 padded
        nprobe = probes.shape[1]
        # int8 lists: a first pass in integer arithmetic (queries quantized to int8, torch._int_mm: exact int32
        # dot products, several times faster than widening the rows to float32) keeps `depth` candidates per
        # query, which are then rescored exactly against the stored rows
        integer = self.codes.kind == "int8" and hasattr(torch, "_int_mm")
        if rescore is not None and len(rescore) != len(self.order):
            raise ConfigError(f"rescore holds {len(rescore)} rows but the index covers {len(self.order)}: pass the bank's own rows")
        if depth is None:
            depth = max(8 * k, 40) if rescore is not None else max(4 * k, 20) if integer else k
        depth = max(int(depth), k)
        cand_s = torch.full((nq, nprobe * depth), -torch.inf)
        cand_p = torch.full((nq, nprobe * depth), -1, dtype=torch.long)  # positions in list order
        flat = probes.reshape(-1)
        by_list = np.argsort(flat, kind="stable")
        by_list = by_list[flat[by_list] >= 0]  # padding
        lists = flat[by_list]
        bounds = np.flatnonzero(np.r_[True, lists[1:] != lists[:-1], True])
        query_of = by_list // nprobe
        slot_of = by_list % nprobe
        ar = torch.arange(depth)
        prepared = self.codes.prepare(q)
        shift = self.codes.offset(q)  # the mean's share of every cosine (int8 lists)
        if integer:
            q_scale = prepared.abs().amax(dim=1).clamp_min(1e-30) / 127.0
            q_int = torch.round(prepared / q_scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
            codes = torch.from_numpy(self.codes.data)
            row_scale = torch.from_numpy(self.codes.scales)
        for a, b in zip(bounds[:-1], bounds[1:]):
            lst = int(lists[a])
            lo, hi = int(self.list_offsets[lst]), int(self.list_offsets[lst + 1])
            if hi == lo:
                continue
            qs = torch.from_numpy(query_of[a:b])
            if integer:
                scores = torch._int_mm(q_int[qs], codes[lo:hi].T).float()
                scores.mul_(q_scale[qs].unsqueeze(1)).mul_(row_scale[lo:hi].unsqueeze(0))
            else:
                scores = self.codes.dot(prepared[qs], lo, hi).add_(shift[qs].unsqueeze(1))
            if allowed is not None:
                keep = torch.from_numpy(np.asarray(allowed)[self.order[lo:hi]])
                if not bool(keep.any()):
                    continue
                scores[:, ~keep] = -torch.inf
            vals, idx = _chunk_topk(scores, 0, depth)
            pos = idx + lo
            pos[torch.isinf(vals)] = -1
            cols = (torch.from_numpy(slot_of[a:b]) * depth).unsqueeze(1) + ar[: vals.shape[1]].unsqueeze(0)
            cand_s[qs.unsqueeze(1), cols] = vals
            cand_p[qs.unsqueeze(1), cols] = pos
        cand_s[cand_p < 0] = -torch.inf
        if integer or rescore is not None:  # exact rescoring of the best `depth` candidates of each query
            top = torch.topk(cand_s, min(depth, cand_s.shape[1]), dim=1)
            cand_p = cand_p.gather(1, top.indices)
            valid = cand_p >= 0
            if rescore is not None:  # the bank's own rows, by bank row
                rows = rescore.take(self.order[cand_p.clamp_min(0).numpy()])  # [nq, depth, d] float32
            else:
                rows = self.codes.take(cand_p.clamp_min(0).numpy())
            cand_s = torch.einsum("qd,qrd->qr", q, rows)
            cand_s[~valid] = -torch.inf
        ids = torch.from_numpy(self.order)[cand_p.clamp_min(0)]
        ids[cand_p < 0] = torch.iinfo(torch.long).max
        s, i = _order(cand_s, ids, k)
        i[torch.isinf(s)] = -1
        return s.numpy(), i.numpy()

    def _guided(self, q: torch.Tensor, probes: np.ndarray, guide: int) -> np.ndarray:
        """The centroid probes of each query plus the lists of its ``guide`` nearest sample queries' neighbours,
        without repeats, −1 padded to the longest row."""
        if self.guide_queries is None or guide <= 0:
            return probes
        sample = torch.from_numpy(self.guide_queries.astype(np.float32))
        near = torch.topk(q @ sample.T, min(guide, len(sample)), dim=1).indices.numpy()  # [nq, m]
        extra = self.guide_lists[near].reshape(len(q), -1)  # [nq, m·g]
        both = np.concatenate([probes, extra.astype(probes.dtype)], axis=1)
        rows = []
        for row in both:  # the centroid order first, then the guide's lists in order of first appearance
            _, first = np.unique(row, return_index=True)
            rows.append(row[np.sort(first)])
        out = np.full((len(rows), max(len(r) for r in rows)), -1, dtype=probes.dtype)
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return out

    # -- files --------------------------------------------------------------------------------------------
    def shares_rows_of(self, store: VectorStore | None) -> bool:
        """True when this index's int8 lists are exactly ``store``'s rows in list order (an index trained on an
        int8 bank): a saved bank then stores those rows once (``save_bank``). Checked row by row."""
        c = self.codes
        if store is None or store.kind != "int8" or c.kind != "int8" or len(store) != len(self.order):
            return False
        same = lambda a, b: (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))  # noqa: E731
        if c.rotation != store.rotation or not same(c.mean, store.mean) or not same(c.dim_scales, store.dim_scales):
            return False
        if not np.array_equal(np.asarray(store.scales)[self.order], c.scales):
            return False
        step = 65536
        return all(np.array_equal(np.asarray(store.data[np.sort(self.order[a : a + step])]),
                                  np.asarray(c.data[a : a + step])[np.argsort(self.order[a : a + step], kind="stable")])
                   for a in range(0, len(self.order), step))

    def arrays(self, store: VectorStore | None = None) -> dict[str, np.ndarray]:
        """The index as named arrays for the bank's safetensors file; when its lists are ``store``'s own int8
        rows (``shares_rows_of``), only the order is written and ``from_arrays`` rebuilds them from the bank."""
        out = {"ivf.centroids": self.centroids, "ivf.order": self.order, "ivf.list_offsets": self.list_offsets}
        if self.shares_rows_of(store):
            out["ivf.codes_from_bank"] = np.ones(1, dtype=np.int8)
        else:
            out["ivf.codes"] = self.codes.data
            if self.codes.scales is not None:
                out["ivf.scales"] = self.codes.scales
                out.update(self.codes.transform_arrays("ivf."))
        if self.guide_queries is not None:
            out["ivf.guide_queries"], out["ivf.guide_lists"] = self.guide_queries, self.guide_lists
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], nprobe: int, store: VectorStore | None = None) -> "IVFIndex":
        """The index saved by ``arrays`` (``store``: the bank's rows, needed when the lists were its own)."""
        if "ivf.codes_from_bank" in arrays:
            if store is None or store.kind != "int8":
                raise ConfigError("this index's lists are its bank's int8 rows: load it with the bank (TextBank.load)")
            codes = store.subset(np.asarray(arrays["ivf.order"]))
        elif arrays["ivf.codes"].dtype == np.int8:
            codes = VectorStore.int8_from_arrays(arrays["ivf.codes"], arrays["ivf.scales"], arrays, "ivf.")
        else:
            codes = VectorStore("float16", arrays["ivf.codes"])
        return cls(arrays["ivf.centroids"], arrays["ivf.order"], arrays["ivf.list_offsets"], codes, int(nprobe),
                   arrays.get("ivf.guide_queries"), arrays.get("ivf.guide_lists"))
