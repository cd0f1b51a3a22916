"""Reservoir sampling per token type, for text banks (docs/definitions.md, "Visual tokens / LatentLens").

One ``TypeReservoirs`` holds, for one residual layer, at most ``cap`` contexts of every token type seen in a
stream of tokens: Algorithm R (Vitter 1985) run independently per type — the i-th occurrence of a type
(1-based) fills slot i − 1 while i ≤ cap, and afterwards replaces slot ⌊u·i⌋ when that is < cap (u uniform
in [0, 1)), so that every occurrence ends in the reservoir with the same probability cap / n. One uniform
draw is consumed per occurrence, in stream order, from the reservoir's own generator: the sample depends on
the seed and the stream only, never on how the stream was cut into chunks.

Duplicates: a causal model gives two identical prefixes bit-identical hidden states, so a corpus with many
sentences starting "The …" would fill the reservoir of "The" with copies of one vector. An occurrence whose
context key (a hash of its prefix, or of its whole sequence for a bidirectional model) equals that of an
entry currently held for its type does not enter (it still counts as an occurrence).

``cap=None`` keeps every (non-duplicate) occurrence.

Memory: vectors are kept in float16, ``cap`` rows per type seen (at most ``cap × types × d × 2`` bytes per
layer), plus 24 bytes of bookkeeping per row; nothing grows with the length of the stream.

Example::

    res = TypeReservoirs(d=4, cap=2, seed=[0, 3])
    res.add(types=np.array([7, 7, 7]), keys=np.array([1, 2, 3], np.uint64), vectors=np.eye(3, 4, dtype=np.float32),
            sentence=np.array([0, 0, 1]), position=np.array([1, 2, 1]))
    rows = res.finish()            # dict of arrays, at most 2 rows of type 7
"""

from __future__ import annotations

import numpy as np

__all__ = ["TypeReservoirs"]


class TypeReservoirs:
    """At most ``cap`` contexts per token type (None: all), sampled uniformly, deterministic by ``seed``."""

    def __init__(self, d: int, cap: int | None, seed, *, initial_rows: int = 4096):
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be ≥ 1 or None; got {cap}")
        self.d = int(d)
        self.cap = cap
        self.rng = np.random.default_rng(seed)
        n = max(int(initial_rows), 1)
        self.vectors = np.zeros((n, self.d), dtype=np.float16)
        self.type_of = np.full(n, -1, dtype=np.int64)
        self.key = np.zeros(n, dtype=np.uint64)
        self.sentence = np.full(n, -1, dtype=np.int64)
        self.position = np.full(n, -1, dtype=np.int32)
        self.used = 0  # rows handed out so far
        self.count: dict[int, int] = {}  # occurrences seen per type
        self.base: dict[int, int] = {}  # first row of a type's block (cap is not None)
        self.rows_of: dict[int, list[int]] = {}  # rows of a type (cap is None)
        self.held: dict[int, dict[int, int]] = {}  # type → {context key: slot}
        self.occurrences = 0
        self.duplicates = 0

    # -- storage -----------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= len(self.type_of):
            return
        size = max(need, 2 * len(self.type_of))
        for name, fill in (("vectors", 0), ("type_of", -1), ("key", 0), ("sentence", -1), ("position", -1)):
            old = getattr(self, name)
            new = np.full((size,) + old.shape[1:], fill, dtype=old.dtype)
            new[: len(old)] = old
            setattr(self, name, new)

    def _row(self, t: int, slot: int) -> int:
        if self.cap is None:
            rows = self.rows_of.setdefault(t, [])
            if slot == len(rows):
                self._grow(self.used + 1)
                rows.append(self.used)
                self.used += 1
            return rows[slot]
        base = self.base.get(t)
        if base is None:
            self._grow(self.used + self.cap)
            base = self.base[t] = self.used
            self.used += self.cap
        return base + slot

    # -- streaming ---------------------------------------------------------------------------------
    def add(self, types: np.ndarray, keys: np.ndarray, vectors: np.ndarray, sentence: np.ndarray,
            position: np.ndarray) -> None:
        """Offer a chunk of occurrences, in stream order.

        ``types`` [n] int (token ids), ``keys`` [n] uint64 context keys, ``vectors`` [n, d] float (stored as
        float16: pass them L2-normalized), ``sentence`` [n] int, ``position`` [n] int.
        """
        n = len(types)
        if n == 0:
            return
        types = np.asarray(types, dtype=np.int64)
        u = self.rng.random(n)  # one draw per occurrence, in stream order
        # occurrence number (1-based) of each item within its type, over the whole stream
        order = np.argsort(types, kind="stable")
        sorted_types = types[order]
        starts = np.flatnonzero(np.r_[True, sorted_types[1:] != sorted_types[:-1]])
        group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, n]))
        rank = np.arange(n) - starts[group]
        before = np.array([self.count.get(int(t), 0) for t in sorted_types[starts]], dtype=np.int64)
        occurrence = np.empty(n, dtype=np.int64)
        occurrence[order] = before[group] + rank + 1
        for t, c, size in zip(sorted_types[starts].tolist(), before.tolist(), np.diff(np.r_[starts, n]).tolist()):
            self.count[t] = c + size
        self.occurrences += n
        if self.cap is None:
            slot = occurrence - 1
            candidate = np.ones(n, dtype=bool)
        else:
            slot = np.where(occurrence <= self.cap, occurrence - 1, np.floor(u * occurrence).astype(np.int64))
            candidate = slot < self.cap
        # Decide sequentially (later occurrences may evict earlier ones of the same chunk), write once at the end.
        writes: dict[int, int] = {}  # row → item index, the last one wins
        keys = np.asarray(keys, dtype=np.uint64)
        for i in np.flatnonzero(candidate).tolist():
            t = int(types[i])
            key = int(keys[i])
            held = self.held.setdefault(t, {})
            if key in held:
                self.duplicates += 1
                continue
            # no cap: every new context takes the next row (skipped duplicates leave no gap)
            s = len(self.rows_of.get(t, ())) if self.cap is None else int(slot[i])
            row = self._row(t, s)
            old = int(self.key[row]) if self.type_of[row] >= 0 else None
            if old is not None and held.get(old) == s:
                del held[old]
            held[key] = s
            self.key[row] = key
            self.type_of[row] = t
            writes[row] = i
        if writes:
            rows = np.fromiter(writes.keys(), dtype=np.int64, count=len(writes))
            items = np.fromiter(writes.values(), dtype=np.int64, count=len(writes))
            self.vectors[rows] = np.asarray(vectors)[items].astype(np.float16)
            self.sentence[rows] = np.asarray(sentence)[items]
            self.position[rows] = np.asarray(position)[items]

    def sentences_held(self) -> np.ndarray:
        """The sentence ids referenced by the entries currently held (sorted, unique)."""
        live = self.type_of[: self.used] >= 0
        return np.unique(self.sentence[: self.used][live])

    def finish(self) -> dict[str, np.ndarray]:
        """The held entries in a canonical order — token type, then sentence, then position — as arrays
        ``token_id`` [n] int64, ``sentence`` [n] int64, ``position`` [n] int32, ``vectors`` [n, d] float16."""
        live = np.flatnonzero(self.type_of[: self.used] >= 0)
        order = live[np.lexsort((self.position[live], self.sentence[live], self.type_of[live]))]
        return {
            "token_id": self.type_of[order],
            "sentence": self.sentence[order],
            "position": self.position[order],
            "vectors": self.vectors[order],
        }

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, n).nbytes for n in ("vectors", "type_of", "key", "sentence", "position"))
