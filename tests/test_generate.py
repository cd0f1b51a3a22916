"""lens.generate: the model's own generate with its KV cache, every step traced — checked against HF generate,
plain traces of each prefix, and an independent sink + window attention for the StreamingLLM cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

import lens
from lens.errors import ConfigError

PROMPTS = ["The quick brown fox", "Once upon a time there was a"]


@pytest.fixture(scope="module")
def folder(tiny_model_dir):
    return tiny_model_dir("qwen2")  # GQA + RoPE


@pytest.fixture(scope="module")
def lm(folder):
    return lens.load(folder)


@pytest.fixture(scope="module")
def full(lm):
    return lens.generate(lm, PROMPTS, 12, progress=False)


def _prompt_ids(lm, run, s):
    start = int(run.arrays["gen.position"][int(run.arrays["gen.offsets"][s])])
    return run.arrays["token_ids"][run.span(s)][:start].tolist()


def test_greedy_and_sampled_tokens_equal_hf_generate(lm, folder, full):
    # an independently loaded copy with HF's eager attention. The explicit attention_mask matters: this tiny
    # tokenizer's pad id equals its BOS id, and without a mask HF generate would take the BOS for padding
    reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    for s in range(len(PROMPTS)):
        ids = torch.tensor([_prompt_ids(lm, full, s)])
        expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                                      pad_token_id=0)[0].tolist()
        assert full.arrays["token_ids"][full.span(s)].tolist() == expected
    sampled = lens.generate(lm, PROMPTS[:1], 10, do_sample=True, temperature=0.9, top_k=20, seed=7, progress=False)
    torch.manual_seed(7)
    ids = torch.tensor([_prompt_ids(lm, sampled, 0)])
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True,
                                  temperature=0.9, top_k=20, pad_token_id=0)
    assert sampled.arrays["token_ids"].tolist() == expected[0].tolist()
    again = lens.generate(lm, PROMPTS[:1], 10, do_sample=True, temperature=0.9, top_k=20, seed=7, progress=False)
    assert again.arrays["token_ids"].tolist() == sampled.arrays["token_ids"].tolist()  # seeded


def test_step_statistics_equal_a_plain_trace_of_each_prefix(lm, full):
    a = full.arrays
    for s in range(len(PROMPTS)):
        steps = range(int(a["gen.offsets"][s]), int(a["gen.offsets"][s + 1]))
        ids = a["token_ids"][full.span(s)].tolist()
        for j in (steps[0], steps[len(steps) // 2], steps[-1]):
            t = int(a["gen.position"][j])
            prefix = lens.trace(lm, [ids[: t + 1]], keep_patterns="all", progress=False)
            for layer in range(lm.n_layers):
                row = np.stack([prefix.pattern(layer, h)[-1] for h in range(lm.n_heads)])  # the new query's row
                np.testing.assert_allclose(a["gen.first_mass"][layer, :, j], row[:, 0], atol=1e-5)
                np.testing.assert_allclose(a["gen.sink_mass"][layer, :, j], row[:, :4].sum(1), atol=1e-5)
                np.testing.assert_allclose(a["gen.window_mass"][layer, :, j], row[:, max(0, t - 63):].sum(1), atol=1e-5)
            np.testing.assert_allclose(a["resid.norm"][:, full.span(s)][:, t], prefix.arrays["resid.norm"][:, -1],
                                       rtol=1e-5, atol=1e-5)
            top = prefix.arrays["resid.hidden.0"] if "resid.hidden.0" in prefix.arrays else None
            assert top is None  # no hidden states kept by default
        assert int(a["gen.visible"][steps[-1]]) == len(ids)  # the full cache: every earlier token is visible


def test_whole_sequence_statistics_equal_a_plain_trace(lm, full):
    """Summed over the decoding steps, the attention a key receives equals that of one causal pass."""
    texts = [full.arrays["token_ids"][full.span(s)].tolist() for s in range(full.n_sequences)]
    plain = lens.trace(lm, texts, progress=False)
    np.testing.assert_allclose(full.arrays["attn.key_mass"], plain.arrays["attn.key_mass"], atol=2e-5)
    np.testing.assert_allclose(full.arrays["attn.query_count"], plain.arrays["attn.query_count"])
    np.testing.assert_allclose(full.arrays["resid.norm"], plain.arrays["resid.norm"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lens.sinks(full).sink_score, lens.sinks(plain).sink_score, atol=1e-5)
    np.testing.assert_allclose(lens.valley(full).mean("entropy_raw"), lens.valley(plain).mean("entropy_raw"), atol=1e-4)


def _register_sink_window_attention(prompt_len: int, sink: int, window: int) -> str:
    """Eager attention over a whole sequence where query q ≥ prompt_len sees keys [0, sink) ∪ [q − window, q]:
    what a StreamingLLM cache lets a decoding step see — written without any cache."""
    name = f"ref_sink_window_{prompt_len}_{sink}_{window}"

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        T = query.shape[2]
        q = torch.arange(T)[:, None]
        kk = torch.arange(T)[None, :]
        allowed = kk <= q
        late = q >= prompt_len
        allowed &= ~late | (kk < sink) | (kk >= q - window)
        scores = ((query @ k.transpose(-1, -2)) * scaling).masked_fill(~allowed, float("-inf"))
        return (torch.softmax(scores, -1) @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    return name


def test_streaming_cache_equals_an_independent_sink_and_window_attention(lm, folder, full):
    cache = lens.StreamingCache(sink_tokens=2, window=3)
    stream = lens.generate(lm, PROMPTS, 12, cache=cache, force=full, progress=False)
    assert stream.provenance["generate"]["cache"]["kind"] == "streaming"
    assert stream.arrays["token_ids"].tolist() == full.arrays["token_ids"].tolist()  # forced: the same text
    visible = stream.arrays["gen.visible"]
    assert visible.max() == 2 + 3 + 1  # sinks + window + the new token itself
    for s in range(len(PROMPTS)):
        ids = stream.arrays["token_ids"][stream.span(s)].tolist()
        P = len(_prompt_ids(lm, stream, s))
        name = _register_sink_window_attention(P, 2, 3)
        reference = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=name).eval()
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float()
        expected = torch.log_softmax(logits[P - 1 : len(ids) - 1], -1).numpy()
        steps = slice(int(stream.arrays["gen.offsets"][s]), int(stream.arrays["gen.offsets"][s + 1]))
        np.testing.assert_allclose(stream.arrays["gen.logprobs"][steps], expected, atol=1e-4)


def test_decoding_compares_caches_token_by_token(lm, full):
    same = lens.decoding(lens.generate(lm, PROMPTS, 12, force=full, progress=False), baseline=full)
    assert same.token_match.all() and np.nanmax(same.kl) < 1e-6
    tight = lens.generate(lm, PROMPTS, 12, cache=lens.StreamingCache(1, 2), force=full, progress=False)
    result = lens.decoding(tight, baseline=full)
    assert result.token_match.all()  # forced: both read the same text
    assert np.nanmax(result.kl) > 1e-6 and np.all(result.kl[np.isfinite(result.kl)] >= 0)
    free = lens.decoding(lens.generate(lm, PROMPTS, 12, cache=lens.StreamingCache(1, 2), progress=False), baseline=full)
    frame = free.to_frame()
    assert {"step", "token", "sink_mass", "window_mass", "token_match", "kl"} <= set(frame.columns)
    for s in range(len(PROMPTS)):
        match, kl = free.token_match[free.sequence == s], free.kl[free.sequence == s]
        diverged = ~np.r_[True, np.cumprod(match)[:-1].astype(bool)]  # an earlier token differs: other contexts
        assert np.isnan(kl[diverged]).all() and np.isfinite(kl[~diverged]).all()
    assert "decoding steps" in repr(free) and "<table" in free._repr_html_()
    assert free.figure().data  # interactive figure


def test_generation_runs_save_load_and_view(lm, full, tmp_path):
    loaded = lens.Run.load(full.save(tmp_path / "gen.lens"))
    assert loaded.provenance["generate"]["max_new_tokens"] == 12
    np.testing.assert_array_equal(loaded.arrays["gen.sink_mass"], full.arrays["gen.sink_mass"])
    from lens.widgets import TokenView

    view = TokenView.decoding(full, "window_mass")
    values = np.frombuffer(view.values, np.float32)
    P = len(_prompt_ids(lm, full, 0))
    assert np.isnan(values[:P]).all() and np.isfinite(values[P:]).all()


def test_bad_generation_requests_raise_config_errors(lm, full, minilm):
    with pytest.raises(ConfigError, match="causal language model"):
        lens.generate(minilm, "Hello", 3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        lens.generate(lm, "Hello", 0)
    with pytest.raises(ConfigError, match="StreamingCache"):
        lens.generate(lm, "Hello", 3, cache="streaming")
    with pytest.raises(ConfigError, match="StreamingCache needs"):
        lens.StreamingCache(sink_tokens=-1)
    with pytest.raises(ConfigError, match="different prompt"):
        lens.generate(lm, ["A different prompt", "and another"], 3, force=full)
    with pytest.raises(ConfigError, match="lens.generate"):
        lens.decoding(lens.trace(lm, PROMPTS, progress=False))
    other = lens.generate(lm, ["Something else entirely"], 3, progress=False)
    with pytest.raises(ConfigError, match="other prompts"):
        lens.decoding(other, baseline=lens.generate(lm, PROMPTS[:1], 3, progress=False))


@pytest.mark.slow
def test_smollm2_generation_equals_hf_and_a_streaming_cache_stays_close(smollm2):
    prompt = "The capital of France is"
    run = lens.generate(smollm2, prompt, 16, progress=False)
    ids = torch.tensor([_prompt_ids(smollm2, run, 0)])
    expected = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                      do_sample=False)[0].tolist()
    assert run.arrays["token_ids"].tolist() == expected
    assert "Paris" in "".join(run.tokens[0])
    result = lens.decoding(lens.generate(smollm2, prompt, 16, cache=lens.StreamingCache(4, 8), force=run,
                                         progress=False), baseline=run)
    # the first token is the sink: even with a tiny window, new queries lean on it (measured ≈ 0.6–0.9)
    assert result.to_frame()["first_mass"].mean() > 0.4
    assert np.nanmax(result.kl) < 1.0
