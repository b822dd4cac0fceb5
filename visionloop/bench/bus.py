"""Bus round trip: one consumer-producer hop through the framework, next to raw aiokafka.

Both arms run against the same embedded broker in the same run, started here (Tansu on a free
loopback port, PostgreSQL under `.visionloop/bench/postgres` of the current folder):

- **framework**: a `Runtime` service `hop` consumes `image ingested` and emits one `image
  accepted` per input through `unit.emit`, under the production consumer policy: the envelope
  is validated, the inbox row and the outbox row are written in one PostgreSQL transaction, the
  event is published after the commit and the offset is committed after that.
- **raw**: a plain aiokafka consumer (same group settings, auto-commit off) reads the same kind
  of input bytes, sends a pre-serialised `image accepted` envelope of the same size with
  `send_and_wait` and commits after every message. No validation, no database.

Input and output topics have the registry's partition counts in both arms. Each hop runs as its
own process, as `visionloop run <service>` would; this process is the driver: it produces the
inputs and reads the outputs with a plain aiokafka consumer that belongs to no group.

Each arm is measured in two phases, so that neither number hides in the other:

1. **Hop latency** (one event in flight): the driver produces an input, waits until the
   reader sees its output, then sends the next. Latency is the time from just before the
   produce call to the reader receiving the output (both on this process's monotonic clock),
   so it holds the whole hop: produce, the hop's fetch, its work, its publish, the reader's
   fetch. The first events of this phase (group join, cold connections) are excluded.
2. **Throughput** (backlog): the driver produces `events` inputs as fast as the broker takes
   them; events/s is `events` divided by the time from the first of those produce calls to the
   reader seeing the last output. The hop is warm by then (phase 1 ran first).

`ratio_vs_raw` is raw events/s divided by framework events/s: how many times slower the
framework hop is than the bare client. Setting `VL_BENCH_PROFILE=<folder>` runs each hop under
cProfile and writes `<arm>.prof` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import hashlib
import json
import os
import platform
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ARMS = ("raw", "framework")
WARMUP_EVENTS = 20
"""Round trips run before any measurement of an arm (group join, cold connections, caches)."""
LATENCY_EVENTS_MAX = 1000
"""Closed-loop round trips timed per arm: `events`, capped at this (one at a time is slow)."""
PLOT = Path("docs") / "benchmarks" / "bus_latency.png"
STATE = Path(".visionloop") / "bench"
READY = "ready"


# -- the two hops (each runs in its own process: `python -m visionloop.bench.bus hop <arm>`) -------
def _raw_topics(settings: Any) -> tuple[str, str]:
    return settings.topic("bench.raw.image.ingested"), settings.topic("bench.raw.image.accepted")


def _sample_input(n: int, arm: str) -> tuple[bytes, bytes]:
    """An `image ingested` envelope as bytes, keyed by its image id (unique per arm and n)."""
    from visionloop.contracts import Envelope, ImageIngested, ImageRef, ImageSource

    digest = hashlib.sha256(f"bench-{arm}-{n}".encode()).hexdigest()
    payload = ImageIngested(
        submission_id=f"bench-{n}",
        image=ImageRef(
            image_id=digest,
            blob_uri=f"file:///blobs/{digest[:2]}/{digest}",
            width=640,
            height=480,
            format="JPEG",
            byte_size=48_213,
        ),
        source=ImageSource(domain={"site": "bench", "camera": "c1"}, source_system="bench"),
    )
    envelope = Envelope.of(payload, producer="bench/driver", project="bench")
    return digest.encode(), envelope.model_dump_json().encode()


def _accepted(event: Any) -> Any:
    """What the hop emits for an `image ingested`: the image, accepted, with a fixed hash."""
    from visionloop.contracts import ImageAccepted, ImageHashes

    return ImageAccepted(
        submission_id=event.payload.submission_id,
        image=event.payload.image,
        source=event.payload.source,
        hashes=ImageHashes(phash="0" * 16),
    )


async def _framework_hop(settings: Any, stop: asyncio.Event) -> dict[str, int]:
    from visionloop.contracts import Envelope, ImageAccepted, ImageIngested
    from visionloop.libs.bus import Runtime, Unit
    from visionloop.libs.db import create_pool

    pool = await create_pool(settings)
    runtime = Runtime("hop", settings, pool=pool, description="Benchmark hop: accepts every image.")

    async def accept(event: Envelope[ImageIngested], unit: Unit[ImageIngested]) -> None:
        """Accept every ingested image (the bench measures the bus, not a decision)."""
        unit.emit(_accepted(event))

    runtime.consume(ImageIngested, accept)
    runtime.produces(ImageAccepted)
    await runtime.start()
    print(READY, flush=True)
    try:
        await stop.wait()
    finally:
        await runtime.stop()
        await pool.close()
    return dict(runtime.counters)


async def _raw_hop(settings: Any, stop: asyncio.Event) -> dict[str, int]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from visionloop.contracts import Envelope, ImageIngested
    from visionloop.libs.kafka import client_kwargs

    source, sink = _raw_topics(settings)
    # A ready-made output of the framework's size: the raw arm does no serialisation at all.
    incoming = Envelope[ImageIngested].model_validate_json(_sample_input(0, "template")[1])
    template = Envelope.of(_accepted(incoming), producer=f"hop/{settings.instance}", project="bench", causation=incoming)
    value = template.model_dump_json().encode()
    headers = [
        ("content-type", b"application/octet-stream"),
        ("event_type", template.event_type.encode()),
        ("schema_version", template.schema_version.encode()),
        ("event_id", str(template.event_id).encode()),
        ("correlation_id", template.correlation_id.encode()),
    ]
    kwargs = client_kwargs(settings)
    consumer = AIOKafkaConsumer(
        source,
        **kwargs,  # type: ignore[arg-type]
        group_id=settings.topic("bench.raw"),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
    )
    producer = AIOKafkaProducer(**kwargs, acks="all", enable_idempotence=False)  # type: ignore[arg-type]
    await consumer.start()
    await producer.start()
    counters = {"handled": 0}

    async def loop() -> None:
        while True:
            record = await consumer.getone()
            await producer.send_and_wait(sink, value, key=record.key, headers=headers)
            await consumer.commit()  # per message, after the output is acknowledged: the bus's policy
            counters["handled"] += 1

    task = asyncio.create_task(loop())
    print(READY, flush=True)
    try:
        await stop.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await producer.stop()
        await consumer.stop()
    return counters


def _hop_main(arm: str) -> None:
    """Entry point of a hop process: settings from `VL_*`, `ready` on stdout, SIGTERM stops it."""
    from visionloop.libs.settings import Settings

    settings = Settings()
    hop = {"framework": _framework_hop, "raw": _raw_hop}[arm]

    async def main() -> dict[str, int]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await hop(settings, stop)

    profile_dir = os.environ.get("VL_BENCH_PROFILE")
    profiler = cProfile.Profile() if profile_dir else None
    if profiler is not None:
        profiler.enable()
    counters = asyncio.run(main())
    if profiler is not None:
        profiler.disable()
        Path(profile_dir).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
        profiler.dump_stats(str(Path(profile_dir) / f"{arm}.prof"))  # type: ignore[arg-type]
    print(json.dumps(counters), flush=True)


# -- the driver ---------------------------------------------------------------------------------
@dataclass
class ArmResult:
    """What one arm measured."""

    arm: str
    events: int
    seconds: float
    latencies_ms: list[float]
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds

    def percentile(self, q: float) -> float:
        """Latency percentile `q` (0-100) in ms, nearest-rank."""
        ordered = sorted(self.latencies_ms)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]


class _Reader:
    """Reads an output topic from its start (no consumer group); notes when each key arrives."""

    def __init__(self, settings: Any, topic: str) -> None:
        from aiokafka import AIOKafkaConsumer

        from visionloop.libs.kafka import client_kwargs

        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            **client_kwargs(settings), enable_auto_commit=False, auto_offset_reset="earliest"  # type: ignore[arg-type]
        )
        self.seen = 0
        self._waiting: dict[bytes, asyncio.Future[float]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        from aiokafka import TopicPartition

        await self.consumer.start()
        partitions = self.consumer.partitions_for_topic(self.topic)
        while not partitions:  # metadata for a topic created a moment ago
            await self.consumer._client.force_metadata_update()
            partitions = self.consumer.partitions_for_topic(self.topic)
        self.consumer.assign([TopicPartition(self.topic, p) for p in sorted(partitions)])
        self._task = asyncio.create_task(self._read())

    def expect(self, key: bytes) -> asyncio.Future[float]:
        """A future resolved with the monotonic time at which `key` was read."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        return future

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=1000)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    self.seen += 1
                    future = self._waiting.pop(record.key, None)
                    if future is not None and not future.done():
                        future.set_result(now)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


