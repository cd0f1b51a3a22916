"""Errors lens raises on purpose. Every message says what went wrong *and what to do about it*."""

from lens.kernels.errors import ConfigError, LensError

__all__ = [
    "LensError",
    "ConfigError",
    "ModelLoadError",
    "UnsupportedModelError",
    "InputError",
    "EmptyInputError",
    "InputTooLongError",
    "NumericalError",
    "RunFormatError",
    "CaptureError",
    "MissingDependencyError",
    "BankFormatError",
    "BankMismatchError",
    "StoreError",
    "NotFoundError",
    "PermissionDeniedError",
    "LimitExceededError",
    "LensWarning",
    "CorpusError",
    "ScanError",
    "ScanFormatError",
]


class ModelLoadError(LensError):
    """A model could not be found or loaded (unknown id, offline hub, missing weights or tokenizer)."""


class UnsupportedModelError(ModelLoadError):
    """The architecture has no entry in lens's family table (see ``lens.models.families``)."""


class InputError(LensError, ValueError):
    """The inputs given to ``lens.trace`` cannot be used as they are."""


class EmptyInputError(InputError):
    """An input string or token sequence is empty."""


class InputTooLongError(InputError):
    """An input is longer than the model's position limit (pass ``truncate=True`` to cut it)."""


class NumericalError(LensError, ArithmeticError):
    """Activations became NaN or infinite during a trace."""


class RunFormatError(LensError, OSError):
    """A saved run is missing, corrupted, or not a lens run."""


class CaptureError(LensError, RuntimeError):
    """The probes could not observe the model as expected (for example attention bypassing lens)."""


class MissingDependencyError(LensError, ImportError):
    """An optional part of lens needs a package that is not installed; the message names the extra."""


class BankFormatError(LensError, OSError):
    """A saved text bank is missing, corrupted, or not a lens bank (``lens.TextBank.load``)."""


class BankMismatchError(LensError, ValueError):
    """A text bank and a run (or queries) come from different models, or the bank lacks what was asked."""


class StoreError(LensError, OSError):
    """The team store (``lens.store``) cannot do what was asked: its index or files are unreachable or damaged."""


class NotFoundError(StoreError, LookupError):
    """No run, scan, job or user has this id or name in the store."""


class PermissionDeniedError(StoreError, PermissionError):
    """The acting user may not do this (e.g. delete another user's run without being an admin)."""


class LimitExceededError(InputError):
    """A job exceeds the dashboard's input limits (tokens per input, inputs per job, upload or image size)
    or the user's concurrency limit."""


class LensWarning(UserWarning):
    """Something lens could do, but not as exactly as usual (e.g. a run saved without checksums)."""


class CorpusError(InputError):
    """A corpus given to ``lens.scan`` cannot be read (missing or unreadable file, wrong field, no text)."""


class ScanError(LensError, RuntimeError):
    """A scan cannot continue as asked (``resume=True`` with a different model, corpus or options)."""


class ScanFormatError(LensError, OSError):
    """A saved scan directory is missing, incomplete, corrupted (checksum mismatch) or not a lens scan."""
