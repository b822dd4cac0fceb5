"""Committed benchmarks, run as `visionloop bench <name>`; results are written up in docs/benchmarks.md.

Each benchmark starts the infrastructure it needs, measures, prints a table, draws a plot and
returns its numbers as one dict (what `--json` prints). Plots go under `.visionloop/bench/`; a run
changes no tracked file unless asked to (`--write-docs`: the plot goes to `docs/benchmarks/`).
"""

import os
import platform
from pathlib import Path
from typing import Any

PLOTS = Path(".visionloop") / "bench"
"""Where a benchmark's plot goes by default (relative to the working folder; not tracked)."""
DOCS = Path("docs") / "benchmarks"
"""Where it goes with `--write-docs` (the plots docs/benchmarks.md shows)."""


def plot_folder(write_docs: bool) -> Path:
    """The folder for a run's plot."""
    return DOCS if write_docs else PLOTS


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (benchmarks record the machine they ran on)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU model, core count, Python version."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}

