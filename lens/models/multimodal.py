"""Image + text inputs of a vision-language model → token sequences with their images, for ``lens.trace``.

Two forms, per sequence (mix them freely with plain strings, which are text-only sequences):

* ``{"image": image, "text": "… <image> …"}`` — or ``"images": [image, …]`` for several; an image is a PIL
  image, an H × W × 3 uint8 numpy array or a file path (``lens.models.images``). The text holds the model's
  image placeholder (``lm.processor.image_token``: ``<image>`` for LLaVA, Idefics3 and SmolVLM,
  ``<|image_pad|>`` for Qwen2-VL, ``<start_of_image>`` for Gemma 3) once per image, where the image goes; the
  processor expands it into the image tokens. ``lens.image_prompt(lm, "Describe the image.")`` writes one.
* the processor's own output for **one** sequence (``processor(images=…, text=…, return_tensors="pt")``), or a
  list of them.

Each sequence is processed and run on its own (batch of one: image tensors differ in shape between
sequences). Bad input → ``InputError`` naming the input and what to do: a missing or surplus placeholder,
more images than placeholders, an unreadable or degenerate image (see ``lens.models.images``), a processor
failure.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lens.errors import ConfigError, EmptyInputError, InputError, InputTooLongError
from lens.models.images import read_image

__all__ = ["is_multimodal_input", "encode_multimodal", "placeholder", "image_prompt", "MultimodalItem"]

_ITEM_KEYS = {"image", "images", "text"}


@dataclass
class MultimodalItem:
    """One sequence after the processor: ids, per-token fields, the other model inputs (pixel tensors, grids),
    and a description of its images."""

    ids: list[int]
    fields: dict[str, list[int]]
    extras: dict[str, torch.Tensor]
    text: str | None
    images: list[dict[str, Any]]


def _is_item(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(set(x) & {"image", "images"}) and "input_ids" not in x


def _is_processed(x: Any) -> bool:
    return isinstance(x, Mapping) and "input_ids" in x and "pixel_values" in x


def is_multimodal_input(inputs: Any) -> bool:
    """Whether ``inputs`` holds images: an ``{"image": …, "text": …}`` item, a processor output with
    ``pixel_values``, or a list containing either."""
    if _is_item(inputs) or _is_processed(inputs):
        return True
    if isinstance(inputs, (list, tuple)):
        return any(_is_item(x) or _is_processed(x) for x in inputs)
    return False


def placeholder(lm) -> str:
    """The text a user writes where an image goes (``lm.processor.image_token``).

    Example: ``placeholder(lens.load("toy-shapes-vlm"))`` → ``'<image>'``.
    """
    processor = getattr(lm, "processor", None)
    token = getattr(processor, "image_token", None) if processor is not None else None
    if not token:
        raise ConfigError(f"{lm.model_id} has no processor with an image token; it is not a vision-language model")
    return str(token)


def image_prompt(lm, question: str = "Describe the image.", n_images: int = 1) -> str:
    """A prompt for ``n_images`` images and a question, through the processor's chat template when it has one
    (the way the model was trained), else ``placeholder × n + "\\n" + question``.

    Example: ``lens.trace(lm, [{"image": img, "text": lens.image_prompt(lm)}])``.
    """
    processor = lm.processor
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
    return placeholder(lm) * n_images + "\n" + question


def _read_item(lm, item: Mapping, index: int) -> tuple[str, list]:
    unknown = set(item) - _ITEM_KEYS
    if unknown:
        raise InputError(f"input {index} has keys {sorted(unknown)}; an image input is {{'image': …, 'text': …}} "
                         "(or 'images': [...] for several)")
    if "image" in item and "images" in item:
        raise InputError(f"input {index} has both 'image' and 'images'; give one of them")
    raw = item.get("images", item.get("image"))
    images = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not images:
        raise EmptyInputError(f"input {index} has an empty list of images; give at least one, or pass the text alone")
    text = item.get("text")
    if text is None:
        raise InputError(f"input {index} has an image but no 'text'; give {{'image': …, 'text': '{placeholder(lm)}\\n…'}} "
                         f"(lens.image_prompt(lm) writes one)")
    from lens.models.inputs import check_text

    text = check_text(text, f"the text of input {index}")
    read = []
    for j, img in enumerate(images):
        where = f"image {j} of input {index}"
        if img is None:
            raise InputError(f"{where} is None; give a PIL image, an H × W × 3 uint8 array or a file path")
        read.append(read_image(img, where))
    token = placeholder(lm)
    found = text.count(token)
    if found == 0:
        raise InputError(
            f"the text of input {index} has no image placeholder {token!r}, so the model would not know where the "
            f"image goes; put {token!r} in the text where the image belongs (lens.image_prompt(lm, question) writes "
            "the model's own prompt)"
        )
    if found != len(read):
        what = "too many images" if len(read) > found else "too few images"
        raise InputError(
            f"input {index}: {what} — {len(read)} image(s) for {found} {token!r} placeholder(s) in the text; give exactly "
            "one placeholder per image"
        )
    return text, read


def _describe(value, image) -> dict[str, Any]:
    source = "path" if not hasattr(value, "size") and not isinstance(value, np.ndarray) else (
        "array" if isinstance(value, np.ndarray) else "PIL")
    out = {"source": source, "width": int(image.size[0]), "height": int(image.size[1])}
    if source == "path":
        out["name"] = str(value).rsplit("/", 1)[-1]
    return out


def _process(lm, text: str, images: list, index: int) -> dict[str, torch.Tensor]:
    try:
        out = lm.processor(images=images, text=[text], return_tensors="pt")
    except Exception as exc:  # the processor's own message, with the input named
        raise InputError(
            f"the processor of {lm.model_id} failed on input {index} ({type(exc).__name__}: {exc}); check the image "
            "and that the text holds one image placeholder per image"
        ) from exc
    return dict(out)


def _split(lm, processed: Mapping, index: int) -> MultimodalItem:
    """One processor output (batch of one) → its ids, per-token fields and the remaining model inputs."""
    from lens.models.forms import _accepted_fields

    ids = processed["input_ids"]
    ids = torch.as_tensor(ids)
    if ids.ndim == 2 and ids.shape[0] != 1:
        raise InputError(
            f"input {index} is a processor output for {ids.shape[0]} sequences; lens runs image sequences one at a "
            "time — pass a list with one processor output per sequence, or [{'image': …, 'text': …}, …]"
        )
    ids = ids.reshape(-1)
    mask = processed.get("attention_mask")
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else torch.as_tensor(mask).reshape(-1).bool()
    accepted = _accepted_fields(lm)
    fields: dict[str, list[int]] = {}
    extras: dict[str, torch.Tensor] = {}
    for name, value in processed.items():
        if name in ("input_ids", "attention_mask"):
            continue
        tensor = torch.as_tensor(value)
        per_token = tensor.ndim in (1, 2) and tensor.shape[-1] == ids.shape[0] and name.endswith("_ids")
        if per_token and name in accepted:
            fields[name] = tensor.reshape(-1)[keep].tolist()
        elif per_token:
            continue  # bookkeeping the model does not take
        else:
            extras[name] = tensor
    return MultimodalItem(ids=ids[keep].tolist(), fields=fields, extras=extras, text=None, images=[])


def encode_multimodal(lm, inputs: Any, *, truncate: bool = False) -> list[MultimodalItem | str]:
    """Read image inputs (module docstring) into per-sequence items; plain strings pass through as strings.

    Raises ``ConfigError`` when ``lm`` is not a vision-language model, ``InputError``/``EmptyInputError``/
    ``InputTooLongError`` for inputs that cannot be used.

    Example: ``encode_multimodal(lm, [{"image": "cat.png", "text": "<image>\\nWhat is this?"}])[0].ids``.
    """
    if not getattr(lm, "is_vlm", False):
        raise ConfigError(
            f"{lm.model_id} is a text model ({type(lm.model).__name__}): it takes no 'pixel_values' or other image "
            "inputs; image inputs need a vision-language model (e.g. lens.load('toy-shapes-vlm'))"
        )
    items = inputs if isinstance(inputs, (list, tuple)) else [inputs]
    if not items:
        raise EmptyInputError("lens.trace got an empty list; pass at least one input")
    out: list[MultimodalItem | str] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
            continue
        if _is_processed(item):
            out.append(_split(lm, item, i))
            continue
        if not isinstance(item, Mapping) or not _is_item(item):
            raise InputError(
                f"input {i} is a {type(item).__name__}; with images, each input is a string, {{'image': …, 'text': …}}, "
                "or the processor's output for one sequence"
            )
        text, images = _read_item(lm, item, i)
        processed = _split(lm, _process(lm, text, images, i), i)
        raw = item.get("images", item.get("image"))
        raw = list(raw) if isinstance(raw, (list, tuple)) else [raw]
        processed.text = text
        processed.images = [_describe(v, img) for v, img in zip(raw, images)]
        out.append(processed)
    for i, item in enumerate(out):
        if isinstance(item, MultimodalItem) and len(item.ids) > lm.max_positions:
            raise InputTooLongError(
                f"input {i} is {len(item.ids):,} tokens long with its image tokens, but {lm.model_id} takes at most "
                f"{lm.max_positions:,} positions; use fewer or smaller images, or a shorter text"
                + (" (truncate=True cannot cut image inputs: it would cut image tokens apart)" if truncate else "")
            )
    return out
