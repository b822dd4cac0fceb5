"""Trainer benchmark: what the loop adds around Ultralytics, and the evaluator's speed and accuracy.

Two arms on the same data, with the same hyper-parameters, in one run on one machine:

1. **Raw** (`raw_train_val_s`): what a script does to train and evaluate a detector. A fresh
   Python process imports Ultralytics, trains from `yolo11n.yaml` on the dataset version the
   trainer will snapshot (same images, same train/val split, same class order), then validates
   `best.pt` on the frozen test set. Wall time of that process.
2. **Orchestrated** (`orchestrated_s`): the trainer and evaluator services on the embedded broker
   and PostgreSQL. The test set and all but one training label are already consumed; the clock
   starts when the last `label verified` is produced and stops when `model evaluated` is read:
   the trigger, the snapshot and manifests, writing the dataset out of the blob store, the
   training child (the same Ultralytics training), storing the weights, two broker hops, and the
   evaluator's own measurement, gate and report.

`overhead_fraction` = (orchestrated - raw) / raw. Target: under 0.10 at the default demo size.

Evaluator speed and accuracy (`evaluator_images_per_s`, `map50_95_vs_pycocotools_abs_diff`): the
trained model's predictions on the test set are scored by `libs/detmetrics.py` and by
pycocotools' COCOeval on the same predictions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionloop.bench import machine

STATE = Path(".visionloop") / "bench"
CLASSES = ("circle", "square", "triangle")


def _scenes(first: int, count: int, width: int, height: int) -> list[Any]:
    from visionloop.libs.scenes import render_scene

    return [render_scene(seed=s, width=width, height=height, classes=CLASSES, objects=(1, 3), size=(0.2, 0.45))
            for s in range(first, first + count)]


async def _labels(blobs: Any, scenes: list[Any], files: dict[str, bytes], *, for_test: bool) -> list[Any]:
    from visionloop.contracts import (
        Box,
        ImageRef,
        Labeller,
        LabelVerified,
        Provenance,
        VerificationMethod,
    )

    out = []
    for scene in scenes:
        data = scene.encode(quality=90)
        ref = await blobs.put(data)
        files[ref.sha256] = data
        w, h = scene.image.size
        out.append(LabelVerified(
            label_id=f"bench-{scene.seed}",
            image=ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=w, height=h, format="JPEG", byte_size=len(data)),
            boxes=[Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes],
            provenance=Provenance(method=VerificationMethod.IMPORT if for_test else VerificationMethod.HUMAN, labellers=[Labeller(user_id="bench")]),
            for_test_set=for_test,
            class_names=list(CLASSES),
        ))
    return out


def _raw_dataset(root: Path, train: list[Any], test: list[Any], val_fraction: float) -> tuple[Path, Path]:
    """The trainer's dataset version, written as a script would: same split rule, same classes."""
    from visionloop.contracts import Box
    from visionloop.libs.formats import LabelledImage, file_name_for, write_yolo
    from visionloop.services.trainer.dataset import assign_splits, label_hash

    rows = [(l.image.model_dump(), [b.model_dump(exclude={"score"}) for b in l.boxes], label_hash([b.model_dump() for b in l.boxes])) for l in train]
    members = assign_splits(rows, val_fraction)
    by_id = {l.image.image_id: l for l in train + test}

    def images(items: list[tuple[str, str]]) -> list[LabelledImage]:
        return [LabelledImage(file_name=file_name_for(i, "JPEG"), width=by_id[i].image.width, height=by_id[i].image.height,
                              boxes=tuple(Box.model_validate(b.model_dump()) for b in by_id[i].boxes), split=split, image_id=i)
                for i, split in items]

    train_data = write_yolo(root / "train", images([(m.image_id, m.split) for m in members]), CLASSES)
    test_root = root / "test"
    test_data = write_yolo(test_root, images([(l.image.image_id, "val") for l in test]), CLASSES)
    return train_data, test_data


