"""Labelling gateway benchmark: how fast people can be served tasks and have answers taken.

The gateway runs as its own process (`visionloop run labeling-gateway`) on the embedded broker
and PostgreSQL, exactly as deployed. The queue is filled with `tasks` annotate tasks through the
real topic (`image unrecognized` events, as the recognizer would emit them). Then `labellers`
simulated people, each with their own API token and HTTP connection, loop over real HTTP:
`POST .../tasks/next`, then `POST .../tasks/{id}/submit` with one to three boxes, until the
queue answers 204. People take no time to think: this is the gateway's ceiling, not a human's.

Measured:
- **round trips per second**: answered tasks (next + submit) per second of the drain;
- **next-task latency** p50 / p99 (the leasing query with `FOR UPDATE SKIP LOCKED` under
  contention), and submit latency p50 / p99 (validation, submission row, outbox row, publish);
- **double assignments**: leases handed out for a task that someone else already held (must
  be 0), and **lost tasks**: tasks of the queue never answered, or answered without a `label
  submitted` event on the topic (must be 0).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from visionloop.bench import PLOTS, machine

PLOT = PLOTS / "gateway.png"
PROJECT = "bench"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(settings: Any, count: int, progress: Progress) -> None:
    """Fill the queue through the topic the recognizer writes."""
    from aiokafka import AIOKafkaProducer

    from visionloop.contracts import (
        Envelope,
        ImageRef,
        ImageSource,
        ImageUnrecognized,
        UnrecognizedReason,
        topic_of,
    )
    from visionloop.libs.kafka import client_kwargs, ensure_named

    await ensure_named(settings, [topic_of(ImageUnrecognized, settings.topic_prefix)])
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=5)
    await producer.start()
    rng = random.Random(1)
    step = progress.add_task("filling the queue (image unrecognized events)", total=count)
    try:
        sends = []
        for n in range(count):
            sha = uuid.uuid4().hex * 2
            event = ImageUnrecognized(
                image=ImageRef(image_id=sha, blob_uri=f"file:///bench/{sha}", width=1280, height=720, format="JPEG", byte_size=150_000),
                source=ImageSource(), reason=UnrecognizedReason.NO_MODEL, message="no model", uncertainty=rng.random(),
            )
            envelope = Envelope.of(event, producer="bench", project=PROJECT, correlation_id=sha)
            sends.append(await producer.send(topic_of(ImageUnrecognized, settings.topic_prefix), envelope.model_dump_json().encode(), key=sha.encode()))
            progress.advance(step)
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def _count(pool: Any, schema: str, where: str) -> int:
    return int(await pool.fetchval(f'SELECT count(*) FROM "{schema}".tasks WHERE {where}'))


async def _wait_created(pool: Any, schema: str, tasks: int, total: int, progress: Progress) -> None:
    """Wait until the gateway has made a task of every event (at most 300 s)."""
    waiting = progress.add_task("gateway: tasks created from the events", total=total)
    deadline = time.monotonic() + 300
    while (created := await _count(pool, schema, "project = 'bench'")) < total:
        progress.update(waiting, completed=created)
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {created} of {tasks} tasks were created within 300 s")
        await asyncio.sleep(0.2)
    progress.update(waiting, completed=total)


@dataclass
class _Drain:
    """What the labellers share while they drain the queue: the leases handed out, the answers, the timings."""

    base_url: str
    total: int
    progress: Progress
    drain: TaskID
    warmed: asyncio.Barrier
    holders: dict[str, str] = field(default_factory=dict)
    """Task -> lease it is held under now."""
    double: int = 0
    handed: list[str] = field(default_factory=list)
    answered: dict[str, str] = field(default_factory=dict)
    """Submission -> task."""
    next_ms: list[float] = field(default_factory=list)
    submit_ms: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    start: float = 0.0

    async def labeller(self, n: int, token: str) -> None:
        """One person: next task, then submit one to three boxes, until the queue answers 204 (the first round trip unmeasured)."""
        import httpx

        # The shared state as locals: the timed lines below do what the closure they come from did.
        holders, handed, answered = self.holders, self.handed, self.answered
        next_ms, submit_ms, done_at = self.next_ms, self.submit_ms, self.done_at
        rng = random.Random(n)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {token}"}, timeout=60, limits=limits) as http:
            for round_trip in range(self.total + 1):
                if round_trip == 1:
                    # Everyone has a connection, a checked token and one answer behind them: measure from here.
                    if await self.warmed.wait() == 0:
                        self.start = time.perf_counter()
                    await asyncio.sleep(0)
                measured = round_trip > 0
                t0 = time.perf_counter()
                got = await http.post(f"/v1/projects/{PROJECT}/tasks/next")
                if measured:
                    next_ms.append((time.perf_counter() - t0) * 1000)
                if got.status_code == 204:
                    return
                got.raise_for_status()
                task = got.json()
                task_id, lease = task["task_id"], task["lease"]["lease_id"]
                if task_id in holders and holders[task_id] != lease:
                    self.double += 1
                holders[task_id] = lease
                handed.append(task_id)
                boxes = []
                for _ in range(rng.randint(1, 3)):
                    x, y = rng.uniform(0, 1200), rng.uniform(0, 650)
                    boxes.append({"class_name": rng.choice(["car", "person", "bicycle"]), "x1": x, "y1": y, "x2": x + rng.uniform(10, 80), "y2": y + rng.uniform(10, 70)})
                t1 = time.perf_counter()
                sent = await http.post(f"/v1/projects/{PROJECT}/tasks/{task_id}/submit", json={"lease_id": lease, "boxes": boxes})
                if measured:
                    submit_ms.append((time.perf_counter() - t1) * 1000)
                    done_at.append(time.perf_counter() - self.start)
                sent.raise_for_status()
                answered[sent.json()["submission_id"]] = task_id
                self.progress.advance(self.drain)


async def _drain(settings: Any, base_url: str, tasks: int, labellers: int, progress: Progress) -> dict[str, Any]:
    from visionloop.libs.db import create_pool
    from visionloop.services.labeling_gateway.admin import create_project, create_token

    await create_project(settings, PROJECT, ["car", "person", "bicycle"])
    tokens = [(await create_token(settings, project=PROJECT, role="annotator", user_id=f"labeller-{n}"))[1] for n in range(labellers)]
    pool = await create_pool(settings, min_size=1, max_size=2)
    schema = settings.schema_for("labeling-gateway")
    total = tasks + labellers  # one warm-up round trip per labeller, not measured
    try:
        await _seed(settings, total, progress)
        await _wait_created(pool, schema, tasks, total, progress)
        drain = progress.add_task(f"{labellers} labellers: next + submit over HTTP", total=total)
        run = _Drain(base_url, total, progress, drain, asyncio.Barrier(labellers))
        await asyncio.gather(*(run.labeller(n, token) for n, token in enumerate(tokens)))
        elapsed = time.perf_counter() - run.start
        measured_answers = len(run.done_at)
        unanswered = await _count(pool, schema, "project = 'bench' AND state <> 'submitted'")
        events = await _events(settings, set(run.answered), progress)
    finally:
        await pool.close()
    # Lost: a task of the queue nobody answered, or an answer whose event never reached the topic.
    lost = max(unanswered, total - len(set(run.answered.values()))) + (len(run.answered) - events)
    return {
        "tasks": tasks,
        "labellers": labellers,
        "roundtrips_per_s": round(measured_answers / elapsed, 1),
        "drain_s": round(elapsed, 2),
        "next_task_p50_ms": round(float(np.percentile(run.next_ms, 50)), 2),
        "next_task_p99_ms": round(float(np.percentile(run.next_ms, 99)), 2),
        "submit_p50_ms": round(float(np.percentile(run.submit_ms, 50)), 2),
        "submit_p99_ms": round(float(np.percentile(run.submit_ms, 99)), 2),
        "double_assignments": run.double + (len(run.handed) - len(set(run.handed))),
        "lost_tasks": lost,
        "label_submitted_events": events,
        "_next_ms": run.next_ms,
        "_submit_ms": run.submit_ms,
        "_done_at": run.done_at,
    }


async def _events(settings: Any, submissions: set[str], progress: Progress) -> int:
    """How many of the submissions have their `label submitted` event on the topic."""
    from aiokafka import AIOKafkaConsumer

    from visionloop.contracts import LabelSubmitted, topic_of
    from visionloop.libs.kafka import consumer_kwargs, ensure_named

    await ensure_named(settings, [topic_of(LabelSubmitted, settings.topic_prefix)])
    reader = AIOKafkaConsumer(topic_of(LabelSubmitted, settings.topic_prefix), **consumer_kwargs(settings),
                              auto_offset_reset="earliest", enable_auto_commit=False)
    await reader.start()
    seen: set[str] = set()
    step = progress.add_task("label submitted events on the topic", total=len(submissions))
    try:
        deadline = time.monotonic() + 60
        while len(seen) < len(submissions) and time.monotonic() < deadline:
            batch = await reader.getmany(timeout_ms=300)
            for records in batch.values():
                for record in records:
                    sid = json.loads(record.value)["payload"]["submission_id"]
                    if sid in submissions:
                        seen.add(sid)
            progress.update(step, completed=len(seen))
    finally:
        await reader.stop()
    return len(seen)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    bins = np.linspace(0, max(np.percentile(result["_next_ms"], 99.5), np.percentile(result["_submit_ms"], 99.5)) * 1.1, 60)
    ax.hist(result["_next_ms"], bins=bins, alpha=0.7, label=f"next task (p99 {result['next_task_p99_ms']} ms)")
    ax.hist(result["_submit_ms"], bins=bins, alpha=0.7, label=f"submit (p99 {result['submit_p99_ms']} ms)")
    ax.set_xlabel("latency, ms")
    ax.set_ylabel("requests")
    ax.set_title(f"{result['labellers']} concurrent labellers over HTTP")
    ax.legend()
    ax = axes[1]
    done = np.array(result["_done_at"])
    edges = np.arange(0, done.max() + 0.5, 0.5)
    counts, _ = np.histogram(done, bins=edges)
    ax.plot(edges[1:], counts / 0.5, "-")
    ax.axhline(result["roundtrips_per_s"], color="r", linestyle="--", linewidth=1, label=f"mean {result['roundtrips_per_s']}/s")
    ax.set_xlabel("seconds into the drain")
    ax.set_ylabel("answered tasks per second")
    ax.set_title(f"Draining {result['tasks']} tasks")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_gateway_bench(*, tasks: int = 2000, labellers: int = 50, console: Console | None = None, plot: Path = PLOT) -> dict[str, Any]:
    """Start the stack and the gateway, drain the queue, print a table, draw the plot."""
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    console = console or Console(stderr=True)
    state = Path(".visionloop") / "bench"
    tag = uuid.uuid4().hex[:6]
    stack = EmbeddedStack(Settings(state_dir=state))
    settings = stack.start().model_copy(update={"topic_prefix": f"bench{tag}.", "schema_prefix": f"bench{tag}_"})
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap or "",
        "VL_KAFKA_EMBEDDED": "true",
        "VL_DATABASE_URL": settings.database_url or "",
        "VL_BLOB_URL": (state.resolve() / f"blobs-{tag}").as_uri(),
        "VL_TOPIC_PREFIX": settings.topic_prefix,
        "VL_SCHEMA_PREFIX": settings.schema_prefix,
        "VL_LABELING_GATEWAY_PORT": str(port),
        "VL_DB_POOL_MAX": "16",
        "VL_LOG_LEVEL": "WARNING",
    }
    settings = settings.model_copy(update={"topic_prefix": env["VL_TOPIC_PREFIX"], "schema_prefix": env["VL_SCHEMA_PREFIX"]})
    gateway = subprocess.Popen([sys.executable, "-m", "visionloop.cli", "run", "labeling-gateway"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result: dict[str, Any] = {"machine": machine()}
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", gateway)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            result |= asyncio.run(_drain(settings, f"http://127.0.0.1:{port}", tasks, labellers, progress))
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
        stack.stop()
    _plot(result, plot)
    result["plot"] = str(plot)
    table = Table(title="visionloop bench gateway")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row("round trips per second (next + submit)", f"{result['roundtrips_per_s']:,.1f}", f"{tasks} tasks, {labellers} labellers, {result['drain_s']} s")
    table.add_row("next task p50 / p99", f"{result['next_task_p50_ms']} / {result['next_task_p99_ms']} ms", "lease with FOR UPDATE SKIP LOCKED")
    table.add_row("submit p50 / p99", f"{result['submit_p50_ms']} / {result['submit_p99_ms']} ms", "validate, record, outbox, publish")
    table.add_row("double assignments", str(result["double_assignments"]), "must be 0")
    table.add_row("lost tasks", str(result["lost_tasks"]), "must be 0 (every task answered, every answer on the topic)")
    console.print(table)
    console.print(f"plot: {plot}")
    return {k: v for k, v in result.items() if not k.startswith("_")}


def _wait_http(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode} during start-up")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the gateway did not answer {url} within {timeout:.0f} s")
