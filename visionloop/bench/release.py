"""Release benchmark: from a passing `model evaluated` to 20 edge agents running the model.

The converter, packager and distributor run as in `visionloop up` (one process, the embedded
broker and PostgreSQL, the distributor's package server on a loopback port); 20 edge agents run
in this process, each with its own consumer group, slot folder and HTTP downloads from the
package server. The candidate is the synthetic-scene detector of `libs/yolo.py` (cached under
`.visionloop/bench/models/`), its test set and calibration images synthetic scenes of its recipe.

The clock starts when the `model evaluated` is produced; a reader on the topics notes when each
step's event arrives:

- `convert_s`: to `model converted` (server FP32 and edge INT8 exports, quantisation, parity);
- `package_s`: to the last `model packaged` (tar, manifest, signature, blob store);
- `register_s`: to the first edge release (checks, library registration, promotion, release);
- `propagate_s`: to the 20th `activated` device report (staged rollout 10/50/100 %: download,
  checks, self-test, swap, report, next stage);
- `evaluated_to_all_activated_s`: the whole.

Then the edge artifact itself: size of the FP32 static export and of the shipped INT8 artifact,
and the per-image latency of each on this CPU (one ONNX Runtime thread, the same 64 images,
interleaved, median of the per-image times), in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from visionloop.bench import machine

STATE = Path(".visionloop") / "bench"
AGENTS = 20


async def _candidate(blobs: Any, detector: Any, state_dir: Path, imgsz: int) -> Any:
    from visionloop.contracts import Box, DatasetRef, ImageRef, Lineage, ModelEvaluated, ModelRef
    from visionloop.libs.detmetrics import evaluate
    from visionloop.libs.manifest import Member, manifest
    from visionloop.libs.scenes import render_scene
    from visionloop.libs.yolo import SYNTHETIC_RECIPE

    scene_cfg = SYNTHETIC_RECIPE["scene"]
    classes = list(detector.class_names)

    async def made(seeds: range, split: str) -> tuple[DatasetRef, dict[str, list[Any]], list[Any]]:
        members, truth, images = [], {}, []
        for seed in seeds:
            scene = render_scene(seed=seed, width=scene_cfg["width"], height=scene_cfg["height"], classes=tuple(classes),
                                 objects=tuple(scene_cfg["objects"]), size=tuple(scene_cfg["size"]))
            data = scene.encode(quality=92)
            ref = await blobs.put(data)
            image = ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=scene.image.width, height=scene.image.height,
                             format="JPEG", byte_size=len(data))
            boxes = [Box(x1=b.x1, y1=b.y1, x2=b.x2, y2=b.y2, class_name=b.class_name) for b in scene.boxes]
            members.append(Member(image.model_dump(mode="json"), [b.model_dump(mode="json") for b in boxes], "h", split))
            truth[ref.sha256] = boxes
            images.append(scene.image)
        version = f"bench-{split}-{seeds.start}"
        blob = await blobs.put(manifest("bench", version, classes, members))
        return DatasetRef(version=version, uri=blob.uri, images=len(members)), truth, images

    dataset, _, _ = await made(range(50_000, 50_064), "train")
    test_set, truth, images = await made(range(60_000, 60_064), "test")
    from visionloop.services.evaluator.predict import predict

    found = await asyncio.to_thread(predict, state_dir, detector.weights, images, imgsz=imgsz, device="cpu")
    metrics = evaluate(truth, dict(zip(truth, found, strict=True)), classes).metrics()
    weights = await blobs.put(detector.weights.read_bytes())
    return ModelEvaluated(
        lineage=Lineage(model=ModelRef(model_id="bench-detector", version=1), dataset_version=dataset.version, class_names=classes, imgsz=imgsz),
        weights_uri=weights.uri, weights_sha256=weights.sha256, passed=True, test_set_version=test_set.version,
        candidate=metrics, dataset=dataset, test_set=test_set,
    ), images


async def _open(settings: Any) -> tuple[Any, Any, Any, Any]:
    """The blob store, the converter, packager and distributor started, and a reader and producer on their topics."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from visionloop.app import ServiceHost
    from visionloop.contracts import (
        DeviceStatus,
        EdgeRelease,
        ModelConverted,
        ModelPackaged,
        topic_of,
    )
    from visionloop.libs.blob import open_blob_store
    from visionloop.libs.kafka import client_kwargs, consumer_kwargs, ensure_named

    blobs = open_blob_store(settings.blob_location)
    host = ServiceHost(settings, ["converter", "packager", "distributor"])
    await host.start()
    topics = [topic_of(t, settings.topic_prefix) for t in (ModelConverted, ModelPackaged, EdgeRelease, DeviceStatus)]
    await ensure_named(settings, topics)
    reader = AIOKafkaConsumer(*topics, **(consumer_kwargs(settings) | {"fetch_max_wait_ms": 10}),
                              auto_offset_reset="latest", enable_auto_commit=False, group_id=None)
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")  # type: ignore[arg-type]
    return blobs, host, reader, producer


