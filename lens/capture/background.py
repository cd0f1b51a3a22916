"""Threads for probe reductions: a background worker, and a pool that runs them in parallel.

The residual probe's per-layer work (two d×d eigen-solves, two Gram products, a median, top-k) depends
only on a copy of the layer's hidden state, so it can run while the model computes the next layers.
One worker thread, single-threaded torch (LAPACK's tridiagonalization of a 768×768 matrix ran 3× faster
on one thread than on two here, and collapsed to 40× slower on a busy 2-core machine where every
parallel region waits for its threads to be scheduled): the forward keeps its threads, the worker
fills the cores' idle moments and the gaps between the forward's parallel regions.

Tasks run in submission order, so the first error raised is that of the earliest layer; it is raised
in the caller's thread at the next :meth:`Worker.wait` or :meth:`Worker.drain`.

When the forward already uses several threads there is no idle core for a background worker: on a 2-core
machine the residual probe's worker made every 2-thread parallel region of the forward wait for a core, and
its 2.8 CPU-seconds per 20 k tokens added 2.7 s. Then :func:`run_parallel` runs the reductions at once, split
over as many single-threaded pool threads as the forward has (1.9 s instead of 2.7 s there): each
reduction runs single-threaded in either mode, so the numbers do not depend on the mode.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
import sys

import torch

__all__ = ["Worker", "parallel_threads", "run_parallel"]


def _single_threaded() -> None:
    # thread-local in torch (OpenMP's per-thread ICV, MKL's *_local setting): the caller keeps its threads. Torch
    # sets a new thread's count lazily, at its first parallel operation, from the count last set in any thread;
    # without the first line that first operation would undo the second whenever the caller set its threads since
    torch.get_num_threads()
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


def parallel_threads() -> int:
    """How many threads :func:`run_parallel` splits work over: the caller's torch intra-op threads (≥ 1)."""
    return max(1, torch.get_num_threads())


_POOLS: dict[tuple[int, int], concurrent.futures.ThreadPoolExecutor] = {}


def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    # one pool per size for the life of the process (idle threads cost nothing, and every layer of every batch
    # uses it), keyed by process too: a forked child inherits the pool object but not its threads
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="lens-parallel", initializer=_single_threaded
        )
    return _POOLS[key]


def run_parallel(fn, groups: list, *args) -> None:
    """Call ``fn(group, *args)`` for every group, ``parallel_threads()`` at a time, and wait for all of them.

    Each call runs single-threaded (torch and MKL) in inference mode; with one thread the calls run in the
    caller's thread instead (single-threaded too, so the numbers are the same). The first error (that of the
    earliest group) is raised after every call has finished.

    Example::

        out = [0] * 4
        run_parallel(lambda i: out.__setitem__(i, i * i), [0, 1, 2, 3])  # out == [0, 1, 4, 9]
    """
    threads = parallel_threads()
    if threads == 1:
        calls = [functools.partial(_in_inference_mode, fn, group, *args) for group in groups]
    else:
        calls = [_pool(threads).submit(_in_inference_mode, fn, group, *args).result for group in groups]
    first = None
    for call in calls:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after every call has finished
            first = first or exc
    if first is not None:
        raise first
