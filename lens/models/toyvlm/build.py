"""Assemble the toy VLM — a real ``transformers.LlavaForConditionalGeneration`` — from its parts.

Parts: a language-model folder (a saved ``LlamaForCausalLM`` + tokenizer; by default the embedded
SmolLM2-135M-Instruct, dequantized from its GGUF file into lens's cache by
:func:`lens.models.embedded.smollm2_folder`), the trained vision tower + projector weights
(``weights.safetensors``, committed beside this file) and the settings they were trained with
(``toyvlm.json``). :func:`build_folder` writes a folder that generic code loads like a hub LLaVA::

    model = LlavaForConditionalGeneration.from_pretrained(folder)   # or AutoModelForImageTextToText
    processor = AutoProcessor.from_pretrained(folder)

The ``<image>`` token is added to the tokenizer (id = the LM's vocabulary size, 49152 for SmolLM2) and the
embedding matrix gets one more row, the mean of the existing rows (deterministic; the row is never looked up
for image positions, whose embeddings are replaced by projected visual features).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lens.models.cache import atomic_folder, cache_dir

from .spec import SPEC_NAME, default_spec, llava_config, make_processor, read_spec

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS_NAME = "weights.safetensors"
TRAINABLE_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")
_MARKER = "toyvlm-source.json"


def default_language_model(*, fetch: bool = True) -> Path:
    """The frozen decoder's folder: the embedded SmolLM2-135M-Instruct, dequantized, in lens's cache.

    ``fetch=False`` raises ``ModelLoadError`` naming ``lens models fetch smollm2`` when it is not cached.
    Example: ``default_language_model().name`` → the GGUF file's sha256.
    """
    from lens.models.embedded import smollm2_folder

    return smollm2_folder(fetch=fetch)


def committed_weights() -> Path:
    """Path of the trained vision tower + projector weights shipped with lens (``weights.safetensors``).

    Example:
        >>> committed_weights().name
        'weights.safetensors'
    """
    return PACKAGE_DIR / WEIGHTS_NAME


def assemble_model(
    language_model_dir: str | Path,
    weights: str | Path | None = None,
    *,
    spec: dict[str, Any] | None = None,
    seed: int = 0,
):
    """Build the LLaVA model and processor in memory (fp32, eval mode).

    Args:
        language_model_dir: folder with a saved Llama-architecture causal LM + tokenizer.
        weights: a ``weights.safetensors`` of vision tower + projector tensors (any float dtype; cast to
            fp32). ``None`` leaves them freshly initialised from ``seed`` (what training starts from).
        spec: settings (:func:`~lens.models.toyvlm.spec.default_spec`); default: the ``toyvlm.json`` beside
            ``weights`` when there is one, else the default spec.
        seed: ``torch`` seed for the fresh initialisation.

    Returns:
        ``(model, processor)``: ``LlavaForConditionalGeneration`` with the LM weights copied in and the LM head
        tied to the input embeddings, and its ``LlavaProcessor``.

    Raises:
        ValueError: ``weights`` lacks a vision/projector tensor, has an unexpected key or a wrong shape.

    Example:
        >>> model, processor = assemble_model(default_language_model(), committed_weights())  # doctest: +SKIP
    """
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    if spec is None:
        beside = Path(weights).parent / SPEC_NAME if weights is not None else None
        spec = read_spec(beside) if beside is not None and beside.is_file() else default_spec()
    lm = LlamaForCausalLM.from_pretrained(language_model_dir, dtype=torch.float32)
    processor = make_processor(AutoTokenizer.from_pretrained(language_model_dir), spec)
    image_token_id = processor.image_token_id
    text_config = lm.config.__class__.from_dict(lm.config.to_dict())
    text_config.vocab_size = max(len(processor.tokenizer), lm.config.vocab_size)
    config = llava_config(text_config, spec, image_token_id)

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    state = lm.model.state_dict()
    emb = state["embed_tokens.weight"]
    extra = text_config.vocab_size - emb.shape[0]
    if extra:
        state["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True).expand(extra, -1)])
    model.model.language_model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    else:
        head = lm.lm_head.weight.detach()
        model.lm_head.weight.data.copy_(torch.cat([head, head.mean(0, keepdim=True).expand(extra, -1)]))
    if weights is not None:
        load_trainable(model, load_file(str(weights)))
    model.generation_config.eos_token_id = lm.generation_config.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.bos_token_id = lm.generation_config.bos_token_id
    model.generation_config.suppress_tokens = [image_token_id]
    model.eval()
    return model, processor


def trainable_state(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The vision tower + projector tensors of a toy VLM (the only trained part), detached copies.

    Args:
        model: ``LlavaForConditionalGeneration``.
        dtype: cast to this dtype (e.g. ``torch.float16`` for the committed file); default unchanged.

    Returns:
        dict ``name -> tensor`` with names as in ``model.state_dict()`` (``model.vision_tower.…``,
        ``model.multi_modal_projector.…``).

    Example:
        >>> sorted(trainable_state(model))[0]          # doctest: +SKIP
        'model.multi_modal_projector.linear_1.bias'
    """
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(TRAINABLE_PREFIXES):
            t = tensor.detach().clone()
            out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    """Copy vision tower + projector tensors into ``model`` in place (cast to the model's dtypes).

    Raises:
        ValueError: a trainable tensor is missing, a key is unexpected, or a shape differs.

    Example:
        >>> load_trainable(model, trainable_state(other_model))   # doctest: +SKIP
    """
    own = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"toy VLM weights: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, target in own.items():
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(f"{name}: shape {tuple(state[name].shape)}, model has {tuple(target.shape)}")
            target.copy_(state[name].to(target.dtype))


