"""``lens.trace``: run a LensModel over inputs with probes attached and return a ``Run``."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from lens.capture.moe import RouterProbe, moe_layers
from lens.capture.probes import AttentionProbe, Batch, MLPProbe, ResidualProbe
from lens.errors import ConfigError
from lens.models.inputs import encode, pad_batch
from lens.models.observers import observing
from lens.progress import progress_bar
from lens.run import Run

__all__ = ["trace", "CAPTURES", "TraceOptions"]

CAPTURES = ("attention", "residual", "mlp")
OPTIONAL_CAPTURES = ("logits", "router")  # logits: next-token log-probabilities [N, vocab] (heavy, for lens.compare)
# "router": MoE routing per token; on by default with "mlp" for mixture-of-experts models

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


@dataclass
class TraceOptions:
    """Validated options of one ``lens.trace`` call (see :func:`trace` for their meaning)."""

    capture: tuple[str, ...]
    batch_size: int
    keep: dict[int, tuple[int, ...]]
    hidden_layers: tuple[int, ...]
    tracked: list[tuple[int, int]]
    top_k_massive: int
    top_k_neurons: int
    truncate: bool
    prepend_bos: bool | None
    progress: bool | None


@dataclass
class Probes:
    """The probes of one trace; ``hooked`` are the forward-hook probes (residual, MLP)."""

    attention: AttentionProbe | None
    residual: ResidualProbe | None
    mlp: MLPProbe | None
    logprobs: np.ndarray | None
    router: RouterProbe | None = None

    @property
    def hooked(self) -> list:
        return [p for p in (self.residual, self.mlp, self.router) if p is not None]


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
    progress: bool | None = None,
) -> Run:
    """Run ``model`` (a ``LensModel``) over ``inputs`` with streaming probes and return a ``Run``.

    ``inputs``: a string, a list of strings, or token ids (see ``lens.models.inputs.encode``). Batches are
    right-padded; padded positions never count in any statistic. ``progress``: a bar over batches — None
    (default) shows it in a terminal or notebook and not when output goes to a file (``lens.progress``).
    ``capture``: any of ``"attention"`` (mass received per key, inside the attention kernel the model
    runs), ``"residual"`` (norms, massive activations, entropy spectra) and ``"mlp"`` (neuron statistics);
    add ``"logits"`` to keep next-token log-probabilities (fp32, N × vocabulary — heavy) for ``lens.compare``.
    ``keep_patterns``: full [T, T] patterns for chosen heads — ``"all"``, a layer, a list of layers, a
    list of ``(layer, head)``, or ``{layer: [heads]}``. ``keep_hidden``: residual layers (0..L) whose
    hidden states to keep. ``track_neurons``: ``(layer, neuron)`` pairs whose per-token activation to keep.
    ``truncate``: cut inputs longer than the model's positions instead of raising ``InputTooLongError``.

    Raises ``ConfigError`` for options that do not fit the model, ``InputError`` (and its subclasses)
    for inputs that cannot be used, ``NumericalError`` when activations become non-finite, and
    ``CaptureError`` when the model's attention bypasses lens.

    Example::

        lm = lens.load()
        run = lens.trace(lm, ["The quick brown fox.", "Attention sinks form early."], keep_patterns=[(2, 0)])
        lens.sinks(run).to_frame().head()
    """
    options = _parse_options(
        model, capture=capture, batch_size=batch_size, keep_patterns=keep_patterns, keep_hidden=keep_hidden,
        track_neurons=track_neurons, top_k_massive=top_k_massive, top_k_neurons=top_k_neurons,
        truncate=truncate, prepend_bos=prepend_bos, progress=progress,
    )
    encoded = encode(model, inputs, truncate=options.truncate, prepend_bos=options.prepend_bos)
    lengths = np.array([len(ids) for ids in encoded.ids], dtype=np.int64)
    _check_pattern_budget(options, lengths)
    probes = _build_probes(model, options, lengths)
    reset = getattr(model.attention_kernel, "reset_tally", None)
    if reset is not None:
        reset()
    _run_batches(model, encoded, lengths, probes, options)
    run = _assemble_run(model, encoded, lengths, probes, options)
    if reset is not None:  # a sparse kernel: warn when it kept every block (sparsity asked for, dense computed)
        from lens.models.deploy import check_every_block_kept

        run.meta["sparse_every_block_kept"] = check_every_block_kept(model)
    return run


def _parse_options(lm, *, capture, batch_size, keep_patterns, keep_hidden, track_neurons, top_k_massive,
                   top_k_neurons, truncate, prepend_bos, progress) -> TraceOptions:
    """Check every option against the model before any work is done; ``ConfigError`` names the fix."""
    capture = tuple(capture)
    unknown = set(capture) - set(CAPTURES) - set(OPTIONAL_CAPTURES)
    if unknown or not capture:
        raise ConfigError(f"capture must be a non-empty subset of {CAPTURES + OPTIONAL_CAPTURES}; got {capture}")
    if "logits" in capture and (not lm_has_head(lm)):
        raise ConfigError(
            f"capture='logits' needs a language-model head; {lm.model_id} ({type(lm.model).__name__}) has none"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be ≥ 1; got {batch_size}")
    if top_k_massive < 1 or top_k_neurons < 1:
        raise ConfigError("top_k_massive and top_k_neurons must be ≥ 1")
    if keep_patterns and "attention" not in capture:
        raise ConfigError("keep_patterns needs capture to include 'attention'")
    keep = _parse_keep_patterns(keep_patterns, lm.n_layers, lm.n_heads) if "attention" in capture else {}
    hidden_layers = _parse_layers(keep_hidden, lm.n_layers, "keep_hidden")
    tracked = [(int(layer), int(neuron)) for layer, neuron in track_neurons]
    for layer, neuron in tracked:
        if not (0 <= layer < lm.n_layers and 0 <= neuron < lm.d_mlp):
            raise ConfigError(
                f"track_neurons names ({layer}, {neuron}); layers are 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1}"
            )
    return TraceOptions(capture, batch_size, keep, hidden_layers, tracked, top_k_massive, top_k_neurons,
                        truncate, prepend_bos, progress)


def _check_pattern_budget(options: TraceOptions, lengths: np.ndarray) -> None:
    """Full patterns are opt-in because they are n² per head; refuse requests that would not fit comfortably."""
    n_kept_heads = sum(len(h) for h in options.keep.values())
    pattern_bytes = 4 * int((lengths**2).sum()) * n_kept_heads
    if pattern_bytes > _MAX_PATTERN_BYTES:
        raise ConfigError(
            f"keeping {n_kept_heads} full patterns for these inputs needs {pattern_bytes / 1e9:.1f} GB; keep fewer "
            "heads (keep_patterns=[(layer, head), ...]) — the streaming statistics need no patterns at all"
        )


def _build_probes(lm, options: TraceOptions, lengths: np.ndarray) -> Probes:
    """One probe per captured kind, each with arrays preallocated for every real token of the run."""
    n_tokens, n_seq = int(lengths.sum()), len(lengths)
    capture = options.capture
    attention = (
        AttentionProbe(lm, n_tokens, n_seq, options.keep, lengths**2) if "attention" in capture else None
    )
    residual = (
        ResidualProbe(lm, n_tokens, n_seq, int(lengths.max()), options.top_k_massive, options.hidden_layers)
        if "residual" in capture
        else None
    )
    mlp = (
        MLPProbe(lm, n_tokens, options.top_k_neurons, options.tracked)
        if "mlp" in capture or options.tracked
        else None
    )
    logprobs = None
    if "logits" in capture:
        head = lm.model.get_output_embeddings()
        # a packed head (QuantLinear, e.g. quant="keep") has no float .weight, only its shape
        vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        logprobs = np.zeros((n_tokens, vocab), dtype=np.float32)
    router = RouterProbe(lm, n_tokens) if moe_layers(lm) and ("mlp" in capture or "router" in capture) else None
    return Probes(attention, residual, mlp, logprobs, router)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _run_batches(lm, encoded, lengths: np.ndarray, probes: Probes, options: TraceOptions) -> None:
    """Forward every batch with the probes attached; the probes write into their flat-token arrays."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pad_id = _pad_id(lm.tokenizer)
    # longest first, so that batches hold similar lengths and padding (wasted compute) stays small
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i : i + options.batch_size] for i in range(0, len(order), options.batch_size)]
    device = lm.device
    was_training = lm.model.training
    lm.model.eval()
    for probe in probes.hooked:
        probe.attach()
    try:
        with observing(probes.attention) if probes.attention is not None else contextlib.nullcontext():
            desc = f"lens.trace {lm.model_id.split('/')[-1]}"
            for rows in progress_bar(batches, progress=options.progress, desc=desc, unit="batch"):
                input_ids, mask = pad_batch([encoded.ids[i] for i in rows], pad_id)
                starts = [int(offsets[i]) for i in rows]
                flat_index = torch.cat([torch.arange(s, s + int(lengths[i])) for s, i in zip(starts, rows)])
                batch = Batch(
                    sequences=list(rows),
                    lengths=[int(lengths[i]) for i in rows],
                    starts=starts,
                    flat_index=flat_index.to(device),
                    mask=mask.bool().to(device),
                )
                for probe in (probes.attention, *probes.hooked):
                    if probe is not None:
                        probe.begin(batch)
                _forward(lm, input_ids.to(device), mask.to(device), batch, probes.logprobs)
                if probes.attention is not None:
                    probes.attention.end()
    finally:
        for probe in probes.hooked:
            probe.detach()
        lm.model.train(was_training)


