"""``TokenView``: the text of a sequence with every token coloured by a value."""

from __future__ import annotations

import numpy as np
import traitlets

from lens.errors import ConfigError
from lens.run import Run

from ._base import LensWidget
from ._data import Index, check_index, check_run, f32, u8

__all__ = ["TokenView", "display_tokens"]

_PUNCTUATION = set(".,;:!?)]}%'\"")


def display_tokens(tokens: list[str]) -> tuple[list[str], list[bool]]:
    """Readable text for tokens and whether a space goes before each: byte-level BPE ``Ġ``/SentencePiece
    ``▁`` markers become spaces, WordPiece ``##`` continuations join the previous token.

    Example: ``display_tokens(["[CLS]", "play", "##ing", "."])`` → ``(["[CLS]", "play", "ing", "."], [False, True, False, False])``.
    """
    markers = any(t[:1] in ("Ġ", "▁", " ") for t in tokens)
    texts, spaces = [], []
    for i, token in enumerate(tokens):
        if token[:1] in ("Ġ", "▁", " "):
            text, space = token[1:], True
        elif token.startswith("##"):
            text, space = token[2:], False
        else:
            text, space = token, not markers and not (token and token[0] in _PUNCTUATION)
        text = text.replace("Ċ", "↵").replace("\n", "↵").replace("\t", "⇥")
        texts.append(text if text else "␣")
        spaces.append(space and i > 0)
    return texts, spaces


