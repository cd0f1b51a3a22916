"""The persistent job queue and the worker registry, both tables of the store's index.

A job goes ``queued → running → done | failed | cancelled``. Workers claim the oldest queued job whose
model they loaded and whose owner is below the per-user limit of running jobs; the claim runs under the
index's write lock (SQLite) or a table lock (PostgreSQL), so two workers never take the same job and the
limit holds across hosts. A running job whose worker stops sending heartbeats (the process died, the host
went down) is marked failed by whoever notices first — the pool on its host, or any pool's reaper.

Example::

    job = store.jobs.submit("ana", "trace", "minilm", {"texts": ["The cat sat."]})
    store.jobs.position(job.id)          # 1: next in line
    store.jobs.cancel(job.id, by="ana")
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Iterable

import sqlalchemy as sa

from lens.errors import LimitExceededError, NotFoundError, PermissionDeniedError
from lens.store import schema
from lens.store.db import Index
from lens.store.files import check_id, new_id

__all__ = ["JobQueue", "Job", "Workers", "WorkerInfo"]

_ACTIVE = ("queued", "running")


@dataclass(frozen=True)
class Job:
    """One job of the queue. ``progress`` is 0…1; ``message`` says what it is doing; ``error`` why it failed;
    ``result_id`` the stored entry it produced."""

    id: str
    owner: str
    kind: str
    status: str
    created: float
    started: float | None
    finished: float | None
    model: str
    params: dict[str, Any]
    progress: float
    message: str
    error: str | None
    result_id: str | None
    worker_id: str | None
    cancel: bool

    @property
    def final(self) -> bool:
        return self.status in schema.FINAL_STATES

    @classmethod
    def _from_row(cls, row) -> "Job":
        m = row._mapping
        return cls(
            id=m["id"], owner=m["owner"], kind=m["kind"], status=m["status"], created=float(m["created"]),
            started=m["started"], finished=m["finished"], model=m["model"], params=json.loads(m["params"]),
            progress=float(m["progress"] or 0.0), message=m["message"] or "", error=m["error"],
            result_id=m["result_id"], worker_id=m["worker_id"], cancel=bool(m["cancel"]),
        )


class JobQueue:
    """The jobs table of a store (``store.jobs``)."""

    def __init__(self, index: Index):
        self.index = index

    def submit(self, owner: str, kind: str, model: str, params: dict[str, Any], *, max_active: int | None = None) -> Job:
        """Queue a job. ``max_active``: how many queued + running jobs ``owner`` may have (``LimitExceededError``
        beyond). ``params`` must be JSON (the worker reads them). Returns the queued ``Job``."""
        j = schema.jobs.c
        job_id = new_id()
        with self.index.write(lock_jobs=True) as conn:
            if max_active is not None:
                active = conn.execute(sa.select(sa.func.count()).where(j.owner == owner, j.status.in_(_ACTIVE))).scalar()
                if active >= max_active:
                    raise LimitExceededError(
                        f"{owner} already has {active} jobs queued or running (the limit is {max_active}); wait for "
                        "one to finish or cancel one"
                    )
            conn.execute(schema.jobs.insert().values(
                id=job_id, owner=owner, kind=kind, status="queued", created=time.time(), model=model,
                params=json.dumps(params), progress=0.0, message="queued", cancel=False,
            ))
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        job_id = check_id(job_id, "job")
        with self.index.read() as conn:
            row = conn.execute(sa.select(schema.jobs).where(schema.jobs.c.id == job_id)).first()
        if row is None:
            raise NotFoundError(f"there is no job with id {job_id}")
        return Job._from_row(row)

    def list(self, *, status: Iterable[str] | str | None = None, owner: str | None = None, limit: int = 200) -> list[Job]:
        """Jobs, newest first, optionally of some statuses or one owner."""
        j = schema.jobs.c
        query = sa.select(schema.jobs).order_by(j.created.desc(), j.id).limit(limit)
        if status:
            query = query.where(j.status.in_([status] if isinstance(status, str) else list(status)))
        if owner:
            query = query.where(j.owner == owner)
        with self.index.read() as conn:
            return [Job._from_row(r) for r in conn.execute(query)]

    def counts(self) -> dict[str, int]:
        """Number of jobs per status."""
        j = schema.jobs.c
        with self.index.read() as conn:
            return {s: int(n) for s, n in conn.execute(sa.select(j.status, sa.func.count()).group_by(j.status))}

    def position(self, job_id: str) -> int:
        """1 + the number of queued jobs ahead of this one (0 when it is not queued)."""
        job = self.get(job_id)
        if job.status != "queued":
            return 0
        j = schema.jobs.c
        with self.index.read() as conn:
            ahead = conn.execute(sa.select(sa.func.count()).where(
                j.status == "queued", sa.or_(j.created < job.created, sa.and_(j.created == job.created, j.id < job.id))
            )).scalar()
        return int(ahead) + 1

    # -- workers' side ---------------------------------------------------------------------------------
    def claim(self, worker_id: str, models: Iterable[str], *, max_running_per_user: int | None = None) -> Job | None:
        """Take the oldest queued job for one of ``models`` whose owner runs fewer than
        ``max_running_per_user`` jobs; mark it running by ``worker_id``. None when there is nothing to do."""
        models = list(models)
        if not models:
            return None
        j = schema.jobs.c
        with self.index.write(lock_jobs=True) as conn:
            running = dict(conn.execute(sa.select(j.owner, sa.func.count()).where(j.status == "running").group_by(j.owner)).all())
            candidates = conn.execute(
                sa.select(j.id, j.owner).where(j.status == "queued", j.model.in_(models)).order_by(j.created, j.id).limit(200)
            ).all()
            chosen = next((c for c in candidates
                           if max_running_per_user is None or running.get(c.owner, 0) < max_running_per_user), None)
            if chosen is None:
                return None
            conn.execute(schema.jobs.update().where(j.id == chosen.id).values(
                status="running", worker_id=worker_id, started=time.time(), message="starting"))
        return self.get(chosen.id)

    def report(self, job_id: str, worker_id: str, progress: float, message: str) -> bool:
        """Record progress of a running job; returns True when its cancellation was requested (stop then)."""
        j = schema.jobs.c
        with self.index.write() as conn:
            conn.execute(schema.jobs.update().where(j.id == job_id, j.worker_id == worker_id, j.status == "running")
                         .values(progress=max(0.0, min(1.0, float(progress))), message=message[:500]))
            cancel = conn.execute(sa.select(j.cancel).where(j.id == job_id)).scalar()
        return bool(cancel)

    def finish(self, job_id: str, worker_id: str, result_id: str) -> bool:
        """Mark a running job done with the entry it stored; False if it was no longer running (e.g. failed
        by a timeout meanwhile)."""
        return self._end(job_id, "done", worker_id=worker_id, result_id=result_id, progress=1.0, message="done")

    def fail(self, job_id: str, error: str, *, worker_id: str | None = None) -> bool:
        """Mark a queued or running job failed with ``error`` (shown to its owner)."""
        return self._end(job_id, "failed", worker_id=worker_id, error=error[:4000], message="failed")

    def requeue(self, job_id: str, worker_id: str) -> bool:
        """Put a running job back in the queue (its worker is shutting down cleanly); it keeps its place."""
        j = schema.jobs.c
        with self.index.write() as conn:
            return bool(conn.execute(schema.jobs.update().where(j.id == job_id, j.worker_id == worker_id,
                                                                j.status == "running")
                                     .values(status="queued", worker_id=None, started=None, progress=0.0,
                                             message="queued again: its worker stopped")).rowcount)

    def mark_cancelled(self, job_id: str, *, worker_id: str | None = None) -> bool:
        return self._end(job_id, "cancelled", worker_id=worker_id, message="cancelled")

    def _end(self, job_id: str, status: str, *, worker_id: str | None, **values) -> bool:
        j = schema.jobs.c
        cond = [j.id == job_id, j.status.in_(_ACTIVE)]
        if worker_id is not None:
            cond.append(j.worker_id == worker_id)
        with self.index.write() as conn:
            return bool(conn.execute(schema.jobs.update().where(*cond)
                                     .values(status=status, finished=time.time(), **values)).rowcount)

    def cancel(self, job_id: str, *, by: str | None = None, is_admin: bool = False) -> Job:
        """Cancel a job: a queued one at once, a running one as soon as its worker notices (≤ 1 s between
        batches, or it is stopped). Only its owner or an admin (``PermissionDeniedError``)."""
        job = self.get(job_id)
        if by is not None and by != job.owner and not is_admin:
            raise PermissionDeniedError(f"{by} may not cancel a job of {job.owner}")
        j = schema.jobs.c
        with self.index.write() as conn:
            conn.execute(schema.jobs.update().where(j.id == job.id, j.status == "queued")
                         .values(status="cancelled", finished=time.time(), message="cancelled"))
            conn.execute(schema.jobs.update().where(j.id == job.id, j.status == "running").values(cancel=True))
        return self.get(job.id)

    def fail_running_of(self, worker_id: str, error: str) -> list[str]:
        """Fail every running job of ``worker_id`` (it died); returns their ids."""
        j = schema.jobs.c
        with self.index.write() as conn:
            ids = [r.id for r in conn.execute(sa.select(j.id).where(j.worker_id == worker_id, j.status == "running"))]
            if ids:
                conn.execute(schema.jobs.update().where(j.id.in_(ids), j.status == "running").values(
                    status="failed", finished=time.time(), error=error[:4000], message="failed"))
        return ids


@dataclass(frozen=True)
class WorkerInfo:
    """A worker process as the registry knows it (``models``: name → description, or an ``error``)."""

    id: str
    host: str
    pid: int
    started: float
    heartbeat: float
    status: str
    job_id: str | None
    models: dict[str, Any]
    rss_bytes: int
    jobs_done: int
    error: str | None


class Workers:
    """The workers table of a store (``store.workers``)."""

    def __init__(self, index: Index):
        self.index = index

    def register(self, worker_id: str, pid: int) -> None:
        now = time.time()
        with self.index.write() as conn:
            conn.execute(schema.workers.delete().where(schema.workers.c.id == worker_id))
            conn.execute(schema.workers.insert().values(
                id=worker_id, host=socket.gethostname(), pid=pid, started=now, heartbeat=now, status="loading",
                job_id=None, models="{}", rss_bytes=0, jobs_done=0))

    def beat(self, worker_id: str, **values) -> None:
        """Heartbeat, with any of: status, job_id, models (dict), rss_bytes, jobs_done, error."""
        if "models" in values:
            values["models"] = json.dumps(values["models"])
        with self.index.write() as conn:
            conn.execute(schema.workers.update().where(schema.workers.c.id == worker_id)
                         .values(heartbeat=time.time(), **values))

    def set_status(self, worker_id: str, status: str, error: str | None = None) -> None:
        with self.index.write() as conn:
            conn.execute(schema.workers.update().where(schema.workers.c.id == worker_id)
                         .values(status=status, error=error, job_id=None))

    def list(self, *, alive_only: bool = False) -> list[WorkerInfo]:
        w = schema.workers.c
        query = sa.select(schema.workers).order_by(w.started)
        if alive_only:
            query = query.where(w.status.in_(("loading", "idle", "busy")))
        with self.index.read() as conn:
            rows = conn.execute(query).all()
        return [WorkerInfo(r.id, r.host, int(r.pid), float(r.started), float(r.heartbeat), r.status, r.job_id,
                           json.loads(r.models or "{}"), int(r.rss_bytes or 0), int(r.jobs_done or 0), r.error)
                for r in rows]

    def models(self) -> dict[str, dict[str, Any]]:
        """What the live workers loaded: model name → description (the first worker's), for the New run page."""
        out: dict[str, dict[str, Any]] = {}
        for worker in self.list(alive_only=True):
            for name, info in worker.models.items():
                out.setdefault(name, info)
        return out

    def reap(self, jobs: JobQueue, *, stale_after: float) -> list[str]:
        """Mark workers silent for ``stale_after`` seconds dead and fail their running jobs (a host that went
        down takes its processes with it; someone must notice). Returns the failed job ids."""
        w = schema.workers.c
        cutoff = time.time() - stale_after
        with self.index.write() as conn:
            stale = [r.id for r in conn.execute(sa.select(w.id).where(w.heartbeat < cutoff,
                                                                      w.status.in_(("loading", "idle", "busy"))))]
            if stale:
                conn.execute(schema.workers.update().where(w.id.in_(stale)).values(status="dead", error="no heartbeat"))
        failed: list[str] = []
        for worker_id in stale:
            failed += jobs.fail_running_of(worker_id, f"the worker {worker_id} stopped answering (no heartbeat for "
                                                      f"{stale_after:.0f} s); the job was not finished — submit it again")
        return failed

    def forget_stopped(self, older_than: float = 86400.0) -> None:
        """Drop rows of workers that stopped or died more than ``older_than`` seconds ago."""
        w = schema.workers.c
        with self.index.write() as conn:
            conn.execute(schema.workers.delete().where(w.status.in_(("stopped", "dead")),
                                                       w.heartbeat < time.time() - older_than))
