"""Nearest-neighbour search over a text bank: the vector store and exact search (chunked matmul + top-k).

docs/definitions.md, "Visual tokens / LatentLens": a query (a hidden state) is compared by cosine with every
entry of every bank layer and the neighbours are **merged into one global top-k** (Krojer et al. 2026). Because
every entry is a row of one matrix, the merge is simply the top-k over the union of the searched layers' rows —
the same set the paper's per-layer top-k followed by a cross-layer merge gives (``latentlens.ContextualIndex.search``).

Exact search streams the bank in chunks of rows (``chunk_rows``), so its memory is ``O(queries × (chunk + k))``
whatever the bank size; scores are float32 dot products of the L2-normalized query with the stored rows (float16
rows, or int8 codes × per-row scale, both widened to float32). **Ties**: results are ordered by score
descending, then by bank row ascending; rows with equal float32 scores are ordered by row.

Approximate search lives in ``lens.analysis.ivf`` (an inverted-file index whose lists are contiguous int8 rows).

Example::

    store = VectorStore.from_float(vectors)               # [n, d] unit rows
    scores, ids = exact_topk(store, queries, k=5)         # [q, 5] float32, [q, 5] int64
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lens.errors import ConfigError

__all__ = ["VectorStore", "exact_topk", "refine_topk", "int8_candidates", "normalize_queries", "merge_topk", "recall_at_k"]

DTYPES = ("float16", "int8")


@dataclass
class VectorStore:
    """The bank's unit vectors: float16 rows, or int8 codes with a float32 scale per row and per dimension.

    int8: hidden states of language models carry **massive activations** — a few dimensions hundreds of times
    larger than the rest (Sun et al. 2024) — so a per-row scale alone (set by the largest value) would leave the
    other dimensions a handful of levels. Each dimension is first divided by its largest magnitude over the
    bank (``dim_scales`` [d], smoothing in the manner of SmoothQuant), then each row is quantized by
    ``lens.kernels.lowbit.Int8Codec`` (per-row symmetric, ``scale = max|x| / 127``, round half to even), and the
    row scale is divided by the norm of the dequantized row so that every row has unit norm again and a dot
    product is a cosine. Row r is ``codes[r] · scales[r] · dim_scales``; a query is multiplied by
    ``dim_scales`` once, so scoring reads only the codes (``dot``). 8 + 32/d bits per value, + 4·d bytes.
    """

    kind: str
    data: np.ndarray  # [n, d] float16 or int8
    scales: np.ndarray | None = None  # [n] float32 (int8 only)
    dim_scales: np.ndarray | None = None  # [d] float32 (int8 only)

    @classmethod
    def from_float(cls, vectors: np.ndarray, kind: str = "float16", *, chunk_rows: int = 65536,
                   dim_scales: np.ndarray | None = None) -> "VectorStore":
        """Store unit vectors ``[n, d]`` as ``kind`` ("float16" or "int8"; ``dim_scales`` default: per-dimension
        max magnitude of ``vectors``)."""
        if kind not in DTYPES:
            raise ConfigError(f"bank dtype must be one of {DTYPES}; got {kind!r}")
        vectors = np.asarray(vectors)
        if kind == "float16":
            return cls("float16", vectors.astype(np.float16, copy=False))
        from lens.kernels.lowbit import Int8Codec

        codec = Int8Codec()
        n, d = vectors.shape
        if dim_scales is None:
            dim_scales = np.zeros(d, dtype=np.float32)
            for start in range(0, n, chunk_rows):
                part = np.abs(vectors[start : start + chunk_rows]).max(axis=0) if n else 0
                dim_scales = np.maximum(dim_scales, np.asarray(part, dtype=np.float32))
            dim_scales = np.where(dim_scales > 0, dim_scales, 1.0).astype(np.float32)
        dims = torch.from_numpy(np.asarray(dim_scales, dtype=np.float32))
        codes = np.empty((n, d), dtype=np.int8)
        scales = np.empty(n, dtype=np.float32)
        for start in range(0, n, chunk_rows):
            x = torch.from_numpy(np.ascontiguousarray(vectors[start : start + chunk_rows], dtype=np.float32)) / dims
            packed = codec.quantize(x)
            deq = codec.dequantize(packed) * dims
            norm = deq.norm(dim=1)
            scale = packed.data["scales"] / torch.where(norm > 0, norm, torch.ones_like(norm))
            codes[start : start + len(x)] = packed.data["codes"].numpy()
            scales[start : start + len(x)] = scale.numpy()
        return cls("int8", codes, scales, dims.numpy())

    def prepare(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries ``[q, d]`` (unit rows) as ``dot`` reads them: multiplied by ``dim_scales`` for int8."""
        return queries if self.dim_scales is None else queries * torch.from_numpy(self.dim_scales)

    def dot(self, prepared: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Cosines ``[q, stop − start]`` of prepared queries with rows ``start:stop`` (float32)."""
        x = torch.from_numpy(self.data[start:stop]).float()
        scores = prepared @ x.T
        if self.scales is not None:
            scores.mul_(torch.from_numpy(self.scales[start:stop]).unsqueeze(0))
        return scores

    def __len__(self) -> int:
        return int(self.data.shape[0])

    @property
    def dim(self) -> int:
        return int(self.data.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + sum(a.nbytes for a in (self.scales, self.dim_scales) if a is not None))

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a float32 tensor ``[stop − start, d]``."""
        x = torch.from_numpy(self.data[start:stop]).float()
        if self.scales is not None:
            x.mul_(torch.from_numpy(self.scales[start:stop]).unsqueeze(1)).mul_(torch.from_numpy(self.dim_scales))
        return x

    def take(self, ids: np.ndarray) -> torch.Tensor:
        """Rows ``ids`` (any shape) as float32 ``[*ids.shape, d]``."""
        ids = np.asarray(ids, dtype=np.int64)
        x = torch.from_numpy(self.data[ids.reshape(-1)]).float()
        if self.scales is not None:
            x.mul_(torch.from_numpy(self.scales[ids.reshape(-1)]).unsqueeze(1)).mul_(torch.from_numpy(self.dim_scales))
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
        return VectorStore(self.kind, self.data[ids], None if self.scales is None else self.scales[ids], self.dim_scales)


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


def _checked(store: VectorStore, queries, k: int, ranges) -> tuple[torch.Tensor, list[tuple[int, int]], int]:
    """Normalized queries, the non-empty row ranges and their total; ``ConfigError`` for a dimension mismatch
    or k outside 1..total."""
    q = normalize_queries(queries)
    if q.shape[1] != store.dim:
        raise ConfigError(f"queries have {q.shape[1]} dimensions but the bank's rows have {store.dim}")
    ranges = [(0, len(store))] if ranges is None else [(int(a), int(b)) for a, b in ranges if b > a]
    total = sum(b - a for a, b in ranges)
    if k < 1 or k > total:
        raise ConfigError(f"k={k} but the searched part of the bank holds {total} entries; ask for 1 ≤ k ≤ {total}")
    return q, ranges, total


def exact_topk(store: VectorStore, queries, k: int, *, ranges: Sequence[tuple[int, int]] | None = None,
               chunk_rows: int = 32768) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-``k`` bank rows for each query by cosine, over the row ``ranges`` (default: all rows).

    ``queries``: ``[q, d]`` (normalized here). Returns ``scores`` float32 ``[q, k]`` (descending) and ``ids``
    int64 ``[q, k]`` (ties: smaller row first). Memory: ``O(q × chunk_rows)`` for the score block.
    Raises ``ConfigError`` when the ranges hold fewer than ``k`` rows or the dimensions differ.

    Example: ``exact_topk(store, torch.randn(3, store.dim), k=5)``.
    """
    q, ranges, _ = _checked(store, queries, k, ranges)
    prepared = store.prepare(q)
    best_s = torch.full((q.shape[0], 0), -torch.inf)
    best_i = torch.full((q.shape[0], 0), -1, dtype=torch.long)
    for start, stop in ranges:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            scores = store.dot(prepared, a, b)
            best_s, best_i = merge_topk((best_s, best_i), _chunk_topk(scores, a, k), k)
    return best_s.numpy(), best_i.numpy()


def refine_topk(codes: VectorStore, rows: VectorStore, queries, k: int, *, depth: int | None = None,
                ranges: Sequence[tuple[int, int]] | None = None, chunk_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` by a full int8 scan, refined: every row of ``codes`` (int8, the same rows as ``rows``) is scored
    in integer arithmetic (queries quantized to int8 per row, packed once: ``int8_candidates``, exact int32 dot
    products by oneDNN's VNNI/AMX kernels), the best ``depth`` (default max(8k, 40)) per query are kept, and those are
    re-ranked by their exact cosine with ``rows`` (e.g. the bank's float16 rows, possibly memory-mapped) — FAISS's
    "refine" step (``IndexRefineFlat``, ``k_factor``) after a brute-force quantized first pass.

    Returns what ``exact_topk(rows, ...)`` returns unless a true neighbour ranked below ``depth`` in the int8
    pass (measured, not assumed: ``lens bench search``, the tests). Raises ``ConfigError`` as ``exact_topk``
    does, or when ``codes`` is not int8 or holds other rows than ``rows``.

    Example: ``refine_topk(bank.store.astype("int8"), bank.store, states, k=5)``.
    """
    if codes.kind != "int8" or len(codes) != len(rows) or codes.dim != rows.dim:
        raise ConfigError("refine_topk needs int8 codes of the same rows as `rows` (store.astype('int8'))")
    q, ranges, total = _checked(rows, queries, k, ranges)
    depth = min(max(int(depth or max(8 * k, 40)), k), total)
    cand = int8_candidates(codes, q, depth, ranges=ranges, chunk_rows=chunk_rows)
    exact = torch.einsum("qd,qrd->qr", q, rows.take(cand.numpy()))
    s, i = _order(exact, cand, k)
    return s.numpy(), i.numpy()


def int8_candidates(codes: VectorStore, q: torch.Tensor, depth: int, *, ranges, chunk_rows: int = 16384,
                    group: int = 32) -> torch.Tensor:
    """The ``depth`` best rows of ``codes`` (int8) per normalized query ``q`` ``[Q, d]`` by the int8 score
    ``int8(q) · codes[r] · scales[r]`` (the query's own scale is a constant per query and is left out): ids
    ``[Q, depth]`` int64.

    Rows are scored a block at a time by ``lens.kernels.lowbit.Int8QueryScorer`` (the queries packed once).
    Within a block, the best ``depth`` rows lie in the ``depth`` groups of ``group`` consecutive rows with the
    highest maximum (a group holding one of them has a maximum at least the depth-th score, every other group
    less), so a top-k runs over group maxima and over the rows of the chosen groups, never over a whole
    ``[Q, rows]`` block.
    """
    from lens.kernels.lowbit.int8_scores import Int8QueryScorer

    prepared = codes.prepare(q)
    q_scale = prepared.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127.0
    scorer = Int8QueryScorer(torch.round(prepared / q_scale).clamp_(-127, 127).to(torch.int8))
    row_scale = torch.from_numpy(codes.scales)
    Q = q.shape[0]
    cols = torch.arange(Q)
    best_s = torch.full((Q, 0), -torch.inf)
    best_i = torch.full((Q, 0), -1, dtype=torch.long)
    for start, stop in ranges:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            scores = scorer.scores(torch.from_numpy(codes.data[a:b])).mul_(row_scale[a:b, None])  # [n, Q]
            n = b - a
            full = n - n % group
            if full >= group * depth:  # enough groups: select by group maxima first
                blocks = scores[:full].view(full // group, group, Q)
                top_groups = blocks.amax(1).topk(depth, dim=0).indices  # [depth, Q]
                rows_s = blocks[top_groups, :, cols].permute(1, 0, 2).reshape(Q, depth * group)  # [Q, depth·group]
                rows_i = (top_groups.T[:, :, None] * group + torch.arange(group)).reshape(Q, depth * group)
                if full < n:
                    rows_s = torch.cat([rows_s, scores[full:].T], 1)
                    rows_i = torch.cat([rows_i, torch.arange(full, n).expand(Q, n - full)], 1)
            else:
                rows_s, rows_i = scores.T, torch.arange(n).expand(Q, n)
            vals, pos = rows_s.topk(min(depth, rows_s.shape[1]), dim=1)
            best_s = torch.cat([best_s, vals], 1)
            best_i = torch.cat([best_i, rows_i.gather(1, pos) + a], 1)
            if best_s.shape[1] >= 2 * depth:  # keep the candidate list bounded
                top = best_s.topk(depth, dim=1).indices
                best_s, best_i = best_s.gather(1, top), best_i.gather(1, top)
    top = best_s.topk(min(depth, best_s.shape[1]), dim=1).indices
    return best_i.gather(1, top)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / k (both ``[q, k]`` id arrays)."""
    found, truth = np.asarray(found), np.asarray(truth)
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth)]
    return float(np.sum(hits) / truth.size) if truth.size else float("nan")