async def _spawn_hop(arm: str, settings: Any) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "VL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "VL_KAFKA_EMBEDDED": "true",
        "VL_DATABASE_URL": settings.database_url,
        "VL_TOPIC_PREFIX": settings.topic_prefix,
        "VL_SCHEMA_PREFIX": settings.schema_prefix,
        "VL_INSTANCE": settings.instance,
        "VL_STATE_DIR": str(settings.state_dir),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "visionloop.bench.bus", "hop", arm, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=120)
    if line.decode().strip() != READY:
        process.kill()
        raise RuntimeError(f"the {arm} hop did not start (exit code {await process.wait()})")
    return process


async def _stop_hop(process: asyncio.subprocess.Process) -> dict[str, int]:
    assert process.stdout is not None
    process.send_signal(signal.SIGTERM)
    try:
        tail = await asyncio.wait_for(process.stdout.read(), timeout=60)
        await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        return {}
    lines = tail.decode().strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


async def _run_arm(arm: str, settings: Any, events: int, progress: Progress) -> ArmResult:
    from aiokafka import AIOKafkaProducer

    from visionloop.contracts import ImageAccepted, ImageIngested, topic_of
    from visionloop.libs.kafka import client_kwargs

    if arm == "framework":
        source, sink = topic_of(ImageIngested, settings.topic_prefix), topic_of(ImageAccepted, settings.topic_prefix)
    else:
        source, sink = _raw_topics(settings)
    timed = min(events, LATENCY_EVENTS_MAX)
    # Inputs are serialised before any clock starts: the driver's cost is no arm's cost.
    inputs = [_sample_input(n, arm) for n in range(WARMUP_EVENTS + timed + events)]
    closed_loop, backlog = inputs[: WARMUP_EVENTS + timed], inputs[WARMUP_EVENTS + timed :]

    latency_task = progress.add_task(f"{arm}: hop latency", total=WARMUP_EVENTS + timed)
    throughput_task = progress.add_task(f"{arm}: throughput", total=events, start=False)
    reader = _Reader(settings, sink)
    await reader.start()
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", enable_idempotence=False)  # type: ignore[arg-type]
    await producer.start()
    hop = await _spawn_hop(arm, settings)
    counters: dict[str, int] = {}
    try:
        latencies: list[float] = []
        for n, (key, value) in enumerate(closed_loop):
            arrived = reader.expect(key)
            started = time.monotonic()
            await producer.send_and_wait(source, value, key=key)
            # the first event waits for the group join (about a second on Tansu)
            seen = await asyncio.wait_for(arrived, timeout=60 if n == 0 else 30)
            if n >= WARMUP_EVENTS:
                latencies.append((seen - started) * 1000)
            progress.advance(latency_task)

        progress.start_task(throughput_task)
        done = [reader.expect(key) for key, _ in backlog]
        started = time.monotonic()
        sends = [await producer.send(source, value, key=key) for key, value in backlog]
        await asyncio.gather(*sends)
        pending = set(done)
        while pending:
            finished, pending = await asyncio.wait(pending, timeout=0.2)
            progress.update(throughput_task, completed=events - len(pending))
            if not finished and time.monotonic() - started > 60 + events / 10:
                raise RuntimeError(f"the {arm} hop stalled: {len(pending)} of {events} outputs missing")
        seconds = max(f.result() for f in done) - started
    finally:
        counters = await _stop_hop(hop)
        await producer.stop()
        await reader.stop()
    return ArmResult(arm, events, seconds, latencies, counters)


