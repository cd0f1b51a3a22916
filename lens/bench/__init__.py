"""Stage 5 — benchmarks: one module per ``lens bench <name>`` command.

Every benchmark measures its baseline in the same run, prints ratios and the machine, and writes JSON.
The command table is ``lens.cli.BENCHMARKS``.
"""
