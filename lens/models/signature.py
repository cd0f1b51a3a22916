"""A short signature of a language model's weights: which model produced a run or a text bank.

A model id is not enough to tell two models apart (a folder can be renamed; a VLM carries a text model under
another name), and a hash of the weights is too strict (the same model loaded in bfloat16, or with low-bit
weights, is still the same model for the purpose of comparing its hidden states). The signature is the sign
pattern of the input embedding of 16 fixed token ids over their first 64 dimensions — 1024 bits, written as
256 hex digits. Two loads of the same model agree on almost every bit whatever the dtype or quantization
(a sign flips only for weights within rounding error of zero); two different models agree on about half.

Example::

    sig = embedding_signature(lm)                 # 'a3f0…' (256 hex digits)
    signature_agreement(sig, sig)                 # 1.0
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["embedding_signature", "signature_agreement", "SIGNATURE_IDS", "SAME_MODEL_AGREEMENT"]

#: How many token ids and dimensions the signature reads.
SIGNATURE_IDS = 16
_DIMS = 64
#: Fraction of equal bits above which two signatures name the same model (different models: ≈ 0.5).
SAME_MODEL_AGREEMENT = 0.9


def _signature_ids(tokenizer, vocab: int) -> list[int]:
    """16 ids spread over the first 4096 ids (shared by a text model and a VLM that extends its vocabulary),
    skipping special tokens, whose rows are often untrained."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    span = min(vocab, 4096)
    candidates = [i for i in range(span) if i not in special]
    if len(candidates) <= SIGNATURE_IDS:
        return candidates
    picks = np.linspace(0, len(candidates) - 1, SIGNATURE_IDS).round().astype(int)
    return [candidates[i] for i in picks]


@torch.inference_mode()
def embedding_signature(lm) -> str | None:
    """The signature of ``lm`` (a ``LensModel``): hex string of 1024 sign bits, or None without an embedding.

    Reads the rows through the embedding module's own forward, so a packed (low-bit) or scaled embedding gives
    the values the model really uses.
    """
    embedding = lm.model.get_input_embeddings() if hasattr(lm.model, "get_input_embeddings") else None
    if embedding is None:
        return None
    vocab = int(getattr(embedding, "num_embeddings", 0) or getattr(lm.text_config, "vocab_size", 0) or 0)
    if vocab <= 0:
        return None
    ids = _signature_ids(lm.tokenizer, vocab)
    device = next(embedding.parameters()).device if any(True for _ in embedding.parameters()) else lm.device
    rows = embedding(torch.tensor(ids, device=device)).float()[:, :_DIMS].cpu().numpy()
    bits = np.packbits((rows > 0).reshape(-1))
    return bits.tobytes().hex()


def signature_agreement(a: str | None, b: str | None) -> float | None:
    """Fraction of equal bits of two signatures (None when either is missing or their lengths differ)."""
    if not a or not b or len(a) != len(b):
        return None
    x = np.unpackbits(np.frombuffer(bytes.fromhex(a), dtype=np.uint8))
    y = np.unpackbits(np.frombuffer(bytes.fromhex(b), dtype=np.uint8))
    return float((x == y).mean())