def _copy_images(root: Path, files: dict[str, bytes], labels: list[Any], split_of: dict[str, str]) -> None:
    from visionloop.libs.formats import file_name_for

    for label in labels:
        image_id = label.image.image_id
        (root / "images" / split_of[image_id] / file_name_for(image_id, "JPEG")).write_bytes(files[image_id])


RAW_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from visionloop.libs.yolo import TRAIN_DEFAULTS, ultralytics
    job = json.loads(Path(sys.argv[1]).read_text())
    ul = ultralytics(Path(job["state_dir"]))
    t0 = time.monotonic()
    model = ul.YOLO(job["model"])
    model.train(data=job["data"], **(TRAIN_DEFAULTS | job["hyperparameters"] | {"project": job["out_dir"], "name": "run", "device": "cpu"}))
    best = Path(job["out_dir"]) / "run" / "weights" / "best.pt"
    t1 = time.monotonic()
    metrics = ul.YOLO(str(best)).val(data=job["test_data"], split="val", imgsz=job["hyperparameters"]["imgsz"], batch=16,
                                     device="cpu", plots=False, verbose=False, conf=0.001, iou=0.7,
                                     project=job["out_dir"], name="test-val")
    t2 = time.monotonic()
    print(json.dumps({"map50_95": float(metrics.box.map), "map50": float(metrics.box.map50), "weights": str(best),
                      "train_s": t1 - t0, "val_s": t2 - t1}))
""")


async def _until_consumed(pool: Any, schema: str, want: int) -> None:
    """Return once the trainer holds `want` samples; fail after 300 s."""
    deadline = time.monotonic() + 300
    while await pool.fetchval(f'SELECT count(*) FROM "{schema}".samples') < want:
        if time.monotonic() > deadline:
            raise RuntimeError("the trainer did not take the labels in within 300 s")
        await asyncio.sleep(0.1)


async def _trigger(reader: Any, send: Any, label: Any) -> tuple[float, dict[str, Any]]:
    """Produce the last label, read until `model evaluated`; the clock's start, each event type's first (time, event)."""
    started = time.monotonic()
    await send(label)
    found: dict[str, Any] = {}
    while "model.evaluated" not in found:
        batch = await reader.getmany(timeout_ms=200)
        now = time.monotonic()
        for records in batch.values():
            for record in records:
                doc = json.loads(record.value)
                found.setdefault(doc["event_type"], (now, doc))
        if now - started > 3600:
            raise RuntimeError("no model evaluated within an hour")
    return started, found


async def _orchestrated_figures(pool: Any, schema: str, started: float, found: dict[str, Any]) -> dict[str, Any]:
    """The orchestrated arm's figures, from the events read and the trainer's run row."""
    from visionloop.contracts import Envelope, ModelEvaluated, ModelTrained

    ended = found["model.evaluated"][0]
    trained = Envelope[ModelTrained].model_validate(found["model.trained"][1]).payload
    evaluated = Envelope[ModelEvaluated].model_validate(found["model.evaluated"][1]).payload
    run = await pool.fetchrow(f'SELECT started_at, finished_at, created_at FROM "{schema}".runs')
    return {
        "orchestrated_s": round(ended - started, 2),
        "trigger_to_trained_s": round(found["model.trained"][0] - started, 2),
        "trained_to_evaluated_s": round(ended - found["model.trained"][0], 2),
        "training_child_s": round(trained.duration_s, 2),
        "run_queued_to_started_s": round((run["started_at"] - run["created_at"]).total_seconds(), 3),
        "loop_map50_95": evaluated.candidate.map50_95,
        "loop_passed": evaluated.passed,
        "weights_uri": trained.weights_uri,
        "imgsz": trained.lineage.imgsz,
        "epochs": trained.metrics.epochs,
    }


async def _stop_orchestrated(producer: Any, reader: Any, runtimes: list[Any], pool: Any) -> None:
    """The driver's clients and the services stopped (each failure ignored), then the pool closed."""
    with contextlib.suppress(Exception):
        await producer.stop()
    with contextlib.suppress(Exception):
        await reader.stop()
    for runtime in reversed(runtimes):
        with contextlib.suppress(Exception):
            await runtime.stop()
    await pool.close()


