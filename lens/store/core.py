"""``Store``: a directory of runs and scans plus an index database, shared by notebooks, workers and the
dashboard (``lens serve``).

A write is temp file → fsync → rename → index row (``lens.atomic``): a crash at any point leaves the
entry whole or absent — at worst a complete file that no row names yet, which ``verify`` reports as
garbage and ``gc`` removes. A delete removes the row first, then the files. Readers trust only rows.
"""

from __future__ import annotations

import getpass
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa

from lens.atomic import atomic_path, sha256_file
from lens.errors import NotFoundError, PermissionDeniedError, StoreError
from lens.run import Run
from lens.store import schema
from lens.store.db import Index
from lens.store.files import RUN_FILE, check_id, copy_scan_dir, new_id, run_path, scan_path

__all__ = ["Store", "Entry", "describe_run", "normalize_tags"]

_PREVIEW_CHARS = 200


@dataclass(frozen=True)
class Entry:
    """One stored run or scan, as its index row says (``files``: {name: sha256}, filled by ``Store.entry``).

    Example: ``store.entry("3f9a0c1be2d47a55").model``.
    """

    id: str
    kind: str
    owner: str
    created: float
    model: str
    attention: str
    quant: str
    n_inputs: int
    n_tokens: int
    preview: str
    tags: tuple[str, ...]
    vision: bool
    size_bytes: int
    job_id: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def created_text(self) -> str:
        """UTC time of creation, ``YYYY-MM-DD HH:MM``."""
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(self.created))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def _from_row(cls, row, files: dict[str, str] | None = None) -> "Entry":
        m = row._mapping
        return cls(
            id=m["id"], kind=m["kind"], owner=m["owner"], created=float(m["created"]), model=m["model"] or "",
            attention=m["attention"] or "dense", quant=m["quant"] or "", n_inputs=int(m["n_inputs"] or 0),
            n_tokens=int(m["n_tokens"] or 0), preview=m["preview"] or "", tags=tuple(json.loads(m["tags"] or "[]")),
            vision=bool(m["vision"]), size_bytes=int(m["size_bytes"] or 0), job_id=m["job_id"],
            summary=json.loads(m["summary"] or "{}"), files=files or {},
        )


def normalize_tags(tags: Iterable[str] | str | None) -> list[str]:
    """Tags as a sorted list of distinct, trimmed, lower-case words (commas or a list).

    Example: ``normalize_tags("Sparse, int8 ,sparse")`` → ``['int8', 'sparse']``.
    """
    if tags is None:
        return []
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    out = sorted({str(t).strip().lower()[:40] for t in items if str(t).strip()})
    if len(out) > 20:
        raise StoreError(f"an entry takes at most 20 tags; got {len(out)}")
    return out


def _is_vision(run: Run) -> bool:
    """Whether a run holds a vision-language model's image tokens (VLM runs record them in their meta or
    under ``vision.``/``image.`` arrays)."""
    if run.meta.get("vision") or run.meta.get("images") or run.meta.get("image_positions") is not None:
        return True
    return any(name.startswith(("vision.", "image.")) for name in run.arrays)


def describe_run(run: Run) -> dict[str, Any]:
    """The index columns of a run: model, attention (kind and mode), quant scheme, sizes, a text preview.

    Example: ``describe_run(run)["attention"]`` → ``'dense'`` or ``'sparse hybrid'``.
    """
    prov = run.provenance
    attn = prov.get("attention") or {}
    attention = str(attn.get("kind", "dense"))
    if attention != "dense":
        mode = attn.get("mode") or attn.get("preset")
        attention = f"{attention} {mode}".strip() if mode else attention
    quant = prov.get("quant") or {}
    texts = [t for t in run.texts if isinstance(t, str)]
    preview = " | ".join(t.replace("\n", " ") for t in texts[:3])
    if not preview and run.tokens:
        preview = " ".join(run.tokens[0][:40])
    return {
        "model": str(prov.get("model_id", "?"))[:512],
        "attention": attention[:128],
        "quant": str(quant.get("scheme", "") if isinstance(quant, dict) else quant)[:64],
        "n_inputs": int(run.n_sequences),
        "n_tokens": int(run.offsets[-1]) if len(run.offsets) else 0,
        "preview": preview[:_PREVIEW_CHARS],
        "vision": _is_vision(run),
        "summary": json.dumps({
            "n_layers": run.meta.get("n_layers"), "n_heads": run.meta.get("n_heads"), "causal": run.meta.get("causal"),
            "lengths": [int(n) for n in run.lengths[:64]], "family": prov.get("family"),
            "created": prov.get("created"), "kept_patterns": len(run.kept_patterns()),
        }),
    }


