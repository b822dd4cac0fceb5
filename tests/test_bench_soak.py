"""`visionloop bench soak` on a short run: services as processes on its own embedded stack, a mix of
upstream images at a low rate, samples of memory, lag and database size, one JSON line at the end.
Growth and lag targets live in the benchmark (docs/benchmarks.md), never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = ["ingest", "dedup", "recognizer"]
"""The services an image needs for its decision (dedup's) and the one that takes accepted images on."""


@pytest.mark.long
@pytest.mark.timeout(400)
def test_bench_soak_decides_every_submission_and_reports_its_figures(tmp_path: Path) -> None:
    # Run from a scratch folder: the run folder (PostgreSQL data, logs, plot) goes under the current folder.
    done = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "bench", "soak", "--minutes", "0.5", "--rate", "2", "--sample", "3",
         "--services", ",".join(SERVICES), "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=380,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["minutes"] == 0.5 and result["rate_per_s"] == 2.0
    assert result["submitted"] == 60
    assert result["decided"] == result["submitted"], result["outcomes"]  # every submission got its final decision
    assert sum(result["outcomes"].values()) == result["submitted"]
    # The world's mix arrived: duplicates and bad images were refused for what they are.
    assert result["outcomes"]["accepted"] == result["kinds_submitted"]["fresh"] == result["downstream"]["image.unrecognized"]
    assert {"duplicate", "near_duplicate", "low_resolution"} <= set(result["outcomes"])
    assert set(result["rss_growth_mb_per_h"]) == set(SERVICES)
    assert all(isinstance(v, float) for v in result["rss_growth_mb_per_h"].values())
    assert all(result["rss_mb_end"][name] > 20 for name in SERVICES)  # real processes were measured
    assert isinstance(result["max_lag"], int) and result["max_lag"] >= 0
    assert result["max_lag"] >= max(result["max_lag_by_group"].values())
    assert "ingest.image.submitted" in result["max_lag_by_group"]
    assert isinstance(result["db_growth_mb_per_h"], float) and result["db_mb_end"] > 0
    assert result["fit_samples"] >= 3 and 0 < result["warmup_s"] < 30
    assert result["send_errors"] == 0 and result["restarts"] == {}
    plot = Path(result["plot"])
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.is_relative_to(tmp_path)
