"""Reading one image a user hands to ``lens.trace``: a PIL image, a numpy array or a file path → RGB PIL.

Accepted: ``PIL.Image.Image`` in any 8-bit mode (``RGB``, ``RGBA`` and ``LA`` — composited over white, as
transformers' ``convert_to_rgb`` does —, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``1``), numpy ``uint8`` arrays H × W
(grey), H × W × 1, H × W × 3 (RGB) or H × W × 4 (RGBA), and paths (``str`` / ``os.PathLike``) of files PIL
can read. Everything else is refused with an ``InputError`` that names the input and what to do: unreadable
or missing files, 0-pixel images, high-bit-depth or float modes (``I;16``, ``I``, ``F``: the scaling to 8 bit is
the user's decision), float or channels-first arrays, absurd sizes (more than ``MAX_PIXELS`` pixels or an
aspect ratio beyond ``MAX_ASPECT``, where processors fail or allocate gigabytes).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lens.errors import InputError

__all__ = ["read_image", "is_image", "MAX_PIXELS", "MAX_ASPECT"]

#: more pixels than this (a 16384 × 16384 image) is refused before any processor sees it
MAX_PIXELS = 16384 * 16384
#: width/height (or its inverse) beyond this is refused (Qwen2-VL's processor refuses beyond 200 too)
MAX_ASPECT = 200

_EIGHT_BIT = {"1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "PA", "La", "RGBa", "RGBX", "LAB", "HSV"}


def is_image(value: Any) -> bool:
    """Whether ``value`` looks like an image lens reads (PIL image, numpy array, or a path)."""
    if isinstance(value, np.ndarray):
        return True
    if isinstance(value, (str, os.PathLike)):
        return True
    return type(value).__module__.startswith("PIL.") and hasattr(value, "mode") and hasattr(value, "size")


def _check_size(width: int, height: int, where: str) -> None:
    if width <= 0 or height <= 0:
        raise InputError(f"{where} is {width} × {height} pixels: an empty image. Give an image with pixels")
    if width * height > MAX_PIXELS:
        raise InputError(
            f"{where} is {width} × {height} = {width * height:,} pixels, more than lens accepts ({MAX_PIXELS:,}); "
            "the processor would resize it anyway — downscale it first, e.g. image.thumbnail((2048, 2048))"
        )
    if max(width / height, height / width) > MAX_ASPECT:
        raise InputError(
            f"{where} is {width} × {height} pixels, an aspect ratio beyond {MAX_ASPECT}:1 that vision processors cannot "
            "cut into patches; crop or pad it to a less extreme shape"
        )


def _from_array(array: np.ndarray, where: str):
    from PIL import Image

    if array.dtype != np.uint8:
        hint = ("(array * 255).round().astype(np.uint8) if it holds values in [0, 1]" if array.dtype.kind == "f"
                else "array.astype(np.uint8) after scaling it to 0..255")
        raise InputError(f"{where} is a numpy array of dtype {array.dtype}; images are uint8 (0..255). Convert it: {hint}")
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        raise InputError(
            f"{where} has shape {array.shape}, which looks channels-first (C × H × W); lens reads H × W × C. "
            "Transpose it: array.transpose(1, 2, 0)"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        _check_size(array.shape[1], array.shape[0], where)
        return Image.fromarray(np.ascontiguousarray(array), "L")
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise InputError(
            f"{where} has shape {array.shape}; an image array is H × W (grey), H × W × 3 (RGB) or H × W × 4 (RGBA), uint8"
        )
    _check_size(array.shape[1], array.shape[0], where)
    return Image.fromarray(np.ascontiguousarray(array), "RGB" if array.shape[-1] == 3 else "RGBA")


def _open(path: Path, where: str):
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        raise InputError(f"{where}: there is no file {str(path)!r}; give the path of an image file (PNG, JPEG, …)")
    if path.is_dir():
        raise InputError(f"{where}: {str(path)!r} is a folder, not an image file")
    try:
        with Image.open(path) as handle:
            _check_size(handle.size[0], handle.size[1], f"{where} ({path.name})")
            handle.load()  # decode now: a truncated file fails here, not inside the processor
            return handle.copy()
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(
            f"{where}: PIL cannot read {str(path)!r} as an image ({type(exc).__name__}: {exc}); the file is not an "
            "image, or it is truncated or corrupted. Give a readable PNG/JPEG/WebP/… file"
        ) from None


def read_image(value: Any, where: str = "the image"):
    """One image → an RGB ``PIL.Image.Image`` (see the module docstring for what is accepted).

    Raises ``InputError`` naming ``where`` and what to do for anything else.

    Example: ``read_image(np.zeros((32, 32, 3), np.uint8)).size`` → ``(32, 32)``.
    """
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb

    if isinstance(value, (bytes, bytearray)):
        raise InputError(f"{where} is bytes; open it first: PIL.Image.open(io.BytesIO(data))")
    if isinstance(value, (str, os.PathLike)):
        image = _open(Path(value).expanduser(), where)
    elif isinstance(value, np.ndarray):
        image = _from_array(value, where)
    elif isinstance(value, Image.Image):
        image = value
        _check_size(image.size[0], image.size[1], where)
    elif type(value).__module__.startswith("torch"):
        raise InputError(
            f"{where} is a torch tensor; give a PIL image or an H × W × 3 uint8 numpy array, e.g. "
            "tensor.permute(1, 2, 0).mul(255).round().byte().numpy() for a C × H × W float tensor in [0, 1]"
        )
    else:
        raise InputError(
            f"{where} is a {type(value).__name__}; give a PIL image, an H × W × 3 uint8 numpy array or a file path"
        )
    if image.mode not in _EIGHT_BIT:
        raise InputError(
            f"{where} has PIL mode {image.mode!r} (more than 8 bits per channel, or floating point); lens does not guess "
            "how to scale it to 8 bits. Convert it yourself, e.g. Image.fromarray((a / a.max() * 255).astype('uint8')) "
            "with a = np.asarray(image)"
        )
    if image.mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGBA":  # transparency composited over white, as transformers' processors do
        return Image.fromarray(convert_to_rgb(image, return_numpy=True), "RGB")
    return image.convert("RGB")
