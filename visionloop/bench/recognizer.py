"""Recognizer benchmark: throughput through the real broker with micro-batching, next to raw ONNX
Runtime on the same model, the same images and the same thread count, in the same run.

The model is the synthetic-scene detector of `libs/yolo.py` (YOLO11n trained from its yaml,
cached under `.visionloop/bench/models/`), exported to ONNX at `imgsz` (640 by default, the usual
production size). The images are 640x480 synthetic scenes at JPEG quality 85.

Raw arms spend their threads both ways a script could (ONNX Runtime's intra-op threads on one
image, or one thread per image with several images at once) and the faster is the reference.

Arms, all in one run on one machine (the raw arms run before and after the recognizer's, and the
better of the two is the reference, so a busy moment of the machine cannot flatter the ratio; the
load average before and after is reported too):

1. **Raw ONNX Runtime, session only**: `session.run` on already letterboxed tensors, in batches
   of `batch`: the model's own speed.
2. **Raw ONNX Runtime, from bytes** (`raw_ort_images_per_s`, the reference of `ratio_vs_raw`):
   the same session, with what any ONNX Runtime script must do to turn an image file into
   detections: decode the JPEG, letterbox, run in batches of `batch`, decode the head and NMS
   (`libs/inference.py`). No broker, no database, no blob store.
3. **The recognizer** as its own process (`visionloop run recognizer`) on the embedded broker and
   PostgreSQL: a backlog of `image accepted` events (blobs already stored) produced as fast as the
   broker takes them; images/s from the first produce to the last decision read back.

Added latency: with one image in flight, the time from producing its `image accepted` to reading
its decision, minus that image's inference itself: the model time the recognizer measured for it
(letterbox, `session.run`, NMS; carried in the event as `inference_ms`) plus the median time to
decode one of the JPEGs (measured in the raw arm). What remains is what the service adds: broker
hops, blob read, batching, the transaction, publishing. p50/p99 over the images.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionloop.bench import PLOTS, machine

PLOT = PLOTS / "recognizer.png"
STATE = Path(".visionloop") / "bench"
READER_FETCH_WAIT_MS = 5
"""The reader is the instrument: a short fetch wait keeps its own delay to a few ms (see bench/bus.py)."""
THROUGHPUT_FETCH_WAIT_MS = 100
"""The reader's fetch wait while the backlog drains (its delay is at most this, once, at the end)."""
LATENCY_IMAGES = 60
LATENCY_WARMUP = 10
DISTINCT_IMAGES = 100


def _images(count: int) -> list[bytes]:
    from visionloop.libs.scenes import render_scene

    return [
        render_scene(seed=700_000 + i, width=640, height=480, classes=("circle", "square", "triangle"),
                     objects=(1, 4), size=(0.15, 0.4)).encode(quality=85)
        for i in range(count)
    ]


def _rate(fn: Any, items: int, min_seconds: float) -> float:
    fn()  # warm up (allocations, thread pools)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        fn()
        done += items
    return done / (time.perf_counter() - start)


def bench_raw(model: bytes, images: list[bytes], *, imgsz: int, batch: int, infer_batch: int, threads: int,
              min_seconds: float = 4.0) -> dict[str, Any]:
    """Arms 1 and 2 with `threads` ONNX Runtime threads spent both ways a raw script could spend
    them (over one image's operators, or over several images at once, one thread each); the
    faster way is the reference."""
    from visionloop.libs.inference import Detector, decode_image

    result: dict[str, Any] = {}
    for way, detector in (
        ("operators", Detector(model, imgsz=imgsz, threads=threads)),
        ("images", Detector.parallel(model, imgsz=imgsz, threads=threads)),
    ):
        groups = [images[i : i + batch] for i in range(0, len(images), batch)]
        letterboxed = detector.prepare([decode_image(b) for b in images[:32]])[0]

        def session_only(detector: Detector = detector, letterboxed: list[Any] = letterboxed) -> None:
            detector.run(letterboxed, chunk=infer_batch)

        def from_bytes(detector: Detector = detector, groups: list[list[bytes]] = groups) -> None:
            for group in groups:
                detector.predict([decode_image(b) for b in group], conf=0.25, chunk=infer_batch)

        result[f"raw_session_{way}"] = round(_rate(session_only, len(letterboxed), min_seconds), 1)
        result[f"raw_ort_{way}"] = round(_rate(from_bytes, len(images), min_seconds), 1)
    decodes = []
    for data in images:
        start = time.perf_counter()
        decode_image(data)
        decodes.append((time.perf_counter() - start) * 1000)
    return {
        "raw_session_images_per_s": max(result["raw_session_operators"], result["raw_session_images"]),
        "raw_ort_images_per_s": max(result["raw_ort_operators"], result["raw_ort_images"]),
        "raw_ways": result,
        "decode_ms": round(statistics.median(decodes), 3),
    }