async def _orchestrated(settings: Any, train: list[Any], test: list[Any], trainer_config: Any, evaluator_config: Any, console: Console) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from visionloop import services
    from visionloop.app import build_runtime
    from visionloop.contracts import Envelope, LabelVerified, ModelEvaluated, ModelTrained, topic_of
    from visionloop.libs.blob import open_blob_store
    from visionloop.libs.db import create_pool
    from visionloop.libs.kafka import client_kwargs, consumer_kwargs, ensure_named
    from visionloop.libs.service import Adapters

    pool = await create_pool(settings)
    adapters = Adapters(blobs=open_blob_store(settings.blob_location))
    runtimes: list[Any] = []
    await ensure_named(settings, [topic_of(t, settings.topic_prefix) for t in (ModelTrained, ModelEvaluated, LabelVerified)])
    reader = AIOKafkaConsumer(topic_of(ModelTrained, settings.topic_prefix), topic_of(ModelEvaluated, settings.topic_prefix),
                              **(consumer_kwargs(settings) | {"fetch_max_wait_ms": 20}), auto_offset_reset="earliest", enable_auto_commit=False)
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")  # type: ignore[arg-type]
    try:
        for name, config in (("trainer", trainer_config), ("evaluator", evaluator_config)):
            runtime, _ = build_runtime(services.get(name), settings, pool, adapters, config)
            await runtime.start()
            runtimes.append(runtime)
        await reader.start()
        await producer.start()
        topic = topic_of(LabelVerified, settings.topic_prefix)

        async def send(label: Any) -> None:
            env = Envelope.of(label, producer="bench", project="bench")
            await producer.send_and_wait(topic, env.model_dump_json().encode(), key=label.image.image_id.encode())

        for label in test + train[:-1]:
            await send(label)
        schema = settings.schema_for("trainer")
        want = len(test) + len(train) - 1
        await _until_consumed(pool, schema, want)
        console.print(f"orchestrated: {want} labels consumed; producing the last one (the trigger)")
        started, found = await _trigger(reader, send, train[-1])
        return await _orchestrated_figures(pool, schema, started, found)
    finally:
        await _stop_orchestrated(producer, reader, runtimes, pool)


