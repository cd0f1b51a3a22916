"""``lens.scan``: reduce a whole corpus through the probes into a ``Scan`` (docs/definitions.md, "Corpus scans")."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lens.errors import ConfigError, ScanError
from lens.scan.config import parse_config
from lens.scan.corpus import read_corpus
from lens.scan.engine import run_local, run_ray, shards
from lens.scan.finalize import finalize
from lens.scan.result import Scan
from lens.scan.storage import (
    CHECKPOINT,
    MANIFEST,
    SCHEMA,
    read_checkpoint,
    write_checkpoint,
    write_manifest,
)
from lens.scan.worker import ShardWorker, empty_state

__all__ = ["model_identity", "scan"]


def model_identity(lm) -> dict[str, Any]:
    """What makes two models the same for a resumed scan: shape, deployment and a sha256 of the weights.

    Every tensor of the state dict is hashed by its bytes; a tensor subclass (torchao's ``Int8Tensor`` of
    ``quant="int8"``, which has no byte view and no reshape) by its inner tensors and its metadata, through
    PyTorch's ``__tensor_flatten__`` protocol. Raises ``ScanError`` for a tensor whose bytes cannot be read.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(lm.model.state_dict().items()):
        digest.update(name.encode())
        _hash_tensor(digest, name, tensor)
    prov = lm.provenance()
    return {
        "model_id": lm.model_id,
        "architecture": prov.get("architecture"),
        "n_layers": lm.n_layers,
        "d_model": lm.d_model,
        "d_mlp": lm.d_mlp,
        "attention": prov.get("attention"),
        "quant": prov.get("quant"),
        "dtype": prov.get("dtype"),
        "weights_sha256": digest.hexdigest(),
    }


