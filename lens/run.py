"""``Run``: what one ``lens.trace`` observed — numpy arrays, tokens and provenance — saved without pickle.

Layout (N = total real tokens over all sequences, S = sequences, L = layers, H = heads; sequences are
stored back to back and ``offsets[s]:offsets[s+1]`` selects sequence ``s``):

| array | shape | meaning (docs/definitions.md) |
|---|---|---|
| token_ids | [N] int64 | token ids |
| offsets | [S+1] int64 | sequence boundaries |
| special | [N] bool | special tokens ([CLS], [SEP], BOS, …) |
| attn.key_mass | [L, H, N] f32 | Σ_{q∈Q_k} A[ℓ,h,q,k] — unnormalized column sum |
| attn.query_count | [L, N] f32 | the size of Q_k: valid queries allowed to attend key k |
| attn.kept_fraction | [L, S, H] f32 | computed fraction of allowed blocks (sparse kernels only) |
| resid.norm | [L+1, N] f32 | ‖X_ℓ[t]‖₂ |
| resid.cos2_first | [L+1, N] f32 | cos² of the angle between X_ℓ[t] and X_ℓ[first token] |
| resid.median_abs | [L+1, S] f32 | median of abs(X_ℓ) over the sequence |
| resid.top_value | [L+1, S, K] f32 | the K entries of X_ℓ largest in magnitude (signed values) … |
| resid.top_position | [L+1, S, K] int64 | … their token positions within the sequence … |
| resid.top_dim | [L+1, S, K] int64 | … and hidden dimensions |
| resid.spectrum_raw | [L+1, S, R] f64 | σ_j² of X_ℓ, descending, zero-padded to R = max min(T, d) |
| resid.spectrum_normalized | [L+1, S, R] f64 | eigenvalues of the Gram of centered, row-normalized X_ℓ |
| resid.hidden.<ℓ> | [N, d] f32 | X_ℓ itself (only for layers passed to keep_hidden) |
| mlp.sum / mlp.max | [L, M] | per-neuron Σ and max of the activation over all tokens |
| mlp.sumsq | [L, M] f64 | per-neuron Σ of the squared activation (for the variance) |
| mlp.positive | [L, M] int64 | tokens with activation > 0 |
| mlp.top_value | [L, M, K] f32 | streaming top-K activations per neuron … |
| mlp.top_token | [L, M, K] int64 | … and their flat token index (−1: none) |
| mlp.tracked | [P, N] f32 | per-token activation of the neurons in meta["tracked_neurons"] |
| moe.layers | [Lm] int64 | the MoE layers (mixture-of-experts models; capture "router") |
| moe.probs | [Lm, N, E] f32 | router probabilities r[t, e] = softmax over experts |
| moe.experts / moe.gates | [Lm, N, k] | the experts the model selected per token and their gates |
| pattern.<ℓ>.<h> | [Σ T_s²] f32 | full attention patterns kept on request, row-major per sequence |
| logits.logprobs | [N, V] f32 | next-token log-probabilities (capture "logits", causal LMs) |

X_ℓ is the residual stream entering block ℓ; X_L is the last block's output (before any final norm).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lens.atomic import atomic_path
from lens.errors import RunFormatError

__all__ = ["Run", "SCHEMA"]

SCHEMA = "lens.run/1"
_META_KEY = "lens"


@dataclass
class Run:
    """The result of ``lens.trace``: arrays (see the module docstring), per-sequence tokens, and ``meta``.

    ``meta`` holds the provenance (model id and revision, attention kernel and parameters, quantization,
    dtype, versions, input hash, trace options) and the model shape (``n_layers``, ``n_heads``, ``d_model``,
    ``causal``).

    Example::

        run = lens.trace(lens.load(), ["The cat sat.", "Dogs bark loudly."])
        run.n_sequences, run.lengths        # 2, array([6, 6])
        run.tokens[0]                       # ['[CLS]', 'the', 'cat', 'sat', '.', '[SEP]']
        run.save("cats.lens")
        lens.Run.load("cats.lens")
    """

    arrays: dict[str, np.ndarray]
    tokens: list[list[str]]
    meta: dict[str, Any] = field(default_factory=dict)

    # -- shape -------------------------------------------------------------------------------------
    @property
    def offsets(self) -> np.ndarray:
        return self.arrays["offsets"]

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.meta["n_heads"])

    @property
    def causal(self) -> bool:
        return bool(self.meta["causal"])

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta.get("provenance", {})

    @property
    def texts(self) -> list[str | None]:
        return self.meta.get("texts", [None] * self.n_sequences)

    def has(self, name: str) -> bool:
        """Whether an array was captured, e.g. ``run.has("attn.key_mass")``."""
        return name in self.arrays

    def span(self, seq: int) -> slice:
        """The flat-token slice of sequence ``seq``: ``run.arrays["resid.norm"][:, run.span(0)]``."""
        if not 0 <= seq < self.n_sequences:
            raise IndexError(f"sequence {seq} does not exist; this run has {self.n_sequences}")
        return slice(int(self.offsets[seq]), int(self.offsets[seq + 1]))

    def require(self, *names: str, what: str = "this analysis") -> None:
        missing = [n for n in names if n not in self.arrays]
        if missing:
            raise RunFormatError(
                f"{what} needs {', '.join(missing)}, which this run did not capture; trace again with the "
                "default capture=('attention', 'residual', 'mlp')"
            )

    # -- convenient views -------------------------------------------------------------------------
    def mass_received(self, layer: int, head: int, seq: int = 0) -> np.ndarray:
        """m[ℓ,h,k] = (1/|Q_k|) Σ_{q∈Q_k} A[ℓ,h,q,k] for every key k of one sequence (docs/definitions.md)."""
        self.require("attn.key_mass", "attn.query_count", what="mass_received")
        sl = self.span(seq)
        col = self.arrays["attn.key_mass"][layer, head, sl]
        count = self.arrays["attn.query_count"][layer, sl]
        return np.divide(col, count, out=np.zeros_like(col), where=count > 0)

    def pattern(self, layer: int, head: int, seq: int = 0) -> np.ndarray:
        """The full [T, T] attention pattern of one head, if the trace kept it (``keep_patterns=``)."""
        key = f"pattern.{layer}.{head}"
        if key not in self.arrays:
            kept = sorted(k for k in self.arrays if k.startswith("pattern."))
            raise KeyError(
                f"layer {layer} head {head} was not kept; trace with keep_patterns=[({layer}, {head})]"
                + (f" (kept: {', '.join(kept[:8])}{'…' if len(kept) > 8 else ''})" if kept else "")
            )
        lengths = self.lengths
        starts = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) ** 2)])
        t = int(lengths[seq])
        return self.arrays[key][starts[seq] : starts[seq] + t * t].reshape(t, t)

    def kept_patterns(self) -> list[tuple[int, int]]:
        """(layer, head) pairs whose full patterns were kept."""
        pairs = []
        for key in self.arrays:
            if key.startswith("pattern."):
                _, layer, head = key.split(".")
                pairs.append((int(layer), int(head)))
        return sorted(pairs)

    def to_frame(self):
        """One row per token: sequence, position, token, id, special flag.

        Example: ``run.to_frame().query("special")``.
        """
        import pandas as pd

        seq = np.repeat(np.arange(self.n_sequences), self.lengths)
        pos = np.concatenate([np.arange(n) for n in self.lengths]) if self.n_sequences else np.array([], int)
        return pd.DataFrame(
            {
                "sequence": seq,
                "position": pos,
                "token": [t for toks in self.tokens for t in toks],
                "token_id": self.arrays["token_ids"],
                "special": self.arrays["special"],
            }
        )

    def __repr__(self) -> str:
        prov = self.provenance
        attn = (prov.get("attention") or {}).get("kind", "?")
        quant = (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None
        return (
            f"Run({prov.get('model_id', '?')!r}, sequences={self.n_sequences}, tokens={int(self.offsets[-1])}, "
            f"layers={self.meta.get('n_layers')}, heads={self.meta.get('n_heads')}, attention={attn}, quant={quant})"
        )

    def _repr_html_(self) -> str:
        import pandas as pd

        from lens._display import html_card

        texts = self.texts
        frame = pd.DataFrame({
            "sequence": np.arange(self.n_sequences),
            "tokens": self.lengths,
            "text": [(t[:72] + "…" if len(t) > 72 else t) if isinstance(t, str) else " ".join(toks[:12])
                     for t, toks in zip(texts, self.tokens)],
        })
        groups = sorted({name.split(".")[0] for name in self.arrays} - {"token_ids", "offsets", "special"})
        kept = self.kept_patterns()
        lines = [f"captured: {', '.join(groups) or 'tokens only'}"
                 + (f"; full patterns of {len(kept)} heads" if kept else "")]
        return html_card("Run", repr(self)[len("Run("):-1], frame, lines=lines, max_rows=12)

    def show(self, **kwargs):
        """Open the interactive attention explorer for this run (``lens.widgets.AttentionExplorer``; needs
        ``lens-interp[widgets]``). ``kwargs`` go to the explorer (``layer``, ``head``, ``seq``, ``max_cells``…).

        Example: ``lens.trace(lens.load(), ["The cat sat."], keep_patterns=[(0, 3)]).show(layer=0, head=3)``.
        """
        from lens.widgets import (
            AttentionExplorer,  # views sit above the core; imported only when asked
        )

        return AttentionExplorer(self, **kwargs)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the run to one safetensors file (arrays) with its JSON metadata in the header.

        The file is written to a temporary name in the same folder and renamed into place, so a crash
        never leaves a half-written run where a good one was. Returns the path.

        Example: ``run.save("runs/minilm.lens")``.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        header = {"schema": SCHEMA, "tokens": self.tokens, "meta": self.meta}
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        with atomic_path(path) as tmp:
            save_file(arrays, tmp, metadata={_META_KEY: json.dumps(header, default=_json_default)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        """Read a run written by ``Run.save``. Never unpickles: safetensors arrays and JSON only.

        Raises ``RunFormatError`` (saying what to do) for a missing, truncated, corrupted or foreign file.

        Example: ``run = lens.Run.load("runs/minilm.lens")``.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RunFormatError(f"there is no saved run at {str(path)!r}; save one with run.save(path)")
        try:
            with safe_open(str(path), framework="numpy") as fh:
                metadata = fh.metadata() or {}
                if _META_KEY not in metadata:
                    raise RunFormatError(
                        f"{str(path)!r} is a safetensors file but not a lens run (no lens header); "
                        "load runs written by run.save(...)"
                    )
                header = json.loads(metadata[_META_KEY])
                arrays = {name: fh.get_tensor(name) for name in fh.keys()}
        except RunFormatError:
            raise
        except Exception as exc:
            raise RunFormatError(
                f"{str(path)!r} is not a readable lens run; it is probably truncated or corrupted "
                f"({type(exc).__name__}: {exc}). Re-create it with lens.trace(...).save(path)"
            ) from exc
        if header.get("schema") != SCHEMA:
            raise RunFormatError(
                f"{str(path)!r} has schema {header.get('schema')!r}; this lens reads {SCHEMA!r}. "
                "Re-create the run with this version of lens"
            )
        run = cls(arrays=arrays, tokens=header["tokens"], meta=header["meta"])
        run._validate(str(path))
        return run

    def _validate(self, where: str) -> None:
        try:
            offsets = self.arrays["offsets"]
            n = int(offsets[-1])
            assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0), "offsets are not increasing"
            assert self.arrays["token_ids"].shape == (n,), "token_ids does not match offsets"
            assert len(self.tokens) == len(offsets) - 1, "token strings do not match offsets"
            assert [len(t) for t in self.tokens] == list(np.diff(offsets)), "token strings have wrong lengths"
            for name, arr in self.arrays.items():
                if name.startswith(("attn.key_mass", "attn.query_count", "resid.norm", "resid.cos2")):
                    assert arr.shape[-1] == n, f"{name} has {arr.shape[-1]} tokens, expected {n}"
                if arr.dtype.kind == "f" and name.startswith(("attn.", "resid.norm", "resid.spectrum")):
                    assert np.isfinite(arr).all(), f"{name} contains NaN or infinity"
        except (AssertionError, KeyError) as exc:
            raise RunFormatError(
                f"{where!r} is internally inconsistent ({exc}); the file is corrupted. Re-create it with "
                "lens.trace(...).save(path)"
            ) from exc


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
