"""A vision-language model's processor (image processor + tokenizer), loaded the way transformers does.

``AutoProcessor.from_pretrained`` is the first choice. Some processors (Qwen2-VL, Qwen2.5-VL, SmolVLM) also
hold a *video* processor, which transformers can only build with torchvision installed; without it,
``AutoProcessor`` fails even for images. lens then builds the same processor class around its image processor
and tokenizer with no video processor (:func:`image_only_processor`) — images work exactly as with the full
processor, and asking it for a video raises a clear error. Nothing else in transformers does this, hence the
small amount of code here.

Example::

    processor = load_processor("./tiny-qwen2-vl")
    processor(images=[image], text=["<|vision_start|><|image_pad|><|vision_end|>Describe."], return_tensors="pt")
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lens.errors import ModelLoadError

__all__ = ["load_processor", "image_only_processor", "save_image_only_processor", "torchvision_available"]


def torchvision_available() -> bool:
    """Whether torchvision can be imported (transformers' video processors need it)."""
    return importlib.util.find_spec("torchvision") is not None


def _processor_config(where: str) -> dict[str, Any]:
    path = Path(where) / "processor_config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            return {}
    return {}


def image_only_processor(processor_class, image_processor, tokenizer, **kwargs):
    """An instance of ``processor_class`` (e.g. ``Qwen2VLProcessor``) built without a video processor.

    Its ``__call__`` with ``images=`` and ``text=`` is the class's own; ``videos=`` raises ``ValueError``.
    The instance is of a subclass of ``processor_class`` (``isinstance`` holds) that only relaxes the class
    check of the missing video processor.

    Example: ``image_only_processor(transformers.Qwen2VLProcessor, Qwen2VLImageProcessorPil(), tok)``.
    """
    class ImageOnly(processor_class):  # noqa: D401 - a thin subclass, named after its parent below
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

        def __call__(self, *args, videos=None, **kw):
            if videos is not None:
                raise ValueError(
                    f"this {processor_class.__name__} was built without a video processor (transformers needs "
                    "torchvision for one); pass images only, or install torchvision"
                )
            return super().__call__(*args, **kw)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs)


def save_image_only_processor(processor, folder: str | Path) -> None:
    """Save a processor that has no video processor the way ``save_pretrained`` lays a processor out
    (``processor_config.json`` with the image processor nested, the tokenizer files, the chat template) —
    ``ProcessorMixin.save_pretrained`` itself refuses a missing sub-processor.

    Example: ``save_image_only_processor(image_only_processor(...), "./tiny-qwen2-vl")``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(folder)
    config = {k: v for k, v in processor.to_dict().items() if k not in ("tokenizer", "video_processor", "chat_template")}
    config["image_processor"] = processor.image_processor.to_dict()
    config["processor_class"] = type(processor).__name__  # the image-only subclass carries its parent's name
    (folder / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    template = getattr(processor, "chat_template", None)
    if isinstance(template, str):
        (folder / "chat_template.jinja").write_text(template)


def _fallback(where: str, revision, trust_remote_code, first: Exception):
    import inspect

    import transformers

    config = _processor_config(where)
    name = config.get("processor_class")
    cls = getattr(transformers, name, None) if name else None
    if cls is None or "video_processor" not in inspect.signature(cls.__init__).parameters:
        raise first
    from transformers import AutoImageProcessor, AutoTokenizer

    image_processor = AutoImageProcessor.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in config.items() if k in params and k not in ("image_processor", "tokenizer", "video_processor")}
    template = Path(where) / "chat_template.jinja"
    if "chat_template" in params and "chat_template" not in kwargs and template.is_file():
        kwargs["chat_template"] = template.read_text()
    return image_only_processor(cls, image_processor, tokenizer, **kwargs)


def load_processor(where: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """The processor of a VLM folder or hub id: ``AutoProcessor``, or the image-only fallback described in
    the module docstring when the processor's video part needs torchvision.

    Raises ``ModelLoadError`` saying what the folder needs when neither works.
    Example: ``load_processor("./tiny-llava").image_processor``.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        first = exc
    try:
        return _fallback(where, revision, trust_remote_code, first)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the processor (image processor + tokenizer) of {where!r} ({type(first).__name__}: "
            f"{first}). A vision-language model folder needs processor_config.json (or preprocessor_config.json) "
            "and the tokenizer files, as written by processor.save_pretrained(folder); or pass one: "
            "lens.load(model, processor=AutoProcessor.from_pretrained(...))"
        ) from exc
