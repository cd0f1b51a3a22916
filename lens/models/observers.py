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