class Store:
    """A team store: ``root`` (a directory) and an index (``index``: an SQLAlchemy URL; default SQLite in
    ``root/index.sqlite``). Open it with :func:`lens.store.open`.

    ``user`` is who acts when a method is not told (default: the operating-system user). Permission
    checks (``by=``) apply to the dashboard's users: an entry is readable by everyone and deletable by its
    owner or an admin; ``by=None`` acts as the local operator (notebook, command line) and may do anything.

    Example::

        store = lens.store.open("/srv/lens")
        entry = store.save_run(run, tags=["minilm", "baseline"])
        store.load_run(entry.id)
        store.runs()                         # a DataFrame of the team's runs
    """

    def __init__(self, root: str | Path, index: str | None = None, *, user: str | None = None, create: bool = True):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            if not create:
                raise StoreError(f"there is no store at {str(self.root)!r}; create one with lens.store.open(path)")
            self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("runs", "scans"):
            (self.root / sub).mkdir(exist_ok=True)
        self.index = Index(index or self.root / "index.sqlite")
        self.user = user or _os_user()
        from lens.store.jobs import JobQueue, Workers
        from lens.store.users import Users

        self.users = Users(self.index)
        self.jobs = JobQueue(self.index)
        self.workers = Workers(self.index)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r}, index={self.index.display_url!r})"

    # -- writing ------------------------------------------------------------------------------------
    def save_run(self, run: Run, *, owner: str | None = None, tags: Iterable[str] | str | None = None,
                 job_id: str | None = None, _id: str | None = None, _created: float | None = None,
                 _source: Path | None = None) -> Entry:
        """Store ``run`` (atomically, with its sha256) and index it; returns its ``Entry``.

        Example: ``store.save_run(lens.trace(lm, texts), tags="baseline")``.
        """
        if not isinstance(run, Run):
            raise StoreError(f"save_run takes a lens.Run; got {type(run).__name__}")
        entry_id = check_id(_id) if _id else new_id()
        path = run_path(self.root, entry_id)
        if _source is not None:
            # an imported file (already verified by Run.load) is kept byte for byte: saving it again would
            # give other bytes (safetensors orders its metadata keys arbitrarily) and another checksum
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                shutil.copyfile(_source, tmp)
        else:
            run.save(path)
        sha, size = sha256_file(path), path.stat().st_size
        row = {**describe_run(run), "id": entry_id, "kind": "run", "owner": owner or self.user,
               "created": _created or time.time(), "tags": json.dumps(normalize_tags(tags)), "size_bytes": size,
               "job_id": job_id}
        with self.index.write() as conn:
            conn.execute(schema.entries.insert().values(**row))
            conn.execute(schema.files.insert().values(entry_id=entry_id, name=RUN_FILE, sha256=sha, size=size))
            _mark_changed(conn)
        return self.entry(entry_id)

    def save_scan(self, folder: str | Path, *, owner: str | None = None, tags: Iterable[str] | str | None = None,
                  job_id: str | None = None, _id: str | None = None, _created: float | None = None) -> Entry:
        """Copy a finished scan directory (``manifest.json`` + the files it lists) into the store, checking the
        manifest's checksums, and index it with a sha256 per file. Returns its ``Entry``.

        Example: ``store.save_scan(lens.scan(lm, corpus, out="scan-1").folder)``.
        """
        folder = Path(folder)
        entry_id = check_id(_id, "scan") if _id else new_id()
        copied = copy_scan_dir(folder, scan_path(self.root, entry_id))
        manifest = json.loads((scan_path(self.root, entry_id) / "manifest.json").read_text(encoding="utf-8"))
        prov = manifest.get("provenance") or {}
        corpus = manifest.get("corpus") or {}
        attn = prov.get("attention") or {}
        quant = prov.get("quant") or {}
        row = {
            "id": entry_id, "kind": "scan", "owner": owner or self.user, "created": _created or time.time(),
            "model": str(prov.get("model_id") or manifest.get("model", {}).get("model_id", "?"))[:512],
            "attention": str(attn.get("kind", "dense") if isinstance(attn, dict) else attn)[:128],
            "quant": str(quant.get("scheme", "") if isinstance(quant, dict) else quant or "")[:64],
            "n_inputs": int(corpus.get("documents") or 0), "n_tokens": int(corpus.get("tokens") or 0),
            "preview": str(corpus.get("description") or corpus.get("source") or folder.name)[:_PREVIEW_CHARS],
            "tags": json.dumps(normalize_tags(tags)), "vision": False,
            "size_bytes": sum(size for _, size in copied.values()), "job_id": job_id,
            "summary": json.dumps({"schema": manifest.get("schema"), "files": len(copied)}),
        }
        with self.index.write() as conn:
            conn.execute(schema.entries.insert().values(**row))
            conn.execute(schema.files.insert(), [
                {"entry_id": entry_id, "name": name, "sha256": sha, "size": size} for name, (sha, size) in copied.items()
            ])
            _mark_changed(conn)
        return self.entry(entry_id)

    def set_tags(self, entry_id: str, tags: Iterable[str] | str, *, by: str | None = None) -> Entry:
        """Replace an entry's tags (its owner or an admin). Example: ``store.set_tags(id, "int8, sparse")``."""
        entry = self.entry(entry_id)
        self._check_may_change(entry, by, "change the tags of")
        with self.index.write() as conn:
            conn.execute(schema.entries.update().where(schema.entries.c.id == entry.id)
                         .values(tags=json.dumps(normalize_tags(tags))))
            _mark_changed(conn)
        return self.entry(entry.id)

    def delete(self, entry_id: str, *, by: str | None = None) -> None:
        """Delete a run or scan: its owner or an admin only (``PermissionDeniedError`` otherwise).

        The row goes first (readers stop seeing it), then the files; a crash in between leaves files that
        ``gc`` removes. Example: ``store.delete("3f9a0c1be2d47a55", by="ana")``.
        """
        entry = self.entry(entry_id)
        self._check_may_change(entry, by, "delete")
        with self.index.write() as conn:
            conn.execute(schema.files.delete().where(schema.files.c.entry_id == entry.id))
            gone = conn.execute(schema.entries.delete().where(schema.entries.c.id == entry.id)).rowcount
            _mark_changed(conn)
        if not gone:
            raise NotFoundError(f"the {entry.kind} {entry.id} was deleted by someone else meanwhile")
        self._remove_files(entry.kind, entry.id)

    def _remove_files(self, kind: str, entry_id: str) -> None:
        if kind == "run":
            run_path(self.root, entry_id).unlink(missing_ok=True)
        else:
            shutil.rmtree(scan_path(self.root, entry_id), ignore_errors=True)

    def _check_may_change(self, entry: Entry, by: str | None, action: str) -> None:
        if by is None or by == entry.owner:
            return
        if self.users.role(by) == "admin":
            return
        raise PermissionDeniedError(
            f"{by} may not {action} the {entry.kind} {entry.id}: it belongs to {entry.owner}; only its owner or an "
            "admin can"
        )

    # -- reading ------------------------------------------------------------------------------------
    def entry(self, entry_id: str, *, kind: str | None = None) -> Entry:
        """The index row of one entry (with its files' checksums); ``NotFoundError`` when there is none."""
        what = kind or "run or scan"
        entry_id = check_id(entry_id, what)
        with self.index.read() as conn:
            row = conn.execute(sa.select(schema.entries).where(schema.entries.c.id == entry_id)).first()
            files = dict(conn.execute(sa.select(schema.files.c.name, schema.files.c.sha256)
                                      .where(schema.files.c.entry_id == entry_id)).all())
        if row is None or (kind is not None and row._mapping["kind"] != kind):
            raise NotFoundError(f"there is no {what} with id {entry_id} in this store (deleted, or never stored)")
        return Entry._from_row(row, files)

    def load_run(self, entry_id: str, *, verify: bool = False) -> Run:
        """Read a stored run (never unpickles). ``verify`` also checks the file's sha256 against the index.

        Raises ``NotFoundError`` for an unknown id and ``StoreError`` for a missing or damaged file.
        Example: ``run = store.load_run("3f9a0c1be2d47a55")``.
        """
        entry = self.entry(entry_id, kind="run")
        path = run_path(self.root, entry.id)
        if not path.is_file():
            raise StoreError(f"the run {entry.id} is indexed but its file is missing ({path}); run lens store verify")
        if verify and sha256_file(path) != entry.files.get(RUN_FILE):
            raise StoreError(f"the run {entry.id} does not match its checksum ({path}); run lens store verify")
        return Run.load(path)

    def scan_folder(self, entry_id: str) -> Path:
        """The directory of a stored scan (read it with ``lens.Scan.load(folder)``)."""
        entry = self.entry(entry_id, kind="scan")
        return scan_path(self.root, entry.id)

    def entries(self, kind: str | None = None, *, search: str | None = None, owner: str | None = None,
                model: str | None = None, tag: str | None = None, vision: bool | None = None,
                limit: int | None = 1000, offset: int = 0) -> list[Entry]:
        """Entries, newest first, filtered by kind (``"run"``/``"scan"``), owner, model, a tag, VLM runs, and
        a case-insensitive ``search`` over id, owner, model, attention, quant, preview and tags.

        Example: ``store.entries("run", search="paris", owner="ana")``.
        """
        e = schema.entries.c
        query = sa.select(schema.entries).order_by(e.created.desc(), e.id)
        if kind:
            query = query.where(e.kind == kind)
        if owner:
            query = query.where(e.owner == owner)
        if model:
            query = query.where(e.model == model)
        if vision is not None:
            query = query.where(e.vision == vision)
        if tag:
            query = query.where(e.tags.contains(json.dumps(tag.strip().lower()), autoescape=True))
        if search and search.strip():
            term = search.strip().lower()
            query = query.where(sa.or_(*(sa.func.lower(col).contains(term, autoescape=True)
                                         for col in (e.id, e.owner, e.model, e.attention, e.quant, e.preview, e.tags))))
        if limit is not None:
            query = query.limit(limit).offset(offset)
        with self.index.read() as conn:
            return [Entry._from_row(row) for row in conn.execute(query)]

    def runs(self, **filters):
        """The runs as a pandas DataFrame (one row each, newest first); ``filters`` as in :meth:`entries`."""
        import pandas as pd

        rows = [e.to_dict() for e in self.entries("run", **filters)]
        frame = pd.DataFrame(rows, columns=list(Entry.__dataclass_fields__))
        frame["created"] = pd.to_datetime(frame["created"], unit="s", utc=True)
        return frame.drop(columns=["files", "summary", "kind"])

    def count(self, kind: str | None = None) -> int:
        """How many entries (of ``kind``) the store holds."""
        e = schema.entries.c
        query = sa.select(sa.func.count()).select_from(schema.entries)
        if kind:
            query = query.where(e.kind == kind)
        with self.index.read() as conn:
            return int(conn.execute(query).scalar())

    def version(self) -> str:
        """A token that changes whenever an entry is added, deleted or re-tagged (by any process or host)."""
        s = schema.settings
        with self.index.read() as conn:
            return conn.execute(sa.select(s.c.value).where(s.c.key == _CHANGED)).scalar() or ""

    # -- settings -----------------------------------------------------------------------------------
    def setting(self, key: str, default=None) -> str:
        """A setting shared by every process of the store; ``default`` (a value or a function making one) is
        stored the first time, so that every process and host agree (e.g. the cookie secret)."""
        s = schema.settings
        with self.index.read() as conn:
            value = conn.execute(sa.select(s.c.value).where(s.c.key == key)).scalar()
        if value is not None:
            return value
        if default is None:
            raise NotFoundError(f"the store has no setting {key!r}")
        with self.index.write() as conn:
            value = conn.execute(sa.select(s.c.value).where(s.c.key == key)).scalar()
            if value is None:
                value = default() if callable(default) else str(default)
                conn.execute(s.insert().values(key=key, value=value))
        return value

    # -- maintenance (lens/store/maintenance.py) ----------------------------------------------------
    def verify(self, *, checksums: bool = True):
        """Check that every row has its files with the right sha256, and find leftovers of interrupted
        writes; returns a ``VerifyReport`` (see ``lens.store.maintenance``). Example: ``store.verify().ok``."""
        from lens.store.maintenance import verify

        return verify(self, checksums=checksums)

    def gc(self, *, grace: float = 3600.0, dry_run: bool = False):
        """Remove files no row names and temporary files older than ``grace`` seconds (a write in progress is
        younger). Returns a ``GcReport``. Example: ``store.gc(grace=0)``."""
        from lens.store.maintenance import gc

        return gc(self, grace=grace, dry_run=dry_run)

    def import_path(self, path: str | Path, *, owner: str | None = None, tags=None) -> list[Entry]:
        """Import a ``.lens`` run file, a scan directory, or a folder written by :meth:`export`."""
        from lens.store.maintenance import import_path

        return import_path(self, Path(path), owner=owner, tags=tags)

    def export(self, entry_ids: Iterable[str], folder: str | Path) -> Path:
        """Copy entries out of the store into ``folder`` (runs as ``<id>.lens``, scans as ``<id>/``, and
        ``lens-export.json`` with their owners, tags and checksums), for :meth:`import_path` elsewhere."""
        from lens.store.maintenance import export

        return export(self, list(entry_ids), Path(folder))


_CHANGED = "entries_changed"


def _mark_changed(conn) -> None:
    """Inside an entry-changing transaction: a new version token (delete + insert: the same on both backends)."""
    s = schema.settings
    conn.execute(s.delete().where(s.c.key == _CHANGED))
    conn.execute(s.insert().values(key=_CHANGED, value=f"{time.time():.6f}-{new_id()}"))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in this environment (some containers)
        return "local"
