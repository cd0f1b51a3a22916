"""MoE routing: on tiny Mixtral and Qwen2-MoE models with a planted router, lens's routing statistics (from
lens.trace → lens.neurons and from lens.scan) equal those computed from Hugging Face's own
``output_router_logits`` (docs/definitions.md, "MoE routing")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CORPUS, _bpe_tokenizer

import lens

E, K = 4, 2
TEXTS = CORPUS[:8]


def _config(kind: str):
    import transformers as tf

    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=K)
    if kind == "mixtral":
        return tf.MixtralConfig(intermediate_size=32, num_local_experts=E, sliding_window=None, **common)
    return tf.Qwen2MoeConfig(intermediate_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                             num_experts=E, norm_topk_prob=False, decoder_sparse_step=1, **common)


def _plant(model) -> None:
    """Attention writes nothing, embeddings point along dimension (token id mod E), and the first router reads
    those dimensions: token t goes to expert t mod E first in layer 0."""
    g = torch.Generator().manual_seed(0)
    inner = model.model
    emb = inner.embed_tokens.weight
    emb.copy_(0.05 * torch.randn(emb.shape, generator=g))
    ids = torch.arange(emb.shape[0])
    emb[ids, ids % E] += 3.0
    for layer in inner.layers:
        layer.self_attn.o_proj.weight.zero_()
    router = inner.layers[0].mlp.gate.weight
    router.zero_()
    router[torch.arange(E), torch.arange(E)] = 8.0


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_model(request, tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = tf.AutoModelForCausalLM.from_config(_config(request.param))
    with torch.no_grad():
        _plant(model)
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(folder)
    _bpe_tokenizer("llama").save_pretrained(folder)
    return request.param, lens.load(folder)


def _hf_reference(lm, texts):
    """Per MoE layer, over real tokens: router probabilities and the top-k experts, from output_router_logits."""
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = lm.model(**enc, output_router_logits=True, use_cache=False)
    real = enc["attention_mask"].reshape(-1).bool()
    ref = []
    for logits in out.router_logits:
        probs = torch.softmax(logits.float(), -1)[real]
        top = probs.topk(K, dim=-1)
        ref.append((probs.numpy(), top.indices.numpy(), top.values.numpy(), enc["input_ids"].reshape(-1)[real].numpy()))
    return ref


def _stats(probs, experts, gates):
    counts = np.array([(experts == e).sum() for e in range(E)])
    load = counts / counts.sum()
    entropy = -(probs * np.log(probs)).sum(1).mean()
    return counts, load, entropy, load.std() / load.mean()


def test_router_statistics_equal_hf_output_router_logits(moe_model):
    kind, lm = moe_model
    assert lm.n_experts == E and lm.experts_per_token == K and len([r for r in lm.router_modules if r is not None]) == 2
    ref = _hf_reference(lm, TEXTS)
    run = lens.trace(lm, TEXTS, progress=False)
    assert run.has("moe.probs") and list(run.arrays["moe.layers"]) == [0, 1]
    result = lens.neurons(run)
    routing = result.to_frame("routing")
    for i, (probs, top, top_p, ids) in enumerate(ref):
        np.testing.assert_allclose(run.arrays["moe.probs"][i], probs, atol=1e-5)
        # the same experts per token (as sets: order among equal gates is the model's)
        assert (np.sort(run.arrays["moe.experts"][i], 1) == np.sort(top, 1)).all()
        counts, load, entropy, cv = _stats(probs, top, top_p)
        mine = routing[routing.layer == i].sort_values("expert")
        assert list(mine["tokens"]) == list(counts)
        np.testing.assert_allclose(mine["load"], load, atol=1e-12)
        np.testing.assert_allclose(mine["routing_entropy"].iloc[0], entropy, rtol=1e-5)
        np.testing.assert_allclose(mine["load_cv"].iloc[0], cv, rtol=1e-6)
        np.testing.assert_allclose(mine["mean_prob"], probs.mean(0), atol=1e-6)
    # the planted router: in layer 0 every token's first expert is its id mod E
    probs0, top0, _, ids0 = ref[0]
    assert (top0[:, 0] == ids0 % E).all()
    assert (run.arrays["moe.experts"][0][np.arange(len(ids0)), run.arrays["moe.probs"][0].argmax(1) * 0] >= 0).all()
    assert (run.arrays["moe.probs"][0].argmax(1) == ids0 % E).all()
    top_tokens = result.to_frame("top_tokens")
    assert set(top_tokens[top_tokens.layer == 0].expert) == set(range(E))


def test_scan_routing_equals_hf_and_counts_only_routed_tokens(moe_model, tmp_path):
    kind, lm = moe_model
    ref = _hf_reference(lm, TEXTS)
    s = lens.scan(lm, TEXTS, out=tmp_path / kind, top_k=4, batch_size=3, shard_size=3, progress=False)
    assert s.moe_layers == [0, 1]
    frame = s.routing_frame()
    for i, (probs, top, top_p, ids) in enumerate(ref):
        counts, load, entropy, cv = _stats(probs, top, top_p)
        mine = frame[frame.layer == i].sort_values("expert")
        assert list(mine["tokens"]) == list(counts)
        np.testing.assert_allclose(mine["load"], load, atol=1e-12)
        np.testing.assert_allclose(mine["routing_entropy"].iloc[0], entropy, rtol=1e-5)
        np.testing.assert_allclose(mine["load_cv"].iloc[0], cv, rtol=1e-6)
    # expert neurons count exactly the tokens routed to their expert
    experts = s.expert_neurons_frame()
    per_expert = experts.groupby(["layer", "expert"])["count"].agg(["min", "max"])
    for i, (_, top, _, _) in enumerate(ref):
        for e in range(E):
            n = int((top == e).any(1).sum())
            assert per_expert.loc[(i, e)].tolist() == [n, n]
    # top tokens by gate in layer 0: planted, so every top token of expert e has id ≡ e (mod E) when its gate is the larger one
    tops = s.top_tokens(0, 1)
    assert len(tops) and (tops["gate"].diff().dropna() <= 0).all()
    assert (tops["token_id"] % E == 1).all()
    if kind == "qwen2_moe":  # the shared expert is a dense MLP every token passes through
        assert s.n_neurons == 48 and s.tokens == sum(len(r[3]) for r in ref[:1])
    else:
        assert s.n_neurons == 0
