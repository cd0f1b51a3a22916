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

from lens.errors import ConfigError, NumericalError

__all__ = ["VectorStore", "structured_rotation", "exact_topk", "refine_topk", "int8_candidates", "normalize_queries", "merge_topk", "recall_at_k"]

DTYPES = ("float16", "int8")


def structured_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal ``[d, d]`` float32 matrix ``S₁ · Cᵀ · S₂ · Cᵀ``: ``C`` the orthonormal DCT-II basis, ``S₁``,
    ``S₂`` diagonal random signs drawn from sha256 of ``(seed, i)``.

    Hand-written because it must be rebuilt bit for bit wherever a bank is loaded: a closed-form transform and
    hash-derived signs depend on no random-number library's version, so a bank stores only the seed. Two rounds
    of random signs and a DCT spread every coordinate — a massive activation too — over all dimensions, as the
    randomized Hadamard transforms of QuaRot (Ashkboos et al. 2024) do for dimensions that are not powers of two.
    """
    import hashlib

    def signs(tag: str) -> np.ndarray:
        need = (d + 255) // 256
        raw = b"".join(hashlib.sha256(f"lens-rotation/{seed}/{tag}/{i}".encode()).digest() for i in range(need))
        return 1.0 - 2.0 * np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[:d].astype(np.float64)

    k = np.arange(d, dtype=np.float64)
    basis = np.sqrt(2.0 / d) * np.cos(np.pi * (k[None, :] + 0.5) * k[:, None] / d)  # rows: DCT-II basis vectors
    basis[0] /= np.sqrt(2.0)
    rotation = (signs("a")[:, None] * basis.T) @ (signs("b")[:, None] * basis.T)
    return torch.from_numpy(rotation.astype(np.float32))


@dataclass
class VectorStore:
    """The bank's unit vectors: float16 rows, or int8 codes with a float32 scale per row.

    int8 (``from_float``): contextual hidden states are **anisotropic** — they share a large common direction
    (the mean of a SmolLM2 bank has norm ≈ 0.75) — and carry **massive activations**, a few dimensions hundreds
    of times larger than the rest (Sun et al. 2024). Both waste the levels of a per-row int8 code. So each row
    is first centred on the bank's mean (``mean`` [d]) and turned by a seeded orthogonal matrix
    (``structured_rotation(d, rotation)``, as QuaRot turns activations before quantizing them: every coordinate
    then carries a similar share of the row), then quantized by ``lens.kernels.lowbit.Int8Codec`` (per-row symmetric, round
    half to even); the row scale is then chosen so that the reconstruction ``mean + codes[r] · scales[r] ·
    rotationᵀ`` has unit norm, so a dot product is a cosine. On a SmolLM2 bank of 961,062 states this keeps
    0.98 of the float16 bank's top-5 neighbours of image-token queries (per-dimension scales alone: 0.97;
    ``lens bench search``). A query is turned once (``prepare``) and its dot product with the mean (``offset``,
    the same for every row) is added to the scores, so scoring reads only the codes. 8 + 32/d bits per value,
    + 4·d·(d + 1) bytes per bank.

    Banks saved before the rotation hold per-dimension scales instead (``dim_scales`` [d]: each dimension
    divided by its largest magnitude, smoothing in the manner of SmoothQuant; no mean, no rotation); they load
    and search as they always did.
    """

    kind: str
    data: np.ndarray  # [n, d] float16 or int8
    scales: np.ndarray | None = None  # [n] float32 (int8 only)
    dim_scales: np.ndarray | None = None  # [d] float32 (int8 banks saved before the rotation)
    mean: np.ndarray | None = None  # [d] float32 (int8)
    rotation: int | None = None  # the seed of structured_rotation (int8)

    @classmethod
    def from_float(cls, vectors: np.ndarray, kind: str = "float16", *, chunk_rows: int = 65536,
                   dim_scales: np.ndarray | None = None, mean: np.ndarray | None = None,
                   rotation: int | None = 0) -> "VectorStore":
        """Store unit vectors ``[n, d]`` as ``kind`` ("float16" or "int8").

        int8: centred on ``mean`` (default: the mean of ``vectors``) and turned by ``structured_rotation(d,
        rotation)``; with ``dim_scales`` given instead, the per-dimension layout of older banks.
        """
        if kind not in DTYPES:
            raise ConfigError(f"bank dtype must be one of {DTYPES}; got {kind!r}")
        vectors = np.asarray(vectors)
        if kind == "float16":
            return cls("float16", vectors.astype(np.float16, copy=False))
        from lens.kernels.lowbit import Int8Codec

        codec = Int8Codec()
        n, d = vectors.shape
        if dim_scales is None:
            if mean is None:
                total = np.zeros(d, dtype=np.float64)
                for start in range(0, n, chunk_rows):
                    total += np.asarray(vectors[start : start + chunk_rows], dtype=np.float64).sum(axis=0)
                mean = total / max(n, 1)
            mean = np.asarray(mean, dtype=np.float32)
            rotation = int(rotation or 0)
        else:
            mean = rotation = None
        store = cls("int8", np.empty((n, d), dtype=np.int8), np.empty(n, dtype=np.float32),
                    None if dim_scales is None else np.asarray(dim_scales, dtype=np.float32), mean, rotation)
        for start in range(0, n, chunk_rows):
            x = torch.from_numpy(np.ascontiguousarray(vectors[start : start + chunk_rows], dtype=np.float32))
            packed = codec.quantize(store._encode(x))
            codes = packed.data["codes"]
            v = store._decode(codes.float())  # the row's direction for a unit code scale, [m, d]
            store.data[start : start + len(x)] = codes.numpy()
            store.scales[start : start + len(x)] = store._unit_scale(v).numpy()
        return store

    # -- the transform: y = ((x − mean) / dim_scales) · rotation, each part optional -----------------------
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = x - torch.from_numpy(self.mean)
        if self.dim_scales is not None:
            x = x / torch.from_numpy(self.dim_scales)
        return x @ self.rotation_matrix if self.rotation is not None else x

    def _decode(self, y: torch.Tensor) -> torch.Tensor:
        """``y · rotationᵀ · dim_scales`` (without the mean)."""
        if self.rotation is not None:
            y = y @ self.rotation_matrix.T
        return y * torch.from_numpy(self.dim_scales) if self.dim_scales is not None else y

    def _unit_scale(self, v: torch.Tensor) -> torch.Tensor:
        """Per row, t ≥ 0 with |mean + t·v| = 1 (t = 1/|v| without a mean); 0 for a zero row."""
        a = v.double().square().sum(1)
        if self.mean is None:
            t = 1 / a.sqrt()
        else:
            m = torch.from_numpy(self.mean).double()
            b = 2 * (v.double() @ m)
            c = float(m @ m) - 1.0
            t = (-b + (b * b - 4 * a * c).clamp_min(0).sqrt()) / (2 * a)
        return torch.where(a > 0, t, torch.zeros_like(t)).float()

    def prepare(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries ``[q, d]`` (unit rows) as ``dot`` reads them: times ``dim_scales``, turned by ``rotation``."""
        if self.dim_scales is not None:
            queries = queries * torch.from_numpy(self.dim_scales)
        return queries @ self.rotation_matrix if self.rotation is not None else queries

    @property
    def rotation_matrix(self) -> torch.Tensor:
        """``structured_rotation(d, rotation)``, built once (4·d² bytes in memory, never stored)."""
        cached = self.__dict__.get("_rotation_matrix")
        if cached is None or cached[0] != (self.rotation, self.dim):
            cached = ((self.rotation, self.dim), structured_rotation(self.dim, int(self.rotation)))
            self.__dict__["_rotation_matrix"] = cached
        return cached[1]

    def offset(self, queries: torch.Tensor) -> torch.Tensor:
        """``[q]``: each query's dot product with ``mean`` — added to ``dot`` for every row (0 without a mean)."""
        return queries @ torch.from_numpy(self.mean) if self.mean is not None else torch.zeros(queries.shape[0])

    def dot(self, prepared: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``[q, stop − start]`` float32: prepared queries · rows ``start:stop`` (cosines after ``+ offset``)."""
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
        parts = (self.scales, self.dim_scales, self.mean)  # the rotation is rebuilt from its seed
        return int(self.data.nbytes + sum(a.nbytes for a in parts if a is not None))

    def _float(self, codes: np.ndarray, scales: np.ndarray | None) -> torch.Tensor:
        x = torch.from_numpy(codes).float()
        if scales is None:
            return x
        x = self._decode(x.mul_(torch.from_numpy(scales).unsqueeze(1)))
        return x + torch.from_numpy(self.mean) if self.mean is not None else x

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` as a float32 tensor ``[stop − start, d]``."""
        return self._float(self.data[start:stop], None if self.scales is None else self.scales[start:stop])

    def take(self, ids: np.ndarray) -> torch.Tensor:
        """Rows ``ids`` (any shape) as float32 ``[*ids.shape, d]``."""
        ids = np.asarray(ids, dtype=np.int64)
        flat = ids.reshape(-1)
        x = self._float(self.data[flat], None if self.scales is None else self.scales[flat])
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
        return VectorStore(self.kind, self.data[ids], None if self.scales is None else self.scales[ids],
                           self.dim_scales, self.mean, self.rotation)

    def transform_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The int8 layout's shared arrays for saving: ``int8.mean`` [d] float32 and ``int8.rotation_seed`` [1]
        int64 (``dim_scales`` [d] for the older layout)."""
        out = {}
        if self.dim_scales is not None:
            out[prefix + "dim_scales"] = np.asarray(self.dim_scales, dtype=np.float32)
        if self.mean is not None:
            out[prefix + "int8.mean"] = np.asarray(self.mean, dtype=np.float32)
        if self.rotation is not None:
            out[prefix + "int8.rotation_seed"] = np.asarray([self.rotation], dtype=np.int64)
        return out

    @classmethod
    def int8_from_arrays(cls, codes, scales, arrays: dict, prefix: str = "") -> "VectorStore":
        """The int8 store saved with ``transform_arrays(prefix)``."""
        seed = arrays.get(prefix + "int8.rotation_seed")
        return cls("int8", codes, scales, arrays.get(prefix + "dim_scales"), arrays.get(prefix + "int8.mean"),
                   None if seed is None else int(np.asarray(seed).reshape(-1)[0]))


def normalize_queries(queries) -> torch.Tensor:
    """Queries ``[q, d]`` (or ``[d]``) as L2-normalized float32 rows; zero rows stay zero. Raises ``ConfigError``
    for another shape, ``NumericalError`` for NaN or inf values."""
    q = torch.as_tensor(np.asarray(queries) if not isinstance(queries, torch.Tensor) else queries).float()
    if q.dim() == 1:
        q = q.unsqueeze(0)
    if q.dim() != 2:
        raise ConfigError(f"queries must be [n, d] or [d]; got shape {tuple(q.shape)}")
    bad = ~torch.isfinite(q).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise NumericalError(f"queries {rows[:8]}{' …' if len(rows) > 8 else ''} hold NaN or inf values; they have no "
                             "neighbours — drop those rows (or find where the model produced them)")
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
    shift = store.offset(q).unsqueeze(1)  # the mean's share of every cosine
    best_s = torch.full((q.shape[0], 0), -torch.inf)
    best_i = torch.full((q.shape[0], 0), -1, dtype=torch.long)
    for start, stop in ranges:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            scores = store.dot(prepared, a, b).add_(shift)
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
    ``int8(q) · codes[r] · scales[r]`` (the query's own scale and its ``offset`` are constants per query and are
    left out): ids
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
