"""``lens bench scan``: what its throughput figure reports (issue 12), never how fast anything is.

The benchmark runs for real on a small docstring corpus with the embedded MiniLM, and its result is checked
for what a reader needs: every stage of the breakdown in order (each adds one part of the scan to the one
before), token counts equal to what ``lens.scan`` itself counts on the same corpus file, and a table that
prints each stage's added cost. No timing asserts: the figures are quoted in the README with the command.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch

from lens.bench import scan as bench

STAGES = ["forward", "+ attention probe", "+ residual probe, no spectra", "+ entropy spectra", "+ neuron reducers",
          "whole lens.scan", "(forward in corpus order)"]


@pytest.fixture(scope="module")
def throughput():
    threads = torch.get_num_threads()
    saved, bench._THREADS = bench._THREADS, threads  # the benchmark sets torch's threads: keep the session's
    try:
        return bench._throughput(None, 600, 1, 4)
    finally:
        bench._THREADS = saved
        torch.set_num_threads(threads)


def test_every_stage_is_measured_in_order_on_the_scans_own_token_count(throughput, minilm, tmp_path):
    import lens

    assert list(throughput["seconds"]) == STAGES
    assert all(v > 0 for v in throughput["seconds"].values())
    assert throughput["ratio_to_forward"]["forward"] == 1.0
    for name, seconds in throughput["seconds"].items():
        assert throughput["tokens_per_s"][name] == pytest.approx(throughput["tokens"] / seconds)
    path = bench._corpus_file(tmp_path, 600, minilm)
    scan = lens.scan(minilm, str(path), out=tmp_path / "scan", batch_size=4, progress=False)
    assert throughput["tokens"] == scan.tokens >= 600
    assert throughput["windows"] == scan.windows
    assert -(-scan.windows // 4) <= throughput["batches"] <= scan.windows  # batches of 4 within each shard


def test_the_table_prints_what_each_stage_adds(throughput):
    table = bench.format_table({"model": "embedded all-MiniLM-L6-v2", "machine": {"cpus": 2, "load_average": 0.5},
                                "throughput": throughput, "memory": []})
    rows = {name: line for line in table.splitlines() for name in STAGES if line.strip().startswith(name)}
    assert set(rows) == set(STAGES)
    seconds, forward = throughput["seconds"], throughput["seconds"]["forward"]
    for before, name in itertools.pairwise(STAGES[:-1]):
        added = float(re.search(r"adds ([+-]\d+\.\d+)× the forward's time", rows[name]).group(1))
        assert added == pytest.approx((seconds[name] - seconds[before]) / forward, abs=0.006)
    assert "adds" not in rows["forward"] and "adds" not in rows["(forward in corpus order)"]
    assert "to a plain forward in corpus order the whole scan is" in table


def test_corpus_file_is_real_text_of_at_least_the_asked_tokens(minilm, tmp_path):
    path = bench._corpus_file(Path(tmp_path), 300, minilm)
    docs = path.read_text(encoding="utf-8").splitlines()
    assert docs and all(d.strip() for d in docs)
    ids = minilm.tokenizer(docs, add_special_tokens=True)["input_ids"]
    assert sum(len(i) for i in ids) >= 300
