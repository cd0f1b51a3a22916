"""The hand-off point between the attention function and whoever wants to watch it.

``lens.models.attention`` (the function the model calls) reads the observers that are active in the current
context; ``lens.trace`` pushes its probes here for the duration of a forward pass. Neither module
imports the other: this keeps the arrows one way and lets the model run its deployed kernels at full
speed whenever nothing is observing.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Protocol

import torch


class AttentionObserver(Protocol):
    """What the attention function calls. ``pattern_heads`` is asked before the kernel runs; an observer may
    also define ``query_weights(module) -> Tensor [B, G, Tq] | None`` (query groups whose per-key mass it wants,
    e.g. a VLM's text queries), which kernels with ``supports_query_weights`` receive."""

    def pattern_heads(self, module: torch.nn.Module) -> tuple[int, ...]: ...

    def on_attention(self, module: torch.nn.Module, stats) -> None: ...


_ACTIVE: ContextVar[tuple[AttentionObserver, ...]] = ContextVar("lens_attention_observers", default=())


def active_observers() -> tuple[AttentionObserver, ...]:
    """The observers of the current context (empty outside ``lens.trace``)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def observing(observer: AttentionObserver) -> Iterator[None]:
    """Make ``observer`` see every lens attention call in this context.

    Example::

        with observing(my_probe):
            model(**batch)
    """
    token = _ACTIVE.set(_ACTIVE.get() + (observer,))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class AttentionEdit(Protocol):
    """What the attention function asks of an active intervention (see ``lens.capture.interventions``).

    ``edit_inputs`` runs before the kernel and returns (attention_mask, key, value), possibly new — e.g. an
    additive bias that scales the probability of chosen keys; ``edit_output`` runs on the per-head output
    [B, Tq, H, Dv] before the output projection (head ablation). Both return their inputs unchanged for
    modules they do not target.
    """

    def edit_inputs(self, module: torch.nn.Module, query, key, value, attention_mask, is_causal: bool): ...

    def edit_output(self, module: torch.nn.Module, out: torch.Tensor) -> torch.Tensor: ...


_EDITS: ContextVar[tuple[AttentionEdit, ...]] = ContextVar("lens_attention_edits", default=())


def active_edits() -> tuple[AttentionEdit, ...]:
    """The attention edits of the current context (empty outside an intervened ``lens.trace``)."""
    return _EDITS.get()


@contextlib.contextmanager
def editing(edit: AttentionEdit) -> Iterator[None]:
    """Make the attention function apply ``edit`` in this context.

    Example::

        with editing(my_edit):
            model(**batch)
    """
    token = _EDITS.set(_EDITS.get() + (edit,))
    try:
        yield
    finally:
        _EDITS.reset(token)
