"""lens.scan engines and durability: a real local Ray cluster gives the local engine's Scan; a scan killed
mid-way (SIGKILL of a child process) and resumed equals the uninterrupted scan; bad input raises a LensError
that names the fix and loses nothing already checkpointed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scan_support import SCAN_CORPUS

import lens
from lens.atomic import sha256_file
from lens.errors import ConfigError, CorpusError, LensError, ScanError, ScanFormatError

OPTIONS = dict(top_k=4, context=(3, 2), samples=2, batch_size=3, max_len=12, stride=8, shard_size=3, progress=False)


def assert_same_scan(a, b, *, exact_floats: bool = True):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        x, y = a.arrays[key], b.arrays[key]
        if exact_floats or x.dtype.kind in "iub":
            np.testing.assert_array_equal(x, y, err_msg=key)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9, err_msg=key)
    assert sorted(a.manifest["files"]) == sorted(b.manifest["files"])
    for name in a.manifest["files"]:
        if name.endswith(".parquet"):
            ta, tb = pq.read_table(a.folder / name), pq.read_table(b.folder / name)
            assert ta.column_names == tb.column_names, name
            for column in ta.column_names:
                ca, cb = ta.column(column).combine_chunks(), tb.column(column).combine_chunks()
                if pa.types.is_fixed_size_list(ca.type) or pa.types.is_list(ca.type):
                    ca, cb = ca.flatten(), cb.flatten()
                if pa.types.is_floating(ca.type):  # NaN marks context outside the window: equal to itself here
                    np.testing.assert_array_equal(ca.to_numpy(zero_copy_only=False), cb.to_numpy(zero_copy_only=False))
                else:
                    assert ca.equals(cb), (name, column)
    assert a.manifest["corpus"]["sha256"] == b.manifest["corpus"]["sha256"]
    assert a.manifest["shards"] == b.manifest["shards"]


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model_dir):
    torch.set_num_threads(1)
    return lens.load(tiny_model_dir("gpt2"))


@pytest.fixture(scope="module")
def local_scan(tiny_gpt2, tmp_path_factory):
    return lens.scan(tiny_gpt2, SCAN_CORPUS, out=tmp_path_factory.mktemp("local") / "scan", **OPTIONS)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, started once for the session and shut down after it."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    # on a busy 2-core machine Ray's metrics agent can take > 30 s to start; the raylet would give up first
    os.environ.setdefault("RAY_agent_register_timeout_ms", "300000")
    for attempt in range(3):  # Ray gives its raylet a fixed 30 s to register; a busy machine can miss that
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_local_engine(tiny_gpt2, local_scan, ray_cluster, tmp_path):
    remote = lens.scan(tiny_gpt2, SCAN_CORPUS, out=tmp_path / "ray", engine="ray", workers=2, threads=1, **OPTIONS)
    assert remote.manifest["engine"] == "ray" and local_scan.manifest["engine"] == "local"
    assert_same_scan(local_scan, remote)
    # shards submitted a few at a time (several Datasets, each with its own actor pool) give the same scan
    import functools

    from lens.scan import engine, run_scan

    narrow = functools.partial(engine.run_ray, window=3)
    original, run_scan.run_ray = run_scan.run_ray, narrow
    try:
        windowed = lens.scan(tiny_gpt2, SCAN_CORPUS, out=tmp_path / "ray3", engine="ray", workers=2, threads=1, **OPTIONS)
    finally:
        run_scan.run_ray = original
    assert len(windowed.manifest["shards"]) > 3
    assert_same_scan(local_scan, windowed)


def test_scan_is_readable_queryable_and_checked(local_scan, tmp_path):
    s = lens.Scan.load(local_scan.folder)
    assert s.tokens > 0 and s.documents == len(SCAN_CORPUS) and len(s.to_frame()) == 2 * 128
    token = s.examples(0, 0)["token"].iloc[0]
    hits = s.neurons_with_token(token)
    assert ((hits.layer == 0) & (hits.neuron == 0)).any()
    assert set(s.layers_frame().columns) >= {"sink_rate", "entropy_raw_mean", "entropy_raw_std", "massive_entries"}
    assert len(s.logit_effects(1, 5)) == 20
    # a changed file is caught by its checksum, and the message says what to do
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(s.folder, copy)
    with open(copy / "examples.parquet", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    with pytest.raises(ScanFormatError, match="checksum"):
        lens.Scan.load(copy)
    with pytest.raises(ScanFormatError, match="no manifest.json|there is no lens scan"):
        lens.Scan.load(tmp_path / "nothing")


CHILD = """
import os, sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from scan_support import SCAN_CORPUS
import lens
import lens.scan.worker as w
original = w.ShardWorker.run_shard
def slow(self, *a, **k):
    out = original(self, *a, **k)
    time.sleep(0.4)          # leave the test time to kill us between two shards
    return out
