"""lens: attention sinks, massive activations and compression valleys, measured on the deployed path.

Example::

    import lens
    lm = lens.load()                                   # the embedded all-MiniLM-L6-v2, offline
    run = lens.trace(lm, ["The cat sat on the mat.", "Sinks form on [CLS]."])
    lens.sinks(run).to_frame("heads")
    lens.valley(run).figure()

The code is grouped by stage of the data flow — ``lens.models`` → ``lens.capture`` → ``lens.run`` →
``lens.analysis`` → ``lens.report`` / ``lens.bench`` / ``lens.cli`` — see docs/architecture.md.
"""

from lens._compat import install as _install_moved_module_aliases
from lens.errors import (
    CaptureError,
    ConfigError,
    EmptyInputError,
    InputError,
    InputTooLongError,
    LensError,
    LensWarning,
    ModelLoadError,
    NumericalError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    RunFormatError,
    StoreError,
    UnsupportedModelError,
    CorpusError,
    ScanError,
    ScanFormatError,
    BankFormatError,
    BankMismatchError,
)
from lens.run import Run

_install_moved_module_aliases()

__version__ = "0.1.0"

# Loading, tracing and the analyses resolve on first use: loading and tracing need transformers'
# modeling machinery (seconds to import), and `import lens` — e.g. to read a saved Run in a dashboard —
# stays fast. __dir__ lists them so that tab completion (`lens.lo<TAB>`) offers them before first use.
_LAZY = {
    "load": "lens.models.load",
    "LensModel": "lens.models.lensmodel",
    "Sparse": "lens.models.deploy",
    "QuantConfig": "lens.models.deploy",
    "trace": "lens.capture.trace",
    "Ablate": "lens.capture.interventions",
    "Clamp": "lens.capture.interventions",
    "Patch": "lens.capture.interventions",
    "ScaleAttention": "lens.capture.interventions",
    "generate": "lens.capture.generate",
    "StreamingCache": "lens.models.kvcache",
    "sinks": "lens.analysis",
    "valley": "lens.analysis",
    "compare": "lens.analysis",
    "SinkResult": "lens.analysis",
    "ValleyResult": "lens.analysis",
    "CompareResult": "lens.analysis",
    "decoding": "lens.analysis",
    "DecodingResult": "lens.analysis",
    "neurons": "lens.analysis",
    "NeuronResult": "lens.analysis",
    "vision": "lens.analysis",
    "VisionResult": "lens.analysis",
    "image_prompt": "lens.models.multimodal",
    "scan": "lens.scan",
    "Scan": "lens.scan",
    "ScanCompareResult": "lens.scan",
    "TextBank": "lens.analysis",
    "visual_tokens": "lens.analysis",
    "VisualTokens": "lens.analysis",
    "interpretability": "lens.analysis",
    "InterpretabilityResult": "lens.analysis",
}


#: Subpackages reachable as attributes without an import of their own: ``lens.store.open(...)``.
_SUBPACKAGES = ("store",)


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"lens.{name}")
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))


__all__ = [
    "load",
    "store",
    "trace",
    "Ablate",
    "Clamp",
    "Patch",
    "ScaleAttention",
    "generate",
    "StreamingCache",
    "sinks",
    "vision",
    "VisionResult",
    "image_prompt",
    "valley",
    "compare",
    "CompareResult",
    "decoding",
    "DecodingResult",
    "neurons",
    "NeuronResult",
    "scan",
    "Scan",
    "ScanCompareResult",
    "TextBank",
    "visual_tokens",
    "VisualTokens",
    "interpretability",
    "InterpretabilityResult",
    "Sparse",
    "QuantConfig",
    "Run",
    "LensModel",
    "SinkResult",
    "ValleyResult",
    "LensError",
    "LensWarning",
    "ConfigError",
    "ModelLoadError",
    "UnsupportedModelError",
    "InputError",
    "EmptyInputError",
    "InputTooLongError",
    "NumericalError",
    "RunFormatError",
    "CaptureError",
    "StoreError",
    "NotFoundError",
    "PermissionDeniedError",
    "LimitExceededError",
    "CorpusError",
    "ScanError",
    "ScanFormatError",
    "BankFormatError",
    "BankMismatchError",
]
