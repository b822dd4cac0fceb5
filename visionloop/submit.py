"""`visionloop submit`: every file gets one answer line, never a traceback.

A file goes on the submit topic when its event fits what the topic carries: the image inline
(base64 in the JSON envelope: 4/3 of the bytes) within ingest's inline cap
(`VL_INGEST_INLINE_MAX_BYTES`) and the event within `VL_KAFKA_MAX_MESSAGE_BYTES` (Kafka's default
message size, 1 MB). A bigger file goes over ingest's HTTP API (`POST /v1/images`, up to
`VL_INGEST_MAX_BYTES`), whose address the run file of `visionloop up` gives; a broker that refuses
the event (its own size limit) sends the file there too. With no way that can carry it, the line
says why and what to do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENVELOPE_ROOM = 16 * 1024
"""What the envelope adds around the base64 image (ids, source, headers), generously."""


@dataclass(frozen=True)
class Answer:
    """One file's outcome: accepted or not, and the line to print."""

    ok: bool
    line: str


def event_bytes(size: int) -> int:
    """About how large the submit event of a `size`-byte image is (base64 plus the envelope)."""
    return 4 * ((size + 2) // 3) + ENVELOPE_ROOM


def door(size: int, *, inline_max: int, topic_max: int, http: bool) -> str | None:
    """Which way a file of `size` bytes goes: "topic", "http", or None (neither carries it)."""
    if size <= inline_max and event_bytes(size) <= topic_max:
        return "topic"
    return "http" if http else None


def no_door(path: Path, size: int, *, inline_max: int, topic_max: int) -> Answer:
    """The answer for a file no way can carry here."""
    return Answer(False, (
        f"{path}: not sent: {size:,} bytes is over what the submit topic carries (inline cap {inline_max:,} bytes, "
        f"events up to {topic_max:,} bytes) and ingest's HTTP API is not known here; start the loop with "
        "`visionloop up` (its run file names the API) or POST the file to ingest's /v1/images"))


def trail_answer(path: Path, trail: list[dict[str, Any]], wait: float) -> Answer:
    """The answer from the events that followed a topic submission."""
    if not trail:
        return Answer(False, f"{path}: no answer within {wait:.0f} s")
    payload = trail[-1]["payload"]
    if trail[-1]["event_type"] == "image.rejected":
        return Answer(False, f"{path}: rejected by {payload['stage']} ({payload['reason']}): {payload['message']}")
    if trail[-1]["event_type"] == "image.unrecognized":
        return Answer(True, f"{path}: image.unrecognized ({payload['image']['image_id']}): goes to people, reason "
                            f"{payload['reason']} (uncertainty {payload['uncertainty']:.2f}, {len(payload.get('detections') or [])} "
                            "boxes found)")
    return Answer(True, f"{path}: {trail[-1]['event_type']} ({payload['image']['image_id']})")


def http_answer(path: Path, status: int, body: dict[str, Any]) -> Answer:
    """The answer from ingest's HTTP API."""
    if status == 201:
        again = " (stored before)" if body.get("already_stored") else ""
        return Answer(True, f"{path}: image.ingested ({body.get('image_id')}) over ingest's HTTP API{again}")
    reason, message = body.get("reason", f"http_{status}"), body.get("message", "no message")
    return Answer(False, f"{path}: rejected by ingest ({reason}, HTTP {status}): {message}")


async def post_file(url: str, path: Path, data: bytes, *, project: str, submission_id: str, timeout_s: float,
                    token: str | None = None) -> Answer:
    """`POST {url}/v1/images` with the file (multipart); the answer, or why there was none."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            response = await client.post(f"{url.rstrip('/')}/v1/images", headers=headers,
                                         data={"project": project, "submission_id": submission_id},
                                         files={"file": (path.name, data, "application/octet-stream")})
    except httpx.HTTPError as exc:
        return Answer(False, f"{path}: not sent: ingest's HTTP API at {url} did not answer ({type(exc).__name__}: {exc})")
    try:
        body = response.json()
    except ValueError:
        body = {"message": response.text[:200]}
    return http_answer(path, response.status_code, body if isinstance(body, dict) else {})


async def submit_file(settings: Any, path: Path, *, project: str, wait: float, final: set[str], inline_max: int,
                      ingest_url: str | None, token: str | None = None) -> Answer:
    """Send one file the way that carries it and return its answer (see the module's note)."""
    import uuid

    from aiokafka.errors import KafkaError

    try:
        data = path.read_bytes()
    except OSError as exc:
        return Answer(False, f"{path}: not read: {exc}")
    topic_max = settings.kafka_max_message_bytes
    way = door(len(data), inline_max=inline_max, topic_max=topic_max, http=ingest_url is not None)
    if way is None:
        return no_door(path, len(data), inline_max=inline_max, topic_max=topic_max)
    submission_id = f"cli-{uuid.uuid4().hex[:12]}"
    if way == "topic":
        try:
            trail = await submit_and_follow(settings, data, project=project, submission_id=submission_id, final=final,
                                            timeout_s=wait, max_bytes=topic_max, filename=path.name)
            return trail_answer(path, trail, wait)
        except KafkaError as exc:
            if ingest_url is None:
                return Answer(False, f"{path}: not sent: the broker refused the submit event ({type(exc).__name__}: {exc})")
    assert ingest_url is not None
    return await post_file(ingest_url, path, data, project=project, submission_id=submission_id, timeout_s=wait, token=token)


async def submit_and_follow(settings: Any, data: bytes, *, project: str, submission_id: str, final: set[str], timeout_s: float,
                            max_bytes: int = 1024 * 1024, filename: str | None = None) -> list[dict[str, Any]]:
    """Submit inline bytes on the submit topic; return the image's events until one in `final`."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from visionloop.contracts import TOPICS, Envelope, ImageSubmitted, topic_of
    from visionloop.libs.kafka import client_kwargs, consumer_kwargs, ensure_topics

    image_topics = [topic_of(p, settings.topic_prefix) for p in TOPICS if p.event_type.startswith("image.") and p is not ImageSubmitted]
    await ensure_topics(settings, [spec for p, spec in TOPICS.items() if p.event_type.startswith("image.")])
    consumer = AIOKafkaConsumer(*image_topics, **consumer_kwargs(settings), auto_offset_reset="latest", enable_auto_commit=False)  # type: ignore[arg-type]
    await consumer.start()
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all", max_request_size=max_bytes)  # type: ignore[arg-type]
    await producer.start()
    trail: list[dict[str, Any]] = []
    try:
        await consumer.seek_to_end()
        envelope = Envelope.of(
            ImageSubmitted(submission_id=submission_id, inline_bytes=data, filename=filename or f"{submission_id}.jpg"),
            producer="visionloop-cli",
            project=project,
        )
        await producer.send_and_wait(topic_of(ImageSubmitted, settings.topic_prefix), envelope.model_dump_json().encode(), key=submission_id.encode())
        image_id = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            # Partitions come back in no particular order: replay the batch in time order.
            for record in sorted((r for rs in batch.values() for r in rs), key=lambda r: r.timestamp):
                event = json.loads(record.value)
                payload = event.get("payload", {})
                ours = payload.get("submission_id") == submission_id or (
                    image_id is not None and payload.get("image", {}).get("image_id") == image_id
                )
                if not ours:
                    continue
                trail.append(event)
                image_id = image_id or payload.get("image", {}).get("image_id")
                if event["event_type"] in final:
                    return trail
        return trail
    finally:
        await producer.stop()
        await consumer.stop()


