"""A background worker for probe reductions that need not hold up the forward pass.

The residual probe's per-layer work (two d×d eigen-solves, two Gram products, a median, top-k) depends
only on a copy of the layer's hidden state, so it can run while the model computes the next layers.
One worker thread, single-threaded torch (LAPACK's tridiagonalization of a 768×768 matrix ran 3× faster
on one thread than on two here, and collapsed to 40× slower on a busy 2-core machine where every
parallel region waits for its threads to be scheduled): the forward keeps its threads, the worker
fills the cores' idle moments and the gaps between the forward's parallel regions.

Tasks run in submission order, so the first error raised is that of the earliest layer; it is raised
in the caller's thread at the next :meth:`Worker.wait` or :meth:`Worker.drain`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import sys

import torch

__all__ = ["Worker"]


def _single_threaded() -> None:
    # thread-local in torch (OpenMP's per-thread ICV, MKL's *_local setting): the caller keeps its threads
    torch.set_num_threads(1)


class Worker:
    """Runs callables in one background thread, at most ``max_pending`` at a time.

    ``submit`` blocks while ``max_pending`` tasks are unfinished (each task holds a copy of a layer's
    hidden state, so this bounds the memory in flight). ``drain`` waits for every task and raises the
    first error; ``close`` drains and stops the thread.

    Example::

        worker = Worker(max_pending=2)
        worker.submit(print, "reduced in the background")
        worker.close()
    """

    def __init__(self, max_pending: int = 2):
        self.max_pending = max(1, int(max_pending))
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="lens-probe", initializer=_single_threaded
        )
        self._pending: collections.deque = collections.deque()

    def submit(self, fn, *args) -> None:
        while len(self._pending) >= self.max_pending:
            self._pending.popleft().result()  # raises the task's error here, in the caller's thread
        self._pending.append(self._pool.submit(_in_inference_mode, fn, *args))

    def drain(self) -> None:
        """Wait for every submitted task; raise the first error (the earliest task's)."""
        first = None
        while self._pending:
            future = self._pending.popleft()
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after every task has finished
                first = first or exc
        if first is not None:
            raise first

    def close(self) -> None:
        """Drain (raising the first error unless another exception is already propagating) and stop."""
        propagating = sys.exc_info()[1] is not None
        try:
            self.drain()
        except BaseException:
            if not propagating:
                raise
        finally:
            self._pool.shutdown(wait=True)


def _in_inference_mode(fn, *args):
    with torch.inference_mode():
        return fn(*args)
