"""The vocabulary lenses that LatentLens is compared with (docs/definitions.md, "Visual tokens / LatentLens"):

* **logit lens** (nostalgebraist 2020): apply the model's final norm and unembedding to a hidden state X_ℓ[t]
  and read the top-k tokens of the resulting distribution — what the state would predict if the model stopped
  at layer ℓ;
* **embedding lens**: the top-k rows of the input embedding matrix by cosine with X_ℓ[t] — which input token
  the state is closest to.

``VocabularyLenses.from_model`` copies what the two need out of a loaded model — the input embedding (unit
rows, float16), the unembedding (float16) and its bias, and the final norm as numbers — so that a text bank can
carry them and ``lens.visual_tokens`` stays a pure function of a run and a bank. The final norm is read as
parameters (RMSNorm, Gemma's (1 + w) RMSNorm, or LayerNorm) and **checked against the module's own output** on
random inputs with massive values; a norm that matches none of them leaves the logit lens unavailable, with the
reason, rather than approximated.

Example::

    lenses = VocabularyLenses.from_model(lens.load("smollm2"))
    ids, logprobs = lenses.logit_lens(hidden, k=5)      # [q, 5] int64, [q, 5] float32
    ids, cosines = lenses.embedding_lens(hidden, k=5)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lens.errors import BankMismatchError

__all__ = ["FinalNorm", "VocabularyLenses"]


@dataclass
class FinalNorm:
    """A final norm as numbers: ``kind`` "rms" (``w · x / √(mean x² + ε)``), "rms_offset" (Gemma:
    ``(1 + w) · …``) or "layer" (``(x − μ)/√(var + ε) · w + b``)."""

    kind: str
    weight: np.ndarray
    bias: np.ndarray | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        w = torch.from_numpy(self.weight).float()
        if self.kind in ("rms", "rms_offset"):
            y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return y * (1.0 + w if self.kind == "rms_offset" else w)
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        y = (x - mu) * torch.rsqrt(var + self.eps) * w
        return y + torch.from_numpy(self.bias).float() if self.bias is not None else y

    @classmethod
    def from_module(cls, module: torch.nn.Module | None, d: int) -> tuple["FinalNorm | None", str | None]:
        """Read ``module`` as a ``FinalNorm`` and verify it on random inputs; ``(None, reason)`` if it cannot."""
        if module is None:
            return None, "the model has no final norm"
        weight = getattr(module, "weight", None)
        if weight is None or weight.numel() != d:
            return None, f"the final norm {type(module).__name__} has no per-dimension weight"
        eps = next((float(getattr(module, a)) for a in ("variance_epsilon", "eps", "epsilon") if hasattr(module, a)), 1e-6)
        bias = getattr(module, "bias", None)
        w = weight.detach().float().cpu().numpy()
        b = bias.detach().float().cpu().numpy() if bias is not None else None
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(8, d, generator=gen) * 2.0
        x[0, 0] = 3e3  # a massive activation, as real residual streams have
        x[1] += 5.0  # a large mean, which tells LayerNorm from RMSNorm
        param = next(module.parameters())
        with torch.no_grad():
            want = module(x.to(param.dtype).to(param.device)).float().cpu()
        tol = 1e-4 if param.dtype == torch.float32 else 2e-2
        for kind in ("rms", "rms_offset", "layer"):
            norm = cls(kind, w, b if kind == "layer" else None, eps)
            got = norm(x)
            if torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())):
                return norm, None
        return None, f"the final norm {type(module).__name__} matches neither RMSNorm nor LayerNorm on test inputs"


@dataclass
class VocabularyLenses:
    """What the logit lens and the embedding lens need (see the module docstring).

    ``embedding`` ``[V, d]`` float16 unit rows (None when tied: the unit rows of ``unembedding``),
    ``unembedding`` ``[V, d]`` float16 or None (no LM head), ``bias`` ``[V]`` float32 or None, ``norm``.
    ``logit_lens_unavailable`` says why there is no logit lens, when there is none.
    """

    embedding: np.ndarray | None
    unembedding: np.ndarray | None
    bias: np.ndarray | None
    norm: FinalNorm | None
    tied: bool
    logit_lens_unavailable: str | None = None
    _unit_cache: torch.Tensor | None = None

    @classmethod
    @torch.inference_mode()
    def from_model(cls, lm) -> "VocabularyLenses":
        """Copy the lenses out of ``lm`` (a ``LensModel``); works for packed (low-bit) embeddings and heads too,
        by running the modules rather than reading their weights."""
        d = lm.d_model
        emb = lm.model.get_input_embeddings()
        vocab = int(emb.num_embeddings)
        device = lm.device
        rows = []
        for start in range(0, vocab, 8192):
            x = emb(torch.arange(start, min(start + 8192, vocab), device=device)).float().cpu()
            rows.append(x / x.norm(dim=1, keepdim=True).clamp_min(1e-30))
        unit = torch.cat(rows)
        head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
        if head is None or not lm.causal:
            reason = "the model has no language-model head (an encoder)" if head is None or not lm.causal else None
            return cls(unit.half().numpy(), None, None, None, False, reason)
        norm, reason = FinalNorm.from_module(lm.final_norm, d)
        zero = head(torch.zeros(1, d, device=device, dtype=lm.dtype)).float().cpu()[0]
        w_u = torch.cat([
            (head(torch.eye(d, device=device, dtype=lm.dtype)[a : a + 64]).float().cpu() - zero).T
            for a in range(0, d, 64)
        ], dim=1)  # [V, d]: the head applied to the basis, so packed heads give their real values
        bias = zero.numpy() if bool(zero.abs().max() > 0) else None
        tied = w_u.shape[0] == vocab and bool(torch.allclose(
            w_u / w_u.norm(dim=1, keepdim=True).clamp_min(1e-30), unit, atol=2e-3))
        return cls(None if tied else unit.half().numpy(), w_u.half().numpy(), bias, norm, tied,
                   reason if norm is None else None)

    # -- the two lenses ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int((self.embedding if self.embedding is not None else self.unembedding).shape[0])

    def _unit_embedding(self) -> torch.Tensor:
        if self._unit_cache is None:
            if self.embedding is not None:
                self._unit_cache = torch.from_numpy(self.embedding).float()
            else:
                w = torch.from_numpy(self.unembedding).float()
                self._unit_cache = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return self._unit_cache

    def embedding_lens(self, hidden, k: int = 5, *, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` input-embedding rows by cosine: ``ids`` int64 ``[q, k]``, ``cosines`` float32 ``[q, k]``."""
        h = torch.as_tensor(np.asarray(hidden)).float()
        h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-30)
        unit = self._unit_embedding()
        ids, vals = [], []
        for a in range(0, h.shape[0], chunk):
            top = torch.topk(h[a : a + chunk] @ unit.T, k, dim=1)
            ids.append(top.indices)
            vals.append(top.values)
        return torch.cat(ids).numpy(), torch.cat(vals).numpy()

    def logit_lens(self, hidden, k: int = 5, *, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` tokens of ``log_softmax(W_U · norm(h) + b)``: ``ids`` int64 ``[q, k]`` and their
        log-probabilities float32 ``[q, k]``. Raises ``BankMismatchError`` when the model has no logit lens."""
        if self.unembedding is None or self.norm is None:
            raise BankMismatchError(f"no logit lens for this model: {self.logit_lens_unavailable}")
        h = torch.as_tensor(np.asarray(hidden)).float()
        w = torch.from_numpy(self.unembedding).float()
        b = torch.from_numpy(self.bias).float() if self.bias is not None else None
        ids, vals = [], []
        for a in range(0, h.shape[0], chunk):
            logits = self.norm(h[a : a + chunk]) @ w.T
            if b is not None:
                logits = logits + b
            top = torch.topk(torch.log_softmax(logits, dim=1), k, dim=1)
            ids.append(top.indices)
            vals.append(top.values)
        return torch.cat(ids).numpy(), torch.cat(vals).numpy()

    # -- files ------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in (self.embedding, self.unembedding, self.bias) if a is not None))

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.embedding is not None:
            out["vocab.embedding"] = self.embedding
        if self.unembedding is not None:
            out["vocab.unembedding"] = self.unembedding
        if self.bias is not None:
            out["vocab.bias"] = self.bias
        if self.norm is not None:
            out["vocab.norm.weight"] = self.norm.weight.astype(np.float32)
            if self.norm.bias is not None:
                out["vocab.norm.bias"] = self.norm.bias.astype(np.float32)
        return out

    def describe(self) -> dict:
        return {"tied": self.tied, "norm": None if self.norm is None else {"kind": self.norm.kind, "eps": self.norm.eps},
                "logit_lens_unavailable": self.logit_lens_unavailable}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], described: dict) -> "VocabularyLenses":
        norm = None
        if described.get("norm"):
            norm = FinalNorm(described["norm"]["kind"], arrays["vocab.norm.weight"], arrays.get("vocab.norm.bias"),
                             float(described["norm"]["eps"]))
        return cls(arrays.get("vocab.embedding"), arrays.get("vocab.unembedding"), arrays.get("vocab.bias"), norm,
                   bool(described.get("tied")), described.get("logit_lens_unavailable"))
