"""What a run of a vision-language model knows about its image tokens, checked against independent references:
image-token positions and grid coordinates against the processor's own output, the text→image attention share
against HF eager ``output_attentions``, a planted visual sink token and a planted high-norm encoder patch, bad
images, and the deployment path (``quant=`` on the language model / vision tower, modality-aware smoothing
calibrated on the image tokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from vlm_support import ANALYSIS_KINDS, processed_inputs, sample_image, trace_with_projector_edit

import lens
from lens.errors import InputError
from lens.models.multimodal import placeholder

KINDS = ANALYSIS_KINDS


def _items(lm):
    ph = placeholder(lm)
    return [{"image": sample_image(1), "text": f"A photo {ph} of a cat on the mat."},
            {"images": [sample_image(2, (24, 36)), sample_image(3)], "text": f"First {ph} then {ph}: which one is brighter?"}]


def _expected_grid(lm, processed) -> dict[str, np.ndarray]:
    """(image, tile, row, col) of every image token, read from the processor's output and the config alone."""
    ids = processed["input_ids"][0].numpy()
    tok = lm.processor.tokenizer
    is_image = ids == lm.config.image_token_id
    n = len(ids)
    out = {k: np.full(n, -1) for k in ("image", "tile", "row", "col")}
    kind = lm.config.model_type
    positions = np.nonzero(is_image)[0]
    if kind == "llava":
        side = lm.config.vision_config.image_size // lm.config.vision_config.patch_size
        k = np.arange(len(positions))
        out["image"][positions] = k // side**2
        out["tile"][positions] = 0
        out["row"][positions], out["col"][positions] = (k % side**2) // side, k % side
    elif kind == "gemma3":
        side = int(round(lm.config.mm_tokens_per_image**0.5))
        k = np.arange(len(positions))
        out["image"][positions], out["tile"][positions] = k // side**2, 0
        out["row"][positions], out["col"][positions] = (k % side**2) // side, k % side
    elif kind == "qwen2_vl":
        merge = lm.config.vision_config.spatial_merge_size
        start = 0
        for i, (t, h, w) in enumerate(processed["image_grid_thw"].tolist()):
            count = t * (h // merge) * (w // merge)
            pos = positions[start : start + count]
            k = np.arange(count)
            out["image"][pos], out["tile"][pos] = i, k // ((h // merge) * (w // merge))
            out["row"][pos], out["col"][pos] = (k // (w // merge)) % (h // merge), k % (w // merge)
            start += count
    elif kind == "idefics3":
        # tiles are announced by <row_i_col_j> (then the global image by <global-img>); each block is s × s tokens
        side = int(round(lm.config.text_config.hidden_size and (lm.processor.image_seq_len**0.5)))
        fake = tok.convert_tokens_to_ids("<fake_token_around_image>")
        image, tile, block_start = -1, -1, None
        for p in range(n):
            piece = tok.convert_ids_to_tokens(int(ids[p]))
            if piece.startswith("<row_1_col_1>") or (piece == "<global-img>" and tile == -1):
                image, tile = image + 1, -1
            if piece.startswith("<row_") or piece == "<global-img>":
                tile += 1
            if is_image[p]:
                if block_start is None or not is_image[p - 1]:
                    block_start = p
                k = p - block_start
                out["image"][p], out["tile"][p], out["row"][p], out["col"][p] = image, tile, k // side, k % side
            elif ids[p] == fake:
                block_start = None
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_image_token_positions_and_grid_equal_the_processors(kind, tiny_vlm_dir):
    lm = lens.load(tiny_vlm_dir(kind))
    items = _items(lm)
    run = lens.trace(lm, items, progress=False)
    n_images = 0
    for seq, item in enumerate(items):
        processed = processed_inputs(lm, item)
        sl = run.span(seq)
        assert run.arrays["token_ids"][sl].tolist() == processed["input_ids"][0].tolist()
        expected = _expected_grid(lm, processed)
        is_image = processed["input_ids"][0].numpy() == lm.config.image_token_id
        assert np.array_equal(run.modality[sl] == 1, is_image)
        special = np.isin(processed["input_ids"][0].numpy(), lm.processor.tokenizer.all_special_ids) & ~is_image
        assert np.array_equal(run.modality[sl] == 2, special)
        got_image = run.arrays["image.index"][sl]
        assert np.array_equal(got_image, np.where(expected["image"] >= 0, expected["image"] + n_images, -1))
        for name in ("tile", "row", "col"):
            assert np.array_equal(run.arrays[f"image.{name}"][sl], expected[name]), name
        n_images += len(item.get("images", [None]))
    assert len(run.images) == n_images == 3
    pixels = run.image_pixels(0)
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3 and max(pixels.shape) <= 224


@pytest.mark.parametrize("kind", KINDS)
def test_text_to_image_share_and_modality_split_match_eager(kind, tiny_vlm_dir):
    folder = tiny_vlm_dir(kind)
    lm = lens.load(folder)
    items = _items(lm)
    run = lens.trace(lm, items, progress=False)
    result = lens.vision(run)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    specials = set(lm.processor.tokenizer.all_special_ids)
    for seq, item in enumerate(items):
        processed = processed_inputs(lm, item)
        ids = processed["input_ids"][0].numpy()
        image = ids == lm.config.image_token_id
        first = int(np.nonzero(image)[0][0])
        text = np.array([p > first and not image[p] and int(ids[p]) not in specials for p in range(len(ids))])
        with torch.no_grad():
            out = ref(**processed, output_attentions=True, use_cache=False)
        for layer, attn in enumerate(out.attentions):
            probs = attn[0].double().numpy()  # [H, T, T]
            expected = probs[:, text][:, :, image].sum(-1).mean(-1)  # [H]
            np.testing.assert_allclose(result.text_image_share[seq, layer], expected, rtol=1e-4, atol=1e-6)
    frame = lens.sinks(run).to_frame("modality")
    counts = frame[frame.layer == 0].set_index("modality")["tokens"]
    assert counts["image"] == int((run.modality == 1).sum()) and counts["text"] == int((run.modality == 0).sum())
    assert set(frame.modality) == {"text", "image", "special"}
    assert (result.share_per_layer >= 0).all() and (result.share_per_layer <= 1).all()
    assert "text→image share" in repr(result) and len(result.to_frame("share")) == run.n_sequences * lm.n_layers * lm.n_heads


def test_planted_visual_sink_token_is_found(tiny_vlm_dir):
    """BOS and one chosen patch get a massive value in the same hidden dimension: that patch (and only it) is a
    visual sink token (Kang et al.: massive in the sink dimensions of the first token)."""
    lm = lens.load(tiny_vlm_dir("llava"))
    item = {"image": sample_image(4), "text": f"{placeholder(lm)} Describe the image."}
    dim, patch, big = 17, 6, 400.0
    bos = lm.processor.tokenizer.bos_token_id
    # a tiny model (d = 64) cannot reach Kang et al.'s φ ≥ 20 (φ ≤ √d = 8): the threshold is a parameter
    tau = 6.0
    clean = lens.vision(lens.trace(lm, [item], progress=False), phi_tau=tau)
    assert not clean.visual_sink.any()
    with torch.no_grad():
        lm.model.get_input_embeddings().weight[bos, dim] = big

    def plant(output):
        output[0, patch, dim] = big
        return output

    run = trace_with_projector_edit(lm, [item], plant)
    result = lens.vision(run, phi_tau=tau)
    assert result.sink_dims[0][0].tolist() == [dim]
    sinks = result.visual_sinks(0)
    assert len(sinks) == 1
    n = int(sinks[0])
    assert run.modality[n] == 1 and (run.arrays["image.row"][n], run.arrays["image.col"][n]) == divmod(patch, 4)
    frame = result.to_frame("visual_sinks")
    assert ((frame.layer == 0) & (frame.row == patch // 4) & (frame.col == patch % 4)).any()


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_planted_high_norm_encoder_patch_is_found(kind, tiny_vlm_dir):
    """One vision-tower token's residual is scaled ×50 after the first encoder layer: it is the only high-norm
    patch (norm > 4 × the tile's median) from then on, at its grid position."""
    lm = lens.load(tiny_vlm_dir(kind))
    item = {"image": sample_image(5), "text": f"{placeholder(lm)} Describe."}
    clean = lens.vision(lens.trace(lm, [item], progress=False))
    prefix = lm.vision_family.vision_prefix
    token = prefix + 9  # patch 9 of the first forward row (tile 0): row 2, col 1 of a 4 × 4 patch grid

    def plant(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, token] *= 50.0
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = lm.vision_blocks[0].register_forward_hook(plant)
    try:
        run = lens.trace(lm, [item], progress=False)
    finally:
        handle.remove()
    found = lens.vision(run).to_frame("high_norm")
    at_one = found[found.layer == 1]
    assert len(at_one) == 1, (found, clean.to_frame("high_norm"))
    row = at_one.iloc[0]
    assert (row.image, row.tile, row.row, row.col) == (0, 0, 2, 1)
    assert row.ratio > 4
    assert len(clean.to_frame("high_norm").query("layer == 1")) == 0


def test_an_image_given_as_pil_numpy_path_or_grey_array_is_the_same_image(tiny_vlm_dir, tmp_path):
    lm = lens.load(tiny_vlm_dir("llava"))
    ph = placeholder(lm)
    pixels = sample_image(6)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    forms = [pixels, Image.fromarray(pixels), str(tmp_path / "img.png"), tmp_path / "img.png",
             Image.fromarray(pixels).convert("RGBA")]
    runs = [lens.trace(lm, [{"image": f, "text": f"{ph} What is it?"}], progress=False) for f in forms]
    for run in runs[1:]:
        np.testing.assert_array_equal(run.arrays["image.pixels.0.0"], runs[0].arrays["image.pixels.0.0"])
        np.testing.assert_allclose(run.arrays["attn.key_mass"], runs[0].arrays["attn.key_mass"], rtol=1e-6)
    grey = pixels.mean(-1).astype(np.uint8)
    as_grey = lens.trace(lm, [{"image": grey, "text": ph}], progress=False)
    as_rgb = lens.trace(lm, [{"image": np.repeat(grey[..., None], 3, -1), "text": ph}], progress=False)
    np.testing.assert_array_equal(as_grey.arrays["image.pixels.0.0"], as_rgb.arrays["image.pixels.0.0"])


def test_bad_images_are_refused_with_what_to_do(tiny_vlm_dir, tmp_path):
    lm = lens.load(tiny_vlm_dir("llava"))
    ph = placeholder(lm)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [
        ({"image": str(tmp_path / "missing.png"), "text": ph}, "missing"),
        ({"image": str(broken), "text": ph}, "broken.png"),
        ({"image": np.zeros((0, 0, 3), np.uint8), "text": ph}, "0"),
        ({"image": np.zeros((8, 8, 3), np.float32), "text": ph}, "uint8"),
        ({"image": np.zeros((3, 8, 8), np.uint8), "text": ph}, ""),
        ({"image": np.zeros((4, 20000, 3), np.uint8), "text": ph}, "aspect"),
        ({"image": sample_image(1), "text": "no placeholder here"}, ph),
        ({"images": [sample_image(1), sample_image(2)], "text": ph}, ""),
        ({"image": 42, "text": ph}, ""),
    ]
    for item, needle in cases:
        with pytest.raises(InputError) as info:
            lens.trace(lm, [item], progress=False)
        assert needle.lower() in str(info.value).lower(), (item, str(info.value))
    with pytest.raises(InputError):
        lens.trace(lm, [{"image": Image.new("I;16", (8, 8)), "text": ph}], progress=False)


def _linear_names(model, cls_name: str) -> set[str]:
    return {name for name, module in model.named_modules() if type(module).__name__ == cls_name}


def test_quant_reaches_the_language_model_and_the_vision_tower_on_request(tiny_vlm_dir):
    folder = tiny_vlm_dir("llava")
    text_only = lens.load(folder, quant="int8")
    quantized = _linear_names(text_only.model, "QuantLinear")
    assert quantized and all(name.startswith("model.language_model.") for name in quantized)
    # every linear of the decoder layers is quantized (int8 runs on torchao: its Linear lives inside QuantLinear)
    plain = [n for n, m in text_only.base.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    assert all(n.endswith(".ao_linear") for n in plain), plain
    assert not _linear_names(text_only.vision_tower, "QuantLinear")
    both = lens.load(folder, quant="int8", deploy_vision=True)
    quantized = _linear_names(both.model, "QuantLinear")
    assert any(n.startswith("model.vision_tower.") for n in quantized)
    assert any(n.startswith("model.multi_modal_projector.") for n in quantized)
    parts = both.quant_report["parts"]
    assert set(parts) == {"language_model", "vision"} and parts["vision"]["n_replaced"] > 0
    run = lens.trace(both, _items(both), progress=False)
    assert run.provenance["deploy_vision"] is True and np.isfinite(run.arrays["vision.key_mass"]).all()


def test_modality_aware_smoothing_is_calibrated_on_the_image_tokens(tiny_vlm_dir):
    folder = tiny_vlm_dir("llava")
    lm = lens.load(folder)
    items = _items(lm)[:1]
    calibration = items + ["Some plain text for the text tokens."]
    deployed = lens.load(folder, quant="w8a8-smooth-modality", calibration=calibration)
    assert deployed.quant_report["calibration"]["image_tokens"] == 16
    # reference: the float model's inputs of one language-model projection, split by image token
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    target = ref.model.language_model.layers[1].mlp.down_proj
    seen = []
    handle = target.register_forward_hook(lambda m, a, o: seen.append(a[0][0].detach()))
    processed = processed_inputs(lm, items[0])
    with torch.no_grad():
        ref(**processed)
    handle.remove()
    image = processed["input_ids"][0] == ref.config.image_token_id
    amax_image = seen[0][image].abs().amax(0)
    from lens.kernels.lowbit import smoothing_factors

    expected = smoothing_factors(amax_image, target.weight, 0.5)
    layer = deployed.model.model.language_model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "QuantLinear" and layer.group_smooth is not None
    torch.testing.assert_close(layer.group_smooth[1], expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(layer.group_smooth[0], layer.group_smooth[1])
    with pytest.raises(lens.ConfigError, match="image"):
        lens.load(folder, quant="w8a8-smooth-modality", calibration=["text only"])


@pytest.mark.slow  # FlexAttention compiles its block masks for the text and the vision shapes (~50 s on 2 cores)
def test_sparse_attention_reaches_the_language_model_and_the_vision_tower_on_request(tiny_vlm_dir):
    folder = tiny_vlm_dir("llava")
    config = lens.Sparse(mode="topk", topk=0.5, block_q=16, block_k=16, keep_sink_block=True, local_blocks=1)
    lm = lens.load(folder, attention=config)
    assert all(m._lens_kernel is lm.attention_kernel for m in lm.attention_modules)
    assert all(getattr(m, "_lens_kernel", None) is None for m in lm.vision_attention_modules)
    item = {"image": sample_image(1), "text": f"{placeholder(lm)} " + "a cat sat on the mat and looked around " * 4}
    run = lens.trace(lm, [item], progress=False)
    kept = run.arrays["attn.kept_fraction"]
    assert np.isfinite(kept).all() and (kept < 1).any(), "blocks were skipped in the language model"
    # the sparse kernel sums the text queries' attention from the probabilities it used (tests/test_vlm_modality.py
    # checks the numbers against dense, HF eager and brute force)
    share = lens.vision(run).text_image_share
    assert share is not None and np.isfinite(share).all() and (share >= 0).all() and (share <= 1 + 1e-6).all()
    both = lens.load(folder, attention=config, deploy_vision=True)
    assert all(m._lens_kernel is both.attention_kernel for m in both.vision_attention_modules)
    run = lens.trace(both, [item], progress=False)
    assert np.isfinite(run.arrays["vision.key_mass"]).all()


def test_the_processors_own_output_traces_like_the_image_text_item(tiny_vlm_dir):
    lm = lens.load(tiny_vlm_dir("qwen2_vl"))
    item = _items(lm)[1]
    processed = processed_inputs(lm, item)
    by_item = lens.trace(lm, [item], progress=False)
    by_output = lens.trace(lm, processed, progress=False)
    assert by_item.arrays["token_ids"].tolist() == by_output.arrays["token_ids"].tolist()
    for name in ("modality", "image.index", "image.row", "image.col", "attn.key_mass", "vision.key_mass", "attn.text_key_mass"):
        np.testing.assert_allclose(by_item.arrays[name], by_output.arrays[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert by_item.provenance["input_sha256"] == by_output.provenance["input_sha256"]
    with pytest.raises(InputError):
        lens.trace(lm, {**processed, "pixel_values": processed["pixel_values"][:3]}, progress=False)


@pytest.mark.parametrize("kind", ["llava", "gemma3", "idefics3"])
def test_processor_outputs_that_no_longer_fit_together_are_refused(kind, tiny_vlm_dir):
    lm = lens.load(tiny_vlm_dir(kind))
    processed = dict(processed_inputs(lm, _items(lm)[1]))  # two images
    ids = processed["input_ids"]
    image = (ids[0] == lm.config.image_token_id).nonzero().flatten()
    one_token_less = {**processed, "input_ids": torch.cat([ids[:, : image[0]], ids[:, image[0] + 1 :]], 1),
                      "attention_mask": processed["attention_mask"][:, 1:]}
    pixels = processed["pixel_values"]  # [images, …], or [1, tiles, …] for Idefics3
    one_image_less = {**processed, "pixel_values": pixels[:1] if pixels.ndim == 4 else pixels[:, :-1]}
    if "pixel_attention_mask" in processed:
        one_image_less["pixel_attention_mask"] = processed["pixel_attention_mask"][:, :-1]
    for broken in (one_token_less, one_image_less):
        if "token_type_ids" in broken and broken["token_type_ids"].shape != broken["input_ids"].shape:
            broken["token_type_ids"] = broken["token_type_ids"][:, : broken["input_ids"].shape[1]]
        with pytest.raises(InputError):
            lens.trace(lm, broken, progress=False)


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_kept_hidden_states_of_image_tokens_equal_hugging_faces(kind, tiny_vlm_dir):
    """What LatentLens reads: the residual stream at the image tokens, for the layers asked for."""
    folder = tiny_vlm_dir(kind)
    lm = lens.load(folder)
    item = _items(lm)[0]
    run = lens.trace(lm, [item], keep_hidden=[0, 1, 2], progress=False)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():
        hidden = ref(**processed_inputs(lm, item), output_hidden_states=True, use_cache=False).hidden_states
    image = run.modality == 1
    for layer in (0, 1, 2):
        got = torch.from_numpy(run.arrays[f"resid.hidden.{layer}"][image])
        if layer == lm.n_layers:  # HF's last hidden state is after the final norm; lens keeps the block's output
            with torch.no_grad():
                got = ref.model.language_model.norm(got)
        np.testing.assert_allclose(got.numpy(), hidden[layer][0][torch.from_numpy(image)].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["llava", "idefics3"])
def test_encoder_norms_and_valley_equal_an_independent_svd_of_hugging_faces_hidden_states(kind, tiny_vlm_dir):
    """The vision tower's token norms and per-tile matrix entropy (its valley) against HF's own encoder hidden
    states and torch.linalg.svdvals."""
    folder = tiny_vlm_dir(kind)
    lm = lens.load(folder)
    item = _items(lm)[0]
    run = lens.trace(lm, [item], progress=False)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    processed = processed_inputs(lm, item)
    pixels = processed["pixel_values"].reshape(-1, *processed["pixel_values"].shape[-3:])
    tower = ref.model.get_submodule(lm.vision_family.vision_tower)
    with torch.no_grad():
        states = tower(pixels, output_hidden_states=True).hidden_states  # Lv + 1 × [tiles, T, d]
    a = run.arrays
    prefix = lm.vision_family.vision_prefix
    valley = lens.vision(run).to_frame("encoder_valley")
    assert len(valley) == lm.vision_n_layers + 1
    for layer, hidden in enumerate(states):
        if layer == lm.vision_n_layers and kind == "idefics3":
            continue  # SigLIP's hidden_states[-1] is after its post-layernorm; lens records the last layer's output
        for t in range(hidden.shape[0]):
            x = hidden[t].double()
            slot = int(np.nonzero(a["vision.tile_tile"] == t)[0][0]) if kind == "idefics3" else t
            s2 = torch.linalg.svdvals(x) ** 2
            p = s2 / s2.sum()
            entropy = float(-(p * p.clamp_min(1e-300).log()).sum() / np.log(min(x.shape)))
            assert a["vision.entropy_raw"][layer, slot] == pytest.approx(entropy, rel=1e-4)
            assert a["vision.anisotropy"][layer, slot] == pytest.approx(float(p.max()), rel=1e-4)
            tokens = np.nonzero((a["vision.image"] == a["vision.tile_image"][slot]) & (a["vision.tile"] == a["vision.tile_tile"][slot]))[0]
            rows = a["vision.row"][tokens]
            patches = tokens[rows >= 0]
            order = np.lexsort((a["vision.col"][patches], a["vision.row"][patches]))
            np.testing.assert_allclose(a["vision.norm"][layer, patches[order]], x[prefix:].norm(dim=-1).numpy(), rtol=1e-4)


def test_an_already_loaded_vlm_finds_its_processor_or_says_how_to_give_it(tiny_vlm_dir):
    folder = tiny_vlm_dir("gemma3")
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    lm = lens.load(model)
    assert lm.is_vlm and type(lm.processor).__name__ == "Gemma3Processor"
    run = lens.trace(lm, _items(lm)[:1], progress=False)
    assert (run.modality == 1).sum() == lm.config.mm_tokens_per_image
    anonymous = transformers.AutoModelForImageTextToText.from_pretrained(folder)
    anonymous.config.name_or_path = ""
    with pytest.raises(lens.ModelLoadError, match="processor="):
        lens.load(anonymous)
    assert lens.load(anonymous, processor=lm.processor).is_vlm
