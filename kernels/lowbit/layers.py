"""Finding a model's linear layers: which modules are linear, their shapes, and the default layer filter.

transformers' GPT-2 ``Conv1D`` is recognised through ``sys.modules`` - a model that contains one has
already imported it - so this module never imports transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


def default_include(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """The default layer filter of :func:`quantize_model` (which layers get docs/definitions.md low-bit weights):
    every linear layer except the LM head (the model's ``get_output_embeddings()``, or a module named
    ``lm_head``) and any layer whose weight is tied to an ``nn.Embedding`` (embeddings themselves are never
    linear layers, so they stay as they are).

    Example: ``default_include(gpt2)("lm_head", gpt2.lm_head)`` → ``False``.
    """
    skip: set[int] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if isinstance(out, nn.Module):
            skip.add(id(out))
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    def include(name: str, module: nn.Module) -> bool:
        if id(module) in skip or name.rsplit(".", 1)[-1] == "lm_head":
            return False
        return id(getattr(module, "weight", None)) not in emb

    return include


def select_linear_modules(model: nn.Module, include: Callable[[str, nn.Module], bool] | None = None
                          ) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the ``nn.Linear`` / GPT-2 ``Conv1D`` layers that pass ``include`` (default:
    :func:`default_include`) — the layers docs/definitions.md formats apply to. Already-quantized layers are
    never selected.

    Example: ``select_linear_modules(bert)[0][0]`` → ``'encoder.layer.0.attention.self.query'``.
    """
    include = include if include is not None else default_include(model)
    conv = _conv1d_type()
    kinds = (nn.Linear,) if conv is None else (nn.Linear, conv)
    return [(n, m) for n, m in model.named_modules()
            if n and isinstance(m, kinds) and include(n, m)]  # a QuantLinear is neither kind


def _progress(items, enabled: bool | None, desc: str):
    """A tqdm bar over ``items``: ``enabled=None`` is tqdm's own rule (a bar in a terminal or a notebook,
    none when the output is a file or a pipe), True always, False never — the rule of ``lens.progress``,
    restated here because kernels import nothing from lens."""
    if enabled is False:
        return items
    try:
        from tqdm.auto import (
            tqdm,  # a dependency of lens-interp, imported lazily to keep kernels light
        )
    except ImportError:
        return items
    return tqdm(items, desc=desc, leave=False, disable=None if enabled is None else False)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _conv1d_type():
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _in_out(module: nn.Module) -> tuple[int, int]:
    conv = _conv1d_type()
    if conv is not None and isinstance(module, conv):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores [in, out]
    return module.in_features, module.out_features


def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, str]:
    conv = _conv1d_type()
    if conv is not None and isinstance(module, conv):
        return module.weight.detach().t(), "Conv1D"
    return module.weight.detach(), "Linear"


