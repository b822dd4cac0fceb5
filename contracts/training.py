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
    IMPORT = "import"
    """A dataset import asked for one run after it (`visionloop import`)."""


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
    import_id: str | None = Field(
        default=None, max_length=128,
        description="The import this run follows: it starts once the import's labels are verified (or after the trainer's `import_wait_s`).",
    )
    import_labels: int | None = Field(default=None, ge=0, description="Label sets the import sent to the verifier.")
