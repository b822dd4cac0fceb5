"""The first step of the consumer policy, for any consumer: is this message an event of the topic's
contract? And, when it is not or its handler gave up, the dead letter that says why."""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import ValidationError

from visionloop.contracts import (
    SUPPORTED_MAJOR,
    DeadLetter,
    DeadLetterReason,
    Envelope,
    EnvelopeHeader,
    OriginalMessage,
)
from visionloop.contracts.topics import TopicSpec


def parse_event(
    spec: TopicSpec, model: type[Envelope[Any]], value: bytes | None
) -> tuple[Envelope[Any] | None, DeadLetterReason | None, str]:
    """Validate a raw message of `spec`'s topic as `model`; on failure say why, as a dead-letter
    reason and a sentence (the first step of the consumer policy, for any consumer)."""
    try:
        data = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError) as exc:
        return None, DeadLetterReason.NOT_JSON, f"the message is not JSON: {exc}"
    try:
        header = EnvelopeHeader.model_validate(data)
    except ValidationError as exc:
        return None, DeadLetterReason.NOT_AN_ENVELOPE, f"the message is not a visionloop envelope: {_brief(exc)}"
    major = int(header.schema_version.split(".", 1)[0])
    if major != SUPPORTED_MAJOR:
        return None, DeadLetterReason.UNSUPPORTED_VERSION, (
            f"schema_version {header.schema_version} has major {major}; this consumer reads "
            f"major {SUPPORTED_MAJOR} (a new major travels on a new topic)"
        )
    if header.event_type != spec.payload.event_type:
        return None, DeadLetterReason.UNEXPECTED_EVENT_TYPE, (
            f"event_type {header.event_type!r} on topic {spec.name}, which carries "
            f"{spec.payload.event_type!r}"
        )
    try:
        return model.model_validate(data), None, ""
    except ValidationError as exc:
        return None, DeadLetterReason.SCHEMA_VIOLATION, f"the payload breaks the {spec.name} schema: {_brief(exc)}"


def dead_letter(
    record: Any,
    reason: DeadLetterReason,
    problem: str,
    *,
    consumer_group: str,
    service: str,
    attempts: int = 1,
    event_id: Any = None,
    error_type: str | None = None,
) -> DeadLetter:
    """The dead letter of a consumed Kafka record: why, and the original bytes to replay it."""
    value: bytes = record.value or b""
    try:
        text, b64 = value.decode("utf-8"), None
    except UnicodeDecodeError:
        text, b64 = None, base64.b64encode(value).decode("ascii")
    original = OriginalMessage(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key.decode("utf-8", "replace") if record.key else None,
        headers={k: v.decode("utf-8", "replace") for k, v in (record.headers or ())},
        value_text=text,
        value_base64=b64,
        timestamp_ms=record.timestamp,
    )
    return DeadLetter(
        reason=reason,
        message=problem[:4096],
        error_type=error_type,
        consumer_group=consumer_group,
        service=service,
        attempts=attempts,
        original_event_id=str(event_id) if event_id else None,
        original=original,
    )


def _brief(exc: ValidationError) -> str:
    """A validation error in one line: the first few problems with their locations."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more
