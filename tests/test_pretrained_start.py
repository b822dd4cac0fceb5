"""A project's first model starts from a user's checkpoint (services/trainer/pretrained.py).

The checkpoint is trained here: a yolov8n from its yaml, one epoch at 64 px on a dozen synthetic
scenes of circles, squares and triangles (seconds, nothing downloaded). A project whose taxonomy
is square, cross, circle then starts from it: the head rows of square and circle are the
checkpoint's, cross starts fresh, every other tensor is the checkpoint's. One run goes through the
real trainer service (broker, PostgreSQL, child process) for one epoch.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from detector import TEST_STATE
from helpers import Collector, Services, eventually, publish

from visionloop.contracts import (
    Box,
    Envelope,
    ImageRef,
    Labeller,
    LabelVerified,
    ModelTrained,
    PipelineStatus,
    Provenance,
    TrainingRequested,
    VerificationMethod,
    topic_of,
)
from visionloop.libs import yolo
from visionloop.libs.scenes import render_scene
from visionloop.services.trainer import pretrained
from visionloop.services.trainer.config import TrainerSettings

CHECKPOINT = ["circle", "square", "triangle"]
PROJECT = ["square", "cross", "circle"]
STATE = TEST_STATE / "ultralytics"


def _samples(classes: Sequence[str], first: int, count: int) -> Iterable[yolo.Sample]:
    for seed in range(first, first + count):
        s = render_scene(seed=seed, width=96, height=96, classes=tuple(classes), objects=(1, 2), size=(0.3, 0.5))
        yield yolo.Sample(f"s{seed}", s.image, [(b.x1, b.y1, b.x2, b.y2, b.class_name) for b in s.boxes])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A yolov8n detector of circles, squares and triangles: one epoch, 64 px, 12 images."""
    root = tmp_path_factory.mktemp("base-checkpoint")
    data = yolo.write_dataset(root / "data", _samples(CHECKPOINT, 0, 12), _samples(CHECKPOINT, 1000, 4), CHECKPOINT)
    return yolo.train(STATE, data, model="yolov8n.yaml", out_dir=root / "runs", epochs=1, imgsz=64, batch=8, val=False)


def _load(path: Path) -> Any:
    yolo.ultralytics(STATE)
    from ultralytics.nn.tasks import load_checkpoint

    return load_checkpoint(str(path))[0]


def _class_convs(model: Any) -> list[Any]:
    return [branch[-1] for branch in model.model[-1].cv3]


def test_classes_match_by_trimmed_case_insensitive_name() -> None:
    assert pretrained.match_classes(["Circle ", "square", "triangle"], ["square", "cross", " CIRCLE"]) == [1, -1, 0]
    assert pretrained.match_classes(["car", "Car"], ["CAR"]) == [0], "the first of two equal names counts"
    mapping = pretrained.ClassMapping.of(["Circle", "square", "triangle"], PROJECT)
    assert mapping.record(checkpoint="/m/base.pt") == {
        "checkpoint": "/m/base.pt",
        "checkpoint_names": ["Circle", "square", "triangle"],
        "mapped": {"square": "square", "circle": "Circle"},
        "fresh": ["cross"],
        "unused": ["triangle"],
    }
    line = pretrained.summary(mapping.record(checkpoint="/m/base.pt"))
    assert line == "started from base.pt: classes from the checkpoint: square, circle<-Circle; fresh: cross; 1 checkpoint classes unused"


