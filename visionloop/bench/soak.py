"""Soak benchmark: the whole loop under sustained submissions, watched for memory growth, consumer
lag and database growth.

Method:

- **Stack**: the embedded broker and PostgreSQL (its own data folder) in a run folder under
  `.visionloop/bench/soak/`; every service under the `Supervisor`, each its own OS process
  (`visionloop run NAME`, as in production), with the production defaults (heartbeats every 5 s,
  INFO logs, written to the run folder). HTTP services listen on free ports.
- **Load**: an upstream publisher sends `image submitted` events (inline bytes) on the submit
  topic at `rate` per second for `minutes`, on a fixed schedule (item i at t0 + i / rate). Items
  come from the demo's `World` (visionloop/demo/world.py) with the demo's mix: 5 % exact and 5 %
  near duplicates, 3 % below the resolution floor, 3 % corrupt (truncated JPEGs or random bytes),
  the rest fresh 320x240 scenes. A new World every `CHUNK` items keeps the publisher's memory flat
  (a duplicate copies an earlier scene of its chunk). The model library is empty, so the
  recognizer finds every accepted image unrecognised and the gateway queues a labelling task for
  it (nobody labels them: tasks pile up, as they would on a night without labellers).
- **Samples**, every `sample_s` seconds: the RSS of each service's process plus its children
  (psutil; the trainer trains in a child), the RSS of the broker and the PSS of PostgreSQL
  (postmaster and backends; PSS counts shared buffers once), the lag of every consumer group of
  the services (end offsets minus committed offsets, summed over the partitions, as `visionloop
  status` computes it), `pg_database_size` and the size of every schema's inbox and outbox.
- **Growth per hour**: the least-squares slope of a series over time, fitted on the samples
  between the end of the warm-up (`warmup_s`, default a fifth of the run and at most 120 s:
  imports, first allocations, caches and pools filling) and the last submission. Warm-up and
  drain samples are left out of the fit (they are in the plot).
- **Drain**: after the last submission, sampling goes on until every submission has its final
  decision (`image accepted` or `image rejected`) and the image topics' lag is zero, or `drain_s`.
- **held**: every submission decided by the end of the drain, and the total lag's slope over the
  fit window below a tenth of the rate (lag that grows without bound grows at the rate the loop
  falls behind).
- **CPU**: seconds used by the services, the broker, PostgreSQL and this process, and by
  everything else on the machine (others' work on a shared machine), from /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionloop.bench import machine
from visionloop.bench.soakreader import FOLLOWER_GROUP, follow, followed_topics

STATE = Path(".visionloop") / "bench" / "soak"
MINUTES = 10.0
RATE_PER_S = 8.0
"""The default rate: one the reference machine (2 vCPUs) holds with all ten services (docs/benchmarks.md)."""
SAMPLE_S = 5.0
MAX_WARMUP_S = 120.0
DRAIN_S = 180.0
CHUNK = 300
"""Items per World: each World remembers its scenes (the duplicates' originals)."""
PROJECT = "soak"
SOURCE = "soak-upstream"
MIX = {"exact_dup_rate": 0.05, "near_dup_rate": 0.05, "low_res_rate": 0.03, "corrupt_rate": 0.03}
"""The demo's mix (visionloop/demo/scenario.py `DemoConfig`)."""
MB = 1024 * 1024
"""Sizes are reported in MB of 2^20 bytes."""
HTTP_PORTS = ("ingest", "labeling_gateway", "distributor")
"""Sections whose HTTP port is set to 0 (free) for the run: never collide with another stack."""


@dataclass
class Sample:
    """What the sampler saw at one moment (`t`: seconds since the first submission)."""

    t: float
    rss: dict[str, int]
    infra: dict[str, int]
    lag: dict[str, int]
    db_bytes: int
    inbox_bytes: int
    outbox_bytes: int
    inbox_rows: int
    submitted: int
    decided: int


@dataclass
class _Tally:
    submitted: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    decisions: dict[str, str] = field(default_factory=dict)
    downstream: Counter[str] = field(default_factory=Counter)
    send_errors: int = 0
    seen: set[str] = field(default_factory=set)


def slope_per_h(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour; 0 with fewer than 3 points."""
    if len(ts) < 3:
        return 0.0
    return float(np.polyfit(np.asarray(ts, dtype=float), np.asarray(ys, dtype=float), 1)[0]) * 3600.0


def tree(pid: int | None) -> list[psutil.Process]:
    """The process and its children (all generations); none when it is gone."""
    if pid is None:
        return []
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def rss_of(procs: list[psutil.Process], *, pss: bool = False) -> int:
    """Summed RSS (or PSS) of the processes still alive."""
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss if pss else proc.memory_info().rss
    return total


class _CpuMeter:
    """CPU seconds by category, from each process's own counters (a process seen once keeps its last figure)."""

    def __init__(self) -> None:
        self.first: dict[tuple[str, int], float] = {}
        self.last: dict[tuple[str, int], float] = {}
        self.machine_first = self.machine_last = self._machine()

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def observe(self, category: str, procs: list[psutil.Process]) -> None:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                key = (category, proc.pid)
                self.first.setdefault(key, t.user + t.system)
                self.last[key] = t.user + t.system

    def tick(self) -> None:
        self.machine_last = self._machine()

    def report(self) -> dict[str, float]:
        used: Counter[str] = Counter()
        for key, value in self.last.items():
            used[key[0]] += value - self.first[key]
        machine_s = self.machine_last - self.machine_first
        out = {k: round(v, 1) for k, v in sorted(used.items())}
        out["other"] = round(max(machine_s - sum(used.values()), 0.0), 1)
        out["machine"] = round(machine_s, 1)
        return out


class LagProbe:
    """Lag per consumer group on one broker, read with two long-lived clients (cheap enough to sample)."""

    def __init__(self, settings: Any, pairs: list[tuple[str, str]]) -> None:
        self.settings = settings
        self.pairs = pairs
        self._tps: list[Any] = []

    async def start(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        from visionloop.libs.kafka import client_kwargs

        self.reader = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)  # type: ignore[arg-type]
        self.admin = AIOKafkaAdminClient(**client_kwargs(self.settings))  # type: ignore[arg-type]
        await self.reader.start()
        await self.admin.start()

    async def stop(self) -> None:
        await self.reader.stop()
        await self.admin.close()

    async def read(self) -> dict[str, int]:
        """Messages not yet handled and committed, per group (summed over its partitions)."""
        from aiokafka import TopicPartition

        if not self._tps or len({tp.topic for tp in self._tps}) < len({t for t, _ in self.pairs}):
            existing = await self.reader.topics()  # refreshes the metadata: topics created since are seen
            self._tps = [TopicPartition(t, p) for t in sorted({t for t, _ in self.pairs} & existing)
                         for p in sorted(self.reader.partitions_for_topic(t) or ())]
        ends = await self.reader.end_offsets(self._tps) if self._tps else {}
        lags: dict[str, int] = {}
        for topic, group in self.pairs:
            # Explicit partitions: Tansu does not answer an offset fetch for "all topics".
            committed = await self.admin.list_consumer_group_offsets(group, partitions=[tp for tp in self._tps if tp.topic == topic])
            lag = 0
            for tp, end in ends.items():
                if tp.topic == topic:
                    meta = committed.get(tp)
                    lag += max(end - (meta.offset if meta is not None and meta.offset >= 0 else 0), 0)
            lags[group] = lag
        return lags


def _groups(settings: Any, names: list[str]) -> list[tuple[str, str]]:
    """(topic, consumer group) of every handler of the services, as `visionloop status` lists them."""
    from visionloop import services as registry
    from visionloop.app import build_runtime
    from visionloop.libs.blob import LocalBlobStore
    from visionloop.libs.service import Adapters

    adapters = Adapters(blobs=LocalBlobStore(settings.state_dir / "blobs"))
    pairs: list[tuple[str, str]] = []
    for name in names:
        runtime, _ = build_runtime(registry.get(name), settings, None, adapters)
        pairs += runtime.subscriptions
    return pairs


def _items(seed: int, count: int) -> list[Any]:
    """`count` upstream items in the demo's mix, from a fresh World."""
    from visionloop.demo.world import World

    return World(seed).stream(count, **MIX)


async def _publish(settings: Any, rate: float, seconds: float, tally: _Tally, started: asyncio.Event, t0: list[float]) -> None:
    """Send items on the submit topic at `rate` per second for `seconds`, on a fixed schedule."""
    from aiokafka import AIOKafkaProducer

    from visionloop.contracts import Envelope, ImageSubmitted
    from visionloop.contracts.topics import spec_for
    from visionloop.demo.world import submission
    from visionloop.libs.kafka import client_kwargs, ensure_topics

    spec = spec_for(ImageSubmitted)
    topic = settings.topic(spec.name)
    await ensure_topics(settings, [spec])
    total = int(round(rate * seconds))
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=0)  # type: ignore[arg-type]
    await producer.start()
    pending: set[asyncio.Future[Any]] = set()

    def done(fut: asyncio.Future[Any]) -> None:
        pending.discard(fut)
        if fut.cancelled() or fut.exception() is not None:
            tally.send_errors += 1

    try:
        chunk, n = 0, 0
        ahead = asyncio.ensure_future(asyncio.to_thread(_items, chunk, min(CHUNK, total)))
        await asyncio.wait([ahead])  # the clock starts with the first chunk ready
        t0.append(time.monotonic())
        started.set()
        while n < total:
            items = await ahead
            chunk += 1
            if n + len(items) < total:  # render the next chunk while this one is sent
                ahead = asyncio.ensure_future(asyncio.to_thread(_items, chunk, min(CHUNK, total - n - len(items))))
            for item in items:
                wait = t0[0] + n / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                envelope = Envelope.of(submission(item, PROJECT, source=SOURCE), producer=SOURCE, project=PROJECT)
                fut = await producer.send(topic, envelope.model_dump_json().encode(), key=spec.key_of(envelope).encode())
                pending.add(fut)
                fut.add_done_callback(done)
                tally.submitted += 1
                tally.kinds[str(item.kind)] += 1
                n += 1
        if pending:
            await asyncio.wait(pending, timeout=30)
    finally:
        await producer.stop()


_DB_QUERY = """
SELECT pg_database_size(current_database()) AS db,
       coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'inbox'), 0) AS inbox,
       coalesce(sum(pg_total_relation_size(c.oid)) FILTER (WHERE c.relname = 'outbox'), 0) AS outbox,
       coalesce((SELECT sum(n_live_tup) FROM pg_stat_user_tables WHERE relname = 'inbox'), 0) AS inbox_rows
FROM pg_class c WHERE c.relkind = 'r' AND c.relname IN ('inbox', 'outbox')
"""


def _broker_pid(stack: Any) -> int | None:
    """The embedded broker's pid now (it changes when the broker is rotated)."""
    return stack.broker.process.pid if stack.broker is not None and stack.broker.process is not None else None


def _postmaster(data_dir: Path | None) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((data_dir / "postmaster.pid").read_text().split()[0]) if data_dir else None  # type: ignore[operator]
    return None


async def _soak(settings: Any, stack: Any, names: list[str], *, rate: float, seconds: float, sample_s: float,
                drain_s: float, console: Console) -> dict[str, Any]:
    import asyncpg

    from visionloop.supervisor import Supervisor

    supervisor = Supervisor(settings, names)
    async with contextlib.AsyncExitStack() as cleanup:
        began = time.monotonic()
        cleanup.push_async_callback(_stop_services, supervisor, console)
        with console.status(f"starting {len(names)} services as processes"):
            await supervisor.start(timeout_s=300)
        console.print(f"{len(names)} services serving after {time.monotonic() - began:.1f} s")
        from visionloop.app import consumer_groups, rotate_embedded_broker

        follower = [(topic, FOLLOWER_GROUP) for topic in followed_topics(settings)]
        rotate_embedded_broker(stack, settings, names, groups=consumer_groups(settings, names) + follower)  # as `up` does
        probe = LagProbe(settings, _groups(settings, names))
        await probe.start()
        cleanup.push_async_callback(probe.stop)
        db = await asyncpg.connect(settings.database_url)
        cleanup.push_async_callback(db.close)
        tally = _Tally()
        following = asyncio.create_task(follow(settings, lambda: _broker_pid(stack), tally, PROJECT))
        cleanup.push_async_callback(_cancel, following)
        result = await _watch(settings, stack, supervisor, probe, db, tally, following, names,
                              rate=rate, seconds=seconds, sample_s=sample_s, drain_s=drain_s, console=console)
    return result


async def _stop_services(supervisor: Any, console: Console) -> None:
    with console.status("stopping services"):
        await supervisor.stop()


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _sample(names: list[str], supervisor: Any, stack: Any, postmaster: int | None, me: psutil.Process, cpu: _CpuMeter,
                  probe: LagProbe, db: Any, tally: _Tally, t0: list[float]) -> Sample:
    """One sample: each process tree's memory (its CPU noted in `cpu`), the lag, the database's sizes."""
    rss = {}
    for name in names:
        procs = tree(supervisor.pid(name))
        rss[name] = rss_of(procs)
        cpu.observe("services", procs)
    broker, postgres = tree(_broker_pid(stack)), tree(postmaster)
    cpu.observe("broker", broker)
    cpu.observe("postgres", postgres)
    cpu.observe("bench", [me])
    cpu.tick()
    lag = await probe.read()
    row = await db.fetchrow(_DB_QUERY)
    assert row is not None
    return Sample(t=round(time.monotonic() - t0[0], 2), rss=rss, infra={"broker": rss_of(broker), "postgres": rss_of(postgres, pss=True)},
                  lag=lag, db_bytes=int(row["db"]), inbox_bytes=int(row["inbox"]), outbox_bytes=int(row["outbox"]),
                  inbox_rows=int(row["inbox_rows"]), submitted=tally.submitted, decided=len(tally.decisions))


async def _watch(settings: Any, stack: Any, supervisor: Any, probe: LagProbe, db: Any, tally: _Tally, following: asyncio.Task[None],
                 names: list[str], *, rate: float, seconds: float, sample_s: float, drain_s: float, console: Console) -> dict[str, Any]:
    """Submit at `rate` for `seconds` while sampling every `sample_s`; then drain; the samples and tallies."""
    samples: list[Sample] = []
    cpu = _CpuMeter()
    postmaster = _postmaster(stack.postgres.data_dir if stack.postgres is not None else None)
    me = psutil.Process()
    started, t0 = asyncio.Event(), []  # type: ignore[var-annotated]
    sample = lambda: _sample(names, supervisor, stack, postmaster, me, cpu, probe, db, tally, t0)
    image_groups = {g for t, g in probe.pairs if ".image." in t}
    progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=20), TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
    publishing = asyncio.create_task(_publish(settings, rate, seconds, tally, started, t0))
    try:
        drain_started = await _sample_until_drained(sample, samples, progress, image_groups, publishing, following, tally, started, t0,
                                                    rate=rate, seconds=seconds, sample_s=sample_s, drain_s=drain_s)
    finally:
        await _cancel(publishing)
    return {"samples": samples, "tally": tally, "drain_s": time.monotonic() - drain_started, "cpu_s": cpu.report(),
            "restarts": dict(supervisor.restarts), "submit_seconds": seconds, "groups": probe.pairs}


