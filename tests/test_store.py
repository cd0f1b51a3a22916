"""The team store (lens.store) on SQLite and on a real PostgreSQL server: runs and scans with checksums,
ids that never become paths, permissions, scrypt passwords, the job queue under concurrent workers,
export/import, verify and gc, and the command line."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from serve_support import fake_scan
from test_widgets_support import synthetic_run

import lens
import lens.store
from lens.errors import ConfigError, LimitExceededError, NotFoundError, PermissionDeniedError, StoreError
from lens.store import schema
from lens.store.files import check_id, run_path
from lens.store.users import check_password, hash_password


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """An empty store whose index is SQLite in the folder, or a fresh database on the session's PostgreSQL."""
    if request.param == "sqlite":
        yield lens.store.open(tmp_path / "store", user="ana")
        return
    from serve_support import create_database

    url = create_database(request.getfixturevalue("pg_url"), f"t_{uuid.uuid4().hex[:12]}")
    s = lens.store.open(tmp_path / "store", index=url, user="ana")
    yield s
    s.index.dispose()


@pytest.fixture
def team(store):
    store.users.add("ana", "ana-password", role="member")
    store.users.add("bo", "bo-password", role="member")
    store.users.add("root", "root-password", role="admin")
    return store


def test_a_run_round_trips_with_its_checksum_and_index_columns(store):
    run = synthetic_run([7, 5], n_layers=3, n_heads=2)
    run.meta["texts"] = ["The cat sat on the mat.", "Dogs bark."]
    entry = store.save_run(run, tags="Baseline, planted ,baseline")
    assert entry.kind == "run" and entry.owner == "ana" and entry.tags == ("baseline", "planted")
    assert (entry.model, entry.attention, entry.quant, entry.n_inputs, entry.n_tokens) == ("synthetic/planted", "dense", "", 2, 12)
    assert entry.preview == "The cat sat on the mat. | Dogs bark."
    path = run_path(store.root, entry.id)
    assert entry.files == {"run.lens": hashlib.sha256(path.read_bytes()).hexdigest()}
    back = store.load_run(entry.id, verify=True)
    for name, array in run.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], array)
    assert back.tokens == run.tokens
    assert [e.id for e in store.entries("run")] == [entry.id]
    assert store.entries("run", search="DOGS")[0].id == entry.id and store.entries("run", search="nothing") == []
    assert store.entries("run", tag="planted") and not store.entries("run", tag="plant")
    assert store.entries("scan") == []
    assert store.verify().ok and store.verify().garbage == []
    frame = store.runs()
    assert list(frame["id"]) == [entry.id] and frame["n_tokens"].iloc[0] == 12


@pytest.mark.parametrize("bad", ["../../etc/passwd", "", None, "ABCDEF0123456789", "0123456789abcde", "0123456789abcdef0",
                                 "/etc/passwd", "0123456789abcde/", 12345, "..%2f..%2fetc"])
def test_an_id_that_is_not_16_hex_digits_never_reaches_the_filesystem(bad, tmp_path):
    store = lens.store.open(tmp_path / "s")
    with pytest.raises(NotFoundError, match="16 hex digits"):
        check_id(bad)
    with pytest.raises(NotFoundError):
        store.entry(bad)
    with pytest.raises(NotFoundError):
        store.load_run(bad)


def test_unknown_ids_and_damaged_files_say_what_happened(store):
    with pytest.raises(NotFoundError, match="no run"):
        store.load_run("0123456789abcdef")
    entry = store.save_run(synthetic_run([4]))
    path = run_path(store.root, entry.id)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="checksum"):
        store.load_run(entry.id, verify=True)
    report = store.verify()
    assert not report.ok and "does not match its sha256" in report.problems[0]
    path.unlink()
    assert "is missing" in store.verify().problems[0]
    with pytest.raises(StoreError, match="missing"):
        store.load_run(entry.id)