async def _start_fleet(settings: Any, host: Any, agents: list[Any]) -> None:
    """Start the edge agents (each appended to `agents`) and wait until the distributor knows every one."""
    from visionloop.libs.signing import TrustStore
    from visionloop.services.edge_agent.agent import EdgeAgent

    trust = TrustStore.load([settings.state_dir / "keys"])
    for n in range(AGENTS):
        device = f"bench-{n:02d}"
        agent = EdgeAgent(settings, "edge", device, settings.state_dir / "edge" / device, trust, heartbeat_s=1.0)
        await agent.start()
        agents.append(agent)
    # Every agent has said it exists (its first heartbeat): the rollout knows the fleet.
    pool = host._pool
    assert pool is not None
    schema = settings.schema_for("distributor")
    deadline = time.monotonic() + 60
    while await pool.fetchval(f'SELECT count(*) FROM "{schema}".devices') < AGENTS:
        if time.monotonic() > deadline:
            raise RuntimeError("the edge agents did not report within 60 s")
        await asyncio.sleep(0.1)


async def _until_activated(reader: Any, started: float) -> tuple[dict[str, float], str | None, str]:
    """Read the topics until every agent has activated: when each step was seen, the edge artifact's uri and precision."""
    marks: dict[str, float] = {}
    activated: set[str] = set()
    int8_uri = None
    result_precision = "int8"
    while len(activated) < AGENTS:
        batch = await reader.getmany(timeout_ms=100)
        now = time.monotonic()
        for records in batch.values():
            for record in records:
                doc = json.loads(record.value)
                kind = doc.get("event_type")
                if kind == "model.converted":
                    marks.setdefault("converted", now)
                    for artifact in doc["payload"]["artifacts"]:
                        if artifact["target"] == "edge":
                            int8_uri = artifact["uri"]
                            result_precision = artifact["precision"]
                elif kind == "model.packaged":
                    marks["packaged"] = now
                elif kind == "release.edge":
                    marks.setdefault("released", now)
                elif kind == "device.status" and doc["payload"]["state"] == "activated":
                    activated.add(doc["payload"]["device_id"])
        if now - started > 600:
            raise RuntimeError(f"only {len(activated)} of {AGENTS} agents activated within 600 s")
    return marks, int8_uri, result_precision


async def _run(settings: Any, detector: Any, imgsz: int, console: Console) -> dict[str, Any]:
    from visionloop.contracts import Envelope, topic_of

    blobs, host, reader, producer = await _open(settings)
    agents: list[Any] = []
    try:
        await reader.start()
        await producer.start()
        await _start_fleet(settings, host, agents)
        candidate, images = await _candidate(blobs, detector, settings.state_dir, imgsz)
        await asyncio.sleep(1.0)  # the reader's partitions are assigned
        console.print(f"{AGENTS} edge agents ready; producing a passing `model evaluated`")
        envelope = Envelope.of(candidate, producer="bench", project="bench")
        started = time.monotonic()
        await producer.send_and_wait(topic_of(candidate, settings.topic_prefix), envelope.model_dump_json().encode(), key=b"bench-detector")
        marks, int8_uri, result_precision = await _until_activated(reader, started)
        ended = time.monotonic()
        if int8_uri is None:
            raise RuntimeError("the converter shipped no edge artifact")
        result = {
            "evaluated_to_all_activated_s": round(ended - started, 3),
            "convert_s": round(marks["converted"] - started, 3),
            "package_s": round(marks["packaged"] - marks["converted"], 3),
            "register_s": round(marks["released"] - marks["packaged"], 3),
            "propagate_s": round(ended - marks["released"], 3),
            "agents": AGENTS,
            "edge_precision": result_precision,
            "_int8": await blobs.get(int8_uri),
            "_images": images,
        }
        return result
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                await agent.stop()
        with contextlib.suppress(Exception):
            await producer.stop()
        with contextlib.suppress(Exception):
            await reader.stop()
        await host.stop()