def _decision_reader(settings: Any, fetch_wait_ms: int) -> Any:
    """A consumer of the recognizer's decisions (no group, from the start), not started."""
    from aiokafka import AIOKafkaConsumer

    from visionloop.contracts import ImageRecognized, ImageUnrecognized, topic_of
    from visionloop.libs.kafka import client_kwargs

    return AIOKafkaConsumer(
        topic_of(ImageRecognized, settings.topic_prefix), topic_of(ImageUnrecognized, settings.topic_prefix),
        **client_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False,
        fetch_max_wait_ms=fetch_wait_ms,
    )


def accepted_event(ref: Any, submission_id: str, *, producer: str = "bench/driver") -> tuple[str, bytes, bytes]:
    """An `image accepted` of a stored image: its event id, key (the image id) and serialised envelope."""
    from visionloop.contracts import Envelope, ImageAccepted, ImageHashes, ImageRef, ImageSource

    payload = ImageAccepted(
        submission_id=submission_id,
        image=ImageRef(image_id=ref.sha256, blob_uri=ref.uri, width=640, height=480, format="JPEG", byte_size=ref.size),
        source=ImageSource(domain={"site": "bench"}, source_system="bench"),
        hashes=ImageHashes(phash="0" * 16),
    )
    envelope = Envelope.of(payload, producer=producer, project="bench")
    return str(envelope.event_id), ref.sha256.encode(), envelope.model_dump_json().encode()


def _accepted_event(refs: list[Any], n: int) -> tuple[str, bytes, bytes]:
    """The `n`th `image accepted` of the run (the stored images cycled)."""
    return accepted_event(refs[n % len(refs)], f"bench-{n}")


@dataclass
class _Decisions:
    """The decisions read back: when each was read, what it said, and who waits for one."""

    decided: dict[str, float] = field(default_factory=dict)
    outcomes: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def read(self, reader: Any) -> None:
        """Record every decision `reader` gets, by the event it answers; wake whoever waits for it."""
        decided, outcomes, waiters = self.decided, self.outcomes, self.waiters
        while True:
            batch = await reader.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    data = json.loads(record.value)
                    event_id = data["causation_id"]
                    decided.setdefault(event_id, now)
                    outcomes[event_id] = data
                    waiter = waiters.get(event_id)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)

    async def until(self, event_id: str, timeout: float = 120.0) -> None:
        """Return once the decision on `event_id` has been read."""
        # Woken by the reader, not polled: the instrument must not take CPU from the service.
        if event_id in self.decided:
            return
        waiter = self.waiters.setdefault(event_id, asyncio.get_running_loop().create_future())
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(f"no decision for {event_id} within {timeout:.0f} s") from None


async def _latency_phase(
    producer: Any, topic: str, refs: list[Any], seen: _Decisions, progress: Progress
) -> list[tuple[float, float]]:
    """One image in flight at a time; per counted image (end to end ms, its model time in the service)."""
    decided, outcomes = seen.decided, seen.outcomes
    # Latency: one image in flight; the first few (group joins, model load) are not counted.
    task = progress.add_task("recognizer: latency (one in flight)", total=LATENCY_IMAGES)
    latencies: list[tuple[float, float]] = []  # (end to end, the image's model time in the service)
    for n in range(LATENCY_IMAGES):
        event_id, key, value = _accepted_event(refs, n)
        start = time.perf_counter()
        await producer.send_and_wait(topic, value, key=key)
        await seen.until(event_id)
        if n >= LATENCY_WARMUP:
            recognition = outcomes[event_id]["payload"].get("recognition") or {}
            latencies.append(((decided[event_id] - start) * 1000, recognition.get("inference_ms") or 0.0))
        progress.advance(task)
    return latencies


