"""Pipeline status: heartbeats, counters and progress that dashboards read."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from visionloop.contracts.common import Frozen
from visionloop.contracts.envelope import Payload


class StatusKind(StrEnum):
    """What a status event reports."""

    HEARTBEAT = "heartbeat"
    PROGRESS = "progress"
    STARTED = "started"
    STOPPED = "stopped"
    FAILED = "failed"


class Progress(Frozen):
    """Progress of a long task (a training run, a conversion)."""

    task: str = Field(max_length=64, description="What is in progress, e.g. `training`.")
    task_id: str = Field(max_length=128)
    step: int = Field(ge=0)
    total: int | None = Field(default=None, ge=0)
    metrics: dict[str, float] = Field(default_factory=dict, description="E.g. losses, val mAP.")
    message: str | None = Field(default=None, max_length=1024)


class PipelineStatus(Payload):
    """One service instance's status."""

    event_type = "pipeline.status"

    service: str = Field(max_length=64)
    instance: str = Field(max_length=128)
    kind: StatusKind
    uptime_s: float = Field(default=0.0, ge=0.0)
    counters: dict[str, int] = Field(
        default_factory=dict, description="Monotonic counters since start (processed, failed...)."
    )
    gauges: dict[str, float] = Field(default_factory=dict, description="Current values (lag, rss_mb...).")
    progress: Progress | None = None
    message: str | None = Field(default=None, max_length=1024)
