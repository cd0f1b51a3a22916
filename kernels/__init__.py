"""Pure-torch kernels for lens: streaming attention statistics, sparse attention, low-bit formats.

Nothing here imports from ``lens``: the dependency arrow is ``lens.widgets → lens → lens.kernels``.
"""