def test_runs_are_read_by_the_team_and_deleted_by_their_owner_or_an_admin(team):
    mine = team.save_run(synthetic_run([4]), owner="ana")
    theirs = team.save_run(synthetic_run([5]), owner="ana")
    with pytest.raises(PermissionDeniedError, match="belongs to ana"):
        team.delete(mine.id, by="bo")
    with pytest.raises(PermissionDeniedError):
        team.set_tags(mine.id, "x", by="bo")
    assert team.load_run(mine.id).n_sequences == 1  # bo reads it; nothing changed
    assert run_path(team.root, mine.id).is_file()
    team.delete(mine.id, by="ana")
    team.delete(theirs.id, by="root")  # an admin deletes anyone's
    assert team.entries() == [] and team.verify().ok and team.verify().garbage == []
    team.users.disable("root")
    other = team.save_run(synthetic_run([3]), owner="ana")
    with pytest.raises(PermissionDeniedError):  # a disabled admin is no admin
        team.delete(other.id, by="root")


def test_passwords_are_scrypt_hashes_checked_in_constant_time(team):
    with team.index.read() as conn:
        stored = dict(conn.execute(sa.select(schema.users.c.name, schema.users.c.password)).all())
    assert all(v.startswith("scrypt$16384$8$1$") and "password" not in v for v in stored.values())
    assert stored["ana"] != hash_password("ana-password")  # salted
    assert check_password("ana-password", stored["ana"]) and not check_password("ana-passwore", stored["ana"])
    assert not check_password("x", "plain-text") and not check_password("x", "scrypt$1$1$1$!!$!!")
    assert team.users.authenticate("ana", "ana-password").name == "ana"
    assert team.users.authenticate("root", "root-password").is_admin
    for name, password in [("ana", "wrong-password"), ("nobody", "ana-password"), ("", ""), ("../x", "y"),
                           ("ana", "")]:
        assert team.users.authenticate(name, password) is None
    team.users.disable("ana")
    assert team.users.authenticate("ana", "ana-password") is None
    team.users.disable("ana", False)
    team.users.set_password("ana", "a new password")
    assert team.users.authenticate("ana", "ana-password") is None and team.users.authenticate("ana", "a new password")
    with pytest.raises(ConfigError, match="8 characters"):
        team.users.add("cy", "short")
    with pytest.raises(ConfigError, match="user names"):
        team.users.add("../cy", "long enough")
    with pytest.raises(StoreError, match="exists"):
        team.users.add("bo", "another password")


def test_the_job_queue_is_fifo_per_model_with_per_user_limits(team):
    jobs = team.jobs
    a1 = jobs.submit("ana", "trace", "minilm", {"texts": ["a"]})
    a2 = jobs.submit("ana", "trace", "minilm", {"texts": ["b"]})
    b1 = jobs.submit("bo", "trace", "minilm", {"texts": ["c"]})
    g1 = jobs.submit("bo", "trace", "gpt2", {"texts": ["d"]})
    assert [jobs.position(j.id) for j in (a1, a2, b1, g1)] == [1, 2, 3, 4]
    with pytest.raises(LimitExceededError, match="already has 2 jobs"):
        jobs.submit("ana", "trace", "minilm", {"texts": ["e"]}, max_active=2)
    first = jobs.claim("w1", ["minilm"], max_running_per_user=1)
    assert first.id == a1.id and first.status == "running" and first.worker_id == "w1"
    second = jobs.claim("w2", ["minilm"], max_running_per_user=1)
    assert second.id == b1.id  # ana is at her limit: bo's job goes first
    assert jobs.claim("w3", ["minilm"], max_running_per_user=1) is None
    assert jobs.claim("w3", ["gpt2"], max_running_per_user=2).id == g1.id  # bo may run two
    assert jobs.position(a2.id) == 1
    assert not jobs.report(a1.id, "w1", 0.5, "half") and jobs.get(a1.id).progress == 0.5
    assert jobs.finish(a1.id, "w1", "0123456789abcdef") and jobs.get(a1.id).status == "done"
    assert not jobs.finish(a1.id, "w1", "0123456789abcdef")  # only once
    assert jobs.claim("w1", ["minilm"], max_running_per_user=1).id == a2.id
    with pytest.raises(PermissionDeniedError):
        jobs.cancel(a2.id, by="bo")
    assert jobs.cancel(a2.id, by="ana").cancel and jobs.report(a2.id, "w1", 0.1, "x")  # the worker learns it
    assert jobs.mark_cancelled(a2.id, worker_id="w1") and jobs.get(a2.id).status == "cancelled"
    assert jobs.fail_running_of("w2", "died") == [b1.id] and jobs.get(b1.id).error == "died"
    assert jobs.requeue(g1.id, "w3") and jobs.get(g1.id).status == "queued"
    queued = jobs.submit("ana", "trace", "minilm", {"texts": ["f"]})
    assert jobs.cancel(queued.id, by="root", is_admin=True).status == "cancelled"
    assert jobs.counts() == {"done": 1, "cancelled": 2, "failed": 1, "queued": 1}