def _pycocotools_map(truth: dict[str, list[Any]], preds: dict[str, list[Any]], class_names: tuple[str, ...]) -> tuple[float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    cat = {n: i + 1 for i, n in enumerate(class_names)}
    ids = {image_id: n + 1 for n, image_id in enumerate(truth)}
    gt: dict[str, Any] = {"images": [{"id": i} for i in ids.values()], "categories": [{"id": c, "name": n} for n, c in cat.items()], "annotations": []}
    for image_id, boxes in truth.items():
        for b in boxes:
            w, h = b.x2 - b.x1, b.y2 - b.y1
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": ids[image_id], "category_id": cat[b.class_name],
                                      "bbox": [b.x1, b.y1, w, h], "area": w * h, "iscrowd": 0})
    dt = [{"image_id": ids[image_id], "category_id": cat[b.class_name], "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1], "score": b.score}
          for image_id, boxes in preds.items() for b in boxes if b.class_name in cat]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        res = coco.loadRes(dt) if dt else COCO()
        e = COCOeval(coco, res, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return float(e.stats[0]), float(e.stats[1])


def _configs(train_images: int, epochs: int, imgsz: int) -> tuple[dict[str, int], Any, Any]:
    """The raw arm's hyper-parameters and the trainer's and evaluator's settings, the same in both arms."""
    from visionloop.services.evaluator.config import EvaluatorSettings
    from visionloop.services.trainer.config import TrainerSettings

    hyper = {"epochs": epochs, "imgsz": imgsz, "batch": 16, "patience": 100}
    trainer_config = TrainerSettings(
        min_new_images=train_images, test_fraction=0.0, epochs=epochs, imgsz=imgsz, batch=16, patience=100, device="cpu",
        poll_interval_s=0.2,
    )
    evaluator_config = EvaluatorSettings(map50_95_floor=0.0, agreement_floor=0.0, device="cpu")
    return hyper, trainer_config, evaluator_config


def _raw_arm(folder: Path, files: dict[str, bytes], train: list[Any], test: list[Any], val_fraction: float,
             hyper: dict[str, int], console: Console) -> tuple[float, dict[str, Any]]:
    """Arm 1: the dataset as a script writes it, trained and validated in a fresh process; its wall time and figures."""
    raw_root = folder / "raw"
    train_data, test_data = _raw_dataset(raw_root, train, test, val_fraction)
    from visionloop.services.trainer.dataset import assign_splits

    members = assign_splits([(l.image.model_dump(), [], "") for l in train], val_fraction)
    _copy_images(raw_root / "train", files, train, {m.image_id: m.split for m in members})
    _copy_images(raw_root / "test", files, test, {l.image.image_id: "val" for l in test})
    job = {"state_dir": str(folder / "raw-state"), "model": "yolo11n.yaml", "data": str(train_data), "test_data": str(test_data),
           "out_dir": str(folder / "raw-out"), "hyperparameters": hyper}
    (folder / "raw-job.json").write_text(json.dumps(job))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", RAW_SCRIPT, str(folder / "raw-job.json")], capture_output=True, text=True,
                          env=os.environ | {"CUDA_VISIBLE_DEVICES": ""})
    raw_s = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"raw arm failed: {done.stderr[-2000:]}")
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    figures = {"raw_train_val_s": round(raw_s, 2), "raw_map50_95": round(raw["map50_95"], 4),
               "raw_train_s": round(raw["train_s"], 2), "raw_test_val_s": round(raw["val_s"], 2),
               "raw_import_and_start_s": round(raw_s - raw["train_s"] - raw["val_s"], 2)}
    console.print(f"raw: {raw_s:.1f} s, test mAP50-95 {raw['map50_95']:.3f}")
    return raw_s, figures


def _evaluator_check(folder: Path, blobs: Any, files: dict[str, bytes], test: list[Any], weights_uri: str,
                     imgsz: int) -> dict[str, Any]:
    """The evaluator's metrics against pycocotools on the same predictions of the trained model; and its speed."""
    from visionloop.libs.detmetrics import evaluate
    from visionloop.services.evaluator.predict import predict

    weights = folder / "candidate.pt"
    weights.write_bytes(asyncio.run(blobs.get(weights_uri)))
    from PIL import Image

    images = [Image.open(io.BytesIO(files[l.image.image_id])) for l in test]
    truth = {l.image.image_id: list(l.boxes) for l in test}
    t0 = time.monotonic()
    found = predict(folder / "state", weights, images, imgsz=imgsz, device="cpu")
    t1 = time.monotonic()
    preds = dict(zip(truth, found, strict=True))
    ours = evaluate(truth, preds, CLASSES)
    t2 = time.monotonic()
    coco_map, coco_map50 = _pycocotools_map(truth, preds, CLASSES)
    t3 = time.monotonic()
    return {
        "evaluator_images_per_s": round(len(images) / (t2 - t0), 1),
        "evaluator_predict_s": round(t1 - t0, 3),
        "evaluator_metrics_s": round(t2 - t1, 4),
        "pycocotools_s": round(t3 - t2, 4),
        "map50_95": round(ours.map50_95, 6),
        "map50_95_pycocotools": round(coco_map, 6),
        "map50_95_vs_pycocotools_abs_diff": abs(ours.map50_95 - coco_map),
        "map50_vs_pycocotools_abs_diff": abs(ours.map50 - coco_map50),
    }