def _latency(fp32: bytes, int8: bytes, images: list[Any]) -> tuple[float, float]:
    """Median per-image latency (ms) of each model, one thread, interleaved image by image."""
    import numpy as np

    from visionloop.libs.inference import Detector

    arrays = [np.asarray(image.convert("RGB")) for image in images]
    models = {"fp32": Detector(fp32, threads=1), "int8": Detector(int8, threads=1)}
    for model in models.values():  # warm-up
        model.predict(arrays[:4])
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for _ in range(3):
        for array in arrays:
            for name, model in models.items():
                t0 = time.perf_counter()
                model.predict([array])
                times[name].append((time.perf_counter() - t0) * 1000)
    return statistics.median(times["fp32"]), statistics.median(times["int8"])


def run_release_bench(*, console: Console | None = None) -> dict[str, Any]:
    """Run the release path once with 20 agents, then the edge artifact comparison; print a table."""
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings
    from visionloop.libs.yolo import synthetic_detector

    console = console or Console(stderr=True)
    tag = uuid.uuid4().hex[:6]
    folder = (STATE / f"release-{tag}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    detector = synthetic_detector(STATE / "models", state_dir=STATE / "ultralytics")
    imgsz = 128
    stack = EmbeddedStack(Settings(state_dir=STATE))
    settings = stack.start().model_copy(update={
        "topic_prefix": f"bench{tag}.", "schema_prefix": f"bench{tag}_", "state_dir": folder / "state",
        "blob_url": (folder / "blobs").as_uri(), "log_level": "WARNING",
    })
    os.environ.update({"VL_DISTRIBUTOR_PORT": "0", "CUDA_VISIBLE_DEVICES": ""})
    result: dict[str, Any] = {"machine": machine(), "imgsz": imgsz}
    try:
        result |= asyncio.run(_run(settings, detector, imgsz, console))
    finally:
        stack.stop()
    fp32 = detector.onnx(imgsz, dynamic=False).read_bytes()
    int8 = result.pop("_int8")
    images = result.pop("_images")
    fp32_ms, int8_ms = _latency(fp32, int8, images)
    result |= {
        "edge_fp32_mb": round(len(fp32) / 1e6, 3), "edge_int8_mb": round(len(int8) / 1e6, 3),
        "fp32_ms": round(fp32_ms, 3), "int8_ms": round(int8_ms, 3), "latency_images": len(images) * 3,
    }
    table = Table(title="visionloop bench release")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("model evaluated -> all agents activated", f"{result['evaluated_to_all_activated_s']:.2f} s", f"{AGENTS} agents, stages 10/50/100 %")
    table.add_row("  convert", f"{result['convert_s']:.2f} s", f"server FP32 + edge {result['edge_precision'].upper()}, parity checks")
    table.add_row("  package", f"{result['package_s']:.2f} s", "tar, manifest, Ed25519 signature, blob store")
    table.add_row("  register", f"{result['register_s']:.2f} s", "package checks, library, promotion, release")
    table.add_row("  propagate", f"{result['propagate_s']:.2f} s", "download over HTTP, checks, self-test, swap, 3 stages")
    table.add_row("edge artifact FP32 / INT8", f"{result['edge_fp32_mb']:.2f} / {result['edge_int8_mb']:.2f} MB", f"{imgsz} px static input")
    table.add_row("latency per image FP32 / INT8", f"{result['fp32_ms']:.2f} / {result['int8_ms']:.2f} ms", "one ORT thread, median, same images")
    console.print(table)
    return result
