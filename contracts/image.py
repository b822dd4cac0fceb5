"""Image events: steps 1-3 of the loop (ingest, dedup/quality, recognizer)."""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import AwareDatetime, ConfigDict, Field, PlainSerializer, PlainValidator, model_validator

from visionloop.contracts.common import (
    Detection,
    DomainTags,
    Frozen,
    ImageRef,
    ModelRef,
    Sha256,
    Stage,
)
from visionloop.contracts.envelope import Payload


def _b64decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("inline bytes must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ValueError("inline bytes are not valid base64") from exc


Base64Bytes = Annotated[
    bytes,
    PlainValidator(_b64decode, json_schema_input_type=str),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str),
    Field(description="Raw bytes, base64-encoded (standard alphabet, padded)."),
]


class ImageSource(Frozen):
    """Who sent an image and what they said about it; travels with the image through the loop."""

    domain: DomainTags = Field(default_factory=dict)
    source_system: str = Field(
        default="unknown", max_length=128, description="Name of the upstream system that sent it."
    )
    captured_at: AwareDatetime | None = Field(
        default=None, description="When the camera took the picture, if known."
    )
    upstream_id: str | None = Field(
        default=None, max_length=256, description="The upstream system's own id for the image."
    )
    metadata: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="Free-form string metadata, carried unchanged.",
    )


class ImageSubmitted(Payload):
    """An upstream system asks the loop to take an image (the submit topic).

    Exactly one of `source_uri` and `inline_bytes` is set.
    """

    event_type = "image.submitted"
    # The rule `_one_source` enforces, in the JSON Schema too: a consumer refuses any other event.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": [name], "properties": {name: {"type": "string"}}} for name in ("inline_bytes", "source_uri")
    ]})

    submission_id: str = Field(
        min_length=1,
        max_length=128,
        description="Id of this submission, chosen by the sender; rejections refer to it.",
    )
    source_uri: str | None = Field(
        default=None,
        max_length=4096,
        description="`http(s)://`, `s3://` or `file://` (under the configured root) URI to fetch.",
    )
    inline_bytes: Base64Bytes | None = Field(
        default=None, description="The image itself, for small images (bounded by a setting)."
    )
    filename: str | None = Field(default=None, max_length=255, description="Original file name.")
    source: ImageSource = Field(default_factory=ImageSource)

    @model_validator(mode="after")
    def _one_source(self) -> "ImageSubmitted":
        if (self.source_uri is None) == (self.inline_bytes is None):
            raise ValueError("exactly one of source_uri and inline_bytes must be set")
        return self


class ImageIngested(Payload):
    """The image's bytes are stored content-addressed and decode as an image."""

    event_type = "image.ingested"

    submission_id: str = Field(max_length=128, description="The submission that brought it.")
    image: ImageRef
    source: ImageSource
    already_stored: bool = Field(
        default=False,
        description="True when the same bytes were stored before (an exact duplicate).",
    )


class ImageHashes(Frozen):
    """Perceptual hashes used for near-duplicate search, as 16 hex digits (64 bits) each."""

    phash: str = Field(pattern=r"^[0-9a-f]{16}$", description="64-bit DCT perceptual hash.")
    dhash: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{16}$", description="64-bit difference hash, if computed."
    )


class ImageQuality(Frozen):
    """Quality measurements taken by the dedup/quality service."""

    blur_variance: float | None = Field(
        default=None, ge=0.0, description="Variance of the Laplacian (higher is sharper)."
    )


class ImageAccepted(Payload):
    """The image is new (not a duplicate) and good enough to look at."""

    event_type = "image.accepted"

    submission_id: str = Field(max_length=128)
    image: ImageRef
    source: ImageSource
    hashes: ImageHashes
    quality: ImageQuality = Field(default_factory=ImageQuality)


class ImageRejectReason(StrEnum):
    """Why an image left the loop. Every rejection carries exactly one."""

    # ingest
    UNREACHABLE = "unreachable"
    TOO_LARGE = "too_large"
    NOT_AN_IMAGE = "not_an_image"
    CORRUPT = "corrupt"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_MANY_FRAMES = "too_many_frames"
    UNSUPPORTED_FORMAT = "unsupported_format"
    FORBIDDEN_SOURCE = "forbidden_source"
    INLINE_TOO_LARGE = "inline_too_large"
    INVALID_SUBMISSION = "invalid_submission"
    # dedup/quality
    DUPLICATE = "duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    LOW_RESOLUTION = "low_resolution"
    BLURRY = "blurry"
    BLOB_MISSING = "blob_missing"


class ImageRejected(Payload):
    """The image was refused, with the reason and a sentence a person can act on."""

    event_type = "image.rejected"

    submission_id: str = Field(max_length=128)
    stage: Literal[Stage.INGEST, Stage.DEDUP] = Field(description="The service that refused it.")
    reason: ImageRejectReason
    message: str = Field(max_length=1024, description="What went wrong and what to do about it.")
    image_id: Sha256 | None = Field(default=None, description="Set when the bytes were read.")
    source: ImageSource = Field(default_factory=ImageSource)
    duplicate_of: Sha256 | None = Field(
        default=None, description="For duplicates: the image this one duplicates."
    )
    hamming_distance: int | None = Field(
        default=None,
        ge=0,
        le=128,
        description=(
            "For duplicates: Hamming distance between the perceptual hashes (pHash plus dHash, "
            "0-128 bits; 0 for exact duplicates)."
        ),
    )
    details: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="Measured values behind the decision (sizes, limits...)."
    )


class RecognitionMeta(Frozen):
    """How a recognition decision was made."""

    model: ModelRef
    model_sha256: Sha256 = Field(description="SHA-256 of the model artifact that ran.")
    conf_threshold: float = Field(ge=0.0, le=1.0, description="Score a detection needs to count.")
    uncertainty: float = Field(
        ge=0.0, le=1.0, description="Image uncertainty (0 certain, 1 clueless); ranks labelling."
    )
    inference_ms: float | None = Field(default=None, ge=0.0, description="Model time for the image.")


class ImageRecognized(Payload):
    """A library model recognises the image; its detections are the pre-labels."""

    event_type = "image.recognized"

    image: ImageRef
    source: ImageSource
    prelabels: list[Detection] = Field(max_length=1000, description="The model's confident boxes.")
    recognition: RecognitionMeta
    class_names: list[str] = Field(description="The model's classes, in order.")


class UnrecognizedReason(StrEnum):
    """Why no model recognises an image."""

    NO_MODEL = "no_model"
    NO_CONFIDENT_DETECTION = "no_confident_detection"
    UNCERTAIN = "uncertain"
    OUT_OF_DISTRIBUTION = "out_of_distribution"


class ImageUnrecognized(Payload):
    """No model recognises the image: it goes to people, with whatever the model did find."""

    event_type = "image.unrecognized"

    image: ImageRef
    source: ImageSource
    reason: UnrecognizedReason
    message: str = Field(max_length=1024)
    uncertainty: float = Field(ge=0.0, le=1.0, description="1.0 when no model ran.")
    recognition: RecognitionMeta | None = Field(default=None, description="Null for `no_model`.")
    detections: list[Detection] = Field(
        default_factory=list, max_length=1000, description="Boxes the model found, any score."
    )
    class_names: list[str] = Field(default_factory=list)


