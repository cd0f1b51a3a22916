"""A worker process: loads the configured models once, then takes jobs from the store's queue for ever.

Started by the pool (``lens.store.pool``) as ``python -m lens.store.worker --id ID``, with the
configuration in the environment variable ``LENS_SERVE_CONFIG`` (JSON; the environment, unlike the command
line, is not visible to other users of the host — it may hold the PostgreSQL password).

A job that fails (bad input, a model error, a timeout, a cancellation) records its error and the worker
takes the next one. Progress and cancellation travel through a lens attention observer
(``lens.models.observers``): every attention call of the forward pass counts towards the progress, and a
cancelled or timed-out job stops at the next layer. A heartbeat thread keeps the worker's row fresh, so a
worker that hangs or dies is noticed (``lens.store.pool`` replaces it and fails its job).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from lens.errors import ConfigError, LensError, LimitExceededError, ModelLoadError
from lens.store.config import ServeConfig

__all__ = ["main", "attention_preset", "PATTERN_BUDGET"]

log = logging.getLogger("lens.worker")

#: Full attention patterns (for AttentionExplorer) are kept for every head while they take at most this
#: many bytes; beyond it the run keeps none and the explorer shows the mass each key receives instead.
PATTERN_BUDGET = 16 * 1024**2
_HEARTBEAT = 1.0
_REPORT_EVERY = 0.5


class JobStopped(Exception):
    """Raised inside the forward pass to stop a job (``reason``: cancelled, timeout, shutdown)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def attention_preset(name: str):
    """The kernel behind a dashboard attention choice: ``"dense"``, ``"streaming"`` (StreamingLLM: 4 sink
    tokens + a 256-token window) or ``"sparse"`` (SpargeAttention-style hybrid top-k 25 % / top-p 0.9),
    64 × 64 blocks. Example: ``lm.set_attention(attention_preset("sparse"))``."""
    from lens.models.deploy import Sparse

    if name == "dense":
        return "dense"
    if name == "streaming":
        return Sparse.streaming(sink_tokens=4, window=256, block_q=64, block_k=64)
    if name == "sparse":
        return Sparse(mode="hybrid", topk=0.25, topp=0.9, block_q=64, block_k=64)
    raise ConfigError(f"unknown attention choice {name!r}; choose dense, streaming or sparse")


def _rss() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak is the best we have
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Watch:
    """A lens attention observer: turns attention calls into progress; stops a cancelled or late job."""

    def __init__(self, worker: "Worker", job, total_calls: int, deadline: float):
        self.worker, self.job, self.total, self.deadline = worker, job, max(1, total_calls), deadline
        self.calls = 0
        self.last = 0.0

    def pattern_heads(self, module) -> tuple[int, ...]:
        return ()

    def on_attention(self, module, stats) -> None:
        self.calls += 1
        now = time.monotonic()
        if self.worker.stopping:
            raise JobStopped("shutdown")
        if now > self.deadline:
            raise JobStopped("timeout")
        if now - self.last >= _REPORT_EVERY:
            self.last = now
            done = min(self.calls / self.total, 1.0)
            if self.worker.store.jobs.report(self.job.id, self.worker.id, 0.05 + 0.85 * done,
                                             f"tracing: {100 * done:.0f}% of the forward passes"):
                raise JobStopped("cancelled")


