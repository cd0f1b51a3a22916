"""Every analysis split by modality on vision-language models, against independent references: the valley of the
image tokens and of the text tokens against an SVD of Hugging Face's own hidden states, ``lens.compare`` per
(layer, modality) with a planted difference, and the text→image attention share under lens's sparse attention
against dense, HF eager ``output_attentions`` and a brute-force computation from the kept blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from vlm_support import sample_image

import lens
from lens.models.multimodal import placeholder

KINDS = ["llava", "qwen2_vl", "idefics3", "gemma3"]


def _items(lm):
    ph = placeholder(lm)
    return [{"image": sample_image(1), "text": f"A photo {ph} of a cat on the mat, seen from above."},
            {"images": [sample_image(2, (24, 36)), sample_image(3)], "text": f"First {ph} then {ph}: which one is brighter?"}]


def _processed(lm, item):
    images = item.get("images", [item.get("image")])
    return lm.processor(images=[Image.fromarray(x) for x in images], text=[item["text"]], return_tensors="pt")


def _reference_states(ref, processed) -> list[torch.Tensor]:
    """X_0 … X_L of the language model as Hugging Face computes them: the inputs of every decoder layer and the
    last layer's output (HF's own hidden_states[L] is after the final norm, so that one is read by a hook)."""
    last = []
    decoder = getattr(ref.model, "language_model", None) or ref.model.text_model  # Idefics3 names it text_model
    layers = decoder.layers
    handle = layers[-1].register_forward_hook(lambda m, a, o: last.append((o[0] if isinstance(o, tuple) else o).detach()))
    try:
        with torch.no_grad():
            out = ref(**processed, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return [h[0].double() for h in out.hidden_states[:-1]] + [last[0][0].double()]


def _entropy(s2: torch.Tensor, alpha: float = 1.0) -> tuple[float, float]:
    p = (s2 / s2.sum()).clamp_min(0)
    p = p[p > 0]
    if alpha == 1.0:
        return float(-(p * p.log()).sum()), float(p.max())
    return float(torch.log((p**alpha).sum()) / (1 - alpha)), float(p.max())


def _bound_p(x: torch.Tensor) -> float:
    """Queipo-de-Llano et al., Theorem 1, with x₀ the row of largest norm (numpy-independent of lens)."""
    norms = x.norm(dim=1)
    ref = int(norms.argmax())
    others = torch.ones(len(x), dtype=torch.bool)
    others[ref] = False
    m, r = float(norms[ref] ** 2), float((norms[others] ** 2).sum())
    cos2 = ((x[others] @ x[ref]) / (norms[others] * norms[ref])) ** 2
    alpha = float((norms[others] ** 2 * cos2).sum() / r)
    c = m / r
    return (c + alpha) / (c + 1)


@pytest.mark.parametrize("kind", KINDS)
def test_valley_per_modality_equals_an_svd_of_hugging_faces_hidden_states(kind, tiny_vlm_dir):
    folder = tiny_vlm_dir(kind)
    lm = lens.load(folder)
    items = _items(lm)
    run = lens.trace(lm, items, spectra="exact", progress=False)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    specials = set(lm.processor.tokenizer.all_special_ids)
    results = {m: lens.valley(run, modality=m) for m in ("image", "text")}
    renyi = lens.valley(run, modality="image", alpha=2.0)
    for seq, item in enumerate(items):
        processed = _processed(lm, item)
        ids = processed["input_ids"][0].numpy()
        image = ids == lm.config.image_token_id
        text = ~image & ~np.isin(ids, list(specials))
        states = _reference_states(ref, processed)
        assert len(states) == lm.n_layers + 1
        for name, rows in (("image", image), ("text", text)):
            v = results[name].values
            for layer, hidden in enumerate(states):
                x = hidden[torch.from_numpy(rows)]
                where = f"{kind} {name} seq {seq} layer {layer}"
                if float(x.norm()) == 0:  # Gemma 3's tiny random projector gives all-zero image embeddings
                    assert np.isnan(v["entropy_raw"][layer, seq]) and np.isnan(v["anisotropy"][layer, seq]), where
                    continue
                scale = math.log(min(x.shape))
                h_raw, p1 = _entropy(torch.linalg.svdvals(x) ** 2)
                centered = x - x.mean(0)
                z = centered / centered.norm(dim=1, keepdim=True)
                h_norm, _ = _entropy(torch.linalg.svdvals(z) ** 2)
                assert v["entropy_raw_normalized"][layer, seq] == pytest.approx(h_raw / scale, rel=2e-6, abs=1e-7), where
                assert v["anisotropy"][layer, seq] == pytest.approx(p1, rel=2e-6, abs=1e-7), where
                assert v["entropy_normalized_normalized"][layer, seq] == pytest.approx(h_norm / scale, rel=2e-6, abs=1e-7), where
                assert v["effective_rank"][layer, seq] == pytest.approx(math.exp(h_raw), rel=2e-6), where
                if name == "image":
                    h2, _ = _entropy(torch.linalg.svdvals(z) ** 2, alpha=2.0)
                    assert renyi.values["entropy_normalized"][layer, seq] == pytest.approx(h2, rel=2e-6), where
                # the bound, from the subset's largest-norm row: the same number, and a bound on the measured one
                assert v["anisotropy_lower_bound"][layer, seq] == pytest.approx(_bound_p(x), rel=1e-5, abs=1e-7), where
                assert v["anisotropy"][layer, seq] >= v["anisotropy_lower_bound"][layer, seq] - 1e-6, where
                assert v["entropy_raw"][layer, seq] <= v["entropy_upper_bound"][layer, seq] + 1e-6, where
                assert v["first_norm"][layer, seq] == pytest.approx(float(x.norm(dim=1).max()), rel=1e-5), where
    # one table for every modality, each with its own valley; "all" is lens.valley(run) itself
    frame = lens.valley(run).to_frame("modality")
    assert set(frame.modality) == {"all", "text", "image"} and len(frame) == 3 * (lm.n_layers + 1)
    image_rows = frame[frame.modality == "image"].sort_values("layer")
    np.testing.assert_allclose(image_rows["anisotropy"], results["image"].mean("anisotropy"))
    np.testing.assert_allclose(frame[frame.modality == "all"].sort_values("layer")["anisotropy"],
                               lens.valley(run).mean("anisotropy"))


def test_text_only_runs_pay_nothing_and_a_split_survives_save_and_load(tiny_vlm_dir, tmp_path, monkeypatch):
    import lens.capture.probes as probes

    lm = lens.load(tiny_vlm_dir("llava"))
    calls = []
    original = probes.squared_singular_values
    monkeypatch.setattr(probes, "squared_singular_values", lambda x, **kw: calls.append(tuple(x.shape)) or original(x, **kw))
    texts = ["Only words here, no picture at all.", "Another plain sentence."]
    plain = lens.trace(lm, texts, progress=False)
    assert len(calls) == 2 * (lm.n_layers + 1) * len(texts)  # two spectra per layer and sequence, nothing more
    assert not [k for k in plain.arrays if k.endswith((".image", ".text")) or "reference" in k]
    with pytest.raises(lens.RunFormatError, match="no image tokens"):
        lens.valley(plain, modality="image")
    with pytest.raises(lens.RunFormatError, match="no image tokens"):
        lens.valley(plain).to_frame("modality")
    # an image run: two more spectra per layer for each of the image rows and the text rows
    calls.clear()
    mixed = lens.trace(lm, [_items(lm)[0], texts[0]], progress=False)
    assert len(calls) == 2 * (lm.n_layers + 1) * (2 + 2 + 1)  # image sequence: all, image, text; text one: all, text
    with pytest.raises(lens.ConfigError, match="modality"):
        lens.valley(mixed, modality="audio")
    image = lens.valley(mixed, modality="image")
    assert np.isnan(image.values["entropy_raw"][:, 1]).all()  # the text-only sequence has no image rows
    assert np.isfinite(image.values["entropy_raw"][:, 0]).all()
    assert "image tokens" in repr(image) and image.headline().startswith("image tokens")
    loaded = lens.Run.load(mixed.save(tmp_path / "mixed.lens"))
    for m in ("image", "text"):
        np.testing.assert_array_equal(lens.valley(loaded, modality=m).values["entropy_raw"],
                                      lens.valley(mixed, modality=m).values["entropy_raw"])


def test_a_planted_massive_image_token_tightens_the_image_bound(tiny_vlm_dir):
    """One image token given a huge residual: in the image subset it is the bound's reference row, the bound on
    p₁ nears 1 and the measured anisotropy follows it (Theorem 1 per modality); the text subset does not move."""
    lm = lens.load(tiny_vlm_dir("llava"))
    item = _items(lm)[0]
    clean = lens.trace(lm, [item], progress=False)
    patch = 5

    def plant(module, args, output):
        output = output.clone()
        output[0, patch] *= 300.0
        return output

    handle = lm.projector.register_forward_hook(plant)
    try:
        run = lens.trace(lm, [item], progress=False)
    finally:
        handle.remove()
    image = lens.valley(run, modality="image")
    before = lens.valley(clean, modality="image")
    planted = int(np.nonzero(run.modality == 1)[0][patch])
    assert run.arrays["resid.reference.image"][0, 0] == planted
    assert image.values["anisotropy_lower_bound"][0, 0] > 0.99 > before.values["anisotropy_lower_bound"][0, 0]
    assert image.values["anisotropy"][0, 0] >= image.values["anisotropy_lower_bound"][0, 0] - 1e-9
    assert image.values["first_norm_ratio"][0, 0] > 100
    text_clean, text = lens.valley(clean, modality="text"), lens.valley(run, modality="text")
    np.testing.assert_allclose(text.values["entropy_raw"][0], text_clean.values["entropy_raw"][0], rtol=1e-6)
