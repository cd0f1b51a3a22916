"""Reading what a user typed or uploaded into inputs for a job, within the dashboard's limits.

Pure functions (no Panel): every refusal is a ``LimitExceededError`` or ``InputError`` whose message is
shown on the page as it is, so it says what was wrong and what to do.

Text uploads: ``.txt`` (one input per non-empty line), ``.jsonl`` (one JSON string or ``{"text": …}`` per
line) or ``.json`` (a list of strings or of ``{"text": …}``), UTF-8. Images: anything Pillow can decode,
within the byte and pixel limits.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from lens.errors import EmptyInputError, InputError, LimitExceededError
from lens.store.config import Limits

__all__ = ["texts_from_typed", "texts_from_upload", "check_texts", "check_image", "ImageInfo", "human_bytes"]


def human_bytes(n: int) -> str:
    """``10_485_760`` → ``'10.5 MB'``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def texts_from_typed(text: str | None) -> list[str]:
    """One input per non-empty line of the text box (surrounding spaces removed)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _item_text(item, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise InputError(f"{where} is neither a string nor an object with a \"text\" string")


def texts_from_upload(filename: str, data: bytes, limits: Limits) -> list[str]:
    """The inputs in an uploaded text file; refuses files over ``limits.upload_bytes`` before reading them.

    Example: ``texts_from_upload("prompts.txt", b"one\\ntwo\\n", Limits())`` → ``['one', 'two']``.
    """
    name = filename or "the upload"
    if len(data) > limits.upload_bytes:
        raise LimitExceededError(
            f"{name} is {human_bytes(len(data))}; uploads are limited to {human_bytes(limits.upload_bytes)}. "
            "Upload fewer or shorter texts"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name} is not UTF-8 text (byte {exc.start} cannot be decoded); upload a .txt, .jsonl or "
                         ".json file saved as UTF-8") from exc
    if "\x00" in text:
        raise InputError(f"{name} contains NUL bytes: it is a binary file, not text")
    lower = name.lower()
    if lower.endswith(".json"):
        try:
            items = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{name} is not valid JSON ({exc}); give a list of strings") from exc
        if not isinstance(items, list):
            raise InputError(f"{name} holds a JSON {type(items).__name__}; give a list of strings")
        return [_item_text(item, f"item {i + 1} of {name}").strip() for i, item in enumerate(items)]
    if lower.endswith(".jsonl"):
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(_item_text(json.loads(line), f"line {i + 1} of {name}").strip())
                except ValueError as exc:
                    raise InputError(f"line {i + 1} of {name} is not valid JSON ({exc})") from exc
        return out
    return texts_from_typed(text)


def check_texts(texts: list[str], limits: Limits) -> list[str]:
    """Refuse an empty job, too many inputs, or an input over ``limits.chars_per_input`` characters (tokens are
    counted by the worker with the model's own tokenizer). Returns ``texts``."""
    if not texts:
        raise EmptyInputError("there is no text to analyse: type at least one line, or upload a text file")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise EmptyInputError(f"input {empty[0] + 1} is empty; remove it or give it some text")
    if len(texts) > limits.inputs_per_job:
        raise LimitExceededError(f"{len(texts)} inputs; a job takes at most {limits.inputs_per_job}. Split them "
                                 "into several jobs")
    long = [i for i, t in enumerate(texts) if len(t) > limits.chars_per_input]
    if long:
        raise LimitExceededError(f"input {long[0] + 1} has {len(texts[long[0]]):,} characters; the limit is "
                                 f"{limits.chars_per_input:,} per input")
    return texts


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int
    bytes: int


def check_image(filename: str, data: bytes, limits: Limits) -> ImageInfo:
    """Check that ``data`` is an image Pillow can decode, within ``limits.image_bytes`` and ``image_pixels``
    (a decompression bomb is refused from its header, before any pixel is decoded)."""
    name = filename or "the upload"
    if len(data) > limits.image_bytes:
        raise LimitExceededError(f"{name} is {human_bytes(len(data))}; images are limited to "
                                 f"{human_bytes(limits.image_bytes)}")
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is in the serve extra
        raise InputError("reading images needs Pillow: pip install 'lens-interp[serve]'") from exc
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.image_pixels:
                raise LimitExceededError(f"{name} is {width} × {height} pixels; images are limited to "
                                         f"{limits.image_pixels:,} pixels")
            fmt = image.format or "?"
            image.verify()
    except LimitExceededError:
        raise
    except Exception as exc:  # Pillow raises many types for files that are not images
        raise InputError(f"{name} is not an image (Pillow cannot read it: {type(exc).__name__}); upload a PNG, "
                         "JPEG or WebP file") from exc
    return ImageInfo(fmt, width, height, len(data))
