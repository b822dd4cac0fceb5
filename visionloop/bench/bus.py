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

Both arms use the registry's partition counts and the service defaults for the embedded
broker (`Settings`: session and heartbeat timeouts, the fetch long-poll limit). Each hop runs as
its own process, as `visionloop run <service>` would; this process is the driver: it produces
the inputs and reads the outputs with plain aiokafka consumers that belong to no group. Both
hops are up for the whole run and the arms take turns, so a busy moment of a shared machine
falls on both rather than on one.

1. **Hop latency** (one event in flight): the driver produces an input and waits until it reads
   the output, the arms alternating, after a random pause of up to one fetch long-poll (so
   inputs land at random points of the hop's fetch cycle instead of locking onto one phase of
   it). Latency is the time from just before the produce call to the driver reading the output,
   on this process's monotonic clock: produce, the hop's fetch, its work, its publish and the
   driver's own fetch (whose long-poll is READER_FETCH_WAIT_MS). The first WARMUP_EVENTS round
   trips of each arm (group join, cold connections) are not counted.
2. **Throughput** (backlog, `rounds` rounds per arm, arms in alternating order): the driver
   produces `events` inputs as fast as the broker takes them; a round's events/s is `events`
   over the time from the first produce call to the creation of the last output (its record
   timestamp, stamped by the hop's producer; the driver's reading delay does not count). An
   arm's events/s is its median round. CPU per event of the hop process, the broker,
   PostgreSQL, the driver and the rest of the machine is metered per round (`cpu_ms_per_event`;
   a large `other` means something else was using the machine).

With `batch` above 1 (`--batch N`) both hops take up to N records at a time: the framework hop
through `Runtime.consume_batch` (one transaction for the batch's inbox and outbox rows, one
offset commit), the raw hop with `getmany` (every output sent, all acknowledgements awaited, then
one offset commit). A batch is what is waiting, never waited for (no linger), so one event in
flight is handled alone in both.

With `door` (`--door`) both arms reach the broker through the front door that `visionloop up`
puts in front of the embedded broker so it can rotate it (`libs/frontdoor.py`): what that relay
costs shows against a run without it.

`ratio_vs_raw` is raw events/s divided by framework events/s: how many times longer the
framework hop takes per event than the bare client (target: at most `bus_report.TARGET_RATIO`). Setting
`VL_BENCH_PROFILE=<folder>` runs each hop under cProfile and writes `<arm>.prof` there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from visionloop.bench import PLOTS, cpu_model
from visionloop.bench.bus_hop import READY, _raw_topics, _sample_input
from visionloop.bench.bus_report import PARTS, _plot, _table

WARMUP_EVENTS = 20
"""Round trips run before any measurement of an arm (group join, cold connections, caches)."""
LATENCY_EVENTS_MAX = 500
"""Closed-loop round trips timed per arm: `events`, capped here (each takes ~40 ms with its pause)."""
ROUNDS = 3
"""Backlog rounds per arm; events/s is the median round."""
READER_FETCH_WAIT_MS = 5
"""The reader's fetch long-poll limit. The reader is the instrument, not part of the hop: Tansu
answers a fetch that finds nothing only at fixed points of its wait, so a short wait keeps the
instrument's delay to a few ms. The hops use the service default (`Settings.fetch_max_wait_ms`)."""
PLOT = PLOTS / "bus_latency.png"
STATE = Path(".visionloop") / "bench"


# -- the driver ---------------------------------------------------------------------------------
@dataclass
class ArmResult:
    """What one arm measured: closed-loop latencies and the rate of each backlog round."""

    arm: str
    latencies_ms: list[float] = field(default_factory=list)
    rounds_events_per_s: list[float] = field(default_factory=list)
    rounds_cpu_ms: list[dict[str, float]] = field(default_factory=list)
    """Per round: CPU ms per event of the hop, the broker, PostgreSQL, the driver, the rest."""
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def events_per_s(self) -> float:
        """Median over the rounds (the machine may be shared: one slow round does not decide)."""
        return statistics.median(self.rounds_events_per_s)

    def percentile(self, q: float) -> float:
        """Latency percentile `q` (0-100) in ms, nearest-rank."""
        ordered = sorted(self.latencies_ms)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1]

    def cpu_ms(self, part: str) -> float:
        """Median over the rounds of `part`'s CPU ms per event."""
        return statistics.median(r[part] for r in self.rounds_cpu_ms)