def test_concurrent_workers_never_take_the_same_job(store, tmp_path):
    ids = [store.jobs.submit(f"u{i % 3}", "trace", "m", {"i": i}).id for i in range(40)]
    index = "" if store.index.dialect == "sqlite" else store.index.engine.url.render_as_string(hide_password=False)
    ctx = multiprocessing.get_context("spawn")
    from serve_support import claim_all

    procs = [ctx.Process(target=claim_all, args=(str(store.root), index, f"w{k}", str(tmp_path / f"{k}.json")))
             for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    taken = [job for k in range(4) for job in json.loads((tmp_path / f"{k}.json").read_text())]
    assert sorted(taken) == sorted(ids)  # every job exactly once
    assert store.jobs.counts() == {"done": 40}


def test_any_scan_directory_is_stored_whole_with_a_checksum_per_file(store, tmp_path):
    entry = store.save_scan(fake_scan(tmp_path / "scan"), tags="corpus")
    assert (entry.kind, entry.n_inputs, entry.n_tokens, entry.preview) == ("scan", 12, 345, "twelve documents")
    assert set(entry.files) == {"manifest.json", "stats.safetensors", "examples.parquet"}
    folder = store.scan_folder(entry.id)
    assert all(hashlib.sha256((folder / n).read_bytes()).hexdigest() == s for n, s in entry.files.items())
    assert store.verify().ok
    (folder / "extra.bin").write_bytes(b"x")
    assert "does not list" in store.verify().problems[0]
    (folder / "extra.bin").unlink()
    with pytest.raises(StoreError, match="not finished"):
        store.save_scan(fake_scan(tmp_path / "running", status="running"))
    bad = fake_scan(tmp_path / "bad")
    (bad / "stats.safetensors").write_bytes(b"changed")
    with pytest.raises(StoreError, match="does not match the sha256"):
        store.save_scan(bad)
    sneaky = fake_scan(tmp_path / "sneaky", files={"../../etc/passwd": "0" * 64})
    with pytest.raises(StoreError, match="leaves its folder"):
        store.save_scan(sneaky)
    linked = fake_scan(tmp_path / "linked")
    (linked / "stats.safetensors").unlink()
    (linked / "stats.safetensors").symlink_to("/etc/hostname")
    with pytest.raises(StoreError, match="not a regular file"):
        store.save_scan(linked)
    with pytest.raises(StoreError, match="no manifest.json"):
        store.save_scan(tmp_path)
    assert [e.id for e in store.entries()] == [entry.id]  # the refused ones left nothing behind
    assert store.verify().garbage == []


def test_export_and_import_keep_ids_owners_tags_and_checksums(store, tmp_path):
    run = store.save_run(synthetic_run([6]), owner="ana", tags="a")
    scan = store.save_scan(fake_scan(tmp_path / "scan"), owner="bo", tags="b")
    out = store.export([run.id, scan.id], tmp_path / "export")
    other = lens.store.open(tmp_path / "other", user="cy")
    imported = other.import_path(out)
    assert [(e.id, e.kind, e.owner, e.tags, e.files) for e in imported] == [
        (run.id, "run", "ana", ("a",), run.files), (scan.id, "scan", "bo", ("b",), scan.files)]
    assert other.import_path(out) == imported  # twice: nothing new
    assert len(other.entries()) == 2 and other.verify().ok
    single = other.import_path(out / f"{run.id}.lens", owner="dee")
    assert single[0].id != run.id and single[0].owner == "dee"
    with pytest.raises(StoreError, match="neither"):
        other.import_path(tmp_path / "other" / "runs")


def test_gc_removes_only_leftovers_of_interrupted_writes(store):
    keep = store.save_run(synthetic_run([4]))
    orphan = run_path(store.root, "00000000000000aa")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"a whole file no row names")
    temp = run_path(store.root, keep.id).parent / f".{keep.id}.lens.abc123.tmp"
    temp.write_bytes(b"half")
    (store.root / "scans" / "aa").mkdir(parents=True)
    (store.root / "scans" / "aa" / ".00000000000000aa.1234.tmp").mkdir()
    foreign = store.root / "runs" / "notes.txt"
    foreign.write_text("someone's notes")
    report = store.verify()
    assert report.ok and len(report.garbage) == 3 and report.foreign == [foreign]
    assert store.gc(grace=3600).removed == []  # too young: maybe a write in progress
    assert len(store.gc(grace=0, dry_run=True).removed) == 3 and orphan.exists()
    assert len(store.gc(grace=0).removed) == 3
    report = store.verify()
    assert report.ok and report.garbage == [] and foreign.exists() and store.load_run(keep.id)


