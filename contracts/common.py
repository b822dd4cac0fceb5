"""Types shared by every contract: names, hashes, image and model references, boxes."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

SYSTEM_PROJECT = "_system"
"""Project of events that belong to no project (heartbeats, unreadable dead letters)."""

ProjectName = Annotated[
    str,
    StringConstraints(pattern=r"^([a-z0-9][a-z0-9_-]{0,62}|_system)$"),
    Field(
        description=(
            "Project slug: lowercase letters, digits, `-` and `_`, at most 63 characters. "
            "`_system` marks events that belong to no project (status, dead letters)."
        )
    ),
]

Sha256 = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-f]{64}$"),
    Field(description="SHA-256 of the content, 64 lowercase hex digits."),
]

BlobUri = Annotated[
    str,
    StringConstraints(pattern=r"^(file|s3)://\S+$", max_length=2048),
    Field(description="Where the blob store keeps the bytes (`file://...` or `s3://bucket/key`)."),
]

ClassName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f]+$"),
    Field(description="A class name of the project's taxonomy."),
]

TagKey = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
TagValue = Annotated[str, StringConstraints(min_length=1, max_length=128)]

DomainTags = Annotated[
    dict[TagKey, TagValue],
    Field(
        description=(
            "Where the image comes from, as tags the model library routes on, e.g. "
            "`{\"site\": \"plant-3\", \"camera\": \"gate-1\", \"scene\": \"night\"}`."
        ),
        max_length=16,
    ),
]


class Frozen(BaseModel):
    """Base of value objects inside payloads: immutable, unknown fields ignored, no NaN."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False)


class Box(Frozen):
    """A detection box in the one canonical form: absolute pixel corners of the original image.

    COCO (x, y, w, h), YOLO (normalised centre) and Label Studio (percent) forms are
    conversions done at the edges of the system, never on the bus.
    """

    x1: float = Field(description="Left edge, pixels from the image's left border.")
    y1: float = Field(description="Top edge, pixels from the image's top border.")
    x2: float = Field(description="Right edge, pixels; greater than or equal to `x1`.")
    y2: float = Field(description="Bottom edge, pixels; greater than or equal to `y1`.")
    class_name: ClassName
    score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Model confidence; null for human boxes."
    )

    @model_validator(mode="after")
    def _ordered(self) -> "Box":
        if self.x2 < self.x1 or self.y2 < self.y1:
            raise ValueError("box corners must satisfy x1 <= x2 and y1 <= y2")
        return self

    @property
    def width(self) -> float:
        """Width in pixels."""
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        """Height in pixels."""
        return self.y2 - self.y1


class Detection(Box):
    """A model's box; `score` is required."""

    score: float = Field(ge=0.0, le=1.0, description="Model confidence.")  # type: ignore[assignment]


class ImageRef(Frozen):
    """An image by reference: its id is the SHA-256 of its original bytes."""

    image_id: Sha256 = Field(description="SHA-256 of the original bytes; the image's identity.")
    blob_uri: BlobUri
    width: int = Field(gt=0, description="Width in pixels after EXIF orientation.")
    height: int = Field(gt=0, description="Height in pixels after EXIF orientation.")
    format: str = Field(
        description="Decoded format as Pillow names it (`JPEG`, `PNG`, `WEBP`...).", max_length=16
    )
    byte_size: int = Field(gt=0, description="Size of the original bytes.")


class ModelRef(Frozen):
    """A model version in the library."""

    model_id: str = Field(
        description="Stable id of the model line, e.g. `<project>-detector`.", min_length=1, max_length=128
    )
    version: int = Field(ge=1, description="Version within the model line, 1, 2, ...")


class Target(StrEnum):
    """Where an artifact or a release runs."""

    SERVER = "server"
    EDGE = "edge"


class Stage(StrEnum):
    """The service that made a decision."""

    INGEST = "ingest"
    DEDUP = "dedup"
    RECOGNIZER = "recognizer"
    LABELING_GATEWAY = "labeling-gateway"
    VERIFIER = "verifier"
    TRAINER = "trainer"
    EVALUATOR = "evaluator"
    CONVERTER = "converter"
    PACKAGER = "packager"
    DISTRIBUTOR = "distributor"
    EDGE_AGENT = "edge-agent"


class Metrics(Frozen):
    """Detection metrics on one dataset split or test set."""

    map50_95: float = Field(ge=0.0, le=1.0, description="COCO mAP averaged over IoU 0.50:0.95.")
    map50: float = Field(ge=0.0, le=1.0, description="mAP at IoU 0.50.")
    precision: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Box precision at the operating threshold."
    )
    recall: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Box recall at the operating threshold."
    )
    per_class_ap: dict[ClassName, float] = Field(
        default_factory=dict, description="AP50-95 per class name."
    )
    image_agreement: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description=(
            "Fraction of images whose detections match their labels at IoU 0.5 with the right "
            "class (every label found, nothing extra)."
        ),
    )
    images: int | None = Field(default=None, ge=0, description="Images measured.")

    @field_validator("per_class_ap")
    @classmethod
    def _ap_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for name, ap in value.items():
            if not (math.isfinite(ap) and 0.0 <= ap <= 1.0):
                raise ValueError(f"AP of class {name!r} must be within [0, 1]")
        return value