w.ShardWorker.run_shard = slow
lm = lens.load({model!r})
lens.scan(lm, SCAN_CORPUS * 3, out={out!r}, **{options!r})
"""


@pytest.mark.slow
def test_scan_killed_mid_way_and_resumed_equals_uninterrupted(tiny_gpt2, tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    script = CHILD.format(tests=str(Path(__file__).parent), model=str(tiny_model_dir("gpt2")), out=str(out),
                          options=OPTIONS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = out / "checkpoint.safetensors"
    deadline = time.time() + 240
    from lens.scan.storage import read_checkpoint

    while time.time() < deadline:
        if child.poll() is not None:
            pytest.fail(f"the child finished before it could be killed: {child.stderr.read().decode()[-2000:]}")
        if checkpoint.exists():
            done = read_checkpoint(out)[1]["shards"]
            if len(done) >= 2:
                break
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    done = read_checkpoint(out)[1]["shards"]
    assert 2 <= len(done) < len(SCAN_CORPUS) * 3 / OPTIONS["shard_size"]
    with pytest.raises(ScanError, match="resume=True"):
        lens.scan(tiny_gpt2, SCAN_CORPUS * 3, out=out, **OPTIONS)  # refuses to overwrite, says how to continue
    resumed = lens.scan(tiny_gpt2, SCAN_CORPUS * 3, out=out, resume=True, **OPTIONS)
    whole = lens.scan(tiny_gpt2, SCAN_CORPUS * 3, out=tmp_path / "whole", **OPTIONS)
    assert_same_scan(resumed, whole)
    assert not checkpoint.exists()


def test_resume_with_a_different_model_or_corpus_is_refused_and_keeps_the_checkpoint(tiny_gpt2, tiny_model_dir, tmp_path):
    out = tmp_path / "partial"
    corpus = list(SCAN_CORPUS) + [42] + ["after the bad item"]
    with pytest.raises(CorpusError, match="not text"):
        lens.scan(tiny_gpt2, corpus, out=out, **OPTIONS)
    checkpoint = out / "checkpoint.safetensors"
    assert checkpoint.exists()
    before = sha256_file(checkpoint)
    with pytest.raises(ScanFormatError, match="not finished .*checkpoint.*resume=True"):  # not "no lens scan"
        lens.Scan.load(out)
    other = lens.load(tiny_model_dir("llama"))
    with pytest.raises(ScanError, match="different model"):
        lens.scan(other, corpus, out=out, resume=True, **OPTIONS)
    changed = ["changed"] + corpus[1:]
    with pytest.raises(ScanError, match="differs from the one checkpointed"):
        lens.scan(tiny_gpt2, changed, out=out, resume=True, **OPTIONS)
    with pytest.raises(ScanError, match="different options"):
        lens.scan(tiny_gpt2, corpus, out=out, resume=True, **{**OPTIONS, "top_k": 5})
    assert sha256_file(checkpoint) == before  # nothing checkpointed was lost
    fixed = list(SCAN_CORPUS) + ["42"] + ["after the bad item"]
    done = lens.scan(tiny_gpt2, fixed, out=out, resume=True, **OPTIONS)
    whole = lens.scan(tiny_gpt2, fixed, out=tmp_path / "whole", **OPTIONS)
    assert_same_scan(done, whole)


def test_bad_corpora_raise_errors_that_name_the_fix(tiny_gpt2, tmp_path):
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("fine text")
    (folder / "gone.txt").symlink_to(tmp_path / "does-not-exist.txt")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "one"}\n{"body": "two"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    cases = [
        (bad_utf8, {}, "re-encode it as UTF-8|encoding="),
        (folder, {}, "cannot read"),
        (tmp_path / "missing.txt", {}, "no file or folder"),
        (tmp_path / "nofiles", {}, "no file or folder"),
        (jsonl, {}, "field="),
        (jsonl, {"field": "text"}, "has no field 'text'"),
        (jsonl, {"field": "title"}, "has no field 'title'"),
        ([], {}, "empty corpus"),
        (empty, {}, "no documents with text"),
        (["ok", None], {}, "not text"),
        ([b"bytes"], {}, "not text"),
        ({"a": "b"}, {}, "dict"),
        (12, {}, "cannot read a corpus"),
        ("a single string", {}, "single string"),
    ]
    for i, (corpus, kwargs, message) in enumerate(cases):
        with pytest.raises(LensError, match=message):
            lens.scan(tiny_gpt2, corpus, out=tmp_path / f"out{i}", **kwargs, **OPTIONS)
    import pandas as pd

    with pytest.raises(CorpusError, match="field="):
        lens.scan(tiny_gpt2, pd.DataFrame({"body": ["x"]}), out=tmp_path / "df", **OPTIONS)
    with pytest.raises(ConfigError, match="layers"):
        lens.scan(tiny_gpt2, ["x"], layers=[7], out=tmp_path / "cfg", **OPTIONS)


def test_the_fixes_error_messages_name_are_accepted_by_scan_and_the_cli(tiny_gpt2, tiny_model_dir, tmp_path, capsys):
    """An error that says "pass pattern=..." or "pass encoding=..." names options lens.scan and `lens scan` take
    (a new-user trial found both rejected with TypeError: only read_corpus had them)."""
    from lens.cli import main

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.md").write_text("The café opens early.", encoding="utf-8")
    (notes / "b.md").write_text("Attention sinks appear on the first token.", encoding="utf-8")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("Le café au lait\nUne crème brûlée\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"pass pattern='\*\.md'"):
        lens.scan(tiny_gpt2, notes, out=tmp_path / "md0", **OPTIONS)
    with pytest.raises(CorpusError, match="encoding="):
        lens.scan(tiny_gpt2, latin, out=tmp_path / "l0", **OPTIONS)
    md = lens.scan(tiny_gpt2, notes, pattern="*.md", out=tmp_path / "md", **OPTIONS)
    assert md.documents == 2 and md.manifest["corpus"]["pattern"] == "*.md"
    assert md.tokens == lens.scan(tiny_gpt2, [p.read_text() for p in sorted(notes.glob("*.md"))],
                                  out=tmp_path / "md-list", **OPTIONS).tokens
    decoded = lens.scan(tiny_gpt2, latin, encoding="latin-1", out=tmp_path / "l", **OPTIONS)
    same = lens.scan(tiny_gpt2, ["Le café au lait", "Une crème brûlée"], out=tmp_path / "l-list", **OPTIONS)
    assert decoded.tokens == same.tokens and decoded.documents == 2
    model = str(tiny_model_dir("gpt2"))
    assert main(["scan", model, str(notes), "--pattern", "*.md", "--out", str(tmp_path / "cli-md"), "--quiet"]) == 0
    assert main(["scan", model, str(latin), "--encoding", "latin-1", "--out", str(tmp_path / "cli-l"), "--quiet"]) == 0
    assert main(["scan", model, str(latin), "--out", str(tmp_path / "cli-bad"), "--quiet"]) == 1
    assert "--encoding" in capsys.readouterr().err


def test_every_corpus_form_reads_the_same_documents(tiny_gpt2, tmp_path):
    import json

    import pandas as pd

    docs = SCAN_CORPUS[:5]
    lines = tmp_path / "docs.txt"
    lines.write_text("\n".join(docs) + "\n\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:02d}.txt").write_text(d)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    forms = [(docs, {}), (lines, {}), (folder, {}), (jsonl, {"field": "text"}),
             (pd.DataFrame({"text": docs}), {"field": "text"}), (iter(docs), {}), ((d for d in docs), {})]
    try:
        import datasets

        forms.append((datasets.Dataset.from_dict({"text": docs}), {"field": "text"}))
    except ImportError:
        pass
    fingerprints = set()
    for i, (corpus, kwargs) in enumerate(forms):
        s = lens.scan(tiny_gpt2, corpus, out=tmp_path / f"s{i}", **kwargs, **OPTIONS)
        assert s.documents == 5
        fingerprints.add(s.manifest["corpus"]["sha256"])
    assert len(fingerprints) == 1


def test_long_documents_are_windowed_never_cut(tiny_gpt2, tmp_path):
    from lens.scan.corpus import windows

    for n, size, stride in [(10, 4, 3), (50, 12, 8), (13, 12, 12), (40, 12, 1), (12, 12, 5)]:
        for first in (False, True):
            ws = windows(0, list(range(n)), size, stride, repeat_first=first)
            counted = [w.position(i) for w in ws for i in range(w.keep, len(w.ids))]
            assert counted == list(range(n)), (n, size, stride, first)
            assert all(len(w.ids) <= size for w in ws)
            if first:
                assert all(w.ids[0] == 0 for w in ws)
    long = " ".join(["tokens keep coming"] * 60)
    s = lens.scan(tiny_gpt2, [long], out=tmp_path / "long", **OPTIONS)
    n_tokens = len(tiny_gpt2.tokenizer(long)["input_ids"]) + 1  # + the BOS lens prepends for GPT-2
    assert s.tokens == n_tokens and s.windows > 1


def test_reductions_split_over_threads_give_the_same_scan(minilm, tmp_path, monkeypatch):
    """On 2 torch threads a scan's probe reductions run split over single-threaded pool threads (each layer's
    sequences, the neuron pass's column ranges: MiniLM has 1,536 neurons a layer). With the forward on the same 2
    threads but every reduction in one thread (the background worker, the whole neuron pass), the scan is
    identical: every array, every Parquet row."""
    from lens.capture import background
    from lens.scan import fused

    corpus = SCAN_CORPUS * 2
    options = dict(OPTIONS, max_len=24, stride=16, batch_size=4, shard_size=4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert background.parallel_threads() == 2
        split = lens.scan(minilm, corpus, out=tmp_path / "split", **options)
        with monkeypatch.context() as patch:
            patch.setattr(background, "parallel_threads", lambda: 1)
            patch.setattr(fused, "parallel_threads", lambda: 1)
            one = lens.scan(minilm, corpus, out=tmp_path / "one", **options)
    finally:
        torch.set_num_threads(before)
    assert split.tokens == one.tokens > 100
    assert_same_scan(split, one)


def test_resume_of_a_finished_scan_checks_the_corpus(tiny_gpt2, tmp_path):
    """A finished scan resumed with another corpus is refused (a new-user trial found it returned the old scan
    for a 3-document corpus after 22 were scanned); the same corpus returns it untouched, without a forward."""
    out = tmp_path / "done"
    corpus = list(SCAN_CORPUS) * 2
    finished = lens.scan(tiny_gpt2, corpus, out=out, **OPTIONS)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    for other, match in [(corpus[:3], "longer corpus"), (corpus[:-1], "longer corpus"),
                         (corpus + ["one more document"], "different corpus"),
                         (corpus[:4] + ["changed"] + corpus[5:], "different corpus .*shard 1, documents 3–5"),
                         (corpus[::-1], "different corpus .*shard 0, documents 0–2")]:
        with pytest.raises(ScanError, match=match):
            lens.scan(tiny_gpt2, other, out=out, resume=True, **OPTIONS)
    same = lens.scan(tiny_gpt2, iter(corpus), out=out, resume=True, **OPTIONS)
    assert same.tokens == finished.tokens and (out / "manifest.json").stat().st_mtime_ns == stamp


def test_options_and_inputs_that_raised_raw_errors_are_lens_errors(tiny_gpt2, tmp_path):
    """Members of one kind found by a new-user trial: inputs that escaped as TypeError, FileExistsError or a
    DuckDB CatalogException (past the CLI's LensError handler), or were misread, or were checked only in the
    first batch."""
    datasets = pytest.importorskip("datasets")
    corpus = list(SCAN_CORPUS[:4])
    one = lens.scan(tiny_gpt2, corpus, layers=np.int64(1), out=tmp_path / "np", **OPTIONS)
    assert one.layers == [1]
    for layers in ("12", "all-ish", [1.5], True, [True], 1.0):
        with pytest.raises(ConfigError, match="layers"):
            lens.scan(tiny_gpt2, corpus, layers=layers, out=tmp_path / "bad-layers", **OPTIONS)
    for option, value in (("epsilon", -3), ("epsilon", 0), ("epsilon", 1.5), ("tau", 0)):
        with pytest.raises(ConfigError, match=option):
            lens.scan(tiny_gpt2, corpus, out=tmp_path / f"bad-{option}", **{**OPTIONS, option: value})
        assert not (tmp_path / f"bad-{option}").exists()  # refused before any work
    a_file = tmp_path / "taken"
    a_file.write_text("not a scan")
    with pytest.raises(ScanError, match="is a file"):
        lens.scan(tiny_gpt2, corpus, out=a_file, **OPTIONS)
    assert a_file.read_text() == "not a scan"
    none = lens.scan(tiny_gpt2, corpus, layers=[], out=tmp_path / "none", **OPTIONS)
    assert none.tokens == one.tokens and len(none.neurons_with_token("the")) == 0

    def rows():
        yield from ({"text": t, "id": i} for i, t in enumerate(corpus))

    streamed = datasets.IterableDataset.from_generator(rows)
    assert streamed.column_names is None  # features unknown up front: the case that raised TypeError
    got = lens.scan(tiny_gpt2, streamed, field="text", out=tmp_path / "stream", **OPTIONS)
    assert got.tokens == one.tokens and got.documents == len(corpus)
    with pytest.raises(CorpusError, match="no column 'body'"):
        lens.scan(tiny_gpt2, streamed, field="body", out=tmp_path / "stream-bad", **OPTIONS)
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": corpus})})
    with pytest.raises(CorpusError, match=r"pass one split, e\.g\. corpus\['train'\]"):
        lens.scan(tiny_gpt2, splits, field="train", out=tmp_path / "splits", **OPTIONS)


def test_second_trial_inputs_are_checked_up_front_and_resumes_compare_as_users_expect(tiny_gpt2, tmp_path):
    """A second new-user trial: options coerced silently or failing after the whole corpus (logit_effects), a
    streaming dataset with known columns, an unknown encoding, paths outside the corpus folder, a scan started from
    a generator (resumable from the same documents as a list), and lens.compare refusing the same corpus scanned
    with another shard_size."""
    datasets = pytest.importorskip("datasets")
    corpus = list(SCAN_CORPUS)
    vocab = tiny_gpt2.model.get_output_embeddings().weight.shape[0]
    big = lens.scan(tiny_gpt2, corpus[:3], logit_effects=10**6, out=tmp_path / "big", **OPTIONS)
    up = big.logit_effects(0, 0).query("direction == 'up'")
    assert len(up) == vocab and up["token_id"].nunique() == vocab  # every token once, no padding rows
    bad = {"logit_effects": [2.5, "3", True, -1], "top_k": [2.7, "5", None, True], "samples": [1.5],
           "batch_size": ["5"], "max_len": [2.9], "context": ["84", (1, 2, 3), (8.5, 4)],
           "massive_abs": [-1, float("nan")], "tau": [float("inf"), "x"], "epsilon": [None],
           "prepend_bos": [0, "False"]}
    for option, values in bad.items():
        for value in values:
            with pytest.raises(ConfigError, match=option.split("[")[0]):
                lens.scan(tiny_gpt2, corpus[:3], out=tmp_path / "bad", **{**OPTIONS, option: value})
            assert not (tmp_path / "bad").exists(), (option, value)
    same = lens.scan(tiny_gpt2, corpus[:3], prepend_bos=np.False_, out=tmp_path / "np-false", **OPTIONS)
    assert same.tokens == lens.scan(tiny_gpt2, corpus[:3], prepend_bos=False, out=tmp_path / "false", **OPTIONS).tokens
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("one document")
    for kwargs, message in (({"encoding": "bogus"}, "unknown text encoding"), ({"encoding": None}, "encoding"),
                            ({"pattern": "/etc/*.conf"}, "inside the corpus folder"),
                            ({"pattern": "../*.txt"}, "inside the corpus folder")):
        with pytest.raises(CorpusError, match=message):
            lens.scan(tiny_gpt2, folder, out=tmp_path / "enc", **kwargs, **OPTIONS)
        assert not (tmp_path / "enc").exists()
    with pytest.raises(ScanError, match="is a file"):
        lens.scan(tiny_gpt2, corpus[:3], out=folder / "a.txt" / "sub", **OPTIONS)
    streamed = datasets.Dataset.from_dict({"text": corpus}).to_iterable_dataset()
    assert streamed.column_names == ["text"]  # known columns, but no len()
    whole = lens.scan(tiny_gpt2, corpus, out=tmp_path / "whole", **OPTIONS)
    assert lens.scan(tiny_gpt2, streamed, field="text", out=tmp_path / "streamed", **OPTIONS).tokens == whole.tokens

    def stops_at_7():
        for i, text in enumerate(corpus):
            if i == 7:
                raise RuntimeError("the source went away")
            yield text

    out = tmp_path / "from-generator"
    with pytest.raises(RuntimeError, match="went away"):
        lens.scan(tiny_gpt2, stops_at_7(), out=out, **OPTIONS)
    with pytest.raises(ScanError, match="as a list or a file"):
        lens.scan(tiny_gpt2, iter(corpus), out=out, resume=True, **OPTIONS)
    with pytest.raises(ScanError, match="shard 0 .*differs"):
        lens.scan(tiny_gpt2, corpus[::-1], out=out, resume=True, **OPTIONS)
    assert_same_scan(lens.scan(tiny_gpt2, corpus, out=out, resume=True, **OPTIONS), whole)
    other_shards = lens.scan(tiny_gpt2, corpus, out=tmp_path / "shards", **{**OPTIONS, "shard_size": 64})
    result = lens.compare(whole, other_shards)  # was "different corpora": the fingerprint chained the shards
    assert np.nanmax(np.abs(result.mean_shift)) < 1e-6
    with pytest.raises(ConfigError, match="different corpora"):
        lens.compare(whole, lens.scan(tiny_gpt2, corpus[:-1], out=tmp_path / "fewer", **OPTIONS))


def test_compare_refuses_scans_of_different_models_and_the_cli_takes_the_window_options(tiny_gpt2, tiny_model_dir,
                                                                                        tmp_path):
    from lens.cli import main

    corpus = list(SCAN_CORPUS)
    a = lens.scan(tiny_gpt2, corpus, out=tmp_path / "gpt2", **OPTIONS)
    b = lens.scan(lens.load(tiny_model_dir("llama")), corpus, out=tmp_path / "llama", **OPTIONS)
    with pytest.raises(ConfigError, match="different models .*architecture"):
        lens.compare(a, b)
    out = tmp_path / "cli"
    assert main(["scan", str(tiny_model_dir("gpt2")), str(tmp_path / "gpt2" / "manifest.json"), "--out", str(out),
                 "--max-len", "12", "--stride", "5", "--context", "2", "1", "--shard-size", "2", "--quiet"]) == 0
    config = lens.Scan.load(out).manifest["config"]
    assert (config["max_len"], config["stride"], tuple(config["context"]), config["shard_size"]) == (12, 5, (2, 1), 2)
