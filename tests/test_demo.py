"""`visionloop demo --quick`: the whole loop, three rounds, every service, real training; the report
and the one-line JSON summary. (What the figures should reach is the demo's business, not this
test's: it checks that the loop closes and the report holds the run's figures.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_demo_closes_the_loop_three_times(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "demo", "--quick", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=os.environ | {"CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["passed"] == [True, True, True]
    assert len(summary["map50_95"]) == 3 and all(0.0 <= m <= 1.0 for m in summary["map50_95"])
    assert set(summary["devices"].values()) == {"v3"}, "every simulated edge agent runs the last model"
    # Duplicates, near duplicates, low-resolution and corrupt images were all refused, with their reasons.
    assert {"duplicate", "near_duplicate", "low_resolution"} <= set(summary["rejections"])
    assert {"corrupt", "not_an_image"} & set(summary["rejections"])
    # Round 1 is all drawing by hand; later rounds start from the model's pre-labels.
    assert summary["human_actions_per_image"][0] > 0
    report = Path(summary["report"])
    assert report.is_file() and (report.parent / "rounds.png").read_bytes()[:4] == b"\x89PNG"
    text = report.read_text()
    assert "round 3" in text and "diamond" in text and "release.edge" in text
