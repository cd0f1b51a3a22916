"""Progress bars that show only when someone is watching, and quiet third-party bars inside lens.

Every long operation of lens (``lens.trace``, ``lens.load``, quantization, benchmarks) takes
``progress=None | True | False``:

* ``None`` (the default) — *auto*, tqdm's own rule: a bar in a terminal and in Jupyter, nothing when the
  output goes to a file or a pipe (``lens demo > log.txt`` writes no ``\\r`` lines);
* ``True`` — always a bar; ``False`` — never.

Inside lens's own operations the bars of the libraries it calls (transformers' "Loading weights",
huggingface_hub's downloads) are switched off (:func:`quiet_libraries`): lens shows one bar of its own
instead of several foreign ones.

Example::

    from lens.progress import progress_bar
    for batch in progress_bar(batches, progress=None, desc="lens.trace", unit="batch"):
        ...
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress_bar", "tqdm_disable", "quiet_libraries", "StageBar"]

T = TypeVar("T")


def tqdm_disable(progress: bool | None) -> bool | None:
    """The ``disable=`` argument of tqdm for lens's ``progress=``: None → None (tqdm decides: off when the
    stream is not a terminal), True → False, False → True.

    Example: ``tqdm(items, disable=tqdm_disable(None))``.
    """
    if progress is None:
        return None
    if not isinstance(progress, bool):
        from lens.errors import ConfigError

        raise ConfigError(f"progress must be None (auto), True or False; got {progress!r}")
    return not progress


def progress_bar(iterable: Iterable[T] | None = None, *, progress: bool | None = None, **kwargs):
    """A ``tqdm.auto`` bar following lens's rule (see the module docstring); ``kwargs`` go to tqdm.

    ``leave=False`` is the default: a finished bar disappears, so the terminal keeps only results.

    Example: ``for x in progress_bar(range(3), desc="work"): ...``.
    """
    from tqdm.auto import tqdm  # a dependency; imported when a bar is made, not when lens is imported

    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=tqdm_disable(progress), **kwargs)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Switch off the progress bars of transformers and huggingface_hub for the duration of the block,
    and restore whatever the user had set afterwards.

    Example::

        with quiet_libraries():
            AutoModel.from_pretrained(folder)     # no "Loading weights" bar
    """
    restore = []
    try:
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            restore.append(hf_logging.enable_progress_bar)
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()


class StageBar:
    """A bar over the named stages of one operation (``lens.load``: weights, tokenizer, quantization), whose
    description says which stage runs now — for work that has few, long steps.

    Example::

        with StageBar(["weights", "tokenizer"], desc="lens.load gpt2", progress=None) as step:
            step("weights"); load_weights()
            step("tokenizer"); load_tokenizer()
    """

    def __init__(self, names: list[str], *, desc: str, progress: bool | None = None):
        self._names = list(names)
        self._desc = desc
        self._progress = progress
        self._bar = None
        self._started = False

    def __enter__(self):
        self._bar = progress_bar(total=len(self._names), progress=self._progress, desc=self._desc, unit="step",
                                 bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}]")
        return self

    def __call__(self, name: str) -> None:
        if self._started:
            self._bar.update(1)
        self._started = True
        self._bar.set_description_str(f"{self._desc}: {name}")

    def __exit__(self, *exc) -> None:
        if self._started and exc[0] is None:
            self._bar.update(1)
        self._bar.close()