@pytest.mark.slow
def test_map_head_takes_class_rows_by_name_and_keeps_every_other_tensor(checkpoint: Path) -> None:
    import torch

    model = _load(checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mapped, mapping = pretrained.map_head(model, CHECKPOINT, PROJECT)

    assert mapping.mapped == {"square": "square", "circle": "circle"} and mapping.fresh == ["cross"] and mapping.unused == ["triangle"]
    assert mapped.names == dict(enumerate(PROJECT)) and mapped.yaml["nc"] == 3 and mapped.model[-1].nc == 3
    head = mapped.model[-1]
    for i, (new, old) in enumerate(zip(_class_convs(mapped), _class_convs(model), strict=True)):
        for row, source in ((0, 1), (2, 0)):  # square <- square (row 1), circle <- circle (row 0)
            assert torch.equal(new.weight[row], old.weight[source]) and torch.equal(new.bias[row], old.bias[source])
        # cross starts as a fresh model's class row: Detect.bias_init's prior, a weight no checkpoint row has
        assert new.bias[1].item() == pytest.approx(math.log(5 / 3 / (640 / float(head.stride[i])) ** 2))
        assert not any(torch.equal(new.weight[1], old.weight[r]) for r in range(3))
    # Backbone, neck, box branch and hidden class layers: the checkpoint's, exactly; the input model untouched.
    mapped_sd = mapped.state_dict()
    last = len(mapped.model) - 1
    class_keys = {f"model.{last}.cv3.{i}.2.{p}" for i in range(3) for p in ("weight", "bias")}
    assert mapped_sd.keys() == before.keys()
    assert all(torch.equal(mapped_sd[k], v) for k, v in before.items() if k not in class_keys)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.slow
def test_start_from_writes_a_checkpoint_ultralytics_transfers_whole(checkpoint: Path, tmp_path: Path) -> None:
    import torch
    from ultralytics.nn.tasks import DetectionModel

    out, record = pretrained.start_from(STATE, checkpoint, PROJECT, tmp_path / "mapped.pt")
    assert record["checkpoint"] == str(checkpoint) and len(record["sha256"]) == 64
    assert record["architecture"] == "yolov8n.yaml" and record["checkpoint_names"] == CHECKPOINT
    assert (record["mapped"], record["fresh"], record["unused"]) == ({"square": "square", "circle": "circle"}, ["cross"], ["triangle"])
    model = _load(out)
    assert model.names == dict(enumerate(PROJECT))
    # What Ultralytics' trainer does with it: build the yaml for the data's classes, then load the weights.
    fresh = DetectionModel(model.yaml, nc=3, verbose=False)
    fresh.names = dict(enumerate(PROJECT))
    fresh.load(model, verbose=False)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_wide_head_maps_onto_a_few_classes(tmp_path: Path) -> None:
    """An 80-class yolov8n (COCO-like: its class branch is 80 wide, a 3-class one 64) keeps every tensor."""
    import torch

    yolo.ultralytics(STATE)
    from ultralytics.nn.tasks import DetectionModel

    wide = DetectionModel("yolov8n.yaml", nc=80, verbose=False)
    wide.names = {i: f"thing{i}" for i in range(80)} | {7: "Square", 42: "circle"}
    mapped, mapping = pretrained.map_head(wide, [wide.names[i] for i in range(80)], PROJECT)
    assert mapping.mapped == {"square": "Square", "circle": "circle"} and len(mapping.unused) == 78
    for new, old in zip(_class_convs(mapped), _class_convs(wide), strict=True):
        assert new.in_channels == old.in_channels == 80 and new.out_channels == 3
        assert torch.equal(new.weight[0], old.weight[7]) and torch.equal(new.weight[2], old.weight[42])
    trainer_model = DetectionModel(mapped.yaml, nc=3, verbose=False)
    trainer_model.names = dict(enumerate(PROJECT))
    trainer_model.load(mapped, verbose=False)
    loaded = trainer_model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in mapped.state_dict().items()), "Ultralytics keeps the 80-wide class branch"


@pytest.mark.slow
def test_unusable_checkpoints_are_refused_with_a_reason(checkpoint: Path, tmp_path: Path) -> None:
    yolo.ultralytics(STATE)
    from ultralytics.nn.tasks import ClassificationModel

    def reason(path: Path) -> str:
        with pytest.raises(pretrained.CheckpointRefused) as refused:
            pretrained.start_from(STATE, path, PROJECT, tmp_path / "out.pt")
        assert str(path) in str(refused.value)
        return refused.value.reason

    assert reason(tmp_path / "nowhere.pt") == "checkpoint_missing"
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert reason(tmp_path / "junk.pt") == "checkpoint_unreadable"
    classifier = ClassificationModel("yolov8n-cls.yaml", nc=3, verbose=False)
    yolo.save_checkpoint(STATE, classifier, tmp_path / "cls.pt", train_args={}, provenance={})
    assert reason(tmp_path / "cls.pt") == "checkpoint_not_detection"
    yolo.save_checkpoint(STATE, _load(checkpoint).fuse(), tmp_path / "fused.pt", train_args={}, provenance={})
    assert reason(tmp_path / "fused.pt") == "checkpoint_unsupported"
    with pytest.raises(ValueError, match="must name an Ultralytics .pt"):
        TrainerSettings(base_checkpoint="model.onnx")


# -- through the trainer service ------------------------------------------------------------------


async def _label(blobs: Any, seed: int) -> LabelVerified:
    scene = render_scene(seed=seed, width=96, height=96, classes=tuple(PROJECT), objects=(1, 2), size=(0.3, 0.5))
    out = io.BytesIO()
    scene.image.save(out, format="JPEG", quality=92)
    ref = await blobs.put(out.getvalue())
    return LabelVerified(
        label_id=f"label-{seed}",
        image=ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=96, height=96, format="JPEG", byte_size=len(out.getvalue())),
        boxes=[Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes],
        provenance=Provenance(method=VerificationMethod.HUMAN, labellers=[Labeller(user_id="ann")]),
        class_names=list(PROJECT),
    )


