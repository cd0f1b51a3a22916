"""Old module paths (before the stage folders) keep working for one release, with a DeprecationWarning.

``import lens.model`` or ``from lens.tracer import trace`` still work: a finder at the end of
``sys.meta_path`` answers only for the names below (after the normal finders found nothing) and hands
back the module that now holds the code, so both names refer to the same module object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

#: old module path → new module path. Remove in lens 0.3.
MOVED = {
    "lens.model": "lens.models.load",
    "lens.families": "lens.models.families",
    "lens.inputs": "lens.models.inputs",
    "lens.deploy": "lens.models.deploy",
    "lens.attention": "lens.models.attention",
    "lens._observers": "lens.models.observers",
    "lens.tracer": "lens.capture.trace",
    "lens.probes": "lens.capture.probes",
    "lens.spectra": "lens.capture.spectra",
    "lens.figures": "lens.report.figures",
    "lens.demo": "lens.report.demo",
    "lens.bench_capture": "lens.bench.capture",
    "lens.bench_attention": "lens.bench.attention",
    "lens.bench_quant": "lens.bench.quant",
    "lens.bench_widgets": "lens.bench.widgets",
    "lens.kernels.lowbit_formats": "lens.kernels.lowbit",
    "lens.kernels.sparse_select": "lens.kernels.sparse",
}


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside the import machinery (so the warning names user code)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith("<frozen importlib") or frame.f_code.co_filename == __file__
    ):
        frame, level = frame.f_back, level + 1
    return level


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec):
        return None  # a throwaway module; exec_module swaps in the real one

    def exec_module(self, module):
        # The import system returns whatever sys.modules holds under the old name after exec_module, so
        # the old name becomes the very module object of the new path (whose own __spec__ stays intact).
        old = module.__spec__.name
        new = MOVED[old]
        warnings.warn(
            f"{old} moved to {new}; the old path works until lens 0.3. Import from {new} "
            "(or use the names in lens.__all__).",
            DeprecationWarning,
            stacklevel=_caller_stacklevel(),
        )
        sys.modules[old] = importlib.import_module(new)


def install() -> None:
    """Add the finder once (idempotent); called by ``import lens``."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
