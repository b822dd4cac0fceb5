"""`visionloop bench bus` end to end on a small run: it starts its own stack, measures both arms
and ends with one JSON line. Speed targets live in the benchmark, never in tests."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = ("events_per_s", "raw_events_per_s", "ratio_vs_raw", "hop_p50_ms", "hop_p99_ms")


@pytest.mark.long
def test_bench_bus_prints_its_figures_as_a_last_json_line(tmp_path: Path) -> None:
    # Run from a scratch folder: the bench's PostgreSQL data and its plot go under the current folder.
    done = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "bench", "bus", "--events", "200", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in (*REQUIRED, "raw_hop_p50_ms", "raw_hop_p99_ms"):
        assert isinstance(result[key], int | float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["events"] == 200
    assert result["ratio_vs_raw"] == pytest.approx(result["raw_events_per_s"] / result["events_per_s"], rel=0.01)
    assert result["hop_p50_ms"] <= result["hop_p99_ms"]
    assert result["cpu_count"] >= 1 and result["platform"]
    # Every input of the framework arm went through the consumer policy: handled, none dead-lettered.
    counters = result["framework_counters"]
    assert counters["handled"] == counters["received"] > 0
    assert not any(k.startswith("dead_lettered") for k in counters)
    plot = Path(result["plot"])
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.is_relative_to(tmp_path)
