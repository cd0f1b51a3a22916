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
from torch import nn

__all__ = ["LlamaCppAttention", "GGMLRMSNorm", "use_ggml_norms", "LLAMA_CPP", "coarsen", "coarsened_kl",
           "load_reference"]

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


class GGMLRMSNorm(nn.Module):
    """RMSNorm as ggml's ``rms_norm`` and the following ``mul`` compute it (ggml-cpu/ops.cpp): the squares
    summed in double, ``mean`` cast to float, ``scale = 1.0f / sqrtf(mean + eps)``, ``y = x · scale · w``.

    transformers sums the squares in float32 and uses ``rsqrt``: the results differ in the last bits, which
    is invisible in a float model but decides ties when the next matmul quantizes its input (llama.cpp's
    Q8 activations), so the emulation follows ggml here too. Shares the wrapped norm's weight.
    ``offset=1`` for Gemma's norms, whose weight is stored as ``w − 1`` (llama.cpp keeps ``w``).
    """

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = weight
        self.eps = float(eps)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        mean = ((xf * xf).double().sum(-1, keepdim=True) / xf.shape[-1]).float()
        root = torch.sqrt(mean + self.eps)
        scale = torch.ones_like(root) / root  # a true division, like 1.0f / sqrtf(...)
        weight = self.weight.float() + self.offset if self.offset else self.weight.float()
        return ((xf * scale) * weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps:g}" + (f", offset={self.offset:g}" if self.offset else "")


def use_ggml_norms(model: nn.Module) -> list[str]:
    """Replace every RMSNorm of a transformers model (Llama/Mistral/Qwen/Gemma style: a ``weight`` and
    ``variance_epsilon`` or ``eps``) by ``GGMLRMSNorm``, in place; returns the replaced module names.
    LayerNorms (GPT-2) are left as they are."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not type(module).__name__.endswith("RMSNorm") or not isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            continue
        offset = 1.0 if type(module).__name__.startswith("Gemma") else 0.0
        model.set_submodule(name, GGMLRMSNorm(module.weight, eps, offset))
        replaced.append(name)
    return replaced


# -- llama.cpp's reference distributions ----------------------------------------------------------------


def coarsen(logprobs, k: int):
    """Top-``k`` token ids and log-probabilities per position (descending) and the log of the remaining mass.

    ``logprobs``: float array [T, V] of log-softmax values. Returns a dict of numpy arrays ``topk_ids`` [T, k]
    int64, ``topk_logprobs`` [T, k] float64, ``tail_logprob`` [T] float64 — the format of llama.cpp's
    reference distributions in tests/data/llamacpp (written by its make_reference.py).
    """
    import numpy as np

    lp = np.asarray(logprobs, dtype=np.float64)
    ids = np.argsort(-lp, axis=-1, kind="stable")[:, :k]
    top = np.take_along_axis(lp, ids, -1)
    tail = np.log1p(-np.minimum(np.exp(top).sum(-1), 1 - 1e-15))
    return {"topk_ids": ids.astype(np.int64), "topk_logprobs": top, "tail_logprob": tail}


def coarsened_kl(reference: dict, logprobs):
    """KL(reference ‖ model) per position, both distributions coarsened to the reference's top-k tokens plus one
    bucket for all others.

    ``reference``: ``coarsen``'s arrays; ``logprobs``: the model's log-softmax [T, V]. Coarsening both sides the
    same way gives a lower bound of the full-vocabulary KL (data-processing inequality) that is tight when the
    tail holds little mass (k = 2048 keeps 98% of the full KL on SmolLM2's reference prompts). Returns float64 [T], in nats.

    Example: ``coarsened_kl(coarsen(ref_logprobs, 512), model_logprobs).mean()``.
    """
    import numpy as np

    lp = np.asarray(logprobs, dtype=np.float64)
    ids = np.asarray(reference["topk_ids"]).astype(np.int64)
    p_top = np.asarray(reference["topk_logprobs"], dtype=np.float64)
    p_tail = np.asarray(reference["tail_logprob"], dtype=np.float64)
    q_top = np.take_along_axis(lp, ids, -1)
    q_tail = np.log1p(-np.minimum(np.exp(q_top).sum(-1), 1 - 1e-15))
    return (np.exp(p_top) * (p_top - q_top)).sum(-1) + np.exp(p_tail) * (p_tail - q_tail)


def load_reference(path) -> dict:
    """llama.cpp's reference distributions and tensors as written by tests/data/llamacpp/make_reference.py.

    Returns ``{"meta": <the JSON>, "prompts": [{"ids", "topk_ids", "topk_logprobs", "tail_logprob"}, ...],
    "tensors": {name: float32 array}}``. Raises ``RunFormatError`` when the pair of files is missing or unreadable.
    """
    import json
    from pathlib import Path

    from safetensors.numpy import load_file

    from lens.errors import RunFormatError

    path = Path(path)
    meta_path = path.with_suffix(".json")
    try:
        arrays = load_file(str(path))
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise RunFormatError(f"could not read llama.cpp's reference {path} (+ {meta_path.name}): {exc}") from exc
    prompts = []
    for i in range(len(meta["prompts"])):
        prompts.append({k: arrays[f"p{i}.{k}"] for k in ("ids", "topk_ids", "topk_logprobs", "tail_logprob")})
    tensors = {k[2:]: v for k, v in arrays.items() if k.startswith("t.")}
    return {"meta": meta, "prompts": prompts, "tensors": tensors}

