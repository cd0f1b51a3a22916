"""``lens.trace``: run a LensModel over inputs with probes attached and return a ``Run``."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
from typing import Any, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from lens._observers import observing
from lens.errors import ConfigError
from lens.inputs import encode, pad_batch
from lens.probes import AttentionProbe, Batch, MLPProbe, ResidualProbe
from lens.run import Run

__all__ = ["trace", "CAPTURES"]

CAPTURES = ("attention", "residual", "mlp")
OPTIONAL_CAPTURES = ("logits",)  # next-token log-probabilities [N, vocab]: heavy, for lens.compare on LMs

# Full patterns are opt-in because they are n² per head; refuse requests that would not fit comfortably.
_MAX_PATTERN_BYTES = 4 * 1024**3


def _parse_keep_patterns(spec, n_layers: int, n_heads: int) -> dict[int, tuple[int, ...]]:
    """None | "all" | layer | [layer, ...] | [(layer, head), ...] | {layer: [heads]} → {layer: heads}."""
    if spec is None or spec is False:
        return {}
    if spec == "all" or spec is True:
        return {layer: tuple(range(n_heads)) for layer in range(n_layers)}
    if isinstance(spec, int):
        spec = [spec]
    keep: dict[int, set[int]] = {}
    items: Iterable[Any] = spec.items() if isinstance(spec, dict) else spec
    for item in items:
        if isinstance(spec, dict):
            layer, heads = item
            heads = range(n_heads) if heads in (None, "all") else heads
        elif isinstance(item, int):
            layer, heads = item, range(n_heads)
        else:
            layer, head = item
            heads = [head]
        if not 0 <= int(layer) < n_layers:
            raise ConfigError(f"keep_patterns names layer {layer}; valid layers are 0..{n_layers - 1}")
        for head in heads:
            if not 0 <= int(head) < n_heads:
                raise ConfigError(f"keep_patterns names head {head}; valid heads are 0..{n_heads - 1}")
            keep.setdefault(int(layer), set()).add(int(head))
    return {layer: tuple(sorted(heads)) for layer, heads in sorted(keep.items())}


def _parse_layers(spec, n_layers: int, what: str) -> tuple[int, ...]:
    if spec is None or spec is False:
        return ()
    if spec == "all" or spec is True:
        return tuple(range(n_layers + 1))
    layers = (spec,) if isinstance(spec, int) else tuple(spec)
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise ConfigError(f"{what} names layer {layer}; valid residual layers are 0..{n_layers}")
    return tuple(sorted(set(int(x) for x in layers)))


def lm_has_head(lm) -> bool:
    """Whether the model ends in a vocabulary projection (a causal LM head)."""
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    return head is not None and lm.causal


def _input_hash(ids: list[list[int]]) -> str:
    digest = hashlib.sha256()
    for seq in ids:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


@torch.inference_mode()
def trace(
    model,
    inputs,
    *,
    capture: Iterable[str] = CAPTURES,
    batch_size: int = 8,
    keep_patterns=None,
    keep_hidden=None,
    track_neurons: Iterable[tuple[int, int]] = (),
    top_k_massive: int = 10,
    top_k_neurons: int = 5,
    truncate: bool = False,
    prepend_bos: bool | None = None,
    progress: bool = True,
) -> Run:
    """Run ``model`` (a ``LensModel``) over ``inputs`` with streaming probes and return a ``Run``.

    ``inputs``: a string, a list of strings, or token ids (see ``lens.inputs.encode``). Batches are
    right-padded; padded positions never count in any statistic. A progress bar runs over batches.
    ``capture``: any of ``"attention"`` (mass received per key, inside the attention kernel the model
    runs), ``"residual"`` (norms, massive activations, entropy spectra) and ``"mlp"`` (neuron statistics);
    add ``"logits"`` to keep next-token log-probabilities (fp32, N × vocabulary — heavy) for ``lens.compare``.
    ``keep_patterns``: full [T, T] patterns for chosen heads — ``"all"``, a layer, a list of layers, a
    list of ``(layer, head)``, or ``{layer: [heads]}``. ``keep_hidden``: residual layers (0..L) whose
    hidden states to keep. ``track_neurons``: ``(layer, neuron)`` pairs whose per-token activation to keep.
    ``truncate``: cut inputs longer than the model's positions instead of raising ``InputTooLongError``.

    Example::

        lm = lens.load()
        run = lens.trace(lm, ["The quick brown fox.", "Attention sinks form early."], keep_patterns=[(2, 0)])
        lens.sinks(run).to_frame().head()
    """
    capture = tuple(capture)
    unknown = set(capture) - set(CAPTURES) - set(OPTIONAL_CAPTURES)
    if unknown or not capture:
        raise ConfigError(f"capture must be a non-empty subset of {CAPTURES + OPTIONAL_CAPTURES}; got {capture}")
    if "logits" in capture and (not lm_has_head(model)):
        raise ConfigError(
            f"capture='logits' needs a language-model head; {model.model_id} ({type(model.model).__name__}) has none"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1; got {batch_size}")
    if top_k_massive < 1 or top_k_neurons < 1:
        raise ConfigError("top_k_massive and top_k_neurons must be ≥ 1")
    lm = model
    encoded = encode(lm, inputs, truncate=truncate, prepend_bos=prepend_bos)
    lengths = np.array([len(ids) for ids in encoded.ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens, n_seq = int(offsets[-1]), len(lengths)

    keep = _parse_keep_patterns(keep_patterns, lm.n_layers, lm.n_heads) if "attention" in capture else {}
    if keep_patterns and "attention" not in capture:
        raise ConfigError("keep_patterns needs capture to include 'attention'")
    pattern_sizes = lengths**2
    n_kept_heads = sum(len(h) for h in keep.values())
    pattern_bytes = 4 * int(pattern_sizes.sum()) * n_kept_heads
    if pattern_bytes > _MAX_PATTERN_BYTES:
        raise ConfigError(
            f"keeping {n_kept_heads} full patterns for these inputs needs {pattern_bytes / 1e9:.1f} GB; keep fewer "
            "heads (keep_patterns=[(layer, head), ...]) — the streaming statistics need no patterns at all"
        )
    hidden_layers = _parse_layers(keep_hidden, lm.n_layers, "keep_hidden")
    tracked = [(int(layer), int(neuron)) for layer, neuron in track_neurons]
    for layer, neuron in tracked:
        if not (0 <= layer < lm.n_layers and 0 <= neuron < lm.d_mlp):
            raise ConfigError(
                f"track_neurons names ({layer}, {neuron}); layers are 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1}"
            )

    attention = (
        AttentionProbe(lm, n_tokens, n_seq, keep, pattern_sizes) if "attention" in capture else None
    )
    residual = (
        ResidualProbe(lm, n_tokens, n_seq, int(lengths.max()), top_k_massive, hidden_layers)
        if "residual" in capture
        else None
    )
    mlp = MLPProbe(lm, n_tokens, top_k_neurons, tracked) if "mlp" in capture or tracked else None
    hooked = [p for p in (residual, mlp) if p is not None]
    logprobs = None
    if "logits" in capture:
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        logprobs = np.zeros((n_tokens, vocab), dtype=np.float32)

    pad_id = lm.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id if lm.tokenizer.eos_token_id is not None else 0
    # longest first, so that batches hold similar lengths and padding (wasted compute) stays small
    order = sorted(range(n_seq), key=lambda i: -lengths[i])
    batches = [order[i : i + batch_size] for i in range(0, n_seq, batch_size)]
    device = lm.device
    was_training = lm.model.training
    lm.model.eval()
    for probe in hooked:
        probe.attach()
    try:
        with observing(attention) if attention is not None else contextlib.nullcontext():
            for rows in tqdm(batches, desc=f"lens.trace {lm.model_id.split('/')[-1]}", unit="batch", disable=not progress):
                input_ids, mask = pad_batch([encoded.ids[i] for i in rows], pad_id)
                bool_mask = mask.bool()
                starts = [int(offsets[i]) for i in rows]
                flat_index = torch.cat(
                    [torch.arange(s, s + int(lengths[i])) for s, i in zip(starts, rows)]
                )
                batch = Batch(
                    sequences=list(rows),
                    lengths=[int(lengths[i]) for i in rows],
                    starts=starts,
                    flat_index=flat_index.to(device),
                    mask=bool_mask.to(device),
                )
                for probe in (attention, *hooked):
                    if probe is not None:
                        probe.begin(batch)
                kwargs = {"use_cache": False} if lm.causal else {}
                if logprobs is None:
                    # The backbone only: no statistic needs the LM head, whose vocabulary-sized matmul would
                    # otherwise cost as much as several layers (a quarter of GPT-2's forward at T = 2048).
                    lm.base(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
                else:
                    out = lm.model(input_ids=input_ids.to(device), attention_mask=mask.to(device), **kwargs)
                    logprobs[batch.flat_index.cpu().numpy()] = (
                        torch.log_softmax(out.logits.float(), dim=-1)[bool_mask.to(device)].cpu().numpy()
                    )
                if attention is not None:
                    attention.end()
    finally:
        for probe in hooked:
            probe.detach()
        lm.model.train(was_training)

    arrays: dict[str, np.ndarray] = {
        "token_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded.ids]),
        "offsets": offsets,
        "special": np.concatenate([np.asarray(s, dtype=bool) for s in encoded.special]),
    }
    for probe_arrays in (
        attention.arrays() if attention else {},
        residual.arrays() if residual else {},
        mlp.arrays(n_tokens) if mlp else {},
        {"logits.logprobs": logprobs} if logprobs is not None else {},
    ):
        arrays.update(probe_arrays)

    tokens = [
        [lm.tokenizer.decode([t]) for t in ids] if ids else [] for ids in encoded.ids
    ]
    provenance = lm.provenance()
    provenance.update(
        {
            "input_sha256": _input_hash(encoded.ids),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "trace": {
                "capture": list(capture),
                "batch_size": batch_size,
                "padding": "right",
                "prepend_bos": lm.family.prepend_bos if prepend_bos is None else prepend_bos,
                "truncate": truncate,
                "top_k_massive": top_k_massive,
                "top_k_neurons": top_k_neurons,
                "keep_patterns": [[layer, list(heads)] for layer, heads in keep.items()],
                "keep_hidden": list(hidden_layers),
            },
        }
    )
    meta = {
        "n_layers": lm.n_layers,
        "n_heads": lm.n_heads,
        "n_kv_heads": lm.n_kv_heads,
        "d_model": lm.d_model,
        "d_mlp": lm.d_mlp,
        "causal": lm.causal,
        "provenance": provenance,
        "texts": encoded.texts,
        "truncated": encoded.truncated,
        "tracked_neurons": [list(p) for p in tracked],
    }
    return Run(arrays=arrays, tokens=tokens, meta=meta)
