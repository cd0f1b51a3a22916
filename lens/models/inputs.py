"""Turning what users pass to ``lens.trace`` into token sequences, with clear errors for bad input.

Three kinds of input, each read exactly or refused with an ``InputError`` that names the input:

* **text**: a string, a list of strings, or sentence pairs ``[(text_a, text_b), ...]`` (tokenized as
  ``tokenizer(text_a, text_b)``, so an encoder gets its ``token_type_ids``);
* **token ids**: a tensor or array ``[T]``/``[B, T]``, a list of int lists;
* **a tokenizer's output** in any form (lists, numpy, torch, ``BatchEncoding``, a plain dict, a list of
  per-text encodings), left- or right-padded: see ``lens.models.forms``;
* **images with text** for a vision-language model: ``{"image": …, "text": "…<image>…"}`` items (or the
  processor's output for one sequence), mixed with plain strings: see ``lens.models.multimodal``.

``prepend_bos`` follows TransformerLens: ``True`` — position 0 is the BOS token; ``False`` — it is not,
whatever the tokenizer adds by itself; ``None`` — the family's default (GPT-2-style families prepend BOS,
others keep what their tokenizer does) for text, and the ids as given for token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lens.errors import ConfigError, EmptyInputError, InputError, InputTooLongError
from lens.models.forms import _accepted_fields, is_token_ids, read_token_ids

__all__ = ["Encoded", "encode", "pad_batch", "pad_fields", "check_text"]


@dataclass
class Encoded:
    """Token sequences ready to run.

    ``ids``/``special``: per sequence, unpadded. ``texts``: the source text (a ``[a, b]`` list for a
    sentence pair, None for token ids). ``truncated``: which inputs were cut. ``fields``: per-token model
    inputs besides the ids (``token_type_ids``, ``position_ids``), unpadded like the ids. ``form``: what
    was passed (``"text"``, ``"text pairs"``, ``"token ids"``, ``"tokenizer output"``, …). ``padding``: the
    padding of a tokenizer output (``"left"``, ``"right"``, ``"none"``). ``bos_first``: whether position 0
    of each sequence is the BOS token.
    """

    ids: list[list[int]]
    special: list[list[bool]]
    texts: list[Any]
    truncated: list[bool]
    fields: dict[str, list[list[int]]] = field(default_factory=dict)
    form: str = "text"
    padding: str | None = None
    bos_first: list[bool] = field(default_factory=list)
    informational: list[str] = field(default_factory=list)
    # image inputs: per sequence the processor's other model inputs (pixel tensors, grids; None for text-only
    # sequences) and a description of its images
    extras: list[dict[str, Any] | None] | None = None
    images: list[list[dict[str, Any]]] | None = None


def _special_ids(tokenizer) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def _bos_id(lm) -> int | None:
    tok = lm.tokenizer
    bos = getattr(tok, "bos_token_id", None)
    if bos is None and lm.causal:
        bos = getattr(tok, "eos_token_id", None)  # GPT-2 style: <|endoftext|> doubles as BOS
    return bos


def check_text(text: Any, where: str) -> str:
    """Return ``text`` if a tokenizer can encode it, else raise ``InputError``/``EmptyInputError`` naming ``where``.

    Refused: non-strings (bytes get a hint to decode them), strings that are not valid Unicode (lone
    surrogates such as ``"\\ud800"``, which UTF-8 cannot encode), and empty or whitespace-only strings.

    Example: ``check_text("ok \\ud800", "input 0")`` raises ``InputError`` naming U+D800 at character 3.
    """
    if isinstance(text, (bytes, bytearray)):
        raise InputError(f"{where} is bytes, not text; decode it first, e.g. data.decode('utf-8')")
    if not isinstance(text, str):
        raise InputError(
            f"{where} is a {type(text).__name__}, not a string; pass strings, (text_a, text_b) pairs, or token ids"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what = "a lone surrogate" if 0xD800 <= code <= 0xDFFF else "a character UTF-8 cannot encode"
        raise InputError(
            f"{where} contains {what} (U+{code:04X}) at character {exc.start}, so it is not valid Unicode text and "
            "no tokenizer can encode it. It usually comes from bytes decoded with errors='surrogateescape' or a "
            "JSON '\\ud800' escape; repair it, e.g. text.encode('utf-8', 'replace').decode('utf-8')"
        ) from None
    if not text.strip():
        raise EmptyInputError(
            f"{where} is empty (or only whitespace); there is nothing to analyse. Remove it or give it text"
        )
    return text


def _read_texts(inputs: Any) -> list[str | tuple[str, str]]:
    if isinstance(inputs, str):
        return [check_text(inputs, "input 0")]
    if isinstance(inputs, (bytes, bytearray)):
        raise InputError("the input is bytes, not text; decode it first, e.g. data.decode('utf-8')")
    if not isinstance(inputs, (list, tuple)):
        raise InputError(
            f"lens.trace cannot read inputs of type {type(inputs).__name__}; pass a string, a list of strings, "
            "(text_a, text_b) sentence pairs, token ids (a tensor [T] or [B, T], or a list of int lists), or a "
            "tokenizer's output"
        )
    if not inputs:
        raise EmptyInputError("lens.trace got an empty list; pass at least one string")
    items: list[str | tuple[str, str]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, (str, bytes)) for x in item):
            items.append((check_text(item[0], f"input {i} (first text of the pair)"),
                          check_text(item[1], f"input {i} (second text of the pair)")))
        elif isinstance(item, (tuple, list)) and item and all(isinstance(x, str) for x in item):
            raise InputError(
                f"input {i} is a {type(item).__name__} of {len(item)} strings; a sentence pair has exactly two. Pass "
                "(text_a, text_b) for a pair, or the strings as separate inputs"
            )
        else:
            items.append(check_text(item, f"input {i}"))
    return items


def _tokenize(lm, texts: list, pairs: list | None, index: list[int], **kwargs) -> dict:
    """One batched tokenizer call; on failure, find the input it failed on and name it (``index``: the
    user's input number of each text)."""
    tok = lm.tokenizer
    try:
        return tok(texts, pairs, verbose=False, **kwargs) if pairs is not None else tok(texts, verbose=False, **kwargs)
    except Exception as batch_exc:
        for i, text in enumerate(texts):
            try:
                tok([text], [pairs[i]] if pairs is not None else None, verbose=False, **kwargs)
            except Exception as exc:
                raise InputError(
                    f"the tokenizer of {lm.model_id} cannot encode input {index[i]} ({type(exc).__name__}: {exc}); "
                    "check that text for characters the tokenizer rejects"
                ) from exc
        raise InputError(
            f"the tokenizer of {lm.model_id} failed on these inputs ({type(batch_exc).__name__}: {batch_exc})"
        ) from batch_exc


def _tokenizer_adds_bos(tok, bos: int | None) -> bool:
    if bos is None:
        return False
    with_special = tok("a", add_special_tokens=True, verbose=False)["input_ids"]
    plain = tok("a", add_special_tokens=False, verbose=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and plain[:1] != [bos]


def _encode_texts(lm, items, *, truncate: bool, want_bos: bool | None):
    tok = lm.tokenizer
    limit = lm.max_positions
    bos = _bos_id(lm)
    if want_bos and bos is None:
        raise ConfigError(
            f"prepend_bos=True, but the tokenizer of {lm.model_id} has no BOS token, so position 0 cannot be one; "
            "leave prepend_bos unset (the tokenizer's own special tokens are kept)"
        )
    adds_bos = _tokenizer_adds_bos(tok, bos)
    budget = limit - 1 if (want_bos and not adds_bos) else limit
    accepted = _accepted_fields(lm)
    options = dict(add_special_tokens=True, truncation=bool(truncate), max_length=budget if truncate else None)
    out_ids: list[list[int]] = [[] for _ in items]
    out_fields: dict[str, list[list[int]]] = {}
    full_lengths = [0] * len(items)
    groups = {
        "single": [i for i, x in enumerate(items) if isinstance(x, str)],
        "pair": [i for i, x in enumerate(items) if not isinstance(x, str)],
    }
    for kind, index in groups.items():
        if not index:
            continue
        first = [items[i] if kind == "single" else items[i][0] for i in index]
        second = None if kind == "single" else [items[i][1] for i in index]
        enc = _tokenize(lm, first, second, index, **options)
        full = _tokenize(lm, first, second, index, add_special_tokens=True) if truncate else enc
        for k, i in enumerate(index):
            out_ids[i] = list(enc["input_ids"][k])
            full_lengths[i] = len(full["input_ids"][k])
            for name in enc.keys():
                if name in accepted:
                    out_fields.setdefault(name, [[] for _ in items])[i] = list(enc[name][k])
    # a field only some inputs have (token types of pairs mixed with single texts): zeros for the others
    for name, rows in out_fields.items():
        for i, row in enumerate(rows):
            if len(row) != len(out_ids[i]):
                rows[i] = [0] * len(out_ids[i])
    truncated = []
    for i, ids in enumerate(out_ids):
        shift = 0
        if want_bos and (not ids or ids[0] != bos):
            ids.insert(0, bos)
            for rows in out_fields.values():
                rows[i].insert(0, rows[i][0] if rows[i] else 0)
            shift = 1
        elif want_bos is False and adds_bos and ids and ids[0] == bos:
            del ids[0]  # the tokenizer added it (a BOS the text itself begins with stays: it is the text)
            for rows in out_fields.values():
                del rows[i][0]
            shift = -1
        truncated.append(bool(truncate) and full_lengths[i] + shift > len(ids))
        if not ids:
            raise EmptyInputError(
                f"input {i} gives no tokens with the tokenizer of {lm.model_id} (it drops every character); give it "
                "text the tokenizer keeps"
            )
    return out_ids, out_fields, truncated


def _apply_bos_to_ids(lm, rows, want_bos: bool | None) -> None:
    """Explicit ``prepend_bos`` on token ids: make position 0 BOS (or not), fields shifted along."""
    if want_bos is None:
        return
    bos = _bos_id(lm)
    if bos is None:
        if want_bos:
            raise ConfigError(
                f"prepend_bos=True, but the tokenizer of {lm.model_id} has no BOS token; leave prepend_bos unset"
            )
        return
    for i, ids in enumerate(rows.ids):
        if want_bos and ids[0] != bos:
            ids.insert(0, bos)
            for field_rows in rows.fields.values():
                field_rows[i].insert(0, field_rows[i][0])
        elif not want_bos and ids[0] == bos:
            if len(ids) == 1:
                raise EmptyInputError(
                    f"input {i} is only the BOS token, and prepend_bos=False removes it; give it more tokens, or "
                    "leave prepend_bos unset to trace the ids as given"
                )
            del ids[0]
            for field_rows in rows.fields.values():
                del field_rows[i][0]


def encode(lm, inputs: Any, *, truncate: bool = False, prepend_bos: bool | None = None) -> Encoded:
    """Tokenize ``inputs`` for ``lm`` (a LensModel); see the module docstring for the accepted forms.

    Too long for the model: ``InputTooLongError`` unless ``truncate=True``, which keeps the first
    ``max_positions`` tokens (for strings, the tokenizer's own truncation, so an encoder keeps its
    closing [SEP]); the run records which inputs were cut. Empty strings or sequences:
    ``EmptyInputError``. Text no tokenizer can encode, wrong types, dtypes or shapes, masks that disagree
    with their ids: ``InputError`` naming the input. Fields the model does not take, a BOS the tokenizer
    does not have: ``ConfigError``.

    Example: ``encode(lm, ["Hello world.", "A second text"]).ids``.
    """
    tok = lm.tokenizer
    limit = lm.max_positions
    if prepend_bos not in (None, True, False):
        raise ConfigError(f"prepend_bos must be True, False or None; got {prepend_bos!r}")
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "UO":  # an array of strings is a list of texts
        inputs = inputs.tolist() if inputs.ndim == 1 else inputs
    from lens.models.multimodal import is_multimodal_input

    if is_multimodal_input(inputs):
        return _encode_multimodal(lm, inputs, truncate=truncate, prepend_bos=prepend_bos)
    if is_token_ids(inputs):
        rows = read_token_ids(lm, inputs)
        _apply_bos_to_ids(lm, rows, prepend_bos)
        id_lists, fields = rows.ids, rows.fields
        texts: list[Any] = [None] * len(id_lists)
        truncated = [False] * len(id_lists)
        form, padding, informational = rows.form, rows.padding, rows.informational
    else:
        items = _read_texts(inputs)
        want = prepend_bos if prepend_bos is not None else (True if lm.family.prepend_bos else None)
        id_lists, fields, truncated = _encode_texts(lm, items, truncate=truncate, want_bos=want)
        texts = [x if isinstance(x, str) else [x[0], x[1]] for x in items]
        form = "text pairs" if any(not isinstance(x, str) for x in items) else "text"
        padding, informational = None, []

    for i, ids in enumerate(id_lists):
        if len(ids) > limit:
            if truncate:
                id_lists[i] = ids[:limit]
                for field_rows in fields.values():
                    field_rows[i] = field_rows[i][:limit]
                truncated[i] = True
            else:
                where = f" ({len(texts[i]):,} characters)" if isinstance(texts[i], str) else ""
                raise InputTooLongError(
                    f"input {i}{where} is {len(ids):,} tokens long but {lm.model_id} takes at most {limit:,} positions. "
                    f"Split the text, or pass truncate=True to keep its first {limit:,} tokens"
                )
    specials = _special_ids(tok)
    special = [[t in specials for t in ids] for ids in id_lists]
    bos = _bos_id(lm)
    bos_first = [bool(ids) and bos is not None and ids[0] == bos for ids in id_lists]
    return Encoded(ids=id_lists, special=special, texts=texts, truncated=truncated, fields=fields, form=form,
                   padding=padding, bos_first=bos_first, informational=informational)


def _encode_multimodal(lm, inputs: Any, *, truncate: bool, prepend_bos: bool | None) -> Encoded:
    """Image + text items (and plain strings) → ``Encoded`` with per-sequence extras (``lens.models.multimodal``)."""
    from lens.models.forms import TokenRows
    from lens.models.multimodal import encode_multimodal

    items = encode_multimodal(lm, inputs, truncate=truncate)
    texts_only = [(i, x) for i, x in enumerate(items) if isinstance(x, str)]
    ids: list[list[int]] = [[] for _ in items]
    truncated = [False] * len(items)
    t_ids: list[list[int]] = []
    t_fields: dict[str, list[list[int]]] = {}
    if texts_only:
        want = prepend_bos if prepend_bos is not None else (True if lm.family.prepend_bos else None)
        t_ids, t_fields, t_trunc = _encode_texts(lm, [check_text(x, f"input {i}") for i, x in texts_only],
                                                 truncate=truncate, want_bos=want)
        for k, (i, _) in enumerate(texts_only):
            ids[i], truncated[i] = t_ids[k], t_trunc[k]
    names = sorted({n for x in items if not isinstance(x, str) for n in x.fields} | set(t_fields))
    fields: dict[str, list[list[int]]] = {name: [[] for _ in items] for name in names}
    for name in names:  # a field only some sequences have: zeros for the others
        for k, (i, _) in enumerate(texts_only):
            fields[name][i] = list(t_fields[name][k]) if name in t_fields else [0] * len(t_ids[k])
    extras: list[dict[str, Any] | None] = [None] * len(items)
    images: list[list[dict[str, Any]]] = [[] for _ in items]
    texts: list[Any] = [None] * len(items)
    image_rows = [i for i, x in enumerate(items) if not isinstance(x, str)]
    for i in image_rows:
        item = items[i]
        ids[i] = list(item.ids)
        for name in fields:
            fields[name][i] = list(item.fields.get(name, [0] * len(item.ids)))
        extras[i], images[i], texts[i] = item.extras, item.images, item.text
    for i, x in texts_only:
        texts[i] = x
    if prepend_bos is not None and image_rows:  # position 0 is (not) BOS, fields shifted along
        rows = TokenRows(ids=[ids[i] for i in image_rows], fields={n: [f[i] for i in image_rows] for n, f in fields.items()})
        _apply_bos_to_ids(lm, rows, prepend_bos)
        for k, i in enumerate(image_rows):
            ids[i] = rows.ids[k]
            for name in fields:
                fields[name][i] = rows.fields[name][k]
    specials = _special_ids(lm.tokenizer)
    bos = _bos_id(lm)
    return Encoded(
        ids=ids, special=[[t in specials for t in row] for row in ids], texts=texts, truncated=truncated,
        fields=fields, form="images and text" if texts_only else "images", padding=None,
        bos_first=[bool(row) and bos is not None and row[0] == bos for row in ids], informational=[],
        extras=extras, images=images,
    )


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


def pad_fields(fields: dict[str, list[list[int]]], rows: list[int], width: int) -> dict[str, torch.Tensor]:
    """Right-pad the per-token fields of the sequences ``rows`` to ``width`` (with 0, under the mask).

    Example: ``pad_fields({"token_type_ids": [[0, 1], [0]]}, [0, 1], 2)`` → ``{"token_type_ids": [[0, 1], [0, 0]]}``.
    """
    out = {}
    for name, per_seq in fields.items():
        tensor = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            tensor[r, : len(per_seq[i])] = torch.tensor(per_seq[i], dtype=torch.long)
        out[name] = tensor
    return out
