"""Corpus scans: readers, mergeable reducers, engines (local, Ray) and the ``Scan`` result.

``lens.scan(model, corpus, ...)`` reduces every neuron, head and layer over a whole corpus in one streaming
pass (docs/definitions.md, "Corpus scans", "MoE routing"); ``lens.Scan.load(folder)`` reads a finished scan.
"""

from lens.scan.compare import ScanCompareResult, compare_scans
from lens.scan.config import ScanConfig
from lens.scan.corpus import Corpus, read_corpus, windows
from lens.scan.result import Scan
from lens.scan.run_scan import scan

__all__ = ["scan", "Scan", "ScanConfig", "ScanCompareResult", "compare_scans", "read_corpus", "Corpus", "windows"]


def _callable_package() -> None:
    """``lens.scan`` is both this package and the function: after ``import lens.scan`` the attribute
    ``lens.scan`` is the package, so the package itself forwards calls to :func:`scan`."""
    import sys
    import types

    class _ScanPackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return scan(*args, **kwargs)

    sys.modules[__name__].__class__ = _ScanPackage


_callable_package()
