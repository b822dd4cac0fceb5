"""Scale-out benchmark: intake and recognizer throughput with 1 and 2 processes per service, one run.

One embedded broker and PostgreSQL for the whole run. Each measurement ("arm") gets fresh topic
and schema prefixes and starts its services with the supervisor of `visionloop up --processes`
(`visionloop run NAME` per process; replicas share the service's consumer groups, so Kafka
spreads the topic's partitions over them):

1. **Intake**: ingest and dedup, `r` processes each. A backlog of `image submitted` events (the
   intake bench's mix of 640x480 JPEGs: mostly new scenes, some exact and near copies, carried
   inline) produced as fast as the broker takes them; images/s from the first produce to the
   last accept/reject decision read back.
2. **Recognizer**: `r` recognizer processes, the synthetic-scene detector registered as the
   project's production model, the recognizer bench's settings (batch 8, one image per
   `session.run`, no batch wait, threads spent over images). A backlog of `image accepted` events
   (blobs already stored); images/s from the first produce to the last decision. The ONNX Runtime
   threads are split between the replicas (2 replicas on 2 cores: one thread each), so both arms
   spend the same threads and a ratio above 1 is what the second process itself brings.

Before an arm is timed its consumer groups must be stable with `r` members each (no rebalance
during the measurement), and a warm-up of a few images per partition must be decided (model
loading, cold caches, connections). Every arm sends the same images. The arms run in the order
1, 2, 2, 1 replicas so a drift of the machine during the run favours neither; each measurement is
reported, and the figure per replica count is the mean of its two.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionloop.bench import machine

STATE = Path(".visionloop") / "bench" / "scale"
"""The run's state folder (PostgreSQL, logs, blobs while it runs) and where results are written."""
ORDER = (1, 2, 2, 1)
"""Replicas per arm, in run order: each count measured twice, symmetric around the middle."""
WARMUP_PER_PARTITION = 2
"""Warm-up images sent to each partition of the arm's input topic before the clock starts."""
FETCH_WAIT_MS = 100
"""The reader's fetch wait: its delay is at most this, once, at the end of a drain of seconds."""
START_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 60.0
RECOGNIZER = {"batch": 8, "infer_batch": 1, "wait_ms": 0, "parallelism": "images"}
"""The recognizer's settings in every arm: `visionloop bench recognizer`'s defaults."""

Message = tuple[str, bytes, bytes]
"""(id the decision will carry, key, value) of one event to produce."""


@dataclass
class Stream:
    """One arm's traffic: the topic its images go to and the topics their decisions come back on."""

    topic: str
    partitions: int
    decisions: list[str]
    ident: Callable[[dict[str, Any]], str]
    """The id of the image a decision is about (the id its message was produced under)."""
    outcome: Callable[[dict[str, Any]], str]


def _intake_stream(settings: Any) -> Stream:
    from visionloop.contracts import ImageAccepted, ImageRejected, ImageSubmitted, topic_of
    from visionloop.contracts.topics import spec_for

    return Stream(
        topic=topic_of(ImageSubmitted, settings.topic_prefix), partitions=spec_for(ImageSubmitted).partitions,
        decisions=[topic_of(ImageAccepted, settings.topic_prefix), topic_of(ImageRejected, settings.topic_prefix)],
        ident=lambda data: data["payload"]["submission_id"],
        outcome=lambda data: data["payload"].get("reason") or "accepted",
    )


def _submissions(prefix: str, images: list[bytes]) -> list[Message]:
    """`image submitted` events carrying the images inline, keyed by submission id."""
    from visionloop.contracts import Envelope, ImageSubmitted

    out = []
    for n, data in enumerate(images):
        sid = f"{prefix}-{n}"
        envelope = Envelope.of(ImageSubmitted(submission_id=sid, inline_bytes=data), producer="bench/scale", project="bench")
        out.append((sid, sid.encode(), envelope.model_dump_json().encode()))
    return out


