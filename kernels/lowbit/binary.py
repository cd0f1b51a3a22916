"""Sub-1-bit binary low-rank weights (NanoQuant-style): W ~ diag(s1) (U V^T) diag(s2) with sign matrices U, V.
"""


from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .packing import PackedWeight, _check_weight, pack_bits, unpack_bits

# ----------------------------------------------------------------------------------------------------
# Sub-1-bit binary low-rank
# ----------------------------------------------------------------------------------------------------


def _sign(x: torch.Tensor) -> torch.Tensor:
    # sign(0) would drop a rank-1 term; +1 keeps every entry of U, V in {±1} deterministically.
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


class BinaryLowRankCodec:
    """Sub-1-bit binary low-rank, NanoQuant-style (docs/definitions.md): ``W ≈ diag(s1) · (U Vᵀ) · diag(s2)``,
    ``U ∈ {±1}^{out×r}``, ``V ∈ {±1}^{in×r}``, ``s1``, ``s2`` stored in fp16.

    Bits/weight = ``(ceil(out·r/8) + ceil(in·r/8)) · 8 / (out·in) + 16 (out + in) / (out·in)``; with a
    budget ``bits`` the rank is the largest ``r ≥ 1`` whose rate fits (``r = 1`` if none does — then the
    measured rate exceeds the budget, which :meth:`PackedWeight.bits_per_weight` reports honestly).

    Fit (deterministic; ``seed`` only drives the randomized SVD used when ``min(out, in) > 1024``):

    1. *Init*: ``s1 = mean_j |W_ij|``, ``s2 = mean_i |W_ij| / mean |W|`` (a rank-1 fit of ``|W|``);
       truncated SVD of ``W / (s1 s2ᵀ)`` → ``U, V = sign`` of the leading singular vectors scaled by
       ``√σ``; then the scales by least squares.
    2. *Sweeps* (``iters``, default 6): for each rank component k, the exact minimizer over the signs of
       column ``U[:, k]`` with everything else fixed is ``sign(s1 ⊙ (R_k (v_k ⊙ s2)))`` where ``R_k`` is the
       residual without component k — then the same for ``V[:, k]`` — so each update never increases
       ``‖W − Ŵ‖²``; after the sweep ``s1`` and ``s2`` are refit by closed-form least squares
       (``s1_i = ⟨W_i, P_i⟩ / ‖P_i‖²`` with ``P = U Vᵀ diag(s2)``, and symmetrically for ``s2``).
    3. The scales are rounded to fp16 and ``s2`` is refit once against the rounded ``s1``.

    The ADMM initialisation and block reconstruction of the NanoQuant paper are not implemented
    (ADMM is optional in docs/definitions.md#sub-1-bit-binary-low-rank); this is the data-free weight-space fit.

    Example::

        c = BinaryLowRankCodec(bits=0.8)
        p = c.quantize(torch.randn(384, 1536))
        p.meta["rank"], p.bits_per_weight()    # 229, ≈ 0.80
    """

    scheme = "binary-lowrank"

    def __init__(self, bits: float | None = 0.8, rank: int | None = None, iters: int = 6, seed: int = 0):
        if rank is None and (bits is None or not (0 < bits <= 2)):
            raise ConfigError(f"binary-lowrank: bits budget must be in (0, 2], got {bits}")
        if rank is not None and rank < 1:
            raise ConfigError(f"binary-lowrank: rank must be ≥ 1, got {rank}")
        if iters < 0:
            raise ConfigError(f"binary-lowrank: iters must be ≥ 0, got {iters}")
        self.bits, self.rank, self.iters, self.seed = bits, rank, int(iters), int(seed)

    @staticmethod
    def storage_bits(out: int, inp: int, rank: int) -> int:
        """Stored bits of a rank-``rank`` factorization of an ``out × in`` weight (docs/benchmarks.md).

        Example: ``BinaryLowRankCodec.storage_bits(384, 1536, 229)`` → ``8 · (10992 + 43968) + 16 · 1920``.
        """
        return 8 * (math.ceil(out * rank / 8) + math.ceil(inp * rank / 8)) + 16 * (out + inp)

    @classmethod
    def rank_for_budget(cls, out: int, inp: int, bits: float) -> int:
        """Largest rank whose storage fits ``bits`` per weight (at least 1) (docs/definitions.md).

        Example: ``BinaryLowRankCodec.rank_for_budget(384, 1536, 0.8)`` → ``229``.
        """
        budget = bits * out * inp
        r = max(1, int((budget - 16 * (out + inp)) // (out + inp)))
        while r > 1 and cls.storage_bits(out, inp, r) > budget:
            r -= 1
        return r

    def quantize(self, w: torch.Tensor) -> PackedWeight:
        """Fit and pack; see the class docstring for the algorithm (docs/definitions.md).

        Example: ``BinaryLowRankCodec(rank=8).quantize(torch.randn(64, 64)).meta["rank"]`` → ``8``.
        """
        w = _check_weight(w, self.scheme)
        out, inp = w.shape
        r = self.rank if self.rank is not None else self.rank_for_budget(out, inp, self.bits)
        u, v, s1, s2 = self._fit(w, r)
        data = {"u_bits": pack_bits(u > 0), "v_bits": pack_bits(v > 0),
                "s1": s1.to(torch.float16), "s2": s2.to(torch.float16)}
        return PackedWeight(self.scheme, (out, inp), data, {"rank": r, "iters": self.iters, "seed": self.seed})

    # -- fitting ------------------------------------------------------------------------------------

    def _svd(self, m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if min(m.shape) > 1024 and r < min(m.shape) // 2:
            # A full SVD of a large layer costs O(n³); the randomized one is seeded so the fit stays
            # reproducible.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                a, s, b = torch.svd_lowrank(m, q=min(min(m.shape), r + 16), niter=4)
            return a[:, :r], s[:r], b[:, :r]
        a, s, bh = torch.linalg.svd(m, full_matrices=False)
        return a[:, :r], s[:r], bh[:r].T

    @staticmethod
    def _fit_s1(w, u, v, s2):
        p = (u @ v.T) * s2
        return (w * p).sum(1) / (p * p).sum(1).clamp_min(1e-30)

    @staticmethod
    def _fit_s2(w, u, v, s1):
        p = s1.unsqueeze(1) * (u @ v.T)
        return (w * p).sum(0) / (p * p).sum(0).clamp_min(1e-30)

    def _fit(self, w: torch.Tensor, r: int):
        out, inp = w.shape
        a = w.abs()
        tiny = torch.finfo(torch.float32).tiny
        s1 = a.mean(1).clamp_min(tiny)
        s2 = (a.mean(0) / a.mean().clamp_min(tiny)).clamp_min(tiny)
        k = min(r, out, inp)
        left, sv, right = self._svd(w / s1.unsqueeze(1) / s2, k)
        root = sv.clamp_min(0).sqrt()
        u = torch.ones(out, r)
        v = torch.ones(inp, r)
        u[:, :k] = _sign(left * root)
        v[:, :k] = _sign(right * root)
        if r > k:
            # Ranks beyond min(out, in) add no new directions; alternate signs so they start useful.
            u[:, k:] = _sign(torch.arange(out, dtype=torch.float32).unsqueeze(1) % 2 - 0.5)
        for _ in range(2):
            s1 = self._fit_s1(w, u, v, s2)
            s2 = self._fit_s2(w, u, v, s1)
        for _ in range(self.iters):
            resid = w - s1.unsqueeze(1) * (u @ v.T) * s2
            n1, n2 = (s1 * s1).sum(), (s2 * s2).sum()
            for j in range(r):
                uj, vj = u[:, j], v[:, j]
                a, b = s1 * uj, s2 * vj
                # R_k = R + a bᵀ is never formed: R_k (s2 ⊙ v) = R b + a ‖s2‖² (v ⊙ v = 1), and likewise
                # for the V step, so one sweep costs two mat-vecs and at most one rank-2 update per k.
                new_u = _sign(s1 * (resid @ b + a * n2))
                a_new = s1 * new_u
                new_v = _sign(s2 * (resid.T @ a_new + b * (a * a_new).sum()))
                if torch.equal(new_u, uj) and torch.equal(new_v, vj):
                    continue
                b_new = s2 * new_v
                resid.addmm_(torch.stack((a, a_new), 1), torch.stack((b, -b_new), 0))
                u[:, j], v[:, j] = new_u, new_v
            s1 = self._fit_s1(w, u, v, s2)
            s2 = self._fit_s2(w, u, v, s1)
        s1 = s1.to(torch.float16).to(torch.float32)
        s2 = self._fit_s2(w, u, v, s1)
        return u, v, s1, s2

    # -- decoding -----------------------------------------------------------------------------------

    @staticmethod
    def factors(p: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, V, s1, s2)`` as float32 (``U``: ``[out, r]``, ``V``: ``[in, r]`` in {±1}) (docs/definitions.md).

        Example: ``U, V, s1, s2 = BinaryLowRankCodec.factors(p)``; ``(s1[:, None] * U) @ (s2[:, None] * V).T``
        is the dequantized weight.
        """
        out, inp = p.shape
        r = p.meta["rank"]
        u = unpack_bits(p.data["u_bits"], out * r).view(out, r).to(torch.float32) * 2 - 1
        v = unpack_bits(p.data["v_bits"], inp * r).view(inp, r).to(torch.float32) * 2 - 1
        return u, v, p.data["s1"].to(torch.float32), p.data["s2"].to(torch.float32)

    def dequantize(self, p: PackedWeight) -> torch.Tensor:
        """``diag(s1) · U Vᵀ · diag(s2)``, float32 (docs/definitions.md).

        Example: ``BinaryLowRankCodec(rank=4).dequantize(p).shape`` → ``p.shape``.
        """
        u, v, s1, s2 = self.factors(p)
        return s1.unsqueeze(1) * (u @ v.T) * s2