class _CpuMeter:
    """CPU seconds used so far by the hop, the broker and PostgreSQL, and by the whole machine."""

    def __init__(self, broker_pid: int, postgres_dir: Path) -> None:
        import psutil

        self._psutil = psutil
        self.broker = psutil.Process(broker_pid)
        self.postgres_pid = int((postgres_dir / "postmaster.pid").read_text().split()[0])
        self.driver = psutil.Process()

    @staticmethod
    def _used(processes: list[Any]) -> float:
        total = 0.0
        for process in processes:
            with contextlib.suppress(Exception):  # a process gone since: its share is lost
                times = process.cpu_times()
                total += times.user + times.system
        return total

    def _machine(self) -> float:
        times = self._psutil.cpu_times()
        return float(times.user + times.nice + times.system + times.irq + times.softirq + times.steal)

    def snapshot(self, hop_pid: int) -> tuple[dict[str, list[Any]], dict[str, float]]:
        """The processes to follow through one round, and what they had used at its start."""
        psutil = self._psutil
        postmaster = psutil.Process(self.postgres_pid)
        groups = {
            "hop": [psutil.Process(hop_pid)],
            "broker": [self.broker],
            "postgres": [postmaster, *postmaster.children(recursive=True)],
            "driver": [self.driver],
        }
        used = {name: self._used(group) for name, group in groups.items()}
        used["machine"] = self._machine()
        return groups, used

    def since(self, start: tuple[dict[str, list[Any]], dict[str, float]], events: int) -> dict[str, float]:
        """CPU ms per event since `start`, per part; `other`: the machine minus the bench."""
        groups, before = start
        now = {name: self._used(group) for name, group in groups.items()}
        now["machine"] = self._machine()
        delta = {name: now[name] - before[name] for name in now}
        machine = delta.pop("machine")
        delta["other"] = max(0.0, machine - sum(delta.values()))
        return {name: round(seconds * 1000 / events, 4) for name, seconds in delta.items()}


class _Reader:
    """Reads an output topic from its start (no consumer group); resolves a future per expected key.

    The future's value is (monotonic time the reader got the record, the record's timestamp in
    epoch ms as stamped by the hop's producer when it handed the record to its client).
    """

    def __init__(self, settings: Any, topic: str, fetch_wait_ms: int) -> None:
        from aiokafka import AIOKafkaConsumer

        from visionloop.libs.kafka import client_kwargs

        self.topic = topic
        self.consumer = AIOKafkaConsumer(
            **client_kwargs(settings),  # type: ignore[arg-type]
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=fetch_wait_ms,
        )
        self._waiting: dict[bytes, asyncio.Future[tuple[float, int]]] = {}
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

    def expect(self, key: bytes) -> asyncio.Future[tuple[float, int]]:
        """A future resolved when the output keyed `key` is read."""
        future: asyncio.Future[tuple[float, int]] = asyncio.get_running_loop().create_future()
        self._waiting[key] = future
        return future

    async def _read(self) -> None:
        while True:
            batch = await self.consumer.getmany(timeout_ms=1000)
            now = time.monotonic()
            for records in batch.values():
                for record in records:
                    future = self._waiting.pop(record.key, None)
                    if future is not None and not future.done():
                        future.set_result((now, record.timestamp))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()


@dataclass
class _Arm:
    """One hop under test and the driver's handles on it."""

    name: str
    source: str
    sink: str
    inputs: Iterator[tuple[bytes, bytes]]
    result: ArmResult
    process: asyncio.subprocess.Process | None = None
    reader: _Reader | None = None


