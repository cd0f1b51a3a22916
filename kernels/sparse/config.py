"""``SparseConfig``: the parameters of block-sparse attention (SpargeAttention, Zhang et al. 2025).

Definitions: docs/definitions.md "Sparse attention".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

MODES = ("topk", "topp", "hybrid", "streaming")

# Block sizes must be multiples of this. FlexAttention's Triton kernel walks a sparse block with tiles of
# BLOCK_M query rows and BLOCK_N key rows and statically asserts SPARSE_Q_BLOCK_SIZE % BLOCK_M == 0 and
# SPARSE_KV_BLOCK_SIZE % BLOCK_N == 0 (flex_attention.py.jinja); the tiles are powers of two and at least
# 16 (tl.dot's minimum). A multiple of 16 is therefore the weakest condition under which *some* legal tile
# divides the block, and kernels.sparse picks that tile explicitly on GPU. The CPU (Inductor C++) kernel
# uses the sparse blocks themselves as its tiles, where multiples of 16 keep the 16-lane fp32 vectors full.
BLOCK_MULTIPLE = 16


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class SparseConfig:
    """How block-sparse attention chooses its blocks (docs/definitions.md#sparse-attention).

    ``mode``: ``"topk"``, ``"topp"``, ``"hybrid"`` (union of both) or ``"streaming"`` (StreamingLLM:
    sink tokens + a recent window, no scoring; build it with :meth:`streaming`).
    ``topk``: fraction in (0, 1] of the key blocks the base mask allows for a query block; at least one
    block is kept (``ceil(topk · allowed)``).
    ``topp``: cumulative block probability in (0, 1] to reach.
    ``block_q`` / ``block_k``: query / key rows per block, positive multiples of 16.
    ``sim_threshold``: in [-1, 1]; blocks whose mean pairwise cosine is below it are always computed.
    -1 disables the check (a mean pairwise cosine is never below -1) and skips its cost.
    ``keep_sink_block``: always keep the first key block the base mask allows (the attention sink).
    ``local_blocks``: ``w >= 0``; keep the key blocks within ``w`` blocks of the diagonal (``w = 1`` keeps
    exactly the blocks the diagonal crosses, which guarantees every causal query row at least itself).
    ``linear_fallback``: approximate the skipped blocks with linear attention instead of dropping them
    (SLA-style; see ``kernels.sparse``).
    ``sink_tokens`` / ``window``: token counts used only by the streaming mode.

    Example::

        cfg = SparseConfig(mode="hybrid", topk=0.1, topp=0.9)          # defaults: blocks 128 x 64
        SparseConfig(topk=0)                                           # ConfigError: topk must be in (0, 1]
        SparseConfig.streaming(sink_tokens=4, window=1024).describe()["mode"]   # 'streaming'
    """

    mode: str = "hybrid"
    topk: float = 0.1
    topp: float = 0.9
    block_q: int = 128
    block_k: int = 64
    sim_threshold: float = -1.0
    keep_sink_block: bool = True
    local_blocks: int = 1
    linear_fallback: bool = False
    sink_tokens: int = 4
    window: int = 1024

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"SparseConfig.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        for name in ("topk", "topp"):
            value = getattr(self, name)
            if not _is_real(value) or not (0.0 < value <= 1.0):
                what = "a fraction of the allowed key blocks" if name == "topk" else "a cumulative block probability"
                raise ConfigError(f"SparseConfig.{name} must be in (0, 1] ({what}); got {value!r}")
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0 or value % BLOCK_MULTIPLE:
                raise ConfigError(
                    f"SparseConfig.{name} must be a positive multiple of {BLOCK_MULTIPLE} (16, 32, 48, ...): "
                    f"FlexAttention tiles each sparse block with power-of-two tiles of at least 16 rows, which "
                    f"must divide the block; got {value!r}"
                )
        if not _is_real(self.sim_threshold) or not (-1.0 <= self.sim_threshold <= 1.0):
            raise ConfigError(
                f"SparseConfig.sim_threshold must be in [-1, 1] (a mean cosine similarity); got {self.sim_threshold!r}"
            )
        for name in ("keep_sink_block", "linear_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"SparseConfig.{name} must be True or False; got {getattr(self, name)!r}")
        if not _is_int(self.local_blocks) or self.local_blocks < 0:
            raise ConfigError(f"SparseConfig.local_blocks must be an integer >= 0; got {self.local_blocks!r}")
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            raise ConfigError(f"SparseConfig.sink_tokens must be an integer >= 0; got {self.sink_tokens!r}")
        if not _is_int(self.window) or self.window < 1:
            raise ConfigError(f"SparseConfig.window must be an integer >= 1 (tokens); got {self.window!r}")

    @classmethod
    def streaming(
        cls, sink_tokens: int = 4, window: int = 1024, *, block_q: int = 128, block_k: int = 64,
        linear_fallback: bool = False,
    ) -> SparseConfig:
        """StreamingLLM preset (docs/definitions.md): the first ``sink_tokens`` keys plus a window of recent keys.

        A query at position ``q`` (bottom-right aligned, as in causal attention with a cache) keeps key
        ``k`` when ``k < sink_tokens`` or ``|q − k| < window``, intersected with the base mask — so for a
        causal model exactly the keys ``q − window < k ≤ q``. Nothing is scored; the kernel computes the
        blocks this pattern touches and masks the rest of them element by element.

        Example: ``SparseConfig.streaming(sink_tokens=4, window=256).mode`` → ``'streaming'``.
        """
        return cls(
            mode="streaming", sink_tokens=sink_tokens, window=window, block_q=block_q, block_k=block_k,
            keep_sink_block=False, local_blocks=0, linear_fallback=linear_fallback,
        )

    def describe(self) -> dict:
        """A short JSON-able description for run provenance.

        Example: ``SparseConfig().describe()`` → ``{'kind': 'sparse', 'mode': 'hybrid', 'topk': 0.1, ...}``.
        """
        out = {"kind": "sparse", "mode": self.mode, "block_q": self.block_q, "block_k": self.block_k}
        if self.mode == "streaming":
            out.update(sink_tokens=self.sink_tokens, window=self.window)
        else:
            if self.mode in ("topk", "hybrid"):
                out["topk"] = self.topk
            if self.mode in ("topp", "hybrid"):
                out["topp"] = self.topp
            out.update(
                sim_threshold=self.sim_threshold, keep_sink_block=self.keep_sink_block,
                local_blocks=self.local_blocks,
            )
        out["linear_fallback"] = self.linear_fallback
        return out




