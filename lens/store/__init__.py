"""The team store: runs and scans in a directory, an index database, users, and a persistent job queue.

Notebooks, the command line (``lens store list / import / export / verify / gc``) and the dashboard
(``lens serve``) open the same store::

    import lens.store
    store = lens.store.open("/srv/lens")                               # SQLite index inside the folder
    store = lens.store.open("/shared/lens", index="postgresql://lens@db/lens")   # several hosts
    entry = store.save_run(lens.trace(lm, texts), tags="baseline")
    run = store.load_run(entry.id)
    store.runs()                                                       # DataFrame of the team's runs

Runs are stored as ``lens.Run`` files (safetensors + JSON header), scans as their directories; each
file with its sha256 in the index. Writes are atomic (temp → fsync → rename → index row). See
``docs/serve.md`` for deployment.
"""

from __future__ import annotations

from pathlib import Path

from lens.store.core import Entry, Store, describe_run
from lens.store.jobs import Job, JobQueue, WorkerInfo, Workers
from lens.store.maintenance import GcReport, VerifyReport
from lens.store.users import User, Users

__all__ = ["open", "Store", "Entry", "Job", "JobQueue", "User", "Users", "Workers", "WorkerInfo",
           "VerifyReport", "GcReport", "describe_run"]


def open(path: str | Path, index: str | None = None, *, user: str | None = None, create: bool = True) -> Store:  # noqa: A001
    """Open (or create) the store in directory ``path``.

    ``index``: the index database — default an SQLite file ``path/index.sqlite`` (WAL mode); give a
    PostgreSQL URL (``postgresql://user:password@host/db``) when several hosts share the directory.
    ``user``: who acts when a method is not told (default: the operating-system user).
    ``create=False`` raises ``StoreError`` instead of creating a missing store.

    Example: ``store = lens.store.open("team-store"); store.save_run(run)``.
    """
    return Store(path, index, user=user, create=create)
