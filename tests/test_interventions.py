"""Interventions: each one against an independent computation, the Queipo-de-Llano ablation on SmolLM2,
and every bad specification ending in a ConfigError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM

import lens
import lens.models.inputs
from lens.errors import ConfigError

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks form early in the network, and stay."]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dir):
    return tiny_model_dir("qwen2")  # a Llama-style decoder with GQA (4 heads share 2 KV heads) and RoPE


@pytest.fixture(scope="module")
def lm(tiny_llama):
    return lens.load(tiny_llama)


def _hf(folder, impl="eager"):
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=impl)
    return model.eval()


def _hf_hidden(model, lm, texts, hooks=()):
    """X_0..X_L of the plain HF model with optional manual edit hooks: the input of every block (recorded by
    pre-hooks registered after the edits, so they see the edited stream) and the last block's output."""
    enc = lens.models.inputs.encode(lm, texts)
    layers = model.model.layers
    rows = {layer: [] for layer in range(lm.n_layers + 1)}
    handles = [module.register_forward_pre_hook(fn, with_kwargs=kw) if pre else module.register_forward_hook(fn)
               for module, fn, pre, kw in hooks]

    def record(layer):
        def hook(module, args, kwargs):
            rows[layer].append((args[0] if args else kwargs["hidden_states"])[0].detach().clone())
        return hook

    handles += [block.register_forward_pre_hook(record(i), with_kwargs=True) for i, block in enumerate(layers)]
    handles.append(layers[-1].register_forward_hook(
        lambda m, a, out: rows[lm.n_layers].append((out[0] if isinstance(out, tuple) else out)[0].detach().clone())))
    try:
        with torch.no_grad():
            for ids in enc.ids:
                model(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: torch.cat(v).numpy() for layer, v in rows.items()}


def _lens_hidden(lm, texts, interventions):
    run = lens.trace(lm, texts, keep_hidden="all", interventions=interventions, progress=False)
    return run, {layer: run.arrays[f"resid.hidden.{layer}"] for layer in range(lm.n_layers + 1)}


def _assert_same(a, b, atol=1e-5):
    for layer in a:
        np.testing.assert_allclose(a[layer], b[layer], atol=atol, rtol=1e-5, err_msg=f"layer {layer}")


def _position_hook(positions, edit):
    """A forward hook editing the output rows at ``positions`` of a [1, T, W] tensor."""
    def hook(module, args, output):
        out = output.clone()
        T = out.shape[1]
        for p in positions:
            out[0, p % T] = edit(output[0], p % T)  # from the unedited output (the mean is over the original)
        return out
    return hook


def test_mlp_zero_and_mean_ablation_equal_a_manual_hook(lm, tiny_llama):
    model = _hf(tiny_llama)
    for kind, edit in (("zero", lambda x, p: torch.zeros_like(x[p])), ("mean", lambda x, p: x.mean(0))):
        ref = _hf_hidden(model, lm, TEXTS, [(model.model.layers[0].mlp.down_proj, _position_hook([0, -1], edit), False, False)])
        run, got = _lens_hidden(lm, TEXTS, [lens.Ablate("mlp", layer=0, positions=[0, -1], kind=kind)])
        _assert_same(got, ref)
        assert run.provenance["trace"]["interventions"][0]["type"] == "ablate"
    clean = _lens_hidden(lm, TEXTS, [])[1]
    assert np.abs(clean[1] - got[1]).max() > 1e-3  # the edit changed the next layer's input


def test_head_ablation_equals_zeroing_the_heads_slice_before_o_proj(lm, tiny_llama):
    model = _hf(tiny_llama)
    d_head = lm.d_model // lm.n_heads

    def pre(module, args):
        x = args[0].clone()
        x[0, :, 3 * d_head : 4 * d_head] = 0.0
        return (x,)

    ref = _hf_hidden(model, lm, TEXTS, [(model.model.layers[0].self_attn.o_proj, pre, True, False)])
    _, got = _lens_hidden(lm, TEXTS, [lens.Ablate("head", layer=0, head=3)])
    _assert_same(got, ref)