async def _bench(settings: Any, events: int, console: Console) -> dict[str, ArmResult]:
    from visionloop.contracts import ImageAccepted, ImageIngested, spec_for
    from visionloop.libs.kafka import ensure_topics

    # Same partition counts in both arms: the registry's.
    raw_in, raw_out = _raw_topics(settings)
    await ensure_topics(
        settings,
        [spec_for(ImageIngested), spec_for(ImageAccepted)],
        extra=[(raw_in, spec_for(ImageIngested).partitions), (raw_out, spec_for(ImageAccepted).partitions)],
    )
    results: dict[str, ArmResult] = {}
    columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        for arm in ARMS:
            results[arm] = await _run_arm(arm, settings, events, progress)
    await _drop_schemas(settings)
    return results


async def _drop_schemas(settings: Any) -> None:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", settings.schema_prefix)
        for row in rows:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _plot(results: dict[str, ArmResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    figure, (hist, cdf) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"raw": "#4c72b0", "framework": "#dd8452"}
    low = min(min(r.latencies_ms) for r in results.values())
    high = max(max(r.latencies_ms) for r in results.values())
    edges = [low * (high / low) ** (i / 60) for i in range(61)] if high > low else 30
    for arm, result in results.items():
        label = f"{arm}: p50 {result.percentile(50):.2f} ms, p99 {result.percentile(99):.2f} ms"
        hist.hist(result.latencies_ms, bins=edges, alpha=0.6, color=colours[arm], label=label)
        ordered = sorted(result.latencies_ms)
        cdf.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post",
                 color=colours[arm], label=f"{arm}: {result.events_per_s:,.0f} events/s")
    hist.set_xscale("log")
    hist.set_xlabel("hop latency (ms, log scale)")
    hist.set_ylabel("events")
    hist.set_title("Hop latency, one event in flight")
    hist.legend(fontsize=8)
    cdf.set_xscale("log")
    cdf.set_xlabel("hop latency (ms, log scale)")
    cdf.set_ylabel("fraction of events")
    cdf.set_title("Cumulative distribution")
    for q in (0.5, 0.99):
        cdf.axhline(q, color="grey", linewidth=0.6, linestyle=":")
    cdf.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"visionloop bench bus: framework hop vs raw aiokafka ({_cpu_model()}, {os.cpu_count()} CPUs)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _table(result: dict[str, Any], arms: dict[str, ArmResult]) -> Table:
    table = Table(title=f"Bus round trip, {result['events']} events per arm (embedded Tansu + PostgreSQL)")
    for column in ("arm", "events/s", "hop p50 (ms)", "hop p99 (ms)", "latency samples"):
        table.add_column(column, justify="right" if column != "arm" else "left")
    for arm in ("framework", "raw"):
        r = arms[arm]
        table.add_row(
            "framework (inbox + outbox + commit)" if arm == "framework" else "raw aiokafka",
            f"{r.events_per_s:,.0f}", f"{r.percentile(50):.2f}", f"{r.percentile(99):.2f}", str(len(r.latencies_ms)),
        )
    verdict = "[green]within[/]" if result["ratio_vs_raw"] <= 2.0 else "[red]above[/]"
    table.caption = (
        f"ratio vs raw (raw events/s / framework events/s): {result['ratio_vs_raw']:.2f}x, {verdict} the 2x target. "
        "Latency: produce call to output read, one event in flight; events/s: drain of a backlog."
    )
    return table


