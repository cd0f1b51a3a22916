"""Where entries live inside the store directory, and how a scan directory is copied in atomically.

Layout (``<id>`` is 16 random hex digits; the two-digit shard keeps folders small in a large store)::

    <store>/index.sqlite                 the index (unless --index points at PostgreSQL)
    <store>/runs/<id[:2]>/<id>.lens      a run: safetensors + JSON header (lens.Run.save)
    <store>/scans/<id[:2]>/<id>/         a scan: its directory, manifest.json + the files it lists
    <store>/exports/                     nothing by default; ``lens store export`` writes where it is told

Every path is computed from an id that matched ``[0-9a-f]{16}``: no name that arrives in a request is
ever joined to a path, so nothing outside the store can be reached through one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path

from lens.atomic import _fsync_dir, file_mode
from lens.errors import NotFoundError, StoreError

__all__ = ["new_id", "check_id", "run_path", "scan_path", "copy_scan_dir", "MANIFEST", "RUN_FILE"]

_ID = re.compile(r"[0-9a-f]{16}")
MANIFEST = "manifest.json"
RUN_FILE = "run.lens"  # the name a run's single file has in the index's files table


def new_id() -> str:
    """A fresh entry or job id: 16 lowercase hex digits (64 random bits). Example: ``'3f9a0c1be2d47a55'``."""
    return secrets.token_hex(8)


def check_id(value: object, what: str = "run") -> str:
    """``value`` if it is a well-formed id, else ``NotFoundError`` (an id that cannot exist, e.g. ``../x``).

    Example: ``check_id("3f9a0c1be2d47a55")``; ``check_id("../../etc/passwd")`` raises ``NotFoundError``.
    """
    if isinstance(value, str) and _ID.fullmatch(value):
        return value
    shown = repr(value)[:60]
    raise NotFoundError(f"there is no {what} with id {shown} in this store; ids are 16 hex digits, see `lens store list`")


def run_path(root: Path, entry_id: str) -> Path:
    entry_id = check_id(entry_id)
    return root / "runs" / entry_id[:2] / f"{entry_id}.lens"


def scan_path(root: Path, entry_id: str) -> Path:
    entry_id = check_id(entry_id, "scan")
    return root / "scans" / entry_id[:2] / entry_id


def _scan_files(src: Path) -> list[str]:
    """The files of a scan directory to copy: the manifest and what it lists (all regular files if it lists
    none). Symbolic links and names that leave the folder are refused."""
    manifest_path = src / MANIFEST
    if not manifest_path.is_file():
        raise StoreError(f"{str(src)!r} is not a scan directory: it has no {MANIFEST}; give the folder lens.scan wrote")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StoreError(f"the manifest of {str(src)!r} is not readable JSON ({exc}); the scan is damaged") from exc
    if not isinstance(manifest, dict):
        raise StoreError(f"the manifest of {str(src)!r} is not a JSON object; the scan is damaged")
    if manifest.get("status", "complete") != "complete":
        raise StoreError(
            f"the scan in {str(src)!r} is not finished (status {manifest.get('status')!r}); resume it with "
            "lens.scan(..., resume=True) and store it once it is complete"
        )
    listed = manifest.get("files")
    if isinstance(listed, dict) and listed:
        names = sorted(listed)
    else:
        names = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file() and p.name != MANIFEST)
    for name in names:
        path = src / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise StoreError(f"the scan in {str(src)!r} lists {name!r}, which leaves its folder; refusing to copy it")
        if path.is_symlink() or not path.is_file():
            raise StoreError(f"the scan in {str(src)!r} lists {name!r}, which is missing or not a regular file")
    return [MANIFEST, *names]


def _copy_file(src: Path, dst: Path) -> tuple[str, int]:
    """Copy with fsync; return (sha256, size) computed from the bytes written."""
    digest = hashlib.sha256()
    size = 0
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for block in iter(lambda: fin.read(1 << 20), b""):
            digest.update(block)
            fout.write(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    os.chmod(dst, file_mode())
    return digest.hexdigest(), size


def copy_scan_dir(src: Path, dst: Path) -> dict[str, tuple[str, int]]:
    """Copy the scan directory ``src`` to ``dst`` atomically; return {file name: (sha256, size)}.

    Files go to a hidden temporary folder next to ``dst``, each fsynced; the folder is synced and renamed to
    ``dst``, and the parent synced: a crash leaves either no ``dst`` or a complete one. Files that the
    scan's manifest checksums are checked against it while copying (``StoreError`` on a mismatch).
    """
    src = Path(src)
    names = _scan_files(src)
    listed = json.loads((src / MANIFEST).read_text(encoding="utf-8")).get("files") or {}
    if dst.exists():
        raise StoreError(f"{dst} already exists in the store; this should not happen (ids are random) — run lens store verify")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        out: dict[str, tuple[str, int]] = {}
        for name in names:
            sha, size = _copy_file(src / name, tmp / name)
            expected = listed.get(name) if isinstance(listed, dict) else None
            if isinstance(expected, str) and expected != sha:
                raise StoreError(
                    f"{name} in {str(src)!r} does not match the sha256 in its manifest; the scan is damaged"
                )
            out[name] = (sha, size)
        for folder in sorted({(tmp / n).parent for n in names}, key=lambda p: -len(p.parts)):
            _fsync_dir(folder)
        os.rename(tmp, dst)
        _fsync_dir(dst.parent)
        return out
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
