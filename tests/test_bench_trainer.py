"""`visionloop bench trainer` end to end on a tiny run: both arms, the evaluator check, one JSON line.
Speed targets live in the benchmark (docs/benchmarks.md), never in tests."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REQUIRED = ("raw_train_val_s", "orchestrated_s", "overhead_fraction", "map50_95_vs_pycocotools_abs_diff")


@pytest.mark.long
@pytest.mark.timeout(600)
def test_bench_trainer_prints_its_figures_as_a_last_json_line(tmp_path: Path) -> None:
    # Run from a scratch folder: the bench's PostgreSQL data and state go under the current folder.
    done = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "bench", "trainer", "--train-images", "30", "--test-images", "10",
         "--epochs", "2", "--imgsz", "64", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=580, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in REQUIRED:
        assert isinstance(result[key], int | float) and math.isfinite(result[key]), key
    assert result["raw_train_val_s"] > 0 and result["orchestrated_s"] > 0
    assert result["overhead_fraction"] == pytest.approx((result["orchestrated_s"] - result["raw_train_val_s"]) / result["raw_train_val_s"], abs=5e-3)
    assert result["map50_95_vs_pycocotools_abs_diff"] < 0.005
    assert result["train_images"] == 30 and result["test_images"] == 10 and result["epochs"] == 2
    assert result["loop_passed"] is True and result["evaluator_images_per_s"] > 0