def _recognizer_stream(settings: Any) -> Stream:
    from visionloop.contracts import ImageAccepted, ImageRecognized, ImageUnrecognized, topic_of
    from visionloop.contracts.topics import spec_for

    def outcome(data: dict[str, Any]) -> str:
        return "recognized" if data["event_type"] == "image.recognized" else f"unrecognized/{data['payload']['reason']}"

    return Stream(
        topic=topic_of(ImageAccepted, settings.topic_prefix), partitions=spec_for(ImageAccepted).partitions,
        decisions=[topic_of(ImageRecognized, settings.topic_prefix), topic_of(ImageUnrecognized, settings.topic_prefix)],
        ident=lambda data: data["causation_id"], outcome=outcome,
    )


def _accepted(prefix: str, refs: list[Any], count: int) -> list[Message]:
    """`count` `image accepted` events over the stored images (cycled), keyed by image id."""
    from visionloop.bench.recognizer import accepted_event

    return [accepted_event(refs[n % len(refs)], f"{prefix}-{n}", producer="bench/scale") for n in range(count)]


async def _settled(settings: Any, names: list[str], members: int) -> float:
    """Wait until every consumer group of the services is stable with `members` members; seconds waited."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    from visionloop.bench.soak import _groups
    from visionloop.libs.kafka import client_kwargs

    groups = sorted({group for _, group in _groups(settings, names)})
    admin = AIOKafkaAdminClient(**client_kwargs(settings))  # type: ignore[arg-type]
    await admin.start()
    start = time.perf_counter()
    try:
        while True:
            seen = {}
            for name in groups:  # one group per request: Tansu's answer to several does not decode
                try:
                    for response in await admin.describe_consumer_groups([name]):
                        for group in response.to_object()["groups"]:
                            seen[group["group"]] = (group["state"], len(group["members"]))
                except KafkaError:
                    continue  # not known yet, or the connection dropped: asked again below
            if all(seen.get(g) == ("Stable", members) for g in groups):
                return round(time.perf_counter() - start, 2)
            if time.perf_counter() - start > SETTLE_TIMEOUT_S:
                raise TimeoutError(
                    f"consumer groups not stable with {members} members within {SETTLE_TIMEOUT_S:.0f} s: {seen}; "
                    f"see the logs in {settings.state_dir / 'logs'}"
                )
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


class _Reader:
    """Reads decisions back and wakes whoever waits for a set of them (no polling: the
    instrument must not take CPU from the services it measures)."""

    def __init__(self, settings: Any, stream: Stream) -> None:
        from aiokafka import AIOKafkaConsumer

        from visionloop.libs.kafka import client_kwargs

        self.stream = stream
        self.consumer = AIOKafkaConsumer(*stream.decisions, **client_kwargs(settings), auto_offset_reset="earliest",
                                         enable_auto_commit=False, fetch_max_wait_ms=FETCH_WAIT_MS)
        self.decided: dict[str, float] = {}
        self.outcomes: dict[str, str] = {}
        self.pending: set[str] = set()
        self.done = asyncio.Event()
        self.on_decision: Callable[[], None] = lambda: None

    async def run(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=100)
            now = time.perf_counter()
            for records in batch.values():
                for record in records:
                    data = json.loads(record.value)
                    ident = self.stream.ident(data)
                    if ident in self.decided:
                        continue  # a redelivery: the first decision counts
                    self.decided[ident] = now
                    self.outcomes[ident] = self.stream.outcome(data)
                    if ident in self.pending:
                        self.pending.discard(ident)
                        self.on_decision()
                        if not self.pending:
                            self.done.set()

    def expect(self, ids: list[str]) -> None:
        """From now on, `wait` returns once every one of `ids` is decided."""
        self.pending = set(ids) - set(self.decided)
        self.done.clear()
        if not self.pending:
            self.done.set()

    async def wait(self, what: str, total: int, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{what}: {len(self.pending)} of {total} images had no decision within {timeout_s:.0f} s") from None


async def _drain(settings: Any, stream: Stream, warmup: list[Message], backlog: list[Message], progress: Progress,
                 label: str) -> dict[str, Any]:
    """Warm up (some images on every partition), then time the backlog from first produce to last decision."""
    from aiokafka import AIOKafkaProducer

    from visionloop.libs.kafka import client_kwargs, ensure_named

    await ensure_named(settings, [stream.topic, *stream.decisions])
    reader = _Reader(settings, stream)
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=0)
    await reader.consumer.start()
    await producer.start()
    reading = asyncio.create_task(reader.run())
    try:
        reader.expect([ident for ident, _, _ in warmup])
        start = time.perf_counter()
        await asyncio.gather(*(producer.send_and_wait(stream.topic, value, key=key, partition=n % stream.partitions)
                               for n, (_, key, value) in enumerate(warmup)))
        await reader.wait(f"{label}: warm-up", len(warmup), SETTLE_TIMEOUT_S * 2)
        warmup_s = time.perf_counter() - start
        task = progress.add_task(label, total=len(backlog))
        reader.on_decision = lambda: progress.advance(task)
        ids = [ident for ident, _, _ in backlog]
        reader.expect(ids)
        start = time.perf_counter()
        await asyncio.gather(*(producer.send_and_wait(stream.topic, value, key=key) for _, key, value in backlog))
        await reader.wait(label, len(backlog), 120 + len(backlog))
        elapsed = max(reader.decided[i] for i in ids) - start
    finally:
        reading.cancel()
        await producer.stop()
        await reader.consumer.stop()
    return {
        "images": len(backlog), "decided": sum(1 for i in ids if i in reader.decided),
        "images_per_s": round(len(backlog) / elapsed, 1), "seconds": round(elapsed, 2), "warmup_s": round(warmup_s, 2),
        "outcomes": dict(Counter(reader.outcomes[i] for i in ids)),
    }


async def _arm(settings: Any, names: list[str], replicas: int, extra_env: dict[str, str], stream: Stream,
               warmup: list[Message], backlog: list[Message], progress: Progress, label: str) -> dict[str, Any]:
    """One measurement: the services with `replicas` processes each, settled, warmed up, drained, stopped."""
    from visionloop.supervisor import Supervisor

    supervisor = Supervisor(settings, names, replicas={name: replicas for name in names}, extra_env=extra_env)
    began = time.perf_counter()
    try:
        await supervisor.start(START_TIMEOUT_S)
        start_s = time.perf_counter() - began
        settle_s = await _settled(settings, names, replicas)
        load = os.getloadavg()[0]
        result = await _drain(settings, stream, warmup, backlog, progress, label)
    finally:
        await supervisor.stop()
    return {
        "replicas": replicas, "processes": len(supervisor.names), "start_s": round(start_s, 2), "settle_s": settle_s,
        "load_average": round(load, 2), **result, "restarts": dict(supervisor.restarts),
    }


def _arm_settings(base: Any, tag: str, n: int, blob_url: str) -> Any:
    """Settings of the n-th arm: fresh topics and schemas, its blob store."""
    return base.model_copy(update={
        "topic_prefix": f"scale{tag}{n}.", "schema_prefix": f"scale{tag}{n}_", "blob_url": blob_url, "log_level": "WARNING",
    })


async def _intake_arms(base: Any, tag: str, images: int, progress: Progress) -> list[dict[str, Any]]:
    """Intake (ingest + dedup) at every replica count of ORDER, the same images each time."""
    from visionloop.bench.intake import _backlog, _files

    step = progress.add_task(f"intake: render {images} 640x480 JPEGs (the intake bench's mix)", total=1)
    backlog = _submissions("bulk", _backlog(images))
    warmup = _submissions("warm", _files(WARMUP_PER_PARTITION * _intake_stream(base).partitions, seed=500_000))
    progress.advance(step)
    runs = []
    for n, replicas in enumerate(ORDER):
        settings = _arm_settings(base, tag, n, (STATE.resolve() / f"blobs-{tag}" / f"intake-{n}").as_uri())
        stream = _intake_stream(settings)
        label = f"intake: ingest + dedup x{replicas} (arm {n + 1} of {len(ORDER)})"
        runs.append(await _arm(settings, ["ingest", "dedup"], replicas, {"VL_INGEST_PORT": "0"}, stream, warmup, backlog,
                               progress, label))
    return runs


def recognizer_env(threads: int) -> dict[str, str]:
    """The recognizer's settings for one replica (the recognizer bench's, with `threads` ORT threads);
    the input size is the library entry's, registered with the model."""
    return {
        "VL_RECOGNIZER_BATCH_MAX": str(RECOGNIZER["batch"]),
        "VL_RECOGNIZER_BATCH_WAIT_MS": str(RECOGNIZER["wait_ms"]),
        "VL_RECOGNIZER_INFERENCE_BATCH": str(RECOGNIZER["infer_batch"]),
        "VL_RECOGNIZER_CPU_PARALLELISM": str(RECOGNIZER["parallelism"]),
        "VL_RECOGNIZER_THREADS": str(threads),
    }