async def _throughput_phase(
    producer: Any, topic: str, refs: list[Any], seen: _Decisions, backlog: int, progress: Progress
) -> tuple[list[tuple[str, bytes, bytes]], float]:
    """A backlog produced as fast as the broker takes it; its events, and seconds to the last decision."""
    task = progress.add_task("recognizer: throughput (backlog)", total=backlog)
    made = [_accepted_event(refs, LATENCY_IMAGES + n) for n in range(backlog)]
    start = time.perf_counter()
    await asyncio.gather(*(producer.send_and_wait(topic, value, key=key) for _, key, value in made))
    for n, (event_id, _, _) in enumerate(made):
        await seen.until(event_id)
        progress.update(task, completed=n + 1)
    elapsed = max(seen.decided[e] for e, _, _ in made) - start
    return made, elapsed


def _broker_figures(
    seen: _Decisions, made: list[tuple[str, bytes, bytes]], elapsed: float, latencies: list[tuple[float, float]],
    backlog: int,
) -> dict[str, Any]:
    """Arm 3's figures: throughput, end-to-end latency, model time, and what the backlog's images became."""
    kinds: dict[str, int] = {}
    for event_id, _, _ in made:
        payload = seen.outcomes[event_id]["payload"]
        kind = "recognized" if seen.outcomes[event_id]["event_type"] == "image.recognized" else f"unrecognized/{payload['reason']}"
        kinds[kind] = kinds.get(kind, 0) + 1
    e2e = [total for total, _ in latencies]
    return {
        "images_per_s": round(backlog / elapsed, 1),
        "e2e_p50_ms": round(float(np.percentile(e2e, 50)), 2),
        "e2e_p99_ms": round(float(np.percentile(e2e, 99)), 2),
        "model_ms_per_image_in_service": round(statistics.median(model for _, model in latencies), 2),
        "backlog_images": backlog,
        "backlog_outcomes": kinds,
        "_latencies": latencies,
    }


async def _through_the_broker(settings: Any, blobs: Any, images: list[bytes], backlog: int, progress: Progress) -> dict[str, Any]:
    from aiokafka import AIOKafkaProducer

    from visionloop.contracts import ImageAccepted, ImageRecognized, ImageUnrecognized, topic_of
    from visionloop.libs.kafka import client_kwargs, ensure_named

    refs = [await blobs.put(data) for data in images]
    await ensure_named(settings, [topic_of(t, settings.topic_prefix) for t in (ImageRecognized, ImageUnrecognized, ImageAccepted)])
    reader = _decision_reader(settings, READER_FETCH_WAIT_MS)
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=0)
    await reader.start()
    await producer.start()
    seen = _Decisions()
    topic = topic_of(ImageAccepted, settings.topic_prefix)
    reading = asyncio.create_task(seen.read(reader))
    try:
        latencies = await _latency_phase(producer, topic, refs, seen, progress)
        # Throughput: a backlog produced as fast as the broker takes it. The reader now waits
        # longer per fetch: polling every 5 ms would take CPU from the service it measures,
        # and the end of a ~10 s run needs no millisecond precision.
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await reader.stop()
        reader = _decision_reader(settings, THROUGHPUT_FETCH_WAIT_MS)
        await reader.start()
        reading = asyncio.create_task(seen.read(reader))
        made, elapsed = await _throughput_phase(producer, topic, refs, seen, backlog, progress)
        return _broker_figures(seen, made, elapsed, latencies, backlog)
    finally:
        reading.cancel()
        await producer.stop()
        await reader.stop()


async def _mean_batch(settings: Any, backlog: int) -> float:
    """Mean batch size over the backlog's images, from the recognizer's own decision rows."""
    from visionloop.libs.db import create_pool, quote_ident

    pool = await create_pool(settings, min_size=1, max_size=1)
    try:
        value = await pool.fetchval(
            f"""SELECT avg(batch_size) FROM (SELECT batch_size FROM {quote_ident(settings.schema_for("recognizer"))}.recognitions
                ORDER BY decided_at DESC LIMIT $1) AS backlog""",
            backlog,
        )
    finally:
        await pool.close()
    return round(float(value or 0), 2)


