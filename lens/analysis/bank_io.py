"""Saving and loading text banks: safetensors + Parquet + a JSON manifest with sha256 checksums, never pickle.

The layout is described in ``lens.analysis.textbank``. Writing is crash-safe: each data file is written
atomically (``lens.atomic``) under a name that contains its own sha256, the manifest ``bank.json`` — which names
those files — is replaced atomically last, and only then are files no manifest names removed. A crash at any
point leaves the previous bank loadable (or no bank), never a mixture.

Example::

    save_bank(bank, "banks/smollm2")
    load_bank("banks/smollm2")
"""

from __future__ import annotations

import json
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from lens.analysis.ivf import IVFIndex
from lens.analysis.search import VectorStore
from lens.atomic import atomic_path, atomic_write_text, sha256_file
from lens.errors import BankFormatError, MissingDependencyError

__all__ = ["save_bank", "load_bank", "looks_like_latentlens"]

_MANIFEST = "bank.json"


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise MissingDependencyError(
            "text banks store their texts as Parquet: pip install 'lens-interp[latent]' (or pip install pyarrow)"
        ) from exc
    return pa, pq


def _write(folder: Path, stem: str, ext: str, writer) -> dict[str, Any]:
    provisional = folder / f".{stem}.{uuid.uuid4().hex}.{ext}"
    with atomic_path(provisional) as tmp:
        writer(tmp)
    digest = sha256_file(provisional)
    final = folder / f"{stem}-{digest[:16]}.{ext}"
    os.replace(provisional, final)
    return {"name": final.name, "sha256": digest, "bytes": final.stat().st_size}


def save_bank(bank, folder: str | os.PathLike) -> Path:
    """Write ``bank`` (a ``TextBank``) into ``folder``; returns the folder. See the module docstring."""
    from safetensors.numpy import save_file

    from lens.analysis.textbank import SCHEMA

    pa, pq = _pyarrow()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "layer": bank.layer.astype(np.int16), "token_id": bank.token_id.astype(np.int32),
        "sentence": bank.sentence.astype(np.int32), "position": bank.position.astype(np.int32),
    }
    if bank.store.kind == "int8":
        arrays["codes"], arrays["scales"] = bank.store.data, bank.store.scales.astype(np.float32)
        arrays.update(bank.store.transform_arrays())  # mean and rotation (dim_scales in banks saved before them)
    else:
        arrays["vectors"] = bank.store.data.astype(np.float16)
    if bank.lenses is not None:
        arrays.update(bank.lenses.arrays())
    if bank.index is not None:
        arrays.update(bank.index.arrays(bank.store))  # an index of an int8 bank stores its rows once
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    files = {"vectors": _write(folder, "vectors", "safetensors", lambda p: save_file(arrays, p))}
    texts = pa.table({
        "sentence": pa.array(np.arange(len(bank.texts), dtype=np.int32)),
        "text": pa.array(bank.texts, type=pa.string()),
        "token_start": pa.array([a.astype(np.int32) for a in bank.token_start], type=pa.list_(pa.int32())),
        "token_end": pa.array([a.astype(np.int32) for a in bank.token_end], type=pa.list_(pa.int32())),
    })
    files["texts"] = _write(folder, "texts", "parquet", lambda p: pq.write_table(texts, p, compression="zstd"))
    ids = sorted(bank.vocab)
    tokens = pa.table({"token_id": pa.array(ids, type=pa.int32()), "token": pa.array([bank.vocab[i] for i in ids], type=pa.string())})
    files["tokens"] = _write(folder, "tokens", "parquet", lambda p: pq.write_table(tokens, p, compression="zstd"))
    manifest = {
        "schema": SCHEMA, "model": bank.model, "meta": bank.meta, "dtype": bank.store.kind, "entries": len(bank),
        "layers": list(bank.layers), "d_model": bank.d_model,
        "lenses": bank.lenses.describe() if bank.lenses is not None else None,
        "index": {"nprobe": bank.index.nprobe} if bank.index is not None else None,
        "files": files,
    }
    atomic_write_text(folder / _MANIFEST, json.dumps(manifest, indent=1, default=_json_default))
    keep = {f["name"] for f in files.values()} | {_MANIFEST}
    for old in folder.iterdir():  # files of earlier saves that no manifest names any more
        if old.is_file() and old.name not in keep and old.name.split("-")[0] in ("vectors", "texts", "tokens"):
            old.unlink(missing_ok=True)
    return folder


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def looks_like_latentlens(path: Path) -> bool:
    """Whether ``path`` is a bank written by the ``latentlens`` package (pickled ``layer_N/embeddings_cache.pt``)."""
    if path.is_dir():
        if any(path.glob("layer_*/embeddings_cache.pt")):
            return True
        meta = path / "metadata.json"
        if meta.is_file():
            try:
                data = json.loads(meta.read_text())
            except (OSError, ValueError):
                return False
            return isinstance(data, dict) and "hidden_dim" in data and "layers" in data
        return False
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".pkl", ".pickle"):
            return True
        with open(path, "rb") as fh:
            head = fh.read(4)
        if head[:1] == b"\x80":  # a pickle protocol 2+ opcode
            return True
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith("data.pkl") for n in zf.namelist())
    return False