def run_bus_bench(events: int = 2000, console: Console | None = None) -> dict[str, Any]:
    """Measure the framework hop against raw aiokafka on a fresh embedded stack; return the numbers.

    `events` inputs per arm for the throughput phase (and as many closed-loop round trips for
    latency, capped at LATENCY_EVENTS_MAX). Starts and stops its own broker and PostgreSQL
    (data under `.visionloop/bench/` of the current folder) and writes the latency plot to
    `docs/benchmarks/bus_latency.png` there. See the module docstring for the definitions.
    """
    from visionloop.libs.embedded import EmbeddedBroker, EmbeddedPostgres
    from visionloop.libs.settings import Settings

    if events < 1:
        raise ValueError("events must be at least 1")
    console = console or Console(stderr=True)
    state = (Path.cwd() / STATE).resolve()
    broker = EmbeddedBroker(state / "logs" / "broker.log")
    postgres = EmbeddedPostgres(state / "postgres")
    tag = uuid.uuid4().hex[:8]
    try:
        with console.status("starting the embedded broker and PostgreSQL"):
            database_url = postgres.start()
            bootstrap = broker.start()
        settings = Settings(
            state_dir=state,
            kafka_bootstrap=bootstrap,
            kafka_embedded=True,
            database_url=database_url,
            topic_prefix=f"bench{tag}.",
            schema_prefix=f"bench{tag}_",
            instance=f"bench-{tag}",
        )
        arms = asyncio.run(_bench(settings, events, console))
    finally:
        with console.status("stopping the embedded broker and PostgreSQL"):
            broker.stop()
            postgres.stop()

    framework, raw = arms["framework"], arms["raw"]
    result: dict[str, Any] = {
        "benchmark": "bus",
        "events": events,
        "events_per_s": round(framework.events_per_s, 1),
        "raw_events_per_s": round(raw.events_per_s, 1),
        "ratio_vs_raw": round(raw.events_per_s / framework.events_per_s, 3),
        "hop_p50_ms": round(framework.percentile(50), 3),
        "hop_p99_ms": round(framework.percentile(99), 3),
        "raw_hop_p50_ms": round(raw.percentile(50), 3),
        "raw_hop_p99_ms": round(raw.percentile(99), 3),
        "hop_mean_ms": round(statistics.fmean(framework.latencies_ms), 3),
        "raw_hop_mean_ms": round(statistics.fmean(raw.latencies_ms), 3),
        "latency_samples": len(framework.latencies_ms),
        "seconds": round(framework.seconds, 3),
        "raw_seconds": round(raw.seconds, 3),
        "framework_counters": framework.counters,
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    result["plot"] = str(_plot(arms, (Path.cwd() / PLOT).resolve()))
    console.print(_table(result, arms))
    console.print(f"latency plot: {result['plot']}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "hop" and sys.argv[2] in ARMS:
        _hop_main(sys.argv[2])
    else:
        sys.exit("usage: python -m visionloop.bench.bus hop {raw|framework}  (run by `visionloop bench bus`)")
