"""Issue kind 1: statistics that depend on the mask read the model's ACTUAL mask, never an assumed shape.

The uniform share u[k] = (1/|Q_k|) Σ_{q∈Q_k} 1/|K_q| (docs/definitions.md "Attention mass received") is
measured inside the attention kernels — the dense streaming kernel and the sparse statistics — from the
mask the model passes: causal, padding (left and right), sliding windows, bidirectional blocks. Checked

* in the kernels against brute force on the boolean mask, for every mask shape, with small chunks;
* on real model families with windows (Gemma 2, Gemma 3 text, Mistral, Qwen2 with ``use_sliding_window``),
  a plain padded decoder and an encoder, against Hugging Face eager ``output_attentions`` on the same
  padded batch (the support of the eager pattern is the mask the model really used);
* in the analyses and views: random windowed models have no sink tokens and no sink heads, while a
  head that beats 2·u[0] is one; AttentionExplorer, SinkMap and CompareView mark the same keys.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from conftest import _bpe_tokenizer

import lens
from lens.kernels.attention import attention_with_stats
from lens.kernels.sparse import SparseConfig, select_blocks, sparse_attention_with_stats
from lens.run import Run, plain_uniform_share

TEXTS = [
    "Massive activations are rare but very large values in the residual stream of a transformer model.",
    "The quick brown fox jumps over the lazy dog.",
]

# ------------------------------------------------------------------------------------- kernel level

T = 40


def _masks(batch: int = 2) -> dict[str, torch.Tensor]:
    """Boolean [B, 1, T, T] masks of every shape a Hugging Face model builds (True = may attend)."""
    pos = torch.arange(T)
    causal = pos[None, :] <= pos[:, None]
    lengths = torch.tensor([T, 23])
    right = pos[None, :] < lengths[:, None]
    left = pos[None, :] >= (T - lengths)[:, None]
    window = causal & (pos[:, None] - pos[None, :] < 5)
    image = (pos >= 10) & (pos < 22)  # a Gemma 3 image: bidirectional inside the block
    block = causal | (image[:, None] & image[None, :])
    chunked = causal & (pos[:, None] // 8 == pos[None, :] // 8)  # Llama 4 style attention chunks
    expand = lambda m: m.expand(batch, 1, T, T).clone()  # noqa: E731
    return {
        "causal_right_padding": right[:, None, None, :] & causal,
        "causal_left_padding": left[:, None, None, :] & causal,
        "bidirectional_padding": right[:, None, None, :] & torch.ones(T, T, dtype=torch.bool),
        "sliding_window": expand(window),
        "sliding_window_right_padding": right[:, None, None, :] & window,
        "sliding_window_left_padding": left[:, None, None, :] & window,
        "bidirectional_image_block": expand(block),
        "chunked": expand(chunked),
    }


def _brute_force(mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """|Q_k| and Σ_{q∈Q_k} 1/|K_q| straight from the definition; valid queries = the mask's diagonal."""
    m = mask[:, 0].numpy()
    valid = np.diagonal(m, axis1=1, axis2=2)
    seen = m & valid[:, :, None]
    n_keys = seen.sum(-1)
    inv = np.where(n_keys > 0, 1.0 / np.maximum(n_keys, 1), 0.0)
    return seen.sum(1).astype(np.float64), (seen * inv[:, :, None]).sum(1)


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g),
            torch.randn(2, 2, T, 16, generator=g))