async def _spawn_hop(arm: str, settings: Any, batch: int = 1) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "VL_KAFKA_EMBEDDED": "true",
        "VL_DATABASE_URL": settings.database_url,
        "VL_TOPIC_PREFIX": settings.topic_prefix,
        "VL_SCHEMA_PREFIX": settings.schema_prefix,
        "VL_INSTANCE": settings.instance,
        "VL_STATE_DIR": str(settings.state_dir),
        "VL_BENCH_BATCH": str(batch),
    }
    if os.environ.get("VL_BENCH_PROFILE"):
        env["VL_BENCH_PROFILE"] = os.environ["VL_BENCH_PROFILE"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "visionloop.bench.bus_hop", arm, env=env, stdout=asyncio.subprocess.PIPE
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
    try:
        return dict(json.loads(lines[-1])) if lines else {}
    except ValueError:  # it died before reporting: its counters are unknown
        return {}


def _inputs(arm: str) -> Iterator[tuple[bytes, bytes]]:
    n = 0
    while True:
        yield _sample_input(n, arm)
        n += 1


async def _round_trip(arm: _Arm, producer: Any, timeout: float) -> float:
    """One input produced, its output awaited; the latency in ms."""
    assert arm.reader is not None
    key, value = next(arm.inputs)
    arrived = arm.reader.expect(key)
    started = time.monotonic()
    await producer.send_and_wait(arm.source, value, key=key)
    seen, _ = await asyncio.wait_for(arrived, timeout=timeout)
    return (seen - started) * 1000


async def _backlog(
    arm: _Arm, producer: Any, events: int, progress: Progress, task: TaskID, meter: _CpuMeter
) -> float:
    """`events` inputs produced at once; events/s until the last output was created."""
    assert arm.reader is not None and arm.process is not None
    # Inputs are serialised before the clock starts: the driver's cost is no arm's cost.
    batch = [next(arm.inputs) for _ in range(events)]
    done = [arm.reader.expect(key) for key, _ in batch]
    cpu = meter.snapshot(arm.process.pid)
    started = time.time()
    sends = [await producer.send(arm.source, value, key=key) for key, value in batch]
    await asyncio.gather(*sends)
    pending = set(done)
    completed = progress.tasks[task].completed
    while pending:
        finished, pending = await asyncio.wait(pending, timeout=0.2)
        progress.update(task, completed=completed + events - len(pending))
        if not finished and time.time() - started > 60 + events / 10:
            raise RuntimeError(f"the {arm.name} hop stalled: {len(pending)} of {events} outputs missing")
    # The last output's record timestamp (stamped by the hop when it handed the record to its
    # client): the reader's own fetch cycle does not enter the figure.
    last = max(f.result()[1] for f in done) / 1000
    arm.result.rounds_cpu_ms.append(meter.since(cpu, events))
    return events / (last - started)


async def _arms(settings: Any) -> list[_Arm]:
    """The raw and framework arms, their topics created with the registry's partition counts."""
    from visionloop.contracts import ImageAccepted, ImageIngested, spec_for
    from visionloop.libs.kafka import ensure_topics

    raw_in, raw_out = _raw_topics(settings)
    framework_in, framework_out = (settings.topic(spec_for(p).name) for p in (ImageIngested, ImageAccepted))
    arms = [
        _Arm("raw", raw_in, raw_out, _inputs("raw"), ArmResult("raw")),
        _Arm("framework", framework_in, framework_out, _inputs("framework"), ArmResult("framework")),
    ]
    # Same partition counts in both arms: the registry's.
    await ensure_topics(
        settings,
        [spec_for(ImageIngested), spec_for(ImageAccepted)],
        extra=[(raw_in, spec_for(ImageIngested).partitions), (raw_out, spec_for(ImageAccepted).partitions)],
    )
    return arms


async def _start_hops(settings: Any, arms: list[_Arm], batch: int) -> None:
    """Both hop processes started, then a reader on each arm's output."""
    started = await asyncio.gather(*(_spawn_hop(a.name, settings, batch) for a in arms), return_exceptions=True)
    for arm, process in zip(arms, started, strict=True):
        if not isinstance(process, BaseException):
            arm.process = process
    for process in started:
        if isinstance(process, BaseException):
            raise process
    for arm in arms:
        arm.reader = _Reader(settings, arm.sink, READER_FETCH_WAIT_MS)
        await arm.reader.start()


async def _latency(
    settings: Any, arms: list[_Arm], producer: Any, timed: int, progress: Progress, tasks: dict[str, TaskID]
) -> None:
    """Closed-loop round trips, the arms in turn; each arm's latencies after the warm-up."""
    # Latency: the arms take turns, one event in flight; a random pause before each puts
    # the input at a random point of the hop's fetch cycle (back to back, the loop would
    # lock onto one phase of it and measure the same wait every time).
    rng = random.Random(7)
    for n in range(WARMUP_EVENTS + timed):
        for arm in arms:
            await asyncio.sleep(rng.uniform(0, settings.fetch_max_wait_ms / 1000))
            # the first event waits for the consumer group's join (about a second on Tansu)
            latency = await _round_trip(arm, producer, timeout=60 if n == 0 else 30)
            if n >= WARMUP_EVENTS:
                arm.result.latencies_ms.append(latency)
            progress.advance(tasks[arm.name])


async def _throughput(
    settings: Any, arms: list[_Arm], producer: Any, events: int, rounds: int, progress: Progress,
    tasks: dict[str, TaskID], meter: _CpuMeter,
) -> None:
    """Backlog rounds per arm, the arms in alternating order; each round's events/s."""
    # Throughput: rounds of a backlog per arm, the arms in turn (in alternating order), so a
    # busy moment of a shared machine falls on both; readers poll at the service default.
    for arm in arms:
        assert arm.reader is not None
        await arm.reader.stop()
        arm.reader = _Reader(settings, arm.sink, settings.fetch_max_wait_ms)
        await arm.reader.start()
    for r in range(rounds):
        for arm in arms if r % 2 == 0 else arms[::-1]:
            rate = await _backlog(arm, producer, events, progress, tasks[arm.name], meter)
            arm.result.rounds_events_per_s.append(rate)


async def _stop_arms(settings: Any, arms: list[_Arm], producer: Any) -> None:
    """Both hops stopped (their counters kept), the readers and the producer too; the bench's schemas dropped."""
    for arm in arms:
        if arm.process is not None:
            arm.result.counters = await _stop_hop(arm.process)
        if arm.reader is not None:
            await arm.reader.stop()
    await producer.stop()
    await _drop_schemas(settings)


async def _bench(
    settings: Any, events: int, rounds: int, progress: Progress, meter: _CpuMeter, batch: int = 1
) -> dict[str, ArmResult]:
    from aiokafka import AIOKafkaProducer

    from visionloop.libs.kafka import client_kwargs

    arms = await _arms(settings)
    timed = min(events, LATENCY_EVENTS_MAX)
    latency_tasks = {
        a.name: progress.add_task(f"{a.name}: hop latency", total=WARMUP_EVENTS + timed) for a in arms
    }
    throughput_tasks = {
        a.name: progress.add_task(f"{a.name}: throughput", total=rounds * events) for a in arms
    }
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", enable_idempotence=False)  # type: ignore[arg-type]
    await producer.start()
    try:
        await _start_hops(settings, arms, batch)
        await _latency(settings, arms, producer, timed, progress, latency_tasks)
        await _throughput(settings, arms, producer, events, rounds, progress, throughput_tasks, meter)
    finally:
        await _stop_arms(settings, arms, producer)
    return {a.name: a.result for a in arms}


async def _drop_schemas(settings: Any) -> None:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", settings.schema_prefix
        )
        for row in rows:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    finally:
        await conn.close()


