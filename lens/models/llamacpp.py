"""llama.cpp's CPU numerics, emulated where they change a model's outputs: the attention kernel.

``lens.load(file.gguf, quant="keep", activations="llama.cpp")`` runs a GGUF model the way llama.cpp's CPU
backend does: the linear layers quantize their input rows to the weight type's ``vec_dot_type`` (Q8_0, Q8_1,
Q8_K) before an integer dot product (``lens.kernels.lowbit``'s ``activations="llama.cpp"``), and attention runs
on llama.cpp's default **f16 KV cache** without flash attention (llama-cpp-python's default ``flash_attn=False``),
which this module's kernel reproduces:

* K and V are stored in the cache as f16 (``type_k = type_v = GGML_TYPE_F16``);
* ``KQ = K·Q`` is ``ggml_mul_mat`` with an f16 ``src0``, so the f32 queries are converted to f16 (the f16
  type's ``vec_dot_type``) and the dot products accumulate in f32; the scale and mask enter in
  ``ggml_soft_max_ext``, in f32;
* ``KQV = V·softmax(KQ)`` is again an f16 ``mul_mat``: the f32 probabilities are converted to f16 first.

So: round Q, K and V to f16, compute scores and softmax in f32, round the probabilities to f16, multiply
by V in f32. Checked against llama.cpp's own intermediate tensors (captured with its eval callback): given
the same Q, K and V, this reproduces its attention output to ~5·10⁻⁸ relative, where plain f32 attention is
~2·10⁻⁴ away.
"""

from __future__ import annotations

from typing import Any

import torch
from lens.kernels.attention import attention_with_stats

__all__ = ["LlamaCppAttention", "LLAMA_CPP"]

#: the value of ``activations=`` that selects llama.cpp's numerics
LLAMA_CPP = "llama.cpp"


class LlamaCppAttention:
    """Dense attention as llama.cpp's CPU backend computes it with its f16 KV cache (no flash attention).

    A lens attention kernel (``lens.models.attention.AttentionKernel``): Q, K and V rounded to ``kv_dtype``,
    scores and softmax in float32, the probabilities rounded to ``kv_dtype`` before ``P·V``. While traced,
    the statistics are those of the rounded probabilities. Used by ``lens.load(..., activations="llama.cpp")``
    and recorded in provenance (``"kv_cache": "f16"``).

    Example::

        lm = lens.load("model.gguf", quant="keep", activations="llama.cpp")
        lm.attention_kernel.describe()["kv_cache"]     # 'f16'
    """

    name = "llama.cpp"

    def __init__(self, kv_dtype: torch.dtype = torch.float16):
        self.kv_dtype = kv_dtype

    def __call__(self, module, query, key, value, attention_mask, *, is_causal, scale, softcap, pattern_heads,
                 with_stats):
        dtype = query.dtype if query.dtype == torch.float64 else torch.float32
        q = query.to(self.kv_dtype).to(dtype)
        k = key.to(self.kv_dtype).to(dtype)
        v = value.to(self.kv_dtype).to(dtype)
        out, stats = attention_with_stats(
            q, k, v, attention_mask=attention_mask, is_causal=is_causal, scale=scale, softcap=softcap,
            pattern_heads=pattern_heads if with_stats else (), probs_dtype=self.kv_dtype,
        )
        return out.to(query.dtype), (stats if with_stats else None)

    def describe(self) -> dict[str, Any]:
        kv = str(self.kv_dtype).replace("torch.", "").replace("float16", "f16").replace("bfloat16", "bf16")
        return {
            "kind": "dense",
            "kernel": "llama.cpp CPU attention (no flash attention): Q, K, V and softmax(QK) rounded to "
                      f"{kv} as its {kv} KV cache and {kv} dot products do",
            "kv_cache": kv,
        }

    def __repr__(self) -> str:
        return f"LlamaCppAttention(kv_dtype={self.kv_dtype})"