@pytest.mark.parametrize("name", list(_masks()))
def test_dense_kernel_uniform_sum_is_the_definition(name):
    mask = _masks()[name]
    q, k, v = _qkv()
    count, uniform = _brute_force(mask)
    for chunk in (3, 64):  # chunks smaller than the sequence, and one chunk
        _, stats = attention_with_stats(q, k, v, attention_mask=mask, chunk_size=chunk)
        np.testing.assert_allclose(stats.query_count.numpy(), count)
        np.testing.assert_allclose(stats.uniform_sum.numpy(), uniform, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
def test_dense_kernel_without_mask_tensor(causal):
    q, k, v = _qkv()
    _, stats = attention_with_stats(q, k, v, is_causal=causal)
    full = torch.ones(2, 1, T, T, dtype=torch.bool)
    count, uniform = _brute_force(full.tril() if causal else full)
    np.testing.assert_allclose(stats.query_count.numpy(), count)
    np.testing.assert_allclose(stats.uniform_sum.numpy(), uniform, rtol=1e-6)
    # a shorter query block (a KV cache): bottom-right aligned, query q sees keys ≤ q + offset
    _, short = attention_with_stats(q[:, :, -7:], k, v, is_causal=causal)
    offset = T - 7
    seen = np.array([[kk <= qq + offset or not causal for kk in range(T)] for qq in range(7)])
    inv = 1.0 / seen.sum(1)
    np.testing.assert_allclose(short.uniform_sum[0].numpy(), (seen * inv[:, None]).sum(0), rtol=1e-6)


@pytest.mark.parametrize("name", ["causal_left_padding", "sliding_window_right_padding", "bidirectional_image_block",
                                  "bidirectional_padding"])
@pytest.mark.parametrize("mode", ["hybrid", "streaming"])
def test_sparse_statistics_use_the_models_mask_not_the_sparsity(name, mode):
    """Under sparsity the uniform share is still the model's: equal to brute force and to dense."""
    mask = _masks()[name]
    q, k, v = _qkv(1)
    config = SparseConfig.streaming(sink_tokens=4, window=8, block_q=16, block_k=16) if mode == "streaming" \
        else SparseConfig(mode=mode, topk=0.3, topp=0.5, block_q=16, block_k=16)
    sel = select_blocks(q, k, config, attention_mask=mask)
    _, stats = sparse_attention_with_stats(q, k, v, sel, attention_mask=mask, compiled=False, chunk_size=16)
    count, uniform = _brute_force(mask)
    np.testing.assert_allclose(stats.query_count.numpy(), count)
    np.testing.assert_allclose(stats.uniform_sum.numpy(), uniform, rtol=1e-6, atol=1e-6)
    if "window" not in name:  # a 5-token window leaves the sparsity nothing to skip
        _, dense = attention_with_stats(q, k, v, attention_mask=mask)
        assert not torch.allclose(stats.key_mass, dense.key_mass, atol=1e-3), "the sparsity must change the mass"
        torch.testing.assert_close(stats.uniform_sum, dense.uniform_sum)


@pytest.mark.parametrize("causal", [True, False])
def test_sparse_statistics_structured_masks(causal):
    q, k, v = _qkv(2)
    sel = select_blocks(q, k, SparseConfig(topk=0.5, block_q=16, block_k=16), is_causal=causal)
    _, stats = sparse_attention_with_stats(q, k, v, sel, is_causal=causal, compiled=False)
    _, dense = attention_with_stats(q, k, v, is_causal=causal)
    torch.testing.assert_close(stats.uniform_sum, dense.uniform_sum)
    torch.testing.assert_close(stats.query_count, dense.query_count)


# ---------------------------------------------------------------------------------- model families


def _windowed_config(kind: str):
    common = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128, vocab_size=320,
                  max_position_embeddings=256)
    if kind == "gemma2":  # layer 0 slides (window 4), layer 1 is global; soft-capped scores
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=16, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0, sliding_window=4, **common)
    if kind == "gemma3_text":
        return tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=5,
                                   layer_types=["sliding_attention", "full_attention"], **common)
    if kind == "mistral":  # every layer slides
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=4, **common)
    if kind == "qwen2":  # layers ≥ max_window_layers slide
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1,
                              **common)
    if kind == "llama":  # plain causal, for contrast
        return tf.LlamaConfig(num_key_value_heads=4, **common)
    raise KeyError(kind)


@pytest.fixture(scope="session")
def windowed(tmp_path_factory):
    cache = {}

    def get(kind: str):
        if kind not in cache:
            folder = tmp_path_factory.mktemp(f"windowed-{kind}")
            torch.manual_seed(0)
            tf.AutoModelForCausalLM.from_config(_windowed_config(kind)).save_pretrained(folder)
            _bpe_tokenizer("llama").save_pretrained(folder)
            cache[kind] = folder
        return cache[kind]

    return get


