"""Every family row, on a tiny random model loaded from disk, against Hugging Face's eager reference.

For each family the run's per-key attention mass must equal the column sums of HF's own eager
``output_attentions`` (computed over real queries only, on a right-padded batch), the residual norms
must equal ``output_hidden_states``, and the MLP neuron statistics must equal activations rebuilt from
the MLP's own submodules (for gated MLPs: act(gate) · up).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from conftest import FAMILY_KINDS

import lens

TEXTS = [
    "Attention sinks appear on the first token.",
    "Sparse attention skips blocks whose scores are small, keeping the sink and a local window of recent tokens.",
    "The quick brown fox.",
]


def _eager(folder, kind):
    auto = transformers.AutoModel if kind in ("bert", "roberta") else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, attn_implementation="eager").eval()


def _padded(run):
    lengths = run.lengths
    ids = torch.zeros(run.n_sequences, int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for s in range(run.n_sequences):
        ids[s, : lengths[s]] = torch.from_numpy(run.arrays["token_ids"][run.span(s)])
        mask[s, : lengths[s]] = 1
    return ids, mask


def _reference_mlp(model, lm, ids, mask):
    """Neuron activations rebuilt from the MLP's own parts, not from the hook point lens uses."""
    captured: dict[int, torch.Tensor] = {}
    handles = []
    family = lm.family.name
    for layer, block in enumerate(lm.blocks):
        ref_block = model.get_submodule(_block_path(model, lm, layer))
        if family == "llama":
            mlp = ref_block.mlp
            parts = {}
            handles.append(mlp.gate_proj.register_forward_hook(lambda m, a, o, parts=parts: parts.__setitem__("gate", o)))
            handles.append(mlp.up_proj.register_forward_hook(lambda m, a, o, parts=parts: parts.__setitem__("up", o)))
            captured[layer] = parts
        elif family == "bert":
            handles.append(ref_block.intermediate.register_forward_hook(
                lambda m, a, o, layer=layer: captured.__setitem__(layer, o)))
        else:  # gpt2, gpt-neox: the activation module's output
            handles.append(ref_block.mlp.act.register_forward_hook(
                lambda m, a, o, layer=layer: captured.__setitem__(layer, o)))
    kwargs = {"use_cache": False} if lm.causal else {}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True, **kwargs)
    for h in handles:
        h.remove()
    acts = {}
    for layer, value in captured.items():
        if family == "llama":
            act_fn = model.get_submodule(_block_path(model, lm, layer)).mlp.act_fn
            value = act_fn(value["gate"]) * value["up"]
        acts[layer] = value[mask.bool()]
    return out, acts


def _block_path(model, lm, layer):
    for name, module in model.named_modules():
        if name.endswith(f"{lm.family.layers}.{layer}") and type(module).__name__ == type(lm.blocks[layer]).__name__:
            return name
    raise AssertionError("block not found")


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_family_matches_eager_reference(kind, tiny_model_dir):
    folder = tiny_model_dir(kind)
    lm = lens.load(folder)
    assert lm.family.model_types and lm.config.model_type in lm.family.model_types
    assert lm.model.config._attn_implementation == "lens"
    run = lens.trace(lm, TEXTS, batch_size=3, progress=False, keep_patterns=[(1, 0)])
    assert run.n_sequences == 3 and len(set(run.lengths)) == 3, "the batch must be padded"
    if lm.family.prepend_bos:
        bos = lm.tokenizer.bos_token_id
        assert all(run.arrays["token_ids"][run.span(s)][0] == bos for s in range(3))

    model = _eager(folder, kind)
    ids, mask = _padded(run)
    out, acts = _reference_mlp(model, lm, ids, mask)

    for layer, attn in enumerate(out.attentions):
        for s in range(run.n_sequences):
            n = int(run.lengths[s])
            probs = attn[s, :, :n, :n].double()
            np.testing.assert_allclose(
                run.arrays["attn.key_mass"][layer, :, run.span(s)], probs.sum(1).numpy(), atol=2e-5,
                err_msg=f"{kind} layer {layer} sequence {s}: column sums differ from eager",
            )
            allowed = (probs.sum(0) > 0) if kind != "gemma2" else None
            if allowed is not None:
                counts = (allowed | torch.tril(torch.ones(n, n, dtype=torch.bool)) if lm.causal else allowed).sum(0)
                np.testing.assert_allclose(run.arrays["attn.query_count"][layer, run.span(s)], counts.numpy())
        if layer == 1:
            s = 1
            n = int(run.lengths[s])
            np.testing.assert_allclose(run.pattern(1, 0, s), attn[s, 0, :n, :n].numpy(), atol=2e-5)

    # residual stream: HF's hidden_states[ℓ] is the input of block ℓ (its last entry is post-norm for
    # decoders, so compare that one only for the post-LN encoders)
    n_compare = lm.n_layers + 1 if lm.final_norm is None else lm.n_layers
    for layer in range(n_compare):
        hidden = out.hidden_states[layer][mask.bool()]
        np.testing.assert_allclose(run.arrays["resid.norm"][layer], hidden.norm(dim=-1).numpy(), rtol=2e-5, atol=1e-5)

    for layer in range(lm.n_layers):
        ref = acts[layer]
        np.testing.assert_allclose(run.arrays["mlp.sum"][layer], ref.sum(0).double().numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(run.arrays["mlp.max"][layer], ref.max(0).values.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(run.arrays["mlp.positive"][layer], (ref > 0).sum(0).numpy())
        top = ref.topk(5, dim=0).values.T.numpy()
        np.testing.assert_allclose(run.arrays["mlp.top_value"][layer], top, rtol=1e-5, atol=1e-5)


def test_model_runs_lens_attention_outside_trace(tiny_model_dir):
    """lens.load installs the kernel for every forward, not only inside lens.trace; outputs match sdpa."""
    folder = tiny_model_dir("qwen2")
    lm = lens.load(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    ids = torch.tensor([[1, 5, 9, 30, 44, 60, 7]])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_streaming_batch_invariance(tiny_model_dir):
    """Statistics do not depend on how inputs are batched (padding never counts)."""
    lm = lens.load(tiny_model_dir("llama"))
    one = lens.trace(lm, TEXTS, batch_size=1, progress=False)
    many = lens.trace(lm, TEXTS, batch_size=3, progress=False)
    for name in ("attn.key_mass", "attn.query_count", "resid.norm", "resid.spectrum_raw", "mlp.sum"):
        np.testing.assert_allclose(one.arrays[name], many.arrays[name], rtol=1e-4, atol=1e-5, err_msg=name)
