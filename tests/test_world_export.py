"""`visionloop demo world export` writes the built-in world as a dataset `--dataset` reads back, and
a malformed dataset given to `demo` or `bench loop` is refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from visionloop.cli import app
from visionloop.demo.dataset import load_dataset, world_for
from visionloop.demo.world import ItemKind
from visionloop.libs.scenes import STYLE_CLASSES


@pytest.mark.parametrize("fmt", ["coco", "yolo"])
def test_the_exported_world_reads_back_as_a_dataset(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / fmt
    result = CliRunner().invoke(app, ["demo", "world", "export", "--out", str(out), "--format", fmt, "--images", "24"])
    assert result.exit_code == 0, result.output
    dataset = load_dataset(out)
    assert dataset.classes == STYLE_CLASSES["photo"] and len(dataset.images) == 24
    world = world_for(out, seed=3, test_images=4)
    items = world.stream(12, exact_dup_rate=0.1, low_res_rate=0.1)
    fresh = [i for i in items if i.kind is ItemKind.FRESH]
    assert fresh and all(world.truth(i.image_id) == list(i.truth or ()) for i in fresh)
    assert {i.image_id for i in world.test_set(4, world.classes)}.isdisjoint(i.image_id for i in items)
    again = CliRunner().invoke(app, ["demo", "world", "export", "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output


def test_a_malformed_dataset_is_refused_before_anything_starts(tmp_path: Path) -> None:
    root = tmp_path / "mine"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("train: images/train\nval: images/train\nnames: [cat, dog]\n")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # its image is missing
    for command in (["demo", "--dataset", str(root)], ["bench", "loop", "--dataset", str(root)]):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, result.output
        assert "dataset refused" in result.output and "missing_image" in result.output and "a.txt" in result.output.replace("\n", "")
