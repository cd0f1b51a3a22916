"""Crash safety of the store: a writer killed with SIGKILL — at random moments, and at each step of a write
or delete on purpose — leaves the index and the files consistent: every row has its whole files with the
right checksums, ``verify`` finds no problem, and ``gc`` clears what the interrupted write left."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import lens.store

pytestmark = pytest.mark.slow

# The writer: saves runs (a few MB each, so that a write takes long enough to be interrupted in the middle),
# copies scans in and deletes entries, for ever; a planted CRASH_AT point kills it with SIGKILL at that step.
WRITER = textwrap.dedent('''
    import os, random, signal, sys, json, hashlib
    from pathlib import Path
    import numpy as np
    import lens.store
    from lens.run import Run
    from lens.store import core, files, schema

    root, index, seed, crash_at = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4]
    store = lens.store.open(root, index=index)
    rng = random.Random(seed)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if crash_at == "before-rename":          # temp file written and fsynced, not renamed
        real = os.replace
        os.replace = lambda a, b: die()
    elif crash_at == "after-rename":         # the file is in place, no index row yet
        real = os.replace
        def replace(a, b):
            real(a, b); die()
        os.replace = replace
    elif crash_at == "mid-transaction":      # the entries row inserted, the files rows not, nothing committed
        real_insert = schema.files.insert
        core.schema.files.insert = lambda *a, **k: die()
    elif crash_at == "scan-renamed":         # a scan directory in place, no index row yet
        real_rename = os.rename
        def rename(a, b):
            real_rename(a, b)
            if Path(b).parent.parent.name == "scans": die()
        os.rename = rename
    elif crash_at == "after-row-deleted":    # a delete committed, the files not removed yet
        core.Store._remove_files = lambda self, kind, entry_id: die()

    def run(n):
        rng_np = np.random.default_rng(n)
        t = 200
        arrays = {"token_ids": rng_np.integers(0, 100, t).astype(np.int64), "offsets": np.array([0, t], np.int64),
                  "special": np.zeros(t, bool), "attn.key_mass": rng_np.random((6, 12, t), dtype=np.float32),
                  "attn.query_count": np.full((6, t), t, np.float32),
                  "resid.hidden.0": rng_np.random((t, 4096), dtype=np.float32)}
        meta = {"n_layers": 6, "n_heads": 12, "causal": False, "texts": [f"text {n}"],
                "provenance": {"model_id": "crash/test", "attention": {"kind": "dense"}}}
        return Run(arrays=arrays, tokens=[[f"t{i}" for i in range(t)]], meta=meta)

    scan_src = Path(root).parent / f"scan-src-{seed}"
    if not (scan_src / "manifest.json").exists():
        scan_src.mkdir(exist_ok=True)
        (scan_src / "stats.safetensors").write_bytes(os.urandom(3_000_000))
        sha = hashlib.sha256((scan_src / "stats.safetensors").read_bytes()).hexdigest()
        (scan_src / "manifest.json").write_text(json.dumps({"schema": "lens.scan/1", "status": "complete",
                                                           "files": {"stats.safetensors": sha}}))
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        op = rng.random()
        entries = store.entries()
        if crash_at == "after-row-deleted" and entries:
            op = 0.95
        if crash_at == "scan-renamed":
            op = 0.7
        if op < 0.6:
            store.save_run(run(n), owner="crash")
        elif op < 0.8:
            store.save_scan(scan_src, owner="crash")
        elif entries:
            store.delete(rng.choice(entries).id)
''')


def _writer(tmp: Path, index: str, seed: int, crash_at: str = "none") -> subprocess.Popen:
    script = tmp / "writer.py"
    if not script.exists():
        script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(tmp / "store"), index, str(seed), crash_at],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _consistent(store) -> None:
    report = store.verify()
    assert report.ok, report.problems
    assert report.foreign == []
    for entry in store.entries():  # every indexed entry is whole and readable
        if entry.kind == "run":
            assert store.load_run(entry.id, verify=True).n_sequences == 1
        else:
            assert (store.scan_folder(entry.id) / "stats.safetensors").stat().st_size == 3_000_000


def _wait_ready(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "ready", (line, proc.stderr.read() if proc.poll() is not None else "")


def test_sigkill_at_random_moments_leaves_index_and_files_consistent(tmp_path):
    store = lens.store.open(tmp_path / "store")
    rng = random.Random(1234)
    kills = 0
    for round_ in range(10):
        proc = _writer(tmp_path, "", round_)
        _wait_ready(proc)
        time.sleep(rng.uniform(0.05, 1.2))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL, proc.stderr.read()
        kills += 1
        _consistent(store)
    assert kills == 10 and store.entries(), "the writers should have stored something between kills"
    assert store.gc(grace=0).removed is not None
    final = store.verify()
    assert final.ok and final.garbage == [] and final.foreign == []


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_sigkill_at_each_step_of_a_write_or_delete(backend, tmp_path, request):
    index = ""
    if backend == "postgresql":
        from serve_support import create_database

        index = create_database(request.getfixturevalue("pg_url"), f"crash_{uuid.uuid4().hex[:10]}")
    store = lens.store.open(tmp_path / "store", index=index or None)
    # something to delete first
    proc = _writer(tmp_path, index, 99)
    _wait_ready(proc)
    deadline = time.monotonic() + 60
    while len(store.entries()) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait(30)
    _consistent(store)
    for step, leftover in [("before-rename", "a temporary file"), ("after-rename", "an unindexed whole file"),
                           ("mid-transaction", "an unindexed whole file"), ("scan-renamed", "an unindexed scan"),
                           ("after-row-deleted", "files of a deleted entry")]:
        before = {e.id for e in store.entries()}
        proc = _writer(tmp_path, index, 7, step)
        _wait_ready(proc)
        assert proc.wait(60) == -signal.SIGKILL, (step, proc.stderr.read())
        after = {e.id for e in store.entries()}
        if step == "after-row-deleted":
            assert len(before - after) == 1 and after <= before, step
        else:
            assert after == before, step  # the interrupted write is not in the index
        report = store.verify()
        assert report.ok, (step, report.problems)
        assert report.garbage, f"{step} should leave {leftover} for gc"
        assert store.gc(grace=0).removed
        _consistent(store)
        assert store.verify().garbage == []
    if index:
        store.index.dispose()