def threads_per_replica(total: int, replicas: int) -> int:
    """ONNX Runtime threads of each replica: the total split evenly (at least one each)."""
    return max(1, total // replicas)


async def _recognizer_arms(base: Any, tag: str, model: bytes, imgsz: int, images: int, threads: int,
                           progress: Progress) -> list[dict[str, Any]]:
    """The recognizer at every replica count of ORDER, the same model and images each time."""
    from visionloop.bench.recognizer import DISTINCT_IMAGES, _images
    from visionloop.contracts import Alias
    from visionloop.libs.blob import open_blob_store
    from visionloop.libs.library import LibraryWriter

    blob_url = (STATE.resolve() / f"blobs-{tag}" / "recognizer").as_uri()
    blobs = open_blob_store(blob_url)
    refs = [await blobs.put(data) for data in _images(min(DISTINCT_IMAGES, images))]
    backlog = _accepted("bulk", refs, images)
    runs = []
    for n, replicas in enumerate(ORDER, start=len(ORDER)):
        settings = _arm_settings(base, tag, n, blob_url)
        async with LibraryWriter(settings, blobs=blobs) as library:
            await library.add(model, project="bench", input_size=imgsz, alias=Alias.PRODUCTION)
        stream = _recognizer_stream(settings)
        warmup = _accepted("warm", refs, WARMUP_PER_PARTITION * stream.partitions)
        each = threads_per_replica(threads, replicas)
        label = f"recognizer x{replicas}, {each} thread(s) each (arm {n - len(ORDER) + 1} of {len(ORDER)})"
        run = await _arm(settings, ["recognizer"], replicas, recognizer_env(each), stream, warmup, backlog, progress, label)
        runs.append({**run, "threads_per_replica": each})
    return runs


def _per_replicas(runs: list[dict[str, Any]], prefix: str) -> dict[str, Any]:
    """`PREFIX_images_per_s_R` (the mean of that count's runs) and `PREFIX_scale_2_vs_1`."""
    out: dict[str, Any] = {}
    for replicas in sorted(set(ORDER)):
        out[f"{prefix}_images_per_s_{replicas}"] = round(statistics.mean(r["images_per_s"] for r in runs if r["replicas"] == replicas), 1)
    out[f"{prefix}_scale_2_vs_1"] = round(out[f"{prefix}_images_per_s_2"] / out[f"{prefix}_images_per_s_1"], 3)
    return out


def check_options(*, intake_images: int, recognizer_images: int, imgsz: int, model: Path | None) -> None:
    """ValueError naming the first option the bench cannot run with."""
    if intake_images < 1 or recognizer_images < 1:
        raise ValueError("--intake-images and --recognizer-images must be at least 1")
    if imgsz < 32 or imgsz % 32:
        raise ValueError(f"--imgsz {imgsz}: the model's input size must be a multiple of 32 (e.g. 640)")
    if model is not None and not model.is_file():
        raise ValueError(f"--model {model}: no such file; give an ONNX detector, or leave the option out for the bench's own")


def _model(model: Path | None, imgsz: int, progress: Progress) -> bytes:
    """The ONNX model the recognizer arms run: `model`, or the bench's synthetic-scene detector."""
    if model is not None:
        return model.read_bytes()
    from visionloop.bench.recognizer import STATE as MODELS
    from visionloop.libs.yolo import synthetic_detector

    step = progress.add_task("detector: train on synthetic scenes (cached) and export", total=1)
    detector = synthetic_detector(MODELS / "models", state_dir=MODELS / "ultralytics")
    data = detector.onnx(imgsz, dynamic=True).read_bytes()
    progress.advance(step)
    return data


def _measure(intake_images: int, recognizer_images: int, imgsz: int, threads: int, model: bytes,
             progress: Progress) -> dict[str, Any]:
    """Every arm on one embedded stack; each arm's figures and the per-replica means."""
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    tag = uuid.uuid4().hex[:6]
    stack = EmbeddedStack(Settings(state_dir=STATE))
    base = stack.start()

    async def arms() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        intake = await _intake_arms(base, tag, intake_images, progress)
        recognizer = await _recognizer_arms(base, tag, model, imgsz, recognizer_images, threads, progress)
        return intake, recognizer

    try:
        intake, recognizer = asyncio.run(arms())
        infrastructure = stack.watched()
    finally:
        stack.stop()
        shutil.rmtree(STATE / f"blobs-{tag}", ignore_errors=True)
    return {
        **_per_replicas(intake, "intake"), **_per_replicas(recognizer, "recognizer"),
        "intake_runs": intake, "recognizer_runs": recognizer, "infrastructure": infrastructure,
    }


def run_scale_bench(*, intake_images: int = 1000, recognizer_images: int = 400, imgsz: int = 640, threads: int = 0,
                    model: Path | None = None, console: Console | None = None) -> dict[str, Any]:
    """Run every arm; print a table; write the results under STATE; return the figures."""
    check_options(intake_images=intake_images, recognizer_images=recognizer_images, imgsz=imgsz, model=model)
    console = console or Console(stderr=True)
    total = threads or os.cpu_count() or 1
    result: dict[str, Any] = {
        "machine": machine(), "load_average_before": round(os.getloadavg()[0], 2),
        "intake_images": intake_images, "recognizer_images": recognizer_images, "imgsz": imgsz,
        "order": list(ORDER), "per_replicas": "mean of the arms with that many replicas",
        "warmup_images_per_partition": WARMUP_PER_PARTITION,
        "recognizer": {**RECOGNIZER, "threads_total": total,
                       "threads_per_replica": {str(r): threads_per_replica(total, r) for r in sorted(set(ORDER))},
                       "threads_note": "the ONNX Runtime threads are split between the replicas: every arm spends the same total"},
    }
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        data = _model(model, imgsz, progress)
        result["model"] = str(model) if model is not None else "synthetic-scene detector (YOLO11n, libs/yolo.py)"
        result |= _measure(intake_images, recognizer_images, imgsz, total, data, progress)
    result["load_average_after"] = round(os.getloadavg()[0], 2)
    restarted = {f"{kind} arm {n + 1} (x{r['replicas']})": r["restarts"]
                 for kind in ("intake", "recognizer") for n, r in enumerate(result[f"{kind}_runs"]) if r["restarts"]}
    if restarted:
        result["warning"] = f"processes restarted during arms (their figures include the restart): {restarted}"
    path = STATE / "results" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result["results_file"] = str(path)
    path.write_text(json.dumps(result, indent=2))
    _table(result, console)
    return result


def _table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"visionloop bench scale — 1 vs 2 processes per service, arms in order {result['order']}")
    table.add_column("measure")
    table.add_column("1 process", justify="right")
    table.add_column("2 processes", justify="right")
    table.add_column("2 vs 1", justify="right")
    table.add_column("each arm (in run order)")
    threads = result["recognizer"]["threads_per_replica"]
    for prefix, name in (("intake", f"intake (ingest + dedup), images/s, {result['intake_images']} images"),
                         ("recognizer", f"recognizer, images/s, {result['recognizer_images']} images at {result['imgsz']}px, "
                                        f"ORT threads per process {threads['1']} / {threads['2']}")):
        arms = ", ".join(f"x{r['replicas']} {r['images_per_s']}" for r in result[f"{prefix}_runs"])
        table.add_row(name, f"{result[f'{prefix}_images_per_s_1']}", f"{result[f'{prefix}_images_per_s_2']}",
                      f"{result[f'{prefix}_scale_2_vs_1']:.2f}x", arms)
    console.print(table)
    if "warning" in result:
        console.print(f"[yellow]warning[/]: {result['warning']}")
    console.print(f"load average {result['load_average_before']} before, {result['load_average_after']} after; "
                  f"{result['machine']['cores']} cores ({result['machine']['cpu']}); results: {result['results_file']}")


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(run_scale_bench()))
