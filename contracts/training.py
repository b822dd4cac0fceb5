"""Training commands: what starts step 6 besides enough new labels."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from visionloop.contracts.envelope import Payload


class TrainingTrigger(StrEnum):
    """Why a training run was asked for."""

    COMMAND = "command"
    LABEL_STUDIO = "label_studio"
    SCHEDULE = "schedule"


class TrainingRequested(Payload):
    """Ask the trainer to train the project's next model now."""

    event_type = "training.requested"

    trigger: TrainingTrigger = TrainingTrigger.COMMAND
    requested_by: str = Field(default="unknown", max_length=128)
    hyperparameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        max_length=64,
        description="Overrides of the project's hyper-parameters for this run only.",
    )
