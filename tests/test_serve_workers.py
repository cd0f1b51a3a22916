"""The worker pool against a real store: real worker processes with the embedded MiniLM take jobs from the
queue; a failing job records its error and the worker goes on; a cancelled or timed-out job stops at its
next layer; a worker killed with SIGKILL mid-job has its job marked failed and a new worker takes the next."""

from __future__ import annotations

import os
import signal
import time

import pytest

import lens.store
from lens.store.config import Limits, ModelSpec, ServeConfig
from lens.store.pool import WorkerPool, describe_exit

pytestmark = pytest.mark.slow

SENTENCE = "Attention sinks form on the first token of many layers, and nobody planned them. "
LONG = [SENTENCE * 20] * 48  # ≈ 340 tokens each: seconds of work for MiniLM
LATE = [SENTENCE * 29] * 64  # ≈ 500 tokens each: longer than the timeout
TIMEOUT = 4.0


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("pool-store")
    config = ServeConfig.load(None, store=root, workers=1,
                              limits=Limits(job_timeout=TIMEOUT, running_per_user=1, jobs_per_user=10),
                              models=(ModelSpec("minilm", quant=("none", "int8")),))
    store = lens.store.open(root)
    pool = WorkerPool(config, stale_after=20).start()
    try:
        yield pool, store
    finally:
        pool.stop()


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(what)


def finished(store, job_id: str, timeout: float = 120):
    return wait_for(lambda: (j := store.jobs.get(job_id)).final and j, timeout, f"job {job_id} did not finish")


def running(store, job_id: str, timeout: float = 120):
    return wait_for(lambda: (j := store.jobs.get(job_id)).status == "running" and j.progress > 0.05 and j,
                    timeout, f"job {job_id} never ran")


def test_jobs_run_and_failing_ones_record_their_error_while_the_worker_goes_on(pool):
    pool, store = pool
    good = store.jobs.submit("ana", "trace", "minilm", {"texts": ["The cat sat on the mat.", "Paris is in France."],
                                                        "attention": "dense", "tags": ["t"]})
    too_long = store.jobs.submit("ana", "trace", "minilm", {"texts": ["short", "word " * 700]})
    no_variant = store.jobs.submit("ana", "trace", "minilm", {"texts": ["x"], "quant": "nvfp4"})  # not configured
    again = store.jobs.submit("ana", "trace", "minilm", {"texts": ["The dog barked."], "quant": "int8"})
    done = finished(store, good.id)
    assert done.status == "done", done.error
    entry = store.entry(done.result_id)
    assert (entry.owner, entry.n_inputs, entry.tags, entry.job_id) == ("ana", 2, ("t",), good.id)
    run = store.load_run(done.result_id, verify=True)
    assert run.kept_patterns() and run.meta["job"]["id"] == good.id  # short inputs: patterns for the explorer
    failed = finished(store, too_long.id)
    assert failed.status == "failed" and "input 2 has" in failed.error and "limit here is 512" in failed.error
    failed = finished(store, no_variant.id)
    assert failed.status == "failed" and "not available" in failed.error
    second = finished(store, again.id)
    assert second.status == "done" and store.entry(second.result_id).quant == "int8"
    assert len({j.worker_id for j in (done, failed, second)}) == 1  # the same worker went on
    (worker,) = store.workers.list(alive_only=True)
    assert worker.jobs_done >= 4 and worker.models["minilm"]["quant"] == ["none", "int8"]


def test_the_deployment_choices_are_lens_kernels():
    from lens.store.worker import attention_preset

    assert attention_preset("dense") == "dense"
    assert attention_preset("streaming").describe()["mode"] == "streaming"
    assert attention_preset("sparse").describe() | {} == {**attention_preset("sparse").describe(), "mode": "hybrid"}
    with pytest.raises(lens.ConfigError, match="dense, streaming or sparse"):
        attention_preset("flash")


def test_a_running_job_is_cancelled_at_its_next_layer_and_a_late_one_times_out(pool):
    pool, store = pool
    pids = pool.pids()
    job = store.jobs.submit("bo", "trace", "minilm", {"texts": LONG})
    running(store, job.id)
    store.jobs.cancel(job.id, by="bo")
    cancelled = finished(store, job.id, timeout=30)
    assert cancelled.status == "cancelled" and cancelled.result_id is None
    late = store.jobs.submit("bo", "trace", "minilm", {"texts": LATE})
    timed_out = finished(store, late.id, timeout=TIMEOUT + 60)
    assert timed_out.status == "failed" and "timed out after 4 s" in timed_out.error
    assert timed_out.finished - timed_out.started < TIMEOUT + 10
    assert pool.pids() == pids  # the worker survived both and keeps its models
    after = store.jobs.submit("bo", "trace", "minilm", {"texts": ["Still here."]})
    assert finished(store, after.id).status == "done"


def test_a_worker_killed_mid_job_fails_that_job_and_is_replaced(pool):
    pool, store = pool
    job = store.jobs.submit("cy", "trace", "minilm", {"texts": LONG})
    victim = running(store, job.id).worker_id
    pid = pool.pids()[victim]
    nxt = store.jobs.submit("cy", "trace", "minilm", {"texts": ["The next job."]})
    os.kill(pid, signal.SIGKILL)
    failed = finished(store, job.id, timeout=30)
    assert failed.status == "failed" and "worker process died (killed by SIGKILL)" in failed.error
    done = finished(store, nxt.id, timeout=180)
    assert done.status == "done" and done.worker_id != victim
    dead = {w.id: w for w in store.workers.list()}[victim]
    assert dead.status == "dead" and dead.error == "killed by SIGKILL"
    assert pool.replaced == 1 and victim not in pool.pids()
    assert store.verify().ok


def test_exit_codes_are_told_as_people_say_them():
    assert describe_exit(-9) == "killed by SIGKILL" and describe_exit(3) == "exited with code 3"
