"""Numpy helpers that turn run arrays into the compact binary payloads the widgets send to the browser.

Nothing here imports a UI library, so these functions are cheap to test on their own. Payload rules
(they are what keeps a 4096-token head from shipping 16M numbers):

* numbers travel as little-endian float32 / int32 / uint8 ``bytes`` (binary widget buffers), never JSON;
* a square attention pattern is block-pooled to at most ``cells × cells`` (max and mean per block);
* a per-token profile is sent at full resolution unless a caller asks for ``bins`` (static export).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import traitlets

from lens.errors import ConfigError, RunFormatError
from lens.run import Run

__all__ = [
    "block_size",
    "pool_pattern",
    "pool_profile",
    "f32",
    "f16",
    "i32",
    "u8",
    "f16_bits",
    "visible_token",
    "check_run",
    "check_index",
    "Index",
]


def f32(array: Any) -> bytes:
    """float32 little-endian bytes of ``array`` (the browser reads them with ``Float32Array``).

    Example: ``f32([0.5, 1.0])`` → 8 bytes.
    """
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def f16(array: Any) -> bytes:
    """IEEE half-float little-endian bytes of ``array`` (the browser expands them with a lookup table).

    Example: ``np.frombuffer(f16([0.1]), "<f2")`` → ``array([0.1], dtype=float16)``.
    """
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(array, dtype="<f2").tobytes()


def i32(array: Any) -> bytes:
    """int32 little-endian bytes of ``array``. Example: ``i32([0, 7])`` → 8 bytes."""
    return np.ascontiguousarray(array, dtype="<i4").tobytes()


def u8(array: Any) -> bytes:
    """uint8 bytes of ``array`` (flags). Example: ``u8([True, False])`` → ``b"\\x01\\x00"``."""
    return np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def f16_bits(buffer: bytes) -> bytes:
    """Re-encode float32 bytes as IEEE half floats (the standalone HTML export halves its numbers this
    way; its loader expands them back to float32 before the component sees them).

    Example: ``np.frombuffer(f16_bits(f32([1.5])), "<f2")`` → ``array([1.5], dtype=float16)``.
    """
    with np.errstate(over="ignore"):  # values beyond 65504 become inf, like any half-float cast
        return np.frombuffer(buffer, dtype="<f4").astype("<f2").tobytes()


def block_size(length: int, cells: int) -> int:
    """Tokens per block when ``length`` tokens are shown on at most ``cells`` cells.

    Example: ``block_size(4096, 256)`` → 16; ``block_size(100, 256)`` → 1.
    """
    if cells < 1:
        raise ConfigError(f"cells must be ≥ 1; got {cells}")
    return max(1, math.ceil(length / cells))


@functools.lru_cache(maxsize=16)
def _allowed_counts(length: int, block: int, causal: bool) -> np.ndarray:
    """[n, n] number of (query, key) pairs inside each block that the model may attend (read-only; the same
    for every head of a sequence, hence cached)."""
    n = math.ceil(length / block)
    if not causal:
        sizes = np.minimum(block, length - np.arange(n) * block)
        counts = np.outer(sizes, sizes).astype(np.float32)
    else:
        # per query q and key block kb: keys k in [k0, k0 + block) ∩ [0, q] are allowed
        q = np.arange(length)[:, None]
        k0 = (np.arange(n) * block)[None, :]
        k1 = np.minimum(k0 + block, length)
        per_query = np.clip(np.minimum(q + 1, k1) - k0, 0, None).astype(np.float32)  # [length, n]
        counts = _group_reduce(per_query, block, np.add)
    counts.setflags(write=False)
    return counts


def _group_reduce(x: np.ndarray, block: int, op) -> np.ndarray:
    """Reduce consecutive groups of ``block`` rows with ``op`` (the last group may be shorter).

    Element-wise ufuncs over ``block`` strided row slices: several times faster than ``reshape(...).max(axis)``,
    whose reduction over short strided axes is what made a 4096-token head take ~100 ms to pool.
    """
    out = x[0::block].copy()
    for j in range(1, block):
        rows = x[j::block]
        op(out[: rows.shape[0]], rows, out=out[: rows.shape[0]])
    return out


def pool_pattern(pattern: np.ndarray, cells: int, causal: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Block-pool a [T, T] attention pattern to at most ``cells × cells``.

    Returns ``(block_max, block_mean, block)``. ``block_mean`` averages only over the (query, key) pairs
    the model may attend (causal models never attend k > q); blocks with no such pair are NaN in both
    arrays, so the browser can paint them as "masked" instead of as zero attention. With ``block == 1``
    the arrays are the pattern itself (masked entries NaN). Max-pooling keeps one-token structures such
    as a sink column or the diagonal visible at any zoom; the mean tells how much mass the block holds.
    Sums accumulate in float32: at most block² probabilities ≤ 1 each, so the relative error is ~1e-7.

    Example: ``mx, mean, b = pool_pattern(run.pattern(0, 3), cells=256, causal=run.causal)``.
    """
    pattern = np.asarray(pattern, dtype=np.float32)
    length = pattern.shape[0]
    if pattern.shape != (length, length):
        raise ConfigError(f"a pattern must be square; got shape {pattern.shape}")
    block = block_size(length, cells)
    counts = _allowed_counts(length, block, causal)
    if block == 1:
        block_max = pattern.copy()
        block_mean = pattern.copy()
    else:
        # one pass over the rows for both reductions, then the (block times smaller) columns
        row_max = pattern[0::block].copy()
        row_sum = row_max.copy()
        for j in range(1, block):
            rows = pattern[j::block]
            k = rows.shape[0]
            np.maximum(row_max[:k], rows, out=row_max[:k])
            np.add(row_sum[:k], rows, out=row_sum[:k])
        block_max = _group_reduce(row_max.T, block, np.maximum).T
        with np.errstate(invalid="ignore", divide="ignore"):
            block_mean = _group_reduce(row_sum.T, block, np.add).T / counts
        block_max = np.ascontiguousarray(block_max)
    masked = counts == 0
    block_max[masked] = np.nan
    block_mean[masked] = np.nan
    return block_max, block_mean.astype(np.float32, copy=False), block