def _source_key(weights: Path, lm_dir: Path) -> tuple[str, dict[str, Any]]:
    spec_path = weights.parent / SPEC_NAME
    source = {
        "weights_sha256": _sha256(weights.read_bytes()),
        "spec_sha256": _sha256(spec_path.read_bytes()),
        "language_model_config_sha256": _sha256((lm_dir / "config.json").read_bytes()),
        # a dequantized GGUF folder names the file it came from (lens-gguf.json); other folders their sizes
        "language_model_source": _gguf_sha256(lm_dir),
        "language_model_files": sorted(
            (p.name, p.stat().st_size) for p in lm_dir.iterdir() if p.suffix in (".safetensors", ".bin")
        ),
    }
    return _sha256(json.dumps(source, sort_keys=True).encode())[:16], source


def built_folder() -> Path | None:
    """The default build (committed weights + the cached SmolLM2) if it is already in lens's cache, else None.
    Never builds or fetches anything.

    Example: ``built_folder()`` → ``PosixPath('~/.cache/lens/toyvlm/3f…')`` or None.
    """
    try:
        lm_dir = default_language_model(fetch=False)
    except Exception:
        return None
    key, _ = _source_key(committed_weights(), lm_dir)
    out = cache_dir() / "toyvlm" / key
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return out
    return None


def build_folder(
    language_model_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    weights: str | Path | None = None,
) -> Path:
    """Write the complete toy VLM as a Hugging Face LLaVA folder (config, safetensors, processor files).

    The folder loads with ``LlavaForConditionalGeneration.from_pretrained(folder)`` (or
    ``AutoModelForImageTextToText``) and ``AutoProcessor.from_pretrained(folder)``; no network. It is cached:
    when ``out_dir`` already holds a build of the same inputs (language-model config and source, weights
    bytes, ``toyvlm.json``) it is returned at once. Writing is atomic (temp folder + rename); ~1 s + the
    language model's size on disk (~540 MB fp32 for SmolLM2-135M).

    Args:
        language_model_dir: saved LM + tokenizer folder; default :func:`default_language_model` (the embedded
            SmolLM2-135M-Instruct, dequantized from its GGUF file in lens's cache).
        out_dir: target folder; default ``$LENS_CACHE/toyvlm/<hash of the inputs>``.
        weights: vision tower + projector safetensors; default :func:`committed_weights`. Its ``toyvlm.json``
            must lie beside it (the committed one does).

    Returns:
        Path of the folder.

    Raises:
        FileNotFoundError: no weights, no ``toyvlm.json`` beside them, or no language model in the folder given.
        lens.errors.ModelLoadError: the embedded SmolLM2 is not cached and cannot be fetched (the message names
            ``lens models fetch smollm2``).

    Example:
        >>> folder = build_folder()                                             # doctest: +SKIP
        >>> from transformers import AutoModelForImageTextToText, AutoProcessor  # doctest: +SKIP
        >>> model = AutoModelForImageTextToText.from_pretrained(folder)          # doctest: +SKIP
    """
    weights = Path(weights) if weights is not None else committed_weights()
    if not weights.is_file():
        raise FileNotFoundError(f"toy VLM weights not found: {weights}")
    spec_path = weights.parent / SPEC_NAME
    if not spec_path.is_file():
        raise FileNotFoundError(f"{SPEC_NAME} must lie beside {weights}")
    lm_dir = Path(language_model_dir) if language_model_dir is not None else default_language_model()
    if not (lm_dir / "config.json").is_file():
        raise FileNotFoundError(f"no saved language model (config.json) in {lm_dir}")

    key, source = _source_key(weights, lm_dir)
    out = Path(out_dir) if out_dir is not None else cache_dir() / "toyvlm" / key
    marker = out / _MARKER
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return out

    model, processor = assemble_model(lm_dir, weights)
    if out.exists():  # a stale build (other weights or language model): replaced as a whole
        shutil.rmtree(out)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        shutil.copyfile(spec_path, tmp / SPEC_NAME)
        (tmp / _MARKER).write_text(json.dumps({"key": key, **source}, indent=1))
    return out


def load(language_model_dir: str | Path | None = None, weights: str | Path | None = None, **kwargs):
    """Build (or reuse) the folder and load it the generic way: ``(model, processor)``.

    Args:
        language_model_dir, weights: as for :func:`build_folder`.
        **kwargs: passed to ``LlavaForConditionalGeneration.from_pretrained`` (e.g. ``dtype``).

    Returns:
        ``(LlavaForConditionalGeneration in eval mode, LlavaProcessor)``.

    Example:
        >>> model, processor = load()                                     # doctest: +SKIP
        >>> scene = make_scene(0)                                          # doctest: +SKIP
        >>> inputs = processor(images=scene.image, text=prompt_text(), return_tensors="pt")  # doctest: +SKIP
        >>> processor.decode(model.generate(**inputs)[0, inputs["input_ids"].shape[1]:])     # doctest: +SKIP
        'a red circle at the top left.<|im_end|>'
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = build_folder(language_model_dir, weights=weights)
    model = LlavaForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(folder)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _gguf_sha256(folder: Path) -> str | None:
    manifest = folder / "lens-gguf.json"
    if not manifest.is_file():
        return None
    return json.loads(manifest.read_text()).get("gguf", {}).get("sha256")
