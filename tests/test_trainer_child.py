"""services/trainer/child.py and libs.yolo.extend_classes: real Ultralytics training on tiny synthetic data.

Each run trains yolo11n from its yaml (or from the first run's weights) for one or two epochs
on a few dozen 128-pixel scenes at a small imgsz: seconds on two CPU cores, nothing downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from visionloop.libs import yolo
from visionloop.libs.scenes import render_scene
from visionloop.services.trainer import child

TWO = ["circle", "square"]
THREE = ["circle", "square", "triangle"]
FAST = {"imgsz": 64, "batch": 8, "patience": 100}


def _samples(classes: Sequence[str], first: int, count: int) -> Iterable[yolo.Sample]:
    for seed in range(first, first + count):
        s = render_scene(
            seed=seed, width=128, height=128, classes=tuple(classes), objects=(1, 2), size=(0.3, 0.5),
        )
        yield yolo.Sample(f"s{seed}", s.image, [(b.x1, b.y1, b.x2, b.y2, b.class_name) for b in s.boxes])


def _dataset(root: Path, classes: Sequence[str]) -> Path:
    return yolo.write_dataset(root, _samples(classes, 0, 40), _samples(classes, 10_000, 10), classes)


def _run_child(
    tmp: Path, name: str, *, env: dict[str, str] | None = None, **job: Any
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    path = tmp / f"{name}.json"
    job = {"state_dir": str(tmp / "state"), "out_dir": str(tmp / name), "device": "auto", **job}
    path.write_text(json.dumps(job))
    proc = subprocess.run(
        [sys.executable, "-m", "visionloop.services.trainer.child", str(path)],
        capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})},
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # stdout holds nothing but JSON lines
    assert all("event" in e for e in events), proc.stdout
    return proc, events


def _names(weights: Path) -> dict[int, str]:
    from detector import TEST_STATE

    yolo.ultralytics(TEST_STATE / "ultralytics")  # unpickling imports Ultralytics: configure it first
    import torch

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    return dict((ckpt.get("ema") or ckpt["model"]).names)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trainer-child")


@pytest.fixture(scope="module")
def first_run(work: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """yolo11n trained from its yaml for 2 epochs on circles and squares."""
    data = _dataset(work / "two", TWO)
    return _run_child(
        work, "first", data=str(data), model="yolo11n.yaml", parent_class_names=None, class_names=TWO,
        hyperparameters={"epochs": 2, **FAST},
    )


@pytest.mark.slow
def test_child_trains_from_yaml_and_reports_json_lines(first_run) -> None:  # noqa: ANN001
    proc, events = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2] and all(e["epochs"] == 2 for e in epochs)
    assert set(epochs[0]["losses"]) == {"box_loss", "cls_loss", "dfl_loss"}
    assert set(epochs[0]["metrics"]) == {"map50_95", "map50", "precision", "recall"}
    done = events[-1]
    assert done["event"] == "done" and len(events) == 3
    assert Path(done["weights"]).is_file() and Path(done["weights"]).name in {"best.pt", "last.pt"}
    assert done["epochs"] == 2 and done["device"] == "cpu" and done["best_epoch"] in {1, 2}
    assert (done["train_images"], done["val_images"]) == (40, 10)
    assert set(done["val"]) == {"map50_95", "map50", "precision", "recall"}
    assert done["final_losses"] == epochs[-1]["losses"] and done["duration_s"] > 0
    assert _names(Path(done["weights"])) == dict(enumerate(TWO))


@pytest.mark.slow
def test_extend_classes_keeps_parent_rows_and_ultralytics_keeps_them_too(first_run, work: Path) -> None:  # noqa: ANN001
    import torch
    from detector import TEST_STATE

    parent_weights = Path(first_run[1][-1]["weights"])
    state = TEST_STATE / "ultralytics"
    grown = yolo.extend_classes(state, parent_weights, TWO, ["square", "triangle", "circle"], work / "grown.pt")
    from ultralytics.nn.tasks import DetectionModel, load_checkpoint

    parent, _ = load_checkpoint(str(parent_weights))
    model, _ = load_checkpoint(str(grown))
    assert model.names == {0: "square", 1: "triangle", 2: "circle"} and model.yaml["nc"] == 3
    head, parent_head = model.model[-1], parent.model[-1]
    assert head.nc == 3 and head.no == 3 + head.reg_max * 4
    for branch, parent_branch in zip(head.cv3, parent_head.cv3, strict=True):
        new, old = branch[-1], parent_branch[-1]
        assert new.out_channels == 3
        for row, parent_row in ((0, 1), (2, 0)):  # by name, not by position
            assert torch.equal(new.weight[row], old.weight[parent_row])
            assert torch.equal(new.bias[row], old.bias[parent_row])
    # Every other tensor is the parent's, untouched.
    parent_sd, grown_sd = parent.state_dict(), model.state_dict()
    last = len(model.model) - 1
    resized = {k for k, v in parent_sd.items() if v.shape != grown_sd[k].shape}
    assert parent_sd.keys() == grown_sd.keys()
    assert resized == {f"model.{last}.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")}
    assert all(torch.equal(v, grown_sd[k]) for k, v in parent_sd.items() if k not in resized)

    # Ultralytics' trainer builds DetectionModel(yaml, nc=data nc), names it after the data and
    # loads the checkpoint: with matching names it must transfer every tensor as it is.
    fresh = DetectionModel(model.yaml, nc=3, verbose=False)
    fresh.names = {0: "square", 1: "triangle", 2: "circle"}
    fresh.load(model, verbose=False)
    loaded = fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())

    # The usual case: the old list is a prefix; the parent's own head order.
    prefix = yolo.extend_classes(state, parent_weights, TWO, THREE, work / "prefix.pt")
    grown_model, _ = load_checkpoint(str(prefix))
    assert grown_model.names == dict(enumerate(THREE))
    for branch, parent_branch in zip(grown_model.model[-1].cv3, parent_head.cv3, strict=True):
        assert torch.equal(branch[-1].weight[:2], parent_branch[-1].weight)
        assert torch.equal(branch[-1].bias[:2], parent_branch[-1].bias)

    same = yolo.extend_classes(state, parent_weights, TWO, TWO, work / "same.pt")
    assert same.read_bytes() == parent_weights.read_bytes()
    with pytest.raises(ValueError, match="never dropped"):
        yolo.extend_classes(state, parent_weights, TWO, ["circle", "triangle"], work / "dropped.pt")
    with pytest.raises(ValueError, match="trained on classes"):
        yolo.extend_classes(state, parent_weights, ["square", "circle"], THREE, work / "wrong.pt")


@pytest.mark.slow
def test_child_fine_tunes_a_parent_on_more_classes(first_run, work: Path) -> None:  # noqa: ANN001
    parent_weights = first_run[1][-1]["weights"]
    data = _dataset(work / "three", THREE)
    proc, events = _run_child(
        work, "second", data=str(data), model=parent_weights, parent_class_names=TWO, class_names=THREE,
        hyperparameters={"epochs": 1, **FAST}, env={"YOLO_VERBOSE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [e["event"] for e in events] == ["epoch", "done"]
    assert (work / "second" / "parent-extended.pt").is_file()
    assert _names(Path(events[-1]["weights"])) == dict(enumerate(THREE))
    # Ultralytics' own log (on stderr, never stdout): the grown head loaded whole, nothing re-initialised.
    transferred = re.search(r"Transferred (\d+)/(\d+) items", proc.stderr)
    assert transferred and transferred[1] == transferred[2], proc.stderr[-3000:]


def test_child_reports_a_crash_as_an_error_event(tmp_path: Path) -> None:
    proc, events = _run_child(
        tmp_path, "broken", data=str(tmp_path / "missing" / "data.yaml"), model="yolo11n.yaml",
        parent_class_names=None, class_names=TWO, hyperparameters={"epochs": 1},
    )
    assert proc.returncode == 1
    assert len(events) == 1 and events[0]["event"] == "error" and events[0]["type"] == "FileNotFoundError"
    assert "data.yaml" in events[0]["message"]


def test_device_auto_means_the_gpu_when_there_is_one() -> None:
    assert child.resolve_device("auto", cuda_available=True) == ("0", True)
    assert child.resolve_device("auto", cuda_available=False) == ("cpu", False)
    assert child.resolve_device("cpu", cuda_available=True) == ("cpu", False)


def test_only_a_parent_with_other_classes_is_extended() -> None:
    job = child.Job.from_json({
        "state_dir": "s", "data": "d.yaml", "out_dir": "o", "model": "champion.pt",
        "parent_class_names": TWO, "class_names": THREE,
    })
    assert child.needs_extension(job)
    assert not child.needs_extension(dataclasses.replace(job, class_names=tuple(TWO)))
    assert not child.needs_extension(dataclasses.replace(job, model="yolo11n.yaml", parent_class_names=None))
    with pytest.raises(ValueError, match="class_names"):
        child.Job.from_json({"state_dir": "s", "data": "d.yaml", "out_dir": "o", "model": "m.pt"})


def test_count_images_of_folders_lists_and_txt(tmp_path: Path) -> None:
    (tmp_path / "a" / "sub").mkdir(parents=True)
    for name in ("a/1.png", "a/sub/2.JPG", "a/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("x.png\ny.png\n\n")
    assert child.count_images(str(tmp_path / "a")) == 2
    assert child.count_images([str(tmp_path / "a"), str(tmp_path / "list.txt")]) == 4
    assert child.count_images(None) == 0
