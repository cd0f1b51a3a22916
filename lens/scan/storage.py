"""The on-disk layout of a scan: a directory with a JSON manifest, safetensors and Parquet files.

=======================  ======================================================================================
file                     what it holds
=======================  ======================================================================================
``manifest.json``        schema, status, provenance, model identity, corpus description and fingerprint, config,
                         per-shard records, and a sha256 for every other file
``checkpoint.safetensors``  while running: the merged state of the completed shards (+ their records in its header)
``stats.safetensors``    when complete: the dense statistics (neurons, histograms, attention, residual, routing)
``examples.parquet``     top-k examples: one row per (layer, neuron, rank) with context tokens and activations
``samples.parquet``      quantile samples: one row per (layer, neuron, group, slot)
``routing.parquet``      MoE: top tokens by gate per (layer, expert)
``logits.parquet``       logit effects: the tokens each neuron writes towards / away from
=======================  ======================================================================================

Every file is written atomically (``lens.atomic``); the manifest last, so a directory whose manifest says
``complete`` has every file it lists, with the listed checksum. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lens.atomic import atomic_path, atomic_write_text, sha256_file
from lens.errors import ScanFormatError

__all__ = ["SCHEMA", "write_checkpoint", "read_checkpoint", "write_manifest", "read_manifest", "write_parquet",
           "write_stats", "CHECKPOINT", "MANIFEST", "STATS"]

SCHEMA = "lens.scan/1"
MANIFEST = "manifest.json"
CHECKPOINT = "checkpoint.safetensors"
STATS = "stats.safetensors"
_META = "lens.scan"


def _json(obj: Any) -> str:
    def default(o):
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, (np.ndarray,)):
            return o.tolist()
        return str(o)

    return json.dumps(obj, default=default, indent=1)


def write_checkpoint(folder: Path, state: dict[str, np.ndarray], header: dict[str, Any]) -> None:
    """Atomically replace the checkpoint with ``state`` (the merged shards) and ``header`` (their records)."""
    from safetensors.numpy import save_file

    with atomic_path(folder / CHECKPOINT) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp), metadata={_META: _json(header)})


def read_checkpoint(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
    """The checkpoint's state and header, or None when there is none. A corrupt one raises ``ScanFormatError``."""
    from safetensors import safe_open

    path = folder / CHECKPOINT
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="numpy") as fh:
            header = json.loads((fh.metadata() or {})[_META])
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:
        raise ScanFormatError(
            f"the checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); it was not written by "
            "lens or is damaged. Move it away and run the scan again without resume=True"
        ) from exc
    return state, header


def write_stats(folder: Path, arrays: dict[str, np.ndarray], header: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    with atomic_path(folder / STATS) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata={_META: _json(header)})


def write_parquet(path: Path, columns) -> None:
    """One Parquet file (pyarrow, zstd), written atomically.

    ``columns``: a dict of columns (one table), or an iterable of such dicts with the same columns and types,
    written one after another (a row group each), so that only one part is in memory at a time — a scan's
    examples and samples are written a layer at a time (5·10⁶ context strings on the benchmark corpus).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = [columns] if isinstance(columns, dict) else columns
    with atomic_path(path) as tmp:
        writer = None
        try:
            for part in parts:
                table = pa.table(part)
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp), table.schema, compression="zstd")
                writer.write_table(table)
                del table
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"no columns to write to {str(path)!r}")


def write_manifest(folder: Path, manifest: dict[str, Any], files: list[str]) -> None:
    """Write the manifest last, with the sha256 of every listed file."""
    manifest = dict(manifest)
    manifest["files"] = {name: sha256_file(folder / name) for name in files}
    atomic_write_text(folder / MANIFEST, _json(manifest))


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file() and (Path(folder) / CHECKPOINT).is_file():  # the manifest is written when a scan finishes
        raise ScanFormatError(
            f"the scan in {str(folder)!r} is not finished (it holds a checkpoint, no {MANIFEST}); finish it with "
            f"lens.scan(model, corpus, out={str(folder)!r}, resume=True) and the same model, corpus and options"
        )
    if not path.is_file():
        raise ScanFormatError(
            f"there is no lens scan in {str(folder)!r} (no {MANIFEST}); create one with lens.scan(model, corpus, out=...)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ScanFormatError(f"{str(path)!r} is not readable JSON ({exc}); the scan directory is damaged") from exc
    if manifest.get("schema") != SCHEMA:
        raise ScanFormatError(
            f"{str(path)!r} has schema {manifest.get('schema')!r}; this lens reads {SCHEMA!r}. Scan again with this lens"
        )
    return manifest