def _bench_settings(state: Path, bootstrap: str, database_url: str, tag: str) -> Any:
    """Settings for one run: the embedded broker and PostgreSQL, topics and schemas of its own."""
    from visionloop.libs.settings import Settings

    return Settings(
        state_dir=state,
        kafka_bootstrap=bootstrap,
        kafka_embedded=True,
        database_url=database_url,
        topic_prefix=f"bench{tag}.",
        schema_prefix=f"bench{tag}_",
        instance=f"bench-{tag}",
    )


def _result(
    arms: dict[str, ArmResult], settings: Any, *, events: int, rounds: int, batch: int, door: bool
) -> dict[str, Any]:
    """The figures of both arms and the machine, as `run_bus_bench` returns them (without the plot)."""
    framework, raw = arms["framework"], arms["raw"]
    return {
        "benchmark": "bus",
        "events": events,
        "rounds": rounds,
        "batch": batch,
        "door": door,
        "events_per_s": round(framework.events_per_s, 1),
        "raw_events_per_s": round(raw.events_per_s, 1),
        "ratio_vs_raw": round(raw.events_per_s / framework.events_per_s, 3),
        "hop_p50_ms": round(framework.percentile(50), 3),
        "hop_p99_ms": round(framework.percentile(99), 3),
        "raw_hop_p50_ms": round(raw.percentile(50), 3),
        "raw_hop_p99_ms": round(raw.percentile(99), 3),
        "latency_samples": len(framework.latencies_ms),
        "rounds_events_per_s": [round(x, 1) for x in framework.rounds_events_per_s],
        "raw_rounds_events_per_s": [round(x, 1) for x in raw.rounds_events_per_s],
        "cpu_ms_per_event": {arm: {part: arms[arm].cpu_ms(part) for part in PARTS} for arm in ("framework", "raw")},
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "framework_counters": framework.counters,
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def run_bus_bench(
    events: int = 2000, console: Console | None = None, *, rounds: int = ROUNDS, batch: int = 1, door: bool = False,
    plot_dir: Path = PLOTS,
) -> dict[str, Any]:
    """Measure the framework hop against raw aiokafka on a fresh embedded stack; return the numbers.

    `events` inputs per backlog round (`rounds` rounds per arm) and as many closed-loop round
    trips for latency (at most LATENCY_EVENTS_MAX). Starts and stops its own broker and
    PostgreSQL (data under `.visionloop/bench/` of the current folder) and writes the latency
    plot to `.visionloop/bench/bus_latency.png` there (`plot_dir`). The module docstring defines each figure.
    """
    from visionloop.libs.embedded import EmbeddedBroker, EmbeddedPostgres

    if events < 1 or rounds < 1 or batch < 1:
        raise ValueError("events, rounds and batch must be at least 1")
    console = console or Console(stderr=True)
    state = (Path.cwd() / STATE).resolve()
    broker = EmbeddedBroker(state / "logs" / "broker.log", door=door)  # door: through the rotation's relay
    postgres = EmbeddedPostgres(state / "postgres")
    tag = uuid.uuid4().hex[:8]
    try:
        with console.status("starting the embedded broker and PostgreSQL"):
            database_url = postgres.start()
            bootstrap = broker.start()
        settings = _bench_settings(state, bootstrap, database_url, tag)
        columns = (TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            meter = _CpuMeter(broker.process.pid, postgres.data_dir)  # type: ignore[union-attr]
            arms = asyncio.run(_bench(settings, events, rounds, progress, meter, batch))
    finally:
        with console.status("stopping the embedded broker and PostgreSQL"):
            broker.close()
            postgres.stop()

    result = _result(arms, settings, events=events, rounds=rounds, batch=batch, door=door)
    plot = plot_dir / f"{PLOT.stem}{f'-batch{batch}' if batch > 1 else ''}{'-door' if door else ''}{PLOT.suffix}"
    result["plot"] = str(_plot(arms, (Path.cwd() / plot).resolve()))
    console.print(_table(result, arms))
    console.print(f"latency plot: {result['plot']}")
    return result
