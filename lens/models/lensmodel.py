"""``LensModel``: a Hugging Face model plus what lens needs to know about it (parts, shape, deployment)."""

from __future__ import annotations

import functools
import importlib.metadata
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lens.errors import ConfigError, ModelLoadError
from lens.models import attention as lens_attention
from lens.models.families import Family, VisionFamily, family_for, vision_family_for
from lens.models.signature import embedding_signature

__all__ = ["LensModel", "DEFAULT_MODEL_ID"]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@functools.lru_cache(maxsize=None)  # read once per process: lens.scan asks per batch (30 ms each)
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
    raise ConfigError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)} or a torch.dtype; pass one of those")


def _resolve_attention(attention) -> lens_attention.AttentionKernel | None:
    """``"dense"``/None → dense SDPA; an object with ``describe()`` and ``__call__`` → that kernel;
    a sparse configuration → the sparse kernel built from it."""
    if attention is None or (isinstance(attention, str) and attention.lower() in ("dense", "sdpa")):
        return None
    from lens.models import (
        deploy,  # the deployment kernels are only imported when asked for
    )

    return deploy.attention_kernel(attention)


def _llamacpp_attention(activations, attention, quant):
    """``activations="llama.cpp"``: llama.cpp's numerics — its quantized matmuls (needs a GGUF ``quant``) and
    its f16 KV cache (the attention kernel returned here)."""
    from lens.models.llamacpp import LLAMA_CPP, LlamaCppAttention

    if activations != LLAMA_CPP:
        raise ConfigError(f"activations must be None or {LLAMA_CPP!r}, got {activations!r}")
    if quant is None:
        raise ConfigError(
            "activations='llama.cpp' emulates llama.cpp's quantized matmuls: give quant='keep' (a GGUF file's own "
            "blocks) or a GGUF type such as quant='q4_k'"
        )
    if not (attention is None or (isinstance(attention, str) and attention.lower() in ("dense", "sdpa"))):
        raise ConfigError("activations='llama.cpp' runs llama.cpp's dense attention (f16 KV cache); it cannot be "
                          f"combined with attention={attention!r}")
    return LlamaCppAttention()


@dataclass(frozen=True)
class _Parts:
    base: nn.Module
    blocks: list[nn.Module]
    attention: list[nn.Module]
    mlp_out: list[nn.Module]
    final_norm: nn.Module | None
    routers: list[nn.Module | None]
    experts: list[nn.Module | None]


def _optional(block: nn.Module, path: str | None) -> nn.Module | None:
    if path is None:
        return None
    try:
        return block.get_submodule(path)
    except AttributeError:  # e.g. a dense layer of a partly sparse model (Qwen3-MoE's mlp_only_layers)
        return None


def _find_parts(model: nn.Module, family: Family, vision: VisionFamily | None = None) -> _Parts:
    base = getattr(model, "base_model", model)
    # Some task heads (…ForCausalLM) expose the decoder as base_model.model; the family paths start at
    # the module that owns the block list. A VLM's row says where its language model is.
    candidates = (base, getattr(base, "model", None), getattr(base, "language_model", None))
    if vision is not None:
        try:
            candidates = (base.get_submodule(vision.language_model),)
        except AttributeError as exc:
            raise ModelLoadError(
                f"{type(model).__name__} has no language model at {vision.language_model!r} (the {vision.name!r} "
                "row of lens.models.families); register a matching VisionFamily for this architecture"
            ) from exc
    for candidate in candidates:
        if candidate is None:
            continue
        try:
            blocks = list(candidate.get_submodule(family.layers))
        except AttributeError:
            continue
        try:
            attention = [b.get_submodule(family.attention) for b in blocks]
            mlp_out = [b.get_submodule(family.mlp_out) for b in blocks] if family.mlp_out else []
            final = candidate.get_submodule(family.final_norm) if family.final_norm else None
            routers = [_optional(b, family.router) for b in blocks]
            experts = [_optional(b, family.experts) for b in blocks]
        except AttributeError as exc:
            raise ModelLoadError(
                f"{type(model).__name__} does not have the layout of the {family.name!r} family ({exc}). "
                "If this is a modified architecture, register a matching lens.models.families.Family."
            ) from exc
        if family.router and not any(r is not None for r in routers):
            raise ModelLoadError(
                f"{type(model).__name__} has no MoE router at {family.router!r} in any block; register a "
                "lens.models.families.Family whose router/experts paths match this model"
            )
        return _Parts(candidate, blocks, attention, mlp_out, final, routers, experts)
    raise ModelLoadError(
        f"could not find the block list {family.layers!r} of the {family.name!r} family in {type(model).__name__}"
    )