def _eager_attentions(folder, run, kind):
    auto = tf.AutoModel if kind == "encoder" else tf.AutoModelForCausalLM
    model = auto.from_pretrained(folder, attn_implementation="eager").eval()
    width = int(run.lengths.max())
    ids = torch.zeros(run.n_sequences, width, dtype=torch.long)
    mask = torch.zeros(run.n_sequences, width, dtype=torch.long)
    for s in range(run.n_sequences):
        n = int(run.lengths[s])
        ids[s, :n] = torch.from_numpy(run.arrays["token_ids"][run.span(s)])
        mask[s, :n] = 1
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions


def _check_against_eager(run, attentions):
    """Mass, |Q_k|, u[k], sink scores and sink-token flags equal the eager pattern's, per sequence."""
    res = lens.sinks(run)
    for layer, attn in enumerate(attentions):
        for s in range(run.n_sequences):
            n = int(run.lengths[s])
            probs = attn[s, :, :n, :n].double().numpy()  # [H, q, k] over real tokens
            allowed = (probs > 0).any(0)  # the mask the model used (random weights: no exact zeros)
            count = allowed.sum(0)
            uniform = (allowed / allowed.sum(1, keepdims=True)).sum(0) / count
            np.testing.assert_allclose(run.arrays["attn.query_count"][layer, run.span(s)], count)
            np.testing.assert_allclose(run.uniform_share(layer, s), uniform, rtol=1e-5)
            mass = probs.sum(1) / count
            for h in range(run.n_heads):
                np.testing.assert_allclose(run.mass_received(layer, h, s), mass[h], atol=2e-5)
                np.testing.assert_array_equal(res.sink_tokens(layer, h, s), np.nonzero(mass[h] > 5.0 * uniform)[0])
            np.testing.assert_allclose(res.sink_score[s, layer], mass[:, 0], atol=2e-5)
            np.testing.assert_allclose(res.uniform_first[s, layer], uniform[0], rtol=1e-5)
    return res


@pytest.mark.parametrize("kind,windowed_layers", [("gemma2", [0]), ("gemma3_text", [0]), ("mistral", [0, 1]),
                                                  ("qwen2", [1]), ("llama", [])])
def test_windowed_families_match_eager_with_the_same_mask(kind, windowed_layers, windowed):
    folder = windowed(kind)
    lm = lens.load(folder)
    run = lens.trace(lm, TEXTS, progress=False)  # one padded batch of two lengths
    assert len(set(run.lengths)) == 2 and run.lengths.max() > 20
    res = _check_against_eager(run, _eager_attentions(folder, run, kind))
    for layer in range(run.n_layers):
        plain = plain_uniform_share(int(run.lengths[0]), True)
        differs = not np.allclose(run.uniform_share(layer, 0), plain)
        assert differs == (layer in windowed_layers), f"layer {layer}: the window must show in u[k] exactly there"
    frame = res.to_frame("tokens")
    for layer in windowed_layers:
        # random weights attend almost uniformly inside the window: no key is 5× its uniform share, and no head's
        # mass on token 0 beats 2·u[0] (u[0] ≈ 0.52 for a window of 4), although it is ≥ ε = 0.3
        flagged = frame[frame.layer == layer].is_sink_token.mean()
        assert flagged < 0.02, f"{kind} layer {layer}: {flagged:.0%} of keys flagged as sinks"
        assert res.sink_rate[layer] == 0.0 and not res.is_sink_head[layer].any()
        assert (res.mean_sink_score[layer] >= res.epsilon).all(), "the ε test alone would call them sink heads"


def test_encoder_with_padding_matches_eager(minilm):
    from conftest import minilm_path

    texts = ["A short one.", "A much longer sentence, so that the first one is padded inside the batch."]
    run = lens.trace(minilm, texts, progress=False)
    res = _check_against_eager(run, _eager_attentions(str(minilm_path()), run, "encoder"))
    for s in range(2):
        np.testing.assert_allclose(run.uniform_share(2, s), 1.0 / run.lengths[s], rtol=1e-6)
    assert res.is_sink_head.sum() > 0, "MiniLM has real sink heads; the 2·u[0] rule must keep them"


