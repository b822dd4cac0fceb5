"""visionloop contracts: every message of the loop as a versioned pydantic v2 model.

Import payloads from here; the topic registry is `visionloop.contracts.topics`.
"""

from visionloop.contracts.common import (
    SYSTEM_PROJECT,
    Box,
    Detection,
    ImageRef,
    Metrics,
    ModelRef,
    Stage,
    Target,
)
from visionloop.contracts.deadletter import DeadLetter, DeadLetterReason, OriginalMessage
from visionloop.contracts.envelope import SUPPORTED_MAJOR, Envelope, EnvelopeHeader, Payload
from visionloop.contracts.image import (
    ImageAccepted,
    ImageHashes,
    ImageIngested,
    ImageQuality,
    ImageRecognized,
    ImageRejected,
    ImageRejectReason,
    ImageSource,
    ImageSubmitted,
    ImageUnrecognized,
    RecognitionMeta,
    UnrecognizedReason,
)
from visionloop.contracts.label import (
    BoxIssue,
    LabelActions,
    Labeller,
    LabelRejected,
    LabelRejectReason,
    LabelSourceKind,
    LabelSubmitted,
    LabelVerified,
    Provenance,
    ReviewDecision,
    TaskKind,
    VerificationMethod,
)
from visionloop.contracts.model import (
    Alias,
    Artifact,
    ConversionFailureReason,
    DatasetRef,
    GateFailure,
    GateFailureReason,
    Lineage,
    ModelConverted,
    ModelEvaluated,
    ModelPackaged,
    ModelRegistered,
    ModelRejudgeRequested,
    ModelTrained,
    Parity,
    Precision,
    RefusedArtifact,
    TrainMetrics,
)
from visionloop.contracts.release import (
    DeviceFailureReason,
    DeviceState,
    DeviceStatus,
    EdgeRelease,
    Release,
    ReleaseAction,
    ReleaseCommand,
    ReleaseCommandKind,
    RolloutStage,
    ServerRelease,
)
from visionloop.contracts.status import PipelineStatus, Progress, StatusKind
from visionloop.contracts.topics import BY_EVENT_TYPE, TOPICS, TopicSpec, spec_for, topic_of
from visionloop.contracts.training import TrainingRequested, TrainingTrigger

__all__ = [name for name in dir() if not name.startswith("_")]