def _forward(lm, input_ids: torch.Tensor, mask: torch.Tensor, batch: Batch, logprobs: np.ndarray | None) -> None:
    kwargs = {"use_cache": False} if lm.causal else {}
    if logprobs is None:
        # The backbone only: no statistic needs the LM head, whose vocabulary-sized matmul would
        # otherwise cost as much as several layers (a quarter of GPT-2's forward at T = 2048).
        lm.base(input_ids=input_ids, attention_mask=mask, **kwargs)
        return
    out = lm.model(input_ids=input_ids, attention_mask=mask, **kwargs)
    logprobs[batch.flat_index.cpu().numpy()] = (
        torch.log_softmax(out.logits.float(), dim=-1)[batch.mask].cpu().numpy()
    )


def _assemble_run(lm, encoded, lengths: np.ndarray, probes: Probes, options: TraceOptions) -> Run:
    """Gather the probes' arrays, the tokens and the provenance into a ``Run``."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens = int(offsets[-1])
    arrays: dict[str, np.ndarray] = {
        "token_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded.ids]),
        "offsets": offsets,
        "special": np.concatenate([np.asarray(s, dtype=bool) for s in encoded.special]),
    }
    if probes.attention is not None:
        arrays.update(probes.attention.arrays())
    if probes.residual is not None:
        arrays.update(probes.residual.arrays())
    if probes.mlp is not None:
        arrays.update(probes.mlp.arrays(n_tokens))
    if probes.logprobs is not None:
        arrays["logits.logprobs"] = probes.logprobs
    if probes.router is not None:
        arrays.update(probes.router.arrays())

    tokens = [[lm.tokenizer.decode([t]) for t in ids] if ids else [] for ids in encoded.ids]
    provenance = lm.provenance()
    provenance.update(
        {
            "input_sha256": _input_hash(encoded.ids),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "trace": {
                "capture": list(options.capture),
                "batch_size": options.batch_size,
                "padding": "right",
                "prepend_bos": lm.family.prepend_bos if options.prepend_bos is None else options.prepend_bos,
                "truncate": options.truncate,
                "top_k_massive": options.top_k_massive,
                "top_k_neurons": options.top_k_neurons,
                "keep_patterns": [[layer, list(heads)] for layer, heads in options.keep.items()],
                "keep_hidden": list(options.hidden_layers),
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
        "tracked_neurons": [list(p) for p in options.tracked],
    }
    return Run(arrays=arrays, tokens=tokens, meta=meta)
