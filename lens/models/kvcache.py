"""KV caches for decoding: the full cache, and a StreamingLLM-style cache (sink tokens + a recent window).

StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks") keeps the
first few tokens — the attention sinks — and a window of the most recent tokens, and evicts everything in
between, so that memory stays bounded while generation stays fluent. lens offers it as a decoding option
(``lens.generate(lm, prompts, cache=lens.StreamingCache(sink_tokens=4, window=64))``) built on
transformers' own ``Cache`` API, so the model's ``generate`` runs it unchanged.

Positions: the cached keys keep the rotary positions they were computed at (transformers applies RoPE
before caching), and new tokens get their true positions. The original StreamingLLM re-assigns positions
inside the cache instead; with RoPE both keep the sinks' and the window's relative order, and this variant
needs no re-rotation of cached keys. Eviction happens after each forward: a query always attends to the
sinks, the window before it, and the tokens of its own forward (a prompt is processed in full first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from lens.errors import ConfigError

__all__ = ["StreamingCache", "full_cache"]


class _SinkWindowLayer(DynamicLayer):
    """One layer's cache: the first ``sink`` tokens and the last ``window`` tokens (a transformers cache layer)."""

    def __init__(self, sink: int, window: int):
        super().__init__()
        self.sink, self.window = sink, window
        self.cumulative_length = 0  # tokens seen so far = the position of the next token

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if keys.shape[-2] > self.sink + self.window:  # evict the middle, keep sinks + recent window
            self.keys = torch.cat([keys[..., : self.sink, :], keys[..., -self.window :, :]], dim=-2)
            self.values = torch.cat([values[..., : self.sink, :], values[..., -self.window :, :]], dim=-2)
        else:
            self.keys, self.values = keys, values
        return keys, values  # this forward attends to everything it had plus itself

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        cached = self.keys.shape[-2] if self.is_initialized else 0
        # offset = evicted tokens, so the causal mask of a new query (its true position) allows every slot
        return cached + query_length, self.cumulative_length - cached

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a streaming (sink + window) cache cannot be cropped; speculative decoding needs a full cache")


@dataclass(frozen=True)
class StreamingCache:
    """A StreamingLLM cache: keep ``sink_tokens`` first tokens and the last ``window`` tokens per layer.

    ``sink_tokens``: 4 in the StreamingLLM paper (Xiao et al., ICLR 2024, §3.2). ``window``: recent tokens
    kept. Pass it to ``lens.generate(..., cache=...)``; ``describe()`` goes to provenance.

    Example: ``lens.generate(lm, "Once upon a time", 40, cache=lens.StreamingCache(sink_tokens=4, window=16))``.
    """

    sink_tokens: int = 4
    window: int = 256

    def __post_init__(self):
        if int(self.sink_tokens) < 0 or int(self.window) < 1:
            raise ConfigError(f"StreamingCache needs sink_tokens ≥ 0 and window ≥ 1; got {self.sink_tokens}, {self.window}")

    def build(self, n_layers: int) -> Cache:
        """A fresh transformers ``Cache`` with one sink + window layer per model layer."""
        return Cache(layers=[_SinkWindowLayer(int(self.sink_tokens), int(self.window)) for _ in range(n_layers)])

    def slot_positions(self, n_slots: int, query_end: int) -> torch.Tensor:
        """Token positions of the ``n_slots`` keys an attention call sees whose last query is at ``query_end``."""
        if n_slots == query_end + 1 or n_slots <= self.sink_tokens:
            return torch.arange(n_slots)
        recent = n_slots - self.sink_tokens
        return torch.cat([torch.arange(self.sink_tokens), torch.arange(query_end - recent + 1, query_end + 1)])

    def describe(self) -> dict:
        return {"kind": "streaming", "sink_tokens": int(self.sink_tokens), "window": int(self.window),
                "source": "StreamingLLM (Xiao et al., ICLR 2024)"}


def full_cache(config) -> Cache:
    """transformers' ``DynamicCache`` for ``config``: every key and value kept (what ``generate`` uses by
    default; sliding-window layers of the model keep their window)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config)
