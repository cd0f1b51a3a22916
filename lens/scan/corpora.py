"""Real text that needs no network: the docstrings of Python's own standard library.

The texts come from the CPython standard library installed with this interpreter (Python Software
Foundation License); only modules without side effects on import are read, in a fixed order, so the
corpus is the same on every machine with the same Python version.
"""

from __future__ import annotations

import importlib
import inspect

__all__ = ["python_docstrings", "STDLIB_MODULES"]

STDLIB_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmath", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools",
    "json", "locale", "logging", "lzma", "mailbox", "math", "mimetypes", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched", "secrets", "selectors", "shelve",
    "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile", "zlib",
)


def python_docstrings(limit: int | None = None, *, min_chars: int = 60) -> list[str]:
    """Docstrings of the standard library's modules, classes, functions and methods, whitespace-normalized,
    deduplicated, in a fixed order; each is one document.

    Example: ``lens.scan(lm, python_docstrings(500))``.
    """
    seen: set[str] = set()
    out: list[str] = []

    def add(obj) -> bool:
        doc = inspect.getdoc(obj)
        if not doc:
            return False
        text = " ".join(doc.split())
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            out.append(text)
        return limit is not None and len(out) >= limit

    for name in STDLIB_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional module missing from this build (e.g. sqlite3, lzma)
            continue
        if add(module):
            return out
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if add(obj):
                return out
            if inspect.isclass(obj):
                for method, member in sorted(vars(obj).items()):
                    if not method.startswith("_") and add(member):
                        return out
    return out
