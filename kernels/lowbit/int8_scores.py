"""Integer dot products of many int8 rows against one fixed set of int8 queries — the inner loop of a
brute-force int8 nearest-neighbour scan (``lens.analysis.search.refine_topk``).

Why hand-written: the queries are the same for every block of rows, so they are the GEMM's *weights*. oneDNN
(shipped inside every x86 build of torch, the kernel torch's own int8 inference path uses) packs them once into
its blocked layout and then streams the rows through VNNI or AMX tiles; ``torch._int_mm`` re-packs both operands
on every call and runs 2.5–3× slower on the same blocks (``lens bench search``). FAISS's 8-bit scalar quantizer
decodes one vector at a time instead of running a GEMM. Where oneDNN's op is missing (non-x86 builds) or
refuses the operands, ``torch._int_mm`` computes the same integers.

Example::

    q = torch.randint(-127, 128, (3, 64), dtype=torch.int8)
    scorer = Int8QueryScorer(q)
    rows = torch.randint(-127, 128, (10, 64), dtype=torch.int8)
    scorer.scores(rows)            # [10, 3] float32, equal to (rows.int() @ q.int().T).float()
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

__all__ = ["Int8QueryScorer"]

EXACT_DIM = (2**24) // (128 * 128)  # ≤ 1024 dimensions: every int32 dot product is exact in float32
_VERIFIED: dict[int, bool] = {}  # per dimension: did oneDNN's op give the exact integers on a probe (checked once)


class Int8QueryScorer:
    """Scores int8 rows ``[n, d]`` against int8 queries ``[q, d]``: ``rows · queriesᵀ`` as float32 ``[n, q]``.

    The values are the exact int32 dot products whenever ``d ≤ 1024`` (then |dot| ≤ 2²⁴ and float32 holds it);
    above that they are rounded to float32 (relative error ≤ 6·10⁻⁸). ``backend`` says which kernel runs:
    "onednn" (the queries pre-packed once) or "int_mm" (``torch._int_mm``). Raises ``ConfigError`` for
    non-int8 or mismatched operands.
    """

    def __init__(self, queries: torch.Tensor, *, backend: str | None = None):
        if queries.dtype != torch.int8 or queries.dim() != 2:
            raise ConfigError(f"queries must be an int8 [q, d] tensor; got {queries.dtype} {tuple(queries.shape)}")
        self.queries = queries.contiguous()
        self.q, self.dim = queries.shape
        self._packed = None
        self.backend = "int_mm"
        if backend in (None, "onednn"):
            self._packed = self._prepack()
            if self._packed is not None:
                self.backend = "onednn"
            elif backend == "onednn":
                raise ConfigError("oneDNN's int8 linear is not available in this torch build; use backend='int_mm'")
        elif backend != "int_mm":
            raise ConfigError(f"backend must be 'onednn', 'int_mm' or None; got {backend!r}")

    def _prepack(self):
        op = getattr(getattr(torch.ops, "onednn", None), "qlinear_prepack", None)
        if op is None or not torch.backends.mkldnn.is_available() or _VERIFIED.get(self.dim) is False:
            return None
        try:
            packed = op(self.queries, None)
            self._ones = torch.ones(self.q)
            self._zeros = torch.zeros(self.q, dtype=torch.long)
            if self.dim not in _VERIFIED:  # once per process and dimension: the op must give the exact integers
                probe = torch.arange(-128, 128, dtype=torch.int8).repeat(1 + self.dim // 256)[: self.dim]
                probe = torch.stack([probe, -probe.clamp_min(-127), torch.zeros_like(probe)])
                want = (probe.to(torch.int64) @ self.queries.to(torch.int64).T).to(torch.float32)
                _VERIFIED[self.dim] = bool(torch.equal(self._onednn(probe, packed), want))
            return packed if _VERIFIED[self.dim] else None
        except (RuntimeError, NotImplementedError, AttributeError, TypeError):
            _VERIFIED[self.dim] = False
            return None

    def _onednn(self, rows: torch.Tensor, packed) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(rows, 1.0, 0, packed, self._ones, self._zeros, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    def scores(self, rows: torch.Tensor) -> torch.Tensor:
        """``[n, q]`` float32 dot products of int8 ``rows`` ``[n, d]`` with the queries."""
        if rows.dtype != torch.int8 or rows.dim() != 2 or rows.shape[1] != self.dim:
            raise ConfigError(f"rows must be int8 [n, {self.dim}]; got {rows.dtype} {tuple(rows.shape)}")
        rows = rows.contiguous()
        if self._packed is not None:
            return self._onednn(rows, self._packed)
        if rows.shape[0] == 0:
            return torch.zeros((0, self.q))
        return torch._int_mm(rows, self.queries.T.contiguous()).float()