def pool_profile(values: np.ndarray, bins: int | None) -> tuple[np.ndarray, int]:
    """Max-pool a per-token profile to at most ``bins`` values (None: unchanged). Returns (pooled, block).

    Example: ``pool_profile(run.mass_received(0, 0), 1024)``.
    """
    values = np.asarray(values, dtype=np.float32)
    if bins is None or values.size <= bins:
        return values, 1
    block = block_size(values.size, bins)
    n = math.ceil(values.size / block)
    padded = np.pad(values, (0, n * block - values.size), constant_values=-np.inf)
    return padded.reshape(n, block).max(1), block


def visible_token(token: str) -> str:
    """A token string with its whitespace made visible (``" the"`` → ``"␣the"``, ``"\\n"`` → ``"↵"``), for labels.

    Example: ``visible_token("Ġcat")`` → ``"␣cat"``.
    """
    out = token.replace("Ġ", "␣").replace("▁", "␣").replace("Ċ", "↵").replace("\n", "↵").replace("\t", "⇥")
    out = out.replace(" ", "␣")
    return "".join(ch if ch.isprintable() or ch in "␣↵⇥" else f"\\x{ord(ch):02x}" for ch in out)


def check_run(obj: Any, what: str) -> Run:
    """``obj`` if it is a ``lens.Run`` with at least one sequence, else a ``ConfigError`` saying what to pass.

    Example: ``check_run(run, "AttentionExplorer")``.
    """
    if not isinstance(obj, Run):
        raise ConfigError(
            f"{what} takes a lens.Run (the result of lens.trace(model, inputs)); got {type(obj).__name__}. "
            "Trace first: run = lens.trace(lens.load(), ['some text'])"
        )
    if obj.n_sequences == 0:
        raise RunFormatError(f"{what} got a run with no sequences; trace at least one input with lens.trace")
    return obj


def check_index(value: int, upper: int, name: str, hint: str) -> int:
    """``value`` as an int if ``0 ≤ value < upper``; otherwise a ``ConfigError`` naming the valid range.

    Example: ``check_index(3, run.n_layers, "layer", "the run's layers")``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    if not 0 <= int(value) < upper:
        raise ConfigError(f"{name} {value} does not exist; valid values are 0..{upper - 1} ({hint})")
    return int(value)


class Index(traitlets.Int):
    """An integer trait (a selection: sequence, layer, head, token) whose type errors are ``ConfigError``s,
    like every other bad input to a widget, rather than traitlets' ``TraitError``.

    Example: ``layer = Index(0).tag(sync=True)``.
    """

    def validate(self, obj, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ConfigError(f"{self.name} must be an integer; got {value!r}")
        return int(value)
