"""Block-sparse attention (pure torch): selection, execution, an eager reference, and statistics.

Definitions: docs/definitions.md "Sparse attention" (SpargeAttention, Zhang et al. 2025).

| module | what it holds |
|---|---|
| ``config`` | ``SparseConfig`` and the selection modes |
| ``masks`` | the model's own (*base*) mask analysed once: causal, padding or general; allowed blocks |
| ``selection`` | pooling, block scores, top-k / top-p / hybrid / streaming selection → ``BlockSelection`` |
| ``flex`` | execution with compiled FlexAttention over a ``BlockMask`` built from the kept blocks |
| ``linear`` | the SLA-style linear branch for skipped blocks |
| ``execute`` | the public entry points: ``sparse_attention``, its reference, ``…_with_stats`` |

Everything public is re-exported here::

    cfg = SparseConfig(mode="hybrid", topk=0.1, topp=0.9)
    sel = select_blocks(q, k, cfg, attention_mask=mask, is_causal=causal, scale=scale)
    out = sparse_attention(q, k, v, sel, attention_mask=mask, is_causal=causal, scale=scale)
    out, stats = sparse_attention_with_stats(q, k, v, sel, attention_mask=mask, is_causal=causal, scale=scale)
"""

from .config import MODES, SparseConfig
from .execute import sparse_attention, sparse_attention_with_stats
from .linear import linear_mix_weight
from .reference import sparse_attention_reference, sparse_element_mask
from .selection import BlockSelection, make_selection, select_blocks

__all__ = [
    "MODES",
    "SparseConfig",
    "BlockSelection",
    "select_blocks",
    "make_selection",
    "sparse_attention",
    "sparse_attention_reference",
    "sparse_attention_with_stats",
    "sparse_element_mask",
    "linear_mix_weight",
]