def test_the_version_token_changes_with_every_entry_change(store):
    seen = [store.version()]
    entry = store.save_run(synthetic_run([4]))
    seen.append(store.version())
    store.set_tags(entry.id, "x")
    seen.append(store.version())
    store.delete(entry.id)
    seen.append(store.version())
    assert len(set(seen)) == 4 and store.count() == 0


def test_the_shared_setting_is_created_once(store):
    first = store.setting("cookie_secret", lambda: "one")
    assert first == "one" and store.setting("cookie_secret", lambda: "two") == "one"
    with pytest.raises(NotFoundError):
        store.setting("missing")


def test_the_command_line(tmp_path, capsys):
    from lens.cli import main

    root = tmp_path / "cli-store"
    store = lens.store.open(root, user="ana")
    entry = store.save_run(synthetic_run([4]), tags="first")
    synthetic_run([3]).save(tmp_path / "loose.lens")
    assert main(["store", "list", "--store", str(root)]) == 0
    assert entry.id in capsys.readouterr().out
    assert main(["store", "import", str(tmp_path / "loose.lens"), "--store", str(root), "--owner", "bo", "--tags", "x,y"]) == 0
    assert "loose.lens" in capsys.readouterr().out
    assert main(["store", "list", "--store", str(root), "--json", "--owner", "bo"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [e["tags"] for e in listed] == [["x", "y"]]
    assert main(["store", "export", entry.id, "--to", str(tmp_path / "out"), "--store", str(root)]) == 0
    assert (tmp_path / "out" / f"{entry.id}.lens").is_file()
    assert main(["store", "verify", "--store", str(root)]) == 0
    run_path(root, entry.id).write_bytes(b"damaged")
    assert main(["store", "verify", "--store", str(root)]) == 1
    assert "problem" in capsys.readouterr().out
    assert main(["store", "delete", entry.id, "--store", str(root)]) == 0
    assert main(["store", "gc", "--grace", "0", "--store", str(root)]) == 0
    assert main(["store", "verify", "--store", str(root)]) == 0
    assert main(["store", "list", "--store", str(tmp_path / "nowhere")]) == 2
    assert "no store" in capsys.readouterr().err


def test_lens_store_is_reachable_from_the_package_without_weighing_on_import_lens():
    assert lens.store.open is lens.store.__dict__["open"] and "store" in dir(lens)