class Worker:
    """One worker process (see the module docstring)."""

    def __init__(self, config: ServeConfig, worker_id: str):
        from lens.store.core import Store

        self.config = config
        self.id = worker_id
        self.store = Store(config.store, config.index or None, create=False)
        self.models: dict[tuple[str, str], Any] = {}
        self.descriptions: dict[str, dict[str, Any]] = {}
        self.stopping = False
        self.job = None
        self.job_started = 0.0
        self.jobs_done = 0
        self._beat_lock = threading.Lock()

    # -- models -------------------------------------------------------------------------------------
    def load_models(self) -> None:
        from lens.models.load import load

        for spec in self.config.models:
            info: dict[str, Any] = {"label": spec.title, "source": spec.source, "attention": list(spec.attention),
                                    "quant": [], "errors": {}}
            for variant in spec.quant:
                try:
                    source = None if spec.source == "embedded" else spec.source
                    lm = load(source, quant=None if variant == "none" else variant)
                except (LensError, OSError, ValueError) as exc:
                    log.error("worker %s could not load %s (%s): %s", self.id, spec.name, variant, exc)
                    info["errors"][variant] = str(exc)[:500]
                    continue
                self.models[(spec.name, variant)] = lm
                info["quant"].append(variant)
                info.update(family=lm.family.name, n_layers=lm.n_layers, n_heads=lm.n_heads, causal=lm.causal,
                            max_positions=lm.max_positions, model_id=lm.model_id,
                            tokens_per_input=min(self.config.limits.tokens_per_input, lm.max_positions))
            self.descriptions[spec.name] = info
            self._beat()

    @property
    def model_names(self) -> list[str]:
        return sorted({name for name, _ in self.models})

    # -- heartbeat ----------------------------------------------------------------------------------
    def _beat(self) -> None:
        with self._beat_lock:
            self.store.workers.beat(
                self.id, status="busy" if self.job else ("loading" if not self.models else "idle"),
                job_id=self.job.id if self.job else None, models=self.descriptions, rss_bytes=_rss(),
                jobs_done=self.jobs_done)

    def _heartbeat_loop(self) -> None:
        while not self.stopping:
            try:
                self._beat()
                job = self.job
                # a job stuck outside the forward pass (tokenizing, saving) past its timeout + a grace: the
                # observer cannot stop it, so the process ends and the pool fails the job and replaces us
                if job is not None and time.monotonic() - self.job_started > self.config.limits.job_timeout + 30:
                    self.store.jobs.fail(job.id, f"timed out after {self.config.limits.job_timeout:.0f} s",
                                         worker_id=self.id)
                    log.error("worker %s: job %s is stuck past its timeout; exiting", self.id, job.id)
                    os._exit(70)
            except Exception:  # the index may be briefly unreachable; try again next beat
                log.exception("worker %s: heartbeat failed", self.id)
            time.sleep(_HEARTBEAT)

    # -- jobs ---------------------------------------------------------------------------------------
    def serve(self, *, poll: float = 0.5, max_jobs: int | None = None) -> None:
        threading.Thread(target=self._heartbeat_loop, name="lens-heartbeat", daemon=True).start()
        self.load_models()
        if not self.models:
            self.store.workers.set_status(self.id, "stopped", "no configured model could be loaded")
            raise ModelLoadError(f"worker {self.id}: no configured model could be loaded; see the errors above")
        log.info("worker %s ready with %s", self.id, ", ".join(f"{n}:{q}" for n, q in self.models))
        self._beat()
        while not self.stopping and (max_jobs is None or self.jobs_done < max_jobs):
            job = self.store.jobs.claim(self.id, self.model_names,
                                        max_running_per_user=self.config.limits.running_per_user)
            if job is None:
                time.sleep(poll)
                continue
            self.run_job(job)
        self.store.workers.set_status(self.id, "stopped")

    def run_job(self, job) -> None:
        self.job, self.job_started = job, time.monotonic()
        self._beat()
        log.info("worker %s: job %s (%s, %s) of %s", self.id, job.id, job.kind, job.model, job.owner)
        try:
            if job.kind == "trace":
                entry_id = self._trace(job)
            elif job.kind == "scan":
                entry_id = self._scan(job)
            else:
                raise ConfigError(f"unknown job kind {job.kind!r}")
            if not self.store.jobs.finish(job.id, self.id, entry_id):
                # failed or cancelled meanwhile (e.g. by the reaper): the job has no result, so neither does the store
                self.store.delete(entry_id)
        except JobStopped as stop:
            if stop.reason == "cancelled":
                self.store.jobs.mark_cancelled(job.id, worker_id=self.id)
            elif stop.reason == "timeout":
                self.store.jobs.fail(job.id, f"timed out after {self.config.limits.job_timeout:.0f} s; submit fewer or "
                                             "shorter inputs", worker_id=self.id)
            else:  # a clean shutdown: another worker (or this server, restarted) takes it
                self.store.jobs.requeue(job.id, self.id)
        except LensError as exc:
            self.store.jobs.fail(job.id, str(exc), worker_id=self.id)
        except Exception as exc:  # a bug or a model failure: record it, keep serving
            log.error("worker %s: job %s failed:\n%s", self.id, job.id, traceback.format_exc())
            self.store.jobs.fail(job.id, f"{type(exc).__name__}: {exc}", worker_id=self.id)
        finally:
            self.jobs_done += 1
            self.job = None
            self._beat()

    def _model(self, job):
        variant = job.params.get("quant", "none")
        lm = self.models.get((job.model, variant))
        if lm is None:
            error = self.descriptions.get(job.model, {}).get("errors", {}).get(variant)
            raise ModelLoadError(f"model {job.model} ({variant}) is not available on this worker" + (f": {error}" if error else ""))
        return lm

    def _trace(self, job) -> str:
        from lens.capture.trace import trace
        from lens.models.observers import observing

        lm = self._model(job)
        texts = job.params.get("texts") or []
        limits = self.config.limits
        if not texts:
            raise LimitExceededError("the job has no inputs; type or upload at least one text")
        if len(texts) > limits.inputs_per_job:
            raise LimitExceededError(f"the job has {len(texts)} inputs; the limit is {limits.inputs_per_job}")
        self.store.jobs.report(job.id, self.id, 0.02, "tokenizing")
        limit = min(limits.tokens_per_input, lm.max_positions)
        lengths = [len(ids) for ids in lm.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
        too_long = [(i, n) for i, n in enumerate(lengths) if n > limit]
        if too_long:
            i, n = too_long[0]
            raise LimitExceededError(
                f"input {i + 1} has {n} tokens; the limit here is {limit} tokens per input"
                + (f" ({len(too_long)} inputs are too long)" if len(too_long) > 1 else "") + "; shorten or split it"
            )
        pattern_bytes = 4 * sum(n * n for n in lengths) * lm.n_layers * lm.n_heads
        keep = "all" if pattern_bytes <= PATTERN_BUDGET else None
        batch_size = 8
        total = lm.n_layers * math.ceil(len(texts) / batch_size)
        watch = _Watch(self, job, total, time.monotonic() + limits.job_timeout)
        lm.set_attention(attention_preset(job.params.get("attention", "dense")))
        try:
            with observing(watch):
                run = trace(lm, list(texts), keep_patterns=keep, batch_size=batch_size, progress=False)
        finally:
            lm.set_attention("dense")
        self.store.jobs.report(job.id, self.id, 0.95, "saving")
        run.meta["job"] = {"id": job.id, "owner": job.owner, "model": job.model}
        return self.store.save_run(run, owner=job.owner, tags=job.params.get("tags"), job_id=job.id).id

    def _scan(self, job) -> str:
        import importlib.util

        if importlib.util.find_spec("lens.scan") is None:
            raise ConfigError("this lens has no corpus scans (lens.scan); upgrade lens to run scans")
        from lens.models.observers import observing
        from lens.scan import scan  # the scan stage comes before the store

        lm = self._model(job)
        documents = job.params.get("documents") or []
        limits = self.config.limits
        if not documents or len(documents) > limits.corpus_documents:
            raise LimitExceededError(f"a scan takes 1 to {limits.corpus_documents} documents; got {len(documents)}")
        watch = _Watch(self, job, lm.n_layers * max(1, len(documents)), time.monotonic() + limits.job_timeout)
        with tempfile.TemporaryDirectory(prefix="lens-scan-", dir=self.store.root) as tmp:
            with observing(watch):
                result = scan(lm, documents, out=Path(tmp) / "scan", progress=False)
            self.store.jobs.report(job.id, self.id, 0.95, "saving")
            return self.store.save_scan(result.folder, owner=job.owner, tags=job.params.get("tags"), job_id=job.id).id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lens.store.worker")
    parser.add_argument("--id", required=True, help="this worker's id (unique in the store)")
    parser.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {args.id} %(levelname)s %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        config = ServeConfig.from_dict(json.loads(os.environ["LENS_SERVE_CONFIG"]))
    except KeyError:
        print("the worker expects its configuration in LENS_SERVE_CONFIG (it is started by lens serve)", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(max(1, config.worker_threads))
    worker = Worker(config, args.id)
    worker.store.workers.register(args.id, os.getpid())

    def stop(signum, frame):  # finish cleanly: the running job stops at its next layer and goes back to the queue
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        worker.serve(max_jobs=args.max_jobs)
    except LensError as exc:
        log.error("%s", exc)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