def _hash_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed one tensor's dtype, shape and bytes to ``digest``; a wrapper subclass through its inner tensors."""
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        inner, meta = tensor.__tensor_flatten__()
        # the metadata (block size, dtype, ...) decides how the inner tensors decode: part of the identity
        digest.update(f"{type(tensor).__qualname__}|{meta!r}".encode())
        for attr in inner:
            digest.update(attr.encode())
            _hash_tensor(digest, f"{name}.{attr}", getattr(tensor, attr))
        return
    try:  # (a plain tensor is hashed exactly as before subclasses were handled: old checkpoints still resume)
        raw = tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy()
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        raise ScanError(
            f"lens.scan cannot read the bytes of weight {name!r} ({type(tensor).__name__}: {exc}), so it cannot "
            "fingerprint the model for resume; dequantize that layer or load the model without this quantization"
        ) from exc
    digest.update(raw)


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def scan(
    model,
    corpus,
    *,
    out: str | os.PathLike | None = None,
    layers=None,
    top_k: int = 20,
    context: tuple[int, int] = (8, 4),
    samples: int = 3,
    batch_size: int = 8,
    max_len: int | None = None,
    stride: int | None = None,
    shard_size: int = 64,
    field: str | None = None,
    pattern: str = "*.txt",
    encoding: str = "utf-8",
    engine: str = "local",
    address: str | None = None,
    workers: int = 2,
    threads: int | None = None,
    resume: bool = False,
    logit_effects: int = 10,
    epsilon: float = 0.3,
    tau: float = 5.0,
    massive_abs: float = 100.0,
    massive_rel: float = 1000.0,
    prepend_bos: bool | None = None,
    interventions=(),
    progress: bool | None = None,
) -> Scan:
    """Reduce every neuron, head and layer of ``model`` over a whole corpus, streaming, into a :class:`Scan`.

    Definitions: docs/definitions.md, "Corpus scans", "Neuron activation" and "MoE routing". Per MLP layer ℓ
    and neuron n, over every real token of the corpus: count, mean, variance (Chan et al. 1979 pairwise merge),
    min, max, fraction > 0, a histogram on fixed edges (sign × 10⁻⁴…10⁴, four bins per decade, plus an exact-zero
    bin); the ``top_k`` highest activations, at most one per document, ties broken by (value desc, document
    asc, position asc), each with ``context`` = (before, after) tokens and their activations, the attention
    mass the position receives, whether it is a sink token (mass > τ × uniform share in any head) and its
    massive-activation ratio (max |x| ÷ median |X|, Sun et al. 2024); ``samples`` quantile samples per
    sign × decade group, chosen by a hash priority of (document, position) so that every partition gives the
    same samples; and for language models the logit effects W_U·(γ_final ⊙ W_out[:, n]) (top and bottom
    ``logit_effects`` tokens). Per layer and head over windows: the sink-score distribution, the sink rate,
    both matrix entropies (mean, std, min, max, histogram) and massive-activation counts. MoE models add
    per-expert load, gate mass, routing entropy, load-balance CV, top tokens by gate and expert neurons
    (layer, expert, neuron) over the tokens routed to each expert.

    ``model``: a ``LensModel`` (``lens.load(...)``, deployed as you like), or a folder / hub id to load.
    ``corpus``: a list of strings, a text file (one document per line), a folder of ``*.txt`` files, a
    JSONL file or a pandas DataFrame or ``datasets.Dataset`` with ``field=`` naming the text, or any iterable
    of strings (see ``lens.scan.corpus.read_corpus``); ``pattern``: which files of a folder are documents
    (default ``"*.txt"``); ``encoding``: of text, JSONL and folder files (default UTF-8). Documents longer
    than ``max_len`` tokens (default: the model's positions) are cut into windows every ``stride`` tokens (default ¾ of ``max_len``); each token is
    counted once. ``layers``: MLP layers to reduce (default all). ``batch_size``: windows per forward pass.
    ``shard_size``: documents per checkpoint. ``engine``: ``"local"`` or ``"ray"`` (Ray Data, ``workers``
    actors of ``threads`` threads each; ``address`` joins an existing cluster). ``out``: the scan directory
    (default: a new temporary one); ``resume=True`` continues an interrupted scan in ``out`` and gives the
    same result as an uninterrupted one. Memory does not grow with the corpus.

    ``interventions``: ``lens.Ablate`` / ``lens.Clamp`` / ``lens.ScaleAttention`` objects applied in every
    forward pass, as in ``lens.trace`` (recorded in the manifest's config; compare with a clean scan through
    ``lens.compare``). Positions (and ``ScaleAttention`` keys, and ``kind="mean"``) are positions of a whole
    document, so every document must then fit in one window (``ScanError`` otherwise); a ``Patch`` has no
    counterpart in a streamed corpus (``ConfigError``).

    Raises ``CorpusError`` (unreadable files, a wrong JSONL field or column, an empty corpus, non-text
    items), ``ConfigError`` (options that do not fit the model), ``ScanError`` (``out`` already holds a scan
    and ``resume`` is False; or ``resume=True`` with a different model, corpus or options — nothing
    checkpointed is touched) and ``MissingDependencyError`` (``engine="ray"`` without Ray).

    Example::

        lm = lens.load()
        s = lens.scan(lm, "docs.jsonl", field="text", out="scans/minilm")
        s.to_frame().sort_values("max", ascending=False).head()
        s.examples(layer=3, neuron=42)
    """
    if model is None or isinstance(model, (str, os.PathLike)):
        from lens.models.load import load

        model = load(model)  # a folder or hub id (None: the embedded model)
    if engine not in ("local", "ray"):
        raise ConfigError(f"engine must be 'local' or 'ray'; got {engine!r}")
    cfg = parse_config(model, layers=layers, top_k=top_k, context=context, samples=samples, batch_size=batch_size,
                       max_len=max_len, stride=stride, shard_size=shard_size, epsilon=epsilon, tau=tau,
                       massive_abs=massive_abs, massive_rel=massive_rel, prepend_bos=prepend_bos,
                       interventions=interventions)
    import numbers

    if isinstance(logit_effects, bool) or not isinstance(logit_effects, numbers.Integral) or logit_effects < 0:
        raise ConfigError(f"logit_effects must be a whole number of tokens ≥ 0 (0: none); got {logit_effects!r}")
    docs = read_corpus(corpus, field=field, pattern=pattern, encoding=encoding)
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="lens-scan-"))
    blocked = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ScanError(f"out={str(folder)!r} cannot be a directory: {str(blocked)!r} is a file; choose another out= path")
    folder.mkdir(parents=True, exist_ok=True)
    identity = model_identity(model)
    header = {"schema": SCHEMA, "model": identity, "config": cfg.identity(), "corpus": docs.describe, "shards": []}
    state = empty_state(model, cfg)
    done = 0
    existing = read_checkpoint(folder)
    if (folder / MANIFEST).exists() or existing is not None:
        if not resume:
            raise ScanError(
                f"{str(folder)!r} already holds a scan; pass resume=True to continue it, Scan.load({str(folder)!r}) "
                "to read a finished one, or choose another out= directory"
            )
        if existing is None:  # a finished scan: nothing left to do — if it is the scan asked for
            finished = Scan.load(folder)
            saved_config = {k: v for k, v in finished.manifest.get("config", {}).items() if k != "extra"}
            changed = _differences(finished.manifest.get("model", {}), identity) + _differences(
                {"interventions": [], **saved_config}, header["config"])
            if changed:
                raise ScanError(
                    f"resume=True, but {str(folder)!r} holds a finished scan with a different model or options "
                    f"({', '.join(changed)}); scan into another out= directory"
                )
            _check_finished_corpus(finished, docs, cfg.shard_size, folder)
            return finished
        state, saved = existing
        changed = _differences(saved["model"], identity)
        if changed:
            raise ScanError(
                f"resume=True with a different model than the one that started {str(folder)!r} (differs in "
                f"{', '.join(changed)}); resume with the same model, or scan into another out= directory. "
                "The checkpoint is untouched"
            )
        changed = _differences(saved["config"], header["config"])
        if changed:
            raise ScanError(
                f"resume=True with different options ({', '.join(changed)}) than the scan in {str(folder)!r}; "
                "pass the same options. The checkpoint is untouched"
            )
        # a scan started from a generator is resumed from the same documents as a list or file: its shards'
        # digests (checked below, shard by shard) say whether they are the same
        if saved["corpus"] != docs.describe and saved["corpus"].get("kind") != "iterable":
            raise ScanError(
                f"resume=True with a different corpus ({docs.describe}) than the one in {str(folder)!r} "
                f"({saved['corpus']}); pass the same corpus. The checkpoint is untouched"
            )
        if not docs.reopenable:
            raise ScanError("a one-shot iterable (a generator) cannot resume a scan: the documents already scanned "
                            "are gone from it. Pass the same documents as a list or a file; each checkpointed "
                            "shard is checked against them. The checkpoint is untouched")
        header["shards"] = saved["shards"]
        done = len(saved["shards"])

    # the corpus's own fingerprint, independent of shard_size (lens.compare checks it): every (document id, text)
    documents = hashlib.sha256()

    def feed(shard_docs: list) -> None:
        from lens.scan.corpus import text_digest

        for doc, text in shard_docs:
            documents.update(doc.to_bytes(8, "little") + text_digest(text))

    def fed(iterator):
        for index, shard_docs in iterator:
            feed(shard_docs)
            yield index, shard_docs

    def verify(index: int, shard_docs: list) -> None:
        record = header["shards"][index]
        feed(shard_docs)
        if _shard_digest(shard_docs) != record["sha256"]:
            raise ScanError(
                f"shard {index} of the corpus differs from the one checkpointed in {str(folder)!r} (documents "
                f"{record['first_doc']}–{record['last_doc']}); resume with the same corpus. The checkpoint is untouched"
            )

    def on_shard(new_state, info) -> None:
        header["shards"].append(info)
        write_checkpoint(folder, new_state, header)

    tokens_done = sum(r["tokens"] for r in header["shards"])
    show = progress if progress is not None else None
    bar = tqdm(desc=f"lens.scan {model.model_id.split('/')[-1]}", unit="tok", unit_scale=True, initial=tokens_done,
               disable=(None if show is None else not show), dynamic_ncols=True, smoothing=0.1)
    iterator = fed(shards(docs, cfg.shard_size, skip=done, check=verify))
    try:
        if engine == "local":
            state = run_local(ShardWorker(model, cfg), iterator, state, on_shard, bar.update)
        else:
            state = run_ray(model, cfg, iterator, state, on_shard, bar.update, address=address, workers=workers,
                            threads=threads or max(1, (os.cpu_count() or 2) // max(workers, 1)))
    finally:
        bar.close()
    if not header["shards"]:
        from lens.errors import CorpusError

        raise CorpusError(
            f"the corpus has no documents with text ({docs.skipped} blank skipped); pass at least one non-empty document"
        )
    manifest = {
        "schema": SCHEMA,
        "status": "complete",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "engine": engine,
        "provenance": model.provenance(),
        "model": identity,
        "config": cfg.to_json(),
        "corpus": {**docs.describe, "documents": sum(r["documents"] for r in header["shards"]),
                   "skipped_blank": docs.skipped,
                   "sha256": _fingerprint(header["shards"]), "documents_sha256": documents.hexdigest()},
        "shards": header["shards"],
    }
    files = finalize(folder, model, cfg, state, logit_effects=logit_effects)
    write_manifest(folder, manifest, files)
    (folder / CHECKPOINT).unlink(missing_ok=True)
    return Scan.load(folder)


def _shard_digest(shard_docs: list) -> str:
    """sha256 of one shard's (document id, text) pairs, as ``ShardWorker.run_shard`` records it."""
    from lens.scan.corpus import text_digest

    digest = hashlib.sha256()
    for doc, text in shard_docs:
        digest.update(doc.to_bytes(8, "little") + text_digest(text))
    return digest.hexdigest()


def _check_finished_corpus(finished, docs, shard_size: int, folder: Path) -> None:
    """Raise ``ScanError`` unless ``docs`` are, shard for shard, the documents ``finished`` scanned (it reads the
    corpus once, without the model: a resumed finished scan returns at once only when it is the scan asked for)."""
    records = finished.manifest.get("shards", [])
    count = 0
    for index, shard_docs in shards(docs, shard_size):
        if index >= len(records) or _shard_digest(shard_docs) != records[index]["sha256"]:
            raise ScanError(
                f"resume=True, but {str(folder)!r} holds a finished scan of a different corpus (shard {index}, "
                f"documents {shard_docs[0][0]}–{shard_docs[-1][0]}, differs); pass the same corpus, or scan into "
                "another out= directory"
            )
        count = index + 1
    if count != len(records):
        raise ScanError(
            f"resume=True, but {str(folder)!r} holds a finished scan of a longer corpus ({len(records)} shards of "
            f"{shard_size} documents; this corpus fills {count}); pass the same corpus, or scan into another out= "
            "directory"
        )


def _fingerprint(records: list[dict]) -> str:
    digest = hashlib.sha256()
    for record in records:
        digest.update(bytes.fromhex(record["sha256"]))
    return digest.hexdigest()