async def _sample_until_drained(sample: Any, samples: list[Sample], progress: Progress, image_groups: set[str], publishing: asyncio.Task[None],
                                following: asyncio.Task[None], tally: _Tally, started: asyncio.Event, t0: list[float], *,
                                rate: float, seconds: float, sample_s: float, drain_s: float) -> float:
    """Sample every `sample_s` while `publishing` sends, then each second until all is decided or `drain_s` passed; the drain's start."""
    with progress:
        run = progress.add_task(f"soak {rate:g}/s", total=seconds, info="")
        await started.wait()
        drain_started: float | None = None
        drain_task = None
        while True:
            if following.done():
                following.result()  # the decision reader failed: say why
            s = await sample()
            samples.append(s)
            info = (f"sent {s.submitted:,} decided {s.decided:,} lag {sum(s.lag.values()):,} "
                    f"rss {sum(s.rss.values()) / MB:,.0f} MB db {s.db_bytes / MB:,.0f} MB")
            if drain_started is None:
                progress.update(run, completed=min(s.t, seconds), info=info)
                if publishing.done():
                    publishing.result()
                    progress.update(run, completed=seconds)
                    drain_started = time.monotonic()
                    drain_task = progress.add_task("drain", total=tally.submitted, info="")
            else:
                progress.update(drain_task, completed=s.decided, info=info)  # type: ignore[arg-type]
                finished = s.decided >= tally.submitted and all(s.lag.get(g, 0) == 0 for g in image_groups)
                if finished or time.monotonic() - drain_started > drain_s:
                    return drain_started
            next_at = t0[0] + len(samples) * sample_s
            await asyncio.sleep(max(0.0, next_at - time.monotonic()) if drain_started is None else 1.0)