def test_sparse_model_run_keeps_the_dense_uniform_share(windowed):
    """A model deployed with sparse attention: the uniform share is the model's mask's, equal to dense."""
    from lens.models.deploy import SparseAttention

    folder = windowed("mistral")
    dense = lens.trace(lens.load(folder), TEXTS, progress=False)
    # a StreamingLLM pattern narrower than the model's own window of 4: sparsity changes the mass …
    kernel = SparseAttention(lens.Sparse.streaming(sink_tokens=1, window=2, block_q=16, block_k=16), compiled=False)
    sparse = lens.trace(lens.load(folder, attention=kernel), TEXTS, progress=False)
    assert not np.allclose(sparse.arrays["attn.key_mass"], dense.arrays["attn.key_mass"], atol=1e-3)
    # … but not the yardstick, which is the model's mask
    np.testing.assert_allclose(sparse.arrays["attn.uniform_share"], dense.arrays["attn.uniform_share"], rtol=1e-6)
    np.testing.assert_array_equal(sparse.arrays["attn.query_count"], dense.arrays["attn.query_count"])


# ------------------------------------------------------------------------------ analyses and views


def _synthetic_run(score: float, u0: float, T: int = 8) -> Run:
    """One layer, two heads: head 0 gives token 0 the mass `score`, head 1 is uniform; u[0] = u0."""
    uniform = np.full(T, (1 - u0) / (T - 1), dtype=np.float32)
    uniform[0] = u0
    mass = np.stack([np.r_[score, np.full(T - 1, (1 - score) / (T - 1))], uniform]).astype(np.float32)
    arrays = {
        "token_ids": np.arange(T, dtype=np.int64), "offsets": np.array([0, T]), "special": np.zeros(T, bool),
        "attn.key_mass": (mass * 4)[None], "attn.query_count": np.full((1, T), 4, np.float32),
        "attn.uniform_share": uniform[None],
    }
    return Run(arrays=arrays, tokens=[[f"t{i}" for i in range(T)]], meta={"n_layers": 1, "n_heads": 2, "causal": True})


@pytest.mark.parametrize("score,u0,is_sink", [(0.6, 0.52, False), (0.6, 0.25, True), (0.31, 0.05, True),
                                              (0.29, 0.05, False), (1.0, 0.5, True)])
def test_sink_head_needs_epsilon_and_twice_the_uniform_share(score, u0, is_sink):
    res = lens.sinks(_synthetic_run(score, u0))
    assert bool(res.is_sink_head[0, 0]) is is_sink
    assert res.sink_heads == ([(0, 0)] if is_sink else [])
    assert res.sink_rate[0] == (0.5 if is_sink else 0.0)
    heads = res.to_frame("heads")
    assert heads.is_sink_head.tolist() == [is_sink, False]
    np.testing.assert_allclose(heads.uniform_share_first, u0)


def test_old_runs_without_uniform_share_fall_back_with_a_warning():
    run = _synthetic_run(0.6, 0.25)
    del run.arrays["attn.uniform_share"]
    with pytest.warns(lens.errors.LensWarning, match="before lens stored the uniform share"):
        share = run.uniform_share(0, 0)
    np.testing.assert_allclose(share, plain_uniform_share(8, True))
    run.arrays["attn.query_count"] = np.arange(8, 0, -1, dtype=np.float32)[None]  # plain causal: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run.uniform_share(0, 0)


def test_views_mark_sinks_with_the_models_uniform_share(windowed):
    pytest.importorskip("anywidget")
    from lens.widgets import AttentionExplorer, CompareView, SinkMap

    lm = lens.load(windowed("gemma2"))
    run = lens.trace(lm, TEXTS[0] * 2, progress=False)
    T = int(run.lengths[0])
    explorer = AttentionExplorer(run, layer=0, head=0)
    assert len(np.frombuffer(explorer.sink_keys, dtype="<i4")) <= 0.05 * T
    res = lens.sinks(run)
    sink_map = SinkMap(res, layer=0, head=1)
    outline = np.frombuffer(sink_map.outline, dtype=np.uint8).reshape(run.n_layers, run.n_heads)
    np.testing.assert_array_equal(outline.astype(bool), res.sink_head_mask(0))
    np.testing.assert_array_equal(np.frombuffer(sink_map.sink_keys, dtype="<i4"), res.sink_tokens(0, 1, 0))
    view = CompareView(lens.compare(run, run), layer=0, head=2)
    np.testing.assert_array_equal(np.frombuffer(view.sinks_a, dtype="<i4"), res.sink_tokens(0, 2, 0))