class LensModel:
    """A loaded transformer with its tokenizer, deployment configuration and architecture facts.

    Build it with ``lens.load``; run it with ``lens.trace``. ``lens_model.model`` is the Hugging Face
    model itself (already using lens's attention function), usable as usual. For a vision-language model,
    ``processor`` is its processor, ``vision_family`` its row, ``vision_tower`` / ``projector`` /
    ``vision_blocks`` its parts (the language model's parts are the usual ``blocks``, ``attention_modules``, …).

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
        progress: bool | None = None,
        gguf: dict[str, Any] | None = None,
        gguf_path: str | None = None,
        activations: str | None = None,
        processor=None,
        deploy_vision: bool = False,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.revision = revision
        self.source = source
        # the GGUF file the weights came from (lens.models.gguf.GGUFInfo.describe()), recorded in provenance
        self.gguf = gguf
        self.gguf_path = gguf_path  # the file itself, for quant="keep"
        self.config = model.config
        self.processor = processor
        self.vision_family = vision_family_for(self.config)
        self.family = family_for(getattr(self.config, "text_config", None) or self.config)
        parts = _find_parts(model, self.family, self.vision_family)
        self.base = parts.base
        self.blocks = parts.blocks
        self.attention_modules = parts.attention
        self.mlp_out_modules = parts.mlp_out
        self.final_norm = parts.final_norm
        self.router_modules = parts.routers
        self.expert_modules = parts.experts
        self.layer_of_attention = {id(m): i for i, m in enumerate(self.attention_modules)}
        cfg = self.text_config
        self.n_layers = len(self.blocks)
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.d_model = int(cfg.hidden_size)
        self.d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * self.d_model)
        if self.mlp_out_modules and isinstance(getattr(self.mlp_out_modules[0], "in_features", None), int):
            self.d_mlp = int(self.mlp_out_modules[0].in_features)  # e.g. Qwen2-MoE's shared expert
        first_experts = next((e for e in self.expert_modules if e is not None), None)
        self.d_expert = int(first_experts.down_proj.shape[-1]) if first_experts is not None else 0
        self.causal = self.family.causal
        self.n_experts = int(getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None) or 0)
        self.experts_per_token = int(getattr(cfg, "num_experts_per_tok", None) or 0) if self.n_experts else 0
        self.max_positions = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 10**9
        )
        if self.family.name == "bert" and getattr(cfg, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
            # RoBERTa reserves padding_idx + 1 positions before the first token
            self.max_positions -= int(getattr(cfg, "pad_token_id", 1) or 1) + 1
        self.attention_kernel = None
        self.quant = None
        self.quant_report: dict[str, Any] | None = None
        self.deploy_vision = bool(deploy_vision)
        self._find_vision_parts()
        if self.deploy_vision and self.vision_family is None:
            raise ConfigError("deploy_vision=True applies to vision-language models; this model has no vision tower")
        lens_attention.register()
        self.model.set_attn_implementation(lens_attention.IMPLEMENTATION)
        if activations is not None:
            attention = _llamacpp_attention(activations, attention, quant)
        self.set_attention(attention)
        if quant is not None:
            self.set_quant(quant, calibration=calibration, activations=activations, progress=progress)

    def _find_vision_parts(self) -> None:
        """A VLM's vision tower, projector, vision layers and their attention modules (from its family row)."""
        self.vision_tower = self.projector = None
        self.vision_blocks: list[nn.Module] = []
        self.vision_attention_modules: list[nn.Module] = []
        self.vision_layer_of_attention: dict[int, int] = {}
        self.vision_config = None
        self.image_token_id: int | None = None
        fam = self.vision_family
        if fam is None:
            return
        root = getattr(self.model, "base_model", self.model)
        try:
            self.vision_tower = root.get_submodule(fam.vision_tower)
            self.projector = root.get_submodule(fam.projector)
            self.vision_blocks = list(self.vision_tower.get_submodule(fam.vision_layers))
            self.vision_attention_modules = [b.get_submodule(fam.vision_attention) for b in self.vision_blocks]
        except AttributeError as exc:
            raise ModelLoadError(
                f"{type(self.model).__name__} does not have the layout of the {fam.name!r} vision family ({exc}); "
                "register a matching lens.models.families.VisionFamily"
            ) from exc
        self.vision_layer_of_attention = {id(m): i for i, m in enumerate(self.vision_attention_modules)}
        self.vision_config = self.config.vision_config
        token = getattr(self.config, fam.image_token, None)
        if token is None:
            raise ModelLoadError(f"{type(self.model).__name__}'s config has no {fam.image_token!r} (the image token id)")
        self.image_token_id = int(token)

    @property
    def backbone(self) -> nn.Module:
        """The module a trace runs when no LM head is needed: the language model itself, or — for a VLM — the
        multimodal base model (vision tower, projector and language model; e.g. ``LlavaModel``)."""
        if self.vision_family is not None:
            return getattr(self.model, "base_model", self.model)
        return self.base

    @property
    def is_vlm(self) -> bool:
        """Whether this is a vision-language model (it has a :class:`VisionFamily` row)."""
        return self.vision_family is not None

    @property
    def vision_n_layers(self) -> int:
        return len(self.vision_blocks)

    @property
    def vision_n_heads(self) -> int:
        cfg = self.vision_config
        return int(getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", 0)) if cfg is not None else 0

    @property
    def vision_d_model(self) -> int:
        cfg = self.vision_config
        return int(getattr(cfg, "embed_dim", None) or getattr(cfg, "hidden_size", 0)) if cfg is not None else 0

    # -- deployment -------------------------------------------------------------------------------
    @property
    def text_config(self):
        return getattr(self.config, "text_config", None) or self.config

    def set_attention(self, attention) -> None:
        """Install an attention kernel on every layer (``"dense"`` or a sparse configuration) — of the language
        model, and of a VLM's vision tower too when it was loaded with ``deploy_vision=True``."""
        kernel = _resolve_attention(attention)
        modules = list(self.attention_modules) + (list(self.vision_attention_modules) if self.deploy_vision else [])
        for module in modules:
            module._lens_kernel = kernel
        self.attention_kernel = kernel

    def set_quant(self, quant, *, calibration=None, activations=None, progress: bool | None = None) -> None:
        """Replace the model's linear layers by packed low-bit ones (a scheme name, a ``QuantConfig``, or
        ``"keep"`` for a GGUF model's own blocks).

        ``calibration``: texts for the schemes that smooth activations (SmoothQuant). ``activations``:
        ``"llama.cpp"`` to quantize layer inputs as llama.cpp's CPU matmul does (GGUF types and ``"keep"``).
        ``progress``: a bar over the layers being quantized (None: in a terminal or notebook only; see
        ``lens.progress``). Raises ``ConfigError`` when the model is already quantized or the scheme is unknown.
        """
        from lens.models import deploy

        if self.quant is not None:
            raise ConfigError(f"this model is already quantized ({self.quant.scheme}); load it again to change scheme")
        self.quant, self.quant_report = deploy.quantize(self, quant, calibration=calibration, activations=activations,
                                                          progress=progress)
        # the MLP output projections (and, for llama.cpp's numerics, the norms) are new modules now: re-read
        # where the probes attach
        parts = _find_parts(self.model, self.family, self.vision_family)
        self.mlp_out_modules = parts.mlp_out
        self.final_norm = parts.final_norm
        self._find_vision_parts()

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
            "gguf": self.gguf,
            "vision_family": self.vision_family.name if self.vision_family is not None else None,
            "deploy_vision": self.deploy_vision if self.vision_family is not None else None,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            # sign pattern of a few embedding rows: tells which weights produced a run (lens.models.signature)
            "signature": embedding_signature(self),
            "versions": {
                "lens": _version("lens-interp"),
                "torch": torch.__version__,
                "transformers": _version("transformers"),
                "torchao": _version("torchao") if self.quant is not None else None,
                "gguf": _version("gguf") if self.gguf is not None else None,
            },
        }

    def __repr__(self) -> str:
        attn = (self.attention_kernel or lens_attention._DENSE).describe().get("kind")
        quant = self.quant.describe().get("scheme") if self.quant is not None else None
        vision = (f", vision={self.vision_family.name} ({self.vision_n_layers} layers, {self.vision_n_heads} heads)"
                  if self.vision_family is not None else "")
        return (
            f"LensModel({self.model_id!r}, family={self.family.name}, layers={self.n_layers}, heads={self.n_heads}, "
            f"d_model={self.d_model}, causal={self.causal}{vision}, attention={attn}, quant={quant})"
        )

    def _repr_html_(self) -> str:
        import pandas as pd

        from lens._display import html_card

        facts = {
            "family": self.family.name, "layers": self.n_layers, "heads": self.n_heads,
            "key/value heads": self.n_kv_heads, "d_model": self.d_model, "d_mlp": self.d_mlp,
            "causal": str(self.causal), "positions": self.max_positions,
            "attention": (self.attention_kernel or lens_attention._DENSE).describe().get("kind"),
            "quant": self.quant.describe().get("scheme") if self.quant is not None else "none",
            "dtype": str(self.dtype).replace("torch.", ""), "device": str(self.device),
        }
        frame = pd.DataFrame([{k: str(v) for k, v in facts.items()}])
        return html_card("LensModel", f"{self.model_id} ({self.source})", frame)
