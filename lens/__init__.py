"""lens: attention sinks, massive activations and compression valleys, measured on the deployed path.

Example::

    import lens
    lm = lens.load()                                   # the embedded all-MiniLM-L6-v2, offline
    run = lens.trace(lm, ["The cat sat on the mat.", "Sinks form on [CLS]."])
    lens.sinks(run).to_frame("heads")
    lens.valley(run).figure()
"""

from lens.analysis import CompareResult, SinkResult, ValleyResult, compare, sinks, valley
from lens.errors import (
    CaptureError,
    ConfigError,
    EmptyInputError,
    InputError,
    InputTooLongError,
    LensError,
    ModelLoadError,
    NumericalError,
    RunFormatError,
    UnsupportedModelError,
)
from lens.run import Run

__version__ = "0.1.0"

# Loading and tracing need transformers' modeling machinery (seconds to import); resolve them on first
# use so that `import lens` — e.g. to read a saved Run in a dashboard — stays fast.
_LAZY = {
    "load": "lens.model",
    "LensModel": "lens.model",
    "trace": "lens.tracer",
    "Sparse": "lens.deploy",
    "QuantConfig": "lens.deploy",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lens' has no attribute {name!r}")

__all__ = [
    "load",
    "trace",
    "sinks",
    "valley",
    "compare",
    "CompareResult",
    "Sparse",
    "QuantConfig",
    "Run",
    "LensModel",
    "SinkResult",
    "ValleyResult",
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
]
