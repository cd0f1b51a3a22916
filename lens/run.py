"""``Run``: what one ``lens.trace`` observed — numpy arrays, tokens and provenance — saved without pickle.

Layout (N = total real tokens over all sequences, S = sequences, L = layers, H = heads; sequences are
stored back to back and ``offsets[s]:offsets[s+1]`` selects sequence ``s``):

| array | shape | meaning (docs/definitions.md) |
|---|---|---|
| token_ids | [N] int64 | token ids |
| offsets | [S+1] int64 | sequence boundaries |
| special | [N] bool | special tokens ([CLS], [SEP], BOS, …) |
| continuation | [N] bool | the token continues a character begun by an earlier token (byte-level BPE): its label is "" (see lens.models.labels) |
| attn.key_mass | [L, H, N] f32 | Σ_{q∈Q_k} A[ℓ,h,q,k] — unnormalized column sum |
| attn.query_count | [L, N] f32 | the size of Q_k: valid queries allowed to attend key k |
| attn.uniform_share | [L, N] f32 | u[k] = (1/abs(Q_k)) Σ_{q∈Q_k} 1/abs(K_q) under the model's own mask |
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
| modality | [N] uint8 | image inputs: 0 text, 1 image, 2 special (``lens.capture.vision.MODALITIES``) |
| image.index / image.tile / image.row / image.col | [N] int32 | image inputs: each image token's image (run-wide), tile, patch-grid row and column; −1 elsewhere |
| image.pixels.<i>.<t> | [h, w, 3] uint8 | tile t of image i as the model saw it (un-normalized from the processor's pixels) |
| attn.text_key_mass | [L, H, N] f32 | image inputs: Σ over the text queries after the first image token of A[ℓ,h,q,k] (dense and sparse kernels) |
| attn.text_uniform | [L, N] f32 | … the same sum for the uniform pattern of the model's mask |
| attn.text_count | [S] int64 | … the number of those text queries per sequence |
| attn.rows / attn.row_* | [L, Σ T] f32 | head-mean attention rows of the non-image queries after the first image |
| vision.key_mass / vision.query_count / vision.uniform_share | [Lv, Hv, Nv] / [Lv, Nv] f32 | the vision tower's own attention per patch token |
| vision.norm | [Lv+1, Nv] f32 | ‖x‖ of each vision-tower token entering layer v (Lv: the last layer's output) |
| vision.sequence / .image / .tile / .row / .col | [Nv] int32 | where each vision-tower token sits (row = col = −1 for CLS) |
| vision.entropy_raw / vision.entropy_normalized / vision.anisotropy | [Lv+1, tiles] f64 | the encoder's valley: matrix entropy of each tile's tokens per layer (÷ log min(T, d)), p₁ |
| vision.tile_sequence / vision.tile_image / vision.tile_tile | [tiles] int32 | which tile each column of the encoder's valley is |
| resid.sink_dims / resid.sink_phi_first / resid.sink_phi | [L+1, S, m] / [L+1, N, m] | the first token's m largest φ(x) = abs(x)/rms(x) dimensions, and every token's φ there |
| resid.spectrum_raw.<m> / resid.spectrum_normalized.<m> | [L+1, S, R_m] f64 | image inputs, m = image / text: both spectra of X_ℓ restricted to that modality's rows (zero-padded; R_m = max min(T_m, d)) |
| resid.reference.<m> | [L+1, S] int64 | … the flat index of that modality's largest-norm token (the bound's x₀; −1: none) |
| resid.cos2_reference | [L+1, N] f32 | … cos² between X_ℓ[t] and its modality's reference token (NaN for special tokens) |

X_ℓ is the residual stream entering block ℓ; X_L is the last block's output (before any final norm).

On disk: one safetensors file; its header holds the tokens and ``meta`` as JSON, and a sha256 of every
array (with its dtype and shape) and of that JSON, which ``Run.load`` verifies (docs/definitions.md).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lens.atomic import atomic_path, sha256_bytes
from lens.errors import LensWarning, RunFormatError

__all__ = ["Run", "SCHEMA", "CONTINUATION_MARK", "plain_uniform_share"]

SCHEMA = "lens.run/1"
_META_KEY = "lens"
_CHECK_KEY = "lens.sha256"
# How views show a continuation token (its own label is empty): the dotted circle, the typographic
# placeholder for "part of the character next to it".
CONTINUATION_MARK = "\u25cc"


def plain_uniform_share(length: int, causal: bool) -> np.ndarray:
    """The uniform share u[k] for a plain mask without padding: causal, or fully bidirectional.

    Bidirectional: ``1/T`` for every key. Causal: key k is seen by queries q ≥ k, each spreading over
    q + 1 keys, so ``u[k] = (1/(T−k)) Σ_{q=k}^{T−1} 1/(q+1)``. Any other mask (sliding windows, blocks)
    has its own share, which ``lens.trace`` measures (``Run.uniform_share``).

    Example: ``plain_uniform_share(4, causal=False)`` → ``[0.25, 0.25, 0.25, 0.25]``.
    """
    if not causal:
        return np.full(length, 1.0 / length)
    inv = 1.0 / np.arange(1, length + 1)
    tail = np.cumsum(inv[::-1])[::-1]  # Σ_{q=k}^{T-1} 1/(q+1)
    return tail / (length - np.arange(length))


def _array_digest(arr: np.ndarray) -> str:
    """sha256 of an array's bytes as stored (little-endian, C order), without copying native arrays."""
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return sha256_bytes(little.reshape(-1).view(np.uint8).data)


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
    def modality(self) -> np.ndarray:
        """[N] uint8 per token: 0 text, 1 image, 2 special (docs/definitions.md#vision-language-models). Runs of
        text-only inputs have no image tokens: special where ``special`` is set, else text.

        Example: ``(run.modality == 1).sum()`` — the image tokens of a run.
        """
        if "modality" in self.arrays:
            return self.arrays["modality"]
        return np.where(self.arrays["special"].astype(bool), 2, 0).astype(np.uint8)

    @property
    def images(self) -> list[dict[str, Any]]:
        """Per image of the run (numbered run-wide): its sequence, tiles (role, token grid, patch grid), token
        count and first token; [] for text-only runs. Pixels as the model saw them: ``run.image_pixels(i)``."""
        return list(self.meta.get("images", []))

    def image_pixels(self, image: int, tile: int = 0) -> np.ndarray:
        """H × W × 3 uint8: tile ``tile`` of image ``image`` as the model saw it (un-normalized, ≤ 224 px)."""
        name = f"image.pixels.{image}.{tile}"
        if name not in self.arrays:
            raise RunFormatError(f"this run has no pixels for image {image}, tile {tile}; it has {len(self.images)} image(s)")
        return self.arrays[name]

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

    def uniform_share(self, layer: int, seq: int = 0) -> np.ndarray:
        """u[k] = (1/|Q_k|) Σ_{q∈Q_k} 1/|K_q| for every key of one sequence at one layer
        (docs/definitions.md#sink-tokens): what k
        would receive if every query spread its attention evenly over the keys the model's mask lets it see.

        Read from the run (measured inside the attention kernel from the real mask — causal, padding,
        sliding window, bidirectional blocks). Runs saved before lens stored it fall back to the plain
        causal/bidirectional share, with a ``LensWarning`` when the stored |Q_k| shows another mask.

        Example: ``run.mass_received(0, 3) / run.uniform_share(0)`` — mass relative to uniform attention.
        """
        sl = self.span(seq)
        if "attn.uniform_share" in self.arrays:
            return self.arrays["attn.uniform_share"][layer, sl].astype(np.float64)
        length = sl.stop - sl.start
        share = plain_uniform_share(length, self.causal)
        if "attn.query_count" in self.arrays:
            count = self.arrays["attn.query_count"][layer, sl]
            plain = length - np.arange(length) if self.causal else np.full(length, length)
            if not np.array_equal(count, plain):
                warnings.warn(
                    f"this run was saved before lens stored the uniform share, and layer {layer} of sequence {seq} "
                    "was not plain causal/bidirectional attention (a sliding window?); sink tokens use the plain "
                    "share, which is wrong there. Trace the inputs again for exact values",
                    LensWarning,
                    stacklevel=2,
                )
        return share

    def token_labels(self, seq: int = 0) -> list[str]:
        """The labels views show for one sequence: ``run.tokens[seq]``, with ``"◌"`` for continuation tokens
        (pieces of a character that an earlier token begins; their own label is empty).

        Example: ``run.token_labels(0)`` → ``['日', '◌', '◌', '本', '◌', '◌']`` on a byte-level tokenizer.
        """
        flags = self.arrays.get("continuation")
        sl = self.span(seq)
        marks = flags[sl] if flags is not None else np.zeros(sl.stop - sl.start, dtype=bool)
        return [CONTINUATION_MARK if c and not t else str(t) for t, c in zip(self.tokens[seq], marks)]

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
        """One row per token: sequence, position, token label, id, special flag, continuation flag (a piece
        of a character whose label is on an earlier token; see ``Run.token_labels``).

        Example: ``run.to_frame().query("special")``.
        """
        import pandas as pd

        seq = np.repeat(np.arange(self.n_sequences), self.lengths)
        pos = np.concatenate([np.arange(n) for n in self.lengths]) if self.n_sequences else np.array([], int)
        continuation = self.arrays.get("continuation", np.zeros(len(seq), dtype=bool))
        return pd.DataFrame(
            {
                "sequence": seq,
                "position": pos,
                "token": [t for toks in self.tokens for t in toks],
                "token_id": self.arrays["token_ids"],
                "special": self.arrays["special"],
                "continuation": continuation,
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
        """Write the run to one safetensors file (arrays) with its JSON metadata and checksums in the header.

        The header stores a sha256 of every array's bytes (with its dtype and shape) and of the metadata
        JSON; ``Run.load`` verifies them. The file is written to a temporary name in the same folder and
        renamed into place, so a crash never leaves a half-written run where a good one was. Returns the
        path. Raises ``RunFormatError`` when the file cannot be written (the message says why).

        Example: ``run.save("runs/minilm.lens")``.
        """
        from safetensors.numpy import save_file

        path = Path(path)
        if path.is_dir():
            raise RunFormatError(f"{str(path)!r} is a folder; give the run a file name, e.g. {str(path / 'run.lens')!r}")
        header_json = json.dumps({"schema": SCHEMA, "tokens": self.tokens, "meta": self.meta}, default=_json_default)
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        checks = {
            "header": sha256_bytes(header_json.encode("utf-8")),
            "arrays": {
                name: {"sha256": _array_digest(arr), "dtype": arr.dtype.str.lstrip("<>|="), "shape": list(arr.shape)}
                for name, arr in arrays.items()
            },
        }
        try:
            with atomic_path(path) as tmp:
                save_file(arrays, tmp, metadata={_META_KEY: header_json, _CHECK_KEY: json.dumps(checks, sort_keys=True)})
        except OSError as exc:
            raise RunFormatError(
                f"could not save the run to {str(path)!r} ({type(exc).__name__}: {exc}); nothing was written there. "
                "Choose a folder you can write to with enough free space"
            ) from exc
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Run":
        """Read a run written by ``Run.save``. Never unpickles: safetensors arrays and JSON only.

        Verifies the sha256 of every array and of the metadata: a single flipped bit raises
        ``RunFormatError`` naming what changed. Files written before lens stored checksums still load, with
        a ``LensWarning`` that they cannot be verified. Raises ``RunFormatError`` (saying what to do) for a
        missing, truncated, corrupted, altered or foreign file.

        Example: ``run = lens.Run.load("runs/minilm.lens")``.
        """
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            raise RunFormatError(f"{str(path)!r} is a folder, not a saved run; give the path of a file written by run.save")
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
                header_json = metadata[_META_KEY]
                checks_json = metadata.get(_CHECK_KEY)
                arrays = {name: fh.get_tensor(name) for name in fh.keys()}
        except RunFormatError:
            raise
        except Exception as exc:
            raise RunFormatError(
                f"{str(path)!r} is not a readable lens run; it is probably truncated or corrupted "
                f"({type(exc).__name__}: {exc}). Re-create it with lens.trace(...).save(path)"
            ) from exc
        if checks_json is None:
            warnings.warn(
                f"{str(path)!r} was saved without checksums (by an older lens), so its integrity cannot be verified; "
                "save it again (Run.load(path).save(path)) to add them",
                LensWarning,
                stacklevel=2,
            )
        else:
            _verify(str(path), header_json, checks_json, arrays)
        try:
            header = json.loads(header_json)
        except ValueError as exc:
            raise RunFormatError(f"{str(path)!r} has a corrupted lens header ({exc}); re-create the run") from exc
        if not isinstance(header, dict) or header.get("schema") != SCHEMA:
            schema = header.get("schema") if isinstance(header, dict) else None
            raise RunFormatError(
                f"{str(path)!r} has schema {schema!r}; this lens reads {SCHEMA!r}. "
                "Re-create the run with this version of lens"
            )
        run = cls(arrays=arrays, tokens=header.get("tokens"), meta=header.get("meta") or {})
        run._validate(str(path))
        return run

    def _validate(self, where: str) -> None:
        try:
            offsets = self.arrays["offsets"]
            assert offsets.ndim == 1 and offsets.size >= 1 and offsets.dtype.kind in "iu", "offsets is not a 1-D int array"
            n = int(offsets[-1])
            assert offsets[0] == 0 and np.all(np.diff(offsets) >= 0), "offsets are not increasing"
            assert self.arrays["token_ids"].shape == (n,), "token_ids does not match offsets"
            assert isinstance(self.tokens, list) and all(isinstance(t, list) for t in self.tokens), "no token strings"
            assert len(self.tokens) == len(offsets) - 1, "token strings do not match offsets"
            assert [len(t) for t in self.tokens] == list(np.diff(offsets)), "token strings have wrong lengths"
            assert isinstance(self.meta, dict), "meta is not a mapping"
            for key in ("n_layers", "n_heads", "causal"):
                assert key in self.meta, f"meta has no {key!r}"
            for name, arr in self.arrays.items():
                if name in ("special", "continuation") or name.startswith(
                    ("attn.key_mass", "attn.query_count", "attn.uniform_share", "resid.norm", "resid.cos2")
                ):
                    assert arr.shape[-1] == n, f"{name} has {arr.shape[-1]} tokens, expected {n}"
                if arr.dtype.kind == "f" and name.startswith(("attn.", "resid.norm", "resid.spectrum")):
                    assert np.isfinite(arr).all(), f"{name} contains NaN or infinity"
        except (AssertionError, KeyError, TypeError, IndexError, ValueError) as exc:
            raise RunFormatError(
                f"{where!r} is internally inconsistent ({exc}); the file is corrupted. Re-create it with "
                "lens.trace(...).save(path)"
            ) from exc


def _verify(where: str, header_json: str, checks_json: str, arrays: dict[str, np.ndarray]) -> None:
    """Compare the stored sha256 of the metadata and of every array with the bytes just read."""
    advice = "the file was altered or damaged after it was saved; re-create it with lens.trace(...).save(path)"
    try:
        checks = json.loads(checks_json)
        stored = checks["arrays"]
        header_digest = checks["header"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RunFormatError(f"{where!r} has an unreadable checksum table ({exc}); {advice}") from exc
    if sha256_bytes(header_json.encode("utf-8")) != header_digest:
        raise RunFormatError(f"{where!r}: the metadata (tokens, provenance) does not match its sha256; {advice}")
    if set(stored) != set(arrays):
        missing = sorted(set(stored) - set(arrays))
        extra = sorted(set(arrays) - set(stored))
        raise RunFormatError(f"{where!r}: arrays missing {missing} / unexpected {extra}; {advice}")
    for name, arr in arrays.items():
        entry = stored[name]
        if list(arr.shape) != list(entry.get("shape", [])) or arr.dtype.str.lstrip("<>|=") != entry.get("dtype"):
            raise RunFormatError(
                f"{where!r}: array {name!r} is {arr.dtype} {list(arr.shape)} but was saved as "
                f"{entry.get('dtype')} {entry.get('shape')}; {advice}"
            )
        if _array_digest(arr) != entry.get("sha256"):
            raise RunFormatError(f"{where!r}: the bytes of array {name!r} do not match their sha256; {advice}")


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
