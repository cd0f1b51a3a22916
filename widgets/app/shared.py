"""What every session of one dashboard process shares: the configuration, the store, a bounded cache of
loaded runs, and the facts about this process that the admin page and ``/api/status`` report.

Runs are immutable once stored (ids are never reused), so a loaded run can serve every session that
opens it; the cache holds at most ``max_runs`` runs and ``max_bytes`` of arrays, least recently used out.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from collections import OrderedDict
from typing import Any

from lens.run import Run
from lens.store.config import ServeConfig
from lens.store.core import Store

__all__ = ["Shared", "RunCache", "allocator_facts", "process_facts", "rss_bytes"]


def rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process (this one by default), from /proc."""
    with open(f"/proc/{pid or 'self'}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _MallInfo2(ctypes.Structure):
    # glibc's struct mallinfo2 (glibc ≥ 2.33): ten size_t fields, in this order
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def allocator_facts() -> dict[str, int]:
    """Where this process's heap memory sits, in bytes, from glibc's ``mallinfo2`` (empty elsewhere).

    ``malloc_in_use``: allocated by C malloc and not freed (Python objects live inside it, in pymalloc's
    arenas, or in mmapped blocks); ``malloc_free_held``: freed but kept by the allocator (fragmentation that
    ``malloc_trim`` could not return); ``malloc_mmapped``: large blocks mapped on their own. Python's own
    ``sys.getallocatedblocks()`` counts the small objects in use. How the admin page and ``lens bench serve``
    tell a leak (in use grows) from allocator retention (free held grows).
    """
    facts: dict[str, int] = {"python_blocks": sys.getallocatedblocks()}
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return facts
    facts.update(malloc_in_use=int(info.uordblks), malloc_free_held=int(info.fordblks),
                 malloc_mmapped=int(info.hblkhd), malloc_arena=int(info.arena))
    return facts


def process_facts(*, scan_objects: bool = True) -> dict[str, Any]:
    """This process's memory and whether it holds any model: the modelling modules of transformers it
    imported, and (``scan_objects``) the torch modules with parameters and lens models alive in it.

    The dashboard's web process serves saved runs only; this is how the admin page and the tests check it.
    """
    modeling = sorted(m for m in sys.modules if m.startswith("transformers.models.") and ".modeling_" in m)
    facts: dict[str, Any] = {
        "pid": os.getpid(),
        "rss_bytes": rss_bytes(),
        "allocator": allocator_facts(),
        "transformers_modeling_modules": modeling,
        "lens_models_module_loaded": "lens.models.load" in sys.modules,
        "torch_imported": "torch" in sys.modules,
    }
    widget_registry = sys.modules.get("ipywidgets.widgets.widget")
    if widget_registry is not None:
        facts["open_widgets"] = len(getattr(widget_registry, "_instances", {}))
    if scan_objects:
        facts["python_objects"] = len(gc.get_objects())
        modules, parameters, lens_models = 0, 0, 0
        nn = sys.modules.get("torch.nn")
        lensmodel = sys.modules.get("lens.models.lensmodel")
        for obj in gc.get_objects():
            if nn is not None and isinstance(obj, nn.Module):
                count = sum(p.numel() for p in obj.parameters(recurse=False))
                if count:
                    modules += 1
                    parameters += count
            elif lensmodel is not None and isinstance(obj, lensmodel.LensModel):
                lens_models += 1
        facts.update(torch_modules_with_parameters=modules, parameters=parameters, lens_models=lens_models)
    return facts


class RunCache:
    """A thread-safe LRU of loaded runs: ``get(id)`` loads through the store on a miss."""

    def __init__(self, store: Store, *, max_runs: int = 16, max_bytes: int = 256 * 1024**2):
        self.store, self.max_runs, self.max_bytes = store, max_runs, max_bytes
        self._runs: OrderedDict[str, tuple[Run, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, entry_id: str) -> Run:
        with self._lock:
            if entry_id in self._runs:
                self._runs.move_to_end(entry_id)
                self.hits += 1
                return self._runs[entry_id][0]
        run = self.store.load_run(entry_id)  # raises NotFoundError / StoreError with a message for the page
        size = sum(a.nbytes for a in run.arrays.values())
        with self._lock:
            self.misses += 1
            self._runs[entry_id] = (run, size)
            while len(self._runs) > self.max_runs or (
                    len(self._runs) > 1 and sum(s for _, s in self._runs.values()) > self.max_bytes):
                self._runs.popitem(last=False)
        return run

    def forget(self, entry_id: str) -> None:
        with self._lock:
            self._runs.pop(entry_id, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"runs": len(self._runs), "bytes": sum(s for _, s in self._runs.values()),
                    "hits": self.hits, "misses": self.misses}


class Shared:
    """The process-wide state of a dashboard (one per ``lens serve``)."""

    def __init__(self, config: ServeConfig, store: Store, *, auth: bool):
        self.config, self.store, self.auth = config, store, auth
        self.runs = RunCache(store)
        self.started = time.time()
        self.sessions = 0
        self.sessions_total = 0
        self._version: tuple[float, Any] = (0.0, None)
        self._trimmed = 0.0
        self._trim_scheduled = False
        self._listings: dict[tuple, list] = {}
        self._listings_version = None

    def trim(self) -> None:
        """After a session ends: collect garbage and hand freed heap pages back to the system (glibc's
        ``malloc_trim``), at most every 5 s — otherwise a long-running server keeps the high-water mark of
        its busiest minute for ever (Panel users report exactly that)."""
        now = time.monotonic()
        if now - self._trimmed < 5.0:
            if not self._trim_scheduled:  # sessions often end together: trim once after the last of them
                self._trim_scheduled = True
                from tornado.ioloop import IOLoop

                IOLoop.current().call_later(5.0, self._scheduled_trim)
            return
        self._trimmed = now
        if self.sessions <= 0:  # nobody is looking: the shared listings would only pin memory until the next visit
            self._listings, self._listings_version = {}, None
            self.invalidate()
        gc.collect()
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
            pass

    def _scheduled_trim(self) -> None:
        self._trim_scheduled = False
        self._trimmed = 0.0
        self.trim()

    def entries(self, kind: str, **filters):
        """``store.entries(kind, **filters)``, shared by every session until the store changes: twenty sessions
        looking at the same list cost one query."""
        version = self.version()
        if version != self._listings_version:  # only the current version's listings are worth keeping
            self._listings, self._listings_version = {}, version
        key = (kind, tuple(sorted(filters.items())))
        hit = self._listings.get(key)
        if hit is None:
            hit = self.store.entries(kind, limit=1000, **filters)
            if len(self._listings) > 32:
                self._listings.clear()
            self._listings[key] = hit
        return hit

    def invalidate(self) -> None:
        """Forget the cached version: this process just changed the store."""
        self._version = (0.0, None)

    def version(self) -> Any:
        """The store's version token, re-read at most once a second for all sessions."""
        now = time.monotonic()
        if now - self._version[0] > 1.0:
            self._version = (now, self.store.version())
        return self._version[1]
