"""Atomic file writing and checksums, shared by every stage that saves data (runs, scans, the store).

A write goes to a temporary file in the destination folder, is flushed to disk (``fsync``), given the
permissions a plain ``open(path, "w")`` would have (``0o666`` minus the process umask — ``mkstemp``'s
``0o600`` would hide a team's files from each other), and renamed into place; the folder is then
synced so that the rename itself survives a crash. A crash at any point leaves either the old file or
the whole new one, never a half-written file under the final name.

Example::

    with atomic_path("runs/a.lens") as tmp:
        save_file(arrays, tmp)          # any writer that takes a path
    sha256_file("runs/a.lens")
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "sha256_bytes", "sha256_file", "file_mode"]

_UMASK: int | None = None


def file_mode() -> int:
    """The mode a new regular file gets from ``open(path, "w")`` in this process: ``0o666 & ~umask``."""
    global _UMASK
    if _UMASK is None:
        # os.umask can only be read by setting it; do it once, outside any hot path.
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK = mask
    return 0o666 & ~_UMASK


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit, fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. Parent folders are
    created. The final file has the umask's permissions (e.g. 0644), not ``mkstemp``'s 0600.

    Example: ``with atomic_path("out/run.lens") as tmp: tmp.write_bytes(data)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def sha256_bytes(data: bytes | memoryview) -> str:
    """Hex sha256 of a bytes-like object, e.g. an array's buffer: ``sha256_bytes(arr.tobytes())``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (memory independent of the file's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