def test_resid_ablation_clamp_and_patch_equal_manual_pre_hooks(lm, tiny_llama):
    model = _hf(tiny_llama)

    def edit_block(fn):
        def hook(module, args, kwargs):
            hidden = (args[0] if args else kwargs["hidden_states"]).clone()
            fn(hidden)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return hook

    def clamp(h):
        h[0, :, [1, 5]] = torch.tensor([3.0, -2.0])

    ref = _hf_hidden(model, lm, TEXTS, [(model.model.layers[1], edit_block(clamp), True, True)])
    _, got = _lens_hidden(lm, TEXTS, [lens.Clamp(layer=1, dims=[1, 5], value=[3.0, -2.0])])
    _assert_same(got, ref)

    def ablate(h):
        h[0, -1] = 0.0

    ref = _hf_hidden(model, lm, TEXTS, [(model.model.layers[1], edit_block(ablate), True, True)])
    _, got = _lens_hidden(lm, TEXTS, [lens.Ablate("resid", layer=1, positions=[-1])])
    _assert_same(got, ref)

    # patching: the last position of each text takes the source run's X_1 at its last position
    source_texts = ["A completely different sentence about cats.", "Nothing here is the same as before at all."]
    source = lens.trace(lm, source_texts, keep_hidden=[1], progress=False)
    src_hidden = _hf_hidden(model, lm, source_texts)[1]
    src_last = [src_hidden[int(source.offsets[s + 1]) - 1] for s in range(2)]
    calls = iter(range(2))

    def patch(h):
        h[0, -1] = torch.as_tensor(src_last[next(calls)])

    ref = _hf_hidden(model, lm, TEXTS, [(model.model.layers[1], edit_block(patch), True, True)])
    _, got = _lens_hidden(lm, TEXTS, [lens.Patch(source, layer=1, positions=[-1], source_positions=[-1])])
    _assert_same(got, ref, atol=1e-4)


def _register_reference_attention(layer: int, heads, keys, factor: float, renormalize: bool) -> str:
    """An eager attention function written independently of lens: explicit probabilities, edited, renormalized."""
    name = f"ref_scale_{layer}_{factor}_{renormalize}"

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = (query @ k.transpose(-1, -2)) * scaling
        T = query.shape[2]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(scores, -1)
        if module.layer_idx == layer:
            hs = list(range(query.shape[1])) if heads is None else heads
            for h in hs:
                probs[:, h, :, keys] *= factor
            if renormalize:
                total = probs.sum(-1, keepdim=True)
                probs = torch.where(total > 0, probs / total.clamp_min(1e-30), torch.zeros_like(probs))
        return (probs @ v).transpose(1, 2).contiguous(), None

    AttentionInterface.register(name, attention)
    return name


@pytest.mark.parametrize("heads,keys,factor,renormalize", [
    ([1], [0], 0.5, True),
    (None, [0], 0.0, True),   # remove the first token everywhere: query 0 is left with no key → zeros
    ([0, 3], [0, 2], 2.0, False),
])
def test_scale_attention_equals_an_independent_eager_attention(lm, tiny_llama, heads, keys, factor, renormalize):
    name = _register_reference_attention(1, heads, keys, factor, renormalize)
    ref = _hf_hidden(_hf(tiny_llama, impl=name), lm, TEXTS)
    _, got = _lens_hidden(lm, TEXTS, [lens.ScaleAttention(layer=1, heads=heads, keys=keys, factor=factor,
                                                          renormalize=renormalize)])
    _assert_same(got, ref, atol=2e-5)


def test_scale_attention_is_the_same_on_the_sparse_kernel(tiny_llama):
    dense = lens.load(tiny_llama)
    sparse = lens.load(tiny_llama, attention=lens.Sparse(mode="topk", topk=1.0, block_q=16, block_k=16))
    spec = [lens.ScaleAttention(layer=1, heads=[2], keys=[0], factor=0.25)]
    a = lens.trace(dense, TEXTS, keep_hidden="all", interventions=spec, progress=False)
    b = lens.trace(sparse, TEXTS, keep_hidden="all", interventions=spec, progress=False)
    for layer in range(dense.n_layers + 1):
        np.testing.assert_allclose(a.arrays[f"resid.hidden.{layer}"], b.arrays[f"resid.hidden.{layer}"], atol=1e-4)
    # the statistics are those of the probabilities the kernel used: mass on key 0 of head 2 shrank
    clean = lens.trace(dense, TEXTS, progress=False)
    assert a.mass_received(1, 2)[0] < clean.mass_received(1, 2)[0]


def test_compare_shows_the_effect_and_provenance_records_it(lm):
    clean = lens.trace(lm, TEXTS, progress=False)
    spec = lens.Ablate("mlp", layer=0, positions=[0])
    ablated = lens.trace(lm, TEXTS, interventions=[spec], progress=False)
    assert ablated.provenance["trace"]["interventions"] == [spec.describe()]
    assert clean.provenance["trace"]["interventions"] == []
    result = lens.compare(clean, ablated)
    assert np.nanmax(np.abs(result.entropy_delta)) > 0
    assert result.labels[1] == "dense + ablate mlp L0@[0]"
    from lens.widgets import CompareView

    view = CompareView(result)  # the view of clean vs intervened names the intervention
    assert "ablate mlp L0@[0]" in str(view.info)
    saved = ablated.save(__import__("tempfile").mkdtemp() + "/a.lens")
    assert lens.Run.load(saved).provenance["trace"]["interventions"][0]["site"] == "mlp"


@pytest.mark.parametrize("spec, message", [
    (lambda lm: lens.Ablate("mlp", layer=99), "valid layers are 0..1"),
    (lambda lm: lens.Ablate("resid", layer=3), "valid layers are 0..2"),
    (lambda lm: lens.Ablate("head", layer=0, head=7), "heads are 0..3"),
    (lambda lm: lens.Ablate("head", layer=0), "needs head="),
    (lambda lm: lens.Ablate("mlp", layer=0, positions=[500]), "position 500"),
    (lambda lm: lens.Ablate("mlp", layer=0, kind="median"), "'zero' or 'mean'"),
    (lambda lm: lens.Ablate("attention", layer=0), "site must be one of"),
    (lambda lm: lens.Ablate("mlp", layer=0, value=[1.0, 2.0]), "vector of 64"),
    (lambda lm: lens.Clamp(layer=0, dims=[64], value=1.0), "dimension 64"),
    (lambda lm: lens.Clamp(layer=0, dims=[1, 2], value=[1.0, 2.0, 3.0]), "one per dim"),
    (lambda lm: lens.ScaleAttention(layer=0, keys=[0], factor=-1.0), "factor must be"),
    (lambda lm: lens.ScaleAttention(layer=0, heads=[9], keys=[0]), "head 9"),
    (lambda lm: lens.ScaleAttention(layer=0, keys=None), "needs keys"),
    (lambda lm: "not an intervention", "lens.Ablate, lens.Clamp"),
])
def test_bad_interventions_raise_config_errors_naming_the_fix(lm, spec, message):
    with pytest.raises(ConfigError, match=message):
        lens.trace(lm, TEXTS, interventions=[spec(lm)], progress=False)


def test_bad_patches_raise_config_errors(lm, tiny_model_dir):
    no_hidden = lens.trace(lm, TEXTS, progress=False)
    with pytest.raises(ConfigError, match=r"keep_hidden=\[1\]"):
        lens.trace(lm, TEXTS, interventions=[lens.Patch(no_hidden, layer=1)], progress=False)
    other_inputs = lens.trace(lm, ["Other words entirely.", "And more of them here."], keep_hidden=[1], progress=False)
    with pytest.raises(ConfigError, match="source_positions"):
        lens.trace(lm, TEXTS, interventions=[lens.Patch(other_inputs, layer=1)], progress=False)
    other_model = lens.load(tiny_model_dir("gpt2"))
    foreign = lens.trace(other_model, TEXTS, keep_hidden=[1], progress=False)
    with pytest.raises(ConfigError, match="same model"):
        lens.trace(lm, TEXTS, interventions=[lens.Patch(foreign, layer=1)], progress=False)
    with pytest.raises(ConfigError, match="same number of inputs"):
        lens.trace(lm, TEXTS[:1], interventions=[lens.Patch(other_inputs, layer=1, positions=[0], source_positions=[0])],
                   progress=False)


# -- the paper's result on a real decoder ---------------------------------------------------------------------

SENTENCES = [
    "The committee approved the new budget after a long debate.",
    "She walked to the station early because the trains were crowded.",
    "Rivers carry sediment from the mountains down to the sea.",
    "Our team released a small update that fixes the login problem.",
    "In autumn the leaves turn red and fall from the old oak trees.",
]


@pytest.mark.slow
@pytest.mark.parametrize("texts", [SENTENCES[:3], SENTENCES[3:]], ids=["three-sentences", "two-other-sentences"])
def test_removing_the_first_tokens_mlp_output_removes_sinks_massive_activations_and_the_valley(smollm2, texts):
    """Queipo-de-Llano et al. (2025): zero block 11's MLP output at position 0 on SmolLM2-135M — the step where
    the first token's norm jumps from ≈ 1× to ≈ 165× the median — and the massive activation, the sinks and the
    compression valley of the later layers go away together."""
    clean = lens.trace(smollm2, texts, progress=False)
    ablated = lens.trace(smollm2, texts, interventions=[lens.Ablate("mlp", layer=11, positions=[0])], progress=False)
    s_clean, s_abl = lens.sinks(clean), lens.sinks(ablated)
    ratio_clean = s_clean.first_norm_ratio[12:30].mean(axis=1)
    ratio_abl = s_abl.first_norm_ratio[12:30].mean(axis=1)
    assert ratio_clean.max() > 100 and ratio_clean.min() > 8     # measured: 10–164
    assert ratio_abl.max() < 3                                   # measured: 1.1–1.9
    rate_clean, rate_abl = s_clean.sink_rate[14:30], s_abl.sink_rate[14:30]
    # sink heads need score ≥ 0.3 and ≥ 2·u[0] (docs/definitions.md#sink-rate)
    assert rate_clean.mean() >= 0.8 and rate_clean.min() >= 0.6  # measured: mean 0.86–0.87, 0.67–1.0
    assert rate_abl.mean() <= 0.35 and rate_abl.max() <= 0.7     # measured: mean 0.15–0.25, max 0.56–0.67
    entropy_clean = lens.valley(clean).mean("entropy_raw_normalized")[12:30]
    entropy_abl = lens.valley(ablated).mean("entropy_raw_normalized")[12:30]
    assert entropy_clean.max() < 0.2                             # measured: 0.00–0.16
    assert entropy_abl.min() > 0.3                               # measured: 0.41–0.64
