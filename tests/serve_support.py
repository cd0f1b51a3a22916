"""Real services for the store and dashboard tests, started and stopped by the tests, on 127.0.0.1 only.

* ``postgres()``: Debian's PostgreSQL (``/usr/lib/postgresql/<v>/bin``) in a temporary directory on a free
  loopback port, with password (SCRAM) authentication. ``initdb`` refuses to run as root, so as root the
  server runs as the ``postgres`` system user that Debian's package creates (or ``lens-pg``, created here
  with ``useradd`` when there is none); as anyone else it runs as that user.
* ``lens_server()``: ``lens serve`` in a subprocess (its own store, users and worker pool).
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

__all__ = ["fake_scan", "claim_all", "postgres_bin", "postgres", "create_database", "lens_server", "free_port", "REQUIRE_POSTGRES"]

#: CI (.ci/run) installs PostgreSQL and sets this: there a missing server fails the tests instead of skipping.
REQUIRE_POSTGRES = os.environ.get("LENS_REQUIRE_POSTGRES") == "1"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


def _run_as() -> list[str]:
    """The command prefix that runs a program as a non-root user (empty when we are not root)."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "lens-pg"):
        try:
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
        except KeyError:
            continue
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "lens-pg"], check=True)
    return ["runuser", "-u", "lens-pg", "--"]


@contextlib.contextmanager
def postgres(*, user: str = "lens") -> Iterator[str]:
    """Start a PostgreSQL server; yield ``postgresql://lens:<password>@127.0.0.1:<port>/postgres``."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
    prefix = _run_as()
    home = Path(tempfile.mkdtemp(prefix="lens-pg-"))
    password = secrets.token_hex(12)
    port = free_port()
    try:
        (home / "pw").write_text(password + "\n")
        if prefix:
            owner = prefix[2]
            shutil.chown(home, owner)
            shutil.chown(home / "pw", owner)
        data, log = home / "data", home / "server.log"
        subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={home / 'pw'}",
                        "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={home} -c fsync=off"
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
                        "start"], check=True, capture_output=True)
        try:
            yield f"postgresql://{user}:{password}@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                           capture_output=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def create_database(url: str, name: str) -> str:
    """Create database ``name`` on the server of ``url``; return the URL of the new database."""
    import psycopg

    with psycopg.connect(url.replace("postgresql://", "postgresql://", 1), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + f"/{name}"


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"lens serve exited with code {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def lens_server(config: Path, *args: str, port: int, timeout: float = 120,
                env: dict[str, str] | None = None) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``lens serve --config config --port port *args``; yield (URL, process) once it answers."""
    log = config.with_suffix(".log")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lens", "serve", "--config", str(config), "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/liveness", proc, timeout, log)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def claim_all(root: str, index: str, worker: str, out: str) -> None:
    """A worker in a test: claim and finish jobs of model "m" until none is left; write their ids to ``out``."""
    import json

    import lens.store

    store = lens.store.open(root, index=index or None)
    taken = []
    while True:
        job = store.jobs.claim(worker, ["m"], max_running_per_user=None)
        if job is None:
            break
        taken.append(job.id)
        store.jobs.finish(job.id, worker, "0123456789abcdef")
    Path(out).write_text(json.dumps(taken))


def fake_scan(folder: Path, **manifest) -> Path:
    """A finished scan directory in lens.scan's layout (manifest.json with a sha256 per listed file), with
    random contents: what the store must keep whole, whatever the scan holds."""
    import hashlib
    import json

    folder.mkdir(parents=True)
    (folder / "stats.safetensors").write_bytes(os.urandom(5000))
    (folder / "examples.parquet").write_bytes(b"PAR1" + os.urandom(100))
    files = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("stats.safetensors", "examples.parquet")}
    data = {"schema": "lens.scan/1", "status": "complete", "files": files,
            "provenance": {"model_id": "sentence-transformers/all-MiniLM-L6-v2", "attention": {"kind": "dense"}},
            "corpus": {"documents": 12, "tokens": 345, "description": "twelve documents"}, **manifest}
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder
