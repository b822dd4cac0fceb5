"""`visionloop bench release` end to end: 20 agents activated, the split of the time, the edge
artifacts compared, one JSON line. Speed targets live in the benchmark, never in tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = ("evaluated_to_all_activated_s", "convert_s", "package_s", "register_s", "propagate_s",
            "edge_fp32_mb", "edge_int8_mb", "fp32_ms", "int8_ms")


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_bench_release_prints_its_figures_as_a_last_json_line(tmp_path: Path) -> None:
    # The bench's detector is the test suite's (same recipe, same cache key): share the cache, so
    # it is trained once per checkout whichever runs first.
    models = Path(__file__).resolve().parent.parent / ".visionloop" / "test" / "models"
    models.mkdir(parents=True, exist_ok=True)
    (tmp_path / ".visionloop" / "bench").mkdir(parents=True)
    (tmp_path / ".visionloop" / "bench" / "models").symlink_to(models)
    done = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "bench", "release", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=1140, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in REQUIRED:
        assert isinstance(result[key], int | float) and math.isfinite(result[key]) and result[key] > 0, key
    parts = result["convert_s"] + result["package_s"] + result["register_s"] + result["propagate_s"]
    assert parts == pytest.approx(result["evaluated_to_all_activated_s"], abs=0.01)
    assert result["agents"] == 20 and result["edge_precision"] == "int8"
    assert result["edge_int8_mb"] < result["edge_fp32_mb"] / 2
