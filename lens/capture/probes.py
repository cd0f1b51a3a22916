"""Probes: small streaming reducers that turn one forward pass into the arrays of a ``Run``.

Each probe writes straight into preallocated arrays indexed by *flat token position* (sequences back to
back, padding dropped), so memory is independent of how the inputs were batched and no probe ever
keeps a per-layer activation tensor after its hook returns (unless the user asked for hidden states or
patterns). The attention probe is fed by the lens attention function (``lens.models.observers``); the others
are forward hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lens.errors import CaptureError, NumericalError
from lens.capture.spectra import center_and_normalize_rows, lower_median, squared_singular_values
from lens.capture.vision import IMAGE, TEXT

__all__ = ["Batch", "AttentionProbe", "ResidualProbe", "MLPProbe", "top_magnitudes"]


@dataclass
class Batch:
    """Where the sequences of the current forward pass go in the flat token arrays."""

    sequences: list[int]  # run-level sequence index of each batch row
    lengths: list[int]
    starts: list[int]  # flat token offset of each row's first token
    flat_index: torch.Tensor  # [n_real_tokens] flat position of every real token, row-major over the batch
    mask: torch.Tensor  # [B, T] bool, True for real tokens


class AttentionProbe:
    """Mass received per key, |Q_k| and the uniform share u[k] for every layer and head; optional patterns.

    Implements docs/definitions.md#attention-mass-received from the statistics the attention kernel returns;
    u[k] = (Σ_{q∈Q_k} 1/|K_q|) / |Q_k| comes from the model's actual mask in the same pass.
    """

    def __init__(self, lm, n_tokens: int, n_sequences: int, keep: dict[int, tuple[int, ...]], pattern_sizes,
                 groups: list[tuple[np.ndarray, np.ndarray]] | None = None):
        self.lm = lm
        self.key_mass = np.zeros((lm.n_layers, lm.n_heads, n_tokens), dtype=np.float32)
        self.query_count = np.zeros((lm.n_layers, n_tokens), dtype=np.float32)
        self.uniform_share = np.zeros((lm.n_layers, n_tokens), dtype=np.float32)
        self.kept_fraction: np.ndarray | None = None
        self.n_sequences = n_sequences
        self.keep = keep
        total_pattern = int(sum(pattern_sizes))
        self.pattern_starts = np.concatenate([[0], np.cumsum(pattern_sizes)]).astype(np.int64)
        self.patterns = {
            (layer, head): np.zeros(total_pattern, dtype=np.float32) for layer, heads in keep.items() for head in heads
        }
        self.batch: Batch | None = None
        self.seen: list[int] = []
        self._init_groups(groups, n_tokens, pattern_sizes)

    # -- query groups (vision-language models) ------------------------------------------------------------
    def _init_groups(self, groups, n_tokens: int, pattern_sizes) -> None:
        """Per sequence (share queries, row queries) from ``lens.capture.vision.query_groups``: the text→image
        share sums the first group per key and head; the row queries keep their head-mean attention rows."""
        self.groups = groups if groups and any(len(g[1]) for g in groups) else None
        self.group_weights: torch.Tensor | None = None
        self.group_layers: set[int] = set()
        self.group_batches = 0
        if self.groups is None:
            return
        lengths = np.sqrt(np.asarray(pattern_sizes, dtype=np.float64)).round().astype(np.int64)
        n_layers = self.lm.n_layers
        self.text_key_mass = np.zeros((n_layers, self.lm.n_heads, n_tokens), dtype=np.float32)
        self.text_uniform = np.zeros((n_layers, n_tokens), dtype=np.float32)
        self.text_count = np.array([len(g[0]) for g in self.groups], dtype=np.int64)
        per_row = [len(g[1]) for g in self.groups]
        self.row_sequence = np.repeat(np.arange(len(self.groups)), per_row).astype(np.int64)
        self.row_query = np.concatenate([g[1] for g in self.groups]).astype(np.int64) if sum(per_row) else np.zeros(0, np.int64)
        sizes = lengths[self.row_sequence] if len(self.row_sequence) else np.zeros(0, np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.first_row = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
        self.rows = np.zeros((n_layers, int(self.row_offsets[-1])), dtype=np.float32)

    def _begin_groups(self, batch: Batch) -> None:
        self.group_weights = None
        if self.groups is None:
            return
        width = int(batch.mask.shape[1])
        n_groups = 1 + max(len(self.groups[s][1]) for s in batch.sequences)
        if n_groups == 1:
            return
        weights = torch.zeros(len(batch.sequences), n_groups, width)
        for row, seq in enumerate(batch.sequences):
            share, rows = self.groups[seq]
            weights[row, 0, torch.as_tensor(share, dtype=torch.long)] = 1.0
            weights[row, 1 + torch.arange(len(rows)), torch.as_tensor(rows, dtype=torch.long)] = 1.0
        self.group_weights = weights.to(batch.mask.device)
        self.group_batches += 1

    def query_weights(self, module: torch.nn.Module) -> torch.Tensor | None:
        if self.group_weights is None or self.lm.layer_of_attention.get(id(module)) is None:
            return None
        return self.group_weights

    def _on_groups(self, layer: int, stats) -> None:
        if self.group_weights is None or stats.group_key_mass is None:
            return
        self.group_layers.add(layer)
        batch = self.batch
        mass = stats.group_key_mass.float().cpu().numpy()  # [B, G, H, T]
        uniform = stats.group_uniform.float().cpu().numpy()  # [B, G, T]
        for row, (seq, n, start) in enumerate(zip(batch.sequences, batch.lengths, batch.starts)):
            self.text_key_mass[layer, :, start : start + n] = mass[row, 0, :, :n]
            self.text_uniform[layer, start : start + n] = uniform[row, 0, :n]
            for j in range(len(self.groups[seq][1])):
                r = int(self.first_row[seq]) + j
                a, b = int(self.row_offsets[r]), int(self.row_offsets[r + 1])
                self.rows[layer, a:b] = mass[row, 1 + j, :, :n].mean(axis=0)

    def begin(self, batch: Batch) -> None:
        self.batch = batch
        self.seen = []
        self._begin_groups(batch)

    def pattern_heads(self, module: torch.nn.Module) -> tuple[int, ...]:
        layer = self.lm.layer_of_attention.get(id(module))
        return self.keep.get(layer, ()) if layer is not None else ()

    def on_attention(self, module: torch.nn.Module, stats) -> None:
        layer = self.lm.layer_of_attention.get(id(module))
        if layer is None:  # a vision tower's attention: lens.capture.vision.VisionProbe records it
            return
        self.seen.append(layer)
        batch = self.batch
        if stats.uniform_sum is None:
            raise CaptureError(
                f"the attention kernel of layer {layer} ({type(getattr(module, '_lens_kernel', None)).__name__}) "
                "returned no uniform_sum, so lens cannot tell which keys the model's mask lets each query see; "
                "a kernel's AttentionStats must fill it (see lens.kernels.attention.AttentionStats)"
            )
        key_mass = stats.key_mass.float().cpu().numpy()
        query_count = stats.query_count.float()
        share = (stats.uniform_sum.float() / query_count.clamp(min=1.0)).cpu().numpy()
        query_count = query_count.cpu().numpy()
        for row, (seq, n, start) in enumerate(zip(batch.sequences, batch.lengths, batch.starts)):
            self.key_mass[layer, :, start : start + n] = key_mass[row, :, :n]
            self.query_count[layer, start : start + n] = query_count[row, :n]
            self.uniform_share[layer, start : start + n] = share[row, :n]
            if stats.patterns is not None:
                for j, head in enumerate(stats.pattern_heads):
                    if (layer, head) in self.patterns:
                        block = stats.patterns[row, j, :n, :n].cpu().numpy().reshape(-1)
                        p0 = self.pattern_starts[seq]
                        self.patterns[(layer, head)][p0 : p0 + n * n] = block
        self._on_groups(layer, stats)
        if stats.kept_fraction is not None:
            if self.kept_fraction is None:
                self.kept_fraction = np.full((self.lm.n_layers, self.n_sequences, self.lm.n_heads), np.nan, np.float32)
            kept = stats.kept_fraction.float().cpu().numpy()
            for row, seq in enumerate(batch.sequences):
                self.kept_fraction[layer, seq] = kept[row]

    def end(self) -> None:
        expected = list(range(self.lm.n_layers))
        if sorted(self.seen) != expected:
            missing = sorted(set(expected) - set(self.seen))
            raise CaptureError(
                f"the lens attention function saw layers {sorted(set(self.seen))} but not {missing}. This model's "
                "attention does not go through transformers' AttentionInterface for those layers (or was replaced "
                "after lens.load); reload it with lens.load, or trace with capture=('residual', 'mlp')"
            )

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"attn.key_mass": self.key_mass, "attn.query_count": self.query_count,
               "attn.uniform_share": self.uniform_share}
        if self.kept_fraction is not None:
            out["attn.kept_fraction"] = self.kept_fraction
        for (layer, head), values in self.patterns.items():
            out[f"pattern.{layer}.{head}"] = values
        # the text-query sums exist only if the kernel computed them for every layer (the dense and sparse kernels do)
        if self.groups is not None and self.group_batches and len(self.group_layers) == self.lm.n_layers:
            out.update({"attn.text_key_mass": self.text_key_mass, "attn.text_uniform": self.text_uniform,
                        "attn.text_count": self.text_count, "attn.rows": self.rows, "attn.row_sequence": self.row_sequence,
                        "attn.row_query": self.row_query, "attn.row_offsets": self.row_offsets})
        return out


class ResidualProbe:
    """Token norms, cos² to the first token, massive activations and both entropy spectra per layer.

    Implements docs/definitions.md#massive-activations, #token-norms and "Matrix entropy" (the spectra; the
    entropies themselves are computed by ``lens.valley``). X_ℓ is read at the input of block ℓ, and
    X_L at the output of the last block.

    ``spectra``: ``"exact"`` (every eigenvalue of both Gram matrices, ``lens.capture.spectra``) or
    ``"none"`` (no spectra: norms and massive activations only; ``lens.valley`` then says what is
    missing). ``background``: when torch runs the forward on one thread, reduce each layer in a background
    thread (``lens.capture.background``) on a copy of its hidden state, so the eigen-solves and Gram products
    overlap the next layers' forward on another core instead of holding it up; when the forward uses several
    threads (no core is idle), reduce each layer at once, its sequences split over as many single-threaded
    threads. The numbers are the same as reducing in the forward's thread (up to the summation order of a
    multi-threaded matrix product, ~1e-7 relative).

    ``modality``: [N] uint8 per flat token (0 text, 1 image, 2 special; ``lens.capture.vision``), given only
    for runs with image tokens. Then, per layer and sequence, the same two spectra are also computed on the
    image-token rows and on the text-token rows of X_ℓ alone (``resid.spectrum_raw.image``, …), with each
    subset's reference row for the massive-activation bound — its largest-norm token (``resid.reference.*``)
    — and every token's cos² to its subset's reference (``resid.cos2_reference``). Text-only runs compute
    and store none of this.
    """

    def __init__(self, lm, n_tokens: int, n_sequences: int, max_len: int, top_k: int, keep_hidden: tuple[int, ...],
                 *, spectra: str = "exact", background: bool = True, modality: np.ndarray | None = None,
                 offsets: np.ndarray | None = None):
        self.lm = lm
        n = lm.n_layers + 1
        rank = min(max_len, lm.d_model)
        self.top_k = top_k
        self.spectra = spectra
        self.norm = np.zeros((n, n_tokens), dtype=np.float32)
        self.cos2 = np.zeros((n, n_tokens), dtype=np.float32)
        self.median = np.zeros((n, n_sequences), dtype=np.float32)
        self.top_value = np.zeros((n, n_sequences, top_k), dtype=np.float32)
        self.top_position = np.full((n, n_sequences, top_k), -1, dtype=np.int64)
        self.top_dim = np.full((n, n_sequences, top_k), -1, dtype=np.int64)
        self.spectrum_raw = np.zeros((n, n_sequences, rank), dtype=np.float64) if spectra == "exact" else None
        self.spectrum_normalized = np.zeros((n, n_sequences, rank), dtype=np.float64) if spectra == "exact" else None
        self.hidden = {layer: np.zeros((n_tokens, lm.d_model), dtype=np.float32) for layer in keep_hidden}
        self._init_subsets(modality, offsets, n)
        self.batch: Batch | None = None
        self.handles: list = []
        self.background = background
        self.worker = None
        self.parallel = 1

    def _init_subsets(self, modality: np.ndarray | None, offsets: np.ndarray | None, n_res: int) -> None:
        """Per-modality spectra (image inputs only): the rows of X_ℓ of each sequence's image and text tokens."""
        self.subsets: dict[str, dict[str, np.ndarray]] = {}
        self.subset_rows: dict[int, dict[str, torch.Tensor]] = {}
        if modality is None or self.spectrum_raw is None or not (np.asarray(modality) == IMAGE).any():
            return
        modality = np.asarray(modality)
        n_seq = len(offsets) - 1
        self.cos2_reference = np.full((n_res, len(modality)), np.nan, dtype=np.float32)
        for code, name in ((IMAGE, "image"), (TEXT, "text")):
            counts = [int((modality[offsets[s] : offsets[s + 1]] == code).sum()) for s in range(n_seq)]
            rank = min(max(counts), self.lm.d_model)
            if rank == 0:
                continue
            self.subsets[name] = {
                "spectrum_raw": np.zeros((n_res, n_seq, rank), dtype=np.float64),
                "spectrum_normalized": np.zeros((n_res, n_seq, rank), dtype=np.float64),
                "reference": np.full((n_res, n_seq), -1, dtype=np.int64),
            }
            for s in range(n_seq):
                rows = np.nonzero(modality[offsets[s] : offsets[s + 1]] == code)[0]
                if len(rows):
                    self.subset_rows.setdefault(s, {})[name] = torch.from_numpy(rows.astype(np.int64))

    def _reduce_subsets(self, layer: int, seq: int, start: int, x: torch.Tensor, norms: torch.Tensor) -> None:
        """Both spectra of the image rows and of the text rows of one sequence's X_ℓ, and each subset's
        reference row (largest norm) with every row's cos² to it (the massive-activation bound per subset)."""
        tiny = torch.finfo(x.dtype).tiny
        for name, rows in self.subset_rows.get(seq, {}).items():
            arrays = self.subsets[name]
            index = rows.to(x.device)
            xs, ns = x.index_select(0, index), norms.index_select(0, index)
            r = min(xs.shape[0], xs.shape[1])
            arrays["spectrum_raw"][layer, seq, :r] = squared_singular_values(xs).cpu().numpy()
            arrays["spectrum_normalized"][layer, seq, :r] = (
                squared_singular_values(center_and_normalize_rows(xs)).cpu().numpy()
            )
            ref = int(ns.argmax())
            arrays["reference"][layer, seq] = start + int(rows[ref])
            unit = xs[ref] / ns[ref].clamp_min(tiny)
            cos = (xs @ unit) / ns.clamp_min(tiny)
            self.cos2_reference[layer, start + rows.numpy()] = (cos * cos).cpu().numpy()

    def begin(self, batch: Batch) -> None:
        self.batch = batch

    def attach(self) -> None:
        self.parallel = 1
        if self.background:
            from lens.capture.background import Worker, parallel_threads

            self.parallel = parallel_threads()
            if self.parallel == 1:
                self.worker = Worker(max_pending=2)
        for layer, block in enumerate(self.lm.blocks):
            self.handles.append(block.register_forward_pre_hook(self._pre_hook(layer), with_kwargs=True))
        self.handles.append(self.lm.blocks[-1].register_forward_hook(self._post_hook(self.lm.n_layers)))

    def finish(self) -> None:
        """Wait for the layers still being reduced; raise the first error (e.g. ``NumericalError``)."""
        if self.worker is not None:
            self.worker.drain()

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        worker, self.worker = self.worker, None
        if worker is not None:
            try:
                worker.close()
            except Exception:  # noqa: BLE001 - finish() raised it already, or another error is on its way
                pass

    def _pre_hook(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            self.observe(layer, hidden)

        return hook

    def _post_hook(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self.observe(layer, hidden)

        return hook

    @torch.no_grad()
    def observe(self, layer: int, hidden: torch.Tensor) -> None:
        batch = self.batch
        rows = [(seq, n, start, hidden[row, :n]) for row, (seq, n, start) in
                enumerate(zip(batch.sequences, batch.lengths, batch.starts))]
        if self.parallel > 1:  # the sequences split over single-threaded threads, longest first, dealt in turn
            from lens.capture.background import run_parallel

            rows.sort(key=lambda r: -r[1])
            groups = [[(seq, n, start, x.float()) for seq, n, start, x in rows[i :: self.parallel]]
                      for i in range(min(self.parallel, len(rows)))]
            run_parallel(lambda group: self._reduce(layer, batch.sequences, group), groups)
            return
        if self.worker is None:
            self._reduce(layer, batch.sequences, [(seq, n, start, x.float()) for seq, n, start, x in rows])
            return
        # the model may reuse or modify its hidden-state buffer: the worker gets its own copy
        copies = [(seq, n, start, x.float().clone() if x.dtype == torch.float32 else x.float())
                  for seq, n, start, x in rows]
        self.worker.submit(self._reduce, layer, batch.sequences, copies)

    def _reduce(self, layer: int, sequences: list[int], rows) -> None:
        for seq, n, start, x in rows:
            norms = x.norm(dim=1)
            if not bool(torch.isfinite(norms).all()) and not bool(torch.isfinite(x).all()):
                # (a finite row can have an infinite norm when its squares overflow; only non-finite
                # values themselves are an error)
                raise NumericalError(
                    f"the residual stream entering layer {layer} contains NaN or infinite values for input(s) "
                    f"{sequences}. This usually means the weights are broken or the dtype overflows: "
                    "load the model with dtype='float32', and check the weights with torch.isfinite"
                )
            self.norm[layer, start : start + n] = norms.cpu().numpy()
            tiny = torch.finfo(x.dtype).tiny
            first = x[0] / norms[0].clamp_min(tiny)
            cos = (x @ first) / norms.clamp_min(tiny)
            self.cos2[layer, start : start + n] = (cos * cos).cpu().numpy()
            magnitude = x.abs()
            # the lower middle value for an even count, as torch.median (and Sun et al.'s code) define it
            self.median[layer, seq] = float(lower_median(magnitude.reshape(-1)))
            values, positions, dims = top_magnitudes(x, magnitude, self.top_k)
            kk = values.numel()
            self.top_value[layer, seq, :kk] = values.cpu().numpy()
            self.top_position[layer, seq, :kk] = positions.cpu().numpy()
            self.top_dim[layer, seq, :kk] = dims.cpu().numpy()
            if self.spectrum_raw is not None:
                r = min(n, x.shape[1])
                self.spectrum_raw[layer, seq, :r] = squared_singular_values(x).cpu().numpy()
                self.spectrum_normalized[layer, seq, :r] = (
                    squared_singular_values(center_and_normalize_rows(x)).cpu().numpy()
                )
                if self.subsets:
                    self._reduce_subsets(layer, seq, start, x, norms)
            if layer in self.hidden:
                self.hidden[layer][start : start + n] = x.cpu().numpy()

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "resid.norm": self.norm,
            "resid.cos2_first": self.cos2,
            "resid.median_abs": self.median,
            "resid.top_value": self.top_value,
            "resid.top_position": self.top_position,
            "resid.top_dim": self.top_dim,
        }
        if self.spectrum_raw is not None:
            out["resid.spectrum_raw"] = self.spectrum_raw
            out["resid.spectrum_normalized"] = self.spectrum_normalized
        for name, arrays in self.subsets.items():
            out.update({f"resid.{kind}.{name}": values for kind, values in arrays.items()})
        if self.subsets:
            out["resid.cos2_reference"] = self.cos2_reference
        for layer, values in self.hidden.items():
            out[f"resid.hidden.{layer}"] = values
        return out


def _top_with_ties(values: torch.Tensor, tokens: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest of each column of ``values`` [n, M] and their ``tokens`` (flat run index [n]), [k, M] each,
    ties broken by the lower token — the same set whatever the batching (``torch.topk`` picks among equal values
    arbitrarily: tied BOS activations of a causal model moved between batch sizes). ``topk`` finds the k-th value;
    only columns where more values equal it than fit are re-selected exactly (rare: the extra cost is one compare)."""
    top = values.topk(k, dim=0)
    chosen = tokens[top.indices]
    kth = top.values[-1]
    over = ((values >= kth).sum(0) > k).nonzero().flatten()
    for m in over.tolist():
        column = values[:, m]
        keep = (column >= kth[m]).nonzero().flatten()
        order = torch.argsort(tokens[keep], stable=True)
        keep = keep[order]
        best = column[keep].argsort(descending=True, stable=True)[:k]
        top.values[:, m], chosen[:, m] = column[keep[best]], tokens[keep[best]]
    return top.values, chosen


def top_magnitudes(x: torch.Tensor, magnitude: torch.Tensor, k: int):
    """The ``k`` entries of ``x`` [n, d] largest in magnitude: (signed values, rows, columns), descending.

    ``magnitude`` is ``x.abs()``. Only rows whose largest magnitude reaches the k-th largest row maximum
    can hold one of the k largest entries (k other rows each hold a larger one), so ``topk`` runs over
    those few rows instead of all n·d values (7× less work at T = 2048, d = 768). Ties among equal
    magnitudes may pick different positions than a full ``topk`` would; the values are the same.

    Example: ``top_magnitudes(x, x.abs(), 10)[0]`` → the 10 signed values with the largest |x|.
    """
    n, d = x.shape
    kk = min(k, n * d)
    if n > kk:
        row_max = magnitude.amax(dim=1)
        threshold = row_max.topk(kk).values[-1]
        rows = torch.nonzero(row_max >= threshold).flatten()
    else:
        rows = torch.arange(n, device=x.device)
    top = magnitude.index_select(0, rows).reshape(-1).topk(kk)
    positions = rows[top.indices // d]
    dims = top.indices % d
    return x[positions, dims], positions, dims


class MLPProbe:
    """Per-neuron mean/max/fraction-positive and streaming top-k examples (docs/definitions.md#neuron-activation).

    The activation is read at the input of each block's MLP output projection: after the nonlinearity,
    and after act(gate)·up for gated MLPs. Top-k is merged batch by batch, so memory is
    O(layers · neurons · k) whatever the corpus size.
    """

    def __init__(self, lm, n_tokens: int, top_k: int, tracked: list[tuple[int, int]], *,
                 modality: np.ndarray | None = None):
        self.lm = lm
        self.top_k = top_k
        # image inputs only: the same sums, max and counts over the text tokens and over the image tokens
        has_image = modality is not None and bool((np.asarray(modality) == IMAGE).any())
        self.modality = torch.from_numpy(np.asarray(modality, dtype=np.int64)) if has_image else None
        self.split: dict[str, dict[str, np.ndarray]] = {}
        self.sum: np.ndarray | None = None
        self.sumsq: np.ndarray | None = None
        self.max: np.ndarray | None = None
        self.positive: np.ndarray | None = None
        self.top_value: torch.Tensor | None = None
        self.top_token: torch.Tensor | None = None
        self.tracked = tracked
        self.tracked_values = np.zeros((len(tracked), n_tokens), dtype=np.float32)
        self.batch: Batch | None = None
        self.handles: list = []

    def begin(self, batch: Batch) -> None:
        self.batch = batch

    def attach(self) -> None:
        for layer, module in enumerate(self.lm.mlp_out_modules):
            self.handles.append(module.register_forward_pre_hook(self._hook(layer)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, layer: int):
        def hook(module, args):
            self.observe(layer, args[0])

        return hook

    @torch.no_grad()
    def observe(self, layer: int, act: torch.Tensor) -> None:
        batch = self.batch
        if act.dim() == 2:  # an MLP fed flattened tokens [B·T, M] (e.g. Qwen2-MoE's shared expert)
            act = act.reshape(*batch.mask.shape, act.shape[-1])
        values = act[batch.mask].float()  # [n_real, M], row-major over the batch = flat order
        n_layers, width = self.lm.n_layers, values.shape[1]
        if self.sum is None:
            self.sum = np.zeros((n_layers, width), dtype=np.float64)
            self.sumsq = np.zeros((n_layers, width), dtype=np.float64)
            self.max = np.full((n_layers, width), -np.inf, dtype=np.float32)
            self.positive = np.zeros((n_layers, width), dtype=np.int64)
            self.top_value = torch.full((n_layers, width, self.top_k), -torch.inf)
            self.top_token = torch.full((n_layers, width, self.top_k), -1, dtype=torch.long)
        self.sum[layer] += values.sum(0, dtype=torch.float64).cpu().numpy()
        self.sumsq[layer] += values.double().square().sum(0).cpu().numpy()
        self.max[layer] = np.maximum(self.max[layer], values.max(0).values.cpu().numpy())
        self.positive[layer] += (values > 0).sum(0).cpu().numpy()
        top_values, top_tokens = _top_with_ties(values, batch.flat_index, min(self.top_k, values.shape[0]))
        merged_values = torch.cat([self.top_value[layer], top_values.T.cpu()], dim=1)
        merged_tokens = torch.cat([self.top_token[layer], top_tokens.T.cpu()], dim=1)
        # ties by token (sequence, then position) ascending, whatever the batching: sort by token, then stably by value
        by_token = merged_tokens.masked_fill(merged_tokens < 0, torch.iinfo(torch.long).max).argsort(dim=1, stable=True)
        merged_values, merged_tokens = merged_values.gather(1, by_token), merged_tokens.gather(1, by_token)
        order = merged_values.argsort(dim=1, descending=True, stable=True)[:, : self.top_k]
        self.top_value[layer] = merged_values.gather(1, order)
        self.top_token[layer] = merged_tokens.gather(1, order)
        if self.modality is not None:
            self._observe_split(layer, values, self.modality[batch.flat_index.cpu()])
        for p, (t_layer, neuron) in enumerate(self.tracked):
            if t_layer == layer:
                self.tracked_values[p, batch.flat_index.cpu().numpy()] = values[:, neuron].cpu().numpy()

    def _observe_split(self, layer: int, values: torch.Tensor, codes: torch.Tensor) -> None:
        n_layers, width = self.lm.n_layers, values.shape[1]
        for code, name in ((TEXT, "text"), (IMAGE, "image")):
            part = self.split.setdefault(name, {
                "sum": np.zeros((n_layers, width)), "sumsq": np.zeros((n_layers, width)),
                "max": np.full((n_layers, width), -np.inf, dtype=np.float32),
                "positive": np.zeros((n_layers, width), dtype=np.int64), "count": np.zeros(n_layers, dtype=np.int64)})
            v = values[codes.to(values.device) == code]
            if len(v) == 0:
                continue
            part["sum"][layer] += v.sum(0, dtype=torch.float64).cpu().numpy()
            part["sumsq"][layer] += v.double().square().sum(0).cpu().numpy()
            part["max"][layer] = np.maximum(part["max"][layer], v.max(0).values.cpu().numpy())
            part["positive"][layer] += (v > 0).sum(0).cpu().numpy()
            part["count"][layer] += len(v)

    def arrays(self, n_tokens: int) -> dict[str, np.ndarray]:
        if self.sum is None:
            return {}
        top_value = self.top_value.numpy().astype(np.float32)
        top_token = self.top_token.numpy()
        top_token[~np.isfinite(top_value)] = -1
        top_value[~np.isfinite(top_value)] = np.nan
        out = {
            "mlp.sum": self.sum,
            "mlp.sumsq": self.sumsq,
            "mlp.max": self.max,
            "mlp.positive": self.positive,
            "mlp.count": np.array([n_tokens], dtype=np.int64),
            "mlp.top_value": top_value,
            "mlp.top_token": top_token,
        }
        if self.tracked:
            out["mlp.tracked"] = self.tracked_values
        for name, part in self.split.items():  # mlp.sum.image, mlp.count.text, ...
            out.update({f"mlp.{key}.{name}": value for key, value in part.items()})
        return out
