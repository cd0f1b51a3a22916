"""Accepting a TransformerLens 4 ``TransformerBridge``: the Hugging Face model behind it, sharing its tensors."""

from __future__ import annotations

import torch
from torch import nn

from lens.errors import ModelLoadError


def _unwrap_bridge(bridge) -> nn.Module:
    """A plain Hugging Face model that shares every weight with a TransformerLens ``TransformerBridge``.

    The bridge replaces the model's submodules with its own components, which compute attention
    themselves (that is how ``hook_pattern`` sees every probability), so the lens attention function
    would never be called through them. We rebuild the original architecture on the meta device and
    *assign* the bridge's own tensors into it: no weight is copied, the bridge keeps working unchanged
    (its config is not touched either), and lens runs the model the way it is deployed.
    """
    import copy

    wrapped = bridge.original_model
    config = copy.deepcopy(wrapped.config)

    def clean(name: str) -> str:
        return name.replace("._original_component", "").replace("_original_component.", "")

    tensors = {clean(k): v for k, v in wrapped.named_parameters(remove_duplicate=False)}
    tensors.update({clean(k): v for k, v in wrapped.named_buffers(remove_duplicate=False)})
    with torch.device("meta"):
        fresh = type(wrapped)(config)
    missing = []
    for kind in ("parameters", "buffers"):
        for name, _ in list(getattr(fresh, f"named_{kind}")(remove_duplicate=False)):
            if name not in tensors:
                missing.append(name)
                continue
            owner, _, leaf = name.rpartition(".")
            module = fresh.get_submodule(owner) if owner else fresh
            value = tensors[name]
            if kind == "parameters":
                module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
            else:
                module._buffers[leaf] = value
    if missing:
        raise ModelLoadError(
            f"could not map the TransformerBridge's weights back onto {type(wrapped).__name__} (missing: "
            f"{', '.join(missing[:5])}…). Load the Hugging Face model directly and pass it to lens.load(model, tokenizer=...)"
        )
    return fresh.eval()


def _is_bridge(obj) -> bool:
    return type(obj).__name__ == "TransformerBridge" or hasattr(obj, "original_model") and hasattr(obj, "adapter")