class TokenView(LensWidget):
    """Text with each token coloured by any per-token value, with a value scale.

    ``values`` has one number per token: either of sequence ``seq`` (T values; the view shows that
    sequence) or of the whole run (N values in ``run.offsets`` order, e.g. a row of
    ``run.arrays["mlp.tracked"]``; a sequence selector then switches between sequences). Signed values get
    a diverging scale centred on 0 (blue negative, red positive, ± max |value|); non-negative ones a
    sequential scale from 0. Colours blend into the page background, so light and dark themes both read.
    NaN values are shown uncoloured. Sequences longer than ``page_size`` tokens (default 1024) are shown a
    page at a time, with an overview strip of the whole sequence (max-pooled per pixel) to jump between
    pages — a 10k-token sequence never puts 10k elements on the page at once.

    Shortcuts: ``TokenView.neuron(run, layer, neuron)`` (needs ``track_neurons=[(layer, neuron)]`` at trace
    time) and ``TokenView.mass(run, layer, head)`` (the mass each token receives).

    Traits Python can read back: ``seq`` and ``token`` (the token clicked or chosen with Enter, −1: none).

    Example::

        run = lens.trace(lm, texts, track_neurons=[(3, 120)])
        lens.widgets.TokenView.neuron(run, 3, 120)
        lens.widgets.TokenView(run, run.arrays["resid.norm"][-1], label="final norm")
    """

    _component = "token_view"
    _selection = ("seq",)
    _float_traits = frozenset({"values"})

    info = traitlets.Dict().tag(sync=True)
    seq = Index(0).tag(sync=True)
    token = Index(-1).tag(sync=True)
    tokens = traitlets.List(traitlets.Unicode(), help="raw tokens of the shown sequence").tag(sync=True)
    display = traitlets.List(traitlets.Unicode(), help="readable token text").tag(sync=True)
    spaces = traitlets.Bytes(help="uint8: a space before the token").tag(sync=True)
    special = traitlets.Bytes(help="uint8: special-token flags").tag(sync=True)
    values = traitlets.Bytes(help="float32 [T]: the value of every token of the shown sequence").tag(sync=True)

    def __init__(self, run: Run, values, seq: int = 0, *, label: str = "value", diverging: bool | None = None,
                 page_size: int = 1024):
        run = check_run(run, "TokenView")
        seq = check_index(seq, run.n_sequences, "seq", f"the run has {run.n_sequences} sequences")
        try:
            array = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"TokenView values must be numbers, one per token; got {type(values).__name__}") from exc
        n_total, n_seq = int(run.offsets[-1]), int(run.lengths[seq])
        if array.ndim != 1 or array.size not in (n_total, n_seq):
            raise ConfigError(
                f"TokenView needs one value per token: {n_seq} for sequence {seq} or {n_total} for the whole run; "
                f"got shape {array.shape}. For example run.arrays['mlp.tracked'][i] or run.mass_received(layer, head, seq)"
            )
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 16:
            raise ConfigError(f"page_size must be an integer ≥ 16; got {page_size!r}")
        whole_run = array.size == n_total
        self._run = run
        self._fixed_seq = None if whole_run else seq
        self._values = array
        self._whole_run = whole_run
        finite = array[np.isfinite(array)]
        lo = float(finite.min()) if finite.size else 0.0
        hi = float(finite.max()) if finite.size else 0.0
        if diverging is None:
            diverging = lo < 0 < hi
        if diverging:
            bound = max(abs(lo), abs(hi)) or 1.0
            vmin, vmax = -bound, bound
        else:
            vmin, vmax = min(lo, 0.0), (hi if hi > min(lo, 0.0) else min(lo, 0.0) + 1.0)
        prov = run.provenance
        info = {
            "model": str(prov.get("model_id", "?")),
            "label": str(label),
            "diverging": bool(diverging),
            "vmin": vmin,
            "vmax": vmax,
            "n_sequences": run.n_sequences if whole_run else 1,
            "fixed_seq": None if whole_run else seq,
            "lengths": [int(n) for n in run.lengths],
            "texts": [t[:80] if isinstance(t, str) else None for t in run.texts],
            "page_size": page_size,
        }
        super().__init__(info=info, seq=seq)

    @classmethod
    def decoding(cls, run: Run, stat: str = "sink_mass", layer: int | None = None, seq: int = 0, **kwargs) -> "TokenView":
        """The generated text of a ``lens.generate`` run, each generated token coloured by a per-step
        statistic: ``"sink_mass"``, ``"window_mass"``, ``"first_mass"`` (mean over heads; over layers
        1..L−1 unless ``layer`` is given), ``"massive_ratio"`` (largest over layers) or ``"chosen_logprob"``.
        Prompt tokens are left uncoloured.

        Example: ``TokenView.decoding(lens.generate(lm, "Once upon a time", 30), "window_mass")``.
        """
        run = check_run(run, "TokenView.decoding")
        if not run.has("gen.offsets"):
            raise ConfigError("TokenView.decoding needs a run from lens.generate (it has per-step statistics)")
        a = run.arrays
        per_step = {
            "chosen_logprob": lambda: a["gen.chosen_logprob"],
            "massive_ratio": lambda: np.nanmax(np.abs(a["gen.top_value"]) / np.where(a["gen.median_abs"] > 0, a["gen.median_abs"], np.nan), axis=0),
        }
        if stat in ("sink_mass", "window_mass", "first_mass"):
            values = a[f"gen.{stat}"]
            values = values[layer] if layer is not None else values[1:] if values.shape[0] > 1 else values
            step_values = values.reshape(-1, values.shape[-1]).mean(axis=0)
        elif stat in per_step:
            step_values = per_step[stat]()
        else:
            raise ConfigError(f"stat must be one of sink_mass, window_mass, first_mass, massive_ratio, chosen_logprob; got {stat!r}")
        values = np.full(int(run.offsets[-1]), np.nan)
        steps = np.repeat(np.arange(run.n_sequences), np.diff(a["gen.offsets"]))
        values[run.offsets[steps] + a["gen.position"]] = step_values
        label = stat.replace("_", " ") + (f" (layer {layer})" if layer is not None else "")
        return cls(run, values, seq, label=kwargs.pop("label", label), **kwargs)

    @classmethod
    def neuron(cls, run: Run, layer: int, neuron: int, seq: int = 0, **kwargs) -> "TokenView":
        """The activation of one tracked MLP neuron on every token (after the nonlinearity, docs/definitions.md).

        Example: ``TokenView.neuron(lens.trace(lm, texts, track_neurons=[(2, 5)]), 2, 5)``.
        """
        run = check_run(run, "TokenView.neuron")
        tracked = [tuple(int(x) for x in pair) for pair in run.meta.get("tracked_neurons", [])]
        if (int(layer), int(neuron)) not in tracked or not run.has("mlp.tracked"):
            raise ConfigError(
                f"neuron ({layer}, {neuron}) was not tracked in this run (tracked: {tracked or 'none'}); trace with "
                f"lens.trace(model, inputs, track_neurons=[({layer}, {neuron})])"
            )
        row = run.arrays["mlp.tracked"][tracked.index((int(layer), int(neuron)))]
        kwargs.setdefault("label", f"neuron {neuron} of layer {layer} (MLP activation)")
        return cls(run, row, seq, **kwargs)

    @classmethod
    def mass(cls, run: Run, layer: int, head: int, seq: int = 0, **kwargs) -> "TokenView":
        """The mass each token receives from one head (``run.mass_received``, docs/definitions.md), for every sequence.

        Example: ``TokenView.mass(run, 0, 3)``.
        """
        run = check_run(run, "TokenView.mass")
        run.require("attn.key_mass", "attn.query_count", what="TokenView.mass")
        check_index(layer, run.n_layers, "layer", "layers of the run")
        check_index(head, run.n_heads, "head", "heads of the run")
        values = np.concatenate([run.mass_received(layer, head, s) for s in range(run.n_sequences)])
        kwargs.setdefault("label", f"mass received (layer {layer}, head {head})")
        return cls(run, values, seq, **kwargs)

    @traitlets.validate("seq")
    def _check_seq(self, proposal):
        return self._checked_seq(proposal["value"])

    def _checked_seq(self, seq):
        if self._fixed_seq is not None and seq != self._fixed_seq:
            raise ConfigError(
                f"this TokenView was given values for sequence {self._fixed_seq} only; pass one value per token "
                "of the whole run to switch sequences"
            )
        return check_index(seq, self._run.n_sequences, "seq", f"the run has {self._run.n_sequences} sequences")

    def _validate_selection(self, selection):
        self._checked_seq(selection["seq"])

    def _derive(self, selection, hints):
        run, seq = self._run, selection["seq"]
        sl = run.span(seq)
        values = self._values[sl] if self._whole_run else self._values
        tokens = run.token_labels(seq)
        texts, spaces = display_tokens(tokens)
        return {
            "tokens": tokens,
            "display": texts,
            "spaces": u8(spaces),
            "special": u8(run.arrays["special"][sl]),
            "values": f32(values),
        }

    def _export_selections(self):
        seqs = range(self._run.n_sequences) if self._whole_run else [self._fixed_seq]
        return [{"seq": s} for s in seqs]

    def _default_title(self) -> str:
        return f"lens — {self.info.get('label', 'tokens')}"
