"""``lens serve``: the team dashboard, its users, and worker-only hosts.

    lens serve [--config FILE] [--address 127.0.0.1] [--port 5006] [--store DIR] [--index URL] [--workers N] [--no-auth]
    lens serve adduser NAME [--admin] [--password-stdin]     add a user (asks for the password twice)
    lens serve passwd NAME [--password-stdin]                 change a password
    lens serve workers [--config FILE] [--workers N]          only the worker pool (another host of the team)

Every subcommand takes ``--config``, ``--store`` and ``--index``; command-line values win over the file's.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from lens.errors import LensError
from lens.store.config import ServeConfig

__all__ = ["main"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="a TOML configuration file (docs/serve.md)")
    parser.add_argument("--store", type=Path, default=None, help="the store directory (default ./lens-store)")
    parser.add_argument("--index", default=None, help="index database URL (default: SQLite inside the store), "
                                                      "e.g. postgresql://user:password@host/db")


def _config(args, **extra) -> ServeConfig:
    store = args.store or (Path(os.environ["LENS_STORE"]) if os.environ.get("LENS_STORE") else None)
    return ServeConfig.load(args.config, store=store, index=args.index or os.environ.get("LENS_INDEX") or None, **extra)


def _password(args, name: str) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    try:
        first = getpass.getpass(f"password for {name}: ")
        again = getpass.getpass("again: ")
    except EOFError:  # a password piped in without --password-stdin: getpass reads one line, then hits the end
        raise LensError("no password was typed at a terminal; to pass one on standard input, add --password-stdin "
                        "(one line); nothing changed") from None
    if again != first:
        raise LensError("the two passwords differ; nothing changed")
    return first


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lens serve``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["adduser"], ["passwd"]):
        parser = argparse.ArgumentParser(prog=f"lens serve {argv[0]}")
        _common(parser)
        parser.add_argument("name")
        parser.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
        if argv[0] == "adduser":
            parser.add_argument("--admin", action="store_true", help="the admin role (delete anything, scans, admin page)")
            parser.add_argument("--oauth", action="store_true",
                                help="a user who signs in through the identity provider (server.oauth_provider): "
                                     "NAME is their name there; no password")
        args = parser.parse_args(argv[1:])
        try:
            from lens.store.core import Store

            config = _config(args)
            store = Store(config.store, config.index or None)
            if argv[0] == "adduser":
                # an OAuth user gets a random password nobody knows: lens's own sign-in can never accept it
                password = secrets.token_urlsafe(32) if args.oauth else _password(args, args.name)
                user = store.users.add(args.name, password, role="admin" if args.admin else "member")
                print(f"added {user.name} ({user.role}) to the store at {store.root}")
            else:
                store.users.set_password(args.name, _password(args, args.name))
                print(f"changed the password of {args.name}")
        except LensError as exc:
            print(f"lens serve {argv[0]}: {exc}", file=sys.stderr)
            return 2
        return 0

    workers_only = argv[:1] == ["workers"]
    parser = argparse.ArgumentParser(prog="lens serve" + (" workers" if workers_only else ""),
                                     description="The team dashboard: a Panel app over a shared store, with workers.")
    _common(parser)
    parser.add_argument("--workers", type=int, default=None, help="worker processes on this host (default 2)")
    if not workers_only:
        parser.add_argument("--address", default=None, help="the address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=None, help="the port (default 5006)")
        parser.add_argument("--no-auth", action="store_true", help="no sign-in (only on a loopback address)")
    args = parser.parse_args(argv[1:] if workers_only else argv)
    if not workers_only:
        _use_returnable_allocator(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if workers_only:
            return _workers(_config(args, workers=args.workers))
        config = _config(args, workers=args.workers, address=args.address, port=args.port,
                         auth=False if args.no_auth else None)
        from .server import serve

        serve(config)
    except LensError as exc:
        print(f"lens serve: {exc}", file=sys.stderr)
        return 2
    return 0


#: set in the environment of a web process that ``lens serve`` restarted with the system allocator
_ALLOCATOR_MARK = "LENS_SERVE_ALLOCATOR"


def _use_returnable_allocator(argv: list[str]) -> None:
    """Restart this process (``execv``, same arguments) with CPython's small-object allocator off
    (``PYTHONMALLOC=malloc``) and at most two glibc arenas (``MALLOC_ARENA_MAX=2``), unless the environment
    already chooses (``PYTHONMALLOC`` set, or ``LENS_SERVE_ALLOCATOR=pymalloc``).

    Why: a dashboard process lives for weeks and its memory must come back after a busy hour. CPython's own
    allocator keeps every 1 MiB arena that still holds one live object, and twenty sessions' worth of Bokeh
    documents leave ~40 MB of such arenas pinned (``lens bench serve``: after/before 1.10); with objects in
    glibc's heap, the trim the dashboard runs after sessions end hands the freed pages back (1.03). Workers,
    which run models, are started with the normal allocator. Linux/glibc only; elsewhere nothing changes.
    """
    if not sys.platform.startswith("linux") or os.environ.get("PYTHONMALLOC") or os.environ.get(_ALLOCATOR_MARK):
        return
    env = {**os.environ, "PYTHONMALLOC": "malloc", _ALLOCATOR_MARK: "malloc"}
    if "MALLOC_ARENA_MAX" not in env:
        env.update(MALLOC_ARENA_MAX="2", **{_ALLOCATOR_MARK: "malloc,arenas"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lens", "serve", *argv], env)


def _workers(config: ServeConfig) -> int:
    from lens.store.pool import WorkerPool

    if not config.workers:
        print("lens serve workers: --workers must be ≥ 1", file=sys.stderr)
        return 2
    pool = WorkerPool(config).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    signal.signal(signal.SIGINT, lambda *a: done.set())
    print(f"lens serve workers: {config.workers} workers on the store at {config.store}", flush=True)
    done.wait()
    pool.stop()
    return 0
