"""``lens.TextBank``: contextual hidden states of real text tokens, for LatentLens (docs/definitions.md,
"Visual tokens / LatentLens"; Krojer et al. 2026).

A bank holds, for a few residual layers ℓ of one language model, the L2-normalized hidden states X_ℓ[t] of
text tokens read in their sentences, **at most ``per_type_cap`` (m = 20) per token type and layer**, sampled
uniformly over the corpus by a seeded reservoir (``lens.analysis.reservoir``); every entry keeps its token,
its sentence and its position. Building streams over the corpus chunk by chunk (progress bar, memory bounded
by ``m × types × layers``), through lens's own capture path (``lens.capture.hidden``).

Files (a folder; every file written atomically, the manifest last, each listed with its sha256):

===========================  =================================================================================
``bank.json``                schema, model identity (id, shape, embedding signature), build settings, corpus
                             description, counts, and the name, size and sha256 of every other file
``vectors-<sha>.safetensors`` ``vectors`` [n, d] float16 — or ``codes`` [n, d] int8 + ``scales`` [n] + ``int8.mean`` [d] +
                             ``int8.rotation_seed`` [1] int64 (``dim_scales`` [d] in banks saved before them) —
                             and per entry ``layer`` int16, ``token_id`` int32, ``sentence`` int32,
                             ``position`` int32; optional ``vocab.*`` tables (``lens.analysis.vocab_lens``) and
                             ``ivf.*`` (``lens.analysis.ivf.IVFIndex``; an index of an int8 bank stores
                             only its order — its lists are the bank's rows, rebuilt at load)
``texts-<sha>.parquet``      one row per sentence: ``sentence``, ``text``, ``token_start``/``token_end`` (character
                             offsets of every token of the sentence as the model tokenized it)
``tokens-<sha>.parquet``     ``token_id`` → ``token`` (the tokenizer's decoding of that one id)
===========================  =================================================================================

``TextBank.load`` verifies every checksum and never unpickles; the ``latentlens`` package's banks are pickled
torch files and are refused with a ``BankFormatError`` that says to build the bank with lens.

Example::

    lm = lens.load("smollm2")
    bank = lens.TextBank.build(lm, "sentences.txt", layers=[4, 8, 16, 24], seed=0)
    bank.save("banks/smollm2")
    bank = lens.TextBank.load("banks/smollm2")
    bank.search(hidden_states, k=5).to_frame()
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from lens.analysis.reservoir import TypeReservoirs
from lens.analysis.ivf import IVFIndex
from lens.analysis.search import DTYPES, VectorStore, exact_topk, normalize_queries, refine_topk
from lens.errors import BankFormatError, BankMismatchError, ConfigError, InputError
from lens.models.signature import SAME_MODEL_AGREEMENT, signature_agreement

__all__ = ["TextBank", "SCHEMA", "model_identity", "sample_corpus"]

SCHEMA = "lens.textbank/1"
_MANIFEST = "bank.json"


def model_identity(lm) -> dict[str, Any]:
    """What a bank records of the model that built it (checked against the runs it is used with)."""
    prov = lm.provenance()
    return {
        "model_id": lm.model_id,
        "family": lm.family.name,
        "model_type": prov.get("model_type"),
        "n_layers": int(lm.n_layers),
        "d_model": int(lm.d_model),
        "causal": bool(lm.causal),
        "signature": prov.get("signature"),
        "dtype": prov.get("dtype"),
        "quant": (prov.get("quant") or {}).get("scheme") if prov.get("quant") else None,
        "attention": (prov.get("attention") or {}).get("kind"),
    }


def check_same_model(bank_model: dict, run_meta: dict, *, what: str = "this run") -> None:
    """Raise ``BankMismatchError`` unless the bank's model and the run's model have the same shape and
    (where both record one) the same embedding signature (``lens.models.signature``)."""
    prov = run_meta.get("provenance", {})
    for key in ("n_layers", "d_model"):
        if int(run_meta.get(key, -1)) != int(bank_model[key]):
            raise BankMismatchError(
                f"the bank was built with {bank_model['model_id']} ({key} = {bank_model[key]}) but {what} comes from "
                f"{prov.get('model_id', 'another model')} ({key} = {run_meta.get(key)}). A bank only describes the model "
                "that built it: build one with this model, lens.TextBank.build(model, corpus, layers)"
            )
    agreement = signature_agreement(bank_model.get("signature"), prov.get("signature"))
    if agreement is not None and agreement < SAME_MODEL_AGREEMENT:
        raise BankMismatchError(
            f"the bank was built with {bank_model['model_id']} but {what} comes from {prov.get('model_id')}: same shape, "
            f"different weights (their embedding signatures agree on {agreement:.0%} of bits; the same model agrees on "
            f"≥ {SAME_MODEL_AGREEMENT:.0%}). Build a bank with this model: lens.TextBank.build(model, corpus, layers)"
        )


# -- corpus ---------------------------------------------------------------------------------------------


def sample_corpus() -> list[str]:
    """5,000 real English sentences shipped with lens for small banks offline: a sample of the latentlens
    package's concepts corpus (``latentlens`` 0.1.0 ``data/concepts.txt``, MIT), described in ``lens/analysis/data/README.md``
    (it over-represents sentences with colour and shape words). Example: ``lens.TextBank.build(lm,
    sample_corpus()[:500], layers=[8])``."""
    path = Path(__file__).with_name("data") / "concepts_sample.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _iter_corpus(corpus) -> tuple[Iterator[str], int | None, dict[str, Any]]:
    """Texts of ``corpus`` (a list of strings, a text file with one text per line, or any iterable of strings)."""
    if isinstance(corpus, (str, os.PathLike)) and Path(corpus).is_file():
        path = Path(corpus)

        def lines() -> Iterator[str]:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    yield line.rstrip("\r\n")

        return lines(), None, {"kind": "text file", "path": str(path), "sha256": _sha256_path(path)}
    if isinstance(corpus, str):
        raise InputError(
            f"corpus {corpus!r} is a string but not a file; pass a list of texts, or the path of a text file with "
            "one text per line"
        )
    if isinstance(corpus, Sequence):
        digest = hashlib.sha256()
        for text in corpus:
            digest.update(str(text).encode("utf-8", "surrogatepass") + b"\n")
        return iter(corpus), len(corpus), {"kind": "list", "n_texts": len(corpus), "sha256": digest.hexdigest()}
    if isinstance(corpus, Iterable):
        return iter(corpus), None, {"kind": type(corpus).__name__}
    raise InputError(
        f"lens.TextBank.build cannot read a corpus of type {type(corpus).__name__}; pass a list of strings, a path to "
        "a text file (one text per line) or an iterable of strings"
    )


def _sha256_path(path: Path) -> str:
    from lens.atomic import sha256_file

    return sha256_file(path)


def _chunks(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _Tokenized:
    ids: list[list[int]]
    starts: list[np.ndarray]
    ends: list[np.ndarray]
    special: list[np.ndarray]
    truncated: int


def _tokenize(lm, texts: list[str], max_tokens: int) -> _Tokenized:
    """Token ids with character offsets, as ``lens.trace`` would tokenize (special tokens, BOS where the family
    prepends one), cut to ``max_tokens``."""
    tok = lm.tokenizer
    if not getattr(tok, "is_fast", False):
        raise ConfigError(
            f"{lm.model_id}'s tokenizer is a slow (Python) tokenizer without character offsets; load the model with a "
            "fast tokenizer (tokenizer.json) to build a text bank"
        )
    enc = tok(texts, add_special_tokens=True, return_offsets_mapping=True, verbose=False)
    specials = set(getattr(tok, "all_special_ids", []) or [])
    bos = getattr(tok, "bos_token_id", None)
    if bos is None and lm.family.prepend_bos and lm.causal:
        bos = getattr(tok, "eos_token_id", None)
    out = _Tokenized([], [], [], [], 0)
    for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"]):
        ids, offsets = list(ids), list(offsets)
        if lm.family.prepend_bos and bos is not None and (not ids or ids[0] != bos):
            ids, offsets = [bos] + ids, [(0, 0)] + offsets
        if len(ids) > max_tokens:
            ids, offsets = ids[:max_tokens], offsets[:max_tokens]
            out.truncated += 1
        off = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
        out.ids.append(ids)
        out.starts.append(off[:, 0])
        out.ends.append(off[:, 1])
        out.special.append(np.array([t in specials for t in ids], dtype=bool))
    return out


_MIX = np.uint64(0x9E3779B97F4A7C15)


def _context_keys(ids: list[int], causal: bool) -> np.ndarray:
    """uint64 key per position: the prefix ids[:p+1] (causal) or the whole sequence and p (bidirectional)."""
    if causal:
        keys = np.empty(len(ids), dtype=np.uint64)
        h = hashlib.blake2b(digest_size=8)
        for p, t in enumerate(ids):
            h.update(int(t).to_bytes(4, "little", signed=False))
            keys[p] = np.frombuffer(h.digest(), dtype=np.uint64)[0]
        return keys
    whole = np.frombuffer(hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=8).digest(), np.uint64)[0]
    with np.errstate(over="ignore"):
        return whole ^ (np.arange(len(ids), dtype=np.uint64) * _MIX)


# -- the bank -------------------------------------------------------------------------------------------


@dataclass(repr=False, eq=False)  # arrays have no truth value: == is identity (compare .to_frame() or files)
class TextBank:
    """Contextual text-token states of one model at a few layers (see the module docstring).

    Per entry (``n`` entries, rows sorted by bank layer, then token id, sentence, position): ``layer`` int16
    (residual layer ℓ of X_ℓ), ``token_id`` int32, ``sentence`` int32 (row of ``texts``), ``position`` int32
    (token index in the sentence as the model tokenized it), and the unit vector in ``store``.
    """

    store: VectorStore
    layer: np.ndarray
    token_id: np.ndarray
    sentence: np.ndarray
    position: np.ndarray
    texts: list[str]
    token_start: list[np.ndarray]
    token_end: list[np.ndarray]
    vocab: dict[int, str]
    model: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    lenses: Any = None  # lens.analysis.vocab_lens.VocabularyLenses | None
    index: IVFIndex | None = None
    codes: VectorStore | None = field(default=None, repr=False)  # int8 codes of a float16 bank (method="refine")

    # -- facts ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.store)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.unique(self.layer))

    @property
    def dtype(self) -> str:
        return self.store.kind

    @property
    def d_model(self) -> int:
        return self.store.dim

    def layer_range(self, layer: int) -> tuple[int, int]:
        """Rows ``[start, stop)`` of one bank layer."""
        start, stop = np.searchsorted(self.layer, [layer, layer + 1])
        return int(start), int(stop)

    def counts(self) -> dict[int, int]:
        """Entries per bank layer."""
        return {layer: int(b - a) for layer in self.layers for a, b in [self.layer_range(layer)]}

    @property
    def nbytes(self) -> int:
        """Bytes of the entries in memory: vectors (+ scales) and the four per-entry columns."""
        return int(self.store.nbytes + self.layer.nbytes + self.token_id.nbytes + self.sentence.nbytes + self.position.nbytes)

    def token(self, rows) -> list[str]:
        """Token strings of bank rows."""
        return [self.vocab.get(int(t), "") for t in self.token_id[np.asarray(rows, dtype=np.int64).reshape(-1)]]

    def context(self, row: int, *, marker: tuple[str, str] = ("[[", "]]")) -> str:
        """The entry's sentence with its token wrapped in ``marker``: ``'The [[ red]] car stopped.'``."""
        s, p = int(self.sentence[row]), int(self.position[row])
        text = self.texts[s]
        a, b = int(self.token_start[s][p]), int(self.token_end[s][p])
        return text[:a] + marker[0] + text[a:b] + marker[1] + text[b:]

    # -- building ---------------------------------------------------------------------------------------
    @classmethod
    def build(cls, model, corpus, layers: Sequence[int], *, per_type_cap: int | None = 20, seed: int = 0,
              dtype: str = "float16", batch_size: int = 16, chunk_size: int = 256, max_tokens: int = 128,
              skip_first: bool = True, lenses: bool = True, progress: bool | None = None,
              corpus_name: str | None = None) -> "TextBank":
        """Build a bank from ``model`` (a ``LensModel``) over ``corpus`` at residual ``layers`` (0..L).

        ``corpus``: a list of texts, a path to a text file (one text — a sentence — per line) or any iterable of
        strings (streamed; nothing holds the corpus). Each text is one context, tokenized as ``lens.trace`` does
        and cut to ``max_tokens`` tokens (counted in ``meta["truncated"]``). Skipped: special tokens, and with
        ``skip_first`` the first position of every text — the attention sink, whose state is dominated by
        massive activations (Sun et al. 2024) rather than by its token.

        ``per_type_cap``: at most this many entries per (layer, token id) — m = 20 in the paper — sampled
        uniformly by a reservoir seeded with ``(seed, layer)`` (None keeps every context). A context identical to
        one already held for that token (same prefix in a causal model) is not stored twice.
        ``dtype``: "float16" or "int8" (per-row scales, ``lens.kernels.lowbit.Int8Codec``). ``lenses``: also keep
        the final norm, unembedding and input embedding for the logit-lens and embedding-lens baselines.

        Raises ``ConfigError`` (layers, cap, dtype), ``InputError`` (corpus), ``NumericalError`` (non-finite
        states). Example: ``lens.TextBank.build(lens.load(), ["The red car stopped."], layers=[2, 6], per_type_cap=5)``.
        """
        from tqdm.auto import tqdm

        from lens.capture.hidden import iter_hidden_states

        layers = sorted({int(x) for x in layers}) if not isinstance(layers, int) else [int(layers)]
        if not layers:
            raise ConfigError("layers is empty; name the residual layers to bank, e.g. layers=[4, 8, 16]")
        bad = [x for x in layers if not 0 <= x <= model.n_layers]
        if bad:
            raise ConfigError(f"layers {bad} do not exist: {model.model_id} has residual layers 0..{model.n_layers}")
        if per_type_cap is not None and int(per_type_cap) < 1:
            raise ConfigError(f"per_type_cap must be ≥ 1 (or None for no cap); got {per_type_cap}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}; got {dtype!r}")
        if max_tokens < 2:
            raise ConfigError(f"max_tokens must be ≥ 2; got {max_tokens}")
        texts_iter, total, described = _iter_corpus(corpus)
        if corpus_name:
            described["name"] = corpus_name
        d = model.d_model
        reservoirs = {layer: TypeReservoirs(d, per_type_cap, [int(seed), layer]) for layer in layers}
        kept_texts: dict[int, tuple[str, np.ndarray, np.ndarray]] = {}
        n_texts = n_empty = n_tokens = n_truncated = 0
        started = time.perf_counter()
        bar = tqdm(total=total, desc=f"TextBank {model.model_id.split('/')[-1]}", unit="text",
                   disable=None if progress is None else not progress)
        try:
            for chunk in _chunks(texts_iter, chunk_size):
                for i, text in enumerate(chunk):
                    if not isinstance(text, str):
                        raise InputError(f"corpus item {n_texts + n_empty + i} is a {type(text).__name__}, not a string")
                real = [t for t in chunk if t.strip()]
                n_empty += len(chunk) - len(real)
                if not real:
                    bar.update(len(chunk))
                    continue
                tok = _tokenize(model, real, max_tokens)
                n_truncated += tok.truncated
                first_id = n_texts
                n_texts += len(real)
                # longest first inside the chunk: batches of similar length waste little padding
                order = sorted(range(len(real)), key=lambda i: -len(tok.ids[i]))
                states: dict[int, list[torch.Tensor | None]] = {layer: [None] * len(real) for layer in layers}
                for rows, got in iter_hidden_states(model, [tok.ids[i] for i in order], layers, batch_size=batch_size):
                    for layer in layers:
                        for r, x in zip(rows, got[layer]):
                            states[layer][order[r]] = x
                # the stream, in corpus order: which tokens count, their types, keys, sentences and positions
                take = [~tok.special[i] & (np.arange(len(tok.ids[i])) >= (1 if skip_first else 0)) for i in range(len(real))]
                types = np.concatenate([np.asarray(tok.ids[i], dtype=np.int64)[take[i]] for i in range(len(real))])
                keys = np.concatenate([_context_keys(tok.ids[i], model.causal)[take[i]] for i in range(len(real))])
                sentence = np.concatenate([np.full(int(take[i].sum()), first_id + i) for i in range(len(real))])
                position = np.concatenate([np.flatnonzero(take[i]) for i in range(len(real))]).astype(np.int32)
                n_tokens += len(types)
                for layer in layers:
                    x = torch.cat([states[layer][i][torch.from_numpy(take[i])] for i in range(len(real))])
                    x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
                    reservoirs[layer].add(types, keys, x.numpy(), sentence, position)
                for i, text in enumerate(real):
                    kept_texts[first_id + i] = (text, tok.starts[i], tok.ends[i])
                if per_type_cap is not None:  # forget texts no entry refers to any more
                    held = set(np.concatenate([r.sentences_held() for r in reservoirs.values()]).tolist())
                    for s in [s for s in kept_texts if s not in held]:
                        del kept_texts[s]
                bar.update(len(chunk))
                bar.set_postfix(tokens=n_tokens, entries=sum(int((r.type_of[: r.used] >= 0).sum()) for r in reservoirs.values()),
                                refresh=False)
        finally:
            bar.close()
        if n_tokens == 0:
            raise InputError(
                f"the corpus gave no tokens to bank ({n_texts} texts, {n_empty} empty); pass texts with words in them"
            )
        parts = {layer: reservoirs[layer].finish() for layer in layers}
        used = np.unique(np.concatenate([p["sentence"] for p in parts.values()]))
        renumber = {int(s): i for i, s in enumerate(used.tolist())}
        vectors = np.concatenate([p["vectors"] for p in parts.values()])
        token_id = np.concatenate([p["token_id"] for p in parts.values()]).astype(np.int32)
        # the bank's token types; with the lenses, every id (the baselines read any token of the vocabulary)
        wanted = range(int(model.model.get_input_embeddings().num_embeddings)) if lenses else np.unique(token_id).tolist()
        vocab = {int(t): model.tokenizer.decode([int(t)]) for t in wanted}
        meta = {
            "per_type_cap": per_type_cap, "seed": int(seed), "skip_first": bool(skip_first), "max_tokens": int(max_tokens),
            "corpus": described, "n_texts": n_texts, "n_empty": n_empty, "truncated": n_truncated,
            "tokens_seen": n_tokens, "duplicates_skipped": {str(k): r.duplicates for k, r in reservoirs.items()},
            "build_seconds": round(time.perf_counter() - started, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        vocab_lenses = None
        if lenses:
            from lens.analysis.vocab_lens import VocabularyLenses

            vocab_lenses = VocabularyLenses.from_model(model)
        return cls(
            store=VectorStore.from_float(vectors, dtype),
            layer=np.concatenate([np.full(len(p["token_id"]), layer, dtype=np.int16) for layer, p in parts.items()]),
            token_id=token_id,
            sentence=np.array([renumber[int(s)] for s in np.concatenate([p["sentence"] for p in parts.values()])], dtype=np.int32),
            position=np.concatenate([p["position"] for p in parts.values()]).astype(np.int32),
            texts=[kept_texts[int(s)][0] for s in used],
            token_start=[kept_texts[int(s)][1] for s in used],
            token_end=[kept_texts[int(s)][2] for s in used],
            vocab=vocab,
            model=model_identity(model),
            meta=meta,
            lenses=vocab_lenses,
        )

    # -- variants ---------------------------------------------------------------------------------------
    def astype(self, dtype: str) -> "TextBank":
        """The same bank with its vectors stored as ``dtype`` ("float16" or "int8"); other fields shared."""
        return self._replace(store=self.store.astype(dtype), codes=None)

    def shuffled_labels(self, seed: int = 0) -> "TextBank":
        """A control bank: the same vectors with their (token, sentence, position) labels permuted at random
        within each layer, so that a neighbour's label says nothing about its vector. Interpretability measured
        through it should fall to chance."""
        rng = np.random.default_rng(seed)
        perm = np.arange(len(self))
        for layer in self.layers:
            a, b = self.layer_range(layer)
            perm[a:b] = a + rng.permutation(b - a)
        meta = dict(self.meta, control=f"labels shuffled within layers (seed {seed})")
        return self._replace(token_id=self.token_id[perm], sentence=self.sentence[perm], position=self.position[perm], meta=meta)

    def _replace(self, **changes) -> "TextBank":
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        fields.update(changes)
        return TextBank(**fields)

    # -- search -----------------------------------------------------------------------------------------
    def search(self, queries, k: int = 5, *, layers: Sequence[int] | None = None, method: str = "exact",
               nprobe: int | None = None, guide: int | None = None):
        """Top-``k`` entries by cosine for each query, merged over the bank ``layers`` (default: all) into one
        global top-k (docs/definitions.md, "Visual tokens / LatentLens").

        ``queries``: ``[q, d]`` hidden states (any scale; normalized here). ``method``: "exact" (chunked matmul,
        ties broken by smaller row) or "approximate" (the IVF index, built on first use; ``nprobe`` lists per query;
        its candidates rescored against the bank's rows, so scores equal exact search's; with a query guide —
        ``build_index(queries=...)`` — also the lists of the ``guide`` nearest sample queries' neighbours) or
        "refine" (every row
        scored in int8 integer arithmetic, the best 8k re-ranked exactly against the bank's rows: ``refine_topk``;
        a float16 bank makes its int8 codes on first use).
        Returns ``Neighbours`` (``.scores``, ``.ids``, ``.to_frame()``). Raises ``ConfigError`` for k larger than
        the searched entries, unknown layers or a dimension mismatch.

        Example: ``bank.search(run.arrays["resid.hidden.12"][:3], k=5).to_frame()``.
        """
        from lens.analysis.latent import Neighbours

        q = normalize_queries(queries)
        if q.shape[1] != self.d_model:
            raise ConfigError(
                f"queries have {q.shape[1]} dimensions but this bank holds {self.d_model}-dimensional states of "
                f"{self.model['model_id']}; query it with hidden states of that model"
            )
        chosen = self._layers(layers)
        ranges = [self.layer_range(x) for x in chosen]
        total = sum(b - a for a, b in ranges)
        if not 1 <= k <= total:
            raise ConfigError(
                f"k={k} but bank layers {list(chosen)} hold {total} entries; ask for 1 ≤ k ≤ {total} (or build a larger bank)"
            )
        if method == "exact":
            scores, ids = exact_topk(self.store, q, k, ranges=ranges)
        elif method == "refine":
            if self.codes is None:
                self.codes = self.store if self.store.kind == "int8" else self.store.astype("int8")
            scores, ids = refine_topk(self.codes, self.store, q, k, ranges=ranges)
        elif method in ("approximate", "ivf"):
            if self.index is None:
                self.index = IVFIndex.train(self.store, seed=int(self.meta.get("seed", 0)))
            allowed = None
            if set(chosen) != set(self.layers):
                allowed = np.isin(self.layer, np.asarray(chosen))
            scores, ids = self.index.search(q, k, nprobe=nprobe, allowed=allowed, rescore=self.store, guide=guide)
            short = (ids < 0).any(axis=1)
            if short.any():  # fewer than k candidates in the probed lists: answer those queries exactly
                s2, i2 = exact_topk(self.store, q[torch.from_numpy(short)], k, ranges=ranges)
                scores[short], ids[short] = s2, i2
        else:
            raise ConfigError(f"method must be 'exact', 'refine' or 'approximate'; got {method!r}")
        return Neighbours(self, scores, ids, method="approximate" if method == "ivf" else method)

    def build_index(self, *, nlist: int | None = None, nprobe: int | None = None, seed: int | None = None,
                    queries=None, guide_k: int = 10) -> IVFIndex:
        """Train the IVF index for approximate search now (``search(method="approximate")`` does it on first use).

        ``queries``: sample queries ``[t, d]`` of the kind you will ask — e.g. the image-token states of a few
        images at the bank's layers — for the index's query guide (``lens.analysis.ivf.IVFIndex``): image tokens
        are far from the text states' centroids, and the guide finds their neighbours' lists where the centroid
        order does not (``lens bench search``). Saved with the bank.

        Example: ``bank.build_index(queries=np.concatenate([run.arrays[f"resid.hidden.{l}"][image] for l in bank.layers]))``.
        """
        if queries is not None:
            q = normalize_queries(queries)
            if q.shape[1] != self.d_model:
                raise ConfigError(
                    f"guide queries have {q.shape[1]} dimensions but this bank holds {self.d_model}-dimensional states "
                    f"of {self.model['model_id']}; pass hidden states of that model"
                )
        self.index = IVFIndex.train(self.store, nlist=nlist, nprobe=nprobe, queries=queries, guide_k=guide_k,
                                    seed=int(self.meta.get("seed", 0) if seed is None else seed))
        return self.index

    def _layers(self, layers) -> tuple[int, ...]:
        if layers is None:
            return self.layers
        chosen = (int(layers),) if isinstance(layers, (int, np.integer)) else tuple(int(x) for x in layers)
        missing = [x for x in chosen if x not in self.layers]
        if missing or not chosen:
            raise ConfigError(f"bank layers {missing or '[]'} are not in this bank; it holds layers {list(self.layers)}")
        return chosen

    # -- views ------------------------------------------------------------------------------------------
    def to_frame(self):
        """One row per entry: ``layer``, ``token_id``, ``token``, ``sentence``, ``position``, ``text``."""
        import pandas as pd

        return pd.DataFrame({
            "layer": self.layer, "token_id": self.token_id, "token": self.token(np.arange(len(self))),
            "sentence": self.sentence, "position": self.position,
            "text": [self.texts[s] for s in self.sentence.tolist()],
        })

    def summary(self) -> dict[str, Any]:
        n = len(self)
        return {
            "model": self.model["model_id"], "layers": list(self.layers), "entries": n,
            "token_types": int(len(np.unique(self.token_id))), "sentences": len(self.texts), "dtype": self.dtype,
            "per_type_cap": self.meta.get("per_type_cap"), "bytes_per_entry": round(self.nbytes / max(n, 1), 1),
            "tokens_seen": self.meta.get("tokens_seen"),
        }

    def __repr__(self) -> str:
        s = self.summary()
        control = ", CONTROL: labels shuffled" if "control" in self.meta else ""
        return (
            f"TextBank({s['model']!r}, layers={s['layers']}, entries={s['entries']:,}, types={s['token_types']:,}, "
            f"sentences={s['sentences']:,}, dtype={s['dtype']}, cap={s['per_type_cap']}, "
            f"{s['bytes_per_entry']} B/entry{control})"
        )

    def _repr_html_(self) -> str:
        import html

        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self.summary().items())
        return f"<b>lens.TextBank</b><table>{rows}</table>"

    # -- files ------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the bank into ``folder`` (see the module docstring); returns the folder."""
        from lens.analysis.bank_io import save_bank

        return save_bank(self, folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, *, mmap: bool = False) -> "TextBank":
        """Read a bank written by ``TextBank.save``, verifying every file's sha256; never unpickles.

        ``mmap``: map the vectors from the file instead of reading them (read-only): with a saved IVF index,
        approximate search then keeps only the index's int8 lists in memory and reads the bank's rows of its
        candidates from the page cache.

        Raises ``BankFormatError`` for a missing, corrupted or foreign bank — including the ``latentlens``
        package's pickled banks, which lens refuses to load (build the bank with lens instead).
        Example: ``bank = lens.TextBank.load("banks/smollm2")``.
        """
        from lens.analysis.bank_io import load_bank

        return load_bank(folder, mmap=mmap)
