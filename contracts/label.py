"""Label events: steps 4-5 of the loop (labelling gateway, verifier)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import AwareDatetime, Field

from visionloop.contracts.common import Box, ClassName, Detection, Frozen, ImageRef, ModelRef, Stage
from visionloop.contracts.envelope import Payload

MAX_BOXES = 2000
"""Most boxes one label set may carry, on the wire; the gateway and the verifier refuse more by the
same default (`max_boxes`), a project may allow fewer."""


class TaskKind(StrEnum):
    """What a person is asked to do with an image."""

    ANNOTATE = "annotate"
    """Draw every box: no model recognised the image."""
    REVIEW = "review"
    """Check a model's pre-labels: accept, correct or reject them."""
    REANNOTATE = "reannotate"
    """Draw again: an earlier submission was rejected."""


class ReviewDecision(StrEnum):
    """A reviewer's verdict on pre-labels."""

    ACCEPT = "accept"
    CORRECT = "correct"
    REJECT = "reject"


class LabelSourceKind(StrEnum):
    """Where a submission came from."""

    GATEWAY = "gateway"
    LABEL_STUDIO = "label_studio"
    IMPORT = "import"
    PRELABEL = "prelabel"
    """A model's pre-labels offered for auto-accept, no person involved yet."""


class LabelActions(Frozen):
    """What the person did, counted by the gateway: the labelling-cost counters."""

    boxes_drawn: int = Field(default=0, ge=0)
    boxes_moved: int = Field(default=0, ge=0, description="Boxes whose geometry was changed.")
    boxes_relabelled: int = Field(default=0, ge=0, description="Boxes whose class was changed.")
    boxes_deleted: int = Field(default=0, ge=0)
    prelabels_accepted: int = Field(default=0, ge=0, description="Pre-labels kept as they were.")


class Labeller(Frozen):
    """A person (or system) that produced a submission."""

    user_id: str = Field(min_length=1, max_length=128)
    role: str = Field(default="annotator", max_length=32)


class LabelSubmitted(Payload):
    """A labelling task was answered (or pre-labels were offered for verification)."""

    event_type = "label.submitted"

    submission_id: str = Field(min_length=1, max_length=128, description="Unique per submission.")
    task_id: str = Field(min_length=1, max_length=128)
    task_kind: TaskKind
    image: ImageRef
    boxes: list[Box] = Field(max_length=MAX_BOXES, description="The boxes as submitted, pixels.")
    decision: ReviewDecision | None = Field(
        default=None, description="For review tasks; null for annotate tasks."
    )
    labeller: Labeller
    source: LabelSourceKind = LabelSourceKind.GATEWAY
    opened_at: AwareDatetime | None = Field(default=None, description="When the task was leased.")
    submitted_at: AwareDatetime
    duration_s: float | None = Field(default=None, ge=0.0, description="Time the task was open.")
    actions: LabelActions = Field(default_factory=LabelActions)
    prelabel_model: ModelRef | None = Field(default=None, description="Model of the pre-labels.")
    prelabel_classes: list[ClassName] | None = Field(
        default=None,
        max_length=1000,
        description=(
            "The classes the pre-labelling model knows. The verifier auto-accepts pre-labels only "
            "when these cover the project's taxonomy: a model cannot vouch that an image holds no "
            "object of a class it never learnt. Null: unknown (auto-accept as calibrated)."
        ),
    )
    prelabels: list[Detection] = Field(
        default_factory=list, max_length=MAX_BOXES, description="Pre-labels the person started from."
    )
    uncertainty: float | None = Field(default=None, ge=0.0, le=1.0)
    consensus_group: str | None = Field(
        default=None,
        max_length=128,
        description="Submissions of one task by several people share this; the verifier votes.",
    )
    for_test_set: bool = Field(
        default=False, description="True when the label defines a frozen test image (import)."
    )
    class_names: list[ClassName] | None = Field(
        default=None,
        max_length=1000,
        description=(
            "The project's taxonomy (ordered class list) when the submission was made; the "
            "verifier refuses boxes of other classes. Null: the verifier uses the last taxonomy "
            "it saw for the project."
        ),
    )
    consensus_size: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description=(
            "How many people label the task of a `consensus_group`; the verifier votes once "
            "that many distinct labellers have submitted."
        ),
    )


class VerificationMethod(StrEnum):
    """How a label set was verified."""

    HUMAN = "human"
    AUTO = "auto"
    CONSENSUS = "consensus"
    IMPORT = "import"


class Provenance(Frozen):
    """Who and what stands behind a verified label set."""

    method: VerificationMethod
    labellers: list[Labeller] = Field(default_factory=list)
    prelabel_model: ModelRef | None = None
    actions: LabelActions = Field(default_factory=LabelActions)
    duration_s: float | None = Field(default=None, ge=0.0)
    spot_check: bool = Field(default=False, description="Sent to a person although auto-acceptable.")
    submission_ids: list[str] = Field(default_factory=list)
    batch_id: str | None = Field(
        default=None, max_length=128, description="The import this label set came with (its import id); null otherwise.",
    )


class LabelVerified(Payload):
    """A label set passed verification: it may train (or test) models."""

    event_type = "label.verified"

    label_id: str = Field(min_length=1, max_length=128)
    image: ImageRef
    boxes: list[Box] = Field(max_length=MAX_BOXES)
    provenance: Provenance
    for_test_set: bool = False
    class_names: list[ClassName] | None = Field(
        default=None,
        max_length=1000,
        description="The project's taxonomy (ordered class list) the boxes were checked against.",
    )


class LabelRejectReason(StrEnum):
    """Why a submission did not pass verification."""

    OUT_OF_BOUNDS = "out_of_bounds"
    DEGENERATE_BOX = "degenerate_box"
    BOX_TOO_SMALL = "box_too_small"
    UNKNOWN_CLASS = "unknown_class"
    DUPLICATE_BOX = "duplicate_box"
    TOO_MANY_BOXES = "too_many_boxes"
    REVIEWER_REJECTED = "reviewer_rejected"
    MISSING_DECISION = "missing_decision"
    NO_CONSENSUS = "no_consensus"
    STALE_TASK = "stale_task"
    NEEDS_REVIEW = "needs_review"
    """Pre-labels that calibration cannot auto-accept: a person reviews them."""
    SPOT_CHECK = "spot_check"
    """Auto-acceptable pre-labels drawn for a human spot check (keeps calibration honest)."""


class BoxIssue(Frozen):
    """One problem found in one submitted box."""

    index: int = Field(ge=0, description="Position of the box in the submission.")
    reason: LabelRejectReason
    message: str = Field(max_length=512)


class LabelRejected(Payload):
    """A submission failed verification; the image goes back to people as a re-annotate task."""

    event_type = "label.rejected"

    submission_id: str = Field(max_length=128)
    task_id: str = Field(max_length=128)
    image: ImageRef
    stage: Stage = Stage.VERIFIER
    reason: LabelRejectReason
    message: str = Field(max_length=1024)
    issues: list[BoxIssue] = Field(default_factory=list, max_length=MAX_BOXES)
    labeller: Labeller | None = None
