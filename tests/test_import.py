"""Issue 18: a user's labelled folder into a project. `visionloop import`'s packing of a YOLO folder
and a COCO file + folder (made here, with a near duplicate of a test image among the training
images), then the import through the gateway's endpoint with the verifier and the trainer on the
in-memory bus (libs/bus/fake.py: their own wiring, their SQL, no Kafka): one run, only after the
import's labels are in, with the settings given; the near duplicate left out of its dataset and
said so; reasons and floors are in test_gateway_handlers.py and test_evaluator_handlers.py."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from visionloop.cli.model import _run_cells
from visionloop.contracts import (
    GateFailure,
    GateFailureReason,
    Lineage,
    Metrics,
    ModelEvaluated,
    ModelRef,
    TrainingRequested,
    TrainingTrigger,
)
from visionloop.dataimport import choose_test_set, pack
from visionloop.demo.datasetfiles import load_dataset
from visionloop.libs.blob import LocalBlobStore
from visionloop.libs.bus.fake import FakeBus, FakeRuntime, of_type
from visionloop.libs.db import quote_ident
from visionloop.libs.scenes import render_scene
from visionloop.libs.service import Adapters
from visionloop.services.labeling_gateway import store as gateway_store
from visionloop.services.labeling_gateway.auth import Role
from visionloop.services.labeling_gateway.config import GatewaySettings
from visionloop.services.labeling_gateway.service import SPEC as GATEWAY
from visionloop.services.trainer import store as trainer_store
from visionloop.services.trainer.config import TrainerSettings
from visionloop.services.trainer.runs import RunWorker
from visionloop.services.trainer.service import SPEC as TRAINER
from visionloop.services.verifier.config import VerifierSettings
from visionloop.services.verifier.service import SPEC as VERIFIER

CLASSES = ["circle", "square", "triangle"]


def _jpeg(seed: int, quality: int = 90) -> tuple[bytes, Any]:
    scene = render_scene(seed=seed, width=160, height=120)
    return scene.encode(quality=quality), scene


def yolo_folder(root: Path, train: int = 10, test: int = 3) -> Path:
    """A YOLO dataset: `train` + `test` scenes, and a re-encode of the first test scene among the training images."""
    (root / "data.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text("train: images/train\nval: images/train\ntest: images/test\nnames: [circle, square, triangle]\n")
    items = [("train", seed) for seed in range(train)] + [("test", 1000 + seed) for seed in range(test)]
    for split, seed in [*items, ("train", -1)]:
        data, scene = _jpeg(1000 if seed == -1 else seed, quality=60 if seed == -1 else 90)
        name = f"near-{seed}" if seed == -1 else f"s{seed}"
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        (root / "images" / split / f"{name}.jpg").write_bytes(data)
        lines = []
        for b in scene.boxes:
            index = CLASSES.index(b.class_name) if b.class_name in CLASSES else 0
            lines.append(f"{index} {(b.x1 + b.x2) / 320:.6f} {(b.y1 + b.y2) / 240:.6f} {(b.x2 - b.x1) / 160:.6f} {(b.y2 - b.y1) / 120:.6f}")
        (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return root


def coco_folder(root: Path, n: int = 6) -> Path:
    """A COCO file with its images next to it in images/."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        data, _ = _jpeg(500 + i)
        (root / "images" / f"p{i}.jpg").write_bytes(data)
        images.append({"id": i, "file_name": f"p{i}.jpg", "width": 160, "height": 120})
        annotations.append({"id": i, "image_id": i, "category_id": 1 + i % 2, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0})
    categories = [{"id": 1, "name": "car"}, {"id": 2, "name": "van"}]
    (root / "instances.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return root


def test_a_yolo_folder_is_packed_with_its_own_test_split(tmp_path: Path) -> None:
    packed = pack(yolo_folder(tmp_path / "yolo"))
    assert (packed.train, packed.test) == (11, 3) and packed.classes == CLASSES
    assert "test split" in packed.test_rule
    names = zipfile.ZipFile(io.BytesIO(packed.zip_bytes)).namelist()
    assert "data.yaml" in names and sum(n.startswith("images/test/") for n in names) == 3


def test_a_coco_file_is_packed_with_a_test_fraction_and_a_class_filter(tmp_path: Path) -> None:
    root = coco_folder(tmp_path / "coco")
    packed = pack(root, test_fraction=0.5, classes=["car"])
    assert packed.train + packed.test == 6 and packed.classes == ["car"] and packed.left_out == {"van": 3}
    assert packed.test == pack(root, test_fraction=0.5).test  # the same images every time: by their bytes
    assert "15%" in pack(root).test_rule  # no test split in the files: the default share, said so
    with pytest.raises(ValueError, match="not both"):
        choose_test_set(load_dataset(root), "test", 0.2)
    with pytest.raises(ValueError, match="no image"):
        pack(root, test_split="test")


async def _wire(bus: FakeBus, tmp_path: Path) -> tuple[FakeRuntime, FakeRuntime, Any]:
    blobs = LocalBlobStore(tmp_path / "blobs")
    gateway = bus.runtime("labeling-gateway", pool=bus.pool)  # type: ignore[attr-defined]
    app = GATEWAY.wire(gateway, Adapters(blobs=blobs), GatewaySettings())  # type: ignore[arg-type]
    verifier = bus.runtime("verifier", pool=bus.pool)  # type: ignore[attr-defined]
    VERIFIER.wire(verifier, Adapters(blobs=blobs), VerifierSettings())  # type: ignore[arg-type]
    trainer = bus.runtime("trainer", pool=bus.pool)  # type: ignore[attr-defined]
    TRAINER.wire(trainer, Adapters(blobs=blobs), TrainerSettings(min_new_images=3))  # type: ignore[arg-type]
    for runtime, spec in ((gateway, GATEWAY), (verifier, VERIFIER), (trainer, TRAINER)):
        await runtime.migrate(spec.migrations)
    return gateway, trainer, app


async def test_an_import_is_one_batch_one_run_after_its_labels_with_its_settings(fake_bus: FakeBus, tmp_path: Path) -> None:
    gateway, trainer, app = await _wire(fake_bus, tmp_path)
    gs, ts = quote_ident(gateway.schema), quote_ident(trainer.schema)
    packed = pack(yolo_folder(tmp_path / "yolo"))
    async with fake_bus.pool.acquire() as conn:  # type: ignore[attr-defined]
        await gateway_store.ensure_project(conn, gs, "parts", created_by="test")
        await gateway_store.add_classes(conn, gs, "parts", packed.classes)
        _, token = await gateway_store.create_token(conn, gs, project="parts", role=Role.ADMIN, user_id="ann", created_by="test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        answer = await http.post("/v1/projects/parts/import", content=packed.zip_bytes,
                                 params=[("format", "yolo"), ("set", "epochs=3"), ("set", "imgsz=128")],
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/zip"})
    assert answer.status_code == 202, answer.text
    body = answer.json()
    assert (body["images"], body["test_set"]) == (14, 3) and "one run once the import's 14 label sets" in body["training"]

    # The run's request overtakes the labels: it waits for them.
    waiting = list(gateway.outside)
    gateway.outside.clear()
    (request,) = [e for e in waiting if isinstance(e.payload, TrainingRequested)]
    assert request.payload.trigger is TrainingTrigger.IMPORT and request.payload.hyperparameters == {"epochs": 3, "imgsz": 128}
    await fake_bus.deliver(request)
    assert await trainer_store.claim(fake_bus.pool, ts, "test", 60) is None  # type: ignore[attr-defined]
    await fake_bus.deliver(*[e for e in waiting if e is not request])
    runs = await fake_bus.pool.fetch(f"SELECT * FROM {ts}.runs")  # type: ignore[attr-defined]
    assert len(runs) == 1 and [t["kind"] for t in json.loads(runs[0]["triggers"])] == ["import"]  # no count trigger
    run = await trainer_store.claim(fake_bus.pool, ts, "test", 60)  # type: ignore[attr-defined]
    assert run is not None and json.loads(run["hyperparameters"]) == {"epochs": 3, "imgsz": 128}

    # Its dataset leaves out the training image that is a near copy of a test image, and says so.
    worker = trainer.background_work["runs"]
    assert isinstance(worker, RunWorker)
    snap = await worker.snapshot(run["run_id"], "parts", worker.config.policy("parts"))
    training = await fake_bus.pool.fetchval(f"SELECT count(*) FROM {ts}.samples WHERE role = 'train'")  # type: ignore[attr-defined]
    assert snap["train_images"] + snap["val_images"] == training - 1
    (report,) = await trainer_store.runs_report(fake_bus.pool, trainer.schema, "parts")  # type: ignore[attr-defined]
    (left_out,) = report["excluded"]
    assert left_out["reason"] == "near_test_duplicate" and left_out["distance"] <= 16

    # `trainer runs` shows the model's test mAP50-95 and the gate's verdict (not just "succeeded").
    async with trainer.transaction() as unit:
        version = await trainer_store.add_model(unit.conn, ts, model_id="parts-detector", project="parts", run_id=run["run_id"],
                                                weights_uri="file:///w.pt", weights_sha256="0" * 64, class_names=CLASSES, imgsz=128)
    ref = ModelRef(model_id="parts-detector", version=version)
    failure = GateFailure(reason=GateFailureReason.BELOW_FLOOR, message="below the floor", metric="map50_95", value=0.035, threshold=0.3)
    evaluated = ModelEvaluated(
        lineage=Lineage(model=ref, dataset_version=snap["version"], class_names=CLASSES, imgsz=128), weights_uri="file:///w.pt",
        weights_sha256="0" * 64, passed=False, failures=[failure], test_set_version="ts-1",
        candidate=Metrics(map50_95=0.035, map50=0.1, images=3),
    )
    await fake_bus.publish(evaluated, project="parts")
    (report,) = await trainer_store.runs_report(fake_bus.pool, trainer.schema, "parts")  # type: ignore[attr-defined]
    cells = _run_cells(report)
    assert cells[2] == "succeeded" and cells[5] == "1 near-duplicate of test images" and cells[7] == "0.035"
    assert cells[8] == "FAILED: below_floor (0.035 vs 0.300)"


async def test_an_import_that_asks_for_no_run_gets_none(fake_bus: FakeBus, tmp_path: Path) -> None:
    gateway, trainer, app = await _wire(fake_bus, tmp_path)
    gs, ts = quote_ident(gateway.schema), quote_ident(trainer.schema)
    packed = pack(yolo_folder(tmp_path / "yolo", train=5, test=1))
    async with fake_bus.pool.acquire() as conn:  # type: ignore[attr-defined]
        await gateway_store.ensure_project(conn, gs, "parts", created_by="test")
        await gateway_store.add_classes(conn, gs, "parts", packed.classes)
        _, token = await gateway_store.create_token(conn, gs, project="parts", role=Role.ADMIN, user_id="ann", created_by="test")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
        answer = await http.post("/v1/projects/parts/import", content=packed.zip_bytes, params={"format": "yolo", "train": "false"},
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/zip"})
    assert answer.status_code == 202 and answer.json()["training"].startswith("none asked")
    seen = await fake_bus.flush()
    assert not of_type(seen, TrainingRequested)
    assert await fake_bus.pool.fetchval(f"SELECT count(*) FROM {ts}.runs") == 0  # type: ignore[attr-defined]
    assert await fake_bus.pool.fetchval(f"SELECT count(*) FROM {ts}.samples") == 7  # type: ignore[attr-defined]


def test_images_render_as_jpeg() -> None:
    data, _ = _jpeg(3)
    assert Image.open(io.BytesIO(data)).format == "JPEG"


async def test_visionloop_import_takes_a_coco_folder_to_a_project_with_a_floor(fake_bus: FakeBus, tmp_path: Path,
                                                                             database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The command itself, against the gateway's app served on loopback (the fake bus behind it)."""
    import asyncio
    import uuid

    import uvicorn
    from typer.testing import CliRunner

    from visionloop.cli import app as cli

    prefix = f"t{uuid.uuid4().hex[:8]}_"
    blobs = LocalBlobStore(tmp_path / "blobs")
    gateway = fake_bus.runtime("labeling-gateway", pool=fake_bus.pool, schema=f"{prefix}labeling_gateway")  # type: ignore[attr-defined]
    app = GATEWAY.wire(gateway, Adapters(blobs=blobs), GatewaySettings())  # type: ignore[arg-type]
    await gateway.migrate(GATEWAY.migrations)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    for name, value in {"VL_DATABASE_URL": database_url, "VL_KAFKA_BOOTSTRAP": "127.0.0.1:9", "VL_SCHEMA_PREFIX": prefix,
                        "VL_STATE_DIR": str(tmp_path / "state")}.items():
        monkeypatch.setenv(name, value)
    try:
        args = ["import", str(coco_folder(tmp_path / "coco", n=8)), "--project", "cars", "--test-fraction", "0.25",
                "--set", "epochs=3", "--floor", "0.05", "--gateway-url", f"http://127.0.0.1:{port}"]
        done = await asyncio.to_thread(CliRunner().invoke, cli, args)
        assert done.exit_code == 0, done.output
        assert "imported into cars as" in done.output and "8 images" in done.output
        assert "training: one run once the import's 8 label sets are verified (epochs=3)" in done.output
        assert "needs mAP50-95 >= 0.050" in done.output and "What to expect of a first model" in done.output
        refused = await asyncio.to_thread(CliRunner().invoke, cli, [*args[:4], "--set", "epoch=3"])
        assert refused.exit_code == 2 and "unknown_hyperparameter" in refused.output and "epochs" in refused.output
        yolo = ["import", str(yolo_folder(tmp_path / "yolo", train=4, test=2)), "--project", "shapes", "--no-train",
                "--gateway-url", f"http://127.0.0.1:{port}"]
        shapes = await asyncio.to_thread(CliRunner().invoke, cli, yolo)
        assert shapes.exit_code == 0, shapes.output
        assert "5 training and 2 test images" in shapes.output and "the dataset's own test split" in shapes.output
        assert "imported into shapes" in shapes.output and "2 in the frozen test set" in shapes.output
        assert "training: none asked" in shapes.output
    finally:
        server.should_exit = True
        await serving
        await fake_bus.pool.execute(f'DROP SCHEMA IF EXISTS "{prefix}evaluator" CASCADE')  # type: ignore[attr-defined]
    (request,) = [e.payload for e in gateway.outside if isinstance(e.payload, TrainingRequested)]  # none for `shapes`
    assert request.import_labels == 8 and request.hyperparameters == {"epochs": 3}
    tokens = await fake_bus.pool.fetch(f'SELECT revoked_at FROM "{prefix}labeling_gateway".tokens')  # type: ignore[attr-defined]
    assert tokens and all(t["revoked_at"] is not None for t in tokens)  # the import's token does not outlive it
