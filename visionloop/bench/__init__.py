"""Committed benchmarks, run as `visionloop bench <name>`; results are written up in docs/benchmarks.md.

Each benchmark starts the infrastructure it needs, measures, prints a table, draws a plot and
returns its numbers as one dict (what `--json` prints).
"""
