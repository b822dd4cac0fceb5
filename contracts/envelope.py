"""The envelope every visionloop message travels in.

An event on the wire is ``Envelope[Payload]``: the envelope says who produced what, when, for
which project and as part of which chain (correlation/causation); the payload is the fact
itself. Payload classes declare their ``event_type`` and ``schema_version`` once, so the
topic name, the envelope's metadata and the JSON Schema all come from one place.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from visionloop.contracts.common import ProjectName

SUPPORTED_MAJOR = 1
"""The major schema version this code reads. Messages of another major go to dead letter."""


class Payload(BaseModel):
    """Base of every event payload.

    Unknown fields are ignored (a newer producer may add optional fields within a major
    version); missing or invalid required fields are rejected.
    """

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    event_type: ClassVar[str]
    """Dotted ``<entity>.<fact>`` name, e.g. ``image.ingested``. Set by every concrete payload."""

    schema_version: ClassVar[str] = "1.0"
    """``<major>.<minor>``; minor grows with additive changes, a new major is a new topic."""


P = TypeVar("P", bound=Payload)


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (every timestamp in the contracts is)."""
    return datetime.now(UTC)


class Envelope(BaseModel, Generic[P]):
    """The common wrapper of every message on every visionloop topic."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)

    event_id: uuid.UUID = Field(
        default_factory=uuid.uuid4,
        description="Unique id of this event; consumers deduplicate on it (inbox).",
    )
    event_type: str = Field(
        description="Dotted `<entity>.<fact>` name of the payload, e.g. `image.ingested`.",
        min_length=3,
        max_length=64,
    )
    schema_version: str = Field(
        default="1.0",
        description="`<major>.<minor>` of the payload schema; a consumer rejects an unknown major.",
        pattern=r"^\d+\.\d+$",
    )
    occurred_at: AwareDatetime = Field(
        default_factory=utcnow, description="When the fact happened, UTC."
    )
    producer: str = Field(
        description="Service (and instance) that produced the event, e.g. `ingest/host-1`.",
        min_length=1,
        max_length=128,
    )
    project: ProjectName = Field(description="Project the event belongs to.")
    correlation_id: str = Field(
        description=(
            "Follows one image or one model through the whole loop; copied from the incoming "
            "event by every stage."
        ),
        min_length=1,
        max_length=128,
    )
    causation_id: uuid.UUID | None = Field(
        default=None, description="`event_id` of the event that caused this one; null at the source."
    )
    payload: P = Field(description="The fact itself; its schema depends on `event_type`.")

    @field_validator("occurred_at")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        return value.astimezone(UTC)

    @property
    def major_version(self) -> int:
        """Major part of ``schema_version``."""
        return int(self.schema_version.split(".", 1)[0])

    @classmethod
    def of(
        cls,
        payload: Payload,
        *,
        producer: str,
        project: str,
        correlation_id: str | None = None,
        causation: "Envelope[Any] | None" = None,
    ) -> "Envelope[Any]":
        """Wrap ``payload``; correlation and causation follow ``causation`` when given."""
        event_id = uuid.uuid4()
        if correlation_id is None:
            correlation_id = causation.correlation_id if causation else str(event_id)
        return Envelope[type(payload)](  # type: ignore[misc]
            event_id=event_id,
            event_type=payload.event_type,
            schema_version=payload.schema_version,
            producer=producer,
            project=project,
            correlation_id=correlation_id,
            causation_id=causation.event_id if causation else None,
            payload=payload,
        )


class EnvelopeHeader(BaseModel):
    """The envelope without its payload: what a consumer reads before it trusts the body."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: uuid.UUID
    event_type: str
    schema_version: str = Field(pattern=r"^\d+\.\d+$")
    producer: str
    project: ProjectName
    correlation_id: str
    causation_id: uuid.UUID | None = None
