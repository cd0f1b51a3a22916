"""``lens.trace``: run a LensModel over inputs with probes attached and return a ``Run``."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from lens.capture.finite import FiniteGuard
from lens.capture.interventions import Interventions
from lens.capture.moe import RouterProbe, moe_layers
from lens.capture.probes import AttentionProbe, Batch, MLPProbe, ResidualProbe
from lens.capture.vision import SinkDimProbe, VisionProbe, modality_arrays, modality_of, query_groups
from lens.errors import ConfigError, NumericalError
from lens.models.inputs import encode, pad_batch, pad_fields
from lens.models.labels import token_labels
from lens.models.observers import editing, observing
from lens.progress import progress_bar
from lens.run import Run

__all__ = ["trace", "CAPTURES", "SPECTRA", "TraceOptions"]

CAPTURES = ("attention", "residual", "mlp")
SPECTRA = ("exact", "none")  # what the residual probe computes of the entropy spectra (see ResidualProbe)
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
            raise ConfigError(f"keep_patterns names layer {layer}; valid layers are 0..{n_layers - 1}: pass layers in that range")
        for head in heads:
            if not 0 <= int(head) < n_heads:
                raise ConfigError(f"keep_patterns names head {head}; valid heads are 0..{n_heads - 1}: pass heads in that range")
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
            raise ConfigError(f"{what} names layer {layer}; valid residual layers are 0..{n_layers}: pass layers in that range")
    return tuple(sorted(set(int(x) for x in layers)))


def lm_has_head(lm) -> bool:
    """Whether the model ends in a vocabulary projection (a causal LM head)."""
    head = lm.model.get_output_embeddings() if hasattr(lm.model, "get_output_embeddings") else None
    return head is not None and lm.causal


def _input_hash(ids: list[list[int]], extras: list | None = None) -> str:
    """sha256 of the token ids and, for image inputs, of the processor's pixel tensors and grids."""
    digest = hashlib.sha256()
    for i, seq in enumerate(ids):
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
        for name, value in sorted(((extras or [None] * len(ids))[i] or {}).items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(torch.as_tensor(value).detach().cpu().float().numpy()).tobytes())
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
    spectra: str = "exact"


