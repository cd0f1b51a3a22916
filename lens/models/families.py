"""Architecture facts, one declarative row per model family.

Everything lens needs to know about *where things are* in a Hugging Face model lives here rather than in
if-chains scattered through the code: which block list to walk, which submodule calls the attention
function, where the MLP's neuron activation can be read, whether the family is causal, and whether a
BOS token must be prepended. Paths are dotted names relative to ``model.base_model``
(``GPT2LMHeadModel.transformer``, ``LlamaForCausalLM.model``, ``BertModel`` itself).

To support a new family, add a row (or call ``register_family``) and test it with a tiny random-config
model, as ``tests/test_families.py`` does for every row below.

Vision-language models get a second, :class:`VisionFamily` row keyed by the top-level ``model_type``
(``"llava"``, ``"qwen2_vl"``, …): where the vision tower, projector, language model and image token are, how
image tokens map onto the patch grid (``layout``, see ``lens.models.vision``), and which per-token field
carries the model's bidirectional image blocks. The language model inside keeps its own text row
(``family_for(config.text_config)``). ``tests/test_vlm_families.py`` tests every VLM row.
"""

from __future__ import annotations

from dataclasses import dataclass

from lens.errors import UnsupportedModelError

__all__ = [
    "Family", "FAMILIES", "family_for", "register_family", "supported_model_types",
    "VisionFamily", "VISION_FAMILIES", "vision_family_for", "register_vision_family",
]


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps the parts lens probes.

    ``layers``: the ModuleList of transformer blocks. ``attention``: the submodule of a block that calls
    ``transformers.AttentionInterface``. ``mlp_out``: the MLP's output projection inside a block; its
    *input* is the neuron activation of docs/definitions.md (after the nonlinearity; for gated MLPs after
    act(gate)·up), so one pre-hook serves plain and gated MLPs alike. ``final_norm``: the norm applied
    after the last block (None for post-LN encoders). ``prepend_bos``: prepend the tokenizer's BOS
    token when the tokenizer does not add one itself (the TransformerLens convention, so that
    position 0 is the same token for every prompt). ``auto_class``: the ``transformers`` auto class
    used to load a folder or hub id of this family.

    Mixture-of-experts families also say where the MoE block keeps its parts (docs/definitions.md,
    "MoE routing"): ``router`` is the submodule whose forward returns ``(router_logits, gates, selected
    experts)`` — transformers' ``…TopKRouter`` — and ``experts`` the fused expert weights (``gate_up_proj``
    [E, 2·d_expert, d], ``down_proj`` [E, d, d_expert], ``act_fn``), whose forward receives the selected
    experts and gates. A block without them (a dense layer of a partly sparse model) is skipped. For MoE
    families ``mlp_out`` names a dense MLP every token passes through (Qwen2-MoE's shared expert) or None.

    Example: ``family_for(transformers.GPT2Config()).mlp_out`` → ``"mlp.c_proj"``.
    """

    name: str
    model_types: tuple[str, ...]
    causal: bool
    layers: str
    attention: str
    mlp_out: str | None
    final_norm: str | None
    prepend_bos: bool
    auto_class: str
    router: str | None = None
    experts: str | None = None


FAMILIES: list[Family] = [
    Family(
        name="gpt2",
        model_types=("gpt2",),
        causal=True,
        layers="h",
        attention="attn",
        mlp_out="mlp.c_proj",
        final_norm="ln_f",
        prepend_bos=True,
        auto_class="AutoModelForCausalLM",
    ),
    Family(
        name="gpt-neox",
        model_types=("gpt_neox",),
        causal=True,
        layers="layers",
        attention="attention",
        mlp_out="mlp.dense_4h_to_h",
        final_norm="final_layer_norm",
        prepend_bos=True,
        auto_class="AutoModelForCausalLM",
    ),
    Family(
        name="llama",
        # the language models inside VLMs too: Qwen2-VL's and Qwen2.5-VL's text models have Llama's layout
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "qwen2_vl_text",
                     "qwen2_5_vl_text"),
        causal=True,
        layers="layers",
        attention="self_attn",
        mlp_out="mlp.down_proj",
        final_norm="norm",
        prepend_bos=False,  # their tokenizers add BOS themselves where the model has one
        auto_class="AutoModelForCausalLM",
    ),
    Family(
        name="mixtral",
        model_types=("mixtral", "qwen3_moe", "olmoe"),
        causal=True,
        layers="layers",
        attention="self_attn",
        mlp_out=None,  # every MLP neuron is an expert neuron
        final_norm="norm",
        prepend_bos=False,
        auto_class="AutoModelForCausalLM",
        router="mlp.gate",
        experts="mlp.experts",
    ),
    Family(
        name="qwen2-moe",
        model_types=("qwen2_moe",),
        causal=True,
        layers="layers",
        attention="self_attn",
        mlp_out="mlp.shared_expert.down_proj",  # the shared expert every token passes through
        final_norm="norm",
        prepend_bos=False,
        auto_class="AutoModelForCausalLM",
        router="mlp.gate",
        experts="mlp.experts",
    ),
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        causal=False,
        layers="encoder.layer",
        attention="attention.self",
        mlp_out="output.dense",
        final_norm=None,
        prepend_bos=False,
        auto_class="AutoModel",
    ),
]


@dataclass(frozen=True)
class VisionFamily:
    """Where a vision-language model keeps its parts (docs/definitions.md "Vision-language models").

    Paths are dotted names relative to the multimodal base model (``model.base_model``, e.g. ``LlavaModel``):
    ``vision_tower`` (the image encoder), ``projector`` (vision features → language-model embeddings),
    ``language_model`` (the decoder, described by its own text :class:`Family` row). ``vision_layers`` and
    ``vision_attention`` are relative to the vision tower and to one of its layers. ``image_token``: the config
    attribute holding the image token id. ``layout``: how image tokens map to (image, tile, row, col) in the
    patch grid the processor used, and how the vision tower's tokens are ordered — a key of
    ``lens.models.vision.LAYOUTS``. ``vision_prefix``: tokens the vision tower puts before the patches (CLIP's
    CLS = 1). ``token_type_field``: the per-token model input that marks image tokens for a bidirectional
    image-block mask (Gemma 3's ``token_type_ids``), None when the language model is plainly causal.

    Example: ``vision_family_for("llava").projector`` → ``"multi_modal_projector"``.
    """

    name: str
    model_types: tuple[str, ...]
    vision_tower: str
    projector: str
    language_model: str
    image_token: str
    vision_layers: str
    vision_attention: str
    layout: str
    vision_prefix: int = 0
    token_type_field: str | None = None
    auto_class: str = "AutoModelForImageTextToText"


VISION_FAMILIES: list[VisionFamily] = [
    VisionFamily(
        name="llava", model_types=("llava",), vision_tower="vision_tower", projector="multi_modal_projector",
        language_model="language_model", image_token="image_token_id", vision_layers="encoder.layers",
        vision_attention="self_attn", layout="llava", vision_prefix=1,
    ),
    VisionFamily(
        name="llava-next", model_types=("llava_next",), vision_tower="vision_tower", projector="multi_modal_projector",
        language_model="language_model", image_token="image_token_id", vision_layers="encoder.layers",
        vision_attention="self_attn", layout="llava_next", vision_prefix=1,
    ),
    VisionFamily(
        name="qwen2-vl", model_types=("qwen2_vl", "qwen2_5_vl"), vision_tower="visual", projector="visual.merger",
        language_model="language_model", image_token="image_token_id", vision_layers="blocks",
        vision_attention="attn", layout="qwen2_vl",
    ),
    VisionFamily(
        name="idefics3", model_types=("idefics3", "smolvlm"), vision_tower="vision_model", projector="connector",
        language_model="text_model", image_token="image_token_id", vision_layers="encoder.layers",
        vision_attention="self_attn", layout="idefics3",
    ),
    VisionFamily(
        name="gemma3", model_types=("gemma3",), vision_tower="vision_tower", projector="multi_modal_projector",
        language_model="language_model", image_token="image_token_id", vision_layers="encoder.layers",
        vision_attention="self_attn", layout="gemma3", token_type_field="token_type_ids",
    ),
]


def vision_family_for(config) -> VisionFamily | None:
    """The VLM row for a ``transformers`` config (or ``model_type`` string); None for a text-only model.

    Example: ``vision_family_for("smolvlm").name`` → ``"idefics3"``; ``vision_family_for("gpt2")`` → None.
    """
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    for fam in VISION_FAMILIES:
        if model_type in fam.model_types:
            return fam
    return None


def register_vision_family(family: VisionFamily) -> None:
    """Add (or replace) a VLM row; its ``layout`` must be a key of ``lens.models.vision.LAYOUTS``.

    Example: ``register_vision_family(dataclasses.replace(vision_family_for("llava"), name="my-llava",
    model_types=("my_llava",)))``.
    """
    VISION_FAMILIES[:] = [f for f in VISION_FAMILIES if not set(f.model_types) & set(family.model_types)]
    VISION_FAMILIES.append(family)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` lens knows, e.g. ``['bert', 'gemma3', 'gpt2', 'llama', 'llava', ...]``."""
    return sorted({t for fam in FAMILIES for t in fam.model_types} | {t for fam in VISION_FAMILIES for t in fam.model_types})


def family_for(config) -> Family:
    """The family row for a ``transformers`` config (or a ``model_type`` string).

    Example: ``family_for("qwen2").name`` → ``"llama"``.
    Raises ``UnsupportedModelError`` naming the supported types otherwise.
    """
    model_type = config if isinstance(config, str) else getattr(config, "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            return fam
    raise UnsupportedModelError(
        f"lens has no architecture entry for model_type {model_type!r}. Supported: "
        f"{', '.join(supported_model_types())}. If this architecture calls transformers' AttentionInterface, "
        "describe it with lens.models.families.register_family(Family(...)) (see the docstring of lens.models.families)."
    )


def register_family(family: Family) -> None:
    """Add (or replace) a family row, e.g. for a fine-tuned architecture with its own ``model_type``.

    Example::

        register_family(Family(name="my-gpt", model_types=("my_gpt",), causal=True, layers="h",
                               attention="attn", mlp_out="mlp.c_proj", final_norm="ln_f",
                               prepend_bos=True, auto_class="AutoModelForCausalLM"))
    """
    FAMILIES[:] = [f for f in FAMILIES if not set(f.model_types) & set(family.model_types)]
    FAMILIES.append(family)
