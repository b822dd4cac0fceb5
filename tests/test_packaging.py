"""Packaging: one distribution, everything under the `visionloop` namespace, data files included."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_maps_folders_under_one_namespace(tmp_path: Path) -> None:
    # Build from a copy: setuptools writes build/ next to the sources.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".visionloop", "build", "*.egg-info", "__pycache__", "tests"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("visionloop-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.startswith("visionloop-")}
    assert tops == {"visionloop"}  # no generic top-level `contracts`, `libs` or `services`
    for expected in (
        "visionloop/contracts/envelope.py",
        "visionloop/contracts/schemas/vl.image.ingested.v1.json",
        "visionloop/contracts/asyncapi.yaml",
        "visionloop/libs/bus/runtime.py",
        "visionloop/libs/migrations/0001_inbox_outbox.sql",
        "visionloop/services/ingest/service.py",
        "visionloop/services/ingest/migrations/0001_images.sql",
        "visionloop/cli/__init__.py",
        "visionloop/cli/__main__.py",
    ):
        assert expected in names, expected
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: AGPL-3.0-or-later" in metadata
    assert "Provides-Extra: gpu" in metadata and "Provides-Extra: cpu" in metadata
