"""Stage 2 — capture: what runs during a forward pass, and ``lens.trace``.

| module | what it holds |
|---|---|
| ``probes`` | streaming reducers: attention mass (fed by the attention function), residual, MLP |
| ``vision`` | what an image input adds: the vision tower's probe, sink dimensions, per-token modality |
| ``spectra`` | the eigen-solves behind the matrix entropies (shared with the analyses) |
| ``finite`` | the guard that names exactly the inputs and the place where values become NaN or infinite |
| ``trace`` | ``lens.trace``: parse options → build probes → run batches → assemble the ``Run`` |

Imports ``lens.models`` (and the shared modules); never the analyses, reports or views.
"""
