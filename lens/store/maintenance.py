"""Keeping a store honest: ``verify`` (rows ↔ files ↔ checksums), ``gc`` (leftovers of interrupted
writes), ``export`` and ``import`` (moving entries between stores with their owners, tags and checksums).

What ``verify`` calls a **problem** breaks the store's promise — a row whose file is missing, a file whose
sha256 differs from its row, stray files inside a stored scan. What it calls **garbage** is what an
interrupted write or delete leaves behind by design: a temporary file, or a complete file that no row
names (the writer died between rename and index row, or a delete died between row and file). Garbage is
invisible to readers; ``gc`` removes it once it is older than a grace period (a write in progress is younger).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from lens.atomic import atomic_path, atomic_write_text, sha256_file
from lens.errors import NotFoundError, StoreError
from lens.run import Run
from lens.store import schema
from lens.store.files import MANIFEST, RUN_FILE, check_id, copy_scan_dir, run_path, scan_path

__all__ = ["VerifyReport", "GcReport", "verify", "gc", "export", "import_path", "EXPORT_MANIFEST"]

EXPORT_MANIFEST = "lens-export.json"
_RUN_NAME = re.compile(r"([0-9a-f]{16})\.lens")
_SCAN_NAME = re.compile(r"[0-9a-f]{16}")
# hidden names inside the store's shard folders are temporary files of a write: lens.atomic's
# ".<name>.<random>.tmp", a scan copy's ".<id>.<random>.tmp/", and the writers' own (safetensors: ".tmpXXXXXX")
_TMP = re.compile(r"\..+")


@dataclass
class VerifyReport:
    """``problems``: broken promises (each a sentence); ``garbage``: leftovers ``gc`` removes; ``foreign``:
    files the store did not write (left alone); ``checked``: entries checked."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    garbage: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        lines = [f"{self.checked} entries checked: {len(self.problems)} problems, {len(self.garbage)} leftover files "
                 f"(lens store gc removes them), {len(self.foreign)} foreign files"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  garbage: {p}" for p in self.garbage[:50]]
        lines += [f"  foreign: {p}" for p in self.foreign[:50]]
        return "\n".join(lines)


@dataclass
class GcReport:
    """What ``gc`` removed (or would remove, ``dry_run``): paths and bytes; ``kept`` are younger than the grace."""

    removed: list[Path] = field(default_factory=list)
    bytes: int = 0
    kept: list[Path] = field(default_factory=list)

    def __str__(self) -> str:
        return f"removed {len(self.removed)} leftover files ({self.bytes / 1e6:.1f} MB); kept {len(self.kept)} younger than the grace period"


def _rows(store) -> tuple[dict[str, str], dict[str, dict[str, tuple[str, int]]]]:
    with store.index.read() as conn:
        kinds = dict(conn.execute(sa.select(schema.entries.c.id, schema.entries.c.kind)).all())
        files: dict[str, dict[str, tuple[str, int]]] = {}
        for r in conn.execute(sa.select(schema.files)):
            files.setdefault(r.entry_id, {})[r.name] = (r.sha256, int(r.size))
    return kinds, files


def _walk(store, kinds: dict[str, str], report: VerifyReport) -> None:
    """Sort what lies under runs/ and scans/ into garbage (temporary or unindexed) and foreign."""
    for shard in sorted((store.root / "runs").iterdir()) if (store.root / "runs").is_dir() else []:
        if not shard.is_dir():
            report.foreign.append(shard)
            continue
        for path in sorted(shard.iterdir()):
            m = _RUN_NAME.fullmatch(path.name)
            if _TMP.fullmatch(path.name):
                report.garbage.append(path)
            elif m and path.is_file():
                if kinds.get(m.group(1)) != "run":
                    report.garbage.append(path)
            else:
                report.foreign.append(path)
    for shard in sorted((store.root / "scans").iterdir()) if (store.root / "scans").is_dir() else []:
        if not shard.is_dir():
            report.foreign.append(shard)
            continue
        for path in sorted(shard.iterdir()):
            if _TMP.fullmatch(path.name):
                report.garbage.append(path)
            elif _SCAN_NAME.fullmatch(path.name) and path.is_dir():
                if kinds.get(path.name) != "scan":
                    report.garbage.append(path)
            else:
                report.foreign.append(path)


def verify(store, *, checksums: bool = True) -> VerifyReport:
    """Check every indexed entry against its files (existence, size, and sha256 unless ``checksums=False``)
    and sort unindexed files into garbage and foreign. Example: ``print(store.verify())``."""
    report = VerifyReport()
    kinds, files = _rows(store)
    for entry_id, kind in sorted(kinds.items()):
        report.checked += 1
        listed = files.get(entry_id, {})
        if not listed:
            report.problems.append(f"{kind} {entry_id} has no files in the index")
            continue
        if kind == "run":
            paths = {RUN_FILE: run_path(store.root, entry_id)}
        else:
            folder = scan_path(store.root, entry_id)
            paths = {name: folder / name for name in listed}
            if folder.is_dir():
                extra = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                               if p.is_file() and str(p.relative_to(folder)) not in listed)
                if extra:
                    report.problems.append(f"scan {entry_id} holds files its index row does not list: {', '.join(extra[:5])}")
        for name, (sha, size) in listed.items():
            path = paths.get(name)
            if path is None:
                report.problems.append(f"run {entry_id} lists an unexpected file {name!r}")
            elif not path.is_file():
                report.problems.append(f"{kind} {entry_id}: {path.relative_to(store.root)} is missing")
            elif path.stat().st_size != size:
                report.problems.append(f"{kind} {entry_id}: {path.relative_to(store.root)} has {path.stat().st_size} bytes, "
                                       f"the index says {size}")
            elif checksums and sha256_file(path) != sha:
                report.problems.append(f"{kind} {entry_id}: {path.relative_to(store.root)} does not match its sha256")
    _walk(store, kinds, report)
    return report


def gc(store, *, grace: float = 3600.0, dry_run: bool = False) -> GcReport:
    """Remove garbage (see :func:`verify`) older than ``grace`` seconds; never touches indexed or foreign files."""
    report = GcReport()
    kinds, _ = _rows(store)
    found = VerifyReport()
    _walk(store, kinds, found)
    now = time.time()
    for path in found.garbage:
        try:
            age = now - path.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < grace:
            report.kept.append(path)
            continue
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        # re-check the index right before removing: a write may have indexed it since the listing
        name = path.name.split(".")[0]
        if _SCAN_NAME.fullmatch(name) and not _TMP.fullmatch(path.name):
            with store.index.read() as conn:
                if conn.execute(sa.select(schema.entries.c.id).where(schema.entries.c.id == name)).first():
                    continue
        if not dry_run:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        report.removed.append(path)
        report.bytes += size
    return report


def export(store, entry_ids: list[str], folder: Path) -> Path:
    """Copy entries into ``folder``: runs as ``<id>.lens``, scans as ``<id>/``, and ``lens-export.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for entry_id in entry_ids:
        entry = store.entry(entry_id)
        if entry.kind == "run":
            src = run_path(store.root, entry.id)
            with atomic_path(folder / f"{entry.id}.lens") as tmp:
                shutil.copyfile(src, tmp)
            if sha256_file(folder / f"{entry.id}.lens") != entry.files.get(RUN_FILE):
                raise StoreError(f"the run {entry.id} does not match its checksum in the store; run lens store verify")
        else:
            dst = folder / entry.id
            if dst.exists():
                shutil.rmtree(dst)
            copied = copy_scan_dir(scan_path(store.root, entry.id), dst)
            if {k: v[0] for k, v in copied.items()} != entry.files:
                raise StoreError(f"the scan {entry.id} does not match its checksums in the store; run lens store verify")
        record = entry.to_dict()
        records.append(record)
    atomic_write_text(folder / EXPORT_MANIFEST, json.dumps({"schema": "lens.store-export/1", "entries": records}, indent=1))
    return folder


def _import_one(store, kind: str, path: Path, *, owner, tags, entry_id=None, created=None, expect=None):
    if entry_id:
        try:
            existing = store.entry(entry_id)
        except NotFoundError:
            existing = None
        if existing is not None:
            if expect and existing.files == expect:
                return existing  # already here, identical: importing twice changes nothing
            entry_id = None  # the id is taken by something else: import under a new id
    if kind == "run":
        if expect and sha256_file(path) != expect.get(RUN_FILE):
            raise StoreError(f"{path} does not match the checksum in its export manifest; the export is damaged")
        run = Run.load(path)  # verifies the file's own checksums
        return store.save_run(run, owner=owner, tags=tags, _id=entry_id, _created=created, _source=path)
    return store.save_scan(path, owner=owner, tags=tags, _id=entry_id, _created=created)


def import_path(store, path: Path, *, owner: str | None = None, tags=None) -> list:
    """Import a ``.lens`` file, a scan directory, or an export folder (keeping ids, owners, tags and times
    unless ``owner``/``tags`` are given). Returns the entries."""
    if path.is_file():
        if path.suffix != ".lens":
            raise StoreError(f"{path} is not a lens run (.lens); import runs, scan folders or an export folder")
        return [_import_one(store, "run", path, owner=owner, tags=tags)]
    if (path / EXPORT_MANIFEST).is_file():
        manifest = json.loads((path / EXPORT_MANIFEST).read_text(encoding="utf-8"))
        out = []
        for record in manifest.get("entries", []):
            entry_id = check_id(record["id"], record.get("kind", "run"))
            src = path / (f"{entry_id}.lens" if record["kind"] == "run" else entry_id)
            out.append(_import_one(store, record["kind"], src, owner=owner or record.get("owner"),
                                   tags=tags if tags is not None else record.get("tags"), entry_id=entry_id,
                                   created=record.get("created"), expect=record.get("files")))
        return out
    if (path / MANIFEST).is_file():
        return [_import_one(store, "scan", path, owner=owner, tags=tags)]
    raise StoreError(f"{path} is neither a .lens run, a scan directory ({MANIFEST}) nor an export folder ({EXPORT_MANIFEST})")
