"""Turning what users pass to ``lens.trace`` into token sequences, with clear errors for bad input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from lens.errors import EmptyInputError, InputError, InputTooLongError

__all__ = ["Encoded", "encode", "pad_batch"]


@dataclass
class Encoded:
    """Token sequences ready to run: ids, which tokens are special, the source texts, and truncation."""

    ids: list[list[int]]
    special: list[list[bool]]
    texts: list[str | None]
    truncated: list[bool]


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _as_id_lists(inputs: Any) -> list[list[int]] | None:
    """Token-id inputs (tensor, list of int lists, or a tokenizer's output) → lists of ids, else None."""
    mask = None
    if isinstance(inputs, dict) or hasattr(inputs, "keys") and "input_ids" in inputs.keys():
        mask = inputs.get("attention_mask")
        inputs = inputs["input_ids"]
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype.is_floating_point or inputs.dim() not in (1, 2):
            raise InputError(f"token-id tensors must be integer [T] or [B, T]; got {inputs.dtype} {tuple(inputs.shape)}")
        rows = inputs[None] if inputs.dim() == 1 else inputs
        if mask is not None:
            mask = torch.as_tensor(mask)
            mask = mask[None] if mask.dim() == 1 else mask
            return [row[m.bool()].tolist() for row, m in zip(rows, mask)]
        return [row.tolist() for row in rows]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, int) for x in inputs):
        return [list(inputs)]
    if isinstance(inputs, (list, tuple)) and inputs and all(
        isinstance(x, (list, tuple)) and all(isinstance(i, int) for i in x) for x in inputs
    ):
        return [list(x) for x in inputs]
    return None


def encode(lm, inputs: Any, *, truncate: bool = False, prepend_bos: bool | None = None) -> Encoded:
    """Tokenize ``inputs`` for ``lm`` (a LensModel).

    ``inputs``: a string, a sequence of strings, token ids (tensor ``[T]``/``[B, T]``, list of int lists,
    or a tokenizer's output with ``attention_mask``). Strings get the tokenizer's special tokens, and a
    BOS token when the family prepends one (``prepend_bos`` overrides).

    Too long for the model: ``InputTooLongError`` unless ``truncate=True``, which keeps the first
    ``max_positions`` tokens (for strings, the tokenizer's own truncation, so an encoder keeps its
    closing [SEP]); the run records which inputs were cut. Empty strings or sequences:
    ``EmptyInputError``.

    Example: ``encode(lm, ["Hello world.", "A second text"]).ids``.
    """
    tok = lm.tokenizer
    limit = lm.max_positions
    if prepend_bos is None:
        prepend_bos = lm.family.prepend_bos
    bos = getattr(tok, "bos_token_id", None)
    if bos is None and prepend_bos and lm.causal:
        bos = getattr(tok, "eos_token_id", None)  # GPT-2 style: <|endoftext|> doubles as BOS
    specials = _special_ids(tok)

    id_lists = _as_id_lists(inputs)
    texts: list[str | None]
    if id_lists is not None:
        texts = [None] * len(id_lists)
        vocab = lm.model.get_input_embeddings().num_embeddings
        for i, ids in enumerate(id_lists):
            if not ids:
                raise EmptyInputError(f"input {i} has no tokens; every sequence needs at least one token id")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InputError(f"input {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        truncated = [False] * len(id_lists)
    else:
        if isinstance(inputs, str):
            texts = [inputs]
        elif isinstance(inputs, Sequence) and not isinstance(inputs, (bytes, bytearray)):
            texts = list(inputs)
        else:
            raise InputError(
                f"lens.trace cannot read inputs of type {type(inputs).__name__}; pass a string, a list of "
                "strings, or token ids (a tensor [T] or [B, T], or a list of int lists)"
            )
        if not texts:
            raise EmptyInputError("lens.trace got an empty list; pass at least one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"input {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise EmptyInputError(
                    f"input {i} is empty (or only whitespace); there is nothing to analyse. Remove it or give it text"
                )
        add_bos = bool(prepend_bos and bos is not None)
        budget = limit - 1 if add_bos else limit
        encoded = tok(
            texts,
            add_special_tokens=True,
            truncation=bool(truncate),
            max_length=budget if truncate else None,
            verbose=False,
        )["input_ids"]
        id_lists = []
        truncated = []
        for i, ids in enumerate(encoded):
            ids = list(ids)
            if add_bos and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if truncate:
                full = len(tok(texts[i], add_special_tokens=True, verbose=False)["input_ids"]) + int(add_bos)
                truncated.append(full > len(ids))
            else:
                truncated.append(False)
            id_lists.append(ids)

    for i, ids in enumerate(id_lists):
        if len(ids) > limit:
            if truncate:
                id_lists[i] = ids[:limit]
                truncated[i] = True
            else:
                where = f" ({len(texts[i]):,} characters)" if texts[i] is not None else ""
                raise InputTooLongError(
                    f"input {i}{where} is {len(ids):,} tokens long but {lm.model_id} takes at most {limit:,} positions. "
                    f"Split the text, or pass truncate=True to keep its first {limit:,} tokens"
                )
    special = [[t in specials for t in ids] for ids in id_lists]
    return Encoded(ids=id_lists, special=special, texts=texts, truncated=truncated)


def pad_batch(id_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences into ``input_ids`` and ``attention_mask`` tensors.

    Right padding keeps every real token at its natural position (causal models never see the pads;
    position ids need no shifting); the attention kernel ignores padded queries.

    Example: ``pad_batch([[5, 6, 7], [8]], 0)`` → ids ``[[5, 6, 7], [8, 0, 0]]``, mask ``[[1, 1, 1], [1, 0, 0]]``.
    """
    width = max(len(ids) for ids in id_lists)
    input_ids = torch.full((len(id_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(id_lists), width), dtype=torch.long)
    for row, ids in enumerate(id_lists):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask
