"""Interventions: ablate, clamp, patch and re-weight attention during ``lens.trace`` (and ``lens.generate``).

Observing a sink or a valley says *where*; intervening says *why* — Queipo-de-Llano et al. (2025) remove
the first token's MLP output in an early layer and the massive activation, the attention sinks and the
compression valley disappear together. lens offers a small declarative set, applied on the deployed path
(whatever attention kernel and weight format the model runs) and recorded in every run's provenance:

==============================================  ===========================================================
intervention                                    what it does (X_ℓ = the residual stream entering block ℓ)
==============================================  ===========================================================
``Ablate("mlp", layer, positions)``             the MLP's output of block ℓ → 0, or its mean (``kind="mean"``)
``Ablate("head", layer, head, positions)``      one attention head's output (before the output projection)
``Ablate("resid", layer, positions)``           X_ℓ itself (``layer = L``: the last block's output)
``Clamp(layer, dims, value, positions)``        X_ℓ[:, dims] := value (e.g. the massive-activation dims)
``Patch(source_run, layer, positions)``         X_ℓ := the source run's X_ℓ (activation patching)
``ScaleAttention(layer, heads, keys, factor)``  A[q, k] := factor · A[q, k] for the chosen keys, inside the
                                                attention function (renormalized by default), dense or sparse
==============================================  ===========================================================

``positions`` are token positions within each sequence (negative counts from each sequence's end: ``-1`` is
the last real token); None means every real token. ``kind="mean"`` replaces by the mean over the
sequence's real tokens of the same activation (computed in the same forward pass, so it does not depend on
how sequences were batched), or pass ``value=`` (a scalar or a vector of the activation's width).

Example::

    clean = lens.trace(lm, texts)
    ablated = lens.trace(lm, texts, interventions=[lens.Ablate("mlp", layer=11, positions=[0])])
    lens.compare(clean, ablated).to_frame()

Every intervention is checked against the model before anything runs; a layer, head, position or dimension
that does not exist, or a patch between runs of different inputs or models, raises ``ConfigError`` naming
the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from lens.errors import ConfigError
from lens.run import Run

__all__ = ["Ablate", "Clamp", "Patch", "ScaleAttention", "Intervention", "Interventions", "from_description",
           "is_positional"]

_SITES = ("mlp", "head", "resid")


def _ints(value, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    try:
        items = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be an int or a list of ints; got {value!r}") from exc
    if not items:
        raise ConfigError(f"{what} is empty; give at least one, or None for all")
    return items


@dataclass(frozen=True)
class Ablate:
    """Replace an activation by zero, by its mean over the sequence, or by a given value.

    ``site``: ``"mlp"`` (the MLP block's output, [T, d]), ``"head"`` (one attention head's output before
    the output projection, [T, d_head]; give ``head``), or ``"resid"`` (X_ℓ, [T, d]). ``layer``: the block
    (0..L−1; for ``"resid"`` 0..L). ``positions``: token positions (None: all real tokens). ``kind``:
    ``"zero"`` or ``"mean"``; ``value``: a scalar or a vector of the activation's width instead.

    Example: ``lens.Ablate("mlp", layer=11, positions=[0])`` — the Queipo-de-Llano et al. (2025) ablation.
    """

    site: str
    layer: int
    head: int | Sequence[int] | None = None
    positions: int | Sequence[int] | None = None
    kind: str = "zero"
    value: Any = None

    def describe(self) -> dict:
        return _describe(self, "ablate")


@dataclass(frozen=True)
class Clamp:
    """Set chosen dimensions of the residual stream X_ℓ to a value (e.g. the massive-activation dims).

    ``dims``: hidden dimensions; ``value``: a scalar or one value per dim; ``positions``: as in ``Ablate``.

    Example: ``lens.Clamp(layer=12, dims=[406], value=0.0, positions=[0])``.
    """

    layer: int
    dims: int | Sequence[int]
    value: float | Sequence[float] = 0.0
    positions: int | Sequence[int] | None = None

    def describe(self) -> dict:
        return _describe(self, "clamp")


@dataclass(frozen=True)
class Patch:
    """Activation patching: replace X_ℓ at chosen positions by the same positions' X_ℓ of another Run.

    ``source``: a Run of the same model traced with ``keep_hidden=[layer]``. With the same inputs,
    ``positions`` (None: all) are patched position for position; for different inputs give
    ``source_positions`` (same length as ``positions``): sequence s of this trace takes from sequence s
    of the source.

    Example::

        corrupt = lens.trace(lm, ["The Eiffel Tower is in Rome"], keep_hidden=[6])
        lens.trace(lm, ["The Eiffel Tower is in Paris"], interventions=[lens.Patch(corrupt, 6, positions=[-1],
                   source_positions=[-1])])
    """

    source: Run
    layer: int
    positions: int | Sequence[int] | None = None
    source_positions: int | Sequence[int] | None = None

    def describe(self) -> dict:
        out = {"type": "patch", "layer": int(self.layer), "positions": _ints(self.positions, "positions"),
               "source_positions": _ints(self.source_positions, "source_positions")}
        prov = self.source.provenance
        out["source"] = {"model_id": prov.get("model_id"), "input_sha256": prov.get("input_sha256"),
                         "created": prov.get("created")}
        return out


@dataclass(frozen=True)
class ScaleAttention:
    """Scale the attention probability of chosen keys inside the attention function (dense or sparse).

    A[q, k] := factor · A[q, k] for k in ``keys``, for the chosen ``heads`` (None: all) of ``layer``; with
    ``renormalize=True`` (default) each row is renormalized to sum to 1 — implemented as an additive
    bias log(factor) on those keys' scores, so every kernel (SDPA, the streaming statistics kernel, the
    sparse kernels) computes exactly the renormalized attention; ``factor=0`` removes the keys (a query
    left with no key outputs zeros). With ``renormalize=False`` the chosen keys' values are scaled instead
    (Σ_k A'[q, k] < 1). The statistics lens records are those of the probabilities the kernel used.

    Example: ``lens.ScaleAttention(layer=14, keys=[0], factor=0.0)`` — take the sink's share away.
    """

    layer: int
    heads: int | Sequence[int] | None = None
    keys: int | Sequence[int] = (0,)
    factor: float = 0.0
    renormalize: bool = True

    def describe(self) -> dict:
        return _describe(self, "scale_attention")


Intervention = Ablate | Clamp | Patch | ScaleAttention


_BY_TYPE = {"ablate": Ablate, "clamp": Clamp, "patch": Patch, "scale_attention": ScaleAttention}


def from_description(description: dict):
    """The intervention a ``describe()`` dict stands for (a run's provenance, a scan's manifest).

    ``Patch`` cannot be rebuilt (its source run is not in the description): ``ConfigError``.

    Example: ``from_description(lens.Ablate("mlp", 3).describe()) == lens.Ablate("mlp", 3)``.
    """
    kind = description.get("type") if isinstance(description, dict) else None
    if kind not in _BY_TYPE or kind == "patch":
        raise ConfigError(f"not a description of an Ablate, Clamp or ScaleAttention: {description!r}")
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in description.items() if k != "type"}
    return _BY_TYPE[kind](**fields)


def is_positional(spec) -> bool:
    """Whether the intervention's effect depends on token positions or on the whole sequence (positions,
    keys, or a mean over the sequence) — in a corpus scan, those need every document in one window."""
    if isinstance(spec, ScaleAttention):
        return True
    return getattr(spec, "positions", None) is not None or getattr(spec, "kind", None) == "mean"


def _describe(obj, kind: str) -> dict:
    out: dict[str, Any] = {"type": kind}
    for name in obj.__dataclass_fields__:
        value = getattr(obj, name)
        if isinstance(value, (np.ndarray, torch.Tensor)):
            value = np.asarray(value).tolist()
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------


def _check_layer(layer, lo: int, hi: int, what: str) -> int:
    if not isinstance(layer, (int, np.integer)) or not lo <= int(layer) <= hi:
        raise ConfigError(f"{what} names layer {layer!r}; this model's valid layers are {lo}..{hi}")
    return int(layer)


def _check_positions(positions, lengths: np.ndarray, what: str) -> tuple[int, ...] | None:
    items = _ints(positions, what)
    if items is None:
        return None
    shortest = int(lengths.min())
    for p in items:
        if not -shortest <= p < shortest:
            raise ConfigError(
                f"{what} names position {p}, but the shortest input has {shortest} tokens (valid: "
                f"{-shortest}..{shortest - 1}); pick positions every input has, or trace inputs separately"
            )
    return items


def _check_value(value, width: int, what: str):
    if value is None:
        return None
    v = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != width):
        raise ConfigError(f"{what} value must be a scalar or a vector of {width} numbers; got shape {tuple(v.shape)}")
    if not bool(torch.isfinite(v).all()):
        raise ConfigError(f"{what} value must be finite")
    return v


@dataclass
class _Resolved:
    spec: Any
    layer: int
    positions: tuple[int, ...] | None
    heads: tuple[int, ...] | None = None
    dims: tuple[int, ...] | None = None
    value: torch.Tensor | None = None
    kind: str = "zero"
    source: np.ndarray | None = None  # patch: [N_source, d] hidden states
    source_offsets: np.ndarray | None = None
    source_positions: tuple[int, ...] | None = None
    keys: tuple[int, ...] = ()
    extra: dict = field(default_factory=dict)


def _resolve(spec, lm, lengths: np.ndarray, token_ids: list[list[int]]) -> _Resolved:
    L = lm.n_layers
    if isinstance(spec, Ablate):
        if spec.site not in _SITES:
            raise ConfigError(f"Ablate site must be one of {_SITES}; got {spec.site!r}")
        if spec.kind not in ("zero", "mean"):
            raise ConfigError(f"Ablate kind must be 'zero' or 'mean'; got {spec.kind!r}")
        top = L if spec.site == "resid" else L - 1
        layer = _check_layer(spec.layer, 0, top, f"Ablate({spec.site!r})")
        positions = _check_positions(spec.positions, lengths, "Ablate positions")
        heads = None
        width = lm.d_model
        if spec.site == "head":
            heads = _ints(spec.head, "Ablate head")
            if heads is None:
                raise ConfigError("Ablate('head', ...) needs head=<index> (or a list of heads)")
            for h in heads:
                if not 0 <= h < lm.n_heads:
                    raise ConfigError(f"Ablate names head {h}; this model's heads are 0..{lm.n_heads - 1}")
            width = int(getattr(lm.text_config, "head_dim", None) or lm.d_model // lm.n_heads)
        elif spec.head is not None:
            raise ConfigError(f"Ablate({spec.site!r}) takes no head; use site='head' to ablate one head")
        value = _check_value(spec.value, width, "Ablate")
        if value is not None and spec.kind == "mean":
            raise ConfigError("Ablate takes either kind='mean' or value=..., not both")
        return _Resolved(spec, layer, positions, heads=heads, value=value, kind="value" if value is not None else spec.kind)
    if isinstance(spec, Clamp):
        layer = _check_layer(spec.layer, 0, L, "Clamp")
        dims = _ints(spec.dims, "Clamp dims")
        for d in dims:
            if not 0 <= d < lm.d_model:
                raise ConfigError(f"Clamp names dimension {d}; this model's residual dims are 0..{lm.d_model - 1}")
        value = torch.as_tensor(np.asarray(spec.value, dtype=np.float32))
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != len(dims)) or not bool(torch.isfinite(value).all()):
            raise ConfigError(f"Clamp value must be one finite number or one per dim ({len(dims)}); got {spec.value!r}")
        return _Resolved(spec, layer, _check_positions(spec.positions, lengths, "Clamp positions"), dims=dims, value=value)
    if isinstance(spec, Patch):
        return _resolve_patch(spec, lm, lengths, token_ids)
    if isinstance(spec, ScaleAttention):
        layer = _check_layer(spec.layer, 0, L - 1, "ScaleAttention")
        heads = _ints(spec.heads, "ScaleAttention heads")
        for h in heads or ():
            if not 0 <= h < lm.n_heads:
                raise ConfigError(f"ScaleAttention names head {h}; this model's heads are 0..{lm.n_heads - 1}")
        keys = _check_positions(spec.keys, lengths, "ScaleAttention keys")
        if keys is None:
            raise ConfigError("ScaleAttention needs keys=[positions] (e.g. keys=[0] for the first token)")
        factor = float(spec.factor)
        if not (math.isfinite(factor) and factor >= 0):
            raise ConfigError(f"ScaleAttention factor must be a finite number ≥ 0; got {spec.factor!r}")
        return _Resolved(spec, layer, None, heads=heads, keys=keys, extra={"factor": factor})
    raise ConfigError(
        f"interventions must be lens.Ablate, lens.Clamp, lens.Patch or lens.ScaleAttention objects; got {type(spec).__name__}"
    )


def _resolve_patch(spec: Patch, lm, lengths: np.ndarray, token_ids: list[list[int]]) -> _Resolved:
    if not isinstance(spec.source, Run):
        raise ConfigError(f"Patch source must be a lens Run; got {type(spec.source).__name__}")
    layer = _check_layer(spec.layer, 0, lm.n_layers, "Patch")
    src = spec.source
    prov = src.provenance
    if prov.get("model_id") != lm.model_id or src.meta.get("d_model") != lm.d_model or src.n_layers != lm.n_layers:
        raise ConfigError(
            f"Patch source was traced with {prov.get('model_id')!r} ({src.n_layers} layers, d {src.meta.get('d_model')}), "
            f"not {lm.model_id!r} ({lm.n_layers} layers, d {lm.d_model}); patch between runs of the same model"
        )
    key = f"resid.hidden.{layer}"
    if key not in src.arrays:
        raise ConfigError(f"Patch source has no hidden states of layer {layer}; trace it with keep_hidden=[{layer}]")
    if src.n_sequences != len(lengths):
        raise ConfigError(
            f"Patch source has {src.n_sequences} sequences but this trace has {len(lengths)}; sequence s is patched "
            "from source sequence s, so give both the same number of inputs"
        )
    positions = _check_positions(spec.positions, lengths, "Patch positions")
    source_positions = _check_positions(spec.source_positions, src.lengths, "Patch source_positions")
    if source_positions is None:
        same = [list(map(int, src.arrays["token_ids"][src.span(s)])) == list(ids) for s, ids in enumerate(token_ids)]
        if not all(same):
            raise ConfigError(
                "Patch source was traced on different inputs; give source_positions=[...] (one per patched position) "
                "to say which source token each patched position takes"
            )
    elif positions is None or len(positions) != len(source_positions):
        raise ConfigError("Patch needs positions and source_positions of the same length when inputs differ")
    return _Resolved(spec, layer, positions, source=src.arrays[key], source_offsets=src.offsets,
                     source_positions=source_positions)


# ---------------------------------------------------------------------------------------------------------
# Applying them during a forward pass
# ---------------------------------------------------------------------------------------------------------


def _positions_mask(positions: tuple[int, ...] | None, lengths: list[int], real: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the chosen positions of every row (negative: from the row's end), real tokens only."""
    if positions is None:
        return real.clone()
    out = torch.zeros_like(real)
    for row, n in enumerate(lengths):
        for p in positions:
            out[row, p if p >= 0 else n + p] = True
    return out & real


def _replace(x: torch.Tensor, where: torch.Tensor, item: _Resolved, real: torch.Tensor, cols=None) -> torch.Tensor:
    """x [B, T, W] (or its ``cols``) at ``where`` [B, T] := 0 / the row's mean over real tokens / a value."""
    x = x.clone()
    view = x if cols is None else x[..., cols]
    if item.kind == "zero":
        new = torch.zeros_like(view)
    elif item.kind == "mean":
        weights = real.to(view.dtype)[..., None]
        mean = (view * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        new = mean.expand_as(view)
    else:
        new = item.value.to(view.dtype).to(view.device).expand_as(view)
    view = torch.where(where[..., None], new, view)
    if cols is None:
        return view
    x[..., cols] = view
    return x


class Interventions:
    """The resolved interventions of one trace: forward hooks for the residual stream and MLP outputs, and
    the attention edits the lens attention function applies (head outputs, attention scaling).

    Built by ``lens.trace``; ``attach`` before the probes' hooks (so that probes observe the intervened
    model), ``begin(batch)`` for every batch, ``detach`` at the end. ``describe()`` goes to provenance.
    """

    def __init__(self, lm, specs, lengths: np.ndarray, token_ids: list[list[int]]):
        self.lm = lm
        self.items = [_resolve(spec, lm, lengths, token_ids) for spec in specs]
        self.handles: list = []
        self.batch = None
        self._masks: dict[int, torch.Tensor] = {}
        self._pending: torch.Tensor | None = None  # [B, H, Tq] queries a ScaleAttention left with no key
        self.d_head = int(getattr(lm.text_config, "head_dim", None) or lm.d_model // lm.n_heads)

    def __bool__(self) -> bool:
        return bool(self.items)

    def describe(self) -> list[dict]:
        return [item.spec.describe() for item in self.items]

    # -- lifecycle ---------------------------------------------------------------------------------------
    def attach(self) -> None:
        L = self.lm.n_layers
        for i, item in enumerate(self.items):
            spec = item.spec
            if isinstance(spec, (Clamp, Patch)) or (isinstance(spec, Ablate) and spec.site == "resid"):
                if item.layer < L:
                    hook = self._resid_pre_hook(i)
                    self.handles.append(self.lm.blocks[item.layer].register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    self.handles.append(self.lm.blocks[-1].register_forward_hook(self._resid_post_hook(i)))
            elif isinstance(spec, Ablate) and spec.site == "mlp":
                self.handles.append(self.lm.mlp_out_modules[item.layer].register_forward_hook(self._mlp_hook(i)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def begin(self, batch) -> None:
        self.batch = batch
        real = batch.mask
        self._masks = {
            i: _positions_mask(item.positions, batch.lengths, real)
            for i, item in enumerate(self.items)
            if not isinstance(item.spec, ScaleAttention)
        }

    # -- the residual stream and MLP outputs -------------------------------------------------------------
    def _edit_resid(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        item, where, real = self.items[i], self._masks[i], self.batch.mask
        spec = item.spec
        if isinstance(spec, Ablate):
            return _replace(hidden, where, item, real)
        if isinstance(spec, Clamp):
            hidden = hidden.clone()
            dims = list(item.dims)
            value = item.value.to(hidden.dtype).to(hidden.device)
            current = hidden[..., dims]
            hidden[..., dims] = torch.where(where[..., None], value.expand_as(current), current)
            return hidden
        return self._patch(item, where, hidden)

    def _patch(self, item: _Resolved, where: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.clone()
        batch = self.batch
        for row, (seq, n) in enumerate(zip(batch.sequences, batch.lengths)):
            start = int(item.source_offsets[seq])
            src_len = int(item.source_offsets[seq + 1]) - start
            if item.source_positions is None:
                targets = torch.nonzero(where[row]).flatten().tolist()
                sources = targets
            else:
                targets = [p if p >= 0 else n + p for p in item.positions]
                sources = [p if p >= 0 else src_len + p for p in item.source_positions]
            for t, s in zip(targets, sources):
                hidden[row, t] = torch.as_tensor(item.source[start + s], dtype=hidden.dtype, device=hidden.device)
        return hidden

    def _resid_pre_hook(self, i: int):
        def hook(module, args, kwargs):
            if args:
                return (self._edit_resid(i, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._edit_resid(i, kwargs["hidden_states"])
            return args, kwargs

        return hook

    def _resid_post_hook(self, i: int):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):
                return type(output)((self._edit_resid(i, output[0]), *output[1:]))
            return self._edit_resid(i, output)

        return hook

    def _mlp_hook(self, i: int):
        def hook(module, args, output):
            return _replace(output, self._masks[i], self.items[i], self.batch.mask)

        return hook

    # -- inside the attention function (lens.models.observers.AttentionEdit) ------------------------------
    def _targets(self, module, kind):
        layer = self.lm.layer_of_attention.get(id(module))
        if layer is None:
            return []
        return [(i, it) for i, it in enumerate(self.items) if isinstance(it.spec, kind) and it.layer == layer]

    def edit_inputs(self, module, query, key, value, attention_mask, is_causal):
        targets = self._targets(module, ScaleAttention)
        if not targets:
            return attention_mask, key, value
        batch, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        device = query.device
        lengths = self.batch.lengths
        for i, item in targets:
            chosen = torch.zeros(batch, heads, 1, k_len, dtype=torch.bool, device=device)
            head_index = list(item.heads) if item.heads is not None else list(range(heads))
            for row, n in enumerate(lengths):
                cols = [k if k >= 0 else n + k for k in item.keys]
                for h in head_index:
                    chosen[row, h, 0, cols] = True
            factor = item.extra["factor"]
            if item.spec.renormalize:
                attention_mask = self._scaled_mask(i, attention_mask, chosen, factor, query, k_len, is_causal)
            else:
                group = heads // value.shape[1]
                if group > 1:  # per-head weights: give every query head its own copy of K and V
                    key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
                weight = torch.where(chosen[:, :, 0, :, None], torch.tensor(factor, dtype=value.dtype, device=device),
                                     torch.ones((), dtype=value.dtype, device=device))
                value = value * weight
        return attention_mask, key, value

    def _scaled_mask(self, i, attention_mask, chosen, factor, query, k_len, is_causal):
        batch, heads, q_len, _ = query.shape
        device, dtype = query.device, query.dtype
        floor = torch.finfo(dtype).min
        if attention_mask is None:
            allowed = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=device)
            if is_causal:
                offset = k_len - q_len
                allowed = (torch.arange(k_len, device=device)[None, :] <= torch.arange(q_len, device=device)[:, None] + offset)[None, None]
            bias = torch.zeros((), dtype=dtype, device=device)
        elif attention_mask.dtype == torch.bool:
            allowed, bias = attention_mask[..., -q_len:, -k_len:], torch.zeros((), dtype=dtype, device=device)
        else:
            mask = attention_mask[..., -q_len:, -k_len:].to(dtype)
            allowed, bias = mask > floor / 2, torch.where(mask > floor / 2, mask, torch.zeros((), dtype=dtype, device=device))
        if factor == 0:
            new_allowed = allowed & ~chosen
            extra = torch.zeros((), dtype=dtype, device=device)
        else:
            new_allowed = allowed.expand(batch, heads, q_len, k_len)
            extra = torch.where(chosen, torch.tensor(math.log(factor), dtype=dtype, device=device),
                                torch.zeros((), dtype=dtype, device=device))
        # queries whose every allowed key was removed attend to nothing: their output is zero on every kernel
        had = allowed.any(-1).expand(batch, heads, q_len)
        emptied = had & ~new_allowed.any(-1)
        self._pending = emptied if self._pending is None else self._pending | emptied
        return torch.where(new_allowed, bias + extra, torch.tensor(floor, dtype=dtype, device=device))

    def edit_output(self, module, out):
        emptied, self._pending = self._pending, None
        if emptied is not None and bool(emptied.any()):
            out = out.masked_fill(emptied.transpose(1, 2)[..., None], 0.0)
        for i, item in self._targets(module, Ablate):
            if item.spec.site != "head":
                continue
            where = self._masks[i]
            for h in item.heads:
                out = out.clone()
                out[:, :, h] = _replace(out[:, :, h], where, item, self.batch.mask)
        return out
