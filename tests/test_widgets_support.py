"""Shared helpers for the widget tests (no tests here): runs, synthetic long runs, payload decoding.

Long runs (4096 and 10 000 tokens) are built directly as ``lens.Run`` objects with a planted pattern
instead of traced: the widgets only read a run's arrays, and a real trace at those lengths costs 20–35 s
each on two cores. The planted pattern is causal, every row sums to 1, token 0 gets a fixed share (a
sink), and the rest goes to a local window — so expected pooled values are known.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
from pathlib import Path

import numpy as np
import pytest

import lens
from lens.run import Run

SINK_SHARE = 0.6


def planted_pattern(length: int, window: int = 8, sink: float = SINK_SHARE) -> np.ndarray:
    """Causal [T, T] pattern: each query q ≥ 1 puts ``sink`` on key 0 and spreads the rest evenly over the
    ``window`` keys before it (itself included, key 0 excluded); query 0 attends only to itself."""
    pattern = np.zeros((length, length), dtype=np.float32)
    pattern[0, 0] = 1.0
    for q in range(1, length):
        lo = max(1, q - window + 1)
        pattern[q, 0] = sink
        pattern[q, lo : q + 1] = (1.0 - sink) / (q + 1 - lo)
    return pattern


def synthetic_run(lengths: list[int], *, n_layers: int = 2, n_heads: int = 3, kept=(), seed: int = 0,
                  tokens: list[list[str]] | None = None) -> Run:
    """A causal ``Run`` with the arrays the widgets read. Kept heads get ``planted_pattern``; every head's
    key mass is that pattern's column sums (so ``mass_received`` is consistent with the pattern)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = int(offsets[-1])
    key_mass = np.zeros((n_layers, n_heads, n), dtype=np.float32)
    count = np.zeros((n_layers, n), dtype=np.float32)
    arrays: dict[str, np.ndarray] = {}
    patterns = {pair: [] for pair in kept}
    for s, length in enumerate(lengths):
        sl = slice(int(offsets[s]), int(offsets[s + 1]))
        count[:, sl] = length - np.arange(length)  # causal: key k is seen by queries k..T-1
        base = planted_pattern(length)
        col = base.sum(0)
        for layer in range(n_layers):
            for head in range(n_heads):
                # scale the non-sink columns a little per head so heads differ, keep key 0 exact
                jitter = col * (1 + 0.1 * rng.random(length)).astype(np.float32)
                jitter[0] = col[0]
                key_mass[layer, head, sl] = jitter if (layer, head) not in kept else col
        for pair in kept:
            patterns[pair].append(base.ravel())
    arrays.update({
        "token_ids": rng.integers(5, 300, n).astype(np.int64),
        "offsets": offsets,
        "special": np.zeros(n, dtype=bool),
        "attn.key_mass": key_mass,
        "attn.query_count": count,
    })
    for (layer, head), parts in patterns.items():
        arrays[f"pattern.{layer}.{head}"] = np.concatenate(parts)
    toks = tokens or [[f"t{i}" for i in range(length)] for length in lengths]
    meta = {"n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_heads, "d_model": 16, "d_mlp": 32,
            "causal": True, "provenance": {"model_id": "synthetic/planted", "attention": {"kind": "dense"}},
            "texts": [None] * len(lengths), "tracked_neurons": []}
    return Run(arrays=arrays, tokens=toks, meta=meta)


def f32(buffer) -> np.ndarray:
    return np.frombuffer(bytes(buffer), dtype="<f4")


def view_of(widget) -> np.ndarray:
    """An AttentionExplorer's view as float32 [2, nq, nk], whatever its transport dtype."""
    meta = widget.view_meta
    dtype = "<f2" if meta.get("dtype") == "f16" else "<f4"
    return np.frombuffer(bytes(widget.view), dtype=dtype).astype(np.float32).reshape(2, meta["nq"], meta["nk"])


def i32(buffer) -> np.ndarray:
    return np.frombuffer(bytes(buffer), dtype="<i4")


def u8(buffer) -> np.ndarray:
    return np.frombuffer(bytes(buffer), dtype=np.uint8)


def read_export(html: str) -> dict:
    """Decode a standalone export the way its loader does: manifest, gzip + base64 data, half floats.

    Returns ``{"manifest", "state", "table"}`` with blob references replaced by bytes (float32 bytes for
    half-float blobs, like the browser's decoder produces)."""
    def script(ident: str) -> str:
        match = re.search(rf'<script type="[^"]+" id="{ident}">(.*?)</script>', html, re.S)
        assert match, f"no {ident} script in the export"
        return match.group(1)

    manifest = json.loads(script("lens-manifest"))
    raw = gzip.decompress(base64.b64decode(script("lens-data").strip()))
    blobs = []
    for offset, length, enc in manifest["blobs"]:
        data = raw[offset : offset + length]
        blobs.append(np.frombuffer(data, "<f2").astype("<f4").tobytes() if enc == "f16" else data)

    def one(v):
        if isinstance(v, dict) and "$lensblob" in v:
            return blobs[v["$lensblob"]]
        if isinstance(v, dict) and "$lensvalue" in v:
            return manifest["values"][v["$lensvalue"]]
        return v

    def resolve(obj: dict) -> dict:
        return {k: one(v) for k, v in obj.items()}

    return {"manifest": manifest, "state": resolve(manifest["state"]),
            "table": {k: resolve(v) for k, v in manifest["table"].items()}}


# Fixtures imported into several test modules are registered once per module, so their values are
# memoized here: each expensive trace runs once per test session.
_CACHE: dict = {}


def once(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


@pytest.fixture(scope="session")
def minilm_run(minilm, minilm_texts):
    """The embedded MiniLM on five texts, with a few full patterns kept and hidden states for comparisons."""
    return once("minilm_run", lambda: lens.trace(
        minilm, minilm_texts, keep_patterns=[(0, 0), (2, 5), (5, 11)], keep_hidden="all",
        track_neurons=[(2, 5), (4, 100)], progress=False))


@pytest.fixture(scope="session")
def minilm_run_b(minilm, minilm_texts):
    """The same model on lightly edited texts: a second run to overlay."""
    texts = [t.replace("cat", "dog").replace("Paris", "Rome") for t in minilm_texts]
    return once("minilm_run_b", lambda: lens.trace(minilm, texts, keep_hidden="all", progress=False))


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_model_dir):
    return once("tiny_gpt2", lambda: lens.load(tiny_model_dir("gpt2")))


GPT2_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention sinks appear on the first token."]


@pytest.fixture(scope="session")
def gpt2_pair(tiny_gpt2, tmp_path_factory):
    """Two tiny GPT-2s (seeds 0 and 1: "model A vs model B") on the same inputs, logits and hidden states
    kept, so ``lens.compare`` fills every field, KL and top-1 agreement included."""
    from conftest import build_tiny

    def make():
        other = lens.load(build_tiny("gpt2", tmp_path_factory.mktemp("gpt2-seed1"), seed=1))
        options = dict(capture=("attention", "residual", "mlp", "logits"), keep_hidden="all", progress=False)
        return lens.trace(tiny_gpt2, GPT2_TEXTS, **options), lens.trace(other, GPT2_TEXTS, **options)

    return once("gpt2_pair", make)


def saved(run: Run, folder: Path, name: str) -> Path:
    return run.save(folder / f"{name}.lens")
