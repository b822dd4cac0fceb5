"""Dead letters: messages a consumer could not handle, kept with everything needed to replay them."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from visionloop.contracts.common import Frozen
from visionloop.contracts.envelope import Payload


class DeadLetterReason(StrEnum):
    """Why a message was dead-lettered."""

    NOT_JSON = "not_json"
    NOT_AN_ENVELOPE = "not_an_envelope"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNEXPECTED_EVENT_TYPE = "unexpected_event_type"
    HANDLER_FAILED = "handler_failed"


class OriginalMessage(Frozen):
    """Where the dead message was read and what it held."""

    topic: str = Field(max_length=256)
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)
    key: str | None = Field(default=None, description="The key, decoded as UTF-8 (replacement chars).")
    headers: dict[str, str] = Field(default_factory=dict)
    value_text: str | None = Field(
        default=None, description="The value when it is valid UTF-8; otherwise null."
    )
    value_base64: str | None = Field(default=None, description="The value when it is not UTF-8.")
    timestamp_ms: int | None = None


class DeadLetter(Payload):
    """A message a consumer gave up on; the consumer went on with the next one."""

    event_type = "message.deadlettered"

    reason: DeadLetterReason
    message: str = Field(max_length=4096, description="What was wrong, in a sentence.")
    error_type: str | None = Field(default=None, max_length=256, description="Exception class.")
    consumer_group: str = Field(max_length=256)
    service: str = Field(max_length=64)
    attempts: int = Field(ge=1, description="Handler attempts before giving up (1 for malformed).")
    original_event_id: str | None = Field(default=None, max_length=64)
    original: OriginalMessage
