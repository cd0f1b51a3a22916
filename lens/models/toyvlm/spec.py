"""The toy VLM's architecture and processor settings, as one JSON-able dict (the committed ``toyvlm.json``).

The language model's own config comes from its folder; everything else — the CLIP vision tower, the LLaVA
projector and feature selection, the image processor, the ``<image>`` token and the chat template — is fixed
here, written next to the trained weights by ``train.py`` and read back by ``build.py``, so a folder built
from committed weights always has the architecture those weights were trained with.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from .data import GRID, IMAGE_SIZE, PATCH_SIZE, PROMPT

IMAGE_TOKEN = "<image>"
SPEC_NAME = "toyvlm.json"

# ChatML as SmolLM2-Instruct uses it, without its default system prompt; an image item renders as one
# "<image>" placeholder (the processor expands it to GRID**2 tokens) followed by a newline.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image>\n' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

_SPEC: dict[str, Any] = {
    "name": "toy-shapes-vlm",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 192,
        "intermediate_size": 768,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 192,
    },
    "llava": {
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",  # drop CLIP's CLS: GRID**2 image tokens, row-major
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "image_seq_length": GRID * GRID,
    },
    "image_processor": {
        "size": {"shortest_edge": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
    },
    "image_token": IMAGE_TOKEN,
    "prompt": PROMPT,
    "chat_template": CHAT_TEMPLATE,
    "grid": [GRID, GRID],
}


def default_spec() -> dict[str, Any]:
    """A fresh copy of the toy VLM's settings (what ``train.py`` trains and writes as ``toyvlm.json``).

    Returns:
        dict with keys ``vision_config``, ``llava``, ``image_processor``, ``image_token``, ``prompt``,
        ``chat_template``, ``grid``, ``name``.

    Example:
        >>> default_spec()["grid"]
        [6, 6]
    """
    return copy.deepcopy(_SPEC)


def read_spec(path: str | Path) -> dict[str, Any]:
    """Read a ``toyvlm.json`` (or the folder holding one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a key of :func:`default_spec` is missing.

    Example:
        >>> read_spec(Path(__file__).parent)["image_token"]
        '<image>'
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_NAME
    spec = json.loads(path.read_text())
    missing = set(_SPEC) - set(spec)
    if missing:
        raise ValueError(f"{path}: missing keys {sorted(missing)}")
    return spec


def prompt_text(question: str | None = None, spec: dict[str, Any] | None = None) -> str:
    """The exact text (before image-token expansion) that the chat template renders for one image + question.

    Example:
        >>> prompt_text()
        '<|im_start|>user\\n<image>\\nDescribe the image.<|im_end|>\\n<|im_start|>assistant\\n'
    """
    spec = spec or _SPEC
    q = spec["prompt"] if question is None else question
    return f"<|im_start|>user\n{spec['image_token']}\n{q}<|im_end|>\n<|im_start|>assistant\n"


def llava_config(text_config, spec: dict[str, Any], image_token_id: int):
    """A ``transformers.LlavaConfig`` from the language model's ``LlamaConfig`` and the spec.

    Args:
        text_config: the decoder's config (its ``vocab_size`` must already include the ``<image>`` token).
        spec: :func:`default_spec` or :func:`read_spec` output.
        image_token_id: id of ``<image>`` in the tokenizer (and row of the embedding matrix).

    Returns:
        ``LlavaConfig`` (ties the LM head to the input embeddings like SmolLM2).

    Example:
        >>> from transformers import LlamaConfig
        >>> llava_config(LlamaConfig(vocab_size=50), default_spec(), 49).image_seq_length
        36
    """
    from transformers import CLIPVisionConfig, LlavaConfig

    vision = {k: v for k, v in spec["vision_config"].items() if k != "model_type"}
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=text_config,
        image_token_id=image_token_id,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", True)),
        **spec["llava"],
    )
    return config


def make_processor(tokenizer, spec: dict[str, Any]):
    """A ``transformers.LlavaProcessor``: PIL CLIP image processor + the tokenizer with ``<image>`` added.

    Args:
        tokenizer: the language model's tokenizer (a copy gets ``<image>`` as an added special token when it
            lacks one; the argument itself is not changed).
        spec: :func:`default_spec` or :func:`read_spec` output.

    Returns:
        ``LlavaProcessor`` whose ``__call__(images=..., text=...)`` expands each ``<image>`` to ``GRID**2``
        tokens and returns ``pixel_values`` of shape [B, 3, 96, 96] (float32, normalized to [-1, 1]).

    Example:
        >>> from transformers import AutoTokenizer                  # doctest: +SKIP
        >>> proc = make_processor(AutoTokenizer.from_pretrained(default_language_model()), default_spec())  # doctest: +SKIP
    """
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = copy.deepcopy(tokenizer)
    token = spec["image_token"]
    if token not in tok.get_vocab():
        tok.add_tokens([token], special_tokens=True)
    return LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**spec["image_processor"]),
        tokenizer=tok,
        patch_size=spec["vision_config"]["patch_size"],
        vision_feature_select_strategy=spec["llava"]["vision_feature_select_strategy"],
        num_additional_image_tokens=1,  # CLIP's CLS; "default" drops it again
        chat_template=spec["chat_template"],
        image_token=token,
    )
