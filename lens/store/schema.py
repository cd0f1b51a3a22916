"""The index's tables, written once in SQLAlchemy Core so that SQLite and PostgreSQL get the same schema.

==================  ===================================================================================
table               one row per …
==================  ===================================================================================
``lens_entries``    stored run or scan: id, kind, owner, time, model, attention, quant, inputs, preview, tags
``lens_files``      file of an entry, with its sha256 and size (a run has one file, a scan several)
``lens_users``      user: scrypt hash of the password (never the password), role ``member`` or ``admin``
``lens_jobs``       job of the persistent queue: owner, status, parameters, progress, error, result
``lens_workers``    worker process: host, pid, heartbeat, what it is doing, the models it loaded
``lens_settings``   setting shared by every process and host, e.g. the dashboard's cookie secret
==================  ===================================================================================

Times are UNIX seconds (UTC, float). JSON columns are TEXT holding JSON, so that both backends read
them the same way. Ids are random lowercase hex strings (:func:`lens.store.files.new_id`): never paths.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = ["metadata", "entries", "files", "users", "jobs", "workers", "settings", "SCHEMA_VERSION",
           "JOB_STATES", "FINAL_STATES"]

#: Bumped when a table changes; stored in ``lens_settings`` under ``schema_version``.
SCHEMA_VERSION = 1

#: queued → running → done | failed | cancelled (a queued job may go straight to cancelled)
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
FINAL_STATES = ("done", "failed", "cancelled")

metadata = MetaData()

entries = Table(
    "lens_entries",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("kind", String(8), nullable=False),  # "run" | "scan"
    Column("owner", String(64), nullable=False),
    Column("created", Float, nullable=False),
    Column("model", String(512), nullable=False, default=""),
    Column("attention", String(128), nullable=False, default="dense"),
    Column("quant", String(64), nullable=False, default=""),
    Column("n_inputs", Integer, nullable=False, default=0),
    Column("n_tokens", BigInteger, nullable=False, default=0),
    Column("preview", Text, nullable=False, default=""),
    Column("tags", Text, nullable=False, default="[]"),
    Column("vision", Boolean, nullable=False, default=False),
    Column("size_bytes", BigInteger, nullable=False, default=0),
    Column("job_id", String(32)),
    Column("summary", Text, nullable=False, default="{}"),
)
Index("lens_entries_kind_created", entries.c.kind, entries.c.created)

files = Table(
    "lens_files",
    metadata,
    Column("entry_id", String(32), ForeignKey("lens_entries.id", ondelete="CASCADE"), primary_key=True),
    Column("name", String(255), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("size", BigInteger, nullable=False),
)

users = Table(
    "lens_users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("password", String(512), nullable=False),
    Column("role", String(16), nullable=False, default="member"),
    Column("created", Float, nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),
)

jobs = Table(
    "lens_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner", String(64), nullable=False),
    Column("kind", String(16), nullable=False),  # "trace" | "scan"
    Column("status", String(16), nullable=False),
    Column("created", Float, nullable=False),
    Column("started", Float),
    Column("finished", Float),
    Column("model", String(128), nullable=False),
    Column("params", Text, nullable=False),
    Column("progress", Float, nullable=False, default=0.0),
    Column("message", Text, nullable=False, default=""),
    Column("error", Text),
    Column("result_id", String(32)),
    Column("worker_id", String(64)),
    Column("cancel", Boolean, nullable=False, default=False),
)
Index("lens_jobs_status_created", jobs.c.status, jobs.c.created)
Index("lens_jobs_owner_status", jobs.c.owner, jobs.c.status)

workers = Table(
    "lens_workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
    Column("status", String(16), nullable=False),  # loading | idle | busy | stopped | dead
    Column("job_id", String(32)),
    Column("models", Text, nullable=False, default="{}"),
    Column("rss_bytes", BigInteger, nullable=False, default=0),
    Column("jobs_done", Integer, nullable=False, default=0),
    Column("error", Text),
)

settings = Table(
    "lens_settings",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
