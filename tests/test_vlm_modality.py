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
from lens.errors import LensError
from vlm_support import ANALYSIS_KINDS, processed_inputs, sample_image, trace_with_projector_edit

import lens
from lens.models.multimodal import placeholder

KINDS = ANALYSIS_KINDS


def _items(lm):
    ph = placeholder(lm)
    return [{"image": sample_image(1), "text": f"A photo {ph} of a cat on the mat, seen from above."},
            {"images": [sample_image(2, (24, 36)), sample_image(3)], "text": f"First {ph} then {ph}: which one is brighter?"}]


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
        processed = processed_inputs(lm, item)
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

    def plant(output):
        output[0, patch] *= 300.0
        return output

    run = trace_with_projector_edit(lm, [item], plant)
    image = lens.valley(run, modality="image")
    before = lens.valley(clean, modality="image")
    planted = int(np.nonzero(run.modality == 1)[0][patch])
    assert run.arrays["resid.reference.image"][0, 0] == planted
    assert image.values["anisotropy_lower_bound"][0, 0] > 0.99 > before.values["anisotropy_lower_bound"][0, 0]
    assert image.values["anisotropy"][0, 0] >= image.values["anisotropy_lower_bound"][0, 0] - 1e-9
    assert image.values["first_norm_ratio"][0, 0] > 100
    text_clean, text = lens.valley(clean, modality="text"), lens.valley(run, modality="text")
    np.testing.assert_allclose(text.values["entropy_raw"][0], text_clean.values["entropy_raw"][0], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# The text→image share under lens's sparse attention: the kernel's per-group sums


def _group_masks(b: int, t: int) -> dict:
    """HF-style boolean masks [B, 1, T, T]: structured (causal, padding) and general (Gemma 3's bidirectional
    image block inside a causal mask, with padding)."""
    pos = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    lengths = torch.tensor([t, t - 21][:b])
    real = pos[None, :] < lengths[:, None]
    block = torch.zeros(t, t, dtype=torch.bool)
    block[10:42, 10:42] = True  # an image of 32 tokens attended bidirectionally
    return {
        "causal": (None, True),
        "bidirectional": (None, False),
        "causal_right_padding": (real[:, None, None, :] & causal, False),
        "image_block_with_padding": (real[:, None, None, :] & (causal | block) & real[:, None, :, None], False),
    }


def _reference_groups(probs: torch.Tensor, allowed: torch.Tensor, weights: torch.Tensor):
    """Brute force over materialized [B, H, Tq, Tk] probabilities and [B, Tq, Tk] mask: the per-group column
    sums and the uniform pattern's (each valid query spreads 1 evenly over the keys it may see)."""
    mass = torch.einsum("bgq,bhqk->bghk", weights.double(), probs.double())
    valid = torch.diagonal(allowed, dim1=-2, dim2=-1)
    seen = (allowed & valid[:, :, None]).double()
    uniform = torch.einsum("bgq,bqk->bgk", weights.double() / seen.sum(-1).clamp(min=1)[:, None, :], seen)
    return mass, uniform


@pytest.mark.parametrize("mask_name", ["causal", "bidirectional", "causal_right_padding", "image_block_with_padding"])
def test_sparse_group_sums_equal_brute_force_from_the_kept_blocks_and_dense_when_all_are_kept(mask_name):
    from lens.kernels.attention import attention_with_stats
    from lens.kernels.sparse import SparseConfig, make_selection, sparse_attention_reference, sparse_attention_with_stats

    b, h, hkv, t, d = 2, 4, 2, 75, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(b, h, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    mask, is_causal = _group_masks(b, t)[mask_name]
    weights = torch.zeros(b, 3, t)
    weights[:, 0, 45:] = 1.0  # "text queries after the image"
    weights[:, 1, 60] = 1.0  # one chosen query's row
    weights[:, 2] = torch.rand(b, t, generator=g)  # any weights
    if mask is None:
        allowed = torch.ones(b, t, t, dtype=torch.bool)
        allowed = allowed.tril() if is_causal else allowed
    else:
        allowed = mask[:, 0]
    config = SparseConfig(mode="topk", topk=0.5, block_q=16, block_k=16, keep_sink_block=False, local_blocks=0)
    n_blocks = math.ceil(t / 16)
    kept = torch.rand(b, h, n_blocks, n_blocks, generator=g) < 0.45
    for name, pattern in (("sparse", kept), ("every block", torch.ones_like(kept))):
        selection = make_selection(pattern, config, q_len=t, k_len=t, attention_mask=mask, is_causal=is_causal)
        # chunk_size=16: one query block per chunk, so the sums really are folded chunk by chunk
        _, stats = sparse_attention_with_stats(q, k, v, selection, attention_mask=mask, is_causal=is_causal,
                                               query_weights=weights, chunk_size=16, execution="gathered")
        _, probs = sparse_attention_reference(q, k, v, selection, attention_mask=mask, is_causal=is_causal,
                                              return_probs=True)
        mass, uniform = _reference_groups(probs, allowed, weights)
        torch.testing.assert_close(stats.group_key_mass.double(), mass, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(stats.group_uniform.double(), uniform, rtol=1e-5, atol=1e-6, msg=name)
        if name == "every block":  # exactly the dense kernel's sums
            _, dense = attention_with_stats(q, k, v, attention_mask=mask, is_causal=is_causal, query_weights=weights)
            torch.testing.assert_close(stats.group_key_mass, dense.group_key_mass, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(stats.group_uniform, dense.group_uniform, rtol=1e-5, atol=1e-6)
    # the sparse selection really changed the sums (the comparison with brute force is not the dense one again)
    _, dense = attention_with_stats(q, k, v, attention_mask=mask, is_causal=is_causal, query_weights=weights)
    selection = make_selection(kept, config, q_len=t, k_len=t, attention_mask=mask, is_causal=is_causal)
    _, sparse_stats = sparse_attention_with_stats(q, k, v, selection, attention_mask=mask, is_causal=is_causal,
                                                  query_weights=weights, execution="gathered")
    assert (sparse_stats.group_key_mass - dense.group_key_mass).abs().max() > 1e-2
    # without query weights nothing is computed
    _, plain = sparse_attention_with_stats(q, k, v, selection, attention_mask=mask, is_causal=is_causal, execution="gathered")
    assert plain.group_key_mass is None and plain.group_uniform is None


class _Recording:
    """The deployed sparse kernel, unchanged, remembering each language-model call's inputs for a brute-force
    recomputation."""

    supports_query_weights = True

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append((query.clone(), key.clone(), value.clone(), attention_mask, kwargs["is_causal"], kwargs["scale"]))
        return self.kernel(module, query, key, value, attention_mask, **kwargs)

    def describe(self):
        return self.kernel.describe()


def _text_and_image(lm, item):
    ids = processed_inputs(lm, item)["input_ids"][0].numpy()
    image = ids == lm.config.image_token_id
    first = int(np.nonzero(image)[0][0])
    specials = set(lm.processor.tokenizer.all_special_ids)
    text = np.array([p > first and not image[p] and int(ids[p]) not in specials for p in range(len(ids))])
    return text, image


@pytest.mark.parametrize("kind", ["llava", "gemma3"])
def test_text_to_image_share_under_sparse_attention(kind, tiny_vlm_dir):
    """Every block kept: the sparse kernel's text→image share equals the dense run's and HF eager
    ``output_attentions``. A real sparse selection: it equals a brute-force computation from the probabilities
    of the kept blocks (the selection recomputed from the very queries and keys the model used)."""
    from lens.kernels.sparse import select_blocks, sparse_attention_reference
    from lens.models.deploy import EveryBlockKeptWarning, SparseAttention

    folder = tiny_vlm_dir(kind)
    dense_lm = lens.load(folder)
    items = _items(dense_lm)
    dense = lens.vision(lens.trace(dense_lm, items, progress=False))
    every = lens.Sparse(mode="topk", topk=1.0, block_q=16, block_k=16)
    lm = lens.load(folder, attention=SparseAttention(every, execution="gathered"))
    with pytest.warns(EveryBlockKeptWarning):
        run = lens.trace(lm, items, progress=False)
    assert run.meta["sparse_every_block_kept"] and "attn.text_key_mass" in run.arrays
    shares = lens.vision(run)
    np.testing.assert_allclose(shares.text_image_share, dense.text_image_share, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(shares.uniform_text_image_share, dense.uniform_text_image_share, rtol=1e-6)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    for seq, item in enumerate(items):
        text, image = _text_and_image(lm, item)
        with torch.no_grad():
            attentions = ref(**processed_inputs(lm, item), output_attentions=True, use_cache=False).attentions
        for layer, attn in enumerate(attentions):
            expected = attn[0].double().numpy()[:, text][:, :, image].sum(-1).mean(-1)
            np.testing.assert_allclose(shares.text_image_share[seq, layer], expected, rtol=1e-4, atol=1e-6)

    config = lens.Sparse(mode="topk", topk=0.5, block_q=16, block_k=16, keep_sink_block=False, local_blocks=0)
    lm = lens.load(folder, attention=SparseAttention(config, execution="gathered"))
    calls: list = []
    for module in lm.attention_modules:
        module._lens_kernel = _Recording(lm.attention_kernel, calls)
    run = lens.trace(lm, items, progress=False)
    assert (run.arrays["attn.kept_fraction"] < 1).any(), "the selection skipped blocks"
    shares = lens.vision(run)
    assert len(calls) == len(items) * lm.n_layers  # image sequences run one at a time, layer by layer
    differs = 0.0
    for seq, item in enumerate(items):
        text, image = _text_and_image(lm, item)
        mine = [c for c in calls if c[0].shape[2] == len(text)]  # this sequence's calls, layer by layer
        assert len(mine) == lm.n_layers
        for layer in range(lm.n_layers):
            q, k, v, mask, is_causal, scale = mine[layer]
            selection = select_blocks(q, k, config, attention_mask=mask, is_causal=is_causal, scale=scale)
            _, probs = sparse_attention_reference(q, k, v, selection, attention_mask=mask, is_causal=is_causal,
                                                  scale=scale, return_probs=True)
            expected = probs[0].double().numpy()[:, text][:, :, image].sum(-1).mean(-1)
            np.testing.assert_allclose(shares.text_image_share[seq, layer], expected, rtol=1e-5, atol=1e-6)
            differs = max(differs, float(np.abs(expected - dense.text_image_share[seq, layer]).max()))
    assert differs > 1e-3, "the sparse selection changed the text→image share somewhere"
    np.testing.assert_allclose(shares.uniform_text_image_share, dense.uniform_text_image_share, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# lens.compare per (layer, modality)


def _scaled(hook_target, scale_rows):
    """A forward hook that multiplies chosen rows of a module's output (a planted deployment difference)."""

    def hook(module, args, output):
        output = output.clone()
        for row, factor in scale_rows.items():
            output[0, row] *= factor
        return output

    return hook_target.register_forward_hook(hook)


def test_compare_by_modality_finds_a_planted_difference_in_the_right_modality(tiny_vlm_dir):
    lm = lens.load(tiny_vlm_dir("llava"))
    items = _items(lm)[:1]
    a = lens.trace(lm, items, progress=False)
    same = lens.trace(lm, items, progress=False)
    frame = lens.compare(a, same).to_frame("modality")
    deltas = [c for c in frame.columns if c.endswith("_delta")]
    assert {"mean_norm_delta", "entropy_delta", "mass_to_uniform_delta", "sink_token_fraction_delta",
            "anisotropy_delta", "normalized_entropy_delta", "text_image_share_delta"} <= set(deltas)
    assert set(frame.modality) == {"text", "image", "special"} and len(frame) == 2 * 3 * (lm.n_layers + 1)
    assert np.nanmax(np.abs(frame[deltas].to_numpy())) <= 1e-6, "identical runs give zeros"

    # one image token ×20 as it leaves the projector: the image rows change at the embeddings, the text rows not
    handle = _scaled(lm.projector, {5: 20.0})
    try:
        image_planted = lens.trace(lm, items, progress=False)
    finally:
        handle.remove()
    result = lens.compare(a, image_planted)
    frame = result.to_frame("modality")
    b0 = frame[(frame.variant == result.labels[1]) & (frame.layer == 0)].set_index("modality")
    a0 = frame[(frame.variant == result.labels[0]) & (frame.layer == 0)].set_index("modality")
    # 15 tokens as before and one ×20: the mean norm grows by about 19/16 of a token's
    assert b0.loc["image", "mean_norm_delta"] > 0.5 * a0.loc["image", "mean_norm"]
    assert abs(b0.loc["image", "entropy_delta"]) > 1e-3
    assert b0.loc["image", "anisotropy_delta"] > 1e-3
    assert b0.loc["text", "mean_norm_delta"] == 0 and b0.loc["text", "entropy_delta"] == 0
    assert b0.loc["special", "mean_norm_delta"] == 0
    reference = frame[frame.variant == result.labels[0]]
    assert (reference[deltas].fillna(0) == 0).all().all()
    assert "image tokens max |Δ|" in result.summary()

    # text tokens ×3 at the embeddings (image positions are overwritten by the projector afterwards): the text
    # rows change, the image rows not
    text_rows = {int(p): 3.0 for p in np.nonzero(a.modality == 0)[0]}
    handle = _scaled(lm.model.get_input_embeddings(), text_rows)
    try:
        text_planted = lens.trace(lm, items, progress=False)
    finally:
        handle.remove()
    frame = lens.compare(a, text_planted).to_frame("modality")
    b0 = frame[(frame.variant == frame.variant.iloc[-1]) & (frame.layer == 0)].set_index("modality")
    assert b0.loc["text", "mean_norm_delta"] == pytest.approx(2 * a0.loc["text", "mean_norm"], rel=1e-5)
    assert b0.loc["image", "mean_norm_delta"] == 0
    assert b0.loc["image", "entropy_delta"] == 0 and b0.loc["image", "anisotropy_delta"] == 0


def test_compare_by_modality_of_dense_against_sparse_and_int8_and_of_text_runs(tiny_vlm_dir):
    from lens.models.deploy import SparseAttention

    folder = tiny_vlm_dir("llava")
    dense_lm = lens.load(folder)
    items = _items(dense_lm)
    dense = lens.trace(dense_lm, items, progress=False)
    # sparse attention changes where the text queries look: the text rows' text→image share moves, by exactly the
    # change lens.vision reports for each run
    config = lens.Sparse(mode="topk", topk=0.5, block_q=16, block_k=16, keep_sink_block=False, local_blocks=0)
    sparse = lens.trace(lens.load(folder, attention=SparseAttention(config, execution="gathered")), items, progress=False)
    result = lens.compare(dense, sparse)
    frame = result.to_frame("modality")
    text = frame[(frame.variant == result.labels[1]) & (frame.modality == "text")].set_index("layer")
    expected = lens.vision(sparse).share_per_layer - lens.vision(dense).share_per_layer
    np.testing.assert_allclose(text["text_image_share_delta"].to_numpy()[: len(expected)], expected, rtol=1e-6)
    assert np.abs(expected).max() > 1e-3
    assert frame[frame.modality == "image"]["text_image_share"].isna().all()  # a text-query quantity
    assert "sparse" in result.summary() and "text_image_share" in result.summary()
    int8 = lens.trace(lens.load(folder, quant="int8"), items, progress=False)
    frame = lens.compare(dense, int8).to_frame("modality")
    changed = frame[frame.variant == frame.variant.iloc[-1]]
    # int8 language-model weights: layer 0's input (embeddings, projector) is untouched, later layers move
    assert (changed[changed.layer == 0]["mean_norm_delta"].abs() == 0).all()
    assert (changed[changed.layer == lm_layers(dense)]["mean_norm_delta"].abs() > 0).any()
    # a text-only comparison has no image rows and no per-modality valley, but still the attention split
    texts = ["Plain words only.", "Two sentences of text here."]
    frame = lens.compare(lens.trace(dense_lm, texts, progress=False), lens.trace(dense_lm, texts, progress=False)).to_frame("modality")
    assert set(frame.modality) == {"text", "special"} and "entropy" not in frame and "mass_to_uniform" in frame
    with pytest.raises(lens.ConfigError, match="modality"):
        lens.compare(dense, int8).to_frame("modalities")


def lm_layers(run) -> int:
    return int(run.meta["n_layers"])


@pytest.mark.parametrize("kind", ["llava", "qwen2_vl"])
def test_neurons_per_modality_equal_hugging_faces_own_mlp_activations(kind, tiny_vlm_dir):
    """lens.neurons(run).to_frame("modality"): mean, max, fraction > 0 and count of every neuron over the text
    tokens and over the image tokens equal those of HF's own forward (the input of each MLP's down projection,
    hooked on a separately loaded model), split by the image-token id and the tokenizer's special ids."""
    folder = tiny_vlm_dir(kind)
    lm = lens.load(folder)
    items = _items(lm)
    run = lens.trace(lm, items, capture=("mlp",), progress=False)
    frame = lens.neurons(run).to_frame("modality").set_index(["layer", "neuron", "modality"]).sort_index()
    ref = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    decoder = getattr(ref.model, "language_model", None) or ref.model.text_model
    specials = set(lm.processor.tokenizer.all_special_ids)
    acts: dict[int, list] = {i: [] for i in range(len(decoder.layers))}
    rows = {"text": [], "image": []}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: acts[i].append(a[0][0].detach()))
               for i, layer in enumerate(decoder.layers)]
    try:
        for item in items:
            processed = processed_inputs(lm, item)
            ids = processed["input_ids"][0].numpy()
            image = ids == lm.config.image_token_id
            rows["image"].append(image)
            rows["text"].append(~image & ~np.isin(ids, list(specials)))
            with torch.no_grad():
                ref(**processed, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    for layer, per_item in acts.items():
        for name in ("text", "image"):
            x = torch.cat([a[torch.from_numpy(r)] for a, r in zip(per_item, rows[name])]).double()
            got = frame.xs((layer, name), level=("layer", "modality"))
            assert (got["count"] == len(x)).all(), (kind, layer, name)
            np.testing.assert_allclose(got["mean"].to_numpy(), x.mean(0).numpy(), rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(got["max"].to_numpy(), x.max(0).values.numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["fraction_positive"].to_numpy(), (x > 0).double().mean(0).numpy(), atol=1e-9)
    text_only = lens.trace(lens.load(folder), ["plain text, no image"], capture=("mlp",), progress=False)
    with pytest.raises(LensError, match="modality"):
        lens.neurons(text_only).to_frame("modality")