def _refuse_pickle(path: Path) -> BankFormatError:
    return BankFormatError(
        f"{str(path)!r} is a pickled bank (the latentlens package's layer_N/embeddings_cache.pt format, written by "
        "torch.save). lens never unpickles a file: loading a pickle runs whatever code it contains. Build the bank "
        "with lens from the same corpus instead — lens.TextBank.build(model, corpus, layers=[...]) — and save it "
        "with bank.save(folder) (safetensors + Parquet, checksummed)"
    )


_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I8": np.int8}


def memmap_tensor(path: Path, name: str) -> np.ndarray:
    """A read-only ``np.memmap`` of tensor ``name`` in the safetensors file ``path``.

    Hand-written because safetensors' numpy API returns copies. The layout is the format's documented one: an
    8-byte little-endian header size N, N bytes of JSON giving each tensor's dtype, shape and
    ``data_offsets`` (relative to byte 8 + N), then the data, row-major.
    """
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    entry = header[name]
    start, stop = entry["data_offsets"]
    dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
    shape = tuple(entry["shape"])
    if stop - start != int(np.prod(shape)) * dtype.itemsize:
        raise BankFormatError(f"{str(path)!r}: tensor {name!r} has {stop - start} bytes for shape {shape}; build the bank again")
    if stop == start:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + size + start, shape=shape)


def load_bank(folder: str | os.PathLike, *, mmap: bool = False):
    """Read a bank written by ``save_bank``; verify every file's sha256; refuse pickles. See the module docstring.

    ``mmap``: the vectors (float16 rows, or int8 codes) are memory-mapped from the file rather than read."""
    from safetensors import safe_open

    from lens.analysis.textbank import SCHEMA, TextBank
    from lens.analysis.vocab_lens import VocabularyLenses

    path = Path(folder)
    if not path.exists():
        raise BankFormatError(f"there is no text bank at {str(path)!r}; build one with lens.TextBank.build(...).save(folder)")
    if looks_like_latentlens(path):
        raise _refuse_pickle(path)
    if not (path.is_dir() and (path / _MANIFEST).is_file()):
        raise BankFormatError(
            f"{str(path)!r} is not a lens text bank (no {_MANIFEST}); load the folder written by bank.save(folder)"
        )
    try:
        manifest = json.loads((path / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BankFormatError(f"{str(path / _MANIFEST)!r} is unreadable ({exc}); the bank is corrupted — build it again") from exc
    if manifest.get("schema") != SCHEMA:
        raise BankFormatError(
            f"{str(path)!r} has schema {manifest.get('schema')!r}; this lens reads {SCHEMA!r}. Build the bank again with "
            "this version of lens"
        )
    files = manifest.get("files", {})
    for role in ("vectors", "texts", "tokens"):
        entry = files.get(role)
        where = path / entry["name"] if entry else None
        if where is None or not where.is_file():
            raise BankFormatError(f"the bank at {str(path)!r} is missing its {role} file; build and save it again")
        if where.stat().st_size != entry["bytes"] or sha256_file(where) != entry["sha256"]:
            raise BankFormatError(
                f"{str(where)!r} does not match the sha256 in {_MANIFEST}: the file was changed or corrupted. "
                "Build and save the bank again"
            )
    pa, pq = _pyarrow()
    try:
        vectors_file = path / files["vectors"]["name"]
        with safe_open(str(vectors_file), framework="numpy") as fh:
            mapped = {"vectors", "codes"} & set(fh.keys()) if mmap else set()
            arrays = {name: fh.get_tensor(name) for name in fh.keys() if name not in mapped}
        arrays.update({name: memmap_tensor(vectors_file, name) for name in mapped})
        texts = pq.read_table(path / files["texts"]["name"])
        tokens = pq.read_table(path / files["tokens"]["name"])
    except Exception as exc:  # checksums matched, so this is a file lens did not write
        raise BankFormatError(f"{str(path)!r} could not be read ({type(exc).__name__}: {exc}); build the bank again") from exc
    if "codes" in arrays:
        store = VectorStore.int8_from_arrays(arrays["codes"], arrays["scales"], arrays)
    else:
        store = VectorStore("float16", arrays["vectors"])
    index = None
    if "ivf.centroids" in arrays:
        index = IVFIndex.from_arrays(arrays, int((manifest.get("index") or {}).get("nprobe") or 32), store)
    lenses = VocabularyLenses.from_arrays(arrays, manifest["lenses"]) if manifest.get("lenses") else None
    columns = texts.to_pydict()
    bank = TextBank(
        store=store, layer=arrays["layer"], token_id=arrays["token_id"], sentence=arrays["sentence"],
        position=arrays["position"], texts=columns["text"],
        token_start=[np.asarray(a, dtype=np.int32) for a in columns["token_start"]],
        token_end=[np.asarray(a, dtype=np.int32) for a in columns["token_end"]],
        vocab=dict(zip(tokens.column("token_id").to_pylist(), tokens.column("token").to_pylist())),
        model=manifest["model"], meta=manifest.get("meta", {}), lenses=lenses, index=index,
    )
    n = len(bank.store)
    if not all(len(a) == n for a in (bank.layer, bank.token_id, bank.sentence, bank.position)) or n != manifest.get("entries"):
        raise BankFormatError(f"the bank at {str(path)!r} is internally inconsistent (entry counts differ); build it again")
    if n and (bank.sentence.max() >= len(bank.texts) or np.any(np.diff(bank.layer) < 0)):
        raise BankFormatError(f"the bank at {str(path)!r} is internally inconsistent (sentence ids or layer order); build it again")
    return bank
