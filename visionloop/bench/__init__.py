"""Committed benchmarks, run as `visionloop bench <name>`; results are written up in docs/benchmarks.md.

Each benchmark starts the infrastructure it needs, measures, prints a table, draws a plot and
returns its numbers as one dict (what `--json` prints).
"""

import os
import platform
from pathlib import Path
from typing import Any


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

