"""`visionloop bench scale` on a tiny run: intake and recognizer arms with 1 and 2 processes per
service on their own embedded stack, one JSON line at the end. Throughput targets live in the
benchmark (docs/benchmarks.md), never in tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from detector import onnx_bytes

from visionloop.bench.scale import ORDER, _per_replicas, check_options, threads_per_replica

KEYS = {"intake_images_per_s_1", "intake_images_per_s_2", "recognizer_images_per_s_1", "recognizer_images_per_s_2",
        "intake_scale_2_vs_1", "recognizer_scale_2_vs_1", "machine", "load_average_before", "load_average_after"}


def test_replicas_share_the_threads_and_each_count_is_the_mean_of_its_arms() -> None:
    assert [threads_per_replica(2, r) for r in (1, 2)] == [2, 1]
    assert threads_per_replica(1, 2) == 1  # never none
    runs = [{"replicas": r, "images_per_s": v} for r, v in zip(ORDER, (10.0, 30.0, 34.0, 14.0), strict=True)]
    assert _per_replicas(runs, "intake") == {"intake_images_per_s_1": 12.0, "intake_images_per_s_2": 32.0, "intake_scale_2_vs_1": 2.667}


def test_options_it_cannot_run_with_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--imgsz 100"):
        check_options(intake_images=10, recognizer_images=10, imgsz=100, model=None)
    with pytest.raises(ValueError, match="--model"):
        check_options(intake_images=10, recognizer_images=10, imgsz=128, model=tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="at least 1"):
        check_options(intake_images=0, recognizer_images=10, imgsz=128, model=None)


@pytest.mark.long
@pytest.mark.timeout(600)
def test_bench_scale_decides_every_image_in_every_arm(tmp_path: Path) -> None:
    model = tmp_path / "detector.onnx"
    model.write_bytes(onnx_bytes(128))  # the suite's cached detector: nothing is trained here
    # Run from a scratch folder: the run folder (PostgreSQL data, logs, results) goes under the current folder.
    done = subprocess.run(
        [sys.executable, "-m", "visionloop.cli", "bench", "scale", "--intake-images", "40", "--recognizer-images", "20",
         "--imgsz", "128", "--model", str(model), "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=580,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert KEYS <= set(result)
    assert result["intake_images"] == 40 and result["recognizer_images"] == 20 and result["imgsz"] == 128
    for kind, images in (("intake", 40), ("recognizer", 20)):
        runs = result[f"{kind}_runs"]
        assert [r["replicas"] for r in runs] == list(ORDER)
        for run in runs:
            assert run["decided"] == run["images"] == images, run  # every image got its decision in every arm
            assert sum(run["outcomes"].values()) == images
            assert run["processes"] == run["replicas"] * (2 if kind == "intake" else 1)
            assert run["images_per_s"] > 0 and run["restarts"] == {}
        assert result[f"{kind}_images_per_s_2"] > 0 and result[f"{kind}_scale_2_vs_1"] > 0
    # The same images in every arm: the same decisions.
    assert len({json.dumps(r["outcomes"], sort_keys=True) for r in result["intake_runs"]}) == 1
    assert {"accepted", "duplicate", "near_duplicate"} <= set(result["intake_runs"][0]["outcomes"])
    threads = result["recognizer"]["threads_per_replica"]
    assert [r["threads_per_replica"] for r in result["recognizer_runs"]] == [threads[str(r)] for r in ORDER]
    saved = Path(result["results_file"])
    assert not saved.is_absolute() and (tmp_path / saved).is_file()
    assert json.loads((tmp_path / saved).read_text())["intake_images_per_s_1"] == result["intake_images_per_s_1"]