@dataclass
class Probes:
    """The probes of one trace; ``hooked`` are the forward-hook probes (residual, MLP, and for image inputs
    the sink dimensions); ``vision`` the vision tower's probe (image inputs only)."""

    attention: AttentionProbe | None
    residual: ResidualProbe | None
    mlp: MLPProbe | None
    logprobs: np.ndarray | None
    router: RouterProbe | None = None
    vision: VisionProbe | None = None
    sink_dims: SinkDimProbe | None = None
    layouts: list | None = None

    @property
    def hooked(self) -> list:
        return [p for p in (self.residual, self.mlp, self.router, self.sink_dims) if p is not None]


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
    spectra: str = "exact",
    interventions: Iterable = (),
) -> Run:
    """Run ``model`` (a ``LensModel``) over ``inputs`` with streaming probes and return a ``Run``.

    ``inputs``: a string, a list of strings, or token ids (see ``lens.models.inputs.encode``). Batches are
    right-padded; padded positions never count in any statistic. ``progress``: a bar over batches — None
    (default) shows it in a terminal or notebook and not when output goes to a file (``lens.progress``).
    For a vision-language model, images with text: ``[{"image": img, "text": "<image>\nDescribe."}, …]`` (an
    image is a PIL image, an H × W × 3 uint8 array or a path; ``lens.image_prompt(lm)`` writes the text), or the
    processor's output for one sequence; see ``lens.models.multimodal``. Each image sequence runs alone. The run
    then also knows each token's modality (``run.modality``), each image token's (image, tile, row, col), the
    images as the model saw them, the vision tower's own attention and norms (``vision.*`` arrays), the
    text→image attention (``attn.text_key_mass``, ``attn.rows``) and the sink dimensions (``resid.sink_*``).
    ``capture``: any of ``"attention"`` (mass received per key, inside the attention kernel the model
    runs), ``"residual"`` (norms, massive activations, entropy spectra) and ``"mlp"`` (neuron statistics);
    add ``"logits"`` to keep next-token log-probabilities (fp32, N × vocabulary — heavy) for ``lens.compare``.
    ``keep_patterns``: full [T, T] patterns for chosen heads — ``"all"``, a layer, a list of layers, a
    list of ``(layer, head)``, or ``{layer: [heads]}``. ``keep_hidden``: residual layers (0..L) whose
    hidden states to keep. ``track_neurons``: ``(layer, neuron)`` pairs whose per-token activation to keep.
    ``truncate``: cut inputs longer than the model's positions instead of raising ``InputTooLongError``.
    ``spectra``: ``"exact"`` (default) keeps every eigenvalue of both Gram matrices per layer — exact,
    computed beside the forward pass (in a background thread, or split over the forward's threads:
    ``lens.capture.background``) —
    or ``"none"`` to skip them (norms and massive activations only; ``lens.valley`` needs them).
    ``interventions``: ``lens.Ablate`` / ``lens.Clamp`` / ``lens.Patch`` / ``lens.ScaleAttention`` objects
    applied during the forward pass (see ``lens.capture.interventions``); the probes observe the intervened
    model, and provenance records them.

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
        truncate=truncate, prepend_bos=prepend_bos, progress=progress, spectra=spectra,
    )
    encoded = encode(model, inputs, truncate=options.truncate, prepend_bos=options.prepend_bos)
    lengths = np.array([len(ids) for ids in encoded.ids], dtype=np.int64)
    _check_pattern_budget(options, lengths)
    edits = Interventions(model, list(interventions), lengths, encoded.ids)
    executed = _executions(model)
    layouts = _layouts(model, encoded)
    probes = _build_probes(model, options, lengths, layouts, encoded)
    reset = getattr(model.attention_kernel, "reset_tally", None)
    if reset is not None:
        reset()
    _run_batches(model, encoded, lengths, probes, options, edits)
    run = _assemble_run(model, encoded, lengths, probes, options)
    if executed is not None:
        # which execution path computed each attention call of this trace (a sparse kernel runs dense
        # SDPA when a selection keeps every block): the provenance says what ran, never silently
        now = _executions(model)
        run.meta["provenance"]["attention"]["executed"] = {
            path: int(now[path] - executed.get(path, 0)) for path in sorted(now) if now[path] - executed.get(path, 0)
        }
    run.provenance["trace"]["interventions"] = edits.describe()
    if reset is not None:  # a sparse kernel: warn when it kept every block (sparsity asked for, dense computed)
        from lens.models.deploy import check_every_block_kept

        run.meta["sparse_every_block_kept"] = check_every_block_kept(model)
    return run


def _executions(lm) -> dict | None:
    """A copy of the deployed kernel's per-path call counts, or None for kernels that keep none."""
    counts = getattr(lm.attention_kernel, "executed", None)
    return dict(counts) if counts is not None else None


def _layouts(lm, encoded) -> list | None:
    """Image inputs: each sequence's image-token layout (``lens.models.vision``); None for text-only runs."""
    if not encoded.extras or not any(x is not None for x in encoded.extras):
        return None
    from lens.models.vision import layout_for

    layouts = []
    for i, ids in enumerate(encoded.ids):
        extras = encoded.extras[i]
        if extras is None:
            layouts.append(None)
            continue
        fields = {name: torch.tensor([rows[i]]) for name, rows in encoded.fields.items()}
        layouts.append(layout_for(lm, ids, {**extras, **fields}))
    return layouts


def _parse_options(lm, *, capture, batch_size, keep_patterns, keep_hidden, track_neurons, top_k_massive,
                   top_k_neurons, truncate, prepend_bos, progress, spectra="exact") -> TraceOptions:
    """Check every option against the model before any work is done; ``ConfigError`` names the fix."""
    if isinstance(capture, str):
        capture = (capture,)
    try:
        capture = tuple(capture)
    except TypeError:
        raise ConfigError(
            f"capture must be a list of names from {CAPTURES + OPTIONAL_CAPTURES}; got {capture!r}. Pass e.g. "
            "capture=('attention', 'residual')"
        ) from None
    unknown = set(capture) - set(CAPTURES) - set(OPTIONAL_CAPTURES)
    if unknown or not capture:
        raise ConfigError(
            f"capture must be a non-empty subset of {CAPTURES + OPTIONAL_CAPTURES}; got {capture}. Pass e.g. "
            "capture=('attention', 'residual')"
        )
    if "logits" in capture and (not lm_has_head(lm)):
        raise ConfigError(
            f"capture='logits' needs a language-model head; {lm.model_id} ({type(lm.model).__name__}) has none. "
            "Trace without 'logits' (lens.compare works without it)"
        )
    for name, value in (("batch_size", batch_size), ("top_k_massive", top_k_massive), ("top_k_neurons", top_k_neurons)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ConfigError(f"{name} must be an integer ≥ 1; got {value!r}. Pass e.g. {name}=8")
    if not isinstance(truncate, (bool, np.bool_)):
        raise ConfigError(f"truncate must be True or False; got {truncate!r}. Pass truncate=True to cut long inputs")
    if prepend_bos not in (None, True, False):
        raise ConfigError(
            f"prepend_bos must be True, False or None (the tokenizer's default); got {prepend_bos!r}. Pass one of those"
        )
    if spectra not in SPECTRA:
        raise ConfigError(f"spectra must be one of {SPECTRA} ('exact': every eigenvalue, 'none': skip); got {spectra!r}")
    if keep_patterns and "attention" not in capture:
        raise ConfigError("keep_patterns needs capture to include 'attention'")
    try:
        keep = _parse_keep_patterns(keep_patterns, lm.n_layers, lm.n_heads) if "attention" in capture else {}
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"keep_patterns must be 'all', a layer, a list of layers, a list of (layer, head) pairs or "
            f"{{layer: [heads]}}; got {keep_patterns!r} ({exc}). Pass e.g. keep_patterns=[(0, 3)]"
        ) from None
    try:
        hidden_layers = _parse_layers(keep_hidden, lm.n_layers, "keep_hidden")
        tracked = [(int(layer), int(neuron)) for layer, neuron in track_neurons]
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"keep_hidden must be 'all' or residual layers (ints), and track_neurons a list of (layer, neuron) pairs; "
            f"got keep_hidden={keep_hidden!r}, track_neurons={track_neurons!r} ({exc}). Pass e.g. keep_hidden=[0, 3], "
            "track_neurons=[(1, 42)]"
        ) from None
    if tracked and not len(lm.mlp_out_modules):
        raise ConfigError(
            f"track_neurons={tracked}: {lm.model_id} has no dense MLP neurons (a pure mixture-of-experts model: its "
            "neurons are per expert); trace without track_neurons, and see lens.neurons(run).to_frame('routing')"
        )
    for layer, neuron in tracked:
        if not (0 <= layer < lm.n_layers and 0 <= neuron < lm.d_mlp):
            raise ConfigError(
                f"track_neurons names ({layer}, {neuron}); layers are 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1}: "
                "pass pairs in those ranges"
            )
    return TraceOptions(capture, batch_size, keep, hidden_layers, tracked, top_k_massive, top_k_neurons,
                        truncate, prepend_bos, progress, spectra)


def _check_pattern_budget(options: TraceOptions, lengths: np.ndarray) -> None:
    """Full patterns are opt-in because they are n² per head; refuse requests that would not fit comfortably."""
    n_kept_heads = sum(len(h) for h in options.keep.values())
    pattern_bytes = 4 * int((lengths**2).sum()) * n_kept_heads
    if pattern_bytes > _MAX_PATTERN_BYTES:
        raise ConfigError(
            f"keeping {n_kept_heads} full patterns for these inputs needs {pattern_bytes / 1e9:.1f} GB; keep fewer "
            "heads (keep_patterns=[(layer, head), ...]) — the streaming statistics need no patterns at all"
        )


def _build_probes(lm, options: TraceOptions, lengths: np.ndarray, layouts=None, encoded=None) -> Probes:
    """One probe per captured kind, each with arrays preallocated for every real token of the run."""
    n_tokens, n_seq = int(lengths.sum()), len(lengths)
    capture = options.capture
    groups = modality = None
    if layouts is not None:
        # each token's modality, known before the forward pass: the residual probe splits its spectra by it
        per_seq = [modality_of(encoded.special[i], layout.image) if layout is not None
                   else modality_of(encoded.special[i], np.full(int(lengths[i]), -1)) for i, layout in enumerate(layouts)]
        groups = [query_groups(m) for m in per_seq]
        modality = np.concatenate(per_seq)
    attention = (
        AttentionProbe(lm, n_tokens, n_seq, options.keep, lengths**2, groups=groups) if "attention" in capture else None
    )
    residual = (
        ResidualProbe(lm, n_tokens, n_seq, int(lengths.max()), options.top_k_massive, options.hidden_layers,
                      spectra=options.spectra, modality=modality,
                      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
        if "residual" in capture
        else None
    )
    mlp = (
        MLPProbe(lm, n_tokens, options.top_k_neurons, options.tracked, modality=modality)
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
    vision = sink_dims = None
    if layouts is not None:
        image_offsets, count = [], 0
        for layout in layouts:
            image_offsets.append(count)
            count += layout.n_images if layout is not None else 0
        if "attention" in capture or "residual" in capture:
            vision = VisionProbe(lm, layouts, image_offsets)
        if "residual" in capture:
            sink_dims = SinkDimProbe(lm, n_tokens, n_seq)
    return Probes(attention, residual, mlp, logprobs, router, vision, sink_dims, layouts)


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _run_batches(lm, encoded, lengths: np.ndarray, probes: Probes, options: TraceOptions, edits=None) -> None:
    """Forward every batch with the probes attached; the probes write into their flat-token arrays.

    Interventions (``edits``) attach their hooks before the probes', so probes observe the intervened model."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    pad_id = _pad_id(lm.tokenizer)
    # longest first, so that batches hold similar lengths and padding (wasted compute) stays small; image
    # sequences run alone (their pixel tensors differ in shape)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = 1 if probes.layouts is not None else options.batch_size
    batches = [order[i : i + size] for i in range(0, len(order), size)]
    device = lm.device
    was_training = lm.model.training
    lm.model.eval()
    if edits:
        edits.attach()  # first: the guard and the probes observe the intervened model
    guard = FiniteGuard(lm)
    guard.attach()  # before the probes, so that it checks (and cleans padding) before any probe reads the stream
    for probe in probes.hooked:
        probe.attach()
    if probes.vision is not None:
        probes.vision.attach()
    try:
        with contextlib.ExitStack() as stack:
            for observer in (probes.attention, probes.vision):
                if observer is not None:
                    stack.enter_context(observing(observer))
            if edits:
                stack.enter_context(editing(edits))
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
                guard.begin(batch.sequences, batch.mask)
                for probe in (probes.attention, *probes.hooked, edits or None):
                    if probe is not None:
                        probe.begin(batch)
                fields = {k: v.to(device) for k, v in pad_fields(encoded.fields, rows, input_ids.shape[1]).items()}
                extras = _extras(encoded, rows, device)
                if probes.vision is not None:
                    probes.vision.begin(rows[0] if extras else None)
                groups = _token_groups(lm, probes, rows, input_ids.shape[1], device)
                with groups:
                    _forward(lm, input_ids.to(device), mask.to(device), batch, probes.logprobs, {**fields, **extras})
                if probes.attention is not None:
                    probes.attention.end()
                if probes.vision is not None:
                    probes.vision.end()
            if probes.residual is not None:
                probes.residual.finish()  # the last layers reduce in the background: wait, raise their errors
    finally:
        guard.detach()
        for probe in probes.hooked:
            probe.detach()
        if probes.vision is not None:
            probes.vision.detach()
        if edits:
            edits.detach()
        lm.model.train(was_training)


def _extras(encoded, rows: list[int], device) -> dict:
    """The image inputs (pixel tensors, grids) of a batch of one image sequence; {} otherwise."""
    if not encoded.extras or encoded.extras[rows[0]] is None:
        return {}
    return {k: (v.to(device) if hasattr(v, "to") else v) for k, v in encoded.extras[rows[0]].items()}


def _token_groups(lm, probes: Probes, rows: list[int], width: int, device):
    """Modality-aware smoothing (quant="w8a8-smooth-modality") smooths image tokens with their own factors: mark
    them for the forward pass (``lens.kernels.lowbit.token_groups``)."""
    config = getattr(lm, "quant", None)
    if probes.layouts is None or not getattr(config, "modality_aware", False):
        return contextlib.nullcontext()
    from lens.kernels.lowbit import token_groups

    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, seq in enumerate(rows):
        layout = probes.layouts[seq]
        if layout is not None:
            mask[r, : len(layout.image)] = torch.from_numpy(layout.image >= 0)
    return token_groups(mask.to(device))


def _forward(lm, input_ids: torch.Tensor, mask: torch.Tensor, batch: Batch, logprobs: np.ndarray | None,
             fields: dict[str, torch.Tensor]) -> None:
    kwargs = {"use_cache": False} if lm.causal else {}
    kwargs.update(fields)  # token_type_ids, position_ids, pixel tensors, …: every input the model takes
    if logprobs is None:
        # The backbone only: no statistic needs the LM head, whose vocabulary-sized matmul would
        # otherwise cost as much as several layers (a quarter of GPT-2's forward at T = 2048). For a VLM the
        # backbone is the multimodal base model (vision tower, projector, language model).
        lm.backbone(input_ids=input_ids, attention_mask=mask, **kwargs)
        return
    out = lm.model(input_ids=input_ids, attention_mask=mask, **kwargs)
    values = torch.log_softmax(out.logits.float(), dim=-1)[batch.mask]
    if not bool(torch.isfinite(values).all()):
        rows = sorted({batch.sequences[int(r)] for r in (~torch.isfinite(out.logits.float()).all(-1) & batch.mask)
                       .any(-1).nonzero().flatten()})
        raise NumericalError(
            f"the next-token log-probabilities (final norm and LM head) contain NaN or infinite values for "
            f"input(s) {rows}, although the final hidden state is finite; load the model with dtype='float32', "
            "or trace without capture='logits'"
        )
    logprobs[batch.flat_index.cpu().numpy()] = values.cpu().numpy()


def _assemble_run(lm, encoded, lengths: np.ndarray, probes: Probes, options: TraceOptions) -> Run:
    """Gather the probes' arrays, the tokens and the provenance into a ``Run``."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n_tokens = int(offsets[-1])
    labelled = [token_labels(lm.tokenizer, ids) for ids in encoded.ids]
    tokens = [labels for labels, _ in labelled]
    arrays: dict[str, np.ndarray] = {
        "token_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in encoded.ids]),
        "offsets": offsets,
        "special": np.concatenate([np.asarray(s, dtype=bool) for s in encoded.special]),
        "continuation": np.concatenate([np.asarray(flags, dtype=bool) for _, flags in labelled]),
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
    images = None
    if probes.layouts is not None:
        extra, images = modality_arrays(lm, encoded, probes.layouts, offsets)
        arrays.update(extra)
        for probe in (probes.vision, probes.sink_dims):
            if probe is not None:
                arrays.update(probe.arrays())

    provenance = lm.provenance()
    bos_first = encoded.bos_first
    # what really happened: position 0 is BOS in every sequence (True), in none (False), or per sequence
    prepend_bos = bos_first[0] if len(set(bos_first)) == 1 else list(bos_first)
    provenance.update(
        {
            "input_sha256": _input_hash(encoded.ids, encoded.extras),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "trace": {
                "capture": list(options.capture),
                "batch_size": options.batch_size,
                "padding": "right",
                "prepend_bos": prepend_bos,
                "prepend_bos_requested": options.prepend_bos,
                "input_form": encoded.form,
                "input_padding": encoded.padding,
                "model_inputs": ["input_ids", "attention_mask", *sorted(encoded.fields)],
                "truncate": options.truncate,
                "top_k_massive": options.top_k_massive,
                "top_k_neurons": options.top_k_neurons,
                "keep_patterns": [[layer, list(heads)] for layer, heads in options.keep.items()],
                "keep_hidden": list(options.hidden_layers),
                "spectra": options.spectra if "residual" in options.capture else None,
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
    if images is not None:
        meta["images"] = images
        meta["vision"] = {"family": lm.vision_family.name, "n_layers": lm.vision_n_layers,
                          "n_heads": lm.vision_n_heads, "d_model": lm.vision_d_model,
                          "prefix_tokens": lm.vision_family.vision_prefix, "image_token_id": lm.image_token_id}
    return Run(arrays=arrays, tokens=tokens, meta=meta)
