"""Tiny random vision-language models of every VLM family, saved with a real processor to a folder.

Each builder makes a ``transformers`` VLM from a small config (2 language layers, 2 vision layers, a few
image tokens), a processor made of the family's own PIL image processor and a byte-level BPE tokenizer
trained in ``conftest`` with the family's special tokens added, and saves both with ``save_pretrained`` — so
that ``lens.load(folder)`` reads it exactly as it would a hub VLM.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch

#: every VLM family kind the tests build
VLM_KINDS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm", "gemma3"]


def _tokenizer(extra: list[str], **attributes):
    """The conftest Llama-style BPE tokenizer with ``extra`` added as special tokens and extra attributes
    (e.g. ``image_token="<image>"``) that processors read from the tokenizer."""
    from conftest import _bpe_tokenizer

    tok = copy.deepcopy(_bpe_tokenizer("llama"))
    tok.add_special_tokens({"additional_special_tokens": extra}, replace_extra_special_tokens=False)
    if attributes:  # named multimodal tokens (tok.image_token, tok.image_token_id, …), saved in its config
        tok._set_model_specific_special_tokens(special_tokens=attributes)
    return tok


def _vocab(tok) -> int:
    return len(tok) + (-len(tok)) % 8


def _llama(tok, **kw):
    import transformers as tf

    return tf.LlamaConfig(vocab_size=_vocab(tok), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                          num_hidden_layers=2, intermediate_size=128, max_position_embeddings=1024,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


def _clip(image_size=32, patch_size=8):
    import transformers as tf

    return tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=image_size, patch_size=patch_size, projection_dim=32)


def build_llava(folder: Path):
    import transformers as tf
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(["<image>"], image_token="<image>")
    config = tf.LlavaConfig(vision_config=_clip(), text_config=_llama(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layer=-1, vision_feature_select_strategy="default", image_seq_length=16)
    processor = tf.LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>")
    return tf.LlavaForConditionalGeneration(config), processor


def build_llava_next(folder: Path):
    import transformers as tf
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer(["<image>"], image_token="<image>")
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = tf.LlavaNextConfig(vision_config=_clip(), text_config=_llama(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                                vision_feature_layer=-1, vision_feature_select_strategy="default",
                                image_grid_pinpoints=pinpoints, image_seq_length=16)
    processor = tf.LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=pinpoints),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>")
    return tf.LlavaNextForConditionalGeneration(config), processor


def _qwen_tokenizer():
    return _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                      image_token="<|image_pad|>", video_token="<|video_pad|>",
                      vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")


def _qwen_ids(tok) -> dict:
    return {"image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}


def _qwen_text(tok) -> dict:
    return dict(vocab_size=_vocab(tok), hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                intermediate_size=128, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _image_only(cls, image_processor, tok, **kwargs):
    """Qwen2-VL's and SmolVLM's processors hold a video processor, which transformers builds only with
    torchvision (not installable here); lens's image-only fallback is what loads them back."""
    from lens.models.processors import image_only_processor, torchvision_available

    if torchvision_available():
        return cls(image_processor=image_processor, tokenizer=tok, **kwargs)
    return image_only_processor(cls, image_processor, tok, **kwargs)


def _qwen_processor(cls, tok):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 4 px patches, 2 x 2 merge: a 32 x 24 image is an 8 x 6 patch grid, 4 x 3 image tokens
    image_processor = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                              size={"shortest_edge": 16 * 16, "longest_edge": 48 * 48})
    return _image_only(cls, image_processor, tok)


def build_qwen2_vl(folder: Path):
    import transformers as tf

    tok = _qwen_tokenizer()
    config = tf.Qwen2VLConfig(
        text_config=_qwen_text(tok),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_chans=3),
        **_qwen_ids(tok))
    return tf.Qwen2VLForConditionalGeneration(config), _qwen_processor(tf.Qwen2VLProcessor, tok)


def build_qwen2_5_vl(folder: Path):
    import transformers as tf

    tok = _qwen_tokenizer()
    config = tf.Qwen2_5_VLConfig(
        text_config=_qwen_text(tok),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=4, intermediate_size=64, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=16,
                           fullatt_block_indexes=[1]),
        **_qwen_ids(tok))
    return tf.Qwen2_5_VLForConditionalGeneration(config), _qwen_processor(tf.Qwen2_5_VLProcessor, tok)


