"""Mixture-of-experts routing, read where the model computes it (docs/definitions.md, "MoE routing").

The family row names each MoE block's router (transformers' ``…TopKRouter``, whose forward returns
``(router_logits, gates, selected_experts)``) and its fused experts (whose forward receives the hidden
states, the selected experts and the gates). ``MoEHooks`` hooks both and hands every observer, per MoE
layer and forward pass: the router probabilities r[t, e] = softmax over experts of the router logits (the
same softmax the family's router applies), the experts the model selected and their gates — exactly what the
model used, not a recomputation — and the hidden states the experts read.

``RouterProbe`` turns that into the per-token arrays of a ``Run`` (``moe.probs``, ``moe.experts``,
``moe.gates``); ``lens.scan`` reduces the same hooks into corpus statistics.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lens.capture.probes import Batch
from lens.errors import CaptureError

__all__ = ["MoEHooks", "RouterProbe", "expert_activations", "moe_layers"]


def moe_layers(lm) -> list[int]:
    """The layers of ``lm`` that have an MoE router (empty for dense models)."""
    return [i for i, r in enumerate(getattr(lm, "router_modules", [])) if r is not None]


class MoEHooks:
    """Forward hooks on every MoE block; ``callback(layer, probs, experts, gates, hidden)`` per forward.

    ``probs`` [B·T, E] float32, ``experts`` [B·T, k] int64, ``gates`` [B·T, k] float32, ``hidden`` [B·T, d]
    (rows in the model's flattening of [B, T], padding included — callers select real tokens).

    Example::

        with MoEHooks(lm, lambda layer, p, e, g, h: print(layer, p.shape)):
            lm.base(input_ids=ids)
    """

    def __init__(self, lm, callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]):
        self.lm = lm
        self.callback = callback
        self.handles: list = []
        self._logits: dict[int, torch.Tensor] = {}

    def __enter__(self) -> "MoEHooks":
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> None:
        for layer in moe_layers(self.lm):
            router = self.lm.router_modules[layer]
            experts = self.lm.expert_modules[layer]
            if experts is None:
                raise CaptureError(f"layer {layer} has a router but no experts at the family's path; fix the Family row")
            self.handles.append(router.register_forward_hook(self._router_hook(layer)))
            self.handles.append(experts.register_forward_pre_hook(self._experts_hook(layer), with_kwargs=True))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._logits.clear()

    def _router_hook(self, layer: int):
        def hook(module, args, output):
            if not (isinstance(output, (tuple, list)) and len(output) >= 3):
                raise CaptureError(
                    f"the router of layer {layer} ({type(module).__name__}) returned {type(output).__name__}; lens "
                    "expects (router_logits, gates, selected_experts) as transformers' TopKRouter returns"
                )
            self._logits[layer] = output[0]

        return hook

    def _experts_hook(self, layer: int):
        def hook(module, args, kwargs):
            values = list(args) + [kwargs[k] for k in ("top_k_index", "top_k_weights") if k in kwargs]
            hidden, experts, gates = values[0], values[1], values[2]
            logits = self._logits.pop(layer, None)
            if logits is None:
                raise CaptureError(f"the experts of layer {layer} ran before its router; lens cannot pair them")
            probs = torch.softmax(logits.float(), dim=-1)
            self.callback(layer, probs, experts.long(), gates.float(), hidden)

        return hook


@torch.no_grad()
def expert_activations(experts_module, hidden: torch.Tensor, expert: int) -> torch.Tensor:
    """The neuron activation of one expert, act(gate)·up, for the hidden states it receives: [n, d_expert].

    Reads the fused weights (``gate_up_proj`` [E, 2·d_expert, d]) the experts module itself uses.
    """
    weight = experts_module.gate_up_proj[expert]
    proj = torch.nn.functional.linear(hidden.to(weight.dtype), weight)
    bias = getattr(experts_module, "gate_up_proj_bias", None)
    if bias is not None:
        proj = proj + bias[expert]
    gate, up = proj.chunk(2, dim=-1)
    return experts_module.act_fn(gate) * up


class RouterProbe:
    """Per-token router probabilities, selected experts and gates for every MoE layer of a ``lens.trace``.

    Arrays (N = real tokens, Lm = MoE layers, E = experts, k = experts per token): ``moe.layers`` [Lm],
    ``moe.probs`` [Lm, N, E] f32, ``moe.experts`` [Lm, N, k] int64, ``moe.gates`` [Lm, N, k] f32.
    """

    def __init__(self, lm, n_tokens: int):
        self.lm = lm
        self.layers = moe_layers(lm)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        k, e = lm.experts_per_token, lm.n_experts
        self.probs = np.zeros((len(self.layers), n_tokens, e), dtype=np.float32)
        self.experts = np.full((len(self.layers), n_tokens, k), -1, dtype=np.int64)
        self.gates = np.zeros((len(self.layers), n_tokens, k), dtype=np.float32)
        self.batch: Batch | None = None
        self.hooks = MoEHooks(lm, self._observe)

    def begin(self, batch: Batch) -> None:
        self.batch = batch

    def attach(self) -> None:
        self.hooks.attach()

    def detach(self) -> None:
        self.hooks.detach()

    def _observe(self, layer, probs, experts, gates, hidden) -> None:
        real = self.batch.mask.reshape(-1)
        flat = self.batch.flat_index.cpu().numpy()
        i = self.row[layer]
        self.probs[i, flat] = probs[real].cpu().numpy()
        self.experts[i, flat] = experts[real].cpu().numpy()
        self.gates[i, flat] = gates[real].cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        if not self.layers:
            return {}
        return {"moe.layers": np.asarray(self.layers, dtype=np.int64), "moe.probs": self.probs,
                "moe.experts": self.experts, "moe.gates": self.gates}
