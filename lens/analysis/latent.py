"""LatentLens (docs/definitions.md, "Visual tokens / LatentLens"; Krojer et al. 2026): what a hidden state means,
read as its nearest contextual text tokens in a ``lens.TextBank``.

``Neighbours`` is the result of ``TextBank.search``: per query the global top-k bank entries (merged over the
bank layers) with their token, sentence, position, bank layer and cosine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Neighbours"]


@dataclass(repr=False)
class Neighbours:
    """Top-k bank entries per query: ``scores`` float32 ``[q, k]`` (cosine, descending) and ``ids`` int64
    ``[q, k]`` (bank rows; ties broken by smaller row), found by ``method`` ("exact", "refine" or "approximate")."""

    bank: object
    scores: np.ndarray
    ids: np.ndarray
    method: str = "exact"

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def tokens(self) -> list[list[str]]:
        """The neighbours' token strings, ``[q][k]``."""
        flat = self.bank.token(self.ids.reshape(-1))
        return [flat[i * self.k : (i + 1) * self.k] for i in range(len(self))]

    def to_frame(self):
        """One row per (query, rank): ``query``, ``rank`` (0 = nearest), ``cosine``, ``token``, ``token_id``,
        ``bank_layer``, ``sentence``, ``position``, ``context`` (the sentence with the token in [[ ]])."""
        import pandas as pd

        ids = self.ids.reshape(-1)
        bank = self.bank
        return pd.DataFrame({
            "query": np.repeat(np.arange(len(self)), self.k),
            "rank": np.tile(np.arange(self.k), len(self)),
            "cosine": self.scores.reshape(-1),
            "token": bank.token(ids),
            "token_id": bank.token_id[ids],
            "bank_layer": bank.layer[ids],
            "sentence": bank.sentence[ids],
            "position": bank.position[ids],
            "context": [bank.context(int(r)) for r in ids],
        })

    def __repr__(self) -> str:
        first = ", ".join(repr(t) for t in self.tokens()[0]) if len(self) else ""
        return f"Neighbours({len(self)} queries, k={self.k}, {self.method}; query 0: [{first}])"
