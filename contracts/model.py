"""Model events: steps 6-10 of the loop (trainer, evaluator, converter, packager, distributor)."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, Field

from visionloop.contracts.common import (
    BlobUri,
    ClassName,
    DomainTags,
    Frozen,
    Metrics,
    ModelRef,
    Sha256,
    Target,
)
from visionloop.contracts.envelope import Payload


class Lineage(Frozen):
    """Where a model comes from: every model event carries it."""

    model: ModelRef
    parent: ModelRef | None = Field(default=None, description="The champion it was fine-tuned from.")
    dataset_version: str = Field(
        min_length=1, max_length=80, description="Content hash of the immutable dataset version."
    )
    class_names: list[ClassName] = Field(
        min_length=1, description="Classes in head order; never reordered within a project."
    )
    imgsz: int = Field(gt=0, le=4096, description="Square input size the model was trained at.")


class TrainMetrics(Frozen):
    """What training itself measured on its validation split."""

    epochs: int = Field(ge=0)
    best_epoch: int | None = Field(default=None, ge=0)
    val: Metrics | None = None
    train_images: int = Field(ge=0)
    val_images: int = Field(ge=0)
    final_losses: dict[str, float] = Field(default_factory=dict)


class DatasetRef(Frozen):
    """An immutable dataset version (or frozen test set) and where its manifest lies."""

    version: str = Field(min_length=1, max_length=80, description="Content hash of the images, labels and classes.")
    uri: BlobUri = Field(description="Manifest JSON: class list and every image with its boxes (and split).")
    images: int = Field(ge=0)


class ModelTrained(Payload):
    """A training run finished and produced weights (a candidate, not yet gated)."""

    event_type = "model.trained"

    lineage: Lineage
    run_id: str = Field(max_length=128)
    weights_uri: BlobUri = Field(description="PyTorch weights (`best.pt`) in the blob store.")
    weights_sha256: Sha256
    metrics: TrainMetrics
    hyperparameters: dict[str, str | int | float | bool] = Field(default_factory=dict)
    device: str = Field(default="cpu", max_length=32)
    duration_s: float = Field(ge=0.0)
    dataset: DatasetRef | None = Field(default=None, description="The training data (train and val splits).")
    test_set: DatasetRef | None = Field(
        default=None, description="The project's frozen test set when the run started: what the evaluator gates on."
    )


class GateFailureReason(StrEnum):
    """Why a candidate did not pass the gate."""

    BELOW_FLOOR = "below_floor"
    WORSE_THAN_CHAMPION = "worse_than_champion"
    CLASS_REGRESSION = "class_regression"
    AGREEMENT_BELOW_FLOOR = "agreement_below_floor"
    NO_TEST_SET = "no_test_set"
    EVALUATION_ERROR = "evaluation_error"


class GateFailure(Frozen):
    """One reason the gate refused a candidate, with the numbers behind it."""

    reason: GateFailureReason
    message: str = Field(max_length=1024)
    metric: str | None = Field(default=None, max_length=64)
    class_name: ClassName | None = None
    value: float | None = None
    threshold: float | None = None


class ModelEvaluated(Payload):
    """A candidate was measured on the frozen test set and gated."""

    event_type = "model.evaluated"

    lineage: Lineage
    weights_uri: BlobUri
    weights_sha256: Sha256
    passed: bool
    failures: list[GateFailure] = Field(default_factory=list)
    test_set_version: str = Field(max_length=80)
    candidate: Metrics
    champion: Metrics | None = Field(default=None, description="Same test set, for comparison.")
    champion_model: ModelRef | None = None
    report_uri: BlobUri | None = Field(default=None, description="JSON report (with plots) blob.")
    dataset: DatasetRef | None = Field(default=None, description="The training data (from `model trained`): INT8 calibration images.")
    test_set: DatasetRef | None = Field(default=None, description="The frozen test set it was measured on.")


class ModelRejudgeRequested(Payload):
    """Ask the evaluator to judge a model it gated before again, under the project's gate settings
    as they are now (`visionloop evaluator rejudge`): no retraining; a pass releases it as usual."""

    event_type = "rejudge.requested"

    model: ModelRef
    requested_by: str = Field(default="unknown", max_length=128)


class Precision(StrEnum):
    """Numeric precision of an exported artifact."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Parity(Frozen):
    """How closely an exported artifact matches the PyTorch model it came from."""

    max_abs_diff_px: float | None = Field(default=None, ge=0.0, description="Raw box outputs.")
    map50_95: float | None = Field(default=None, ge=0.0, le=1.0, description="Artifact on test set.")
    map50_95_delta: float | None = Field(default=None, description="Artifact minus PyTorch.")
    tolerance: float | None = Field(default=None, ge=0.0)
    passed: bool


class Artifact(Frozen):
    """One exported model file."""

    target: Target
    format: Literal["onnx"] = "onnx"
    precision: Precision
    input_shape: list[int | str] = Field(
        min_length=4, max_length=4, description="NCHW; `batch` marks a dynamic dimension."
    )
    uri: BlobUri
    sha256: Sha256
    size_bytes: int = Field(gt=0)
    parity: Parity


class ConversionFailureReason(StrEnum):
    """Why an artifact was not produced or may not ship."""

    EXPORT_FAILED = "export_failed"
    PARITY_FAILED = "parity_failed"
    ACCURACY_DROP = "accuracy_drop"
    CALIBRATION_FAILED = "calibration_failed"


class RefusedArtifact(Frozen):
    """An artifact that will not ship, and why."""

    target: Target
    precision: Precision
    reason: ConversionFailureReason
    message: str = Field(max_length=1024)


class ModelConverted(Payload):
    """A passing candidate was exported for server and edge."""

    event_type = "model.converted"

    lineage: Lineage
    metrics: Metrics = Field(description="The candidate's test-set metrics (PyTorch).")
    artifacts: list[Artifact] = Field(default_factory=list)
    refused: list[RefusedArtifact] = Field(default_factory=list)


class ModelPackaged(Payload):
    """An artifact was bundled with its manifest, checksummed and signed."""

    event_type = "model.packaged"

    lineage: Lineage
    target: Target
    precision: Precision
    package_uri: BlobUri = Field(description="The tar archive in the blob store.")
    package_sha256: Sha256
    size_bytes: int = Field(gt=0)
    manifest_sha256: Sha256
    signature: str = Field(
        pattern=r"^[A-Za-z0-9+/]+={0,2}$", description="Ed25519 signature of the manifest, base64."
    )
    key_id: str = Field(max_length=128, description="Id of the signing key (public key hash).")
    metrics: Metrics


class Alias(StrEnum):
    """Names the library gives model versions."""

    PRODUCTION = "production"
    CANDIDATE = "candidate"
    PREVIOUS = "previous"


class ModelRegistered(Payload):
    """A package entered the model library (or its aliases changed)."""

    event_type = "model.registered"

    lineage: Lineage
    target: Target
    precision: Precision
    domain: DomainTags = Field(default_factory=dict, description="Domain tags the model serves.")
    artifact_uri: BlobUri = Field(description="The ONNX file to run.")
    artifact_sha256: Sha256
    package_uri: BlobUri | None = None
    package_sha256: Sha256 | None = None
    aliases: list[Alias] = Field(default_factory=list)
    metrics: Metrics
    registered_at: AwareDatetime
