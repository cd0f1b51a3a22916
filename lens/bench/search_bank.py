"""The benchmark bank of ``lens bench search``: ~10⁶ real contextual states of SmolLM2, built once and cached.

Corpus: ``data/concepts.txt`` of the ``latentlens`` 0.1.0 wheel (MIT) — the package's own corpus of 117,125
English sentences, a few about each of ~23,000 concepts (the paper itself used ~3M Visual Genome phrases). Sentences are taken in a seeded random order
until their countable tokens (not special, not position 0) times the number of bank layers reach the target
entries; the bank keeps every distinct context (``per_type_cap=None``: a cap of 20 per type would need
millions of tokens to reach 10⁶ entries). The bank is saved under ``$LENS_CACHE/banks/`` keyed by the model's
signature, the corpus sha256, the layers, the target and the seed, and loaded from there on later runs.

Example: ``bank, info = bench_bank(lm, entries=10**6, layers=(4, 8, 12, 16, 20, 24))``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from lens.analysis.textbank import TextBank
from lens.errors import BankFormatError, MissingDependencyError

__all__ = ["bench_bank", "concepts_path", "bench_cache_dir", "DEFAULT_LAYERS"]

DEFAULT_LAYERS = (4, 8, 12, 16, 20, 24)
CONCEPTS_SHA256 = "f698a2682c0a3fd97764a339a65a3ebdd0780f78a4741df34bead1b71169075c"


def bench_cache_dir() -> Path:
    """lens's cache folder (``lens.models.cache.cache_dir``: ``$LENS_CACHE``, else ``$XDG_CACHE_HOME/lens``,
    else ``~/.cache/lens``)."""
    from lens.models.cache import cache_dir

    return cache_dir()


def concepts_path() -> Path:
    """``concepts.txt`` of the installed ``latentlens`` package (``pip install --no-deps latentlens``)."""
    try:
        import importlib.resources as resources

        path = Path(str(resources.files("latentlens") / "data" / "concepts.txt"))
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(
            "lens bench search compares with the latentlens package and reads its corpus: pip install --no-deps "
            "latentlens==0.1.0 (its declared dependencies would replace torch; lens needs none of them)"
        ) from exc
    if not path.is_file():
        raise MissingDependencyError(f"the latentlens package has no data/concepts.txt at {path}; reinstall latentlens==0.1.0")
    return path


def _select_sentences(lm, path: Path, target_tokens: int, seed: int) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    order = np.random.default_rng(seed).permutation(len(lines))
    specials = set(lm.tokenizer.all_special_ids)
    chosen, tokens = [], 0
    for start in range(0, len(order), 2048):
        batch = [lines[i] for i in order[start : start + 2048]]
        for text, ids in zip(batch, lm.tokenizer(batch, add_special_tokens=True)["input_ids"]):
            chosen.append(text)
            tokens += sum(1 for p, t in enumerate(ids) if p > 0 and t not in specials)
            if tokens >= target_tokens:
                return chosen
    return chosen


def bench_bank(lm, *, entries: int = 10**6, layers=DEFAULT_LAYERS, seed: int = 0, progress: bool | None = None,
               cache: Path | None = None) -> tuple[TextBank, dict]:
    """The cached benchmark bank (float16) and a description of how it was made; built on first use."""
    path = concepts_path()
    layers = tuple(sorted(int(x) for x in layers))
    key = hashlib.sha256(json.dumps({
        "signature": lm.provenance().get("signature"), "corpus": CONCEPTS_SHA256, "layers": layers, "entries": int(entries),
        "seed": int(seed), "schema": "lens.textbank/1", "d_model": lm.d_model, "n_layers": lm.n_layers,
    }, sort_keys=True).encode()).hexdigest()[:16]
    folder = (cache or bench_cache_dir()) / "banks" / f"search-bench-{key}"
    info = {"corpus": f"latentlens 0.1.0 data/concepts.txt (sha256 {CONCEPTS_SHA256[:12]}…), sentences in seeded order",
            "cache": str(folder), "layers": list(layers), "target_entries": int(entries)}
    if (folder / "bank.json").is_file():
        try:
            bank = TextBank.load(folder)
            info["built"] = "cached"
            return bank, info
        except BankFormatError:
            pass  # a damaged cache entry is rebuilt
    # a few percent margin: identical prefixes are stored once
    sentences = _select_sentences(lm, path, int(entries / len(layers) * 1.04) + 1, seed)
    bank = TextBank.build(lm, sentences, layers, per_type_cap=None, seed=seed, batch_size=16, chunk_size=256,
                          lenses=False, progress=progress, corpus_name="latentlens concepts.txt")
    bank.save(folder)
    info["built"] = f"now, {bank.meta['build_seconds']:.0f} s"
    return bank, info
