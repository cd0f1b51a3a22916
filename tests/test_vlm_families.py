"""Every vision-language family row, on a tiny random VLM saved with its processor and loaded by ``lens.load``,
against Hugging Face's eager reference.

Language model: the run's mass received, |Q_k|, uniform share, sink scores and kept patterns equal what HF's
eager ``output_attentions`` gives, with Q_k and K_q read from a mask built here independently of lens —
causal, plus (Gemma 3) both directions inside an image block, and its sliding window on local layers.
Vision tower: the run's per-patch statistics equal the probabilities of transformers' own eager attention
function, recorded call by call.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import transformers
from vlm_support import VLM_KINDS, sample_image

import lens
from lens.models.multimodal import placeholder


def _inputs(lm):
    ph = placeholder(lm)
    return [
        {"image": sample_image(1), "text": f"A photo {ph} of a cat on the mat."},
        {"images": [sample_image(2, (24, 36)), sample_image(3)], "text": f"First {ph} then {ph}: which one is brighter?"},
    ]


def _reference_mask(ref, processed, n: int, layer: int) -> torch.Tensor:
    """[T, T] bool: which keys each query may see, built from the config and the inputs (not from lens)."""
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    allowed = k <= q
    text = ref.config.get_text_config()
    if ref.config.model_type == "gemma3":
        types = processed["token_type_ids"][0]
        image = types == 1
        start = image & ~torch.nn.functional.pad(image, (1, 0))[:-1]
        block = torch.where(image, torch.cumsum(start.int(), 0), -1)
        allowed = allowed | ((block[:, None] == block[None, :]) & (block[:, None] >= 0))
        if text.layer_types[layer] == "sliding_attention":
            allowed = allowed & (k > q - text.sliding_window)
    return allowed


def _record_eager_vision(monkeypatch, ref):
    """Wrap the vision attention module's own ``eager_attention_forward`` to keep its probabilities per call."""
    calls: list[tuple[int, torch.Tensor]] = []
    blocks = ref.model.get_submodule(lens.models.families.vision_family_for(ref.config).vision_tower)
    modules = {}
    for module in blocks.modules():
        if hasattr(module, "is_causal") and module.__class__.__name__.lower().endswith("attention"):
            modules[id(module)] = len(modules)
    for module_name in {type(m).__module__ for m in blocks.modules() if id(m) in modules}:
        mod = sys.modules[module_name]
        original = mod.eager_attention_forward

        def recording(module, *args, _original=original, **kwargs):
            out, weights = _original(module, *args, **kwargs)
            if id(module) in modules:  # the language model may share the function: not recorded
                calls.append((modules[id(module)], weights.detach().clone()))
            return out, weights

        monkeypatch.setattr(mod, "eager_attention_forward", recording)
    return calls


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_vlm_family_matches_eager_reference(kind, tiny_vlm_dir, monkeypatch):
    folder = tiny_vlm_dir(kind)
    lm = lens.load(folder)
    assert lm.is_vlm and lm.config.model_type in lm.vision_family.model_types
    assert lm.model.config._attn_implementation == "lens"
    assert lm.vision_tower.config._attn_implementation == "lens", "the vision tower must run lens's attention too"
    inputs = _inputs(lm)
    run = lens.trace(lm, inputs, keep_patterns="all", progress=False)
    sinks = lens.sinks(run)

    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    calls = _record_eager_vision(monkeypatch, ref)
    for seq, item in enumerate(inputs):
        images = item.get("images", [item.get("image")])
        from PIL import Image

        processed = lm.processor(images=[Image.fromarray(x) for x in images], text=[item["text"]], return_tensors="pt")
        n = int(processed["input_ids"].shape[1])
        assert run.arrays["token_ids"][run.span(seq)].tolist() == processed["input_ids"][0].tolist()
        calls.clear()
        with torch.no_grad():
            out = ref(**processed, output_attentions=True, use_cache=False)
        # language model: patterns, column sums, |Q_k|, uniform share, sink score
        for layer, attn in enumerate(out.attentions):
            probs = attn[0].double()  # [H, T, T]
            allowed = _reference_mask(ref, processed, n, layer)
            assert float(probs[:, ~allowed].abs().max()) == 0.0, "the reference mask must be the model's"
            count = allowed.sum(0).double()
            share = (allowed.double() / allowed.sum(1, keepdim=True)).sum(0) / count
            np.testing.assert_allclose(run.arrays["attn.query_count"][layer, run.span(seq)], count.numpy())
            np.testing.assert_allclose(run.uniform_share(layer, seq), share.numpy(), rtol=1e-5, atol=1e-7)
            for head in range(lm.n_heads):
                np.testing.assert_allclose(run.pattern(layer, head, seq), probs[head].numpy(), atol=2e-5)
                np.testing.assert_allclose(run.mass_received(layer, head, seq), (probs[head].sum(0) / count).numpy(),
                                           rtol=1e-4, atol=1e-6)
                q0 = allowed[:, 0]
                np.testing.assert_allclose(sinks.sink_score[seq, layer, head], float(probs[head][q0, 0].mean()),
                                           rtol=1e-4, atol=1e-6)
        # vision tower: every eager call's column sums land on the run's canonical vision tokens
        plan = run_plan(lm, run, seq, processed)
        by_layer: dict[int, list[torch.Tensor]] = {}
        for layer, weights in calls:
            by_layer.setdefault(layer, []).append(weights)
        assert sorted(by_layer) == list(range(lm.vision_n_layers))
        start = int(np.nonzero(run.arrays["vision.sequence"] == seq)[0][0])
        for layer, weights in by_layer.items():
            assert len(weights) == len(plan.calls[layer])
            for w, index in zip(weights, plan.calls[layer]):
                flat = start + index.reshape(-1)
                mass = w.double().sum(-2)  # [B, H, T]
                expected = mass.permute(1, 0, 2).reshape(mass.shape[1], -1).numpy()
                np.testing.assert_allclose(run.arrays["vision.key_mass"][layer][:, flat], expected, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(run.arrays["vision.query_count"][layer, flat], w.shape[-2])


def run_plan(lm, run, seq, processed):
    """The vision plan lens used for one sequence (recomputed from the processor output)."""
    from lens.models.vision import layout_for

    return layout_for(lm, processed["input_ids"][0].numpy(), dict(processed)).vision
