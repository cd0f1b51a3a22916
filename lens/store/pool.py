"""The worker pool of one host: ``size`` worker processes (``lens.store.worker``), kept alive.

Every second the pool checks its processes. One that exited — crashed, killed by the kernel's OOM killer,
``kill -9`` — has its running job marked failed with the reason (the job is not lost and not left
"running" for ever), and a new worker takes its place (with a back-off when workers die right after
starting, e.g. a model that cannot load). One whose heartbeat stopped (hung) is killed and replaced the
same way. The pool also reaps workers of *other* hosts whose heartbeats stopped (a host that went down).

Example::

    pool = WorkerPool(config)
    pool.start()          # returns at once; workers load their models in the background
    ...
    pool.stop()           # SIGTERM: running jobs go back to the queue; SIGKILL after a grace period
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from lens.store.config import ServeConfig

__all__ = ["WorkerPool", "describe_exit"]

log = logging.getLogger("lens.pool")


def describe_exit(code: int) -> str:
    """``-9`` → ``'killed by SIGKILL'``; ``3`` → ``'exited with code 3'``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    worker_id: str = ""
    started: float = 0.0
    backoff: float = 1.0
    next_start: float = 0.0


class WorkerPool:
    """``size`` worker processes for ``config`` (default ``config.workers``); see the module docstring.

    ``stale_after``: seconds without a heartbeat before a worker counts as hung.
    """

    def __init__(self, config: ServeConfig, size: int | None = None, *, stale_after: float = 30.0):
        from lens.store.core import Store

        self.config = config
        self.size = config.workers if size is None else size
        self.stale_after = stale_after
        self.store = Store(config.store, config.index or None, create=False)
        self.slots = [_Slot(i) for i in range(self.size)]
        self.stopping = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.replaced = 0

    def start(self) -> "WorkerPool":
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="lens-pool", daemon=True)
        self._thread.start()
        return self

    def _spawn(self, slot: _Slot) -> None:
        slot.worker_id = f"{socket.gethostname()}-{secrets.token_hex(3)}"
        env = {**os.environ, "LENS_SERVE_CONFIG": json.dumps(self.config.to_toml_dict())}
        chosen = env.pop("LENS_SERVE_ALLOCATOR", "")  # the web process's allocator choice (lens serve), not theirs
        if chosen.startswith("malloc"):
            env.pop("PYTHONMALLOC", None)
            if chosen.endswith(",arenas"):
                env.pop("MALLOC_ARENA_MAX", None)
        # a session of its own: a Ctrl-C in the terminal reaches the server, which stops the workers in order
        slot.proc = subprocess.Popen([sys.executable, "-m", "lens.store.worker", "--id", slot.worker_id],
                                     env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        slot.started = time.monotonic()
        log.info("started worker %s (pid %d)", slot.worker_id, slot.proc.pid)

    def _loop(self) -> None:
        while not self.stopping:
            try:
                self.check()
            except Exception:  # the index may be briefly unreachable: keep supervising
                log.exception("worker pool check failed")
            time.sleep(1.0)

    def check(self) -> None:
        """One supervision round (the pool's thread calls it every second)."""
        with self._lock:
            if self.stopping:
                return
            rows = {w.id: w for w in self.store.workers.list()}
            now = time.monotonic()
            for slot in self.slots:
                if slot.proc is None:
                    if now >= slot.next_start:
                        self._spawn(slot)
                    continue
                code = slot.proc.poll()
                if code is None:
                    row = rows.get(slot.worker_id)
                    beat = row.heartbeat if row else None
                    if beat is not None and time.time() - beat > self.stale_after and now - slot.started > self.stale_after:
                        log.error("worker %s sent no heartbeat for %.0f s: killing it", slot.worker_id, time.time() - beat)
                        slot.proc.kill()
                    continue
                self._buried(slot, describe_exit(code))
                lived = now - slot.started
                slot.backoff = 1.0 if lived > 60 else min(slot.backoff * 2, 60.0)
                slot.next_start = now + (0.0 if lived > 60 else slot.backoff)
                slot.proc = None
                self.replaced += 1
            self.store.workers.reap(self.store.jobs, stale_after=max(60.0, 2 * self.stale_after))

    def _buried(self, slot: _Slot, reason: str) -> None:
        failed = self.store.jobs.fail_running_of(
            slot.worker_id, f"the worker process died ({reason}) while running this job; it was not finished — "
                            "submit it again (if it happens again, the inputs may be too large for the server's memory)")
        self.store.workers.set_status(slot.worker_id, "dead", reason)
        log.error("worker %s %s%s", slot.worker_id, reason, f"; failed job(s) {', '.join(failed)}" if failed else "")

    def pids(self) -> dict[str, int]:
        """worker id → pid of the live processes."""
        return {s.worker_id: s.proc.pid for s in self.slots if s.proc is not None and s.proc.poll() is None}

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every worker: SIGTERM (running jobs stop at their next layer and are queued again), then
        SIGKILL after ``timeout`` seconds (their jobs are failed)."""
        with self._lock:
            self.stopping = True
            procs = [(s, s.proc) for s in self.slots if s.proc is not None]
            for _, proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            deadline = time.monotonic() + timeout
            for slot, proc in procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
                    self._buried(slot, "killed by SIGKILL at shutdown")
                slot.proc = None
        if self._thread is not None:
            self._thread.join(timeout=5)
