"""Stage 2 — capture: what runs during a forward pass, and ``lens.trace``.

| module | what it holds |
|---|---|
| ``probes`` | streaming reducers: attention mass (fed by the attention function), residual, MLP |
| ``spectra`` | the eigen-solves behind the matrix entropies (shared with the analyses) |
| ``trace`` | ``lens.trace``: parse options → build probes → run batches → assemble the ``Run`` |

Imports ``lens.models`` (and the shared modules); never the analyses, reports or views.
"""
