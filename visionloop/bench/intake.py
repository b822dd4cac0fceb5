"""Intake benchmark: hashing, near-duplicate search, detection quality, and ingest+dedup end to end.

Four measurements, each next to its reference in the same run:

1. **Hashing throughput per core**: our pHash+dHash (reduced-size JPEG decode) on 640x480 JPEGs,
   decode included, on one thread, next to plain `imagehash.phash(Image.open(...))` on the same
   files. Files are synthetic scenes at JPEG quality 85 (about 50 KB, like camera frames of that
   size); the mean file size is reported.
2. **Near-duplicate query latency**: one query against 100k, 1M and 10M stored hash pairs in the
   in-memory index (random hashes: every query scans the whole index, the worst case), p50/p99.
3. **Precision/recall** of near-duplicate detection: originals in the index; their resized,
   recompressed, 2-5 % cropped and brightness-changed variants must be found (recall), distinct
   scenes must not match anything (precision = true matches / all matches).
4. **End to end**: images from the submit event to dedup's accept/reject decision through the
   real broker and PostgreSQL on the embedded stack, with ingest and dedup each running as its
   own process (`visionloop run`). Latency: one image in flight at a time, from just before the
   produce call to the decision being read (p50/p99). Throughput: a backlog of images produced
   as fast as the broker takes them, images/s from the first produce to the last decision.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from visionloop.bench import PLOTS, machine

PLOT = PLOTS / "intake.png"


def _files(count: int, seed: int) -> list[bytes]:
    from visionloop.libs.scenes import render_scene

    return [render_scene(seed=seed + i, width=640, height=480).encode(quality=85) for i in range(count)]


def bench_hashing(files: list[bytes], min_seconds: float = 3.0) -> dict[str, float]:
    """Images/s on this thread: ours vs plain imagehash, on the same files."""
    import imagehash
    from PIL import Image

    from visionloop.libs.perceptual import hash_image

    def rate(fn: Any) -> float:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds:
            for data in files:
                fn(data)
            done += len(files)
        return done / (time.perf_counter() - start)

    ours = rate(hash_image)
    baseline = rate(lambda data: imagehash.phash(Image.open(io.BytesIO(data))))
    return {
        "hash_images_per_s_per_core": round(ours, 1),
        "baseline_images_per_s_per_core": round(baseline, 1),
        "hash_speedup_vs_baseline": round(ours / baseline, 2),
        "mean_jpeg_kb": round(float(np.mean([len(f) for f in files])) / 1024, 1),
    }


def bench_queries(sizes: list[int], queries: int = 500) -> dict[str, Any]:
    """p50/p99 of one near-duplicate query at each index size."""
    from visionloop.services.dedup.index import HashIndex

    rng = np.random.default_rng(0)
    result: dict[str, Any] = {}
    for size in sizes:
        index = HashIndex()
        index.add_many([str(i) for i in range(size)], rng.integers(0, 2**63, size, dtype=np.uint64), rng.integers(0, 2**63, size, dtype=np.uint64))
        asks = rng.integers(0, 2**63, (queries, 2), dtype=np.uint64)
        index.nearest(int(asks[0][0]), int(asks[0][1]), 16)  # warm the scratch buffers
        latencies = []
        for p, d in asks[: max(50, queries if size <= 1_000_000 else queries // 5)]:
            start = time.perf_counter()
            index.nearest(int(p), int(d), 16)
            latencies.append((time.perf_counter() - start) * 1000)
        label = {100_000: "100k", 1_000_000: "1m", 10_000_000: "10m"}.get(size, str(size))
        result[f"query_p50_ms_{label}"] = round(float(np.percentile(latencies, 50)), 3)
        result[f"query_p99_ms_{label}"] = round(float(np.percentile(latencies, 99)), 3)
        result[f"_latencies_{label}"] = latencies
        del index
    return result


def bench_precision_recall(originals: int = 300, distinct: int = 500) -> dict[str, float]:
    """Near-duplicate precision and recall with the default policy on generated variants."""
    from visionloop.services.dedup.config import Policy
    from visionloop.services.dedup.evaluate import near_duplicate_quality

    quality = near_duplicate_quality(Policy().near_duplicate_radius, originals=originals, distinct=distinct)
    return {
        "near_dup_precision": round(quality.precision, 4),
        "near_dup_recall": round(quality.recall, 4),
        "near_dup_radius": quality.radius,
        **{f"recall_{k}": round(v, 4) for k, v in quality.recall_by_kind.items()},
    }


async def _read(reader: Any, decided: dict[str, float], outcomes: dict[str, str]) -> None:
    """Note when each decision is read, and its outcome (the reason of a rejection, or accepted), until cancelled."""
    while True:
        batch = await reader.getmany(timeout_ms=100)
        now = time.perf_counter()
        for records in batch.values():
            for record in records:
                data = json.loads(record.value)
                sid = data["payload"]["submission_id"]
                decided.setdefault(sid, now)
                outcomes[sid] = data["payload"].get("reason") or "accepted"


async def _until(decided: dict[str, float], sid: str, timeout: float = 120.0) -> None:
    """Wait until the decision on `sid` has been read; TimeoutError after `timeout` seconds."""
    deadline = time.perf_counter() + timeout
    while sid not in decided:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no decision for {sid} within {timeout:.0f} s")
        await asyncio.sleep(0.001)


async def _latencies(submit: Any, decided: dict[str, float], images: list[bytes], progress: Progress) -> list[float]:
    """Milliseconds from submit to decision, one image in flight; the first few (group joins, cold caches) are not counted."""
    task = progress.add_task("end to end: latency (one in flight)", total=len(images))
    latencies = []
    for n, data in enumerate(images):
        sid = f"lat-{n}"
        start = time.perf_counter()
        await submit(sid, data)
        await _until(decided, sid)
        if n >= 10:
            latencies.append((decided[sid] - start) * 1000)
        progress.advance(task)
    return latencies


async def _throughput(submit: Any, decided: dict[str, float], outcomes: dict[str, str], backlog: list[bytes],
                      progress: Progress) -> tuple[float, dict[str, int]]:
    """A backlog produced as fast as the broker takes it: seconds from the first produce to the last decision, and the outcomes."""
    task = progress.add_task("end to end: throughput (backlog)", total=len(backlog))
    start = time.perf_counter()
    sends = [asyncio.ensure_future(submit(f"bulk-{n}", data)) for n, data in enumerate(backlog)]
    await asyncio.gather(*sends)
    for n in range(len(backlog)):
        await _until(decided, f"bulk-{n}")
        progress.update(task, completed=n + 1)
    elapsed = max(decided[f"bulk-{n}"] for n in range(len(backlog))) - start
    reasons: dict[str, int] = {}
    for n in range(len(backlog)):
        reasons[outcomes[f"bulk-{n}"]] = reasons.get(outcomes[f"bulk-{n}"], 0) + 1
    return elapsed, reasons


async def _end_to_end(settings: Any, latency_images: list[bytes], backlog: list[bytes], progress: Progress) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from visionloop.contracts import (
        Envelope,
        ImageAccepted,
        ImageRejected,
        ImageSubmitted,
        topic_of,
    )
    from visionloop.libs.kafka import client_kwargs, consumer_kwargs, ensure_named

    await ensure_named(settings, [topic_of(t, settings.topic_prefix) for t in (ImageAccepted, ImageRejected, ImageSubmitted)])
    reader = AIOKafkaConsumer(
        topic_of(ImageAccepted, settings.topic_prefix), topic_of(ImageRejected, settings.topic_prefix),
        **consumer_kwargs(settings), auto_offset_reset="earliest", enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", linger_ms=0)
    await reader.start()
    await producer.start()
    decided: dict[str, float] = {}
    outcomes: dict[str, str] = {}

    async def submit(sid: str, data: bytes) -> None:
        envelope = Envelope.of(ImageSubmitted(submission_id=sid, inline_bytes=data), producer="bench", project="bench")
        await producer.send_and_wait(topic_of(ImageSubmitted, settings.topic_prefix), envelope.model_dump_json().encode(), key=sid.encode())

    reading = asyncio.create_task(_read(reader, decided, outcomes))
    try:
        latencies = await _latencies(submit, decided, latency_images, progress)
        elapsed, reasons = await _throughput(submit, decided, outcomes, backlog, progress)
        return {
            "e2e_images_per_s": round(len(backlog) / elapsed, 1),
            "e2e_p50_ms": round(float(np.percentile(latencies, 50)), 2),
            "e2e_p99_ms": round(float(np.percentile(latencies, 99)), 2),
            "e2e_backlog_images": len(backlog),
            "e2e_backlog_outcomes": reasons,
            "_e2e_latencies": latencies,
        }
    finally:
        reading.cancel()
        await producer.stop()
        await reader.stop()


def _backlog(count: int) -> list[bytes]:
    """The end-to-end backlog (640x480 JPEGs): a realistic mix of mostly new images, some exact
    copies and near copies (recompressed) of earlier ones; the same `count` gives the same files."""
    from visionloop.libs.scenes import render_scene
    from visionloop.libs.variants import variant

    rng = np.random.default_rng(9)
    scenes = [render_scene(seed=400_000 + i, width=640, height=480) for i in range(count)]
    backlog: list[bytes] = []
    for i, scene in enumerate(scenes):
        if i % 10 == 7:
            backlog.append(backlog[-3])
        elif i % 10 == 9:
            backlog.append(variant(scenes[i - 1].image, "recompress", rng))
        else:
            backlog.append(scene.encode(quality=85))
    return backlog


def bench_end_to_end(latency_count: int, backlog_count: int, progress: Progress) -> dict[str, Any]:
    """ingest + dedup as separate processes on the embedded broker and PostgreSQL."""
    from visionloop.libs.embedded import EmbeddedStack
    from visionloop.libs.settings import Settings

    state = Path(".visionloop") / "bench"
    tag = uuid.uuid4().hex[:6]
    stack = EmbeddedStack(Settings(state_dir=state))
    settings = stack.start().model_copy(update={"topic_prefix": f"bench{tag}.", "schema_prefix": f"bench{tag}_"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("VL_")} | {
        "VL_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "VL_KAFKA_EMBEDDED": "true",
        "VL_DATABASE_URL": settings.database_url,
        "VL_BLOB_URL": (state.resolve() / f"blobs-{tag}").as_uri(),
        "VL_TOPIC_PREFIX": settings.topic_prefix,
        "VL_SCHEMA_PREFIX": settings.schema_prefix,
        "VL_INGEST_PORT": "0",
        "VL_LOG_LEVEL": "WARNING",
    }
    procs = [
        subprocess.Popen([sys.executable, "-m", "visionloop.cli", "run", name], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name in ("ingest", "dedup")
    ]
    try:
        latency_images = _files(latency_count, seed=300_000)
        return asyncio.run(_end_to_end(settings, latency_images, _backlog(backlog_count), progress))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        stack.stop()


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.bar(["imagehash.phash\n(full decode)", "visionloop\n(reduced decode)"],
           [result["baseline_images_per_s_per_core"], result["hash_images_per_s_per_core"]], color=["#999", "#2a7"])
    ax.axhline(1000, color="r", linestyle="--", linewidth=1, label="target 1,000/s")
    ax.set_ylabel("images/s on one core (640x480 JPEG)")
    ax.set_title("Hashing throughput")
    ax.legend()
    ax = axes[1]
    sizes = [k.rsplit("_", 1)[1] for k in result if k.startswith("query_p99_ms_")]
    ax.plot(sizes, [result[f"query_p50_ms_{s}"] for s in sizes], "o-", label="p50")
    ax.plot(sizes, [result[f"query_p99_ms_{s}"] for s in sizes], "s-", label="p99")
    ax.axhline(2.0, color="r", linestyle="--", linewidth=1, label="target p99 at 1M: 2 ms")
    ax.set_yscale("log")
    ax.set_xlabel("stored hashes")
    ax.set_ylabel("ms per query")
    ax.set_title("Near-duplicate query latency")
    ax.legend()
    ax = axes[2]
    ax.hist(result["_e2e_latencies"], bins=40, color="#47a")
    ax.set_xlabel("submit -> decision, ms (one image in flight)")
    ax.set_ylabel("images")
    ax.set_title(f"End to end: p50 {result['e2e_p50_ms']} ms, p99 {result['e2e_p99_ms']} ms")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_intake_bench(*, sizes: list[int] | None = None, e2e_images: int = 300, console: Console | None = None, plot: Path = PLOT) -> dict[str, Any]:
    """Run every intake measurement; print a table; return the figures."""
    console = console or Console(stderr=True)
    sizes = sizes or [100_000, 1_000_000, 10_000_000]
    result: dict[str, Any] = {"machine": machine()}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
        step = progress.add_task("hashing 640x480 JPEGs (ours vs imagehash)", total=1)
        result |= bench_hashing(_files(100, seed=100_000))
        progress.advance(step)
        step = progress.add_task("near-duplicate queries at " + ", ".join(f"{s:,}" for s in sizes), total=1)
        result |= bench_queries(sizes)
        progress.advance(step)
        step = progress.add_task("precision/recall on generated variants", total=1)
        result |= bench_precision_recall()
        progress.advance(step)
        result |= bench_end_to_end(latency_count=60, backlog_count=e2e_images, progress=progress)
    _plot(result, plot)
    result["plot"] = str(plot)
    table = Table(title="visionloop bench intake")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("reference / target")
    table.add_row("hashing, images/s on one core", f"{result['hash_images_per_s_per_core']:,.0f}",
                  f"imagehash.phash {result['baseline_images_per_s_per_core']:,.0f}/s; target >= 1,000")
    for s in [k.rsplit("_", 1)[1] for k in result if k.startswith("query_p99_ms_")]:
        table.add_row(f"query p50 / p99 at {s}", f"{result[f'query_p50_ms_{s}']} / {result[f'query_p99_ms_{s}']} ms",
                      "target p99 < 2 ms at 1m" if s == "1m" else "")
    table.add_row("near-duplicate precision / recall", f"{result['near_dup_precision']} / {result['near_dup_recall']}", "target >= 0.99 / >= 0.95")
    table.add_row("end to end, images/s (backlog)", f"{result['e2e_images_per_s']}", f"{result['e2e_backlog_images']} images")
    table.add_row("end to end p50 / p99 (one in flight)", f"{result['e2e_p50_ms']} / {result['e2e_p99_ms']} ms", "")
    console.print(table)
    console.print(f"plot: {plot}")
    return {k: v for k, v in result.items() if not k.startswith("_")}