def _table(result: dict[str, Any], test_images: int) -> Table:
    """The figures as the table `run_trainer_bench` prints."""
    table = Table(title="visionloop bench trainer")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("raw Ultralytics train + val", f"{result['raw_train_val_s']:.1f} s",
                  f"test mAP50-95 {result['raw_map50_95']:.3f}; train {result['raw_train_s']:.1f} s, test val {result['raw_test_val_s']:.1f} s, "
                  f"start {result['raw_import_and_start_s']:.1f} s")
    table.add_row("orchestrated: last label -> model evaluated", f"{result['orchestrated_s']:.1f} s",
                  f"test mAP50-95 {result['loop_map50_95']:.3f}; training child {result['training_child_s']:.1f} s")
    table.add_row("overhead", f"{result['overhead_s']:.1f} s ({result['overhead_fraction']:.1%})", "target < 10%")
    table.add_row("  trigger -> model trained", f"{result['trigger_to_trained_s']:.1f} s", "snapshot, dataset out of the blob store, child, weights stored")
    table.add_row("  model trained -> model evaluated", f"{result['trained_to_evaluated_s']:.1f} s", "hop, test set in, inference, metrics, gate, report")
    table.add_row("evaluator", f"{result['evaluator_images_per_s']:.1f} images/s", f"{test_images} test images, inference + metrics")
    table.add_row("mAP50-95 vs pycocotools", f"{result['map50_95_vs_pycocotools_abs_diff']:.2e}", "target < 0.005")
    return table


def run_trainer_bench(*, train_images: int = 240, test_images: int = 60, epochs: int = 40, imgsz: int = 160,
                      scene: tuple[int, int] = (240, 180), console: Console | None = None) -> dict[str, Any]:
    """Run both arms and the evaluator check; print a table; return the results."""
    from visionloop.libs.blob import open_blob_store
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    console = console or Console(stderr=True)
    tag = uuid.uuid4().hex[:6]
    folder = (STATE / f"trainer-{tag}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    stack = EmbeddedStack(Settings(state_dir=STATE))
    settings = stack.start().model_copy(update={
        "topic_prefix": f"bench{tag}.", "schema_prefix": f"bench{tag}_", "state_dir": folder / "state",
        "blob_url": (folder / "blobs").as_uri(),
    })
    result: dict[str, Any] = {"machine": machine(), "train_images": train_images, "test_images": test_images,
                              "epochs": epochs, "imgsz": imgsz, "scene": f"{scene[0]}x{scene[1]}"}
    hyper, trainer_config, evaluator_config = _configs(train_images, epochs, imgsz)
    try:
        blobs = open_blob_store(settings.blob_location)
        files: dict[str, bytes] = {}
        train = asyncio.run(_labels(blobs, _scenes(10_000, train_images, *scene), files, for_test=False))
        test = asyncio.run(_labels(blobs, _scenes(90_000, test_images, *scene), files, for_test=True))
        # Warm the page cache and the import path once, so neither arm pays a cold start the other does not.
        subprocess.run([sys.executable, "-c", "import ultralytics, torch"], check=True, capture_output=True)

        console.print(f"raw: Ultralytics train ({epochs} epochs, {imgsz} px, {train_images} images) + val on {test_images} test images")
        raw_s, raw = _raw_arm(folder, files, train, test, trainer_config.val_fraction, hyper, console)
        result |= raw

        console.print("orchestrated: trainer + evaluator on the embedded broker and PostgreSQL")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        loop = asyncio.run(_orchestrated(settings, train, test, trainer_config, evaluator_config, console))
        result |= loop
        result["overhead_s"] = round(loop["orchestrated_s"] - raw_s, 2)
        result["overhead_fraction"] = round((loop["orchestrated_s"] - raw_s) / raw_s, 4)

        # The evaluator's metrics against pycocotools, on the same predictions; and its speed.
        result |= _evaluator_check(folder, blobs, files, test, loop["weights_uri"], imgsz)
    finally:
        stack.stop()
    console.print(_table(result, test_images))
    return result
