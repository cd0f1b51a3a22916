"""Token ids in every form a user can hand to ``lens.trace``, reduced to one exact form.

A tokenizer's output comes as Python lists (the default), numpy arrays, torch tensors, a
``BatchEncoding`` or a plain ``dict``, a list of per-text encodings (``[tok(t) for t in texts]``, or a
fast tokenizer's ``tokenizers.Encoding`` objects), right- or left-padded. All of them say the same thing:
for every sequence, its real tokens (``attention_mask == 1``) and per-token fields such as
``token_type_ids``. :func:`read_token_ids` turns each into :class:`TokenRows` — one unpadded list per
sequence and per field — so that every form gives the same ``Run``, or a clear ``InputError`` naming the
input and what is wrong with it.

No library does this: ``transformers`` only pads and converts (``BatchEncoding.convert_to_tensors``); it
never checks a mask against its ids or removes padding, which is what lens needs before re-batching.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lens.errors import ConfigError, EmptyInputError, InputError

__all__ = ["TokenRows", "read_token_ids", "is_token_ids", "INFORMATIONAL_FIELDS"]

# Fields a tokenizer returns for its own bookkeeping: they are not model inputs, change no number, and are
# checked (shape, consistency) rather than passed on. Everything else must be a model input or is refused.
INFORMATIONAL_FIELDS = ("special_tokens_mask", "offset_mapping", "length", "overflow_to_sample_mapping",
                        "num_truncated_tokens", "overflowing_tokens")


_FLAG_FIELDS = ("attention_mask", "special_tokens_mask")  # may be given as booleans


@dataclass
class TokenRows:
    """Unpadded token ids per sequence plus the per-token fields that go to the model with them."""

    ids: list[list[int]]
    fields: dict[str, list[list[int]]] = field(default_factory=dict)
    form: str = "token ids"  # what the user passed, for provenance
    padding: str | None = None  # "left", "right", "none" (for tokenizer outputs with a mask)
    informational: list[str] = field(default_factory=list)  # bookkeeping fields that were checked


def _is_encoding(x: Any) -> bool:
    """A ``tokenizers.Encoding`` (a fast tokenizer's per-text result) without importing tokenizers."""
    return type(x).__name__ == "Encoding" and hasattr(x, "ids") and hasattr(x, "attention_mask")


def _is_mapping(x: Any) -> bool:
    return isinstance(x, Mapping) or (hasattr(x, "keys") and hasattr(x, "__getitem__") and not isinstance(x, (str, bytes)))


def _is_int_scalar(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_flag(x: Any) -> bool:
    return isinstance(x, (int, np.integer, bool, np.bool_))


def is_token_ids(inputs: Any) -> bool:
    """Whether ``inputs`` is token ids in some form (rather than text): a tensor, an array, int lists, or
    a tokenizer's output. Text (``str``, lists of ``str``, sentence pairs) is not."""
    if isinstance(inputs, (torch.Tensor, np.ndarray)) or _is_mapping(inputs) or _is_encoding(inputs):
        return True
    if isinstance(inputs, (list, tuple)) and inputs:
        first = inputs[0]
        if _is_int_scalar(first) or _is_mapping(first) or _is_encoding(first):
            return True
        if isinstance(first, (torch.Tensor, np.ndarray)):
            return True
        if isinstance(first, (list, tuple)) and first and _is_int_scalar(first[0]):
            return True
    return False


def _where(name: str, index: int | None) -> str:
    return f"{name} of input {index}" if index is not None else name


def _check_dtype(value, name: str) -> None:
    if name in _FLAG_FIELDS:  # masks: any dtype whose values are 0 and 1 (checked by _to_rows)
        if isinstance(value, torch.Tensor) and value.dtype.is_complex or \
                isinstance(value, np.ndarray) and value.dtype.kind not in "iubf":
            raise InputError(f"{name} is of dtype {value.dtype}; a mask holds 0 and 1 (integers or booleans)")
        return
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool and name == "input_ids":
            raise InputError(
                f"{name} is a {value.dtype} tensor; token ids must be integers (torch.long). Tokenize again, or "
                f"convert with {name}.long() if the values are whole numbers"
            )
    elif isinstance(value, np.ndarray):
        if value.dtype.kind not in "iub" or (value.dtype.kind == "b" and name == "input_ids"):
            raise InputError(
                f"{name} is a numpy array of dtype {value.dtype}; it must hold integers (np.int64). Convert it with "
                f"{name}.astype('int64') if the values are whole numbers"
            )


def _to_rows(value: Any, name: str) -> list[list[int]]:
    """A tensor / ndarray / nested list of one field → one list of Python ints per sequence."""
    _check_dtype(value, name)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim == 0 or value.ndim > 2:
            raise InputError(
                f"{name} must be [T] or [batch, T]; got shape {tuple(value.shape)}. Pass one sequence as a 1-D tensor "
                "or a batch as a 2-D one"
            )
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
        array = array[None] if array.ndim == 1 else array
        if array.dtype.kind == "f":  # a float mask: exactly 0 and 1, or refused (never rounded)
            bad = array[(array != 0) & (array != 1)]
            if bad.size:
                raise InputError(
                    f"{name} holds {float(bad.flat[0])!r}; a mask is 0 (padding) or 1 (a real token). Pass the "
                    "tokenizer's attention_mask unchanged"
                )
        return [[int(x) for x in row] for row in array.astype(np.int64)]
    if isinstance(value, (list, tuple)):
        if not value:
            return []
        element = _is_flag if name in _FLAG_FIELDS else _is_int_scalar
        if all(element(x) for x in value):
            return [[int(x) for x in value]]
        rows = []
        for i, row in enumerate(value):
            if isinstance(row, (torch.Tensor, np.ndarray)):
                _check_dtype(row, f"{name}[{i}]")
                if row.ndim != 1:
                    raise InputError(f"{name}[{i}] must be one row of ids; got shape {tuple(row.shape)}")
                rows.append([int(x) for x in row.tolist()])
            elif isinstance(row, (list, tuple)):
                bad = next((x for x in row if not element(x)), None)
                if bad is not None:
                    raise InputError(
                        f"{_where(name, i)} holds a {type(bad).__name__} ({bad!r}); token ids and masks are integers. "
                        "Pass the tokenizer's output unchanged (or text, which lens tokenizes)"
                    )
                rows.append([int(x) for x in row])
            else:
                raise InputError(
                    f"{name}[{i}] is a {type(row).__name__}; expected a list of ints, one per token"
                )
        return rows
    raise InputError(f"{name} is a {type(value).__name__}; expected a tensor, a numpy array or lists of ints")


def _flatten_ints(value: Any) -> list[int] | None:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return [int(x) for x in np.asarray(value).reshape(-1)]
    if _is_int_scalar(value):
        return [int(value)]
    if isinstance(value, (list, tuple)):
        out: list[int] = []
        for item in value:
            part = _flatten_ints(item)
            if part is None:
                return None
            out.extend(part)
        return out
    return None


def _mapping_to_fields(enc: Any, model_input_names=("input_ids", "attention_mask")) -> dict[str, Any]:
    if _is_encoding(enc):
        # an Encoding always carries type ids; the tokenizer returns them only when its model uses them
        fields = {"input_ids": list(enc.ids), "attention_mask": list(enc.attention_mask)}
        if "token_type_ids" in model_input_names:
            fields["token_type_ids"] = list(enc.type_ids)
        return fields
    return {str(k): enc[k] for k in enc.keys()}


def _merge_encodings(items: list[Any], model_input_names) -> dict[str, list[list[Any]]]:
    """A list of per-text encodings → one mapping of per-sequence rows (names checked to agree)."""
    merged: dict[str, list] = {}
    names: set[str] | None = None
    for i, item in enumerate(items):
        if not (_is_mapping(item) or _is_encoding(item)):
            raise InputError(
                f"input {i} is a {type(item).__name__} but input 0 is a tokenizer output; pass a list of encodings "
                "(one per text) or one batched tokenizer output, not a mixture"
            )
        fields = _mapping_to_fields(item, model_input_names)
        if names is None:
            names = set(fields)
        elif set(fields) != names:
            raise InputError(
                f"encoding {i} has fields {sorted(fields)} but encoding 0 has {sorted(names)}; tokenize every text "
                "with the same options"
            )
        for name, value in fields.items():
            if name in INFORMATIONAL_FIELDS and name != "special_tokens_mask":
                merged.setdefault(name, []).append(value)  # bookkeeping: kept as given, not passed on
                continue
            rows = _to_rows(value, name)
            if len(rows) != 1:
                raise InputError(f"encoding {i} holds {len(rows)} sequences; give one encoding per text")
            merged.setdefault(name, []).extend(rows)
    return merged


def _mask_span(ids: list[int], mask: list[int], index: int) -> tuple[int, int, str]:
    """(start, stop, side) of the real tokens of one row; refuses masks that are not padding."""
    if len(mask) != len(ids):
        raise InputError(
            f"attention_mask of input {index} has {len(mask)} entries but its input_ids have {len(ids)}; they "
            "must come from the same tokenizer call"
        )
    bad = [m for m in mask if m not in (0, 1)]
    if bad:
        raise InputError(
            f"attention_mask of input {index} holds {bad[0]!r}; an attention mask is 0 (padding) or 1. Pass the "
            "tokenizer's attention_mask unchanged"
        )
    ones = [i for i, m in enumerate(mask) if m]
    if not ones:
        raise EmptyInputError(f"input {index} is all padding (its attention_mask has no 1); remove it")
    start, stop = ones[0], ones[-1] + 1
    if stop - start != len(ones):
        hole = next(i for i in range(start, stop) if not mask[i])
        raise InputError(
            f"attention_mask of input {index} has a 0 at position {hole} between real tokens; lens reads a mask as "
            "padding at one end (left or right). To hide tokens inside a text, remove them from input_ids instead"
        )
    side = "none" if (start, stop) == (0, len(ids)) else ("left" if start > 0 and stop == len(ids) else
                                                           "right" if start == 0 else "both")
    return start, stop, side


def _accepted_fields(lm) -> set[str]:
    """Per-token keyword arguments the model's forward takes (``**kwargs`` does not count)."""
    import inspect

    names: set[str] | None = None
    backbone = getattr(lm, "backbone", lm.base)
    for module in {id(backbone): backbone, id(lm.model): lm.model}.values():
        params = inspect.signature(module.forward).parameters
        own = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        names = own if names is None else names & own
    return (names or set()) - {"input_ids", "attention_mask", "self"}


def _check_field_range(lm, name: str, rows: list[list[int]]) -> None:
    cfg = lm.text_config
    limits = {"token_type_ids": getattr(cfg, "type_vocab_size", None),
              "position_ids": getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)}
    limit = limits.get(name)
    for i, row in enumerate(rows):
        low = min(row) if row else 0
        high = max(row) if row else 0
        if low < 0 or (limit is not None and high >= limit):
            raise InputError(
                f"{name} of input {i} holds {high if low >= 0 else low}, outside [0, {limit}) for "
                f"{lm.model_id}; give {name} the model was trained with"
            )


def read_token_ids(lm, inputs: Any) -> TokenRows:
    """Token ids in any form (see the module docstring) → :class:`TokenRows` for ``lm`` (a LensModel).

    Per-token fields the model's forward accepts (``token_type_ids`` of sentence pairs, ``position_ids``,
    …) are kept, unpadded like the ids, to be passed on. ``token_type_ids`` for a model without token
    types are dropped only when all zero (they then carry nothing); any other field the model does not
    take raises ``ConfigError`` naming it. Bookkeeping fields (``special_tokens_mask``, ``offset_mapping``,
    ``length``, …) are checked and not passed on.

    Raises ``InputError`` (wrong dtype or shape, a mask that disagrees with its ids or has holes, ids
    outside the vocabulary), ``EmptyInputError`` (a sequence with no real token) and ``ConfigError``.

    Example: ``read_token_ids(lm, tok(["a b", "c"], padding=True)).ids`` → two unpadded lists.
    """
    model_input_names = tuple(getattr(lm.tokenizer, "model_input_names", ()) or ("input_ids", "attention_mask"))
    if _is_mapping(inputs) or _is_encoding(inputs):
        raw = _mapping_to_fields(inputs, model_input_names)
        form = "tokenizer output" if "attention_mask" in raw or hasattr(inputs, "encodings") else "mapping"
    elif isinstance(inputs, (list, tuple)) and inputs and (_is_mapping(inputs[0]) or _is_encoding(inputs[0])):
        raw = _merge_encodings(list(inputs), model_input_names)
        form = "list of encodings"
    else:
        raw = {"input_ids": inputs}
        form = "token ids"
    if "input_ids" not in raw:
        if "inputs_embeds" in raw:
            raise ConfigError(
                "lens.trace needs token ids, and this input holds inputs_embeds only; pass input_ids (lens reports "
                "statistics per token, so it must know the tokens)"
            )
        raise InputError(
            f"a tokenizer output needs input_ids; this one has {sorted(raw)}. Pass tokenizer(texts) (or the texts)"
        )
    ids_rows = _to_rows(raw["input_ids"], "input_ids")
    if not ids_rows:
        raise EmptyInputError("lens.trace got no token ids; pass at least one sequence")
    n = len(ids_rows)
    mask_value = raw.get("attention_mask")
    mask_rows = _to_rows(mask_value, "attention_mask") if mask_value is not None else None
    if mask_rows is not None and len(mask_rows) != n:
        raise InputError(f"attention_mask has {len(mask_rows)} rows but input_ids has {n}; pass both from one call")

    accepted = _accepted_fields(lm)
    per_token: dict[str, list[list[int]]] = {}
    informational: list[str] = []
    for name, value in raw.items():
        if name in ("input_ids", "attention_mask") or value is None:
            continue
        if name in INFORMATIONAL_FIELDS:
            informational.append(name)
            continue
        if name == "inputs_embeds":
            raise ConfigError("pass input_ids or inputs_embeds, not both; lens traces token ids")
        if name not in accepted:
            rows = None
            try:
                rows = _to_rows(value, name)
            except InputError:
                pass
            if name == "token_type_ids" and rows is not None and all(v == 0 for row in rows for v in row):
                continue  # a model without token types: all-zero types carry nothing
            raise ConfigError(
                f"the input has a field {name!r} that {lm.model_id} ({type(lm.model).__name__}) does not accept, so "
                f"lens cannot pass it on and will not drop it silently; remove it from the tokenizer output "
                f"(e.g. tokenizer(..., return_{name}=False) or del enc[{name!r}])"
            )
        rows = _to_rows(value, name)
        if len(rows) != n or any(len(r) != len(i) for r, i in zip(rows, ids_rows)):
            raise InputError(f"{name} does not have the shape of input_ids; pass both from one tokenizer call")
        per_token[name] = rows

    ids: list[list[int]] = []
    fields: dict[str, list[list[int]]] = {name: [] for name in per_token}
    sides = set()
    for i, row in enumerate(ids_rows):
        if mask_rows is None:
            start, stop = 0, len(row)
            if not row:
                raise EmptyInputError(
                    f"input {i} has no tokens; every sequence needs at least one token id. Remove it or give it tokens"
                )
        else:
            start, stop, side = _mask_span(row, mask_rows[i], i)
            sides.add(side)
        ids.append(row[start:stop])
        for name, rows in per_token.items():
            fields[name].append(rows[i][start:stop])
    if raw.get("length") is not None:
        flat = _flatten_ints(raw["length"])
        if flat is not None and len(flat) == n and flat not in ([len(r) for r in ids], [len(r) for r in ids_rows]):
            raise InputError(f"the tokenizer output's length {flat} disagrees with its attention_mask; tokenize again")
    for name in ("special_tokens_mask",):
        if name in raw and raw[name] is not None:
            rows = _to_rows(raw[name], name)
            if len(rows) != n or any(len(r) != len(i) for r, i in zip(rows, ids_rows)):
                raise InputError(f"{name} does not have the shape of input_ids; pass both from one tokenizer call")
    vocab = lm.model.get_input_embeddings().num_embeddings
    for i, row in enumerate(ids):
        bad = [t for t in row if not 0 <= t < vocab]
        if bad:
            raise InputError(
                f"input {i} has token ids outside the vocabulary [0, {vocab}) of {lm.model_id}: {bad[:5]}; were they "
                "made by another model's tokenizer? Tokenize with this model's tokenizer (lm.tokenizer)"
            )
    for name, rows in fields.items():
        _check_field_range(lm, name, rows)
    padding = None
    if mask_rows is not None:
        padding = "none" if sides == {"none"} else "/".join(sorted(sides - {"none"}))
    return TokenRows(ids=ids, fields=fields, form=form, padding=padding, informational=sorted(informational))
