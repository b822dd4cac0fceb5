"""The topic registry: the one place that maps each contract to its topic, key and partitions.

Topic names carry the major version, `vl.<entity>.<fact>.v<major>`. Keys keep ordering per
entity: image events by image id, model events by model id, releases by fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from visionloop.contracts.deadletter import DeadLetter
from visionloop.contracts.envelope import Envelope, Payload
from visionloop.contracts.image import (
    ImageAccepted,
    ImageIngested,
    ImageRecognized,
    ImageRejected,
    ImageSubmitted,
    ImageUnrecognized,
)
from visionloop.contracts.label import LabelRejected, LabelSubmitted, LabelVerified
from visionloop.contracts.model import (
    ModelConverted,
    ModelEvaluated,
    ModelPackaged,
    ModelRegistered,
    ModelRejudgeRequested,
    ModelTrained,
)
from visionloop.contracts.release import DeviceStatus, EdgeRelease, ReleaseCommand, ServerRelease
from visionloop.contracts.status import PipelineStatus
from visionloop.contracts.training import TrainingRequested


@dataclass(frozen=True)
class TopicSpec:
    """How one contract travels: topic name, message key, partition count."""

    payload: type[Payload]
    key: str
    """Human description of the key (documentation and the AsyncAPI document)."""
    key_of: Callable[[Envelope[Any]], str]
    partitions: int
    description: str

    @property
    def name(self) -> str:
        """The topic name, `vl.<event_type>.v<major>`."""
        major = self.payload.schema_version.split(".", 1)[0]
        return f"vl.{self.payload.event_type}.v{major}"


def _image_id(env: Envelope[Any]) -> str:
    return env.payload.image.image_id


def _model_id(env: Envelope[Any]) -> str:
    return env.payload.lineage.model.model_id


def _project(env: Envelope[Any]) -> str:
    return env.project


_SPECS: list[TopicSpec] = [
    TopicSpec(ImageSubmitted, "submission_id", lambda e: e.payload.submission_id, 6,
              "Upstream systems submit images here (any Kafka client)."),
    TopicSpec(ImageIngested, "image_id", _image_id, 6, "Images stored content-addressed."),
    TopicSpec(ImageAccepted, "image_id", _image_id, 6, "New images worth looking at."),
    TopicSpec(ImageRejected, "image_id or submission_id",
              lambda e: e.payload.image_id or e.payload.submission_id, 3,
              "Images refused by ingest or dedup/quality, with the reason."),
    TopicSpec(ImageRecognized, "image_id", _image_id, 6, "Images a library model recognised."),
    TopicSpec(ImageUnrecognized, "image_id", _image_id, 6, "Images no model recognised."),
    TopicSpec(LabelSubmitted, "image_id", _image_id, 6, "Answers to labelling tasks."),
    TopicSpec(LabelVerified, "image_id", _image_id, 6, "Label sets that may train models."),
    TopicSpec(LabelRejected, "image_id", _image_id, 3, "Submissions that failed verification."),
    TopicSpec(TrainingRequested, "project", _project, 1, "Commands to train now."),
    TopicSpec(ModelTrained, "model_id", _model_id, 1, "Finished training runs (candidates)."),
    TopicSpec(ModelEvaluated, "model_id", _model_id, 1, "Candidates gated on the frozen test set."),
    TopicSpec(ModelRejudgeRequested, "model_id", lambda e: e.payload.model.model_id, 1,
              "Commands to judge a gated model again under the current gate settings."),
    TopicSpec(ModelConverted, "model_id", _model_id, 1, "Exported ONNX artifacts."),
    TopicSpec(ModelPackaged, "model_id", _model_id, 1, "Signed packages."),
    TopicSpec(ModelRegistered, "model_id", _model_id, 1, "Model library entries and alias moves."),
    TopicSpec(EdgeRelease, "fleet", lambda e: e.payload.fleet, 3, "Releases to edge fleets."),
    TopicSpec(ServerRelease, "fleet", lambda e: e.payload.fleet, 3, "Releases to server fleets."),
    TopicSpec(ReleaseCommand, "fleet or project",
              lambda e: e.payload.fleet or e.project, 1, "Promote, pause, resume, rollback."),
    TopicSpec(DeviceStatus, "fleet", lambda e: e.payload.fleet, 3, "Device reports on releases."),
    TopicSpec(PipelineStatus, "service", lambda e: e.payload.service, 1,
              "Heartbeats, counters and progress for dashboards."),
    TopicSpec(DeadLetter, "original key or consumer group",
              lambda e: e.payload.original.key or e.payload.consumer_group, 1,
              "Messages consumers gave up on, with the error and the original bytes."),
]

TOPICS: dict[type[Payload], TopicSpec] = {spec.payload: spec for spec in _SPECS}
"""Every contract by payload class."""

BY_EVENT_TYPE: dict[str, TopicSpec] = {spec.payload.event_type: spec for spec in _SPECS}
"""Every contract by `event_type`."""


def spec_for(payload: type[Payload] | Payload) -> TopicSpec:
    """The topic spec of a payload class or instance."""
    cls = payload if isinstance(payload, type) else type(payload)
    try:
        return TOPICS[cls]
    except KeyError:
        raise KeyError(f"{cls.__name__} has no topic in the registry (contracts/topics.py)") from None


def topic_of(payload: type[Payload] | Payload, prefix: str = "") -> str:
    """Topic name of a payload, with an optional deployment/test prefix."""
    return prefix + spec_for(payload).name
