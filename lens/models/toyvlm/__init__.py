"""toy-shapes-vlm: a small trained LLaVA (CLIP vision tower + projector + frozen SmolLM2-135M-Instruct), offline.

The demo vision-language model of lens: images of one coloured shape at one of nine positions, generated
with known contents (:mod:`.data`), captioned by a real ``transformers.LlavaForConditionalGeneration``
whose vision tower and projector were trained here on CPU (:mod:`.train`) and whose language model is the
embedded SmolLM2 GGUF dequantized to a saved folder (:mod:`.lm`). :func:`build_folder` writes a folder that
loads like a hub LLaVA; :func:`load` returns ``(model, processor)``.

Example::

    from lens.models import toyvlm
    model, processor = toyvlm.load()
    scene = toyvlm.make_scene(0)
    inputs = processor(images=scene.image, text=toyvlm.prompt_text(), return_tensors="pt")
    model.generate(**inputs, max_new_tokens=16)

Image tokens: the 36 positions where ``input_ids == model.config.image_token_id``, row-major over the
6 × 6 patch grid: token ``k`` covers patch ``(k // 6, k % 6)`` (:func:`token_cell`); ``Scene.token_indices``
lists the tokens that cover the object, ``Scene.words()`` the words that name it.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "COLOURS": "data", "SHAPES": "data", "POSITIONS": "data", "SYNONYMS": "data", "GRID": "data",
    "IMAGE_SIZE": "data", "PATCH_SIZE": "data", "PROMPT": "data", "Scene": "data", "make_scene": "data",
    "make_scenes": "data", "parse_caption": "data", "token_cell": "data",
    "prompt_text": "spec", "default_spec": "spec",
    "default_language_model": "build",
    "build_folder": "build", "load": "build", "assemble_model": "build", "committed_weights": "build",
    "heldout_accuracy": "evaluate", "generate_captions": "evaluate",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