@contextlib.contextmanager
def _free_http_ports() -> Any:
    """HTTP services on free ports for the run (the supervisor keeps each one across restarts)."""
    saved = {k: os.environ.get(k) for k in (f"VL_{s.upper()}_PORT" for s in HTTP_PORTS)}
    os.environ.update({k: "0" for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def summarise(run: dict[str, Any], *, minutes: float, rate: float, warmup_s: float, sample_s: float) -> dict[str, Any]:
    """The figures of a run from its samples (see the module docstring)."""
    samples: list[Sample] = run["samples"]
    tally: _Tally = run["tally"]
    end = run["submit_seconds"]
    fit = [s for s in samples if warmup_s <= s.t <= end + sample_s / 2]
    ts = [s.t for s in fit]
    names = list(samples[0].rss)
    groups = list(samples[0].lag)
    total_lag = [sum(s.lag.values()) for s in samples]
    lag_slope_per_s = slope_per_h(ts, [sum(s.lag.values()) for s in fit]) / 3600
    decided = len(tally.decisions)
    outcomes = Counter(tally.decisions.values())
    return {
        "minutes": minutes,
        "rate_per_s": rate,
        "submitted": tally.submitted,
        "decided": decided,
        "undecided": tally.submitted - decided,
        "rss_growth_mb_per_h": {n: round(slope_per_h(ts, [s.rss[n] / MB for s in fit]), 1) for n in names},
        "max_lag": max(total_lag),
        "max_lag_by_group": {g: max(s.lag[g] for s in samples) for g in groups},
        "db_growth_mb_per_h": round(slope_per_h(ts, [s.db_bytes / MB for s in fit]), 1),
        "inbox_growth_mb_per_h": round(slope_per_h(ts, [s.inbox_bytes / MB for s in fit]), 1),
        "outbox_growth_mb_per_h": round(slope_per_h(ts, [s.outbox_bytes / MB for s in fit]), 1),
        "inbox_rows_per_h": round(slope_per_h(ts, [s.inbox_rows for s in fit])),
        "infra_rss_growth_mb_per_h": {k: round(slope_per_h(ts, [s.infra[k] / MB for s in fit]), 1) for k in samples[0].infra},
        "rss_mb_start": {n: round(fit[0].rss[n] / MB, 1) for n in names} if fit else {},
        "rss_mb_end": {n: round(fit[-1].rss[n] / MB, 1) for n in names} if fit else {},
        "db_mb_start": round(fit[0].db_bytes / MB, 1) if fit else None,
        "db_mb_end": round(samples[-1].db_bytes / MB, 1),
        "lag_growth_per_min": round(lag_slope_per_s * 60, 1),
        "held": decided == tally.submitted and lag_slope_per_s < rate / 10,
        "warmup_s": round(warmup_s, 1),
        "sample_s": sample_s,
        "fit_samples": len(fit),
        "drain_s": round(run["drain_s"], 1),
        "outcomes": dict(sorted(outcomes.items())),
        "kinds_submitted": dict(sorted(tally.kinds.items())),
        "downstream": dict(sorted(tally.downstream.items())),
        "send_errors": tally.send_errors,
        "restarts": run["restarts"],
        "cpu_s": run["cpu_s"],
    }


def _plot(samples: list[Sample], result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = np.array([s.t / 60 for s in samples])
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True, height_ratios=[3, 2, 2, 2])
    warm, end = result["warmup_s"] / 60, result["minutes"]
    for ax in axes:
        ax.axvspan(minutes.min(), warm, color="#eee", label="warm-up (not fitted)")
        ax.axvline(end, color="#888", linestyle="--", linewidth=1, label="last submission")
    ax = axes[0]
    base = next((s for s in samples if s.t >= result["warmup_s"]), samples[0])
    for name in samples[0].rss:
        ax.plot(minutes, [(s.rss[name] - base.rss[name]) / MB for s in samples],
                label=f"{name}: {base.rss[name] / MB:,.0f} MB, {result['rss_growth_mb_per_h'][name]:+.1f} MB/h")
    ax.set_ylabel("RSS change since warm-up, MB\n(process + children)")
    ax.set_title(f"visionloop bench soak: {result['rate_per_s']:g} images/s for {result['minutes']:g} min "
                 f"({result['submitted']:,} submitted, {result['decided']:,} decided)")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax = axes[1]
    for name in samples[0].infra:
        ax.plot(minutes, [s.infra[name] / MB for s in samples],
                label=f"{name} ({'PSS' if name == 'postgres' else 'RSS'}, {result['infra_rss_growth_mb_per_h'][name]:+.1f} MB/h)")
    ax.set_ylabel("MB")
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[2]
    total = [sum(s.lag.values()) for s in samples]
    ax.plot(minutes, total, color="k", linewidth=1.5, label=f"total (max {result['max_lag']:,})")
    top = sorted(result["max_lag_by_group"], key=result["max_lag_by_group"].get, reverse=True)[:6]
    for group in top:
        if result["max_lag_by_group"][group] > 0:
            ax.plot(minutes, [s.lag[group] for s in samples], linewidth=1, label=f"{group} (max {result['max_lag_by_group'][group]:,})")
    ax.set_ylabel("consumer lag (messages)")
    ax.legend(fontsize=7, loc="upper left")
    ax = axes[3]
    ax.plot(minutes, [s.db_bytes / MB for s in samples], label=f"database ({result['db_growth_mb_per_h']:+.1f} MB/h)")
    ax.plot(minutes, [s.inbox_bytes / MB for s in samples], label=f"inbox tables ({result['inbox_growth_mb_per_h']:+.1f} MB/h)")
    ax.plot(minutes, [s.outbox_bytes / MB for s in samples], label=f"outbox tables ({result['outbox_growth_mb_per_h']:+.1f} MB/h)")
    ax.set_ylabel("PostgreSQL MB")
    ax.set_xlabel("minutes since the first submission")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replot(folder: Path, path: Path | None = None) -> Path:
    """Draw a finished run's plot again from its `samples.json` and `result.json`."""
    samples = [Sample(**s) for s in json.loads((folder / "samples.json").read_text())]
    path = path or folder / "soak.png"
    _plot(samples, json.loads((folder / "result.json").read_text()), path)
    return path


def run_soak_bench(*, minutes: float = MINUTES, rate: float = RATE_PER_S, services: list[str] | None = None,
                   sample_s: float = SAMPLE_S, warmup_s: float | None = None, drain_s: float = DRAIN_S,
                   state: Path = STATE, console: Console | None = None) -> dict[str, Any]:
    """Run the soak (see the module docstring); print a table; return the figures."""
    from visionloop import services as registry
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    console = console or Console(stderr=True)
    names = services or list(registry.available())
    for name in names:
        registry.get(name)  # an unknown name fails before anything starts
    seconds = minutes * 60
    warmup_s = min(MAX_WARMUP_S, seconds / 5) if warmup_s is None else warmup_s
    folder = (state / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    stack = EmbeddedStack(Settings(state_dir=folder))
    with console.status("starting the embedded broker and PostgreSQL"):
        settings = stack.start(door=stack.settings.embedded_broker_max_mb > 0)
    try:
        with _free_http_ports():
            run = asyncio.run(_soak(settings, stack, names, rate=rate, seconds=seconds, sample_s=sample_s, drain_s=drain_s, console=console))
    finally:
        watched = stack.watched()
        with console.status("stopping the embedded broker and PostgreSQL"):
            stack.stop()
    result = {"machine": machine(), "services": names} | summarise(run, minutes=minutes, rate=rate, warmup_s=warmup_s, sample_s=sample_s)
    broker = watched.get("broker", {})
    result["broker_limit_mb"] = settings.embedded_broker_max_mb
    result["broker_rotations"] = broker.get("rotation_history", [])
    result["broker_max_rss_mb"] = round(max((s.infra["broker"] for s in run["samples"]), default=0) / MB, 1)
    result["unplanned_restarts"] = {name: w["restarts"] for name, w in watched.items()}
    result["load_average_before"] = [round(x, 2) for x in load_before]
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    plot = folder / "soak.png"
    _plot(run["samples"], result, plot)
    result["plot"] = str(plot)
    result["folder"] = str(folder)
    (folder / "samples.json").write_text(json.dumps([s.__dict__ for s in run["samples"]]))
    (folder / "result.json").write_text(json.dumps(result, indent=2))
    _table(result, console)
    return result


def _table(result: dict[str, Any], console: Console) -> None:
    table = Table(title=f"visionloop bench soak: {result['rate_per_s']:g} images/s for {result['minutes']:g} min "
                        f"(growth fitted after a {result['warmup_s']:g} s warm-up)")
    table.add_column("process")
    table.add_column("RSS start -> end, MB", justify="right")
    table.add_column("growth, MB/h", justify="right")
    table.add_column("max lag of its groups", justify="right")
    for name, growth in result["rss_growth_mb_per_h"].items():
        group_lag = max((v for g, v in result["max_lag_by_group"].items() if g.startswith(f"{name}.") or f".{name}." in g), default=0)
        table.add_row(name, f"{result['rss_mb_start'].get(name, 0):,.1f} -> {result['rss_mb_end'].get(name, 0):,.1f}", f"{growth:+.1f}", f"{group_lag:,}")
    for name, growth in result["infra_rss_growth_mb_per_h"].items():
        table.add_row(f"[dim]{name}[/]", "", f"{growth:+.1f}", "")
    console.print(table)
    console.print(
        f"submitted {result['submitted']:,}, decided {result['decided']:,} (drain {result['drain_s']:g} s); "
        f"max total lag {result['max_lag']:,} (growth {result['lag_growth_per_min']:+g}/min); "
        f"database {result['db_mb_start']} -> {result['db_mb_end']} MB ({result['db_growth_mb_per_h']:+g} MB/h, "
        f"inbox {result['inbox_growth_mb_per_h']:+g} MB/h); held: {result['held']}"
    )
    console.print(f"plot: {result['plot']}")
