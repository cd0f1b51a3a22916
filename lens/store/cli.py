"""``lens store list / import / export / verify / gc / delete``: the store from the command line.

The store is ``--store DIR`` (default: ``$LENS_STORE``, else ``./lens-store``) with its index
``--index URL`` (default: ``$LENS_INDEX``, else SQLite inside the store). The command line acts as the
store's operator: it may delete anyone's entries (the dashboard's permission rules are for its users).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lens.errors import LensError

__all__ = ["main", "add_store_arguments"]


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=Path, default=None,
                        help="the store directory (default: $LENS_STORE or ./lens-store)")
    parser.add_argument("--index", default=None,
                        help="the index database URL (default: $LENS_INDEX or SQLite inside the store), "
                             "e.g. postgresql://user:password@host/db")


def open_store(args, *, create: bool = False):
    from lens.store import open as open_store_

    path = args.store or Path(os.environ.get("LENS_STORE", "lens-store"))
    return open_store_(path, args.index or os.environ.get("LENS_INDEX") or None, create=create)


def _list(store, args) -> int:
    entries = store.entries(args.kind, search=args.search, owner=args.owner, limit=args.limit)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=1))
        return 0
    print(f"{'id':16}  {'kind':4}  {'owner':12}  {'created (UTC)':16}  {'model':28}  {'attention':14}  {'quant':8}  "
          f"{'inputs':>6}  tags / preview")
    for e in entries:
        print(f"{e.id:16}  {e.kind:4}  {e.owner[:12]:12}  {e.created_text:16}  {e.model.split('/')[-1][:28]:28}  "
              f"{e.attention[:14]:14}  {(e.quant or '-')[:8]:8}  {e.n_inputs:>6}  "
              f"{('[' + ', '.join(e.tags) + '] ') if e.tags else ''}{e.preview[:60]}")
    print(f"{len(entries)} entries")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lens store``. Returns the exit code (1 when ``verify`` finds problems)."""
    parser = argparse.ArgumentParser(prog="lens store", description="The team store: runs and scans with an index.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="entries, newest first")
    add_store_arguments(p)
    p.add_argument("--kind", choices=["run", "scan"], default=None)
    p.add_argument("--search", default=None, help="case-insensitive text in id, owner, model, preview or tags")
    p.add_argument("--owner", default=None)
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p = sub.add_parser("import", help="import .lens runs, scan directories or an export folder")
    add_store_arguments(p)
    p.add_argument("paths", nargs="+", type=Path)
    p.add_argument("--owner", default=None, help="owner of the imported entries (default: yours, or the export's)")
    p.add_argument("--tags", default=None, help="comma-separated tags")
    p = sub.add_parser("export", help="copy entries into a folder (for import elsewhere)")
    add_store_arguments(p)
    p.add_argument("ids", nargs="+")
    p.add_argument("--to", type=Path, required=True, help="the folder to write")
    p = sub.add_parser("verify", help="check every entry's files and checksums; exit code 1 on problems")
    add_store_arguments(p)
    p.add_argument("--no-checksums", action="store_true", help="check existence and sizes only (fast)")
    p = sub.add_parser("gc", help="remove leftovers of interrupted writes and deletes")
    add_store_arguments(p)
    p.add_argument("--grace", type=float, default=3600.0, help="only files older than this many seconds (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p = sub.add_parser("delete", help="delete entries (as the store's operator)")
    add_store_arguments(p)
    p.add_argument("ids", nargs="+")
    args = parser.parse_args(argv)
    try:
        store = open_store(args, create=args.command == "import")
        if args.command == "list":
            return _list(store, args)
        if args.command == "import":
            for path in args.paths:
                for entry in store.import_path(path, owner=args.owner, tags=args.tags):
                    print(f"{entry.id}  {entry.kind}  {entry.owner}  {entry.model}  ({path})")
            return 0
        if args.command == "export":
            folder = store.export(args.ids, args.to)
            print(f"exported {len(args.ids)} entries to {folder}")
            return 0
        if args.command == "verify":
            report = store.verify(checksums=not args.no_checksums)
            print(report)
            return 0 if report.ok else 1
        if args.command == "gc":
            print(store.gc(grace=args.grace, dry_run=args.dry_run))
            return 0
        if args.command == "delete":
            for entry_id in args.ids:
                store.delete(entry_id)
                print(f"deleted {entry_id}")
            return 0
    except LensError as exc:
        print(f"lens store {args.command}: {exc}", file=sys.stderr)
        return 2
    return 2
