"""Corpus readers and windowing for ``lens.scan`` (docs/definitions.md, "Corpus scans").

A *corpus* is an ordered sequence of documents; document ``i`` is the i-th text the reader yields, and that
number (the document id) is what every example of a scan refers to. Readers stream: nothing holds the
whole corpus in memory.

========================================  ==================================================================
what you pass                             what a document is
========================================  ==================================================================
a list / tuple of strings                 each string
a ``.txt`` (or other text) file           each non-empty line
a folder                                  each text file below it (``*.txt`` by default), sorted by path
a ``.jsonl`` file + ``field=``            ``record[field]`` of each line
a pandas DataFrame + ``field=``           the column ``field`` (a Series: its values)
a ``datasets.Dataset`` + ``field=``       the column ``field`` of a local dataset
any other iterable of strings             each item (read once: such a scan cannot be resumed)
========================================  ==================================================================

Blank documents (empty or whitespace-only) are skipped and counted, never silently merged; anything that is
not a string raises :class:`CorpusError` naming the item and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from lens.errors import CorpusError

__all__ = ["Corpus", "read_corpus", "windows", "Window"]


@dataclass
class Corpus:
    """A re-readable (when possible) stream of ``(document id, text)`` pairs with a description.

    ``describe`` says where the documents come from (recorded in the scan's manifest); ``reopenable`` is
    False for one-shot iterables (generators), which cannot be resumed. ``skipped`` counts blank documents
    seen so far.
    """

    describe: dict[str, Any]
    _open: Callable[[], Iterator[tuple[str, str]]] = dc_field(repr=False)
    reopenable: bool = True
    skipped: int = 0
    _used: bool = dc_field(default=False, repr=False)

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self._used and not self.reopenable:
            raise CorpusError(
                "this corpus is a one-shot iterable (e.g. a generator) that was already consumed; pass a list, "
                "a file, a folder or a DataFrame to scan it again or to resume"
            )
        self._used = True
        self.skipped = 0
        doc = 0
        for where, text in self._open():
            if not isinstance(text, str):
                raise CorpusError(
                    f"document at {where} is a {type(text).__name__}, not text; lens.scan reads strings only "
                    "(convert the item with str(...), or pick the text column with field=...)"
                )
            if not text.strip():
                self.skipped += 1
                continue
            yield doc, text
            doc += 1


def _from_sequence(items) -> Callable[[], Iterator[tuple[str, str]]]:
    return lambda: ((f"item {i}", x) for i, x in enumerate(items))


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"{str(path)!r} is not valid {encoding} ({exc.reason} at byte {exc.start}); re-encode it as UTF-8 or "
            f"pass encoding=... to lens.scan (--encoding on the command line)"
        ) from exc
    except OSError as exc:
        raise CorpusError(
            f"cannot read {str(path)!r} ({exc.strerror or exc}); check that it exists and that this user may read it"
        ) from exc


def _lines(path: Path, encoding: str) -> Iterator[tuple[str, str]]:
    try:
        fh = open(path, encoding=encoding, newline="")
    except OSError as exc:
        raise CorpusError(
            f"cannot read {str(path)!r} ({exc.strerror or exc}); check that it exists and that this user may read it"
        ) from exc
    with fh:
        number = 0
        try:
            for number, line in enumerate(fh, 1):
                yield f"{path}:{number}", line.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise CorpusError(
                f"{str(path)!r} line {number + 1} is not valid {encoding} ({exc.reason}); re-encode the file as "
                "UTF-8 or pass encoding=... to lens.scan (--encoding on the command line)"
            ) from exc


def _jsonl(path: Path, field: str | None, encoding: str) -> Iterator[tuple[str, str]]:
    if not field:
        raise CorpusError(
            f"{str(path)!r} is JSON Lines: name the text field, e.g. lens.scan(model, {str(path)!r}, field='text')"
        )
    for where, line in _lines(path, encoding):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{where} is not valid JSON ({exc.msg}); fix or remove that line") from exc
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise CorpusError(f"{where} has no field {field!r} (it has {keys}); pass field= one of those")
        yield where, record[field]


def _folder(root: Path, pattern: str, encoding: str) -> Iterator[tuple[str, str]]:
    files = sorted(p for p in root.rglob(pattern) if p.is_file() or p.is_symlink())  # a dangling link is an error, not a skip
    if not files:
        raise CorpusError(f"the folder {str(root)!r} has no files matching {pattern!r}; pass pattern='*.md' or similar to lens.scan (--pattern on the command line)")
    for path in files:
        yield str(path), _read_text(path, encoding)


def read_corpus(corpus: Any, *, field: str | None = None, pattern: str = "*.txt", encoding: str = "utf-8") -> Corpus:
    """Turn what a user passes to ``lens.scan`` into a :class:`Corpus` (see the module docstring).

    ``field``: the JSONL key, DataFrame column or dataset column holding the text. ``pattern``: which files
    of a folder are documents. Raises :class:`CorpusError` (a ``LensError``) naming the fix for a missing
    path, a folder with no matching files, a JSONL line without ``field``, an unknown column, or items that
    are not strings (raised when the item is reached).

    Example::

        read_corpus(["a text", "another"])
        read_corpus("docs.jsonl", field="text")
        read_corpus(df, field="body")
    """
    if isinstance(corpus, Corpus):
        return corpus
    import codecs

    try:
        codecs.lookup(encoding)
    except (LookupError, TypeError) as exc:
        raise CorpusError(f"unknown text encoding {encoding!r}; pass encoding= a codec name such as 'utf-8' or "
                          "'latin-1'") from exc
    if not isinstance(pattern, str) or not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise CorpusError(f"pattern must be a file pattern inside the corpus folder, such as '*.txt' or '**/*.md'; "
                          f"got {pattern!r}")
    if isinstance(corpus, (str, os.PathLike)) and not (isinstance(corpus, str) and "\n" in corpus):
        path = Path(corpus).expanduser()
        if path.is_dir():
            return Corpus({"kind": "folder", "path": str(path.resolve()), "pattern": pattern},
                          lambda: _folder(path, pattern, encoding))
        if path.is_file():
            if path.suffix.lower() in (".jsonl", ".ndjson"):
                if not field:
                    _jsonl(path, field, encoding)  # raises naming field=
                    next(iter(_jsonl(path, field, encoding)), None)
                return Corpus({"kind": "jsonl", "path": str(path.resolve()), "field": field},
                              lambda: _jsonl(path, field, encoding))
            if not os.access(path, os.R_OK):
                raise CorpusError(f"cannot read {str(path)!r} (permission denied); make it readable for this user")
            return Corpus({"kind": "lines", "path": str(path.resolve())}, lambda: _lines(path, encoding))
        if not isinstance(corpus, str) or (len(corpus) < 4096 and (os.sep in corpus or "." in Path(corpus).name)):
            raise CorpusError(
                f"there is no file or folder {corpus!r}; give an existing path, or a list of strings to scan texts"
            )
        raise CorpusError(
            "lens.scan got a single string; pass a list of documents (lens.scan(model, [text])) or a path that exists"
        )
    module = type(corpus).__module__.split(".")[0]
    if module == "pandas":
        import pandas as pd

        if isinstance(corpus, pd.DataFrame):
            if field is None or field not in corpus.columns:
                raise CorpusError(
                    f"name the text column of this DataFrame with field= (one of {list(corpus.columns)[:20]}); "
                    f"got {field!r}"
                )
            series = corpus[field]
        else:
            series = corpus
        return Corpus({"kind": "pandas", "field": field, "rows": int(len(series))},
                      lambda: ((f"row {idx!r}", x) for idx, x in series.items()))
    if module == "datasets" and hasattr(corpus, "column_names"):
        if type(corpus).__name__ in ("DatasetDict", "IterableDatasetDict"):
            raise CorpusError(f"this is a dataset dictionary of splits {list(corpus)}; pass one split, e.g. "
                              f"corpus[{next(iter(corpus), 'train')!r}], and field= its text column")
        streaming = corpus.column_names is None or not hasattr(type(corpus), "__len__")
        if streaming:  # an IterableDataset (load_dataset(..., streaming=True)): no length, maybe no column names
            if field is None or (corpus.column_names is not None and field not in corpus.column_names):
                raise CorpusError(f"name the text column of this streaming dataset with field= (one of "
                                  f"{corpus.column_names}); got {field!r}")

            def rows():
                for i, row in enumerate(corpus):
                    if field not in row:
                        raise CorpusError(f"row {i} of the dataset has no column {field!r} (it has {list(row)[:20]}); "
                                          "pass field= the text column")
                    yield f"row {i}", row[field]

            return Corpus({"kind": "datasets-iterable", "field": field}, rows)  # each call streams it anew
        names = list(corpus.column_names)
        if field is None or field not in names:
            raise CorpusError(f"name the text column of this dataset with field= (one of {names}); got {field!r}")
        return Corpus({"kind": "datasets", "field": field, "rows": int(len(corpus)),
                       "fingerprint": getattr(corpus, "_fingerprint", None)},
                      lambda: ((f"row {i}", row[field]) for i, row in enumerate(corpus)))
    if isinstance(corpus, (list, tuple)):
        if not corpus:
            raise CorpusError("lens.scan got an empty corpus; pass at least one document")
        return Corpus({"kind": "list", "documents": len(corpus)}, _from_sequence(corpus))
    if isinstance(corpus, dict):
        raise CorpusError("lens.scan got a dict; pass a list of strings, a path, a DataFrame with field=, or an iterable")
    if isinstance(corpus, Iterable):
        iterator = iter(corpus)
        reopenable = iterator is not corpus  # a container re-iterates; an iterator/generator does not
        opener = _from_sequence(corpus) if reopenable else (lambda it=iterator: ((f"item {i}", x) for i, x in enumerate(it)))
        return Corpus({"kind": "iterable", "type": type(corpus).__name__}, opener, reopenable=reopenable)
    raise CorpusError(
        f"lens.scan cannot read a corpus of type {type(corpus).__name__}; pass a list of strings, a text file, a "
        "folder, a JSONL file with field=, a pandas column, a datasets.Dataset with field=, or an iterable of strings"
    )


def text_digest(text: str) -> bytes:
    """sha256 of one document's UTF-8 text (the corpus fingerprint chains these)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True)
class Window:
    """One traced sequence of a document.

    ``ids`` = ``prefix`` tokens (the document's leading special token, for continuation windows) followed by
    document tokens from position ``start``; ``ids[keep:]`` are the tokens this window *counts* (earlier
    windows own the others, which are re-read only as context). ``position(i)`` is the document position of
    ``ids[i]`` (−1 for the repeated prefix).
    """

    doc: int
    start: int
    prefix: int
    ids: tuple[int, ...]
    keep: int
    # the whole document's token ids (one tuple shared by its windows): contexts are cut from the document, so a
    # token near a window's edge still gets the tokens around it that other windows hold
    document: tuple[int, ...] = dc_field(compare=False, repr=False)

    def position(self, i: int) -> int:
        return self.start + i - self.prefix if i >= self.prefix else -1


def windows(doc: int, ids: list[int], max_len: int, stride: int, *, repeat_first: bool = False) -> list[Window]:
    """Cut one document's token ids into windows of at most ``max_len`` tokens (docs/definitions.md,
    "Corpus scans": never silently truncated).

    Window j starts ``j × stride`` document tokens after the first; every token is *counted* in exactly one
    window (the first that holds it) and later windows re-read ``max_len − stride`` tokens as context.
    ``repeat_first``: continuation windows begin with the document's first token (a BOS or [CLS] token the
    model expects at position 0); it is context only, never counted twice.

    Example: ``windows(0, list(range(10)), 4, 3)`` → windows starting at 0, 3, 6 that count positions
    0–3, 4–6 and 7–9.
    """
    if not 1 <= stride <= max_len:
        raise ValueError(f"stride must be in 1..{max_len}; got {stride}")
    whole = tuple(ids)
    if len(ids) <= max_len:
        return [Window(doc, 0, 0, whole, 0, whole)]
    prefix = 1 if repeat_first else 0
    out = [Window(doc, 0, 0, whole[:max_len], 0, whole)]
    counted = max_len
    start = 0
    room = max_len - prefix
    step = min(stride, room)
    while counted < len(ids):
        start = max(start + step, prefix)
        end = min(start + room, len(ids))
        if end <= counted:  # the stride leaves no new token: move on to the first uncounted one
            start = counted - room + 1
            end = min(start + room, len(ids))
        out.append(Window(doc, start, prefix, whole[:prefix] + whole[start:end], prefix + counted - start, whole))
        counted = end
    return out
