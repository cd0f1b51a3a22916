"""The store's index database through SQLAlchemy Core: SQLite in WAL mode by default, PostgreSQL for teams.

SQLite (``sqlite:////path/index.sqlite``, the default inside the store directory) is set up for several
processes on one host: write-ahead logging (readers never block the writer), ``synchronous=FULL`` (a commit
survives a power cut), a 30 s busy timeout, foreign keys on, and write transactions opened with
``BEGIN IMMEDIATE`` so that two writers queue for the lock instead of failing when a read upgrades to a
write (SQLAlchemy's documented recipe: switch off the driver's own BEGIN and emit ours).

PostgreSQL (``postgresql://user:password@host/db``, through psycopg 3) is for several hosts sharing one
store; the same tables are created there. Claiming a job locks the jobs table for the few milliseconds
of the claim, so that the per-user concurrency limit holds across hosts.

Example::

    index = Index("sqlite:////srv/lens/index.sqlite")
    with index.write() as conn:
        conn.execute(schema.settings.insert().values(key="k", value="v"))
    with index.read() as conn:
        conn.execute(sa.select(schema.settings)).all()
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy import event

from lens.errors import ConfigError, MissingDependencyError, StoreError
from lens.store import schema

__all__ = ["Index", "normalize_url"]


def normalize_url(url: str | Path) -> str:
    """``postgresql://`` → psycopg 3's driver; a bare file path → an SQLite URL; anything else as is.

    Example: ``normalize_url("postgresql://lens@db/lens")`` → ``"postgresql+psycopg://lens@db/lens"``.
    """
    text = str(url)
    if "://" not in text:
        return f"sqlite:///{Path(text).expanduser().resolve()}"
    scheme, rest = text.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return f"postgresql+psycopg://{rest}"
    if not scheme.startswith(("sqlite", "postgresql")):
        raise ConfigError(
            f"the index must be an SQLite file or a PostgreSQL URL (postgresql://user:password@host/db); got {scheme}://…"
        )
    return text


class Index:
    """A connection pool to the index database, with read and write transactions (see the module docstring).

    ``url``: an SQLAlchemy URL (``sqlite:///…``, ``postgresql://…``) or a path to an SQLite file. The tables
    are created when missing. Raises ``StoreError`` when the database cannot be reached, saying where.
    """

    def __init__(self, url: str | Path):
        self.url = normalize_url(url)
        self.dialect = "sqlite" if self.url.startswith("sqlite") else "postgresql"
        try:
            if self.dialect == "sqlite":
                self.engine = sa.create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
                _sqlite_setup(self.engine)
            else:
                self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=5)
        except ImportError as exc:  # pragma: no cover - psycopg is in the serve extra
            raise MissingDependencyError(
                f"the PostgreSQL index needs psycopg 3 ({exc}); pip install 'lens-interp[serve]'"
            ) from exc
        self._create_tables()

    @property
    def display_url(self) -> str:
        """The URL with any password hidden, for logs and the admin page."""
        return self.engine.url.render_as_string(hide_password=True)

    def _create_tables(self) -> None:
        for attempt in range(5):
            try:
                schema.metadata.create_all(self.engine)
                return
            except sa.exc.OperationalError as exc:
                if "locked" in str(exc) and attempt < 4:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                raise StoreError(
                    f"cannot open the store's index at {self.display_url} ({exc.orig}); check that the database "
                    "server runs and the URL, user and password are right"
                ) from exc
            except sa.exc.IntegrityError:  # another process created the same tables at the same moment
                time.sleep(0.1)
            except sa.exc.ProgrammingError as exc:  # PostgreSQL: "relation already exists" in a race
                if "already exists" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.1)

    @contextlib.contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A connection for reads (no write lock is taken)."""
        with self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def write(self, *, lock_jobs: bool = False) -> Iterator[sa.Connection]:
        """A write transaction: committed on a clean exit, rolled back on an exception.

        SQLite takes the database's write lock at BEGIN; ``lock_jobs`` on PostgreSQL locks the jobs table
        against other claims (SQLite's lock already covers it).
        """
        with self.engine.connect() as conn:
            conn = conn.execution_options(lens_write=True)
            with conn.begin():
                if lock_jobs and self.dialect == "postgresql":
                    conn.exec_driver_sql("LOCK TABLE lens_jobs IN SHARE ROW EXCLUSIVE MODE")
                yield conn

    def dispose(self) -> None:
        """Close every pooled connection (call in a child process after a fork, or before exiting)."""
        self.engine.dispose()


def _sqlite_setup(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("lens_write") else "BEGIN")