def bench_service(model: bytes, images: list[bytes], *, imgsz: int, batch: int, infer_batch: int, wait_ms: int,
                  threads: int, parallelism: str, backlog: int, progress: Progress) -> dict[str, Any]:
    """Arm 3: the recognizer as its own process on the embedded broker and PostgreSQL."""
    from visionloop.contracts import Alias
    from visionloop.libs.blob import open_blob_store
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.library import LibraryWriter
    from visionloop.libs.settings import Settings

    tag = uuid.uuid4().hex[:6]
    stack = EmbeddedStack(Settings(state_dir=STATE))
    base = stack.start()
    blob_url = (STATE.resolve() / f"blobs-{tag}").as_uri()
    settings = base.model_copy(update={"topic_prefix": f"bench{tag}.", "schema_prefix": f"bench{tag}_", "blob_url": blob_url})
    instance = f"bench-{tag}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "VL_KAFKA_EMBEDDED": "true",
        "VL_DATABASE_URL": settings.database_url,
        "VL_BLOB_URL": blob_url,
        "VL_TOPIC_PREFIX": settings.topic_prefix,
        "VL_SCHEMA_PREFIX": settings.schema_prefix,
        "VL_INSTANCE": instance,
        "VL_LOG_LEVEL": "WARNING",
        "VL_RECOGNIZER_BATCH_MAX": str(batch),
        "VL_RECOGNIZER_BATCH_WAIT_MS": str(wait_ms),
        "VL_RECOGNIZER_INFERENCE_BATCH": str(infer_batch),
        "VL_RECOGNIZER_CPU_PARALLELISM": parallelism,
        "VL_RECOGNIZER_THREADS": str(threads),
    }
    proc = None
    try:
        blobs = open_blob_store(blob_url)

        async def register() -> None:
            async with LibraryWriter(settings, blobs=blobs) as library:
                await library.add(model, project="bench", input_size=imgsz, alias=Alias.PRODUCTION)

        asyncio.run(register())
        proc = subprocess.Popen(
            [sys.executable, "-m", "visionloop.cli", "run", "recognizer"], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        result = asyncio.run(_through_the_broker(settings, blobs, images, backlog, progress))
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        result["mean_batch"] = asyncio.run(_mean_batch(settings, backlog))
        return result
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        stack.stop()
        shutil.rmtree(STATE / f"blobs-{tag}", ignore_errors=True)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    names = ["ORT session.run\n(model only)", "raw ORT\n(bytes → boxes)", "recognizer\n(broker + PostgreSQL)"]
    values = [result["raw_session_images_per_s"], result["raw_ort_images_per_s"], result["images_per_s"]]
    ax.bar(names, values, color=["#bbb", "#888", "#2a7"])
    ax.axhline(0.85 * result["raw_ort_images_per_s"], color="r", linestyle="--", linewidth=1, label="target: 85 % of raw ORT")
    ax.set_ylabel(f"images/s ({result['imgsz']}px, batch {result['batch']}, {result['threads']} ORT threads)")
    ax.set_title(f"Throughput: {result['ratio_vs_raw']:.0%} of raw ONNX Runtime")
    ax.legend()
    ax = axes[1]
    added = result["_added"]
    ax.hist(added, bins=30, color="#47a")
    ax.set_xlabel("ms the service adds to one image (one in flight)")
    ax.set_ylabel("images")
    ax.set_title(f"Added latency: p50 {result['added_p50_ms']} ms, p99 {result['added_p99_ms']} ms")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _measure(result: dict[str, Any], model: bytes, progress: Progress, *, images: int, imgsz: int, batch: int,
             infer_batch: int, wait_ms: int, threads: int, parallelism: str) -> None:
    """Raw ONNX Runtime before and after the recognizer, the recognizer between; the figures into `result`."""
    files = _images(DISTINCT_IMAGES)
    result["mean_jpeg_kb"] = round(float(np.mean([len(f) for f in files])) / 1024, 1)
    result["load_average_before"] = round(os.getloadavg()[0], 2)
    step = progress.add_task("raw ONNX Runtime (same model, images, threads), before and after", total=2)
    before = bench_raw(model, files, imgsz=imgsz, batch=batch, infer_batch=infer_batch, threads=threads)
    progress.advance(step)
    result |= bench_service(model, files, imgsz=imgsz, batch=batch, infer_batch=infer_batch, wait_ms=wait_ms,
                            threads=threads, parallelism=parallelism, backlog=images, progress=progress)
    after = bench_raw(model, files, imgsz=imgsz, batch=batch, infer_batch=infer_batch, threads=threads)
    progress.advance(step)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    _reference(result, before, after)


def _reference(result: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """The raw references into `result`: the better of before and after, both kept; a warning if they differ much."""
    # The reference is the better of the two raw measurements: a slow moment of the machine
    # can only lower the ratio, never flatter it.
    for key in ("raw_session_images_per_s", "raw_ort_images_per_s"):
        result[key] = max(before[key], after[key])
        result[f"{key}_before_after"] = [before[key], after[key]]
    result["raw_ways_before_after"] = [before["raw_ways"], after["raw_ways"]]
    result["decode_ms"] = min(before["decode_ms"], after["decode_ms"])
    low, high = sorted(result["raw_ort_images_per_s_before_after"])
    if low < 0.85 * high:
        result["warning"] = (
            f"raw ONNX Runtime ran at {low} images/s once and {high} the other time: something else "
            "used the CPU during this run; rerun on a quiet machine"
        )


def _ratios_and_added(result: dict[str, Any]) -> None:
    """The ratios to the raw arms and the latency the service adds, into `result`."""
    result["ratio_vs_raw"] = round(result["images_per_s"] / result["raw_ort_images_per_s"], 3)
    result["ratio_vs_session"] = round(result["images_per_s"] / result["raw_session_images_per_s"], 3)
    added = [total - model - result["decode_ms"] for total, model in result.pop("_latencies")]
    result["added_p50_ms"] = round(float(np.percentile(added, 50)), 2)
    result["added_p99_ms"] = round(float(np.percentile(added, 99)), 2)
    result["_added"] = added


def _table(result: dict[str, Any], *, imgsz: int, batch: int, infer_batch: int, threads: int, parallelism: str) -> Table:
    """The figures as the table `run_recognizer_bench` prints."""
    table = Table(title=(
        f"visionloop bench recognizer — {imgsz}px YOLO11n, batch {batch} ({infer_batch} per run), "
        f"{threads} ORT threads ({parallelism})"
    ))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("reference / target")
    table.add_row("recognizer, images/s (backlog through the broker)", f"{result['images_per_s']}",
                  f"{result['backlog_images']} images; mean batch {result.get('mean_batch', '?')} (per image)")
    table.add_row("raw ONNX Runtime, images/s (JPEG bytes → boxes)", f"{result['raw_ort_images_per_s']}",
                  "same model, images, threads; the faster way to spend them")
    table.add_row("ratio vs raw", f"{result['ratio_vs_raw']:.1%}", "target >= 85 %")
    table.add_row("ONNX Runtime session.run only, images/s", f"{result['raw_session_images_per_s']}",
                  f"ratio {result['ratio_vs_session']:.1%}")
    table.add_row("added latency p50 / p99 (one in flight)", f"{result['added_p50_ms']} / {result['added_p99_ms']} ms",
                  f"beyond inference: model {result['model_ms_per_image_in_service']} ms + decode {result['decode_ms']} ms")
    table.add_row("end to end p50 / p99 (one in flight)", f"{result['e2e_p50_ms']} / {result['e2e_p99_ms']} ms", "")
    return table


def run_recognizer_bench(*, images: int = 400, imgsz: int = 640, batch: int = 8, infer_batch: int = 1, wait_ms: int = 0,
                         threads: int = 0, parallelism: str = "images", console: Console | None = None,
                         plot: Path = PLOT) -> dict[str, Any]:
    """Run every arm; print a table; write the plot; return the figures."""
    from visionloop.libs.yolo import synthetic_detector

    console = console or Console(stderr=True)
    threads_in_force = threads or os.cpu_count() or 1
    result: dict[str, Any] = {
        "machine": machine(),
        "imgsz": imgsz, "batch": batch, "infer_batch": infer_batch, "wait_ms": wait_ms, "threads": threads_in_force,
        "cpu_parallelism": parallelism,
    }
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        step = progress.add_task("detector: train on synthetic scenes (cached) and export", total=1)
        detector = synthetic_detector(STATE / "models", state_dir=STATE / "ultralytics")
        model = detector.onnx(imgsz, dynamic=True).read_bytes()
        progress.advance(step)
        _measure(result, model, progress, images=images, imgsz=imgsz, batch=batch, infer_batch=infer_batch,
                 wait_ms=wait_ms, threads=threads_in_force, parallelism=parallelism)
    _ratios_and_added(result)
    _plot(result, plot)
    result["plot"] = str(plot)
    console.print(_table(result, imgsz=imgsz, batch=batch, infer_batch=infer_batch, threads=threads_in_force,
                         parallelism=parallelism))
    if "warning" in result:
        console.print(f"[yellow]warning[/]: {result['warning']}")
    console.print(f"plot: {plot}")
    return {k: v for k, v in result.items() if not k.startswith("_")}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_recognizer_bench()))