def _idefics_tokenizer():
    rows = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    return _tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows],
                      image_token="<image>", fake_image_token="<fake_token_around_image>",
                      global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>")


def _siglip(image_size=32, patch_size=8) -> dict:
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=image_size,
                patch_size=patch_size)


def build_idefics3(folder: Path):
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _idefics_tokenizer()
    # 32 px tiles of 8 px patches (4 x 4), pixel shuffle by 2: 2 x 2 = 4 image tokens per tile
    config = tf.Idefics3Config(vision_config=_siglip(), text_config=_llama(tok), scale_factor=2,
                               image_token_id=tok.convert_tokens_to_ids("<image>"))
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                                do_image_splitting=True)
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=4)
    return tf.Idefics3ForConditionalGeneration(config), processor


def build_smolvlm(folder: Path):
    import transformers as tf
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tok = _idefics_tokenizer()
    config = tf.SmolVLMConfig(vision_config=_siglip(), text_config=_llama(tok), scale_factor=2,
                              image_token_id=tok.convert_tokens_to_ids("<image>"))
    image_processor = SmolVLMImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                               do_image_splitting=True)
    processor = _image_only(tf.SmolVLMProcessor, image_processor, tok, image_seq_len=4)
    return tf.SmolVLMForConditionalGeneration(config), processor


def build_gemma3(folder: Path):
    import transformers as tf
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"], image_token="<image_soft_token>",
                     boi_token="<start_of_image>", eoi_token="<end_of_image>")
    text = tf.Gemma3TextConfig(vocab_size=_vocab(tok), hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, num_hidden_layers=2, intermediate_size=128, max_position_embeddings=1024,
                               sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    # 32 px images of 8 px patches (4 x 4), average-pooled to 2 x 2 = 4 image tokens
    config = tf.Gemma3Config(text_config=text, vision_config=tf.SiglipVisionConfig(**_siglip()), mm_tokens_per_image=4,
                             boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                             eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
                             image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
    image_processor = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    processor = tf.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4)
    return tf.Gemma3ForConditionalGeneration(config), processor


BUILDERS = {
    "llava": build_llava, "llava_next": build_llava_next, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
    "idefics3": build_idefics3, "smolvlm": build_smolvlm, "gemma3": build_gemma3,
}  # fmt: skip


def build_tiny_vlm(kind: str, folder: Path, seed: int = 0, init=None) -> Path:
    """Build a tiny random VLM of ``kind``, optionally edit its weights (``init(model)``), save it with its
    processor into ``folder``."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[kind](folder)
    model.eval()
    if init is not None:
        with torch.no_grad():
            init(model)
    model.save_pretrained(folder)
    if getattr(processor, "video_processor", True) is None:
        from lens.models.processors import save_image_only_processor

        save_image_only_processor(processor, folder)
    else:
        processor.save_pretrained(folder)
    return folder


def sample_image(seed: int = 0, size=(40, 28)) -> np.ndarray:
    """A seeded RGB image (H × W × 3 uint8) with some structure: a gradient plus a bright square."""
    rng = np.random.default_rng(seed)
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 90)], -1).astype(np.uint8)
    r0, c0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[r0 : r0 + h // 3, c0 : c0 + w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    return img


#: the tiny VLM families the analysis tests run on
ANALYSIS_KINDS = ["llava", "qwen2_vl", "idefics3", "gemma3"]


def processed_inputs(lm, item: dict):
    """The processor's own output for one ``{"image": ...}`` or ``{"images": [...]}`` + ``"text"`` item (numpy
    images), as Hugging Face's reference forward takes it."""
    from PIL import Image

    images = item.get("images", [item.get("image")])
    return lm.processor(images=[Image.fromarray(x) for x in images], text=[item["text"]], return_tensors="pt")


def trace_with_projector_edit(lm, items, edit, **kwargs):
    """``lens.trace(lm, items)`` with ``edit(output) -> output`` applied to the projector's output (the image
    tokens as the language model receives them): how the tests plant a phenomenon on chosen patches."""
    import lens

    handle = lm.projector.register_forward_hook(lambda module, args, output: edit(output.clone()))
    try:
        return lens.trace(lm, items, progress=False, **kwargs)
    finally:
        handle.remove()