async def _runs(pool: Any, settings: Any, project: str) -> list[dict[str, Any]]:
    from visionloop.services.trainer.store import runs_report

    return await runs_report(pool, settings.schema_for("trainer"), project)


@pytest.fixture(autouse=True)
def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.mark.slow
async def test_the_first_run_starts_from_the_checkpoint_and_keeps_the_mapping(settings, pool, checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("YOLO_VERBOSE", "1")  # the child logs Ultralytics' "Transferred n/n items"
    config = TrainerSettings(
        min_new_images=1000, test_fraction=0.0, test_set_size=0, min_train_images=4, poll_interval_s=0.2, lease_s=10.0,
        imgsz=64, epochs=5, finetune_epochs=1, batch=8, device="cpu", base_checkpoint=str(checkpoint),
        projects={"lost": {"base_checkpoint": str(checkpoint.with_name("gone.pt"))}},
    )
    status = topic_of(PipelineStatus, settings.topic_prefix)
    async with Services(settings, pool, trainer=config) as loop, Collector(settings, topic_of(ModelTrained, settings.topic_prefix), status) as out:
        await loop.start("trainer")
        for n in range(8):
            label = await _label(loop.adapters.blobs, 100 + n)
            for project in ("shapes", "lost"):
                await publish(settings, label, project=project, key=label.image.image_id)
        for project in ("lost", "shapes"):
            await eventually(lambda p=project: _count(pool, settings, p, 8), timeout=30)
            await publish(settings, TrainingRequested(requested_by="test"), project=project, key=project)

        await eventually(lambda: _done(pool, settings, "lost"), timeout=30)
        lost = (await _runs(pool, settings, "lost"))[0]
        assert (lost["status"], lost["reason"]) == ("failed", "checkpoint_missing") and "gone.pt" in lost["error"]

        await eventually(lambda: any(m.get("event_type") == "model.trained" for m in out.messages), timeout=150)
        trained = Envelope[ModelTrained].model_validate(next(m for m in out.messages if m.get("event_type") == "model.trained")).payload
        assert trained.lineage.parent is None and trained.lineage.class_names == PROJECT
        assert trained.metrics.epochs == 1, "a start from a checkpoint is a fine-tune: finetune_epochs"
        run = (await _runs(pool, settings, "shapes"))[0]
        record = run["base_checkpoint"]
        assert record["checkpoint"] == str(checkpoint) and record["checkpoint_names"] == CHECKPOINT
        assert (record["mapped"], record["fresh"], record["unused"]) == ({"square": "square", "circle": "circle"}, ["cross"], ["triangle"])
        said = [m["payload"]["progress"]["message"] for m in out.messages
                if m.get("event_type") == "pipeline.status" and (m["payload"].get("progress") or {}).get("task_id") == run["run_id"]]
        assert any("fresh: cross" in (message or "") for message in said)
        log = (settings.state_dir / "trainer" / "runs" / run["run_id"] / "train.log").read_text()
        assert "base checkpoint: started from" in log
        transferred = [line for line in log.splitlines() if "Transferred" in line]
        assert transferred and all(_whole(line) for line in transferred), transferred
        weights = settings.state_dir / "v1.pt"
        weights.write_bytes(await loop.adapters.blobs.get(trained.weights_uri))
        assert _load(weights).names == dict(enumerate(PROJECT))


async def _count(pool: Any, settings: Any, project: str, n: int) -> bool:
    schema = settings.schema_for("trainer")
    return await pool.fetchval(f'SELECT count(*) FROM "{schema}".samples WHERE project = $1', project) == n


async def _done(pool: Any, settings: Any, project: str) -> bool:
    runs = await _runs(pool, settings, project)
    return bool(runs) and runs[0]["status"] in ("succeeded", "failed")


def _whole(line: str) -> bool:
    import re

    found = re.search(r"Transferred (\d+)/(\d+) items", line)
    return bool(found) and found[1] == found[2]


def test_the_child_job_takes_a_checkpoint_only_instead_of_the_yaml() -> None:
    from visionloop.services.trainer import child

    job = {"state_dir": "s", "data": "d.yaml", "out_dir": "o", "model": "yolo11n.yaml", "class_names": PROJECT}
    assert child.Job.from_json(job | {"base_checkpoint": "/m/base.pt"}).base_checkpoint == Path("/m/base.pt")
    assert child.Job.from_json(job).base_checkpoint is None
    with pytest.raises(ValueError, match="not both"):
        child.Job.from_json(job | {"model": "champion.pt", "base_checkpoint": "/m/base.pt"})
    assert json.loads(json.dumps(pretrained.ClassMapping.of(CHECKPOINT, PROJECT).record())) == pretrained.ClassMapping.of(CHECKPOINT, PROJECT).record()
